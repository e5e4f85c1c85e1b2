"""An in-memory :class:`~mesh.node.driver.Driver` for agent tests (STYLE 1.3).

:class:`FakeDriver` keeps the same contract as the real drivers (the same errors for
the same bad input, ``wait_changed`` semantics, adoption across agent restarts:
reuse the instance, or seed it with :meth:`FakeDriver.adopt`) but runs nothing. Tests
decide what the "workloads" do through controls: :meth:`FakeDriver.exit`,
:meth:`FakeDriver.fail_next_start`, :meth:`FakeDriver.trap_sigterm`,
:meth:`FakeDriver.set_exec_result`, :meth:`FakeDriver.write_output`, and read the
history (:attr:`FakeDriver.started`, :attr:`FakeDriver.stopped`, ...).

It is deterministic: refs and picked ports come from counters, times from the
injected ``wall_clock``, and the only waits (start latency, a trapped SIGTERM's
grace, a slow exec) go through the injected ``sleep``, so on trio's
``autojump_clock`` (``sleep=trio.sleep``) tests can assert exact virtual times. The
module itself stays free of I/O imports; the change signal comes from
:mod:`mesh.node.driver`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from mesh.errors import DriverError
from mesh.node.driver import (
    ChangeSignal,
    RunSpec,
    Workload,
    check_ports,
    exit_message,
    port_in_use,
)
from mesh.types import AllocId, NodeId

SIGTERM_EXIT: int = 128 + 15
"""Exit status of a fake workload stopped by SIGTERM."""

SIGKILL_EXIT: int = 128 + 9
"""Exit status of a fake workload killed after its grace period."""


class TaskStatusLike(Protocol):
    """What :meth:`FakeDriver.serve` needs of ``trio.TaskStatus[None]``."""

    def started(self) -> None:
        """Report that the task is ready."""


class _IgnoredStatus:
    def started(self) -> None:
        """Nobody waits for it."""


TASK_STATUS_IGNORED: TaskStatusLike = _IgnoredStatus()
"""The default ``task_status`` of :meth:`FakeDriver.serve`."""


@dataclass(frozen=True, slots=True)
class ExecCall:
    """One call of :meth:`FakeDriver.exec`."""

    alloc: AllocId
    argv: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class _ExecResult:
    code: int
    output: bytes
    delay_s: float


class FakeDriver:
    """A driver whose workloads are records that tests control.

    Args:
        node: the node it pretends to run on (error messages, like the real ones).
        wall_clock: wall-clock seconds for ``started_at``/``finished_at``.
        sleep: how to wait (``trio.sleep``).
        name: what :attr:`name` reports (``"process"`` or ``"docker"``).
        start_latency_s: how long every :meth:`start` takes; may be changed later
            through the attribute of the same name.
        first_port: the first port handed out for ``host_port == 0``.
    """

    def __init__(self, node: NodeId, *, wall_clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]], name: str = "process",
                 start_latency_s: float = 0.0, first_port: int = 20_000) -> None:
        self.name = name
        self.start_latency_s = start_latency_s
        """Seconds every :meth:`start` takes (through ``sleep``)."""
        self._node = node
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._next_port = first_port
        self._next_ref = 1
        self._workloads: dict[AllocId, Workload] = {}
        self._start_failures: deque[str] = deque()
        self._trapped: set[AllocId] = set()
        self._exec_results: dict[AllocId, _ExecResult] = {}
        self._output: dict[AllocId, bytearray] = {}
        self._started: list[RunSpec] = []
        self._stopped: list[AllocId] = []
        self._removed: list[AllocId] = []
        self._exec_calls: list[ExecCall] = []
        self._changes = ChangeSignal()
        self._output_changes = ChangeSignal()
        self._seen = 0

    # -- history -------------------------------------------------------------

    @property
    def started(self) -> tuple[RunSpec, ...]:
        """Every spec :meth:`start` accepted, in order."""
        return tuple(self._started)

    @property
    def stopped(self) -> tuple[AllocId, ...]:
        """Every alloc :meth:`stop` stopped (running when asked), in order."""
        return tuple(self._stopped)

    @property
    def removed(self) -> tuple[AllocId, ...]:
        """Every alloc :meth:`remove` forgot, in order."""
        return tuple(self._removed)

    @property
    def exec_calls(self) -> tuple[ExecCall, ...]:
        """Every :meth:`exec` call, in order."""
        return tuple(self._exec_calls)

    # -- controls ------------------------------------------------------------

    def exit(self, alloc: AllocId, code: int, message: str = "") -> None:
        """Make the running workload ``alloc`` exit with ``code``.

        Args:
            alloc: a running workload.
            code: its exit status.
            message: the workload's message; default as the real drivers say it.
        """
        workload = self._workloads[alloc]
        assert workload.state == "running", f"{alloc} is not running"
        self._finish(alloc, code, message or exit_message(code))

    def fail_next_start(self, message: str) -> None:
        """Make the next :meth:`start` raise ``DriverError(message)`` (calls queue up)."""
        self._start_failures.append(message)

    def trap_sigterm(self, alloc: AllocId) -> None:
        """Make ``alloc`` ignore SIGTERM: :meth:`stop` waits the whole grace period and
        then kills it (exit status 137)."""
        self._trapped.add(alloc)

    def set_exec_result(self, alloc: AllocId, code: int, output: bytes = b"", *,
                        delay_s: float = 0.0) -> None:
        """What :meth:`exec` in ``alloc`` returns from now on (default ``(0, b"")``);
        with ``delay_s`` it takes that long, and times out if that is not shorter than
        its timeout."""
        self._exec_results[alloc] = _ExecResult(code, output, delay_s)

    def write_output(self, alloc: AllocId, data: bytes) -> None:
        """Append ``data`` to the output :meth:`logs` shows for ``alloc``."""
        self._output.setdefault(alloc, bytearray()).extend(data)
        self._output_changes.notify()

    def adopt(self, workload: Workload) -> None:
        """Add a workload as though a previous meshd had started it."""
        assert workload.alloc not in self._workloads, f"{workload.alloc} exists"
        self._workloads[workload.alloc] = workload
        self._changes.notify()

    # -- the Driver API ------------------------------------------------------

    async def serve(self, *, task_status: TaskStatusLike = TASK_STATUS_IGNORED) -> None:
        """Nothing to do in the background: report started and wait to be cancelled."""
        task_status.started()
        await self._sleep(math.inf)

    def _pick_ports(self, run: RunSpec) -> dict[str, int]:
        held = {(p, name) for w in self._workloads.values() if w.state == "running"
                for name, p in w.ports.items()}
        held_ports = {p for p, _ in held}
        ports: dict[str, int] = {}
        for request in run.ports:
            if request.host_port == 0:
                while self._next_port in held_ports:
                    self._next_port += 1
                ports[request.name] = self._next_port
                self._next_port += 1
            elif request.host_port in held_ports:
                raise port_in_use(request.host_port, request.protocol, self._node)
            else:
                ports[request.name] = request.host_port
            held_ports.add(ports[request.name])
        return ports

    async def start(self, run: RunSpec) -> Workload:
        """Wait ``start_latency_s``, then record ``run`` as running.

        Raises:
            DriverError: a queued :meth:`fail_next_start`, the alloc already running,
                bad port requests or a static port held by another fake workload.
        """
        if self.start_latency_s:
            await self._sleep(self.start_latency_s)
        if self._start_failures:
            raise DriverError(self._start_failures.popleft())
        old = self._workloads.get(run.alloc)
        if old is not None and old.state == "running":
            raise DriverError(f"allocation {run.alloc} is already running on node "
                              f"{self._node} ({old.ref}); stop it before starting it again")
        check_ports(run)
        ports = self._pick_ports(run)
        workload = Workload(alloc=run.alloc, service=run.service, version=run.version,
                            state="running", exit_code=None, ports=ports,
                            started_at=self._wall_clock(), finished_at=None,
                            ref=f"fake-{self._next_ref}")
        self._next_ref += 1
        self._trapped.discard(run.alloc)
        self._workloads[run.alloc] = workload
        self._started.append(run)
        self._changes.notify()
        return workload

    def _finish(self, alloc: AllocId, code: int | None, message: str) -> None:
        self._workloads[alloc] = replace(self._workloads[alloc], state="exited",
                                         exit_code=code, finished_at=self._wall_clock(),
                                         message=message)
        self._changes.notify()
        self._output_changes.notify()

    async def stop(self, alloc: AllocId, grace_s: float) -> None:
        """SIGTERM ends it at once (143), unless trapped: then SIGKILL after
        ``grace_s`` (137). Idempotent."""
        workload = self._workloads.get(alloc)
        if workload is None or workload.state != "running":
            return
        self._stopped.append(alloc)
        if alloc in self._trapped:
            await self._sleep(grace_s)
            if self._workloads[alloc].state == "running":
                self._finish(alloc, SIGKILL_EXIT, exit_message(SIGKILL_EXIT))
        else:
            self._finish(alloc, SIGTERM_EXIT, exit_message(SIGTERM_EXIT))

    async def remove(self, alloc: AllocId) -> None:
        """Forget an exited workload (its output stays, as the process driver's logs do).

        Raises:
            DriverError: it is still running.
        """
        workload = self._workloads.get(alloc)
        if workload is None:
            return
        if workload.state == "running":
            raise DriverError(f"allocation {alloc} is still running on node {self._node}; "
                              "stop it before removing it")
        del self._workloads[alloc]
        self._removed.append(alloc)

    async def list(self) -> list[Workload]:
        """Every workload not removed, in alloc order."""
        return [self._workloads[a] for a in sorted(self._workloads)]

    async def wait_changed(self) -> None:
        """Return once a workload started, stopped, exited or was adopted since the
        last call."""
        self._seen = await self._changes.wait_past(self._seen)

    async def logs(self, alloc: AllocId, *, tail: int = 100,
                   follow: bool = False) -> AsyncGenerator[bytes, None]:
        """The last ``tail`` lines written with :meth:`write_output`, then (``follow``)
        what is written next, until the workload is no longer running.

        Raises:
            DriverError: ``alloc`` never ran here.
        """
        if alloc not in self._output and alloc not in self._workloads:
            raise DriverError(f"no logs of allocation {alloc} on node {self._node}")
        data = bytes(self._output.get(alloc, b""))
        lines = data.splitlines(keepends=True)
        head = b"".join(lines[len(lines) - tail:]) if tail else b""
        if head:
            yield head
        offset = len(data)
        generation = self._output_changes.generation
        while follow:
            data = bytes(self._output.get(alloc, b""))
            if len(data) > offset:
                yield data[offset:]
                offset = len(data)
                continue
            workload = self._workloads.get(alloc)
            if workload is None or workload.state != "running":
                return
            generation = await self._output_changes.wait_past(generation)

    async def exec(self, alloc: AllocId, argv: Sequence[str],
                   timeout_s: float) -> tuple[int, bytes]:
        """The result set with :meth:`set_exec_result`; ``(124, b"timed out")`` when its
        delay is not shorter than ``timeout_s``.

        Raises:
            DriverError: ``alloc`` is not running, or ``argv`` is empty.
        """
        self._exec_calls.append(ExecCall(alloc, tuple(argv), timeout_s))
        if not argv:
            raise DriverError(f"empty exec command for allocation {alloc}")
        workload = self._workloads.get(alloc)
        if workload is None or workload.state != "running":
            raise DriverError(f"allocation {alloc} is not running on node {self._node}")
        result = self._exec_results.get(alloc, _ExecResult(0, b"", 0.0))
        if result.delay_s >= timeout_s:
            await self._sleep(timeout_s)
            return 124, b"timed out"
        if result.delay_s:
            await self._sleep(result.delay_s)
        return result.code, result.output
