"""The local API (unix socket) and the Prometheus metrics endpoint (HTTP).

API framing: each connection carries one or more request frames; each gets one
response frame (:mod:`mesh.node.messages`), in request order. A client may pipeline:
requests that arrive together or while others are in progress are handled
concurrently (up to :data:`MAX_PIPELINED` per connection) and answers ready together
leave in one write; :class:`RpcLink` is such a client. The socket file is created owner-only
(0600): file permissions are the authentication for ``meshctl`` on the node.

Resource handling:
    :func:`serve_api` and :func:`serve_metrics` run until cancelled and close their
    listeners; each connection is handled in its own task (plus one per pipelined
    request and an answer writer) and closed afterwards; a connection idle for
    :data:`API_TIMEOUT_S` is closed once its requests in progress are answered.

Error handling:
    A malformed request gets an error response and the connection is closed; a
    handler raising :class:`ApiError` returns its message; any other exception in
    a handler is a bug and propagates (it crashes the daemon loudly).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import trio

from mesh import wire
from mesh.errors import (
    LocalProtocolError,
    MeshError,
    RemoteProtocolError,
    StartupError,
    StreamClosed,
)
from mesh.node.messages import (
    MAX_API_FRAME_BYTES,
    Request,
    Response,
    decode_call,
    encode_answer,
)
from mesh.streams import accept_direct, read_frame
from mesh.types import Addr

LOGGER = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class Pending(Protocol):
    """An answer under way without a task of its own (e.g. a write proposed to
    Raft, waiting to be applied): the connection waits for pending answers in
    request order, so many of them cost one wake-up and one write."""

    @property
    def done(self) -> bool:
        """Whether :meth:`outcome` may be called."""

    async def wait(self) -> None:
        """Return once :attr:`done`."""

    def outcome(self) -> Any:
        """The result (once :attr:`done`), or a :class:`SharedResult` that other
        calls answer with too.

        Raises:
            ApiError: the call failed (its message is the answer).
        """


class SharedResult:
    """A result many calls answer with, encoded once for all of them (the writes
    that shared a log entry share one Raft result, so their answers are the same
    bytes). Its ``value`` must not change once answered with."""

    __slots__ = ("value", "frame")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.frame: bytes | None = None
        """The answer's frame, once encoded."""


Starter = Callable[[dict[str, Any]], Pending | None]
"""Begins a call without awaiting (validation and the proposal happen at once);
returns ``None`` when the call needs its :data:`Handler` (e.g. it must be
forwarded to another node), and raises :class:`ApiError` for a bad call."""

API_TIMEOUT_S = 30.0
"""How long one API connection may stay idle."""


class ApiError(MeshError):
    """A request failed in a way the caller should be told about (bad params...)."""


async def bind_unix_socket(path: Path) -> socket.socket:
    """Bind the API socket at ``path``, owner-only; returns the listening socket
    (non-blocking) for :func:`serve_api`.

    A stale socket file (no daemon behind it) is replaced; a live one means another
    meshd uses this data dir.

    Raises:
        StartupError: another meshd answers there, or the path cannot be bound.
    """
    if await trio.Path(path).exists():
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(str(path))
        except OSError:
            await trio.Path(path).unlink()  # stale: left by a daemon that was killed
        else:
            raise StartupError(f"another meshd is running with data dir {path.parent} "
                               "(its API socket answers): stop it or use another --data-dir")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot create API socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


MAX_PIPELINED = 256
"""Requests one connection may have in progress before the server stops reading it."""


def _result_frame(encoder: wire.FrameEncoder, result: Any) -> bytes:
    """The frame of a successful answer, or of an error saying it is too large to
    send (a handler's answer bigger than the frame limit must not end the daemon)."""
    if type(result) is SharedResult:
        if result.frame is None:
            result.frame = _result_frame(encoder, result.value)
        return result.frame
    try:
        return encode_answer(encoder, True, result)
    except LocalProtocolError as exc:
        return encode_answer(encoder, False, error=f"the answer is too large to send ({exc}); "
                             "ask for less (e.g. a narrower prefix)")


class _Slot:
    """One request's place in a connection's answer order."""

    __slots__ = ("data", "last", "pending")

    def __init__(self, pending: Pending | None = None) -> None:
        self.data: bytes | None = None
        self.last = False
        """Close the connection once this answer is sent (a malformed request)."""
        self.pending = pending
        """The answer under way, when a :data:`Starter` began the call."""

    def fill_from_pending(self, encoder: wire.FrameEncoder) -> bool:
        """Take the pending answer if it is ready; whether :attr:`data` is set."""
        if self.data is None and self.pending is not None and self.pending.done:
            try:
                result = self.pending.outcome()
            except ApiError as exc:
                self.data = encode_answer(encoder, False, error=str(exc))
            else:
                self.data = _result_frame(encoder, result)
            self.pending = None
        return self.data is not None


class _ApiConnection:
    """One API connection: requests may be pipelined; answers go back in order.

    A request that arrives alone on an idle connection (the common
    one-at-a-time client) is answered inline. Requests that arrive together,
    or while others are in progress, are begun at once: a method with a
    :data:`Starter` (a Raft write) leaves a :class:`Pending` answer in its slot
    and costs no task; any other runs its handler in a task of its own. The
    writer sends the answers at the head of the line that are ready together
    in one ``send_all``.
    """

    def __init__(self, stream: trio.abc.Stream, handlers: Mapping[str, Handler],
                 starters: Mapping[str, Starter], node: str) -> None:
        self._stream = stream
        self._handlers = handlers
        self._starters = starters
        self._node = node
        self._encoder = wire.FrameEncoder(MAX_API_FRAME_BYTES)
        self._slots: collections.deque[_Slot] = collections.deque()
        self._progress = trio.Event()
        """Set when an answer is ready or the reader stopped (wakes the writer),
        or when answers were sent (wakes a reader waiting for room)."""
        self._reading = True
        self._broken = False
        self._idle_since: float | None = None
        """Since when no request has been in progress or arriving: set when the
        reader waits for one with none in progress, or when the writer sent the
        last answer (``None`` while requests are in progress)."""
        self._read_scope = trio.CancelScope()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_answers, nursery.cancel_scope)
            idle_timer = trio.CancelScope()
            nursery.start_soon(self._close_when_idle, idle_timer)
            try:
                with self._read_scope:
                    await self._read_requests(nursery)
            finally:
                idle_timer.cancel()
                self._reading = False
                self._wake()

    async def _close_when_idle(self, scope: trio.CancelScope) -> None:
        """Stop reading once the connection has been idle (see ``_idle_since``)
        for :data:`API_TIMEOUT_S` (one timer per connection instead of a deadline
        moved twice per request)."""
        with scope:
            while True:
                since = self._idle_since
                now = trio.current_time()
                if since is not None and now - since >= API_TIMEOUT_S:
                    self._read_scope.cancel()
                    return
                await trio.sleep_until((since if since is not None else now) + API_TIMEOUT_S)

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
        while not self._broken:
            try:
                payloads = decoder.next_payloads()
            except RemoteProtocolError as exc:  # oversized: the stream is unusable
                LOGGER.debug("api_bad_request node=%s reason=%s", self._node, exc)
                payloads = [b""]  # answered with an error below, then closed
            if not payloads:
                if not self._slots:
                    self._idle_since = trio.current_time()
                try:
                    chunk = await self._stream.receive_some(65_536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                self._idle_since = None  # the idle limit is for reading only
                if not chunk:
                    return  # the client closed
                decoder.receive_data(bytes(chunk))
                continue
            if len(payloads) == 1 and not self._slots:
                slot, call = self._begin(payloads[0])
                if call is not None:
                    slot.data = await self._call(*call)
                elif slot.pending is not None:
                    await slot.pending.wait()
                    slot.fill_from_pending(self._encoder)
                assert slot.data is not None
                try:
                    await self._stream.send_all(slot.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if slot.last:
                    return
                continue
            for payload in payloads:
                slot, call = self._begin(payload)
                self._slots.append(slot)
                if call is not None:
                    nursery.start_soon(self._fill, slot, *call)
                if slot.last:
                    break
            self._wake()
            if self._slots and self._slots[-1].last:
                return
            while len(self._slots) >= MAX_PIPELINED and not self._broken:
                await self._progress.wait()

    def _begin(self, payload: bytes
               ) -> tuple[_Slot, tuple[Handler, dict[str, Any]] | None]:
        """Start answering one request: a slot (answered already, or with a
        :class:`Pending` answer), and the handler call still to make, if any."""
        slot = _Slot()
        try:
            if not payload:
                raise RemoteProtocolError("request frame too large")
            method, params = decode_call(payload)
        except RemoteProtocolError as exc:
            LOGGER.debug("api_bad_request node=%s reason=%s", self._node, exc)
            slot.data, slot.last = encode_answer(self._encoder, False, error=str(exc)), True
            return slot, None
        starter = self._starters.get(method)
        if starter is not None:
            try:
                slot.pending = starter(params)
            except ApiError as exc:
                slot.data = encode_answer(self._encoder, False, error=str(exc))
                return slot, None
            if slot.pending is not None:
                return slot, None
        handler = self._handlers.get(method)
        if handler is None:
            slot.data = encode_answer(self._encoder, False, error=f"unknown method {method!r}: "
                                      "is meshctl newer than this meshd?")
            return slot, None
        return slot, (handler, params)

    async def _call(self, handler: Handler, params: dict[str, Any]) -> bytes:
        """The answer's frame."""
        try:
            result = await handler(params)
        except ApiError as exc:
            return encode_answer(self._encoder, False, error=str(exc))
        return _result_frame(self._encoder, result)

    async def _fill(self, slot: _Slot, handler: Handler, params: dict[str, Any]) -> None:
        slot.data = await self._call(handler, params)
        if slot is self._slots[0]:
            self._wake()

    async def _write_answers(self, connection: trio.CancelScope) -> None:
        slots = self._slots
        while self._reading or slots:
            if not slots:
                await self._progress.wait()
                continue
            head = slots[0]
            if not head.fill_from_pending(self._encoder):
                if head.pending is not None:
                    await head.pending.wait()
                else:
                    await self._progress.wait()
                continue
            batch: list[bytes] = []
            last = False
            while slots and not last and slots[0].fill_from_pending(self._encoder):
                slot = slots.popleft()
                assert slot.data is not None
                batch.append(slot.data)
                last = slot.last
            try:
                await self._stream.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                last = True
            if not slots:
                # Every request is answered: the connection is idle from now on
                # (the reader may be waiting for a request already).
                self._idle_since = trio.current_time()
            self._wake()
            if last:
                # Nothing more will be answered: stop reading and drop the rest.
                self._broken = True
                connection.cancel()
                return


async def serve_api_stream(stream: trio.abc.Stream, handlers: Mapping[str, Handler],
                           node: str, starters: Mapping[str, Starter] | None = None) -> None:
    """Answer API requests on one stream (unix socket or ``mesh-rpc/1`` TLS link)
    until the client closes it or stays idle for :data:`API_TIMEOUT_S`; closes it
    afterwards. Requests may be pipelined (up to :data:`MAX_PIPELINED` in
    progress); answers come back in request order. A method in ``starters`` is
    begun without a task (see :data:`Starter`); its handler is the fallback."""
    async with stream:
        await _ApiConnection(stream, handlers, starters or {}, node).run()


async def serve_api(listener: socket.socket, handlers: Mapping[str, Handler], node: str,
                    starters: Mapping[str, Starter] | None = None,
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve API requests on the listening unix ``listener`` (from
    :func:`bind_unix_socket`) until cancelled; closes it. Connections are
    :class:`~mesh.streams.DirectSocketStream`: a request answered at once costs
    no scheduler pass for its receive and its send."""
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await accept_direct(listener)
                nursery.start_soon(serve_api_stream, stream, handlers, node, starters)
    finally:
        trio.lowlevel.notify_closing(listener)
        listener.close()


async def call(socket_path: Path, method: str, params: dict[str, Any] | None = None,
               timeout_s: float = API_TIMEOUT_S) -> Any:
    """Call one API method on the daemon behind ``socket_path``.

    Raises:
        MeshError: the daemon is unreachable (message says what to check) or the
            call failed (the daemon's message).
    """
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_unix_socket(str(socket_path))
            async with stream:
                return await call_stream(stream, method, params)
    except FileNotFoundError:
        raise MeshError(f"no meshd API socket at {socket_path}: is meshd running? Pass "
                        "--socket DIR/meshd.sock or set MESH_SOCKET") from None
    except PermissionError:
        raise MeshError(f"permission denied on {socket_path}: run meshctl as the user that "
                        "runs meshd") from None
    except ConnectionRefusedError:
        raise MeshError(f"meshd is not running behind {socket_path} (stale socket)") from None
    except trio.TooSlowError:
        raise MeshError(f"meshd at {socket_path} did not answer within {timeout_s:g}s") from None
    except (StreamClosed, trio.BrokenResourceError):
        raise MeshError(f"meshd at {socket_path} closed the connection before answering: did "
                        "it stop? (see its log)") from None



async def call_stream(stream: trio.abc.Stream, method: str,
                      params: dict[str, Any] | None = None) -> Any:
    """Call one API method over an open stream (which stays open).

    Raises:
        MeshError: the call failed (the daemon's message) or the answer was garbage.
        StreamClosed: the daemon closed the stream before answering.
        trio.BrokenResourceError: the stream broke.
    """
    await stream.send_all(wire.frame(Request(method, params or {}).encode()))
    try:
        response = Response.decode(await read_frame(stream, MAX_API_FRAME_BYTES))
    except StreamClosed:
        raise
    except RemoteProtocolError as exc:
        raise MeshError(f"bad answer from meshd: {exc}") from None
    if not response.ok:
        raise MeshError(response.error)
    return response.result


class RpcCall:
    """One call of an :class:`RpcLink`, from the moment it is queued until its
    answer (or the link's failure, or its timeout) arrives."""

    __slots__ = ("event", "response", "error", "deadline")

    def __init__(self, deadline: float) -> None:
        self.event = trio.Event()
        self.response: Response | None = None
        self.error: str | None = None
        """Why no answer will come (the link broke, or the call timed out)."""
        self.deadline = deadline

    @property
    def done(self) -> bool:
        """Answered, or given up."""
        return self.event.is_set()

    async def wait(self) -> None:
        """Return once :attr:`done`."""
        await self.event.wait()

    def outcome(self) -> Any:
        """The server's result (once :attr:`done`).

        Raises:
            MeshError: the server answered with an error.
            trio.BrokenResourceError: no answer came (the link broke or the call
                timed out): the outcome is unknown; retry a write with the same
                request id.
        """
        assert self.event.is_set(), "the call is still in flight"
        if self.response is None:
            raise trio.BrokenResourceError(self.error or "the link closed")
        if not self.response.ok:
            raise MeshError(self.response.error)
        return self.response.result

    def _answer(self, response: Response) -> None:
        if not self.event.is_set():  # else it timed out: the late answer is dropped
            self.response = response
            self.event.set()

    def _give_up(self, reason: str) -> None:
        if not self.event.is_set():
            self.error = reason
            self.event.set()


class RpcLink:
    """The client end of one API stream that carries many calls at once.

    Calls are written in the order they are made (calls made while a write is
    in progress leave together in the next ``send_all``); the server answers in
    request order (:func:`serve_api_stream`), so answers are matched to calls
    in order. One link to the leader replaces a pool of links used one call at
    a time. A call is begun without waiting (:meth:`start_call`) or made and
    awaited (:meth:`call`).

    Args:
        stream: the connected stream (owned by the link from now on).
        call_timeout_s: a call not answered within this fails (its late answer
            is dropped when it comes; the link stays up).

    Resource handling:
        :meth:`run` owns the stream: start it in a nursery; it returns (and
        closes the stream) when the stream breaks, the server closes it, or
        :meth:`close` is called. Every call still waiting then fails.

    Error handling:
        :meth:`call` raises ``trio.BrokenResourceError`` when the link broke
        before its answer came or the call timed out (the outcome is unknown:
        retry a write with the same request id), and :class:`MeshError` with
        the server's message.
    """

    def __init__(self, stream: trio.abc.Stream, call_timeout_s: float = API_TIMEOUT_S) -> None:
        self._stream = stream
        self._call_timeout_s = call_timeout_s
        self._outbox: list[bytes] = []
        self._calls: collections.deque[RpcCall] = collections.deque()
        self._wake_writer = trio.Event()
        self._wake_timer = trio.Event()
        self._broken: str | None = None
        self._scope = trio.CancelScope()

    @property
    def broken(self) -> bool:
        """Whether the link is unusable (open a new one)."""
        return self._broken is not None

    @property
    def in_flight(self) -> int:
        """Calls written or queued and not yet answered (or timed out)."""
        return len(self._calls)

    def start_call(self, method: str, params: dict[str, Any] | None = None) -> RpcCall:
        """Queue a call and return it at once (see :meth:`RpcCall.outcome`).

        Raises:
            trio.BrokenResourceError: the link is broken.
        """
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        call = RpcCall(trio.current_time() + self._call_timeout_s)
        self._outbox.append(wire.frame(Request(method, params or {}).encode()))
        self._calls.append(call)
        self._wake_timer.set()
        self._wake_writer.set()
        return call

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``method`` and wait for its answer.

        Raises:
            MeshError: the server answered with an error.
            trio.BrokenResourceError: the link broke first, or the call timed out.
        """
        call = self.start_call(method, params)
        await call.wait()
        return call.outcome()

    def close(self) -> None:
        """Stop :meth:`run` (calls still waiting fail)."""
        self._break("the link was closed")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Write requests and read answers until the link breaks; closes the stream."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_requests)
                    nursery.start_soon(self._expire_calls)
                    task_status.started()
                    await self._read_answers()
        finally:
            self._break("the link closed")
            await trio.aclose_forcefully(self._stream)

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self._scope.cancel()
        calls, self._calls = self._calls, collections.deque()
        for call in calls:
            call._give_up(self._broken)

    async def _expire_calls(self) -> None:
        """Give up calls past their deadline (the calls are in deadline order;
        one that timed out keeps its place until its late answer comes)."""
        while True:
            waiting = next((c for c in self._calls if not c.done), None)
            if waiting is None:
                self._wake_timer = trio.Event()
                await self._wake_timer.wait()
                continue
            await trio.sleep_until(waiting.deadline)
            now = trio.current_time()
            for call in self._calls:
                if call.deadline > now:
                    break
                call._give_up(f"no answer within {self._call_timeout_s:g}s")

    async def _write_requests(self) -> None:
        while True:
            if not self._outbox:
                self._wake_writer = trio.Event()
                await self._wake_writer.wait()
                continue
            data = b"".join(self._outbox)
            self._outbox.clear()
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._break(f"writing to the link failed: {exc!r}")
                return

    async def _read_answers(self) -> None:
        decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
        while True:
            try:
                chunk = await self._stream.receive_some(65_536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._break(f"reading from the link failed: {exc!r}")
                return
            if not chunk:
                self._break("the server closed the link")
                return
            decoder.receive_data(bytes(chunk))
            try:
                while isinstance(payload := decoder.next_payload(), bytes):
                    response = Response.decode(payload)
                    if not self._calls:
                        raise RemoteProtocolError("an answer nobody asked for")
                    self._calls.popleft()._answer(response)
            except RemoteProtocolError as exc:
                self._break(f"bad answer on the link: {exc}")
                return


# --- metrics over HTTP -------------------------------------------------------------


async def bind_tcp(addr: Addr) -> trio.SocketListener:
    """Bind a TCP listener.

    Raises:
        StartupError: the address cannot be bound (message says what to do).
    """
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((addr.host, addr.port))
    except OSError as exc:
        sock.close()
        hint = "pick another with --metrics-bind IP:PORT" if exc.errno == errno.EADDRINUSE \
            else "check --metrics-bind"
        raise StartupError(f"cannot bind metrics endpoint {addr}: {exc.strerror}; {hint}") \
            from None
    sock.listen(16)
    return trio.SocketListener(sock)


async def _serve_http(stream: trio.abc.Stream, render: Callable[[], str]) -> None:
    async with stream:
        buf = b""
        with contextlib.suppress(trio.TooSlowError, trio.BrokenResourceError, OSError), \
                trio.fail_after(5):
            while b"\r\n\r\n" not in buf and len(buf) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
            request_line = buf.split(b"\r\n", 1)[0].split()
            if len(request_line) >= 2 and request_line[0] == b"GET" \
                    and request_line[1].split(b"?")[0] in (b"/metrics", b"/"):
                body = render().encode()
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: " + str(len(body)).encode()
                        + b"\r\nConnection: close\r\n\r\n")
            else:
                body = b"not found: try GET /metrics\n"
                head = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: " + str(len(body)).encode()
                        + b"\r\nConnection: close\r\n\r\n")
            await stream.send_all(head + body)


async def serve_metrics(listener: trio.SocketListener, render: Callable[[], str],
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                        ) -> None:
    """Serve ``GET /metrics`` with ``render()`` until cancelled."""
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            nursery.start_soon(_serve_http, stream, render)
