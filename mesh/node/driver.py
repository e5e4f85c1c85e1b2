"""Workload drivers: run, stop, adopt and inspect one node's workloads.

A :class:`Driver` turns a :class:`RunSpec` (one allocation of a service) into a
running workload and reports every workload this node's meshd owns as
:class:`Workload` records. The agent decides *what* should run; a driver only does
it and tells the truth about what it sees. Two drivers exist:

* :class:`ProcessDriver` runs a command as a local process group. It is the embedded
  default where there is no Docker engine.
* :class:`DockerDriver` runs containers through the docker SDK.

:func:`open_driver` picks one (``auto`` prefers an engine that answers).

Theory of operation:
    Workloads outlive meshd. A restarted meshd must find what it started before
    (*adoption*) without restarting it, as Nomad and Swarm do. The docker driver
    labels every container (``mesh.managed=true``, ``mesh.node``, ``mesh.alloc``, ...)
    and lists by label. The process driver starts each command in a session of its own
    (``setsid``), so that it survives meshd, and writes ``<state_dir>/<alloc>/
    workload.json`` atomically before :meth:`Driver.start` returns: pid, the process
    start time (``/proc/<pid>/stat`` field 22, in clock ticks since boot) and
    everything :meth:`Driver.list` reports. A pid whose start time differs was reused
    by an unrelated process: that workload has exited. Only the parent can learn an
    exit status, so an adopted process that exits is reported with ``exit_code=None``.

    The process driver spawns with ``os.posix_spawn`` and waits on a pidfd rather
    than through ``trio.Process``: a ``subprocess.Popen`` that is dropped while its
    child runs warns (``ResourceWarning``), and leaving children running is the whole
    point of adoption.

Ports:
    With the process driver and docker host networking the workload binds host ports
    itself; it learns them from ``PORT`` (the first port) and ``MESH_PORT_<NAME>``
    (upper-cased, ``-`` becomes ``_``). A request with ``host_port == 0`` gets a port
    the kernel hands out (bind ``host:0``, read it, close). Between that close and the
    workload's own bind another program may take the port; the window is a few
    milliseconds and the workload then fails to bind and exits, which the agent sees
    and restarts. A static port already in use is refused before anything starts.

Resource limits (process driver):
    A workload's CPU and memory limits are enforced with Linux cgroups where the
    host offers them (:mod:`mesh.node.cgroups` says where the cgroups go and what is
    written into them). Each limited allocation gets a cgroup of each limited
    controller, ``.../meshd-<node>/<alloc>``, made before its process starts and
    recorded in ``workload.json`` (an adopted workload keeps it); an allocation
    without limits gets none. The process must be a member from its first
    instruction, or a child it forks at once would escape; ``posix_spawn`` cannot
    place a child, so:

    * cgroup v1 (each needed hierarchy is v1): a fresh thread moves itself into the
      allocation's cgroups (its TID into each ``tasks`` file; v1 moves single
      threads), calls ``posix_spawn`` (the child starts in its parent thread's
      cgroups), and moves itself back. A v1 memory charge follows the process's
      main thread, not the moving one, so meshd's own memory is never charged to
      the workload, and meshd's own threads never move.
    * cgroup v2: a thread cannot join a cgroup with the memory controller (memory
      is not a "threaded" controller), and Python has no ``clone3`` with
      ``CLONE_INTO_CGROUP``. The driver spawns a small Python program
      (``sys.executable -I -S``) that writes its own pid into each cgroup's
      ``cgroup.procs``, restores the default ``SIGPIPE`` and ``SIGXFSZ``, and
      replaces itself with the workload (``execv`` keeps the pid, session and start
      time). It costs one interpreter start (some 25 ms). If it cannot join, nothing
      runs: it exits 125 and says why in the log; an exec failure exits 126 or 127.

    A controller that is missing, read-only or refused (not root, no delegation,
    v2's "no internal processes" rule) leaves that limit unenforced, with a
    ``process_limits_not_enforced`` warning naming the path and the error; the
    workload starts all the same; so does a leftover cgroup of the same name that
    holds processes meshd did not start for this run (they are not killed). A limit
    that no kernel could enforce (negative, memory below 6 MiB) is a
    :class:`~mesh.errors.DriverError`. When the main
    process exits, every process left in its cgroups is killed, as its process
    group is. A main process the kernel killed for exceeding its memory limit exits
    with ``killed: out of memory (limit 64 MiB)``. :meth:`ProcessDriver.remove`
    removes the cgroups (and ``meshd-<node>`` once it is empty).

Logs (process driver):
    stdout and stderr are appended to ``<alloc>/output.log``. The serve loop rotates
    it once it exceeds ``log_max_bytes`` (default :data:`LOG_MAX_BYTES`) by
    copy-and-truncate: the newest ``log_max_bytes`` are copied to ``output.log.1``
    and ``output.log`` is truncated (the child appends with ``O_APPEND``, so it goes
    on writing at the new end). Lines written between the copy and the truncation
    are lost; a log therefore holds at most about ``2 * log_max_bytes``.
    :meth:`ProcessDriver.remove` deletes the state file and keeps the logs; of the
    directories whose workload was removed, the newest ``retained_log_dirs``
    (default :data:`RETAINED_LOG_DIRS`, by modification time) are kept and older ones
    deleted, at every removal and when :meth:`ProcessDriver.serve` starts
    (:func:`prune_log_dirs`).

Logs (docker driver):
    ``docker logs`` reads a container's output from the engine, which deletes it with
    the container. So that :meth:`DockerDriver.logs` still answers after
    :meth:`DockerDriver.remove`, as the process driver's does, the driver reads the
    newest ``retained_log_max_bytes`` (default :data:`DOCKER_RETAINED_LOG_MAX_BYTES`)
    of a container's stdout and stderr (interleaved, as ``docker logs`` gives them)
    before it removes a container that ran (``remove``, or ``start`` replacing an
    exited container of the same alloc), and once the container is gone appends them
    to ``<state_dir>/<alloc>/output.log`` (:func:`save_output`), keeping the newest
    ``retained_log_max_bytes`` of all the alloc's earlier containers. The directories
    are pruned as the process driver's are, and it is the same layout, so either driver
    reads the other's. ``logs`` falls back to that file when the alloc has no
    container. Saving is best effort: an output that cannot be read (an engine error,
    a logging driver that cannot be read back) or written (full disk) is logged as
    ``output_unsaved`` and the container is removed all the same.

Resource handling:
    :meth:`Driver.serve` owns the background tasks (reaping children, rotating logs,
    the docker event pump) and must run, started with ``nursery.start``, while the
    driver is used. Cancelling it leaves workloads running. A :class:`DockerDriver`
    made by :func:`open_driver` owns its client and closes it when ``serve`` ends.

Error handling:
    Everything a person can fix (unknown command, missing image, a port in use, no
    engine) raises :class:`~mesh.errors.DriverError` with a message that says what to
    do. A health check that fails or times out is a result, not an exception. A
    corrupt or foreign state file is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any, Final, Protocol

import docker
import docker.errors
import docker.utils.socket
import requests.exceptions
import trio
import urllib3.exceptions

from mesh.errors import DriverError
from mesh.node.cgroups import (
    CONTROLLERS,
    CPU,
    MEMORY,
    OOM_COUNTER_FILE,
    AllocCgroup,
    Hierarchy,
    Unavailable,
    check_limits,
    format_bytes,
    limit_writes,
    locate,
    oom_exit_message,
    oom_kills,
    parse_alloc_cgroups,
    parse_mountinfo,
    parse_proc_cgroup,
    v2_base,
)
from mesh.types import AllocId, NodeId, ServiceId

LOGGER = logging.getLogger(__name__)

LOG_MAX_BYTES: Final = 16 * 1024 * 1024
"""Size at which a process workload's ``output.log`` is rotated (16 MiB)."""

RETAINED_LOG_DIRS: Final = 64
"""Log directories of removed workloads kept, newest first (both drivers)."""

EXEC_OUTPUT_MAX_BYTES: Final = 64 * 1024
"""Output of one exec (health check) kept; the rest is read and dropped."""

POLL_INTERVAL_S: Final = 1.0
"""How often the process driver checks adopted processes and log sizes."""

PROC_POLL_S: Final = 0.05
"""How often ``stop`` looks at ``/proc`` while waiting for an adopted process."""

KILL_WAIT_S: Final = 5.0
"""How long ``stop`` waits for a process group to die after ``SIGKILL``."""

LOG_FOLLOW_POLL_S: Final = 0.2
"""How often ``logs(follow=True)`` looks for new output of a process workload."""

DOCKER_PING_TIMEOUT_S: Final = 2.0
"""How long ``open_driver`` waits for a Docker engine to answer a ping."""

DOCKER_API_TIMEOUT_S: Final = 60.0
"""HTTP timeout of one docker API call (``stop`` adds its grace period to it)."""

DOCKER_THREADS: Final = 4
"""Docker API calls in flight at once (the shared :class:`trio.CapacityLimiter`)."""

DOCKER_STREAM_THREADS: Final = 16
"""Long-lived docker streams at once: the event pump, followed logs and execs."""

DOCKER_EVENT_BUFFER: Final = 64
"""Docker events buffered between the pump thread and the trio side."""

DOCKER_EVENT_RETRY_MAX_S: Final = 30.0
"""Longest wait before reconnecting a broken docker event stream."""

DOCKER_RETAINED_LOG_MAX_BYTES: Final = 1024 * 1024
"""Output of removed containers kept per allocation (1 MiB): the newest bytes of
``<state_dir>/<alloc>/output.log``, whose first line may be cut."""

STATE_FORMAT: Final = 1
"""Version of ``workload.json``; files of another version are skipped."""

STATE_FILE: Final = "workload.json"
OUTPUT_LOG: Final = "output.log"
BASE_ENV_KEYS: Final = ("PATH", "HOME", "LANG")
"""Variables of meshd's own environment that process workloads inherit."""

LABEL_PREFIX: Final = "mesh."
PROTOCOLS: Final = ("tcp", "udp")


@dataclass(frozen=True, slots=True)
class PortRequest:
    """One port a workload listens on.

    Attributes:
        name: a name unique within the workload (``http``), used in
            ``MESH_PORT_<NAME>`` and in DNS SRV records.
        container_port: the port inside the container (bridge networking only).
        host_port: the port on the node; 0 lets the driver pick a free one.
        protocol: ``tcp`` or ``udp``.
    """

    name: str
    container_port: int
    host_port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything a driver needs to start one allocation.

    Attributes:
        alloc: the allocation's id; at most one workload per alloc exists.
        service: the service it belongs to.
        version: the service spec version it runs.
        image: container image (docker driver; ignored by the process driver).
        command: the command (process driver: the argv; docker: overrides CMD).
        entrypoint: prepended to ``command`` (docker: overrides ENTRYPOINT).
        env: environment variables of the workload.
        ports: the ports it listens on.
        cpu_limit_millis: CPU limit in thousandths of a core; 0 means no limit.
        memory_limit_bytes: memory limit; 0 means no limit.
        labels: extra labels (docker container labels).
        stop_grace_s: the service's stop grace period.
    """

    alloc: AllocId
    service: ServiceId
    version: int
    image: str
    command: tuple[str, ...]
    entrypoint: tuple[str, ...]
    env: Mapping[str, str]
    ports: tuple[PortRequest, ...]
    cpu_limit_millis: int
    memory_limit_bytes: int
    labels: Mapping[str, str]
    stop_grace_s: float


@dataclass(frozen=True, slots=True)
class Workload:
    """What a driver sees of one workload.

    Attributes:
        alloc: the allocation it runs.
        service: its service.
        version: the spec version it runs.
        state: ``"running"`` or ``"exited"``.
        exit_code: the exit status (128 + N when killed by signal N); ``None`` while
            running, or when unknowable (an adopted process that exited).
        ports: port name -> host port actually used.
        started_at: wall-clock seconds (the injected ``wall_clock``) at start.
        finished_at: wall-clock seconds at which the driver saw it exit.
        ref: the pid (process) or container id (docker).
        message: a short explanation of the state, e.g. ``"exited with status 1"``.
    """

    alloc: AllocId
    service: ServiceId
    version: int
    state: str
    exit_code: int | None
    ports: Mapping[str, int]
    started_at: float
    finished_at: float | None
    ref: str
    message: str = ""


class Driver(Protocol):
    """Runs workloads on one node. See the module docstring for the contract."""

    name: str
    """``"process"`` or ``"docker"``."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Do the background work until cancelled; start with ``nursery.start``."""

    async def start(self, run: RunSpec) -> Workload:
        """Start ``run``; an exited workload of the same alloc is replaced.

        Raises:
            DriverError: it cannot start; the message says what to do.
        """

    async def stop(self, alloc: AllocId, grace_s: float) -> None:
        """Stop gracefully (SIGTERM), then SIGKILL after ``grace_s``. Idempotent."""

    async def remove(self, alloc: AllocId) -> None:
        """Forget an exited workload. Idempotent.

        Raises:
            DriverError: it is still running.
        """

    async def list(self) -> list[Workload]:
        """Every workload this node's meshd owns, running or exited and not removed."""

    async def wait_changed(self) -> None:
        """Return once some workload changed since the last call (maybe spuriously)."""

    def logs(self, alloc: AllocId, *, tail: int = 100,
             follow: bool = False) -> AsyncGenerator[bytes, None]:
        """The last ``tail`` lines of output, then (``follow``) new output until the
        workload ends. Use with ``contextlib.aclosing``."""

    async def exec(self, alloc: AllocId, argv: Sequence[str],
                   timeout_s: float) -> tuple[int, bytes]:
        """Run ``argv`` in the workload's context: ``(exit status, output)``;
        ``(124, b"timed out")`` on timeout."""


class ChangeSignal:
    """A counter of changes that tasks can wait on (one per driver).

    ``notify`` bumps the generation; ``wait_past(g)`` returns once the generation is
    beyond ``g``. A waiter that remembers the generation it last saw never misses a
    change that happened while it was busy.
    """

    def __init__(self) -> None:
        self._generation = 0
        self._event = trio.Event()

    @property
    def generation(self) -> int:
        """How many changes have been notified."""
        return self._generation

    def notify(self) -> None:
        """Record a change and wake every waiter."""
        self._generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_past(self, generation: int) -> int:
        """Wait until the generation exceeds ``generation``; return the new one."""
        await trio.lowlevel.checkpoint()
        while self._generation <= generation:
            await self._event.wait()
        return self._generation


# ---------------------------------------------------------------------------
# Shared helpers: ports and environment
# ---------------------------------------------------------------------------


def port_env_name(port_name: str) -> str:
    """``MESH_PORT_<NAME>`` for a port name (upper-cased, ``-`` becomes ``_``)."""
    return "MESH_PORT_" + port_name.upper().replace("-", "_")


def workload_env(run: RunSpec, ports: Mapping[str, int], node: NodeId, host: str,
                 base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a workload gets: ``base``, then the spec's env, then
    ``PORT`` (the first port), ``MESH_PORT_<NAME>`` for every port, ``MESH_ALLOC``,
    ``MESH_SERVICE``, ``MESH_NODE`` and ``MESH_HOST``."""
    env = dict(base or {})
    env.update(run.env)
    if run.ports:
        env["PORT"] = str(ports[run.ports[0].name])
    for p in run.ports:
        env[port_env_name(p.name)] = str(ports[p.name])
    env["MESH_ALLOC"] = run.alloc
    env["MESH_SERVICE"] = run.service
    env["MESH_NODE"] = node
    env["MESH_HOST"] = host
    return env


def check_ports(run: RunSpec) -> None:
    """Validate the port requests of ``run``.

    Raises:
        DriverError: a name is empty or repeated, a protocol unknown or a number out
            of range.
    """
    seen: set[str] = set()
    for p in run.ports:
        where = f"port {p.name!r} of allocation {run.alloc}"
        if not p.name:
            raise DriverError(f"a port of allocation {run.alloc} has no name; name every port")
        if p.name in seen:
            raise DriverError(f"{where} is listed twice; give every port its own name")
        seen.add(p.name)
        if p.protocol not in PROTOCOLS:
            raise DriverError(f"{where} has protocol {p.protocol!r}; use tcp or udp")
        if not 0 <= p.host_port < 65536:
            raise DriverError(f"{where} has host port {p.host_port}; use 1-65535, or 0 to "
                              "let meshd pick one")
        if not 0 <= p.container_port < 65536:
            raise DriverError(f"{where} has container port {p.container_port}; use 1-65535")


def port_in_use(port: int, protocol: str, node: NodeId) -> DriverError:
    """The error for a static host port that something else holds."""
    return DriverError(f"port {port}/{protocol} is already in use on node {node}; pick "
                       "another host port or let meshd pick one (host_port 0)")


def reserve_port(host: str, port: int, protocol: str, node: NodeId) -> int:
    """Check that ``port`` (or, for 0, a free one) can be bound on ``host``.

    Binds, reads the port and closes again: the caller's workload binds it next.

    Returns:
        The port (the kernel's pick when ``port`` is 0).

    Raises:
        DriverError: the port is in use, privileged, or ``host`` is not an address
            of this node.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            # A port in TIME_WAIT is free for the workload's listener too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(port, protocol, node) from None
            if exc.errno == errno.EACCES:
                raise DriverError(
                    f"port {port}/{protocol} on node {node} needs privileges (ports below "
                    "1024 need root or CAP_NET_BIND_SERVICE); pick a port above 1023"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise DriverError(
                    f"address {host} is not on node {node}, so its ports cannot be used; "
                    "start meshd with one of this host's addresses") from None
            raise DriverError(f"cannot bind port {port}/{protocol} on node {node}: "
                              f"{exc.strerror or exc}") from None
        bound: int = sock.getsockname()[1]
    return bound


def _reserve_ports(run: RunSpec, host: str, node: NodeId) -> dict[str, int]:
    return {p.name: reserve_port(host, p.host_port, p.protocol, node) for p in run.ports}


def exit_message(code: int) -> str:
    """``"exited with status N"``, or ``"killed by signal SIGX"`` for 128 + N; the
    shell's (and docker-init's) 126 and 127 say what they mean."""
    if code > 128 and code - 128 < signal.NSIG:
        try:
            return f"killed by signal {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    hint = _EXEC_FAILURES.get(code)
    return f"exited with status {code}" + (f" ({hint}: see meshctl logs)" if hint else "")


_EXEC_FAILURES: Final = {126: "command not executable", 127: "command not found"}
"""Exit statuses with which a shell or an init reports that it could not run the
command it was given."""


# ---------------------------------------------------------------------------
# Process driver
# ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in ticks)`` of ``pid``, or ``None`` if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


@dataclass(slots=True)
class _ProcessRecord:
    """The driver's mutable knowledge of one process workload."""

    alloc: AllocId
    service: ServiceId
    version: int
    pid: int
    start_ticks: int
    ports: dict[str, int]
    env: dict[str, str]
    started_at: float
    exit_code: int | None = None
    finished_at: float | None = None
    message: str = ""
    cgroups: tuple[AllocCgroup, ...] = ()
    """The cgroups its processes run in (none without limits)."""
    memory_limit_bytes: int = 0
    """Its enforced memory limit (0: none), for the out-of-memory message."""
    oom_kills_before: int = 0
    """The memory cgroup's ``oom_kill`` count when it started (a reused directory
    keeps the count of an earlier run)."""
    own: bool = False
    """Started by this driver instance, which is its parent and learns its status."""
    reaping: bool = False
    """A reaper task waits on its pidfd."""

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "alloc": self.alloc, "service": self.service,
            "version": self.version, "pid": self.pid, "start_ticks": self.start_ticks,
            "ports": self.ports, "env": self.env, "started_at": self.started_at,
            "exit_code": self.exit_code, "finished_at": self.finished_at,
            "message": self.message, "cgroups": [c.to_json() for c in self.cgroups],
            "memory_limit_bytes": self.memory_limit_bytes,
            "oom_kills_before": self.oom_kills_before,
        }

    @classmethod
    def from_json(cls, data: object) -> _ProcessRecord:
        """Parse a state file's content, treating every field as untrusted; its
        ``cgroups`` are parsed by the caller, who knows the node and the mounts.

        Raises:
            ValueError: it is not a format-1 workload record.
        """
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a format-{STATE_FORMAT} workload record")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"field {key!r} is missing or not {kind}")
            return value

        ports, env = get("ports", dict), get("env", dict)
        if not all(isinstance(k, str) and type(v) is int for k, v in ports.items()):
            raise ValueError("field 'ports' is not a map of names to ports")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("field 'env' is not a map of strings")
        exit_code = data.get("exit_code")
        finished_at = data.get("finished_at")
        if exit_code is not None and type(exit_code) is not int:
            raise ValueError("field 'exit_code' is not an integer")
        if finished_at is not None and not isinstance(finished_at, (int, float)):
            raise ValueError("field 'finished_at' is not a number")
        pid = get("pid", int)
        if pid <= 1:
            raise ValueError(f"pid {pid} is not a workload's")
        alloc = AllocId(get("alloc", str))
        memory_limit, oom_before = data.get("memory_limit_bytes", 0), \
            data.get("oom_kills_before", 0)
        for key, value in (("memory_limit_bytes", memory_limit),
                           ("oom_kills_before", oom_before)):
            if type(value) is not int or value < 0:
                raise ValueError(f"field {key!r} is not a count")
        return cls(
            alloc=alloc, service=ServiceId(get("service", str)),
            version=get("version", int), pid=pid, start_ticks=get("start_ticks", int),
            ports=ports, env=env, started_at=float(get("started_at", (int, float))),
            exit_code=exit_code,
            finished_at=None if finished_at is None else float(finished_at),
            message=str(data.get("message") or ""),
            memory_limit_bytes=memory_limit, oom_kills_before=oom_before,
        )

    def workload(self) -> Workload:
        return Workload(
            alloc=self.alloc, service=self.service, version=self.version,
            state="exited" if self.finished else "running", exit_code=self.exit_code,
            ports=dict(self.ports), started_at=self.started_at,
            finished_at=self.finished_at, ref=str(self.pid), message=self.message)


def _unenforced_message(run: RunSpec, enforced: Collection[str]) -> str:
    """What a running workload says when a limit of ``run`` has no cgroup
    (``meshctl ps`` shows it; ``""`` when every limit holds)."""
    missing = [f"{controller} {limit}" for controller, limit, wanted in (
        (MEMORY, format_bytes(run.memory_limit_bytes), run.memory_limit_bytes),
        (CPU, f"{run.cpu_limit_millis}m", run.cpu_limit_millis))
        if wanted and controller not in enforced]
    if not missing:
        return ""
    return (f"running without its {' and '.join(missing)} limit (no usable cgroup: see "
            "process_limits_not_enforced in the meshd log)")


def _spawn_session(path: str, argv: Sequence[str], env: Mapping[str, str],
                   log_fd: int) -> int:
    """Start ``path`` in a new session, stdin ``/dev/null``, stdout and stderr on
    ``log_fd``; return its pid. Fast (vfork and exec), so it runs on the trio thread.

    Raises:
        OSError: the exec failed (not found, not executable, wrong format).
    """
    return os.posix_spawn(
        path, list(argv), env,
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_DUP2, log_fd, 1),
                      (os.POSIX_SPAWN_DUP2, log_fd, 2)],
        setsid=True, setsigmask=(),
        # Python ignores SIGPIPE and SIGXFSZ; a workload expects the defaults.
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


_JOIN_AND_EXEC: Final = """\
import os, signal, sys
n = sys.argv.index("--")
for procs in sys.argv[1:n]:
    try:
        fd = os.open(procs, os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    except OSError as exc:
        sys.stderr.write(f"meshd: cannot join cgroup {os.path.dirname(procs)}: "
                         f"{exc.strerror}; the workload did not start\\n")
        sys.exit(125)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
try:
    os.execv(sys.argv[n + 1], sys.argv[n + 2:])
except OSError as exc:
    sys.stderr.write(f"meshd: cannot run {sys.argv[n + 1]}: {exc.strerror}\\n")
    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)
"""
"""The program that joins cgroups and then becomes the workload (cgroup v2): its
arguments are the ``cgroup.procs`` files, ``--``, the path and the argv."""


def spawn_in_cgroups(path: str, argv: Sequence[str], env: Mapping[str, str], log_fd: int,
                     placed: Sequence[tuple[Hierarchy, str]], node: NodeId) -> int:
    """Start ``path`` as ``_spawn_session`` does, as a member of every cgroup
    directory in ``placed`` (its hierarchy, its directory) from its first instruction;
    ``node`` names this node in log lines.

    When every hierarchy is cgroup v1, a fresh thread joins the cgroups, spawns and
    leaves them again (:func:`_spawn_as_member`); otherwise the child joins them
    itself before it execs the workload (:data:`_JOIN_AND_EXEC`). See "Resource
    limits" in the module docstring for why.

    Raises:
        OSError: the exec failed (v1; on v2 the helper exits 126 or 127 instead).
        DriverError: the spawning thread could not join a cgroup (v1); nothing was
            started.
    """
    if all(hierarchy.version == 1 for hierarchy, _ in placed):
        outcome: list[int | BaseException] = []

        def run() -> None:
            try:
                outcome.append(_spawn_as_member(path, argv, env, log_fd, placed, node))
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)

        # A thread of its own, not one of trio's cached workers: should it fail to
        # leave the cgroups, it ends anyway and nothing else ever runs in it.
        thread = threading.Thread(target=run, name="meshd-spawn")
        thread.start()
        thread.join()  # a few file writes and a vfork: as fast as a plain spawn
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result
    procs = list(dict.fromkeys(f"{directory}/cgroup.procs" for _, directory in placed))
    python = sys.executable
    if not python:
        raise DriverError("meshd knows no Python interpreter (sys.executable is empty) "
                          "to place a process into a cgroup v2 with")
    return _spawn_session(python, [python, "-I", "-S", "-c", _JOIN_AND_EXEC, *procs, "--",
                                   path, *argv], env, log_fd)


def _spawn_as_member(path: str, argv: Sequence[str], env: Mapping[str, str], log_fd: int,
                     placed: Sequence[tuple[Hierarchy, str]], node: NodeId) -> int:
    """Runs in a fresh thread: move this thread into each (v1) cgroup of ``placed``,
    spawn (the child starts in its parent thread's cgroups), move back."""
    tid = str(threading.get_native_id())
    try:
        home = parse_proc_cgroup(Path("/proc/thread-self/cgroup").read_text())
        moves = {directory: hierarchy.directory(home[hierarchy.controller])
                 for hierarchy, directory in placed}
    except (OSError, KeyError, ValueError) as exc:
        raise DriverError(f"cannot tell which cgroups the spawning thread is in: {exc}"
                          ) from None
    joined: list[str] = []
    try:
        for directory in moves:
            _cgroup_write(f"{directory}/tasks", tid)
            joined.append(directory)
        return _spawn_session(path, argv, env, log_fd)
    finally:
        for directory in joined:
            try:
                _cgroup_write(f"{moves[directory]}/tasks", tid)
            except DriverError as exc:
                # The thread ends in a moment, which takes it out of the cgroup.
                LOGGER.warning("cgroup_thread_not_returned node=%s tid=%s cgroup=%s "
                               "reason=%s", node, tid, directory, exc)


def _cgroup_error(action: str, path: str, exc: OSError) -> DriverError:
    """What went wrong at ``path``, with a hint for the errors a person can fix."""
    hint = {
        errno.EACCES: "; meshd needs root, or a cgroup delegated to its user",
        errno.EPERM: "; meshd needs root, or a cgroup delegated to its user",
        errno.EROFS: "; the cgroup file system is mounted read-only",
        errno.EBUSY: "; cgroup v2 enables a controller only for the children of a "
                     "cgroup without processes of its own",
    }.get(exc.errno or 0, "")
    return DriverError(f"cannot {action} {path}: {exc.strerror or exc}{hint}")


def _cgroup_write(path: str, value: str) -> None:
    """Write ``value`` into an existing cgroup file (never creates one: a missing
    knob is an error, not a new file).

    Raises:
        DriverError: the file is missing or refused the value.
    """
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise _cgroup_error(f"write {value!r} to", path, exc) from None


def _cgroup_pids(directory: str) -> set[int]:
    with open(f"{directory}/cgroup.procs") as f:
        return {int(line) for line in f.read().split()}


def _kill_cgroup(directory: str, node: NodeId) -> None:
    """SIGKILL every process in the cgroup at ``directory`` except meshd itself.

    Each pid is pinned with a pidfd and signalled only if the cgroup still lists
    it after that, so a pid that exited and was reused outside the cgroup is never
    signalled. A failure is logged (``cgroup_kill_failed``), not raised.
    """
    pidfds: dict[int, int] = {}
    try:
        pids = _cgroup_pids(directory) - {os.getpid()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                pidfds[pid] = os.pidfd_open(pid)
        members = _cgroup_pids(directory)
        for pid, pidfd in pidfds.items():
            if pid in members:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except FileNotFoundError:
        return  # already removed
    except (OSError, ValueError) as exc:
        LOGGER.warning("cgroup_kill_failed node=%s cgroup=%s reason=%s", node, directory,
                       exc)
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def _cgroup_dirs(rec: _ProcessRecord) -> list[str]:
    """The directories of ``rec``'s cgroups, each once (v2 controllers share one)."""
    return list(dict.fromkeys(c.path for c in rec.cgroups))


def _discard_cgroups(placed: Sequence[tuple[Hierarchy, str]]) -> None:
    """Remove the cgroups made for a start that failed (they hold no process)."""
    for _, directory in placed:
        with contextlib.suppress(DriverError):
            _remove_cgroup_dir(directory)


def _make_cgroup_dir(path: str) -> bool:
    """``mkdir`` a cgroup: ``True`` if made, ``False`` if it existed.

    Raises:
        DriverError: it cannot be made.
    """
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _cgroup_error("create cgroup", path, exc) from None
    return True


def _enable_controller(directory: str, controller: str) -> None:
    """Enable ``controller`` for the children of the v2 cgroup at ``directory``.

    Raises:
        DriverError: it is not enabled and cannot be.
    """
    path = f"{directory}/cgroup.subtree_control"
    try:
        enabled = Path(path).read_text().split()
    except OSError as exc:
        raise _cgroup_error("read", path, exc) from None
    if controller not in enabled:
        _cgroup_write(path, f"+{controller}")


def _remove_cgroup_dir(directory: str) -> bool:
    """``rmdir`` a cgroup: ``True`` once it is gone, ``False`` while processes are
    still in it.

    Raises:
        DriverError: it cannot be removed for another reason.
    """
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise _cgroup_error("remove cgroup", directory, exc) from None
    # Its parent, meshd-<node>, goes with the node's last allocation cgroup.
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(directory))
    return True


def _collect_exit_status(pid: int) -> int:
    """Reap ``pid``, which has exited (its pidfd was readable), without blocking;
    a death by signal N is reported as 128 + N, as shells and docker do."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    assert reaped == pid, "the pidfd said it exited"
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_tail(directory: Path, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``output.log`` (reaching into ``output.log.1`` if
    it is short) and the size of ``output.log``."""
    current = directory / OUTPUT_LOG
    try:
        data = current.read_bytes()
    except FileNotFoundError:
        data = b""
    size = len(data)
    if lines == 0:
        return b"", size
    if data.count(b"\n") < lines:
        with contextlib.suppress(FileNotFoundError):
            data = (directory / (OUTPUT_LOG + ".1")).read_bytes() + data
    # A trailing newline ends the last line rather than starting an empty one.
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return data, size
    return data[cut + 1:], size


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """New bytes of ``path`` from ``offset`` (from 0 if it was truncated by rotation),
    at most 64 KiB, and the offset to read from next."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                offset = 0
            f.seek(offset)
            chunk = f.read(64 * 1024)
    except FileNotFoundError:
        return b"", offset
    return chunk, offset + len(chunk)


def save_output(directory: Path, output: bytes, max_bytes: int) -> None:
    """Append ``output`` to ``directory/output.log``, keeping only its newest
    ``max_bytes`` (the first line may be cut); ``directory`` is created if missing.

    The file is replaced atomically (a reader sees the old or the new content), which
    also makes the directory the newest for :func:`prune_log_dirs`.

    Raises:
        OSError: the directory or file cannot be written (full disk, permissions,
            ``directory`` is a file).
    """
    assert max_bytes > 0
    output = output[-max_bytes:]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / OUTPUT_LOG
    room = max_bytes - len(output)
    earlier = b""
    if room:
        try:
            with path.open("rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - room))
                earlier = f.read(room)
        except FileNotFoundError:
            pass
    _write_atomic(path, earlier + output)


def prune_log_dirs(state_dir: Path, retained: int, node: NodeId,
                   in_use: Collection[str] = ()) -> None:
    """Delete all but the newest ``retained`` log directories of removed workloads.

    A log directory is a directory in ``state_dir`` whose name is not in ``in_use``
    and that holds no state file (a process workload's stays even while the docker
    driver runs). Newest means the latest modification time, which a removal bumps;
    equal times keep the greater name. Both drivers prune with this at every removal
    and when they start serving.

    Errors are logged (``log_prune_failed``), not raised: pruning only frees space,
    and a directory that vanishes meanwhile is already gone.
    """
    found: list[tuple[float, str, Path]] = []
    try:
        for d in state_dir.iterdir():
            if d.name in in_use or (d / STATE_FILE).exists():
                continue
            with contextlib.suppress(FileNotFoundError):
                st = d.stat()
                if S_ISDIR(st.st_mode):
                    found.append((st.st_mtime, d.name, d))
    except FileNotFoundError:
        return  # nothing was kept yet
    except OSError as exc:
        LOGGER.warning("log_prune_failed node=%s dir=%s reason=%s", node, state_dir, exc)
        return
    found.sort(reverse=True)
    for _, _, d in found[retained:]:
        shutil.rmtree(d, ignore_errors=True)
        LOGGER.debug("log_dir_pruned node=%s dir=%s", node, d)


class ProcessDriver:
    """Runs each workload's command as a local process group; see the module docstring.

    The argv is ``entrypoint + command`` (``image`` is ignored), resolved on the
    workload's ``PATH``; it runs in meshd's working directory (``posix_spawn`` cannot
    change it), so give absolute paths. CPU and memory limits are enforced with
    cgroups where the host allows it, else a warning says which limit is not and why
    ("Resource limits" in the module docstring). When the main process exits, the
    rest of its process group and of its cgroups is killed, as a container's
    processes end with its main process.

    Args:
        state_dir: where ``<alloc>/workload.json`` and ``<alloc>/output.log`` live;
            created if missing. One directory per node's meshd.
        node: this node's name (error messages, ``MESH_NODE``).
        host: the address workloads bind (``MESH_HOST``; free ports are looked up on it).
        wall_clock: wall-clock seconds, for ``started_at``/``finished_at``.
        base_env: the environment every workload starts from; default ``PATH``,
            ``HOME`` and ``LANG`` of meshd's own environment.
        log_max_bytes: rotation size of ``output.log``.
        retained_log_dirs: log directories of removed workloads kept.
        poll_interval_s: how often adopted processes and log sizes are checked.
        proc_dir: the ``/proc`` directory of meshd itself, whose ``mountinfo`` and
            ``cgroup`` say where cgroups can be made (tests describe other hosts).
    """

    name = "process"

    def __init__(self, state_dir: Path, node: NodeId, host: str,
                 wall_clock: Callable[[], float], *,
                 base_env: Mapping[str, str] | None = None,
                 log_max_bytes: int = LOG_MAX_BYTES,
                 retained_log_dirs: int = RETAINED_LOG_DIRS,
                 poll_interval_s: float = POLL_INTERVAL_S,
                 proc_dir: Path = Path("/proc/self")) -> None:
        assert log_max_bytes > 0
        assert retained_log_dirs >= 0
        assert poll_interval_s > 0
        self._state_dir = state_dir
        self._node = node
        self._host = host
        self._wall_clock = wall_clock
        self._base_env = dict(base_env if base_env is not None else
                              {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ})
        self._log_max_bytes = log_max_bytes
        self._retained_log_dirs = retained_log_dirs
        self._poll_interval_s = poll_interval_s
        self._proc_dir = proc_dir
        self._hierarchies: dict[str, Hierarchy | Unavailable] | None = None
        """Where each controller's cgroups go (found once, by :meth:`_cgroup_layout`)."""
        self._cgroup_mounts: list[str] = []
        self._records: dict[AllocId, _ProcessRecord] = {}
        self._loaded = False
        self._changes = ChangeSignal()
        self._seen = 0
        self._nursery: trio.Nursery | None = None

    # -- background ----------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Adopt what a previous meshd started, then reap children, watch adopted
        processes and rotate logs until cancelled (workloads keep running)."""
        # A few small files, once. Pruning deletes a few directories at most; on the
        # trio thread it cannot race a start() that reuses one.
        self._load()
        self._prune_log_dirs()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for rec in self._records.values():
                    if rec.own and not rec.finished and not rec.reaping:
                        self._start_reaper(rec)
                task_status.started()
                while True:
                    self._refresh_adopted()
                    await trio.to_thread.run_sync(self._rotate_logs, sorted(self._records))
                    await trio.sleep(self._poll_interval_s)
            finally:
                self._nursery = None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DriverError(f"cannot create the process driver's directory "
                              f"{self._state_dir}: {exc.strerror or exc}; check its "
                              "permissions or use another --data-dir") from None
        self._cgroup_layout()  # the mounts that recorded cgroups must be under
        for path in sorted(self._state_dir.glob(f"*/{STATE_FILE}")):
            try:
                data = json.loads(path.read_bytes())
                rec = _ProcessRecord.from_json(data)
                if rec.alloc != path.parent.name:
                    raise ValueError(f"it names allocation {rec.alloc!r}")
            except (OSError, ValueError) as exc:
                LOGGER.warning("workload_state_skipped node=%s path=%s reason=%s",
                               self._node, path, exc)
                continue
            try:
                # Absent in files written before limits were enforced.
                rec.cgroups = parse_alloc_cgroups(data.get("cgroups", []), self._node,
                                                  rec.alloc, self._cgroup_mounts)
            except ValueError as exc:
                # Still adopted: its limits hold, but meshd leaves these cgroups alone.
                LOGGER.warning("workload_cgroups_skipped node=%s path=%s reason=%s",
                               self._node, path, exc)
            self._records[rec.alloc] = rec
            LOGGER.info("workload_adopted node=%s alloc=%s pid=%s finished=%s",
                        self._node, rec.alloc, rec.pid, rec.finished)
        self._refresh_adopted()

    def _is_alive(self, rec: _ProcessRecord) -> bool:
        """Whether the recorded process is still running (not a zombie, not a reused pid)."""
        stat = _proc_stat(rec.pid)
        return stat is not None and stat[0] not in ("Z", "X", "x") and stat[1] == rec.start_ticks

    def _refresh_adopted(self) -> None:
        for rec in self._records.values():
            if not rec.own and not rec.finished and not self._is_alive(rec):
                self._finish_adopted(rec)

    def _finish_adopted(self, rec: _ProcessRecord) -> None:
        """``rec`` (not our child) was seen gone: end what is left in its cgroups."""
        for directory in _cgroup_dirs(rec):
            _kill_cgroup(directory, self._node)
        self._finish(rec, None, self._with_oom(rec, "exited while meshd was not its parent",
                                               None))

    def _finish(self, rec: _ProcessRecord, code: int | None, message: str) -> None:
        rec.exit_code = code
        rec.finished_at = self._wall_clock()
        rec.message = message
        if self._records.get(rec.alloc) is not rec:
            return  # a start that failed after spawning; nobody knows of it
        LOGGER.info("workload_exited node=%s alloc=%s pid=%s exit_code=%s message=%r",
                    self._node, rec.alloc, rec.pid, code, message)
        try:
            self._save(rec)
        except OSError as exc:
            LOGGER.warning("workload_state_unsaved node=%s alloc=%s reason=%s",
                           self._node, rec.alloc, exc)
        self._changes.notify()

    def _save(self, rec: _ProcessRecord) -> None:
        _write_atomic(self._state_dir / rec.alloc / STATE_FILE,
                      json.dumps(rec.to_json(), sort_keys=True).encode())

    def _start_reaper(self, rec: _ProcessRecord) -> None:
        assert self._nursery is not None, "ProcessDriver.serve() must be running"
        pidfd = os.pidfd_open(rec.pid)
        rec.reaping = True
        self._nursery.start_soon(self._reap, rec, pidfd)

    async def _reap(self, rec: _ProcessRecord, pidfd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            rec.reaping = False
            os.close(pidfd)
        # The leader is a zombie, so its pid (our group id) cannot be reused yet: end
        # what is left of its group and its cgroups, as a container ends with its
        # main process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGKILL)
        code = _collect_exit_status(rec.pid)
        message = exit_message(code)
        if self._records.get(rec.alloc) is rec:
            for directory in _cgroup_dirs(rec):
                _kill_cgroup(directory, self._node)
            message = self._with_oom(rec, message, code)
        else:
            # A start that failed after spawning. A new start of the alloc may use the
            # same directories already, so only empty ones are removed.
            for directory in _cgroup_dirs(rec):
                with contextlib.suppress(DriverError):
                    _remove_cgroup_dir(directory)
        self._finish(rec, code, message)

    def _rotate_logs(self, allocs: Sequence[AllocId]) -> None:
        """Runs in a thread: copy-and-truncate every log over the limit."""
        for alloc in allocs:
            path = self._state_dir / alloc / OUTPUT_LOG
            try:
                size = path.stat().st_size
                if size <= self._log_max_bytes:
                    continue
                with path.open("rb") as f:
                    f.seek(size - self._log_max_bytes)
                    _write_atomic(path.with_name(OUTPUT_LOG + ".1"), f.read())
                os.truncate(path, 0)
            except OSError as exc:
                LOGGER.warning("log_rotation_failed node=%s alloc=%s reason=%s",
                               self._node, alloc, exc)
                continue
            LOGGER.debug("log_rotated node=%s alloc=%s bytes=%s", self._node, alloc, size)

    # -- cgroups ---------------------------------------------------------------

    def _cgroup_layout(self) -> dict[str, Hierarchy | Unavailable]:
        """Where each controller's cgroups go, or why they cannot; found (and
        logged) once."""
        if self._hierarchies is None:
            self._hierarchies = self._detect_cgroups()
            for controller in CONTROLLERS:
                where = self._hierarchies[controller]
                if isinstance(where, Hierarchy):
                    LOGGER.info("cgroup_controller_found node=%s controller=%s version=%s "
                                "base=%s", self._node, controller, where.version, where.base)
                else:
                    LOGGER.info("cgroup_controller_unavailable node=%s controller=%s "
                                "reason=%r", self._node, controller, where.reason)
        return self._hierarchies

    def _detect_cgroups(self) -> dict[str, Hierarchy | Unavailable]:
        try:
            mounts = parse_mountinfo((self._proc_dir / "mountinfo").read_text())
            own = parse_proc_cgroup((self._proc_dir / "cgroup").read_text())
        except OSError as exc:
            reason = f"cannot read {exc.filename}: {exc.strerror or exc}"
            return {c: Unavailable(c, reason) for c in CONTROLLERS}
        self._cgroup_mounts = [m.mount_point for m in mounts]
        listed: list[str] | None = None
        base = v2_base(mounts, own)
        if base is not None:
            with contextlib.suppress(OSError):
                listed = Path(base, "cgroup.controllers").read_text().split()
        return locate(mounts, own, listed)

    def _not_enforced(self, run: RunSpec, controller: str, reason: str) -> None:
        limit = format_bytes(run.memory_limit_bytes) if controller == MEMORY else \
            f"{run.cpu_limit_millis}m"
        LOGGER.warning("process_limits_not_enforced node=%s alloc=%s controller=%s "
                       "limit=%r reason=%r", self._node, run.alloc, controller, limit,
                       reason)

    def _setup_cgroups(self, run: RunSpec) -> tuple[list[tuple[Hierarchy, str]], int]:
        """Make the cgroups that enforce the limits of ``run``; a limit whose cgroup
        cannot be made is left unenforced (``process_limits_not_enforced``).

        Returns:
            The hierarchy and directory of each cgroup made, and the ``oom_kill``
            count of the memory cgroup now.
        """
        placed: list[tuple[Hierarchy, str]] = []
        oom_before = 0
        layout = self._cgroup_layout()
        for controller in CONTROLLERS:
            limit = run.memory_limit_bytes if controller == MEMORY else run.cpu_limit_millis
            if not limit:
                continue
            where = layout[controller]
            if isinstance(where, Unavailable):
                self._not_enforced(run, controller, where.reason)
                continue
            try:
                directory = self._make_cgroup(where, run.alloc, limit)
            except DriverError as exc:
                self._not_enforced(run, controller, str(exc))
                continue
            if controller == MEMORY:
                oom_before = self._oom_kill_count(
                    AllocCgroup(MEMORY, where.version, directory)) or 0
            placed.append((where, directory))
        return placed, oom_before

    def _make_cgroup(self, hierarchy: Hierarchy, alloc: AllocId, limit: int) -> str:
        """Make (or reuse) the cgroup of ``alloc`` in ``hierarchy``, set its limit and
        return its directory; what was made is removed again on failure.

        Raises:
            DriverError: a directory cannot be made or a knob is missing or refused.
        """
        controller = hierarchy.controller
        parent = hierarchy.parent(self._node)
        directory = hierarchy.alloc_dir(self._node, alloc)
        try:
            if hierarchy.version == 2:
                _enable_controller(hierarchy.base, controller)
            _make_cgroup_dir(parent)
            if hierarchy.version == 2:
                _enable_controller(parent, controller)
            if not _make_cgroup_dir(directory):
                # Left over (meshd died before it recorded the start, or it could not
                # be removed); reused if empty. Processes in it may be another meshd's
                # of the same node name on this host: never killed on a guess.
                try:
                    strays = sorted(_cgroup_pids(directory))
                except (OSError, ValueError) as exc:
                    raise DriverError(f"cannot read {directory}/cgroup.procs: {exc}"
                                      ) from None
                if strays:
                    raise DriverError(
                        f"cgroup {directory} already holds processes {strays} that meshd "
                        f"did not start for this run (another meshd named {self._node} on "
                        "this host?); stop them or remove the cgroup")
            for write in limit_writes(controller, hierarchy.version, limit):
                path = f"{directory}/{write.file}"
                if write.optional and not os.path.exists(path):
                    continue
                _cgroup_write(path, write.value)
        except DriverError:
            for made in (directory, parent):
                with contextlib.suppress(OSError):
                    os.rmdir(made)
            raise
        return directory

    def _oom_kill_count(self, cgroup: AllocCgroup) -> int | None:
        """The ``oom_kill`` count of a memory cgroup; ``None`` if unknown (logged
        when unreadable)."""
        path = f"{cgroup.path}/{OOM_COUNTER_FILE[cgroup.version]}"
        try:
            return oom_kills(Path(path).read_text())
        except OSError as exc:
            LOGGER.warning("cgroup_unreadable node=%s path=%s reason=%s", self._node, path,
                           exc.strerror or exc)
            return None

    def _with_oom(self, rec: _ProcessRecord, message: str, code: int | None) -> str:
        """``message``, saying so if the kernel killed processes of ``rec`` for memory."""
        memory = next((c for c in rec.cgroups if c.controller == MEMORY), None)
        if memory is None:
            return message
        kills = self._oom_kill_count(memory)
        if kills is None:
            return message
        return oom_exit_message(message, code, kills - rec.oom_kills_before,
                                rec.memory_limit_bytes)

    async def _remove_cgroups(self, rec: _ProcessRecord) -> None:
        """Kill what is left in the cgroups of the finished ``rec`` and remove them
        (a replacement of ``rec`` meanwhile keeps them: they are its).

        Raises:
            DriverError: processes outlive SIGKILL by :data:`KILL_WAIT_S`.
        """
        pending = _cgroup_dirs(rec)
        with trio.move_on_after(KILL_WAIT_S):
            while True:
                pending = [d for d in pending if not self._remove_cgroup_or_warn(d)]
                if not pending:
                    return
                for directory in pending:
                    _kill_cgroup(directory, self._node)
                await trio.sleep(PROC_POLL_S)
                if self._records.get(rec.alloc) is not rec:
                    return
        raise DriverError(f"processes of allocation {rec.alloc} are still in cgroup "
                          f"{pending[0]} {KILL_WAIT_S} s after SIGKILL (stuck in the "
                          f"kernel?); look at {pending[0]}/cgroup.procs with ps")

    def _remove_cgroup_or_warn(self, directory: str) -> bool:
        """``rmdir`` a cgroup: ``False`` while processes are still in it. Any other
        failure (not root any more) leaves it, logged as ``cgroup_not_removed``,
        rather than keeping its workload forever."""
        try:
            return _remove_cgroup_dir(directory)
        except DriverError as exc:
            LOGGER.warning("cgroup_not_removed node=%s cgroup=%s reason=%s", self._node,
                           directory, exc)
            return True

    def cgroups(self, alloc: AllocId) -> dict[str, Path]:
        """Controller -> directory of each cgroup the workload of ``alloc`` runs in:
        empty without limits, or where they could not be enforced."""
        rec = self._records.get(alloc)
        return {} if rec is None else {c.controller: Path(c.path) for c in rec.cgroups}

    def _prune_log_dirs(self) -> None:
        """Delete all but the newest ``retained_log_dirs`` directories that belong to
        no workload (known ones and those with a state file stay)."""
        prune_log_dirs(self._state_dir, self._retained_log_dirs, self._node, self._records)

    # -- the Driver API ------------------------------------------------------

    def _resolve(self, run: RunSpec, env: Mapping[str, str]) -> tuple[str, list[str]]:
        argv = [*run.entrypoint, *run.command]
        if not argv or not argv[0]:
            raise DriverError(f"allocation {run.alloc} of {run.service} has no command; the "
                              "process driver runs a command (give one after --), not an image")
        program = argv[0]
        if "/" in program:
            path: str | None = program if os.path.isfile(program) else None
        else:
            path = shutil.which(program, mode=os.F_OK, path=env.get("PATH", os.defpath))
        if path is None:
            raise DriverError(f"command {program!r} of {run.service} was not found on node "
                              f"{self._node}; install it there or give its full path")
        if not os.access(path, os.X_OK):
            raise DriverError(f"command {path!r} of {run.service} is not executable on node "
                              f"{self._node}; chmod +x it or run it through an interpreter")
        return path, argv

    async def start(self, run: RunSpec) -> Workload:
        """Start ``run.entrypoint + run.command`` as a new session; see :class:`Driver`.

        Its CPU and memory limits are enforced with cgroups where the host allows it
        (else a warning says which limit is not, and why; the workload starts).

        Raises:
            DriverError: no command, command not found or not executable, a port in
                use, a limit no kernel could enforce, the alloc already running, or
                the state cannot be written.
        """
        self._load()
        old = self._records.get(run.alloc)
        if old is not None and not old.finished:
            raise DriverError(f"allocation {run.alloc} is already running on node "
                              f"{self._node} (pid {old.pid}); stop it before starting it again")
        check_ports(run)
        check_limits(run.cpu_limit_millis, run.memory_limit_bytes,
                     f"allocation {run.alloc} of {run.service}")
        ports = _reserve_ports(run, self._host, self._node)
        env = workload_env(run, ports, self._node, self._host, self._base_env)
        path, argv = self._resolve(run, env)
        if old is not None:
            # Its exited predecessor's cgroups: emptied at its exit; fresh counters
            # for the new run (a directory that cannot go yet is reused).
            for cgroup_dir in _cgroup_dirs(old):
                _kill_cgroup(cgroup_dir, self._node)
                with contextlib.suppress(DriverError):
                    _remove_cgroup_dir(cgroup_dir)
        placed, oom_before = self._setup_cgroups(run)
        directory = self._state_dir / run.alloc
        try:
            directory.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(directory / OUTPUT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                             0o640)
        except OSError as exc:
            _discard_cgroups(placed)
            raise DriverError(f"cannot write the log of allocation {run.alloc} under "
                              f"{directory}: {exc.strerror or exc}; check the disk and the "
                              "data directory's permissions") from None
        try:
            pid = self._spawn(run, path, argv, env, log_fd, placed)
        except OSError as exc:
            _discard_cgroups(placed)
            raise DriverError(f"cannot run {path!r} for {run.service} on node {self._node}: "
                              f"{exc.strerror or exc}; check that it is a program for "
                              "this machine") from None
        finally:
            os.close(log_fd)
        stat = _proc_stat(pid)
        assert stat is not None, "an unreaped child always has a /proc entry"
        cgroups = tuple(AllocCgroup(h.controller, h.version, d) for h, d in placed)
        rec = _ProcessRecord(
            alloc=run.alloc, service=run.service, version=run.version, pid=pid,
            start_ticks=stat[1], ports=ports, env=env, started_at=self._wall_clock(),
            message=_unenforced_message(run, {c.controller for c in cgroups}),
            cgroups=cgroups, oom_kills_before=oom_before, own=True,
            memory_limit_bytes=run.memory_limit_bytes if any(
                c.controller == MEMORY for c in cgroups) else 0)
        # Saved before the reaper starts, and without a checkpoint in between, so the
        # "exited" record of a command that ends at once can only come after this one.
        try:
            self._save(rec)
        except OSError as exc:
            # Without its state file a restarted meshd could not adopt it: undo (the
            # reaper collects it; the record is not registered, so nothing is saved).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._start_reaper(rec)
            raise DriverError(f"cannot save the state of allocation {run.alloc} in "
                              f"{directory}: {exc.strerror or exc}; check the disk") from None
        self._records[run.alloc] = rec
        self._start_reaper(rec)
        LOGGER.info("workload_started node=%s alloc=%s service=%s pid=%s ports=%s "
                    "cgroups=%s", self._node, run.alloc, run.service, pid, ports,
                    _cgroup_dirs(rec))
        self._changes.notify()
        return rec.workload()

    def _spawn(self, run: RunSpec, path: str, argv: Sequence[str], env: Mapping[str, str],
               log_fd: int, placed: list[tuple[Hierarchy, str]]) -> int:
        """Spawn into the cgroups of ``placed``; if the spawning thread cannot join
        them, their limits are not enforced (``placed`` is emptied, the cgroups
        removed) and the workload is spawned outside.

        Raises:
            OSError: the exec failed.
        """
        if not placed:
            return _spawn_session(path, argv, env, log_fd)
        try:
            return spawn_in_cgroups(path, argv, env, log_fd, placed, self._node)
        except DriverError as exc:
            for hierarchy, _ in placed:
                self._not_enforced(run, hierarchy.controller, str(exc))
            _discard_cgroups(placed)
            placed.clear()
        return _spawn_session(path, argv, env, log_fd)

    def _signal(self, rec: _ProcessRecord, sig: signal.Signals) -> None:
        # Check identity first: an adopted pid may belong to someone else by now.
        stat = _proc_stat(rec.pid)
        if stat is None or stat[1] != rec.start_ticks:
            return
        try:
            os.killpg(rec.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise DriverError(f"not allowed to signal process group {rec.pid} of allocation "
                              f"{rec.alloc}; run meshd as the user that started it") from None

    async def _wait_exit(self, rec: _ProcessRecord) -> None:
        while not rec.finished:
            if rec.own:
                await self._changes.wait_past(self._changes.generation)
            elif not self._is_alive(rec):
                self._finish_adopted(rec)
            else:
                await trio.sleep(PROC_POLL_S)

    async def stop(self, alloc: AllocId, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; see :class:`Driver`.

        Raises:
            DriverError: the group cannot be signalled or survives SIGKILL.
        """
        self._load()
        rec = self._records.get(alloc)
        if rec is None or rec.finished:
            return
        LOGGER.info("workload_stopping node=%s alloc=%s pid=%s grace_s=%s",
                    self._node, alloc, rec.pid, grace_s)
        self._signal(rec, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await self._wait_exit(rec)
        if rec.finished:
            return
        self._signal(rec, signal.SIGKILL)
        with trio.move_on_after(KILL_WAIT_S):
            await self._wait_exit(rec)
        if not rec.finished:
            raise DriverError(f"process {rec.pid} of allocation {alloc} did not die from "
                              f"SIGKILL within {KILL_WAIT_S} s (stuck in the kernel?); "
                              "check it with ps")

    async def remove(self, alloc: AllocId) -> None:
        """Delete the state file and the cgroups; the logs stay (see the module
        docstring).

        Raises:
            DriverError: it is still running, or processes in its cgroups do not die
                (stuck in the kernel); a retry finishes the removal.
        """
        self._load()
        rec = self._records.get(alloc)
        if rec is None:
            return
        if not rec.finished:
            raise DriverError(f"allocation {alloc} is still running on node {self._node}; "
                              "stop it before removing it")
        await self._remove_cgroups(rec)
        if self._records.get(alloc) is not rec:
            return  # started again while its cgroups were emptied
        del self._records[alloc]
        directory = self._state_dir / alloc
        with contextlib.suppress(FileNotFoundError):
            (directory / STATE_FILE).unlink()
        with contextlib.suppress(FileNotFoundError):
            os.utime(directory)  # pruning keeps the most recently removed
        self._prune_log_dirs()
        await trio.lowlevel.checkpoint()
        LOGGER.info("workload_removed node=%s alloc=%s", self._node, alloc)

    async def list(self) -> list[Workload]:
        """Every workload in the state directory, in alloc order."""
        await trio.lowlevel.checkpoint()
        self._load()
        self._refresh_adopted()
        return [self._records[a].workload() for a in sorted(self._records)]

    async def wait_changed(self) -> None:
        """Return once a workload started, exited or was adopted since the last call."""
        self._seen = await self._changes.wait_past(self._seen)

    async def logs(self, alloc: AllocId, *, tail: int = 100,
                   follow: bool = False) -> AsyncGenerator[bytes, None]:
        """Output of the workload (also after ``remove``, until the directory is pruned).

        Raises:
            DriverError: there are no logs for ``alloc`` on this node.
        """
        assert tail >= 0
        directory = self._state_dir / alloc
        if not directory.is_dir():
            raise DriverError(f"no logs of allocation {alloc} on node {self._node}; it never "
                              "ran here or its logs were pruned")
        data, offset = await trio.to_thread.run_sync(_read_tail, directory, tail)
        if data:
            yield data
        path = directory / OUTPUT_LOG
        while follow:
            rec = self._records.get(alloc)
            running = rec is not None and not rec.finished
            chunk, offset = await trio.to_thread.run_sync(_read_from, path, offset)
            if chunk:
                yield chunk
            elif not running:
                return
            else:
                await trio.sleep(LOG_FOLLOW_POLL_S)

    async def exec(self, alloc: AllocId, argv: Sequence[str],
                   timeout_s: float) -> tuple[int, bytes]:
        """Run ``argv`` with the workload's environment and in its cgroups (so an
        exec health check counts against the workload's CPU and memory, as a
        ``docker exec`` does), output bounded to :data:`EXEC_OUTPUT_MAX_BYTES`; 127
        when it cannot be run, 124 on timeout, 128 + N when killed by signal N.

        Raises:
            DriverError: ``alloc`` is not running here, or ``argv`` is empty.
        """
        rec = self._records.get(alloc)
        if rec is None or rec.finished:
            raise DriverError(f"allocation {alloc} is not running on node {self._node}")
        if not argv:
            raise DriverError(f"empty exec command for allocation {alloc}")
        program = argv[0]
        path = program if "/" in program else shutil.which(
            program, mode=os.F_OK, path=rec.env.get("PATH", os.defpath))
        if path is None:
            return 127, f"{program}: command not found".encode()
        read_fd, write_fd = os.pipe()
        try:
            pid = self._spawn_check(path, argv, rec, write_fd)
        except OSError as exc:
            os.close(read_fd)
            return 127, f"{program}: {exc.strerror or exc}".encode()
        finally:
            os.close(write_fd)
        pidfd = os.pidfd_open(pid)
        output = bytearray()
        try:
            with trio.move_on_after(timeout_s) as scope:
                async with trio.lowlevel.FdStream(read_fd) as stream:
                    while chunk := await stream.receive_some(EXEC_OUTPUT_MAX_BYTES):
                        output += chunk[:EXEC_OUTPUT_MAX_BYTES - len(output)]
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            # Timed out, cancelled or done: end what is left of its group (the
            # leader is unreaped, so the group id cannot have been reused), reap it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await trio.lowlevel.wait_readable(pidfd)
            os.close(pidfd)
            code = _collect_exit_status(pid)
        return (124, b"timed out") if scope.cancelled_caught else (code, bytes(output))

    def _spawn_check(self, path: str, argv: Sequence[str], rec: _ProcessRecord,
                     out_fd: int) -> int:
        """Spawn an exec check as a new session in ``rec``'s cgroups (outside them
        when the spawning thread cannot join them: the check still runs).

        Raises:
            OSError: the exec failed.
        """
        layout = self._cgroup_layout()
        placed = [(where, c.path) for c in rec.cgroups
                  if isinstance(where := layout.get(c.controller), Hierarchy)]
        if placed:
            try:
                return spawn_in_cgroups(path, argv, rec.env, out_fd, placed, self._node)
            except DriverError as exc:
                LOGGER.warning("exec_outside_cgroups node=%s alloc=%s reason=%s", self._node,
                               rec.alloc, exc)
        return _spawn_session(path, argv, rec.env, out_fd)


# ---------------------------------------------------------------------------
# Docker driver
# ---------------------------------------------------------------------------

_CHANGE_EVENTS: Final = frozenset({"start", "die", "oom", "destroy", "stop", "kill",
                                   "pause", "unpause", "create"})


def container_name(alloc: AllocId) -> str:
    """The name of the container of ``alloc``: ``mesh-<alloc>``."""
    return f"mesh-{alloc}"


class DockerDriver:
    """Runs each workload as a container through the docker SDK; see the module docstring.

    Every SDK call runs in a thread (``trio.to_thread.run_sync``) under one shared
    :class:`trio.CapacityLimiter` of :data:`DOCKER_THREADS`; long-lived streams (the
    event pump, followed logs, execs) use a second limiter so they cannot starve
    start and stop. The output of removed containers is kept in ``state_dir`` (see
    "Logs (docker driver)" in the module docstring).

    Args:
        client: a docker SDK client.
        node: this node's name (the ``mesh.node`` label, error messages).
        host: the address workloads bind (host networking) or ports are published on.
        wall_clock: wall-clock seconds, for ``started_at``/``finished_at``.
        dns_servers: the name servers written into containers' resolv.conf (this
            node's DNS server first: :func:`mesh.dns.config.container_resolvers`);
            empty: Docker's default (the host's resolvers).
        pull: pull a missing image instead of failing.
        network_mode: ``"host"`` (ports handed in as ``PORT``/``MESH_PORT_*``) or
            ``"bridge"`` (``container_port`` published on ``host_port``).
        owns_client: close ``client`` when :meth:`serve` ends.
        state_dir: where the output of removed containers is kept
            (``<alloc>/output.log``, created when first needed); ``None`` keeps none,
            and ``logs`` then knows only containers that exist.
        retained_log_dirs: log directories of removed containers kept.
        retained_log_max_bytes: output kept per allocation, the newest bytes.
    """

    name = "docker"

    def __init__(self, client: docker.DockerClient, node: NodeId, host: str,
                 wall_clock: Callable[[], float], dns_servers: Sequence[str] = (),
                 pull: bool = False, *, network_mode: str = "host",
                 owns_client: bool = False, state_dir: Path | None = None,
                 retained_log_dirs: int = RETAINED_LOG_DIRS,
                 retained_log_max_bytes: int = DOCKER_RETAINED_LOG_MAX_BYTES) -> None:
        assert network_mode in ("host", "bridge"), network_mode
        assert retained_log_dirs >= 0
        assert retained_log_max_bytes > 0
        self._client = client
        self._node = node
        self._host = host
        self._wall_clock = wall_clock
        self._dns_servers = list(dns_servers)
        self._pull = pull
        self._network_mode = network_mode
        self._owns_client = owns_client
        self._state_dir = state_dir
        self._retained_log_dirs = retained_log_dirs
        self._retained_log_max_bytes = retained_log_max_bytes
        self._limiter = trio.CapacityLimiter(DOCKER_THREADS)
        self._stream_limiter = trio.CapacityLimiter(DOCKER_STREAM_THREADS)
        self._changes = ChangeSignal()
        self._seen = 0
        self._finished_at: dict[str, float] = {}
        """Container id -> when this driver first saw it not running."""

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (requests.exceptions.RequestException, OSError) as exc:
            # the SDK lets transport errors through when dockerd goes away
            raise DriverError(f"the Docker engine on node {self._node} does not answer "
                              f"({exc}); check dockerd") from None

    def _api_error(self, what: str, exc: docker.errors.DockerException) -> DriverError:
        detail = getattr(exc, "explanation", None) or str(exc)
        return DriverError(f"{what} on node {self._node}: {detail}")

    # -- background ----------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Pump the engine's container events into :meth:`wait_changed` until cancelled,
        reconnecting with backoff when the stream breaks. Prunes the kept output of
        removed containers first (``retained_log_dirs`` may have shrunk)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](DOCKER_EVENT_BUFFER)
        try:
            if self._state_dir is not None:
                await trio.to_thread.run_sync(prune_log_dirs, self._state_dir,
                                              self._retained_log_dirs, self._node)
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(self._pump_events, send)
                task_status.started()
                async for event in receive:
                    if event.get("Action") in _CHANGE_EVENTS:
                        LOGGER.debug("docker_event node=%s action=%s id=%s", self._node,
                                     event.get("Action"), event.get("id"))
                        self._changes.notify()
        finally:
            if self._owns_client:
                self._client.close()

    async def _pump_events(self, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        filters = {"type": "container", "label": [f"{LABEL_PREFIX}node={self._node}"]}
        delay = 0.5
        async with send:
            while True:
                try:
                    stream = await self._call(
                        lambda: self._client.events(decode=True, filters=filters))
                except docker.errors.DockerException as exc:
                    LOGGER.warning("docker_events_unavailable node=%s reason=%s retry_s=%s",
                                   self._node, exc, delay)
                else:
                    # Something may have changed while the stream was down.
                    self._changes.notify()
                    try:
                        await trio.to_thread.run_sync(
                            _pump_blocking, stream, send, abandon_on_cancel=True,
                            limiter=self._stream_limiter)
                        LOGGER.warning("docker_events_ended node=%s retry_s=%s",
                                       self._node, delay)
                    finally:
                        stream.close()
                await trio.sleep(delay)
                delay = min(delay * 2, DOCKER_EVENT_RETRY_MAX_S)

    # -- output of removed containers -----------------------------------------

    def _read_output(self, container: Any, alloc: AllocId) -> bytes | None:
        """Runs in a thread: the newest ``retained_log_max_bytes`` of the output of
        ``container`` (about to be removed), or ``None`` when there is nothing to keep
        (no ``state_dir``, never started) or it cannot be read (logged)."""
        if self._state_dir is None or container.status == "created":
            return None
        limit = self._retained_log_max_bytes
        output = bytearray()
        try:
            # Every line holds at least its newline, so the newest `limit` lines hold
            # the newest `limit` bytes: the engine need not send all of a long log.
            stream = container.logs(stdout=True, stderr=True, stream=True, follow=False,
                                    tail=limit)
            try:
                for chunk in stream:
                    output += chunk
                    if len(output) > 2 * limit:
                        del output[:-limit]
            finally:
                stream.close()
        except (OSError, docker.errors.DockerException, requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError) as exc:
            LOGGER.warning("output_unsaved node=%s alloc=%s container=%s reason=%r",
                           self._node, alloc, container.short_id, exc)
            return None
        return bytes(output[-limit:])

    def _keep_output(self, alloc: AllocId, output: bytes) -> None:
        """Runs in a thread: append ``output`` (of a removed container) to the alloc's
        kept output and prune; a failure is logged, not raised."""
        assert self._state_dir is not None, "only read when there is a state_dir"
        try:
            save_output(self._state_dir / alloc, output, self._retained_log_max_bytes)
        except OSError as exc:
            LOGGER.warning("output_unsaved node=%s alloc=%s reason=%r", self._node, alloc,
                           exc)
            return
        LOGGER.debug("output_saved node=%s alloc=%s bytes=%s", self._node, alloc,
                     len(output))
        prune_log_dirs(self._state_dir, self._retained_log_dirs, self._node)

    def _remove_container(self, container: Any, alloc: AllocId, **options: Any) -> None:
        """Runs in a thread: remove ``container`` of ``alloc`` and its anonymous volumes
        (``options`` go to ``Container.remove``), keeping its output.

        The output is read before and written after the removal, so that a removal
        that fails and is retried does not keep it twice.

        Raises:
            docker.errors.DockerException: the engine refused the removal.
        """
        output = self._read_output(container, alloc)
        container.remove(v=True, **options)
        if output is not None:
            self._keep_output(alloc, output)

    def _read_kept(self, alloc: AllocId, lines: int) -> bytes | None:
        """Runs in a thread: the last ``lines`` lines of the kept output of ``alloc``;
        ``None`` when none is kept."""
        if self._state_dir is None or not (self._state_dir / alloc).is_dir():
            return None
        return _read_tail(self._state_dir / alloc, lines)[0]

    # -- the Driver API ------------------------------------------------------

    def _ensure_image(self, image: str) -> None:
        try:
            self._client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            if not self._pull:
                raise DriverError(
                    f"image {image} is not present on node {self._node}; load it (docker "
                    "load / docker import) or start meshd with --docker-pull") from None
        LOGGER.info("image_pulling node=%s image=%s", self._node, image)
        try:
            self._client.images.pull(image)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"could not pull image {image}; check its name or load "
                                  "it by hand", exc) from None

    def _start_blocking(self, run: RunSpec) -> Workload:
        if not run.image:
            raise DriverError(f"allocation {run.alloc} of {run.service} has no image; the "
                              "docker driver runs an image")
        try:
            old = self._client.containers.get(container_name(run.alloc))
        except docker.errors.NotFound:
            pass
        else:
            if old.status in ("running", "restarting", "paused"):
                raise DriverError(f"allocation {run.alloc} is already running on node "
                                  f"{self._node} (container {old.short_id}); stop it first")
            self._remove_container(old, run.alloc, force=True)
        self._ensure_image(run.image)
        host_net = self._network_mode == "host"
        ports = _reserve_ports(run, self._host, self._node) if host_net else {
            p.name: (reserve_port(self._host, p.host_port, p.protocol, self._node)
                     if p.host_port else 0) for p in run.ports}
        labels = dict(run.labels)
        labels.update({
            f"{LABEL_PREFIX}managed": "true", f"{LABEL_PREFIX}alloc": run.alloc,
            f"{LABEL_PREFIX}service": run.service, f"{LABEL_PREFIX}version": str(run.version),
            f"{LABEL_PREFIX}node": self._node,
            f"{LABEL_PREFIX}started_at": repr(self._wall_clock()),
            f"{LABEL_PREFIX}ports": json.dumps(
                [[p.name, p.container_port, p.protocol, ports[p.name]] for p in run.ports]),
        })
        options: dict[str, Any] = {
            "name": container_name(run.alloc), "labels": labels, "detach": True,
            "command": list(run.command) or None, "entrypoint": list(run.entrypoint) or None,
            "restart_policy": {"Name": "no"}, "network_mode": self._network_mode,
            # Docker's init (tini) as PID 1: it reaps the children a workload
            # orphans and passes signals on, so a command that would ignore SIGTERM
            # as PID 1 (the kernel drops signals PID 1 has no handler for) stops
            # on it instead of waiting out its grace for SIGKILL.
            "init": True,
        }
        if host_net:
            options["environment"] = workload_env(run, ports, self._node, self._host)
        else:
            options["environment"] = {**run.env, "MESH_ALLOC": run.alloc,
                                      "MESH_SERVICE": run.service, "MESH_NODE": self._node,
                                      "MESH_HOST": self._host}
            options["ports"] = {f"{p.container_port}/{p.protocol}": (self._host,
                                                                    ports[p.name] or None)
                                for p in run.ports}
        if self._dns_servers:
            options["dns"] = self._dns_servers
        if run.cpu_limit_millis:
            options["nano_cpus"] = run.cpu_limit_millis * 1_000_000
        if run.memory_limit_bytes:
            options["mem_limit"] = run.memory_limit_bytes
        try:
            container = self._client.containers.create(run.image, **options)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"cannot create the container of allocation {run.alloc}",
                                  exc) from None
        try:
            container.start()
            container.reload()
        except docker.errors.DockerException as exc:
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(v=True, force=True)
            raise self._api_error(f"the container of allocation {run.alloc} ({run.image}) "
                                  "could not start", exc) from None
        workload = self._workload(container.attrs)
        assert workload is not None, "a container we labelled ourselves parses"
        LOGGER.info("workload_started node=%s alloc=%s service=%s container=%s ports=%s",
                    self._node, run.alloc, run.service, container.short_id,
                    dict(workload.ports))
        return workload

    def _workload(self, attrs: Mapping[str, Any]) -> Workload | None:
        """The workload a container's ``inspect`` describes; ``None`` (and a warning)
        when its mesh labels are malformed."""
        cid = str(attrs.get("Id", ""))
        try:
            labels = attrs["Config"]["Labels"]
            alloc = AllocId(labels[f"{LABEL_PREFIX}alloc"])
            service = ServiceId(labels[f"{LABEL_PREFIX}service"])
            version = int(labels[f"{LABEL_PREFIX}version"])
            started_at = float(labels[f"{LABEL_PREFIX}started_at"])
            ports: dict[str, int] = {}
            published = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
            for name, container_port, protocol, host_port in json.loads(
                    labels[f"{LABEL_PREFIX}ports"]):
                bindings = published.get(f"{container_port}/{protocol}") or []
                ports[str(name)] = int(bindings[0]["HostPort"]) if bindings else int(host_port)
            state = attrs["State"]
            status = str(state["Status"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            LOGGER.warning("container_skipped node=%s container=%s reason=%r",
                           self._node, cid[:12], exc)
            return None
        if status in ("running", "restarting", "paused"):
            self._finished_at.pop(cid, None)
            return Workload(alloc=alloc, service=service, version=version, state="running",
                            exit_code=None, ports=ports, started_at=started_at,
                            finished_at=None, ref=cid)
        finished_at = self._finished_at.setdefault(cid, self._wall_clock())
        exit_code: int | None = int(state.get("ExitCode", 0))
        if status == "created":
            exit_code, message = None, "created but never started"
        elif state.get("OOMKilled"):
            message = "OOM killed"
        elif state.get("Error"):
            message = f"{exit_message(exit_code or 0)}: {state['Error']}"
        else:
            message = exit_message(exit_code or 0)
        return Workload(alloc=alloc, service=service, version=version, state="exited",
                        exit_code=exit_code, ports=ports, started_at=started_at,
                        finished_at=finished_at, ref=cid, message=message)

    async def start(self, run: RunSpec) -> Workload:
        """Create and start container ``mesh-<alloc>``; see :class:`Driver`.

        Raises:
            DriverError: no image, the image is missing (and ``pull`` is off), a port
                in use, the alloc already running, or the engine refused.
        """
        check_ports(run)
        try:
            workload: Workload = await self._call(self._start_blocking, run)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"cannot start allocation {run.alloc}", exc) from None
        self._changes.notify()
        return workload

    def _get(self, alloc: AllocId) -> Any:
        try:
            return self._client.containers.get(container_name(alloc))
        except docker.errors.NotFound:
            return None

    async def stop(self, alloc: AllocId, grace_s: float) -> None:
        """``docker stop`` with ``grace_s`` (whole seconds, rounded up)."""
        def stop_blocking() -> None:
            container = self._get(alloc)
            if container is not None and container.status != "exited":
                with contextlib.suppress(docker.errors.NotFound):
                    container.stop(timeout=math.ceil(grace_s))
        try:
            await self._call(stop_blocking)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"cannot stop allocation {alloc}", exc) from None
        LOGGER.info("workload_stopped node=%s alloc=%s", self._node, alloc)
        self._changes.notify()

    async def remove(self, alloc: AllocId) -> None:
        """Remove the container (and its anonymous volumes) of an exited workload; its
        output is kept in ``state_dir`` (best effort, see the module docstring)."""
        def remove_blocking() -> None:
            container = self._get(alloc)
            if container is None:
                return
            if container.status in ("running", "restarting", "paused"):
                raise DriverError(f"allocation {alloc} is still running on node "
                                  f"{self._node}; stop it before removing it")
            with contextlib.suppress(docker.errors.NotFound):
                self._remove_container(container, alloc)
            self._finished_at.pop(container.id, None)
        try:
            await self._call(remove_blocking)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"cannot remove allocation {alloc}", exc) from None
        LOGGER.info("workload_removed node=%s alloc=%s", self._node, alloc)

    async def list(self) -> list[Workload]:
        """Every container labelled ``mesh.node=<node>``, in alloc order.

        Raises:
            DriverError: the engine does not answer.
        """
        filters = {"label": [f"{LABEL_PREFIX}managed=true", f"{LABEL_PREFIX}node={self._node}"]}
        try:
            containers = await self._call(lambda: self._client.containers.list(
                all=True, filters=filters, ignore_removed=True))
        except docker.errors.DockerException as exc:
            raise self._api_error("cannot list containers", exc) from None
        found = [w for c in containers if (w := self._workload(c.attrs)) is not None]
        # Forget exit times of containers removed behind our back.
        listed = {w.ref for w in found}
        for cid in [cid for cid in self._finished_at if cid not in listed]:
            del self._finished_at[cid]
        return sorted(found, key=lambda w: w.alloc)

    async def wait_changed(self) -> None:
        """Return once the engine reported a container event since the last call."""
        self._seen = await self._changes.wait_past(self._seen)

    async def logs(self, alloc: AllocId, *, tail: int = 100,
                   follow: bool = False) -> AsyncGenerator[bytes, None]:
        """The output kept when earlier containers of ``alloc`` were removed, then
        ``docker logs`` of its container (stdout and stderr interleaved): the last
        ``tail`` lines of both together, as the process driver's one log file
        gives them. Without a container, the kept output alone (``follow`` then
        ends after it).

        Raises:
            DriverError: ``alloc`` has no container on this node and no kept output.
        """
        assert tail >= 0

        def open_logs() -> tuple[Any, int] | None:
            container = self._get(alloc)
            if container is None:
                return None
            recent = container.logs(tail=tail)
            lines = recent.count(b"\n")
            if follow:  # the same tail again, then what comes
                return container.logs(tail=tail, stream=True, follow=True), lines
            return recent, lines

        try:
            opened = await self._call(open_logs)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"cannot read the logs of allocation {alloc}", exc) from None
        if opened is None or opened[1] < tail:
            # Earlier containers' output first (whatever of the tail this one's lacks).
            earlier = tail - (opened[1] if opened is not None else 0)
            kept = await trio.to_thread.run_sync(self._read_kept, alloc, earlier)
            if opened is None and kept is None:
                raise DriverError(f"no logs of allocation {alloc} on node {self._node}; it "
                                  "never ran here or its logs were pruned")
            if kept:
                yield kept
        if opened is None:
            return
        logs = opened[0]
        if not follow:
            if logs:
                yield logs
            return
        stream = logs
        try:
            while True:
                chunk = await trio.to_thread.run_sync(
                    next, stream, None, abandon_on_cancel=True, limiter=self._stream_limiter)
                if chunk is None:
                    return
                yield chunk
        finally:
            stream.close()

    async def exec(self, alloc: AllocId, argv: Sequence[str],
                   timeout_s: float) -> tuple[int, bytes]:
        """``docker exec`` ``argv`` in the container; 124 on timeout.

        Docker cannot kill an exec'd process: after a timeout it is left to finish in
        the container, and only the connection reading its output is closed.

        Raises:
            DriverError: ``alloc`` is not running here, or ``argv`` is empty.
        """
        if not argv:
            raise DriverError(f"empty exec command for allocation {alloc}")
        api = self._client.api

        def open_exec() -> tuple[str, Any, socket.socket]:
            container = self._get(alloc)
            if container is None or container.status != "running":
                raise DriverError(f"allocation {alloc} is not running on node {self._node}")
            exec_id = api.exec_create(container.id, list(argv), stdout=True,
                                      stderr=True)["Id"]
            # The raw connection: the SDK's own stream leaks it when closed early.
            sock_io = api.exec_start(exec_id, socket=True)
            return exec_id, sock_io, getattr(sock_io, "_sock", sock_io)

        try:
            exec_id, sock_io, raw = await self._call(open_exec)
        except docker.errors.DockerException as exc:
            raise self._api_error(f"cannot exec in allocation {alloc}", exc) from None
        try:
            with trio.move_on_after(timeout_s):
                output: bytes = await trio.to_thread.run_sync(
                    _drain_exec, sock_io, raw, abandon_on_cancel=True,
                    limiter=self._stream_limiter)
                info = await self._call(api.exec_inspect, exec_id)
                code = info.get("ExitCode")
                return (int(code) if code is not None else 126), output
            return 124, b"timed out"
        except (docker.errors.DockerException, OSError) as exc:
            raise self._api_error(f"cannot exec in allocation {alloc}", exc) from None
        finally:
            # After a timeout this ends the reading thread, which closes the socket.
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)


def _drain_exec(sock_io: Any, raw: socket.socket) -> bytes:
    """Runs in a thread: read an exec's multiplexed output to the end (or until the
    socket is shut down), keep the first :data:`EXEC_OUTPUT_MAX_BYTES`, close it."""
    output = bytearray()
    try:
        for _, data in docker.utils.socket.frames_iter(sock_io, False):
            output += data[:EXEC_OUTPUT_MAX_BYTES - len(output)]
    finally:
        sock_io.close()
        raw.close()
    return bytes(output)


def _pump_blocking(stream: Any, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
    """Runs in a thread: forward decoded docker events until the stream ends or the
    trio side goes away (closed channel, cancelled, or finished run)."""
    try:
        for event in stream:
            trio.from_thread.run(send.send, event)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError,
            trio.Cancelled):
        return
    except (OSError, docker.errors.DockerException, requests.exceptions.RequestException,
            urllib3.exceptions.HTTPError) as exc:
        # The engine went away mid-stream; the caller reconnects.
        LOGGER.debug("docker_events_broken reason=%r", exc)


# ---------------------------------------------------------------------------
# Choosing a driver
# ---------------------------------------------------------------------------


def _docker_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _docker_connect() -> docker.DockerClient:
    """Ping the engine the environment names (``DOCKER_HOST`` or the default socket)
    within :data:`DOCKER_PING_TIMEOUT_S`, then return a client for real work.

    Raises:
        docker.errors.DockerException: no engine answers.
    """
    address = _docker_address()
    if address.startswith("unix://"):
        # The SDK leaks its socket when a unix connect fails (a ResourceWarning);
        # try the socket first so that "no engine" never reaches the SDK.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(DOCKER_PING_TIMEOUT_S)
            try:
                sock.connect(address.removeprefix("unix://"))
            except OSError as exc:
                raise docker.errors.DockerException(
                    f"cannot connect: {exc.strerror or exc}") from None
    probe = docker.from_env(timeout=int(DOCKER_PING_TIMEOUT_S))
    try:
        probe.ping()
        version = probe.api.api_version
    finally:
        probe.close()
    return docker.from_env(version=version, timeout=int(DOCKER_API_TIMEOUT_S))


async def open_driver(kind: str, *, state_dir: Path, node: NodeId, host: str,
                      wall_clock: Callable[[], float], dns_servers: Sequence[str] = (),
                      docker_pull: bool = False) -> Driver:
    """Make the driver ``meshd start --driver KIND`` asks for.

    Args:
        kind: ``"auto"`` (docker if an engine answers a ping within
            :data:`DOCKER_PING_TIMEOUT_S`, else process), ``"docker"`` or ``"process"``.
        state_dir: the driver's directory: the process driver's workloads, the docker
            driver's output of removed containers.
        node: this node's name.
        host: the address workloads bind.
        wall_clock: wall-clock seconds.
        dns_servers: the name servers of containers (docker).
        docker_pull: let the docker driver pull missing images.

    Raises:
        DriverError: ``kind`` is unknown, or ``"docker"`` and no engine answers.
    """
    if kind not in ("auto", "docker", "process"):
        raise DriverError(f"unknown driver {kind!r}; use --driver auto, docker or process")
    if kind in ("auto", "docker"):
        try:
            client = await trio.to_thread.run_sync(_docker_connect)
        except docker.errors.DockerException as exc:
            where = _docker_address()
            if kind == "docker":
                raise DriverError(
                    f"no Docker engine answers at {where} ({exc}); start dockerd "
                    "(scripts/docker-setup does on Debian), set DOCKER_HOST, or start meshd "
                    "with --driver process") from None
            LOGGER.info("driver_selected node=%s driver=process reason=%r", node,
                        f"no Docker engine answers at {where}: {exc}")
        else:
            LOGGER.info("driver_selected node=%s driver=docker reason=%r", node,
                        "requested" if kind == "docker" else "a Docker engine answered")
            return DockerDriver(client, node, host, wall_clock, dns_servers, docker_pull,
                                owns_client=True, state_dir=state_dir)
    else:
        LOGGER.info("driver_selected node=%s driver=process reason=requested", node)
    return ProcessDriver(state_dir, node, host, wall_clock)
