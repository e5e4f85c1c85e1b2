"""Gossip messages: frozen dataclasses with ``to_wire()`` / ``from_wire()``.

One UDP datagram carries one envelope of type :attr:`MsgType.PACKET` whose body is a
list of messages, each ``[kind, field, ...]``: the primary message (a ping, an
ack...) first, then piggybacked broadcasts. Push-pull state sync travels over TCP
as :attr:`MsgType.PUSH_PULL` / :attr:`MsgType.PUSH_PULL_REPLY` frames.

Every field is untrusted: ``from_wire`` checks types and bounds and raises
:class:`~mesh.errors.RemoteProtocolError` on anything unexpected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from mesh import wire
from mesh.errors import RemoteProtocolError
from mesh.types import Addr, NodeId

MAX_NAME_CHARS: Final = 128
MAX_MESSAGES_PER_PACKET: Final = 256
MAX_LABELS: Final = 64
MAX_INCARNATION: Final = 2**63 - 1
MAX_SEQ: Final = 2**32 - 1


class MsgType(IntEnum):
    """Envelope type tags owned by gossip (range 1-31, see :mod:`mesh.wire`)."""

    PACKET = 1
    PUSH_PULL = 2
    PUSH_PULL_REPLY = 3


class Kind(IntEnum):
    """Message kinds inside a packet."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7


class Status(IntEnum):
    """A member's state as seen by one node."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def label(self) -> str:
        """Lower-case name, as shown by ``meshctl members``."""
        return self.name.lower()


# --- validation of untrusted fields ------------------------------------------------


def _fail(what: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad {what}: {value!r:.80}")


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(what, value)
    return value


def _str(value: Any, what: str, max_chars: int = MAX_NAME_CHARS, empty: bool = False) -> str:
    if type(value) is not str or len(value) > max_chars or (not empty and not value):
        raise _fail(what, value)
    return value


def _node(value: Any) -> NodeId:
    return NodeId(_str(value, "node name"))


def _addr(host: Any, port: Any) -> Addr:
    return Addr(_str(host, "host", 253), _int(port, "port", 1, 65535))


def _list(value: Any, what: str, n: int) -> list[Any]:
    if type(value) is not list or len(value) != n:
        raise _fail(what, value)
    return value


# --- member metadata ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """What a member says about itself; changes propagate as a new incarnation.

    Attributes:
        labels: sorted ``(key, value)`` pairs (``--label zone=a``).
        cpu_millis: schedulable CPU in thousandths of a core.
        memory_bytes: schedulable memory.
        role: free-form role text (e.g. ``"worker"``).
        ports: sorted ``(name, port)`` pairs of the node's other services (dns, metrics).
    """

    labels: tuple[tuple[str, str], ...] = ()
    cpu_millis: int = 0
    memory_bytes: int = 0
    role: str = "worker"
    ports: tuple[tuple[str, int], ...] = ()

    @classmethod
    def build(
        cls,
        labels: Mapping[str, str] | None = None,
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        role: str = "worker",
        ports: Mapping[str, int] | None = None,
    ) -> Meta:
        """Build from mappings, sorting them so equal metadata compares equal."""
        return cls(
            tuple(sorted((labels or {}).items())),
            cpu_millis,
            memory_bytes,
            role,
            tuple(sorted((ports or {}).items())),
        )

    @property
    def labels_dict(self) -> dict[str, str]:
        """The labels as a dict."""
        return dict(self.labels)

    @property
    def ports_dict(self) -> dict[str, int]:
        """The named ports as a dict."""
        return dict(self.ports)

    def to_wire(self) -> list[Any]:
        """``[labels map, cpu_millis, memory_bytes, role, ports map]``."""
        return [dict(self.labels), self.cpu_millis, self.memory_bytes, self.role, dict(self.ports)]

    @classmethod
    def from_wire(cls, raw: Any) -> Meta:
        """Validate and build from the wire form.

        Raises:
            RemoteProtocolError: any field is of the wrong type or out of bounds.
        """
        labels, cpu, mem, role, ports = _list(raw, "meta", 5)
        if type(labels) is not dict or len(labels) > MAX_LABELS:
            raise _fail("labels", labels)
        if type(ports) is not dict or len(ports) > MAX_LABELS:
            raise _fail("ports", ports)
        return cls(
            tuple(sorted((_str(k, "label key"), _str(v, "label value", 256, True))
                         for k, v in labels.items())),
            _int(cpu, "cpu_millis", 0, 2**40),
            _int(mem, "memory_bytes", 0, 2**62),
            _str(role, "role", 64, True),
            tuple(sorted((_str(k, "port name", 64), _int(v, "port", 1, 65535))
                         for k, v in ports.items())),
        )


# --- packet messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """A direct probe. ``target`` lets a node that took over an address refuse it."""

    seq: int
    target: NodeId
    source: NodeId

    def to_wire(self) -> list[Any]:
        return [Kind.PING, self.seq, self.target, self.source]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Ping:
        _, seq, target, source = _list(f, "ping", 4)
        return cls(_int(seq, "seq", 0, MAX_SEQ), _node(target), _node(source))


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """SWIM's ping-req: please probe ``target`` for ``source`` and relay the ack.
    ``want_nack`` asks for a nack if the target does not answer (Lifeguard)."""

    seq: int
    target: NodeId
    target_addr: Addr
    want_nack: bool
    source: NodeId

    def to_wire(self) -> list[Any]:
        return [Kind.INDIRECT_PING, self.seq, self.target, self.target_addr.host,
                self.target_addr.port, self.want_nack, self.source]

    @classmethod
    def from_fields(cls, f: list[Any]) -> IndirectPing:
        _, seq, target, host, port, nack, source = _list(f, "indirect ping", 7)
        if type(nack) is not bool:
            raise _fail("want_nack", nack)
        return cls(_int(seq, "seq", 0, MAX_SEQ), _node(target), _addr(host, port), nack,
                   _node(source))


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ping (or relayed answer to an indirect ping)."""

    seq: int

    def to_wire(self) -> list[Any]:
        return [Kind.ACK, self.seq]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Ack:
        return cls(_int(_list(f, "ack", 2)[1], "seq", 0, MAX_SEQ))


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: the relay is alive but the target did not answer it."""

    seq: int

    def to_wire(self) -> list[Any]:
        return [Kind.NACK, self.seq]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Nack:
        return cls(_int(_list(f, "nack", 2)[1], "seq", 0, MAX_SEQ))


@dataclass(frozen=True, slots=True)
class Suspect:
    """``accuser`` suspects ``node`` at ``incarnation``."""

    node: NodeId
    incarnation: int
    accuser: NodeId

    def to_wire(self) -> list[Any]:
        return [Kind.SUSPECT, self.node, self.incarnation, self.accuser]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Suspect:
        _, node, inc, accuser = _list(f, "suspect", 4)
        return cls(_node(node), _int(inc, "incarnation", 0, MAX_INCARNATION), _node(accuser))


@dataclass(frozen=True, slots=True)
class Alive:
    """``node`` is alive at ``incarnation``, reachable at ``addr``, with ``meta``."""

    node: NodeId
    incarnation: int
    addr: Addr
    meta: Meta

    def to_wire(self) -> list[Any]:
        return [Kind.ALIVE, self.node, self.incarnation, self.addr.host, self.addr.port,
                self.meta.to_wire()]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Alive:
        _, node, inc, host, port, meta = _list(f, "alive", 6)
        return cls(_node(node), _int(inc, "incarnation", 0, MAX_INCARNATION), _addr(host, port),
                   Meta.from_wire(meta))


@dataclass(frozen=True, slots=True)
class Dead:
    """``accuser`` declares ``node`` dead; ``accuser == node`` means it left."""

    node: NodeId
    incarnation: int
    accuser: NodeId

    @property
    def is_leave(self) -> bool:
        """A node announcing its own graceful departure."""
        return self.node == self.accuser

    def to_wire(self) -> list[Any]:
        return [Kind.DEAD, self.node, self.incarnation, self.accuser]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Dead:
        _, node, inc, accuser = _list(f, "dead", 4)
        return cls(_node(node), _int(inc, "incarnation", 0, MAX_INCARNATION), _node(accuser))


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead

_DECODERS: Final[dict[int, Any]] = {
    Kind.PING: Ping.from_fields,
    Kind.INDIRECT_PING: IndirectPing.from_fields,
    Kind.ACK: Ack.from_fields,
    Kind.NACK: Nack.from_fields,
    Kind.SUSPECT: Suspect.from_fields,
    Kind.ALIVE: Alive.from_fields,
    Kind.DEAD: Dead.from_fields,
}


def pack_message(msg: Message) -> bytes:
    """Msgpack one message (without the envelope) for the broadcast queue."""
    return wire.pack_body(msg.to_wire())


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    assert n < 65536
    return b"\xdc" + n.to_bytes(2, "big")


PACKET_OVERHEAD_BYTES: Final = wire.HEADER_BYTES + 3
"""Envelope header plus the largest list header a packet uses."""


def encode_packet(packed_messages: list[bytes]) -> bytes:
    """Build one datagram from already-packed messages (see :func:`pack_message`)."""
    return (
        bytes((wire.PROTOCOL_MAJOR, wire.PROTOCOL_MINOR, MsgType.PACKET))
        + _array_header(len(packed_messages))
        + b"".join(packed_messages)
    )


def decode_packet(data: bytes, max_bytes: int) -> list[Message]:
    """Parse one datagram into its messages, all or nothing.

    Raises:
        RemoteProtocolError: anything malformed, unknown, foreign or oversized.
    """
    env = wire.decode(data, max_bytes=max_bytes)
    if env.msg_type != MsgType.PACKET:
        raise RemoteProtocolError(f"unexpected message type {env.msg_type} on the gossip port")
    body = env.body
    if type(body) is not list or not body or len(body) > MAX_MESSAGES_PER_PACKET:
        raise _fail("packet body", body)
    out: list[Message] = []
    for item in body:
        if type(item) is not list or not item or type(item[0]) is not int:
            raise _fail("message", item)
        decoder = _DECODERS.get(item[0])
        if decoder is None:
            raise _fail("message kind", item[0])
        out.append(decoder(item))
    return out


# --- push-pull ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberState:
    """One member's full state as exchanged by push-pull."""

    node: NodeId
    addr: Addr
    incarnation: int
    status: Status
    meta: Meta

    def to_wire(self) -> list[Any]:
        return [self.node, self.addr.host, self.addr.port, self.incarnation, int(self.status),
                self.meta.to_wire()]

    @classmethod
    def from_wire(cls, raw: Any) -> MemberState:
        node, host, port, inc, status, meta = _list(raw, "member state", 6)
        return cls(_node(node), _addr(host, port), _int(inc, "incarnation", 0, MAX_INCARNATION),
                   Status(_int(status, "status", 0, 3)), Meta.from_wire(meta))


@dataclass(frozen=True, slots=True)
class PushPull:
    """A full state exchange; ``join`` marks the first one of a joining node."""

    join: bool
    states: tuple[MemberState, ...] = field(default=())
    reply: bool = False

    def encode(self) -> bytes:
        """The envelope bytes (to be framed on a TCP stream)."""
        t = MsgType.PUSH_PULL_REPLY if self.reply else MsgType.PUSH_PULL
        return wire.encode(t, [self.join, [s.to_wire() for s in self.states]])

    @classmethod
    def from_envelope(cls, env: wire.Envelope, max_members: int = 100_000) -> PushPull:
        """Validate a decoded envelope.

        Raises:
            RemoteProtocolError: wrong type or malformed states.
        """
        if env.msg_type not in (MsgType.PUSH_PULL, MsgType.PUSH_PULL_REPLY):
            raise RemoteProtocolError(f"expected push-pull, got message type {env.msg_type}")
        join, raw_states = _list(env.body, "push-pull", 2)
        if type(join) is not bool or type(raw_states) is not list or len(raw_states) > max_members:
            raise _fail("push-pull body", env.body)
        return cls(join, tuple(MemberState.from_wire(s) for s in raw_states),
                   env.msg_type == MsgType.PUSH_PULL_REPLY)
