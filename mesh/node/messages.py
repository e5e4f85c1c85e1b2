"""Local API messages (``meshctl`` <-> ``meshd`` over the unix socket, and later
``mesh-rpc/1``): a request names a method and carries params; a response carries a
result or an error a person can act on. Type tags 80-111 (see :mod:`mesh.wire`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from mesh import wire
from mesh.errors import RemoteProtocolError

MAX_API_FRAME_BYTES = 16 * 1024 * 1024


class RpcType(IntEnum):
    """Envelope type tags owned by the API."""

    REQUEST = 80
    RESPONSE = 81


@dataclass(frozen=True, slots=True)
class Request:
    """Call ``method`` with ``params``."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The envelope bytes."""
        return wire.encode(RpcType.REQUEST, [self.method, self.params])

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Validate an untrusted request.

        Raises:
            RemoteProtocolError: malformed.
        """
        return cls(*decode_call(data))


def decode_call(data: bytes) -> tuple[str, dict[str, Any]]:
    """Validate an untrusted request: its method and params, as :meth:`Request.decode`
    does but without building the :class:`Request` (the API server's hot path).

    Raises:
        RemoteProtocolError: malformed.
    """
    msg_type, body = wire.decode_tagged(data, MAX_API_FRAME_BYTES)
    if msg_type != RpcType.REQUEST or type(body) is not list or len(body) != 2:
        raise RemoteProtocolError("not an API request")
    method, params = body
    if type(method) is not str or not method or len(method) > 64 or type(params) is not dict:
        raise RemoteProtocolError("malformed API request")
    return method, params


@dataclass(frozen=True, slots=True)
class Response:
    """``ok`` with a ``result``, or not ok with an ``error`` message."""

    ok: bool
    result: Any = None
    error: str = ""

    def encode(self) -> bytes:
        """The envelope bytes."""
        return wire.encode(RpcType.RESPONSE, [self.ok, self.result, self.error])

    @classmethod
    def decode(cls, data: bytes) -> Response:
        """Validate a response.

        Raises:
            RemoteProtocolError: malformed.
        """
        env = wire.decode(data, MAX_API_FRAME_BYTES)
        body = env.body
        if env.msg_type != RpcType.RESPONSE or type(body) is not list or len(body) != 3:
            raise RemoteProtocolError("not an API response")
        ok, result, error = body
        if type(ok) is not bool or type(error) is not str:
            raise RemoteProtocolError("malformed API response")
        return cls(ok, result, error)


def encode_answer(encoder: wire.FrameEncoder, ok: bool, result: Any = None, error: str = ""
                  ) -> bytes:
    """The frame of ``Response(ok, result, error)`` (the bytes of
    ``wire.frame(response.encode())``), built without the :class:`Response` by the
    stream's ``encoder`` (the API server's hot path)."""
    return encoder.encode(RpcType.RESPONSE, [ok, result, error])
