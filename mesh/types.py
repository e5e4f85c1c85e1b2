"""Small shared types: ids and addresses.

Ids are ``NewType``s so that a signature never takes a bare ``str`` for an id.
"""

from __future__ import annotations

from typing import NamedTuple, NewType

NodeId = NewType("NodeId", str)
"""A node's unique name; equal to the subject of its certificate."""

ServiceId = NewType("ServiceId", str)
"""A service's unique name within the cluster."""

AllocId = NewType("AllocId", str)
"""An allocation's unique id: one replica of a service placed on one node."""


class Addr(NamedTuple):
    """A host (IPv4/IPv6 literal or name) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int) -> Addr:
        """Parse ``host``, ``host:port`` or ``[v6]:port``.

        Raises:
            ValueError: the text is not an address or the port is out of range.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty address")
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep:
                raise ValueError(f"unterminated '[' in address {text!r}")
            port_text = rest[1:] if rest.startswith(":") else ""
            if rest and not rest.startswith(":"):
                raise ValueError(f"unexpected text after ']' in address {text!r}")
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""
        if not host:
            raise ValueError(f"address {text!r} has no host")
        if port_text:
            if not port_text.isdigit():
                raise ValueError(f"port {port_text!r} in {text!r} is not a number")
            port = int(port_text)
        else:
            port = default_port
        if not 0 < port < 65536:
            raise ValueError(f"port {port} in {text!r} is out of range 1-65535")
        return cls(host, port)
