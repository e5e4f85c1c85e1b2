"""Start, watch and stop real ``meshd`` processes, for integration tests and benchmarks.

Each :class:`Daemon` is one ``python -m mesh.node.daemon start`` process on its own
loopback address with its own data dir; its stderr (the structured log) goes to a
file next to the data dir, appended across restarts. A :class:`Cluster` owns a set of
daemons and kills every process it started, by PID, when it closes (use it as a
context manager or close it in a fixture's teardown).

Nothing here sleeps to synchronise: :func:`wait_for` polls a condition (the local
API, a log file, a process's exit) until a deadline and fails with a message that
says what it was waiting for and what it saw last.

The local API is called with a small blocking client (:func:`api_call`) that
speaks the same framing and messages as ``meshctl``, so polling costs a unix
socket round trip instead of a Python start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from mesh import wire
from mesh.errors import MeshError, RemoteProtocolError
from mesh.node.messages import MAX_API_FRAME_BYTES, Request, Response

T = TypeVar("T")

GOSSIP_PORT = 17946
"""Every daemon binds this port on its own loopback address. Not meshd's default
7946: a meshd started anywhere on the machine with the default ``--bind
0.0.0.0:7946`` would own 7946 on every loopback address and break these runs."""

METRICS_PORT = 9946
"""meshd's default metrics port (on the bind address when that is loopback)."""

POLL_INTERVAL_S = 0.05
"""Pause between two evaluations of a polled condition."""

START_TIMEOUT_S = 20.0
"""How long a daemon may take to answer its API after being spawned (a loaded
2-core machine needs a few seconds to import trio and cryptography)."""

MAX_UNIX_PATH_CHARS = 107
"""``sun_path`` holds 108 bytes including the terminating NUL."""

_PR_SET_PDEATHSIG = 1


class DaemonError(AssertionError):
    """A daemon did not do what a test or bench expected (it exited, timed out...).

    An ``AssertionError`` so that pytest shows it as a test failure with its message.
    """


class ApiUnavailable(MeshError):
    """The daemon's API socket is missing, refuses connections or hung up."""


# --- polling -----------------------------------------------------------------------


def wait_for(
    check: Callable[[], T | None | Literal[False]],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = POLL_INTERVAL_S,
    describe: Callable[[], str] | None = None,
) -> T:
    """Evaluate ``check()`` until it returns something truthy, and return that.

    ``ApiUnavailable`` and ``OSError`` raised by ``check`` count as "not yet" (a
    daemon that is still starting); any other exception propagates.

    Raises:
        DaemonError: ``timeout_s`` passed; the message names ``what``, the last
            value or error seen, and ``describe()`` if given.
    """
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            result = check()
        except (ApiUnavailable, OSError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe is not None else ""
            raise DaemonError(f"timed out after {timeout_s:g}s waiting for {what}; "
                              f"last seen: {last!r:.2000}{extra}")
        time.sleep(interval_s)


# --- the local API, blocking ---------------------------------------------------------


def api_call(socket_path: Path, method: str, params: dict[str, Any] | None = None,
             timeout_s: float = 5.0) -> Any:
    """Call one method of a daemon's local API (what ``meshctl`` does), blocking.

    Raises:
        ApiUnavailable: nothing answers at ``socket_path``.
        MeshError: the daemon answered with an error.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(socket_path))
            sock.sendall(wire.frame(Request(method, params or {}).encode()))
            decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
            while True:
                payload = decoder.next_payload()
                if isinstance(payload, bytes):
                    break
                chunk = sock.recv(65_536)
                if not chunk:
                    raise ApiUnavailable(f"{socket_path}: connection closed mid-answer")
                decoder.receive_data(chunk)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                BrokenPipeError, TimeoutError) as exc:
            raise ApiUnavailable(f"{socket_path}: {exc}") from None
        except RemoteProtocolError as exc:
            raise MeshError(f"bad answer from {socket_path}: {exc}") from None
    response = Response.decode(payload)
    if not response.ok:
        raise MeshError(response.error)
    return response.result


# --- logs and metrics ---------------------------------------------------------------


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (\w+) (\S+)(.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One structured log line: ``<ts> <LEVEL> <event> key=value ...``.

    Attributes:
        ts: wall-clock time of the line, seconds since the epoch (ms resolution).
        level: ``INFO``, ``WARNING``...
        event: the event name (``member_dead``).
        fields: the ``key=value`` pairs.
    """

    ts: float
    level: str
    event: str
    fields: Mapping[str, str]


def parse_log_line(line: str) -> LogEvent | None:
    """Parse one daemon log line; ``None`` for anything else (tracebacks, errors)."""
    m = _LOG_LINE.match(line)
    if m is None:
        return None
    stamp = datetime.fromisoformat(m.group(1) + "+00:00")
    return LogEvent(stamp.timestamp(), m.group(2), m.group(3),
                    dict(_FIELD.findall(m.group(4))))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{labels}': value}`` (``name`` alone when unlabelled)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


def metric(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += value
            found = True
    if not found:
        raise KeyError(f"no sample of {name} with labels {labels}")
    return total


class LogFollower:
    """Reads the lines appended to a log file since the last :meth:`poll`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def skip_to_end(self) -> None:
        """Ignore everything written so far."""
        try:
            self._offset = self.path.stat().st_size
        except FileNotFoundError:
            self._offset = 0
        self._partial = b""

    def poll(self) -> list[LogEvent]:
        """Parsed complete lines written since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        events = (parse_log_line(line.decode(errors="replace")) for line in lines)
        return [e for e in events if e is not None]


# --- one daemon ---------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """If the test or bench process dies without cleaning up, take meshd with it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Daemon:
    """One meshd process (or none yet) with a fixed name, address and data dir.

    Attributes:
        name: the node's name (``--name``).
        ip: its loopback address; it binds ``ip:port``.
        data_dir: its data dir; the log file is ``<data_dir>.log``.
        port: the gossip port.
        profile: ``--gossip-profile``.
        labels: ``--label`` pairs for the next start.
        extra_args: more ``meshd start`` flags for the next start.
    """

    name: str
    ip: str
    data_dir: Path
    port: int = GOSSIP_PORT
    profile: str = "local"
    labels: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    token: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def addr(self) -> str:
        """``ip:port`` of its gossip port (what ``--join`` takes)."""
        return f"{self.ip}:{self.port}"

    @property
    def socket_path(self) -> Path:
        """The API socket."""
        return self.data_dir / "meshd.sock"

    @property
    def log_path(self) -> Path:
        """Its stderr, appended across restarts."""
        return self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def metrics_url(self) -> str:
        """The default metrics endpoint for a loopback bind address."""
        return f"http://{self.ip}:{METRICS_PORT}/metrics"

    @property
    def pid(self) -> int:
        """The PID of the running process."""
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def command(self, join: Sequence[str] = ()) -> list[str]:
        """The ``meshd start`` command line of the next start."""
        cmd = [sys.executable, "-m", "mesh.node.daemon", "start",
               "--data-dir", str(self.data_dir), "--bind", self.addr, "--name", self.name,
               "--gossip-profile", self.profile]
        if join:
            cmd += ["--join", ",".join(join)]
            if self.token and not self.joined():
                cmd += ["--token", self.token]
        for key, value in sorted(self.labels.items()):
            cmd += ["--label", f"{key}={value}"]
        return cmd + list(self.extra_args)

    def joined(self) -> bool:
        """True once the data dir holds credentials (no token needed any more)."""
        return (self.data_dir / "tls" / "node.crt").exists()

    def join_token(self) -> str | None:
        """The cluster's join token, read from this (first) node's data dir; ``None``
        if it has none (a meshd from before security, run for A/B benchmarks)."""
        try:
            return (self.data_dir / "join-token").read_text().strip()
        except FileNotFoundError:
            return None

    def spawn(self, join: Sequence[str] = ()) -> None:
        """Start the process (do not wait for it); see :meth:`wait_ready`."""
        assert not self.running(), f"{self.name} is already running (pid {self.pid})"
        if len(str(self.socket_path)) > MAX_UNIX_PATH_CHARS:
            raise DaemonError(f"API socket path {self.socket_path} is too long for a unix "
                              "socket: use a shorter base directory")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(join), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log, preexec_fn=_die_with_parent,
            )
        self.starts += 1

    def running(self) -> bool:
        """True while the process started last has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def check_running(self) -> None:
        """Raise :class:`DaemonError` with its log tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonError(f"meshd {self.name} exited with status {self.proc.returncode}"
                              f"\n{self.log_tail()}")

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the API answers ``info``; return that answer."""
        def ready() -> dict[str, Any] | None:
            self.check_running()
            return api_call(self.socket_path, "info")  # type: ignore[no-any-return]

        return wait_for(ready, timeout_s, f"meshd {self.name} to answer on its API socket",
                        describe=self.log_tail)

    def start(self, join: Sequence[str] = (), timeout_s: float = START_TIMEOUT_S) -> None:
        """Spawn and wait until the API answers."""
        self.spawn(join)
        self.wait_ready(timeout_s)

    def signal(self, signum: int) -> float:
        """Send ``signum`` to the process (by PID); return the wall-clock instant."""
        assert self.proc is not None
        at = time.time()
        os.kill(self.proc.pid, signum)
        return at

    def kill(self) -> float:
        """SIGKILL it and reap it; return the wall-clock instant of the kill."""
        at = self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait()
        return at

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit; return its status.

        Raises:
            DaemonError: it is still running after ``timeout_s``.
        """
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"meshd {self.name} still runs {timeout_s:g}s later"
                              f"\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Kill the process if it still runs (teardown); never raises."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def api(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call the local API."""
        return api_call(self.socket_path, method, params)

    def members(self) -> dict[str, dict[str, Any]]:
        """``meshctl members --json`` as ``{name: member}``."""
        return {m["name"]: m for m in self.api("members")}

    def info(self) -> dict[str, Any]:
        """``meshctl info --json``."""
        return self.api("info")  # type: ignore[no-any-return]

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        """``GET /metrics``."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, float]:
        """The parsed metrics page."""
        return parse_metrics(self.metrics_text())

    def log_text(self) -> str:
        """Everything it wrote to stderr, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self, event: str | None = None) -> list[LogEvent]:
        """Its parsed log lines, optionally only those of one event."""
        out = []
        for line in self.log_text().splitlines():
            ev = parse_log_line(line)
            if ev is not None and (event is None or ev.event == event):
                out.append(ev)
        return out

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of its log, for failure messages."""
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)


# --- a cluster ----------------------------------------------------------------------


class Cluster:
    """A set of daemons under one base directory; kills them all on :meth:`close`.

    Args:
        base_dir: data dirs and logs go here (keep it short: unix socket paths are
            limited to 107 characters).
        profile: default ``--gossip-profile`` of the daemons added.
    """

    def __init__(self, base_dir: Path, profile: str = "local") -> None:
        self.base_dir = base_dir
        self.profile = profile
        self.daemons: dict[str, Daemon] = {}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Daemon:
        return self.daemons[name]

    def __iter__(self) -> Iterator[Daemon]:
        return iter(self.daemons.values())

    def add(self, name: str, ip: str, *, labels: Mapping[str, str] | None = None,
            profile: str | None = None, extra_args: Sequence[str] = ()) -> Daemon:
        """Declare a daemon (not started)."""
        assert name not in self.daemons, name
        d = Daemon(name, ip, self.base_dir / name, profile=profile or self.profile,
                   labels=dict(labels or {}), extra_args=list(extra_args))
        self.daemons[name] = d
        return d

    def close(self) -> None:
        """SIGKILL and reap every process still running."""
        for d in self.daemons.values():
            d.stop()

    def running(self) -> list[Daemon]:
        """Daemons whose process runs."""
        return [d for d in self.daemons.values() if d.running()]

    def start(self, daemons: Iterable[Daemon] | None = None,
              timeout_s: float = START_TIMEOUT_S) -> None:
        """Start a new cluster: the first daemon creates it, the others join it.

        The joiners are spawned together and then waited for, so starting N nodes
        costs about two process start-ups, not N.
        """
        ds = list(daemons if daemons is not None else self.daemons.values())
        seed, rest = ds[0], ds[1:]
        seed.start(timeout_s=timeout_s)
        token = seed.join_token()
        if token is not None:
            for d in self.daemons.values():
                d.token = d.token or token
        for d in rest:
            d.spawn(join=[seed.addr])
        for d in rest:
            d.wait_ready(timeout_s)

    def views(self, observers: Iterable[Daemon] | None = None,
              ) -> dict[str, dict[str, dict[str, Any]]]:
        """``{observer: {member: member_json}}`` for every observer given (default:
        every running daemon)."""
        obs = list(observers) if observers is not None else self.running()
        return {d.name: d.members() for d in obs}

    def describe(self) -> str:
        """Each running daemon's view as ``name: peer=status/incarnation ...``."""
        lines = []
        for d in self.running():
            try:
                view = d.members()
            except (MeshError, OSError) as exc:
                lines.append(f"{d.name}: API error {exc}")
                continue
            lines.append(f"{d.name}: " + " ".join(
                f"{n}={m['status']}/{m['incarnation']}" for n, m in sorted(view.items())))
        return "\n".join(lines)

    def wait_until(self, check: Callable[[], T | None | Literal[False]], timeout_s: float,
                   what: str) -> T:
        """:func:`wait_for`, failing at once if any daemon expected up has exited."""
        expected_up = [d for d in self.daemons.values() if d.running()]

        def checked() -> T | None | Literal[False]:
            for d in expected_up:
                d.check_running()
            return check()

        return wait_for(checked, timeout_s, what, describe=self.describe)

    def wait_status(self, node: str, status: str, timeout_s: float,
                    observers: Iterable[Daemon] | None = None,
                    where: Callable[[dict[str, Any]], bool] | None = None,
                    ) -> dict[str, dict[str, Any]]:
        """Wait until every observer (default: every other running daemon) lists
        ``node`` with ``status`` (and ``where(member)`` if given); return
        ``{observer: member_json}``."""
        obs = [d for d in (observers if observers is not None else self.running())
               if d.name != node]

        def check() -> dict[str, dict[str, Any]] | None:
            seen = {}
            for d in obs:
                m = d.members().get(node)
                if m is None or m["status"] != status or (where and not where(m)):
                    return None
                seen[d.name] = m
            return seen

        names = ",".join(d.name for d in obs)
        return self.wait_until(check, timeout_s, f"{names} to see {node} {status}")

    def wait_formed(self, timeout_s: float, daemons: Iterable[Daemon] | None = None) -> None:
        """Wait until every daemon given (default: every running one) lists exactly
        those daemons, all alive."""
        ds = list(daemons if daemons is not None else self.running())
        want = {d.name for d in ds}

        def check() -> bool:
            for d in ds:
                alive = {n for n, m in d.members().items() if m["status"] == "alive"}
                if alive != want:
                    return False
            return True

        self.wait_until(check, timeout_s, f"{sorted(want)} to all see each other alive")


def meshctl(d: Daemon, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``meshctl --socket <d's socket> ARGS`` (without the caller's ``MESH_*``
    environment) and return what it did."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run([sys.executable, "-m", "mesh.node.cli", "--socket",
                           str(d.socket_path), *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False, env=env)


def loopback_ips(first: int, count: int) -> list[str]:
    """``127.0.0.<first>`` ... ``127.0.0.<first+count-1>``."""
    assert first > 1, first
    assert first + count - 1 < 255, (first, count)
    return [f"127.0.0.{i}" for i in range(first, first + count)]
