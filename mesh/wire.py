"""The wire envelope and TCP framing shared by every protocol.

Envelope (one UDP datagram, or one TCP frame's payload)::

    +---------+---------+--------+----------------------+
    | major u8| minor u8| type u8| msgpack body ...     |
    +---------+---------+--------+----------------------+

A peer of another *major* version is refused (``RemoteProtocolError`` naming both
versions); a different *minor* version is accepted, since minor bumps only add
optional fields. The type byte selects the message; each subpackage owns a range so
tags never collide:

    gossip 1-31, join/security 32-47, raft 48-79, rpc 80-111, dns/other 112-127.

TCP frames are ``u32 big-endian length`` + envelope. :class:`FrameDecoder` is a
sans-I/O buffer in h11's shape (``receive_data`` only buffers, ``next_frame``
parses). Every length is bounded and every decode treats its input as hostile.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from mesh.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_MAJOR: Final = 1
PROTOCOL_MINOR: Final = 0
HEADER_BYTES: Final = 3
FRAME_PREFIX_BYTES: Final = 4

MAX_DATAGRAM_BYTES: Final = 65_507
"""Largest UDP payload we will ever try to decode (the IPv4 maximum)."""

DEFAULT_MAX_FRAME_BYTES: Final = 8 * 1024 * 1024
"""Default largest TCP frame (8 MiB); raft snapshots travel in smaller chunks."""

_LEN = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">IBBB")
"""A frame's length prefix and its envelope's version header and type tag."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded envelope: version, type tag and the msgpack body (untrusted)."""

    major: int
    minor: int
    msg_type: int
    body: Any


def pack_body(body: Any) -> bytes:
    """Msgpack-encode ``body`` (bin for bytes, str for text, no extension types).

    Uses a packer kept per thread (``msgpack.packb`` builds one per call: about
    0.5 us more for a small body, paid by every command and message)."""
    try:
        packer = _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True)
    packed: bytes = packer.pack(body)
    if len(packed) > FrameEncoder.KEPT_BUFFER_BYTES:
        del _PACKERS.packer  # do not keep the buffer of the largest body packed
    return packed


_PACKERS = threading.local()
"""This thread's msgpack packer (``packer``), once it packed something."""


def pack_array_header(n: int) -> bytes:
    """The msgpack header of an ``n``-element array (its elements' encodings follow)."""
    return _ARRAY_HEADERS.pack_array_header(n)  # type: ignore[no-any-return]


_ARRAY_HEADERS = msgpack.Packer(use_bin_type=True)


def unpack_body(data: bytes, max_bytes: int) -> Any:
    """Decode an untrusted msgpack body with every length bounded by ``max_bytes``.

    Raises:
        RemoteProtocolError: the body is malformed, truncated, has trailing bytes,
            uses an extension type or exceeds the limits.
    """
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"body of {len(data)} bytes exceeds limit {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes // 2 + 1,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed msgpack body: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("msgpack body nested too deeply") from None


def encode(msg_type: int, body: Any) -> bytes:
    """Build one envelope: version header, type tag, msgpack body."""
    if not 0 < msg_type < 256:
        raise LocalProtocolError(f"message type {msg_type} out of range 1-255")
    return bytes((PROTOCOL_MAJOR, PROTOCOL_MINOR, msg_type)) + pack_body(body)


def decode(data: bytes, max_bytes: int = MAX_DATAGRAM_BYTES) -> Envelope:
    """Parse one envelope from untrusted bytes.

    Raises:
        RemoteProtocolError: too short, too long, another major version, or a
            malformed body. The message says which, for the DEBUG log.
    """
    msg_type, body = decode_tagged(data, max_bytes)
    return Envelope(data[0], data[1], msg_type, body)


def decode_tagged(data: bytes, max_bytes: int = MAX_DATAGRAM_BYTES) -> tuple[int, Any]:
    """:func:`decode` without building the :class:`Envelope`: the type tag and the
    body, for a hot path that only needs those (another minor version is accepted,
    as :func:`decode` accepts it, and not returned).

    Raises:
        RemoteProtocolError: as :func:`decode`, with the same messages.
    """
    if len(data) < HEADER_BYTES + 1:
        raise RemoteProtocolError(f"envelope of {len(data)} bytes is too short")
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"envelope of {len(data)} bytes exceeds limit {max_bytes}")
    major, minor, msg_type = data[0], data[1], data[2]
    if major != PROTOCOL_MAJOR:
        raise RemoteProtocolError(
            f"peer speaks protocol {major}.{minor}, we speak {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; "
            "upgrade the older node"
        )
    if msg_type == 0:
        raise RemoteProtocolError("message type 0 is reserved")
    return msg_type, unpack_body(data[HEADER_BYTES:], max_bytes)


def frame(envelope_bytes: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Prefix an encoded envelope with its length, for a TCP stream."""
    if len(envelope_bytes) > max_frame_bytes:
        raise LocalProtocolError(
            f"frame of {len(envelope_bytes)} bytes exceeds limit {max_frame_bytes}"
        )
    return _LEN.pack(len(envelope_bytes)) + envelope_bytes


class FrameEncoder:
    """Builds the frames of one stream, sans I/O: ``encode(msg_type, body)`` gives
    the same bytes as ``frame(encode(msg_type, body), max_frame_bytes)`` in one
    step, with one msgpack packer kept for the stream (instead of one built per
    message) and one concatenation.

    Not for two threads at once (the packer has one buffer); a trio stream's
    tasks share the trio thread, so one encoder per stream is safe.
    """

    KEPT_BUFFER_BYTES: Final = 64 * 1024
    """A packer's buffer grows to the largest body it packed and stays that big: one
    that packed a bigger body is replaced, so that a long-lived stream does not
    hold on to its largest message."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        self._max = max_frame_bytes

    def encode(self, msg_type: int, body: Any) -> bytes:
        """One frame: length prefix, version header, type tag, msgpack body.

        Raises:
            LocalProtocolError: ``msg_type`` is out of range or the frame would
                exceed the limit (as :func:`encode` and :func:`frame` do).
        """
        if not 0 < msg_type < 256:
            raise LocalProtocolError(f"message type {msg_type} out of range 1-255")
        packed: bytes = self._packer.pack(body)
        if len(packed) > self.KEPT_BUFFER_BYTES:
            self._packer = msgpack.Packer(use_bin_type=True)
        length = HEADER_BYTES + len(packed)
        if length > self._max:
            raise LocalProtocolError(f"frame of {length} bytes exceeds limit {self._max}")
        return _FRAME_HEAD.pack(length, PROTOCOL_MAJOR, PROTOCOL_MINOR, msg_type) + packed


class NeedData:
    """Sentinel returned by :meth:`FrameDecoder.next_frame` (h11's ``NEED_DATA``)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class FrameDecoder:
    """Splits a TCP byte stream into envelopes, sans I/O.

    ``receive_data`` only buffers; ``next_frame`` returns an :class:`Envelope` or
    :data:`NEED_DATA`. A frame longer than ``max_frame_bytes`` is refused as soon
    as its length prefix arrives, before its body is buffered.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        self._buf += data

    def next_payload(self) -> bytes | NeedData:
        """Return the next complete frame's envelope bytes (undecoded), or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: the frame is oversized; the stream is then unusable
                and should be closed.
        """
        if len(self._buf) < FRAME_PREFIX_BYTES:
            return NEED_DATA
        (length,) = _LEN.unpack_from(self._buf)
        if length > self._max:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds limit {self._max}")
        end = FRAME_PREFIX_BYTES + length
        if len(self._buf) < end:
            return NEED_DATA
        payload = bytes(self._buf[FRAME_PREFIX_BYTES:end])
        del self._buf[:end]
        return payload

    def next_payloads(self) -> list[bytes]:
        """Every complete frame's envelope bytes buffered, in order (undecoded);
        empty when more data is needed. What :meth:`next_payload` returns one call
        at a time, at less cost per frame (a server reading pipelined requests).

        Raises:
            RemoteProtocolError: the first frame buffered is oversized; the stream
                is then unusable and should be closed. Complete frames before an
                oversized one are returned first: the call after raises.
        """
        buf, start = self._buf, 0
        payloads: list[bytes] = []
        while len(buf) - start >= FRAME_PREFIX_BYTES:
            (length,) = _LEN.unpack_from(buf, start)
            if length > self._max:
                if payloads:
                    break
                raise RemoteProtocolError(f"frame of {length} bytes exceeds limit {self._max}")
            end = start + FRAME_PREFIX_BYTES + length
            if len(buf) < end:
                break
            payloads.append(bytes(buf[start + FRAME_PREFIX_BYTES:end]))
            start = end
        del buf[:start]
        return payloads

    def next_frame(self) -> Envelope | NeedData:
        """Return the next complete envelope, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: the frame is oversized or its envelope malformed;
                the stream is then unusable and should be closed.
        """
        payload = self.next_payload()
        if isinstance(payload, NeedData):
            return payload
        return decode(payload, max_bytes=self._max)
