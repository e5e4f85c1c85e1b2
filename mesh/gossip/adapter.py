"""The trio adapter that runs a :class:`~mesh.gossip.core.Membership` core.

It owns every piece of I/O and no protocol decision: it feeds the core datagrams,
push-pull streams and timeouts (``now = trio.current_time()``), drains its outputs
and performs them. Transports are small Protocols so that tests run the very same
adapter over :class:`MemoryNetwork` with trio's autojump clock.

Resource handling:
    :meth:`GossipAdapter.run` owns a nursery with the receive loop, the timer loop,
    the send loop and one task per push-pull exchange. Cancelling it stops all of
    them; sockets belong to the transport and are closed by whoever opened them.

Error handling:
    A datagram or stream that fails to decode is dropped, counted and logged at
    DEBUG; a failed send is reported to the core (``handle_send_failed``). Nothing
    a peer sends can end the adapter.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from mesh import wire
from mesh.errors import RemoteProtocolError
from mesh.gossip.core import (
    GossipOutput,
    HealthChanged,
    JoinFinished,
    MemberChanged,
    MemberReaped,
    Membership,
    Send,
    StreamSend,
)
from mesh.gossip.messages import Meta, Status
from mesh.streams import read_frame
from mesh.types import Addr

LOGGER = logging.getLogger(__name__)

MembershipEvent = MemberChanged | MemberReaped


class PacketCodec(Protocol):
    """Turns core datagrams into wire datagrams and back (e.g. AEAD sealing)."""

    def seal(self, data: bytes) -> bytes:
        """Protect an outgoing datagram."""
        ...

    def open(self, data: bytes) -> bytes:
        """Check and unwrap an incoming datagram.

        Raises:
            RemoteProtocolError: it fails authentication or is malformed.
        """
        ...


class PlainCodec:
    """No protection: datagrams go out as the core built them."""

    def seal(self, data: bytes) -> bytes:
        return data

    def open(self, data: bytes) -> bytes:
        return data


class PacketTransport(Protocol):
    """Best-effort datagrams (memberlist ``transport.go``: packets may be lost)."""

    async def send_packet(self, to: Addr, data: bytes) -> None:
        """Send one datagram. Raises ``OSError`` if the network refuses it."""
        ...

    async def recv_packet(self) -> tuple[Addr, bytes]:
        """Wait for the next datagram."""
        ...


class StreamDialer(Protocol):
    """Reliable streams to peers: :class:`mesh.tls.TlsDialer` (mutual TLS, ALPN
    ``mesh-gossip/1``) in meshd, :class:`MemoryTransport` in tests."""

    async def open_stream(self, to: Addr) -> trio.abc.Stream:
        """Connect to ``to``. Raises ``OSError`` if it cannot."""
        ...


# --- real sockets ------------------------------------------------------------------


class UdpTransport:
    """Datagrams over a bound trio UDP socket."""

    def __init__(self, sock: trio.socket.SocketType, max_datagram_bytes: int = 65_535) -> None:
        self._sock = sock
        self._max = max_datagram_bytes

    async def send_packet(self, to: Addr, data: bytes) -> None:
        await self._sock.sendto(data, (to.host, to.port))

    async def recv_packet(self) -> tuple[Addr, bytes]:
        while True:
            try:
                data, src = await self._sock.recvfrom(self._max)
            except ConnectionResetError:
                continue  # an ICMP port-unreachable for an earlier send: not ours to fail
            return Addr(src[0], src[1]), data


async def bind_gossip_sockets(
    bind: Addr,
) -> tuple[trio.socket.SocketType, trio.SocketListener]:
    """Bind the UDP socket and the TCP listener on the same address and port.

    Port 0 picks a free port (the same one for both).

    Raises:
        OSError: the address cannot be bound; ``errno`` says why (``EADDRINUSE``...).
    """
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    tcp = trio.socket.socket(family, socket.SOCK_STREAM)
    udp = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await tcp.bind((bind.host, bind.port))
        port = tcp.getsockname()[1]
        await udp.bind((bind.host, port))
        tcp.listen(128)
    except BaseException:
        tcp.close()
        udp.close()
        raise
    return udp, trio.SocketListener(tcp)


def describe_bind_error(bind: Addr, exc: OSError) -> str:
    """One line a person can act on for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return (f"port {bind.port} on {bind.host} is in use (another meshd?): stop it, or "
                f"pass --bind {bind.host}:PORT with a free port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"address {bind.host} is not on this host: pass --bind with one of this "
                "host's addresses (127.0.0.x works for a local cluster)")
    if exc.errno == errno.EACCES:
        return f"not allowed to bind {bind}: use a port above 1023 or run as root"
    return f"cannot bind {bind}: {exc.strerror or exc}"


# --- in-memory fakes ---------------------------------------------------------------


class MemoryNetwork:
    """Connects :class:`MemoryTransport` endpoints in one process, for tests.

    Datagrams go through bounded memory channels (a full inbox drops, as a full
    socket buffer would); streams are ``trio.testing.memory_stream_pair`` whose
    server side is handed to the handler the endpoint registered. ``cut(addr)``
    makes an endpoint unreachable both ways (a crash or partition).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._endpoints: dict[Addr, MemoryTransport] = {}
        self._cut: set[Addr] = set()

    def endpoint(self, addr: Addr) -> MemoryTransport:
        """Create the endpoint that receives for ``addr``."""
        ep = MemoryTransport(self, addr)
        self._endpoints[addr] = ep
        return ep

    def cut(self, addr: Addr) -> None:
        """Make ``addr`` unreachable, both ways."""
        self._cut.add(addr)

    def heal(self, addr: Addr) -> None:
        """Make ``addr`` reachable again."""
        self._cut.discard(addr)

    def _reachable(self, src: Addr, dst: Addr) -> MemoryTransport | None:
        if src in self._cut or dst in self._cut:
            return None
        return self._endpoints.get(dst)

    def _deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        ep = self._reachable(src, dst)
        if ep is not None:
            try:
                ep._inbox_send.send_nowait((src, data))
            except trio.WouldBlock:
                pass  # a full receive buffer drops, like a kernel socket buffer

    def _dial(self, src: Addr, dst: Addr) -> trio.abc.Stream:
        ep = self._reachable(src, dst)
        if ep is None or ep.stream_handler is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{dst} unreachable")
        from trio.testing import memory_stream_pair  # test-only: keep pytest out of meshd

        client, server = memory_stream_pair()
        self._nursery.start_soon(ep.stream_handler, server, src)
        return client


class MemoryTransport:
    """One endpoint of a :class:`MemoryNetwork`: a packet transport and a dialer."""

    def __init__(self, net: MemoryNetwork, addr: Addr) -> None:
        self._net = net
        self.addr = addr
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[Addr, bytes]](256)
        self.stream_handler: Callable[[trio.abc.Stream, Addr], Awaitable[None]] | None = None

    async def send_packet(self, to: Addr, data: bytes) -> None:
        self._net._deliver(self.addr, to, data)
        await trio.lowlevel.checkpoint()

    async def recv_packet(self) -> tuple[Addr, bytes]:
        return await self._inbox.receive()

    async def open_stream(self, to: Addr) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return self._net._dial(self.addr, to)


# --- the adapter -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdapterStatistics:
    """What the adapter itself counted (the core counts protocol events)."""

    datagrams_rejected: int
    """Datagrams that failed to open (authentication) or to decode."""
    streams_rejected: int
    """Push-pull streams dropped as malformed, oversized or truncated."""
    bytes_in: int
    """Wire bytes received (after sealing)."""
    bytes_out: int
    """Wire bytes sent (after sealing)."""
    packets_in: int
    packets_out: int
    send_queue_drops: int
    """Datagrams dropped because the send queue was full."""


class GossipAdapter:
    """Runs one membership core over a packet transport and a stream dialer.

    Args:
        core: the protocol state machine (this adapter is its only caller).
        packets: best-effort datagrams.
        dialer: reliable streams, for push-pull.
        codec: datagram protection (sealing); plain by default.
        send_queue: datagrams waiting to be sent before new ones are dropped.
    """

    def __init__(
        self,
        core: Membership,
        packets: PacketTransport,
        dialer: StreamDialer,
        codec: PacketCodec | None = None,
        *,
        send_queue: int = 1024,
    ) -> None:
        self._core = core
        self._packets = packets
        self._dialer = dialer
        self._codec = codec or PlainCodec()
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[Addr, bytes]](send_queue)
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._subscribers: list[trio.MemorySendChannel[MembershipEvent]] = []
        self._join_waiters: list[trio.MemorySendChannel[JoinFinished]] = []
        self._rejected = self._streams_rejected = self._bytes_in = self._bytes_out = 0
        self._packets_in = self._packets_out = self._queue_drops = 0
        self._timeout_s = core.config.stream_timeout_s
        self._max_stream = core.config.max_stream_bytes

    @property
    def core(self) -> Membership:
        """The core (read its members and statistics; never feed it directly)."""
        return self._core

    def statistics(self) -> AdapterStatistics:
        """I/O counters of this adapter."""
        return AdapterStatistics(self._rejected, self._streams_rejected, self._bytes_in,
                                 self._bytes_out,
                                 self._packets_in, self._packets_out, self._queue_drops)

    def subscribe(self, max_buffer: int = 1024) -> trio.MemoryReceiveChannel[MembershipEvent]:
        """A channel of membership changes. A subscriber that falls ``max_buffer``
        events behind is closed (it should resubscribe and re-read members())."""
        send, recv = trio.open_memory_channel[MembershipEvent](max_buffer)
        self._subscribers.append(send)
        return recv

    # --- running ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: receive, time out, send."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._send_loop)
            nursery.start_soon(self._recv_loop)
            nursery.start_soon(self._timer_loop)
            self._flush()
            task_status.started()

    async def join(self, seeds: Sequence[Addr]) -> JoinFinished:
        """Push-pull with every seed; returns which answered. :meth:`run` must be running."""
        send, recv = trio.open_memory_channel[JoinFinished](1)
        self._join_waiters.append(send)
        self._core.join(seeds, trio.current_time())
        self._flush()
        async with recv:
            return await recv.receive()

    async def leave(self) -> None:
        """Announce departure and keep gossiping for ``leave_propagate_s``."""
        self._core.leave(trio.current_time())
        self._flush()
        await trio.sleep(self._core.config.leave_propagate_s)

    def update_meta(self, meta: Meta) -> None:
        """Announce new metadata (spreads as a new incarnation)."""
        self._core.update_meta(meta, trio.current_time())
        self._flush()

    def handle_stream_connection(self, stream: trio.abc.Stream, peer: Addr) -> None:
        """Serve one inbound push-pull stream (called by the TCP/TLS listener)."""
        assert self._nursery is not None, "run() first"
        self._nursery.start_soon(self.serve_push_pull, stream, peer)

    async def serve_push_pull(self, stream: trio.abc.Stream, peer: Addr) -> None:
        """Answer one push-pull request on ``stream`` and close it."""
        async with stream:
            try:
                with trio.fail_after(self._timeout_s):
                    request = await read_frame(stream, self._max_stream)
                    reply = self._core.handle_stream(peer, request, trio.current_time())
                    self._flush()
                    await stream.send_all(wire.frame(reply, self._max_stream))
            except RemoteProtocolError as exc:
                self._streams_rejected += 1
                LOGGER.debug("push_pull_rejected node=%s peer=%s reason=%s",
                             self._core.me, peer, exc)
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                LOGGER.debug("push_pull_serve_failed node=%s peer=%s reason=%r",
                             self._core.me, peer, exc)

    async def _push_pull(self, request_id: int, to: Addr, data: bytes) -> None:
        error: str | None = None
        reply = b""
        try:
            with trio.fail_after(self._timeout_s):
                stream = await self._dialer.open_stream(to)
                async with stream:
                    await stream.send_all(wire.frame(data, self._max_stream))
                    reply = await read_frame(stream, self._max_stream)
        except trio.TooSlowError:
            error = f"no answer within {self._timeout_s:g}s"
        except RemoteProtocolError as exc:
            error = f"bad answer: {exc}"
        except (OSError, trio.BrokenResourceError) as exc:
            error = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        now = trio.current_time()
        if error is not None:
            LOGGER.debug("push_pull_failed node=%s peer=%s reason=%s", self._core.me, to, error)
            self._core.handle_stream_failed(request_id, error, now)
        else:
            try:
                self._core.handle_stream_reply(request_id, reply, now)
            except RemoteProtocolError as exc:
                LOGGER.debug("push_pull_bad_reply node=%s peer=%s reason=%s",
                             self._core.me, to, exc)
        self._flush()

    async def _recv_loop(self) -> None:
        while True:
            src, data = await self._packets.recv_packet()
            self._packets_in += 1
            self._bytes_in += len(data)
            try:
                self._core.handle_packet(src, self._codec.open(data), trio.current_time())
            except RemoteProtocolError as exc:
                self._rejected += 1
                LOGGER.debug("datagram_dropped node=%s peer=%s reason=%s",
                             self._core.me, src, exc)
            self._flush()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self._core.next_deadline()
            self._wake = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wake.wait()
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                self._core.handle_timeout(now)
                self._flush()

    async def _send_loop(self) -> None:
        async for to, data in self._out_recv:
            try:
                await self._packets.send_packet(to, data)
            except OSError as exc:
                LOGGER.debug("send_failed node=%s peer=%s reason=%s", self._core.me, to, exc)
                self._core.handle_send_failed(to, str(exc), trio.current_time())
                continue
            self._packets_out += 1
            self._bytes_out += len(data)

    # --- outputs ----------------------------------------------------------------

    def _flush(self) -> None:
        """Perform the core's outputs. Synchronous, so that no other task can feed
        the core between a call and the handling of what it produced."""
        for out in self._core.poll_outputs():
            self._perform(out)
        self._wake.set()

    def _perform(self, out: GossipOutput) -> None:
        match out:
            case Send():
                try:
                    self._out_send.send_nowait((out.to, self._codec.seal(out.data)))
                except trio.WouldBlock:
                    self._queue_drops += 1
                    self._core.handle_send_failed(out.to, "send queue full",
                                                  trio.current_time())
            case StreamSend():
                assert self._nursery is not None
                self._nursery.start_soon(self._push_pull, out.request_id, out.to, out.data)
            case MemberChanged():
                self._log_change(out)
                self._publish(out)
            case MemberReaped():
                LOGGER.info("member_reaped node=%s peer=%s", self._core.me, out.node)
                self._publish(out)
            case HealthChanged():
                level = logging.WARNING if out.score > 0 else logging.INFO
                LOGGER.log(level, "local_health node=%s score=%d", self._core.me, out.score)
            case JoinFinished():
                for waiter in self._join_waiters:
                    waiter.send_nowait(out)
                self._join_waiters.clear()

    def _publish(self, event: MembershipEvent) -> None:
        for sub in list(self._subscribers):
            try:
                sub.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                LOGGER.warning("subscriber_dropped node=%s reason=fell_behind_or_closed",
                               self._core.me)
                sub.close()
                self._subscribers.remove(sub)

    def _log_change(self, out: MemberChanged) -> None:
        m = out.member
        level = {Status.ALIVE: logging.INFO, Status.SUSPECT: logging.WARNING,
                 Status.DEAD: logging.WARNING, Status.LEFT: logging.INFO}[m.status]
        if out.previous is None:
            event = "member_joined"
        elif out.previous == m.status:
            event = "member_updated"
        else:
            event = f"member_{m.status.label}"
        LOGGER.log(level, "%s node=%s peer=%s addr=%s incarnation=%d", event, self._core.me,
                   m.node, m.addr, m.incarnation)
