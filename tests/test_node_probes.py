"""One health probe against real loopback servers and a fake exec (mesh/node/probes.py).

Probes that must time out run on the ``autojump_clock``: the target never answers,
so every task is blocked and the clock jumps straight to the probe's deadline, with
or without the loopback connection having completed. Probes that must get an answer
run on the real clock, bounded by a generous ``timeout_s``; nothing asserts on
wall-clock durations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from mesh.errors import DriverError
from mesh.node.probes import EXEC_OUTPUT_BYTES, MAX_STATUS_LINE_BYTES, ProbeResult, probe
from mesh.node.spec import HealthSpec

HOST = "127.0.0.1"
GENEROUS_S = 30.0
"""Timeout of probes that must get an answer: only a broken machine reaches it."""

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """Serve ``handler`` on a free loopback port for the duration of the block."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def refusing() -> AsyncIterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it)
    but not listening."""
    with trio.socket.socket() as sock:
        await sock.bind((HOST, 0))
        yield int(sock.getsockname()[1])


async def read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk, "the probe closed before finishing its request"
        head += chunk
    return head


def responder(response: bytes, requests: list[bytes]) -> Handler:
    async def handle(stream: trio.SocketStream) -> None:
        requests.append(await read_head(stream))
        await stream.send_all(response)

    return handle


async def http(path: str, response: bytes) -> tuple[ProbeResult, list[bytes], int]:
    requests: list[bytes] = []
    async with serving(responder(response, requests)) as port:
        check = HealthSpec(kind="http", path=path, timeout_s=GENEROUS_S)
        result = await probe(check, host=HOST, ports={"http": port}, exec_fn=None)
    return result, requests, port


async def test_http_200_sends_a_well_formed_request() -> None:
    result, requests, port = await http("/healthz", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert result.ok
    assert result.detail == "GET /healthz -> 200"
    assert result.duration_s >= 0.0
    [request] = requests
    lines = request.decode("ascii").split("\r\n")
    assert lines[0] == "GET /healthz HTTP/1.1"
    assert f"Host: {HOST}:{port}" in lines
    assert "Connection: close" in lines


@pytest.mark.parametrize(
    ("response", "ok", "detail"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", True, "GET / -> 204"),
        (b"HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n", True, "GET / -> 302"),
        (b"HTTP/1.1 399 Whatever\r\n\r\n", True, "GET / -> 399"),
        (b"HTTP/1.1 404 Not Found\r\n\r\n", False, "GET / -> 404"),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False, "GET / -> 503"),
        (b"HTTP/1.1 200\n\n", True, "GET / -> 200"),
        (b"hello world\r\n", False, "GET / -> not an HTTP status line: b'hello world'"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", False, "GET / -> not an HTTP status line: b'HTTP/1.1 2000 OK'"),
        (b"", False, "GET / -> the connection closed before a status line"),
        (b"HTTP/1.1 20", False, "GET / -> the connection closed before a status line"),
    ],
)
async def test_http_status(response: bytes, ok: bool, detail: str) -> None:
    result, _, _ = await http("/", response)
    assert (result.ok, result.detail) == (ok, detail)


async def test_http_reads_a_bounded_status_line() -> None:
    async def endless_line(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"x" * (MAX_STATUS_LINE_BYTES + 1000))
        await trio.sleep_forever()

    async with serving(endless_line) as port:
        check = HealthSpec(kind="http", timeout_s=GENEROUS_S)
        result = await probe(check, host=HOST, ports={"http": port}, exec_fn=None)
    assert not result.ok
    assert result.detail == "GET / -> no status line in the first 4096 bytes"


async def test_http_path_is_escaped_into_the_request_target() -> None:
    result, requests, _ = await http("/café/\"x\"?q=ü#top", b"HTTP/1.1 200 OK\r\n\r\n")
    assert result.detail == "GET /café/\"x\"?q=ü#top -> 200"
    assert requests[0].split(b"\r\n")[0] == b"GET /caf%C3%A9/%22x%22?q=%C3%BC%23top HTTP/1.1"


async def test_http_slow_answer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async def slow(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep(5.0)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n")

    async with serving(slow) as port:
        check = HealthSpec(kind="http", timeout_s=1.0)
        result = await probe(check, host=HOST, ports={"http": port}, exec_fn=None)
    assert not result.ok
    assert result.detail == f"GET / on {HOST}:{port} timed out after 1s"
    assert result.duration_s == pytest.approx(1.0)


@pytest.mark.parametrize(("kind", "what"), [("http", "GET /"), ("tcp", "connect")])
async def test_listener_that_never_answers_times_out(
    autojump_clock: trio.testing.MockClock, kind: str, what: str
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with serving(silent) as port:
        check = HealthSpec(kind=kind, timeout_s=2.5)
        result = await probe(check, host=HOST, ports={"http": port}, exec_fn=None)
    if kind == "tcp":  # the connection opened: that is all a tcp check asks
        assert (result.ok, result.detail) == (True, f"connected to {HOST}:{port}")
    else:
        assert not result.ok
        assert result.detail == f"{what} on {HOST}:{port} timed out after 2.5s"
        assert result.duration_s == pytest.approx(2.5)


@pytest.mark.parametrize("kind", ["http", "tcp"])
async def test_closed_port_is_refused(kind: str) -> None:
    async with refusing() as port:
        check = HealthSpec(kind=kind, timeout_s=GENEROUS_S)
        result = await probe(check, host=HOST, ports={"http": port}, exec_fn=None)
    assert not result.ok
    assert result.detail == f"connection refused on {HOST}:{port}"


async def test_tcp_connects() -> None:
    async def accept(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with serving(accept) as port:
        check = HealthSpec(kind="tcp", timeout_s=GENEROUS_S)
        result = await probe(check, host=HOST, ports={"http": port}, exec_fn=None)
    assert (result.ok, result.detail) == (True, f"connected to {HOST}:{port}")


async def test_port_by_name_and_first_port_by_default() -> None:
    async def accept(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with serving(accept) as live, refusing() as dead:
        ports = {"admin": dead, "web": live}
        named = await probe(HealthSpec(kind="tcp", port="web", timeout_s=GENEROUS_S),
                            host=HOST, ports=ports, exec_fn=None)
        first = await probe(HealthSpec(kind="tcp", timeout_s=GENEROUS_S),
                            host=HOST, ports=ports, exec_fn=None)
    assert (named.ok, named.detail) == (True, f"connected to {HOST}:{live}")
    assert (first.ok, first.detail) == (False, f"connection refused on {HOST}:{dead}")


@pytest.mark.parametrize(
    ("port", "ports", "detail"),
    [
        ("metrics", {"web": 1, "admin": 2},
         "no port named 'metrics' to probe (the workload's ports: web, admin); "
         "name one of them in the health check"),
        ("metrics", {},
         "no port named 'metrics' to probe (the workload's ports: none); "
         "name one of them in the health check"),
        ("", {},
         "the workload has no port to probe; give the service a port or use an exec check"),
    ],
)
async def test_missing_port_fails_clearly(
    autojump_clock: trio.testing.MockClock, port: str, ports: dict[str, int], detail: str
) -> None:
    result = await probe(HealthSpec(kind="http", port=port), host=HOST, ports=ports, exec_fn=None)
    assert (result.ok, result.detail, result.duration_s) == (False, detail, 0.0)


# --- exec ---------------------------------------------------------------------------

def fake_exec(status: int, output: bytes, calls: list[tuple[tuple[str, ...], float]]) -> Callable[
    [Sequence[str], float], Awaitable[tuple[int, bytes]]
]:
    async def run(command: Sequence[str], timeout_s: float) -> tuple[int, bytes]:
        calls.append((tuple(command), timeout_s))
        await trio.lowlevel.checkpoint()
        return status, output

    return run


async def test_exec_passes_on_status_zero() -> None:
    calls: list[tuple[tuple[str, ...], float]] = []
    check = HealthSpec(kind="exec", command=("pg_isready", "-h", "db 1"), timeout_s=3.0)
    result = await probe(check, host=HOST, ports={}, exec_fn=fake_exec(0, b"accepting\n", calls))
    assert calls == [(("pg_isready", "-h", "db 1"), 3.0)]
    assert (result.ok, result.detail) == (True, "exec pg_isready -h 'db 1' -> status 0: accepting")


async def test_exec_failure_shows_status_and_bounded_output() -> None:
    output = b"line one\n" + b"e" * 500
    check = HealthSpec(kind="exec", command=("check",))
    result = await probe(check, host=HOST, ports={}, exec_fn=fake_exec(2, output, []))
    assert not result.ok
    shown = "line one " + "e" * (EXEC_OUTPUT_BYTES - len(b"line one\n"))
    assert result.detail == f"exec check -> status 2: {shown}"


async def test_exec_without_output() -> None:
    check = HealthSpec(kind="exec", command=("false",))
    result = await probe(check, host=HOST, ports={}, exec_fn=fake_exec(1, b"", []))
    assert (result.ok, result.detail) == (False, "exec false -> status 1")


@pytest.mark.parametrize("error", [DriverError("container abc is gone"), OSError(2, "No such file")])
async def test_exec_that_cannot_run_fails(error: Exception) -> None:
    async def broken(command: Sequence[str], timeout_s: float) -> tuple[int, bytes]:
        await trio.lowlevel.checkpoint()
        raise error

    result = await probe(HealthSpec(kind="exec", command=("true",)), host=HOST, ports={},
                         exec_fn=broken)
    assert not result.ok
    assert result.detail == f"exec true: cannot run it: {error}"


async def test_exec_is_bounded_by_the_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def hangs(command: Sequence[str], timeout_s: float) -> tuple[int, bytes]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    check = HealthSpec(kind="exec", command=("sleep", "9"), timeout_s=1.0)
    start = trio.current_time()
    result = await probe(check, host=HOST, ports={}, exec_fn=hangs)
    assert (result.ok, result.detail) == (False, "exec sleep 9 timed out after 1s")
    assert result.duration_s == 1.0
    assert trio.current_time() == start + 1.0


async def test_exec_without_a_driver_that_can_exec() -> None:
    result = await probe(HealthSpec(kind="exec", command=("true",)), host=HOST, ports={},
                         exec_fn=None)
    assert not result.ok
    assert result.detail == ("exec true: this driver cannot run commands inside the workload; "
                             "use an http or tcp check")
