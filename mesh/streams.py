"""Reading :mod:`mesh.wire` frames from trio streams (shared by every TCP link).

Kept apart from the adapters so that a light client (``meshctl``) can read frames
without importing the gossip or TLS machinery.
"""

from __future__ import annotations

import trio

from mesh import wire
from mesh.errors import RemoteProtocolError


async def read_frame(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """Read one length-prefixed frame; return its envelope bytes.

    Raises:
        RemoteProtocolError: the peer closed early or the frame is oversized.
    """
    decoder = wire.FrameDecoder(max_bytes)
    while True:
        payload = decoder.next_payload()
        if isinstance(payload, bytes):
            return payload
        chunk = await stream.receive_some(65_536)
        if not chunk:
            raise RemoteProtocolError("stream closed before a whole frame arrived")
        decoder.receive_data(bytes(chunk))
