"""Stream helpers shared by every link: reading :mod:`mesh.wire` frames from trio
streams, and cheaper streams than trio's: :class:`DirectSocketStream` for the local
API socket, :class:`DirectTlsStream` for the links between nodes.

Kept apart from the adapters so that a light client (``meshctl``) can read frames
without importing the gossip or TLS machinery.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from typing import Any

import trio

from mesh import wire
from mesh.errors import StreamClosed


async def read_frame(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """Read one length-prefixed frame; return its envelope bytes.

    Raises:
        StreamClosed: the peer closed the stream before a whole frame arrived.
        RemoteProtocolError: the frame is oversized.
    """
    decoder = wire.FrameDecoder(max_bytes)
    while True:
        payload = decoder.next_payload()
        if isinstance(payload, bytes):
            return payload
        chunk = await stream.receive_some(65_536)
        if not chunk:
            raise StreamClosed("stream closed before a whole frame arrived")
        decoder.receive_data(bytes(chunk))


FAIRNESS_OPS = 16
"""A :class:`DirectSocketStream` yields to the scheduler at least once every this
many operations that completed without waiting."""


class _DirectSocket:
    """A non-blocking stdlib socket whose system calls are made at once; the task
    parks (``trio.lowlevel.wait_readable``/``wait_writable``, cancellable) only when
    a call would block, and yields once every :data:`FAIRNESS_OPS` operations that
    did not wait.

    A receive that returned less than it asked for emptied the socket: the next
    one waits for readability before it calls ``recv``, instead of a ``recv``
    that fails with ``EAGAIN`` first (a request-answer peer has rarely sent more
    by then: half the leader's receives failed so under the Raft benchmark)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False
        self._unyielded = 0
        self._drained = False
        """The last receive emptied the socket's buffer."""

    @property
    def closed(self) -> bool:
        """Whether the stream was closed here."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")

    async def _maybe_yield(self) -> None:
        self._unyielded += 1
        if self._unyielded >= FAIRNESS_OPS:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    async def _recv(self, max_bytes: int) -> bytes:
        """Bytes that arrived (``b""``: the peer closed its end)."""
        if self._drained:
            self._check_open()
            self._unyielded = 0
            await trio.lowlevel.wait_readable(self._sock)
        while True:
            self._check_open()
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            self._drained = 0 < len(data) < max_bytes
            return data

    async def _send_some(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes of ``data`` (waiting for room); how much."""
        while True:
            self._check_open()
            try:
                return self._sock.send(data)
            except BlockingIOError:
                self._unyielded = 0
                await trio.lowlevel.wait_writable(self._sock)
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket has room."""
        await trio.lowlevel.wait_writable(self._sock)

    def _close_socket(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


class DirectSocketStream(_DirectSocket, trio.abc.HalfCloseableStream):
    """A stream over a connected stdlib socket that makes its system call at once
    and only parks the task when the call would block.

    ``trio.SocketStream`` passes through the scheduler twice per operation (a
    cancellation check before the call and a reschedule after it, about 15 us of
    the 18 us a send and a receive cost on a small VM), which a server answering
    one small request per receive pays on every request. This stream skips those
    passes on the fast path; to stay fair it still yields once every
    :data:`FAIRNESS_OPS` operations that did not wait, and it is cancellable
    wherever it waits. Unlike trio's streams, an operation that completes at once
    is therefore not always a checkpoint.

    Resource handling:
        Owns the socket: :meth:`aclose` closes it.

    Error handling:
        ``trio.BrokenResourceError`` when the connection fails,
        ``trio.ClosedResourceError`` after :meth:`aclose`, as trio's streams do.
    """

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Bytes that arrived (at most ``max_bytes``); ``b""`` at end of stream."""
        data = await self._recv(max_bytes or 65_536)
        await self._maybe_yield()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (waiting for room as needed)."""
        view = memoryview(data)
        while view:
            view = view[await self._send_some(view):]
        await self._maybe_yield()

    async def send_eof(self) -> None:
        """Shut down the sending half."""
        await trio.lowlevel.checkpoint()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        """Close the socket (idempotent)."""
        if not self._closed:
            self._closed = True
            self._close_socket()
        await trio.lowlevel.checkpoint()


async def accept_direct(listener: socket.socket) -> DirectSocketStream:
    """Accept one connection on a non-blocking listening ``listener`` (waiting for
    one as needed)."""
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: wait a moment rather than spin.
                await trio.sleep(0.1)
                continue
            raise
        return DirectSocketStream(conn)


class DirectTlsStream(_DirectSocket, trio.abc.Stream):
    """TLS over a connected stdlib socket, with ``ssl.SSLObject`` and memory BIOs,
    making its system calls at once like :class:`DirectSocketStream`.

    ``trio.SSLStream`` runs about 90 us of Python per 4 KB sent and received (its
    generic retry machinery and scheduler passes) where the TLS work itself is
    about 6 us; every Raft frame and forwarded call pays it on both ends. This
    stream does the same TLS (same context, same verification, the handshake and
    the records by OpenSSL) with less around it.

    One task may send while another receives (an :class:`~mesh.node.api.RpcLink`
    does); bytes OpenSSL produces leave in the order it produced them. Like trio's
    streams, every failure is ``trio.BrokenResourceError`` (an ``ssl.SSLError``
    as its ``__cause__``), and an end of stream without TLS close_notify is one
    too. ``receive_some`` returns ``b""`` after the peer's close_notify.

    Resource handling:
        Owns the socket: :meth:`aclose` closes it (after a best-effort
        close_notify).
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        self._pending = bytearray()
        """Bytes taken from OpenSSL, not yet accepted by the socket."""
        self._flushing: trio.Event | None = None
        """Set while a task sends ``_pending`` (others wait for it)."""

    # --- what tls.py reads of the connection -------------------------------------

    def selected_alpn_protocol(self) -> str | None:
        """The protocol ALPN agreed on (after the handshake)."""
        return self._tls.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate (DER with ``binary_form``)."""
        return self._tls.getpeercert(binary_form)

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        """The TLS channel binding (ties the join token proof to this connection)."""
        return self._tls.get_channel_binding(cb_type)

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (its addresses)."""
        return self._sock

    # --- the stream --------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (the context verifies the peer).

        Raises:
            trio.BrokenResourceError: it failed (the ``ssl.SSLError`` is the cause).
        """
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError as exc:
                with contextlib.suppress(trio.BrokenResourceError):
                    await self._flush()  # the alert, so the peer learns why
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            break
        await self._flush()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``."""
        self._check_open()
        view = memoryview(data)
        try:
            while view:
                view = view[self._tls.write(view):]
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS write failed: {exc}") from exc
        await self._flush()
        await self._maybe_yield()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes (at most ``max_bytes``); ``b""`` after close_notify."""
        while True:
            self._check_open()
            try:
                data = self._tls.read(max_bytes or 65_536)
            except ssl.SSLWantReadError:
                if self._out.pending:  # e.g. a TLS 1.3 key update to answer
                    await self._flush()
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS read failed: {exc}") from exc
            await self._maybe_yield()
            return data

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it at once, then close."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            data = bytes(self._pending) + self._out.read()
            if data:
                self._sock.send(data)
        self._close_socket()
        await trio.lowlevel.checkpoint()

    # --- inside ------------------------------------------------------------------

    async def _fill(self) -> None:
        """Feed OpenSSL what the socket has (waiting for some)."""
        chunk = await self._recv(65_536)
        if not chunk:
            raise trio.BrokenResourceError("the peer closed the connection without "
                                           "TLS close_notify")
        self._in.write(chunk)

    async def _flush(self) -> None:
        """Send everything OpenSSL has produced so far, in order."""
        self._pending += self._out.read()
        while self._flushing is not None:  # another task is sending: it sends ours too
            await self._flushing.wait()
            self._pending += self._out.read()
        if not self._pending:
            return
        self._flushing = trio.Event()
        try:
            while self._pending:
                # the bytearray itself, not a view: others append to it meanwhile
                del self._pending[:await self._send_some(self._pending)]
                self._pending += self._out.read()
        finally:
            done, self._flushing = self._flushing, None
            done.set()


async def open_direct_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port`` (trio's happy-eyeballs
    connect, then the socket taken out of its stream).

    Raises:
        OSError: the connection failed.
    """
    stream = await trio.open_tcp_stream(host, port)
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock
