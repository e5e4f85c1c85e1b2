"""The trio adapter that serves DNS over UDP and TCP from a :class:`Responder`.

It owns every piece of I/O and no DNS decision: it reads messages, hands each to
the responder with the current catalogue snapshot, and sends what comes back; a
:class:`~mesh.dns.answer.Forward` is performed against the upstream. The daemon
swaps snapshots with :meth:`DnsServer.set_catalog` whenever membership or endpoints
change; a query is always answered from one whole snapshot.

UDP reads the socket directly in batches: the kernel socket is non-blocking, the task
waits with ``trio.lowlevel.wait_readable`` and then drains up to
:data:`UDP_BATCH` datagrams with plain ``recvfrom``/``sendto`` calls before yielding.
trio's socket wrapper costs two scheduler round trips per datagram, which would be
most of the time spent on a cached answer. Nothing here blocks: a send that would
block is counted and dropped, as a full network queue would drop it.

Resource handling:
    :meth:`DnsServer.serve` owns a nursery with the UDP loop, the TCP accept loop,
    one task per TCP connection (at most ``tcp_max_connections``) and one task per
    forwarded UDP query (at most ``max_forwards_in_flight``). Cancelling it stops
    them all. The sockets belong to :class:`DnsSockets`; whoever bound them closes
    them (``with sockets:``).

Error handling:
    Nothing a client sends can end the server. Malformed messages get FORMERR or no
    answer from the responder (counted there); socket errors are counted in
    :meth:`DnsServer.statistics` and logged at DEBUG; a failed or slow upstream gets
    the client a SERVFAIL. Should the responder ever raise (a bug), the message is
    dropped, counted as ``internal_errors`` and logged at ERROR with the traceback
    and the message, so that one poisonous packet cannot silence discovery for a
    whole node.
"""

from __future__ import annotations

import bisect
import errno
import logging
import random
import socket
from collections.abc import Sequence
from typing import Final

import trio

from mesh.dns.answer import Forward, Outcome, Responder
from mesh.dns.catalog import Catalog
from mesh.dns.config import DEFAULT_PORT, FALLBACK_PORT, DnsConfig
from mesh.dns.metrics import LATENCY_BUCKETS_S, DnsServerStatistics
from mesh.errors import StartupError
from mesh.types import Addr

LOGGER = logging.getLogger(__name__)

UDP_BATCH: Final = 64
"""Datagrams handled per wake-up before other tasks get a turn."""

MAX_UDP_MESSAGE_BYTES: Final = 65_535
"""Receive buffer per datagram; a DNS message over UDP is never longer."""

UDP_SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024
"""Kernel receive buffer asked for (capped by ``net.core.rmem_max``), so a burst of
queries waits in the kernel rather than being dropped."""


class DnsSockets:
    """The bound UDP socket and TCP listener of one server (same address and port).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, udp: socket.socket, tcp: trio.SocketListener, addr: Addr) -> None:
        self.udp = udp
        self.tcp = tcp
        self.addr = addr
        """Where the server listens, with the port actually bound."""

    def close(self) -> None:
        """Close both sockets (from the trio thread: waiters are told first)."""
        trio.lowlevel.notify_closing(self.udp)
        self.udp.close()
        self.tcp.socket.close()

    def __enter__(self) -> DnsSockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_bind_error(addr: Addr, exc: OSError) -> str:
    """One line a person can act on for a failed DNS bind."""
    if exc.errno == errno.EADDRINUSE:
        return (f"DNS port in use: {addr} is taken (another meshd, or a local resolver such "
                f"as systemd-resolved or dnsmasq): pass --dns-bind {addr.host}:PORT with a "
                "free port")
    if exc.errno == errno.EACCES:
        return (f"not allowed to bind DNS on {addr}: run meshd as root or with "
                "CAP_NET_BIND_SERVICE, or pass --dns-bind HOST:PORT with a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"DNS address {addr.host} is not on this host: pass --dns-bind with one of "
                "this host's addresses (one containers can reach)")
    return f"cannot bind DNS on {addr}: {exc.strerror or exc}; check --dns-bind"


async def _bind_pair(host: str, port: int) -> DnsSockets:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = trio.socket.socket(family, socket.SOCK_STREAM)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await tcp.bind((host, port))
        bound = tcp.getsockname()[1]
        udp.bind((host, bound))  # never blocks: bind on a fresh socket
        udp.setblocking(False)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_BYTES)
        except OSError:
            pass  # keep the kernel default; only burst absorption suffers
        tcp.listen(128)
    except BaseException:
        tcp.close()
        udp.close()
        raise
    return DnsSockets(udp, trio.SocketListener(tcp), Addr(host, bound))


async def bind_dns_sockets(
    config: DnsConfig, *, auto_ports: Sequence[int] = (DEFAULT_PORT, FALLBACK_PORT)
) -> DnsSockets:
    """Bind UDP and TCP on ``config.bind_host``, on ``config.bind_port`` or, when that
    is ``None``, on the first of ``auto_ports`` that can be bound (53, else 8600).

    Port 0 picks a free port, the same for UDP and TCP.

    Raises:
        StartupError: no port could be bound; the message says what to do.
    """
    host = config.bind_host
    ports = [config.bind_port] if config.bind_port is not None else list(auto_ports)
    failures: list[str] = []
    for i, port in enumerate(ports):
        attempts = 5 if port == 0 else 1  # port 0: UDP may find the TCP port taken
        for _ in range(attempts):
            try:
                sockets = await _bind_pair(host, port)
            except OSError as exc:
                last = exc
                continue
            if i > 0:
                LOGGER.info("dns_port_fallback bind=%s tried=%s", sockets.addr,
                            ",".join(failures))
            return sockets
        message = describe_bind_error(Addr(host, port), last)
        if config.bind_port is not None or last.errno not in (errno.EACCES, errno.EADDRINUSE):
            raise StartupError(message)
        failures.append(f"{port}: {last.strerror}")
    raise StartupError(f"DNS port in use or not allowed on {host} (tried "
                       f"{'; '.join(failures)}): pass --dns-bind {host}:PORT with a free port")


class _Framer:
    """Splits a TCP byte stream into DNS messages (2-byte length prefix, RFC 1035
    §4.2.2), sans I/O."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> bytes | None:
        if len(self._buf) < 2:
            return None
        length = (self._buf[0] << 8) | self._buf[1]
        if len(self._buf) < 2 + length:
            return None
        message = bytes(self._buf[2:2 + length])
        del self._buf[:2 + length]
        return message


def _is_truncated(data: bytes) -> bool:
    return len(data) >= 4 and bool(data[2] & 0x02)


class DnsServer:
    """Serves the cluster zone over UDP and TCP from the current catalogue snapshot.

    Args:
        config: zone, TTLs, sizes, limits and the upstream.
        catalog: the first snapshot (it can be empty).
        rng: shuffles answers (seed it for reproducible tests).
    """

    def __init__(self, config: DnsConfig, catalog: Catalog, rng: random.Random) -> None:
        self._config = config
        self._catalog = catalog
        self._responder = Responder(config, rng)
        self._forwards = 0
        self._tcp_active = 0
        self._udp_in = 0
        self._udp_out = 0
        self._tcp_connections = 0
        self._tcp_refused = 0
        self._tcp_queries = 0
        self._send_failures = 0
        self._receive_errors = 0
        self._internal_errors = 0
        self._forward_failures = 0
        self._latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum_s = 0.0

    @property
    def config(self) -> DnsConfig:
        """The configuration served."""
        return self._config

    @property
    def catalog(self) -> Catalog:
        """The snapshot answers come from now."""
        return self._catalog

    def set_catalog(self, catalog: Catalog) -> None:
        """Answer from ``catalog`` from the next message on. Non-blocking; the cached
        answers it changes are dropped now (see :meth:`Responder.set_catalog`), so
        pass every catalogue the builder makes, in order."""
        if catalog.generation != self._catalog.generation:
            LOGGER.debug("dns_catalog node=%s generation=%d nodes=%d endpoints=%d",
                         catalog.local_node, catalog.generation, len(catalog.nodes),
                         len(catalog.endpoints))
        self._catalog = catalog
        self._responder.set_catalog(catalog)

    def statistics(self) -> DnsServerStatistics:
        """I/O counters, the latency histogram and the responder's counters."""
        return DnsServerStatistics(
            answers=self._responder.statistics(),
            udp_in=self._udp_in,
            udp_out=self._udp_out,
            tcp_connections=self._tcp_connections,
            tcp_refused=self._tcp_refused,
            tcp_queries=self._tcp_queries,
            send_failures=self._send_failures,
            receive_errors=self._receive_errors,
            internal_errors=self._internal_errors,
            forward_failures=self._forward_failures,
            latency_buckets_s=LATENCY_BUCKETS_S,
            latency_counts=tuple(self._latency_counts),
            latency_sum_s=self._latency_sum_s,
        )

    # --- running --------------------------------------------------------------------

    async def serve(self, sockets: DnsSockets, *,
                    task_status: trio.TaskStatus[Addr] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve UDP and TCP on ``sockets`` until cancelled; reports the bound address
        through ``task_status`` once both are listening."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_udp, sockets.udp)
            nursery.start_soon(self._serve_tcp, sockets.tcp)
            LOGGER.info("dns_started node=%s addr=%s zone=%s upstream=%s",
                        self._catalog.local_node, sockets.addr, self._config.zone,
                        self._config.upstream or "none")
            task_status.started(sockets.addr)

    def _respond(self, message: bytes, tcp: bool) -> Outcome:
        try:
            return self._responder.respond(message, self._catalog, tcp=tcp)
        except Exception:  # a bug in the responder: keep serving, loudly (module doc)
            self._internal_errors += 1
            LOGGER.error("dns_internal_error node=%s message=%s", self._catalog.local_node,
                         message[:512].hex(), exc_info=True)
            return None

    def _observe(self, started: float) -> None:
        elapsed = trio.current_time() - started
        self._latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, elapsed)] += 1
        self._latency_sum_s += elapsed

    # --- UDP ------------------------------------------------------------------------

    async def _serve_udp(self, sock: socket.socket) -> None:
        async with trio.open_nursery() as forwards:
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(UDP_BATCH):
                    try:
                        data, src = sock.recvfrom(MAX_UDP_MESSAGE_BYTES)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # ICMP errors surface here; the socket is fine
                        self._receive_errors += 1
                        LOGGER.debug("dns_udp_receive_error reason=%s", exc)
                        continue
                    started = trio.current_time()
                    self._udp_in += 1
                    outcome = self._respond(data, tcp=False)
                    if outcome is None:
                        continue
                    if isinstance(outcome, Forward):
                        forwards.start_soon(self._forward_udp_client, sock, src, outcome,
                                            started)
                        continue
                    self._send_udp(sock, outcome, src)
                    self._observe(started)

    def _send_udp(self, sock: socket.socket, data: bytes, dst: tuple[str, int]) -> None:
        try:
            sock.sendto(data, dst)
        except OSError as exc:  # BlockingIOError included: a full queue drops, as UDP may
            self._send_failures += 1
            LOGGER.debug("dns_udp_send_failed to=%s reason=%s", dst, exc)
            return
        self._udp_out += 1

    async def _forward_udp_client(self, sock: socket.socket, src: tuple[str, int],
                                  forward: Forward, started: float) -> None:
        data = await self._forward(forward, tcp_client=False)
        self._send_udp(sock, data, src)
        self._observe(started)

    # --- forwarding -----------------------------------------------------------------

    async def _forward(self, forward: Forward, tcp_client: bool) -> bytes:
        """The upstream's answer to ``forward.query``, or ``forward.servfail``."""
        upstream = self._config.upstream
        assert upstream is not None  # the responder forwards only when one is set
        if self._forwards >= self._config.max_forwards_in_flight:
            self._forward_failures += 1
            return forward.servfail
        self._forwards += 1
        try:
            with trio.move_on_after(self._config.upstream_timeout_s):
                data = await _ask_udp(upstream, forward.query)
                if tcp_client and _is_truncated(data):
                    data = await _ask_tcp(upstream, forward.query)
                return data
            LOGGER.debug("dns_upstream_timeout upstream=%s", upstream)
        except (OSError, trio.BrokenResourceError) as exc:
            LOGGER.debug("dns_upstream_failed upstream=%s reason=%s", upstream, exc)
        finally:
            self._forwards -= 1
        self._forward_failures += 1
        return forward.servfail

    # --- TCP ------------------------------------------------------------------------

    async def _serve_tcp(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, do not die
                    LOGGER.warning("dns_accept_failed node=%s reason=%s",
                                   self._catalog.local_node, exc)
                    await trio.sleep(0.1)
                    continue
                if self._tcp_active >= self._config.tcp_max_connections:
                    self._tcp_refused += 1
                    stream.socket.close()
                    continue
                self._tcp_active += 1
                self._tcp_connections += 1
                nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        """Answer the queries of one connection in order until it is closed, idle for
        ``tcp_idle_timeout_s``, or has sent ``tcp_max_queries_per_connection``."""
        framer = _Framer()
        idle_s = self._config.tcp_idle_timeout_s
        try:
            async with stream:
                for _ in range(self._config.tcp_max_queries_per_connection):
                    message = framer.next_message()
                    if message is None:
                        # A whole message must arrive within the idle time, so a
                        # client trickling bytes cannot hold its slot for ever.
                        with trio.move_on_after(idle_s):
                            while message is None:
                                chunk = await stream.receive_some(MAX_UDP_MESSAGE_BYTES)
                                if not chunk:
                                    return  # the client closed its side
                                framer.receive_data(chunk)
                                message = framer.next_message()
                        if message is None:
                            return  # idle for too long
                    started = trio.current_time()
                    self._tcp_queries += 1
                    outcome = self._respond(message, tcp=True)
                    if outcome is None:
                        continue
                    if isinstance(outcome, Forward):
                        outcome = await self._forward(outcome, tcp_client=True)
                    with trio.move_on_after(idle_s) as scope:
                        await stream.send_all(len(outcome).to_bytes(2, "big") + outcome)
                    if scope.cancelled_caught:
                        self._send_failures += 1
                        return  # the client does not read: drop it
                    self._observe(started)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failures += 1
            LOGGER.debug("dns_tcp_connection_failed reason=%s", exc)
        finally:
            self._tcp_active -= 1


async def _ask_udp(upstream: Addr, query: bytes) -> bytes:
    """Send ``query`` to ``upstream`` from a fresh socket (a random source port) and
    return the first answer with the same id. Cancel to time out.

    Raises:
        OSError: the network refused the query (e.g. ICMP port unreachable).
    """
    family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect((upstream.host, upstream.port))
        await sock.send(query)
        while True:
            data = await sock.recv(MAX_UDP_MESSAGE_BYTES)
            if len(data) >= 12 and data[:2] == query[:2] and data[2] & 0x80:
                return data


async def _ask_tcp(upstream: Addr, query: bytes) -> bytes:
    """Send ``query`` to ``upstream`` over TCP and return its answer. Cancel to time out.

    Raises:
        OSError: the connection failed or closed before a whole answer arrived.
    """
    stream = await trio.open_tcp_stream(upstream.host, upstream.port)
    async with stream:
        await stream.send_all(len(query).to_bytes(2, "big") + query)
        framer = _Framer()
        while True:
            message = framer.next_message()
            if message is not None:
                return message
            chunk = await stream.receive_some(MAX_UDP_MESSAGE_BYTES)
            if not chunk:
                raise OSError(errno.ECONNRESET, "upstream closed the connection early")
            framer.receive_data(chunk)
