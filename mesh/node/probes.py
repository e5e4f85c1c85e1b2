"""Run one health probe against a running workload: the I/O half of
:mod:`mesh.node.health`.

:func:`probe` runs one http, tcp or exec check, bounded by the check's
``timeout_s``, and reports what it saw as a :class:`ProbeResult`; the agent feeds
it to a :class:`~mesh.node.health.HealthTracker`. A probe never raises because the
target is broken, slow or gone: every such failure is a result with ``ok=False``
and a detail a person can read (``"GET /healthz -> 503"``, ``"connection refused on
127.0.0.2:31005"``, ``"GET / on 127.0.0.1:8080 timed out after 1s"``).

The http check is deliberately minimal: one ``GET`` with ``Connection: close``,
then only the status line is read (at most :data:`MAX_STATUS_LINE_BYTES`), as
Docker's ``curl -f`` checks and Kubernetes' ``httpGet`` probes decide on the status
alone. Redirects are not followed: a 3xx is a success, as in Kubernetes.
"""

from __future__ import annotations

import shlex
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from mesh.errors import DriverError
from mesh.types import Addr

if TYPE_CHECKING:
    from mesh.node.spec import HealthSpec

MAX_STATUS_LINE_BYTES: Final = 4096
"""How much of an http response is read looking for the status line."""

EXEC_OUTPUT_BYTES: Final = 200
"""How much of an exec check's output goes into the detail."""

_PATH_SAFE: Final = "/?&=%:@!$'()*+,;~-._"
"""Characters left as they are in the request target (RFC 3986 pchar, query and
existing escapes); anything else (non-ASCII letters, ``#``, quotes) is
percent-encoded, as a browser would send it."""

ExecFn = Callable[[Sequence[str], float], Awaitable[tuple[int, bytes]]]
"""How a driver runs an exec check inside a workload: ``(command, timeout_s)`` to
``(exit status, output)``; it raises :class:`~mesh.errors.DriverError` or
``OSError`` when it cannot run the command."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe."""

    ok: bool
    """Whether the check passed."""
    detail: str
    """What the probe saw, for people (``meshctl ps``, events)."""
    duration_s: float
    """How long the probe took, on ``trio.current_time()``'s clock."""


async def probe(
    check: HealthSpec,
    *,
    host: str,
    ports: Mapping[str, int],
    exec_fn: ExecFn | None,
) -> ProbeResult:
    """Run ``check`` once against a workload, within ``check.timeout_s``.

    Args:
        check: the health check.
        host: the address the workload's ports listen on (an IP literal, normally).
        ports: the workload's ports by name, in spec order; an http or tcp check
            with ``port=""`` uses the first one.
        exec_fn: runs an exec check's command inside the workload; ``None`` when
            the driver cannot (an exec check then fails, saying so).

    Returns:
        The result; ``ok=False`` for every failure of the target (refused, reset,
        timed out, bad status, non-zero exit, missing port).
    """
    started = trio.current_time()
    if check.kind == "exec":
        ok, detail = await _exec(check, exec_fn)
    else:  # http or tcp: HealthSpec admits no other kind
        ok, detail = await _connect(check, host, ports)
    return ProbeResult(ok=ok, detail=detail, duration_s=trio.current_time() - started)


async def _exec(check: HealthSpec, exec_fn: ExecFn | None) -> tuple[bool, str]:
    what = f"exec {shlex.join(check.command)}"
    if exec_fn is None:
        return False, (f"{what}: this driver cannot run commands inside the workload; "
                       "use an http or tcp check")
    with trio.move_on_after(check.timeout_s):
        try:
            status, output = await exec_fn(check.command, check.timeout_s)
        except (DriverError, OSError) as exc:
            return False, f"{what}: cannot run it: {exc}"
        text = " ".join(output[:EXEC_OUTPUT_BYTES].decode("utf-8", "replace").split())
        return status == 0, f"{what} -> status {status}" + (f": {text}" if text else "")
    return False, f"{what} timed out after {check.timeout_s:g}s"


def _port(name: str, ports: Mapping[str, int]) -> int | str:
    """The port to probe, or why there is none."""
    if not name:
        if not ports:
            return ("the workload has no port to probe; give the service a port "
                    "or use an exec check")
        return next(iter(ports.values()))
    if name not in ports:
        known = ", ".join(ports) or "none"
        return (f"no port named {name!r} to probe (the workload's ports: {known}); "
                "name one of them in the health check")
    return ports[name]


async def _connect(check: HealthSpec, host: str, ports: Mapping[str, int]) -> tuple[bool, str]:
    port = _port(check.port, ports)
    if isinstance(port, str):
        return False, port
    addr = Addr(host, port)
    what = f"GET {check.path}" if check.kind == "http" else "connect"
    with trio.move_on_after(check.timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return False, _connect_failure(exc, addr)
        async with stream:
            if check.kind == "tcp":
                return True, f"connected to {addr}"
            try:
                return await _http_status(stream, check.path, addr)
            except (OSError, trio.BrokenResourceError) as exc:
                return False, f"{what} on {addr}: the connection broke: {exc}"
    return False, f"{what} on {addr} timed out after {check.timeout_s:g}s"


def _connect_failure(exc: OSError, addr: Addr) -> str:
    """Say why a connection failed. ``trio.open_tcp_stream`` raises a summary
    ``OSError`` whose cause groups the failure of each address it tried."""
    cause = exc.__cause__
    tried = cause.exceptions if isinstance(cause, BaseExceptionGroup) else (exc,)
    first = next((e for e in tried if isinstance(e, OSError)), exc)
    if isinstance(first, ConnectionRefusedError):
        return f"connection refused on {addr}"
    return f"cannot connect to {addr}: {first.strerror or first}"


async def _http_status(stream: trio.SocketStream, path: str, addr: Addr) -> tuple[bool, str]:
    """Send one GET and read the status line: 2xx and 3xx pass."""
    what = f"GET {path}"
    target = urllib.parse.quote(path, safe=_PATH_SAFE)
    await stream.send_all(
        f"GET {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: meshd-health\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
    )
    head = bytearray()
    while b"\n" not in head:
        if len(head) >= MAX_STATUS_LINE_BYTES:
            return False, f"{what} -> no status line in the first {MAX_STATUS_LINE_BYTES} bytes"
        chunk = await stream.receive_some(MAX_STATUS_LINE_BYTES - len(head))
        if not chunk:
            return False, f"{what} -> the connection closed before a status line"
        head += chunk
    line = bytes(head).split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (
        len(parts[1]) == 3 and parts[1].isdigit()
    ):
        return False, f"{what} -> not an HTTP status line: {line[:80]!r}"
    status = int(parts[1])
    return 200 <= status < 400, f"{what} -> {status}"
