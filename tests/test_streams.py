"""mesh.streams: the direct socket and TLS streams, over real socket pairs.

The TLS contexts are the node contexts of :mod:`mesh.tls` with certificates from a
fresh CA (checked by OpenSSL against the real clock).
"""

from __future__ import annotations

import os
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from mesh.security import pki
from mesh.streams import DirectSocketStream, DirectTlsStream
from mesh.tls import TlsIdentity, client_context, server_context


def real_clock() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    tmp = tmp_path_factory.mktemp("streams")
    ca = pki.create_ca("streams", real_clock)
    identities = []
    for name in ("a", "b"):
        key = pki.generate_key()
        cert = pki.issue_node_certificate(ca, pki.create_csr(key, name), name, "127.0.0.1",
                                          real_clock)
        identity = TlsIdentity.node(Path(tmp / name))
        identity.save(cert, key, ca.cert)
        identities.append(identity)
    return server_context(identities[0]), client_context(identities[1])


async def tls_pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext]
                   ) -> tuple[DirectTlsStream, DirectTlsStream]:
    a, b = socket.socketpair()
    server = DirectTlsStream(a, contexts[0], server_side=True)
    client = DirectTlsStream(b, contexts[1], server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, "early end of stream"
        got += chunk
    return bytes(got)


async def test_tls_both_ways_at_once_with_records_larger_than_socket_buffers(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = await tls_pair(contexts)
    assert client.getpeercert(binary_form=True)  # the server's certificate
    up, down = os.urandom(3_000_000), os.urandom(2_000_000)  # far beyond one record
    received: dict[str, bytes] = {}

    async def pump(name: str, sender: DirectTlsStream, data: bytes,
                   receiver: DirectTlsStream) -> None:
        async with trio.open_nursery() as nursery:
            async def send() -> None:
                for i in range(0, len(data), 100_000):  # many writers' worth of frames
                    await sender.send_all(data[i:i + 100_000])

            nursery.start_soon(send)
            received[name] = await receive_exactly(receiver, len(data))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, "up", client, up, server)
            nursery.start_soon(pump, "down", server, down, client)
    assert received == {"up": up, "down": down}
    await client.aclose()
    assert await server.receive_some() == b""  # close_notify: a clean end
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


async def test_tls_reads_at_most_what_is_asked_and_keeps_the_rest(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = await tls_pair(contexts)
    await client.send_all(b"0123456789")
    assert await receive_exactly(server, 4) == b"0123"  # the next protocol loses nothing
    assert await receive_exactly(server, 6) == b"456789"
    await client.aclose()
    await server.aclose()


async def test_tls_failures_are_broken_resources_with_the_ssl_cause(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    # A peer that speaks no TLS at all.
    a, b = socket.socketpair()
    server = DirectTlsStream(a, contexts[0], server_side=True)
    b.sendall(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.do_handshake()
    assert isinstance(info.value.__cause__, ssl.SSLError)
    b.close()
    await server.aclose()
    # A peer that vanishes without close_notify.
    server, client = await tls_pair(contexts)
    client.socket.close()
    with pytest.raises(trio.BrokenResourceError, match="without TLS close_notify"):
        await server.receive_some()
    await server.aclose()


async def test_direct_socket_stream_round_trip_and_close() -> None:
    a, b = socket.socketpair()
    left, right = DirectSocketStream(a), DirectSocketStream(b)
    payload = os.urandom(1_000_000)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send_all, payload)
            assert await receive_exactly(right, len(payload)) == payload
    await left.aclose()
    assert await right.receive_some() == b""
    await right.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await right.receive_some()


class CountingSocket(socket.socket):
    """A socket that counts its ``recv`` calls."""

    __slots__ = ("recvs",)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recvs += 1
        return super().recv(bufsize, flags)


async def test_direct_socket_waits_before_receiving_again_after_a_short_read() -> None:
    a, b = socket.socketpair()
    counting = CountingSocket(a.family, a.type, fileno=a.detach())
    counting.recvs = 0
    stream = DirectSocketStream(counting)
    b.send(b"hello")
    assert await stream.receive_some(100) == b"hello"  # short: the socket is empty now
    assert counting.recvs == 1
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def receive() -> None:
            got.append(await stream.receive_some(100))

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert counting.recvs == 1  # parked on readability, no recv failing with EAGAIN
        b.send(b"x" * 100)
    assert got == [b"x" * 100]
    assert counting.recvs == 2
    b.send(b"rest")
    # The last read filled what was asked: the next one tries recv at once.
    assert await stream.receive_some(100) == b"rest"
    assert counting.recvs == 3
    b.close()
    assert await stream.receive_some(100) == b""
    await stream.aclose()
