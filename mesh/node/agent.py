"""The node's workload loops: the reconciler (every node) and the planner (the leader).

:class:`Agent` drives :class:`~mesh.node.reconcile.Reconciler` with this node's
allocations from the local replica and the driver's view, performs its actions
(start, stop, remove, probe) concurrently, and sends what it observes to the leader
as batched :class:`~mesh.raft.state.AllocReport` commands.

:class:`Planner` runs on every node and acts while the node leads Raft: it asks the
:class:`~mesh.node.orchestrate.Orchestrator` for commands whenever the state or the
membership changes, proposes them one after the other, and waits for them to apply
before it asks again (so it never proposes the same change twice).

Resource handling:
    Both loops run in the node's nursery until cancelled; actions run in a nursery
    of the agent's own, so a cancelled agent cancels its in-flight actions.

Error handling:
    A driver error fails only that action: the reconciler hears about it (a failed
    start is a failed run, with backoff). Reports that cannot be delivered (no
    leader) are kept and sent with the next batch. The planner retries after a
    failed proposal.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Callable
from typing import Any

import trio

from mesh.errors import DriverError, MeshError, NotLeader, ProposalDropped, StorageError
from mesh.gossip.core import Membership
from mesh.node import probes
from mesh.node.driver import Driver, PortRequest, RunSpec, Workload
from mesh.node.orchestrate import Orchestrator, ServiceView, decode_services, node_infos, spec_for
from mesh.node.reconcile import Action, Probe, Reconciler, Remove, Start, Stop
from mesh.node.replica import Replica
from mesh.node.spec import WorkloadSpec
from mesh.raft.state import AllocRecord, AllocReport, Report, Table
from mesh.types import AllocId, NodeId, ServiceId

LOGGER = logging.getLogger(__name__)

POLL_S = 1.0
"""The agent looks at the driver at least this often (exits are also pushed)."""

REPORT_BATCH_S = 0.02
"""Reports within this window go to the leader as one command."""

PLAN_DEBOUNCE_S = 0.01
"""The planner waits this long after a change for more changes to arrive."""

PLAN_PERIOD_S = 2.0
"""The planner also decides this often without a change (update delays, safety)."""


class Wakeup:
    """A coalescing wake-up: any number of :meth:`set` calls between two waits wake
    the waiter once (a loop that recomputes everything needs no more)."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[None](1)

    def set(self) -> None:
        """Wake the waiter (now, or at its next wait)."""
        with contextlib.suppress(trio.WouldBlock):
            self._send.send_nowait(None)

    async def wait(self) -> None:
        """Wait until :meth:`set` was called since the last wait."""
        await self._recv.receive()


async def wake_on_changes(replica: Replica, tables: frozenset[Table], wake: Wakeup,
                          on_view: Callable[[], None] | None = None) -> None:
    """Set ``wake`` whenever a change of one of ``tables`` is applied on this node,
    by Raft or by the watch stream (a snapshot restore changes every table);
    ``on_view`` (leadership checks) runs at each wake-up of this task, which with
    ``on_view`` includes every change of the replica's view of the group (see
    :meth:`Replica.wait_changed`). Other changes (key-value writes) do not wake it.
    Runs until cancelled."""
    state = replica.state
    seen = state.applied_index
    while True:
        await replica.wait_changed(tables, view=on_view is not None)
        if on_view is not None:
            on_view()
        if any(state.last_change(t) > seen for t in tables):
            wake.set()
        seen = state.applied_index


async def wake_on_members(subscribe: Callable[[], trio.MemoryReceiveChannel[Any]],
                          wake: Wakeup) -> None:
    """Set ``wake`` on every membership event (and on every resubscription: a
    subscriber that fell behind is closed). Runs until cancelled."""
    while True:
        events = subscribe()
        async with events:
            wake.set()
            async for _ in events:
                wake.set()


def run_spec(alloc: AllocRecord, spec: WorkloadSpec, node: NodeId) -> RunSpec:
    """What the driver needs to start ``alloc``."""
    return RunSpec(
        alloc=alloc.id, service=alloc.service, version=alloc.generation,
        image=spec.image, command=spec.command, entrypoint=spec.entrypoint,
        env=dict(spec.env),
        ports=tuple(PortRequest(p.name, p.container_port, p.host_port, p.protocol)
                    for p in spec.ports),
        cpu_limit_millis=spec.cpu_limit_millis, memory_limit_bytes=spec.memory_limit_bytes,
        labels={**dict(spec.labels), "mesh.node": node}, stop_grace_s=spec.stop_grace_s)


class Agent:
    """Runs this node's allocations (see the module docstring).

    Args:
        replica: the node's replica (state to read, writes to forward).
        driver: the workload driver.
        host: the address workloads listen on (probes connect there).
        wall_clock: wall-clock seconds (for the ``since`` people see).
        rng: jitter of restart backoffs.
    """

    def __init__(self, replica: Replica, driver: Driver, host: str,
                 wall_clock: Callable[[], float], rng: random.Random) -> None:
        self._replica = replica
        self._driver = driver
        self._host = host
        self._wall = wall_clock
        self._me = replica.raft.me
        self._rec = Reconciler(self._me, rng)
        self._wake = Wakeup()
        self._reports_due = Wakeup()
        self._cache: dict[tuple[ServiceId, int], ServiceView] = {}
        self._specs: dict[AllocId, WorkloadSpec] = {}
        self._lost_leader_at: float | None = None
        self.workloads: dict[AllocId, Workload] = {}
        """What the driver reported last (read by the API)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Reconcile until cancelled: at each change of this node's services and
        allocations (tables ``SERVICE``, ``ALLOC``), when a lost leader is found
        again, at each driver event and action's end, and every :data:`POLL_S`."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wake_on_changes, self._replica,
                               frozenset({Table.SERVICE, Table.ALLOC}), self._wake,
                               self._check_leader)
            nursery.start_soon(self._follow_driver)
            nursery.start_soon(self._send_reports)
            task_status.started()
            # A restarted node's replica may be far behind the cluster: starting or
            # stopping workloads from it would undo what was re-placed meanwhile.
            await self._replica.wait_fresh()
            while True:
                await self._step(nursery)
                deadline = trio.current_time() + POLL_S
                nxt = self._rec.next_deadline()
                if nxt is not None:
                    deadline = min(deadline, nxt)
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    def _check_leader(self) -> None:
        """Note when this node loses and regains a leader (self-fencing); runs at
        every change of the replica's view (:attr:`Replica.leader` is part of it)."""
        leader = self._replica.leader
        if leader is None and self._lost_leader_at is None:
            self._lost_leader_at = trio.current_time()
        elif leader is not None and self._lost_leader_at is not None:
            self._lost_leader_at = None
            self._wake.set()

    async def _follow_driver(self) -> None:
        while True:
            await self._driver.wait_changed()
            self._wake.set()

    def _desired(self) -> tuple[dict[AllocId, tuple[AllocRecord, WorkloadSpec]],
                                list[AllocRecord], dict[AllocId, float]]:
        state = self._replica.state
        views = decode_services(state, self._cache)
        wants: dict[AllocId, tuple[AllocRecord, WorkloadSpec]] = {}
        stops: list[AllocRecord] = []
        grace: dict[AllocId, float] = {}
        for alloc in state.allocs(node=self._me):
            view = views.get(alloc.service)
            spec = spec_for(view, alloc.generation) if view is not None else None
            if spec is not None:
                grace[alloc.id] = spec.stop_grace_s
            if alloc.desired != "run":
                stops.append(alloc)
                continue
            if spec is None:
                stops.append(alloc)  # its service or generation is gone: a plan will stop it
                continue
            wants[alloc.id] = (alloc, spec)
        return wants, stops, grace

    async def _step(self, nursery: trio.Nursery) -> None:
        try:
            listed = await self._driver.list()
        except DriverError as exc:
            LOGGER.error("driver_list_failed node=%s reason=%s; workloads are not "
                         "reconciled until the driver answers", self._me, exc)
            return
        self.workloads = {w.alloc: w for w in listed}
        wants, stops, grace = self._desired()
        self._specs = {aid: spec for aid, (_, spec) in wants.items()}
        now = trio.current_time()
        disconnected = 0.0 if self._lost_leader_at is None else now - self._lost_leader_at
        actions = self._rec.step(wants, stops, self.workloads, now, self._wall(),
                                 disconnected_s=disconnected, stop_grace=grace)
        for action in actions:
            nursery.start_soon(self._act, action)
        self._reports_due.set()

    async def _act(self, action: Action) -> None:
        try:
            if isinstance(action, Start):
                await self._start(action)
            elif isinstance(action, Stop):
                await self._stop(action)
            elif isinstance(action, Remove):
                await self._remove(action)
            else:
                await self._probe(action)
        except Exception:
            # A driver is a boundary to third-party code (the docker SDK raises
            # requests' errors when dockerd goes away): one failed action must not
            # take the node down. The reconciler retries on its next pass.
            LOGGER.exception("workload_action_failed node=%s action=%s; this is a bug in "
                             "the driver: please report it", self._me, type(action).__name__)
            self._unstick(action)
        finally:
            self._wake.set()

    def _unstick(self, action: Action) -> None:
        """Tell the reconciler an action ended without a result."""
        now = trio.current_time()
        if isinstance(action, Start):
            self._rec.start_failed(action.alloc, action.spec, "the driver failed", now,
                                   self._wall())
        elif isinstance(action, Stop):
            self._rec.stopped(action.alloc, now)
        elif isinstance(action, Remove):
            self._rec.removed(action.alloc)
        else:
            self._rec.probed(action.alloc, action.run, False, "the probe failed", now,
                             self._wall())

    async def _start(self, action: Start) -> None:
        alloc = action.alloc
        LOGGER.info("workload_starting node=%s alloc=%s service=%s generation=%d",
                    self._me, alloc.id, alloc.service, alloc.generation)
        try:
            workload = await self._driver.start(run_spec(alloc, action.spec, self._me))
        except DriverError as exc:
            LOGGER.warning("workload_start_failed node=%s alloc=%s reason=%s",
                           self._me, alloc.id, exc)
            self._rec.start_failed(alloc, action.spec, str(exc), trio.current_time(),
                                   self._wall())
            self._reports_due.set()
            return
        self._rec.started(alloc.id, workload, trio.current_time(), self._wall())

    async def _stop(self, action: Stop) -> None:
        try:
            await self._driver.stop(action.alloc, action.grace_s)
        except DriverError as exc:
            LOGGER.error("workload_stop_failed node=%s alloc=%s reason=%s; retrying",
                         self._me, action.alloc, exc)
        self._rec.stopped(action.alloc, trio.current_time())

    async def _remove(self, action: Remove) -> None:
        try:
            await self._driver.remove(action.alloc)
        except DriverError as exc:
            LOGGER.warning("workload_remove_failed node=%s alloc=%s reason=%s",
                           self._me, action.alloc, exc)
        self._rec.removed(action.alloc)

    async def _probe(self, action: Probe) -> None:
        spec = self._specs.get(action.alloc)
        order = spec.port_names() if spec is not None else ()
        ports = {n: action.ports[n] for n in order if n in action.ports}
        ports.update(action.ports)
        result = await probes.probe(
            action.check, host=self._host, ports=ports,
            exec_fn=functools.partial(self._driver.exec, action.alloc))
        self._rec.probed(action.alloc, action.run, result.ok, result.detail,
                         trio.current_time(), self._wall())
        self._reports_due.set()

    async def _send_reports(self) -> None:
        while True:
            await self._reports_due.wait()
            await trio.sleep(REPORT_BATCH_S)  # coalesce a burst into one command
            reports = self._rec.take_reports()
            if not reports:
                continue
            if not await self.report(reports):
                self._rec.requeue(reports)
                await trio.sleep(0.5)
                self._reports_due.set()

    async def report(self, reports: list[Report]) -> bool:
        """Send reports to the leader; False if they could not be committed."""
        try:
            await self._replica.write_command(AllocReport(self._me, tuple(reports)))
        except MeshError as exc:
            LOGGER.debug("alloc_report_deferred node=%s count=%d reason=%s", self._me,
                         len(reports), exc)
            return False
        return True


class Planner:
    """While this node leads, turns desired state into committed plans.

    Args:
        replica: the node's replica.
        core: membership (the live nodes).
        adapter_subscribe: returns a receive channel of membership events.
    """

    def __init__(self, replica: Replica, core: Membership,
                 adapter_subscribe: Callable[[], trio.MemoryReceiveChannel[Any]]) -> None:
        self._replica = replica
        self._core = core
        self._subscribe = adapter_subscribe
        self._wake = Wakeup()
        self._led = replica.raft.is_leader
        self.orchestrator = Orchestrator()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Plan until cancelled (idle while not the leader): at each change of the
        tables the orchestrator reads (``SERVICE``, ``ALLOC``, ``NODE``), at each
        membership event, when this node starts leading, and every
        :data:`PLAN_PERIOD_S` (or the orchestrator's next deadline)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wake_on_members, self._subscribe, self._wake)
            nursery.start_soon(wake_on_changes, self._replica,
                               frozenset({Table.SERVICE, Table.ALLOC, Table.NODE}), self._wake,
                               self._check_leadership)
            task_status.started()
            while True:
                if self._replica.raft.is_leader:
                    await self._plan_once()
                deadline = trio.current_time() + PLAN_PERIOD_S
                nxt = self.orchestrator.next_deadline(self._replica.state)
                if nxt is not None:
                    deadline = min(deadline, nxt)
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                    await trio.sleep(PLAN_DEBOUNCE_S)

    def _check_leadership(self) -> None:
        """Wake the planner when this node starts or stops leading; runs at every
        change of the replica's view (the Raft role is part of it)."""
        if self._replica.raft.is_leader != self._led:
            self._led = self._replica.raft.is_leader
            self._wake.set()

    async def _plan_once(self) -> None:
        state = self._replica.state
        overrides = {o.node: o for o in state.node_overrides()}
        nodes = node_infos(self._core.members(), overrides)
        commands = self.orchestrator.decide(state, nodes, trio.current_time())
        for command in commands:
            try:
                await self._replica.raft.propose(command.encode())
            except (NotLeader, ProposalDropped, StorageError) as exc:
                LOGGER.info("plan_not_committed node=%s reason=%s; planning again",
                            self._replica.raft.me, exc)
                return
        if commands:
            LOGGER.debug("plan_committed node=%s commands=%d", self._replica.raft.me,
                         len(commands))
