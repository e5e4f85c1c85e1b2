"""The node's reconciler core: desired allocations plus what runs give actions.

Theory of operation
===================

Every node runs the same loop (Kubernetes' kubelet and Nomad's client do the same
job): read the allocations committed for this node, look at what the driver runs,
and act so the two agree. This module is the decision part, pure and synchronous
(STYLE 1.1); :mod:`mesh.node.agent` performs the actions with the driver and the
probes and feeds the results back.

Inputs, each call of :meth:`Reconciler.step`:

* ``wants``: the allocations on this node that should run, with the spec of their
  generation;
* ``stops``: the allocations on this node that should stop;
* ``actual``: what the driver reports (running or exited), by allocation id;
* ``now`` (monotonic, for backoff and probes) and ``wall`` (wall-clock seconds, only
  for the ``since`` shown to people).

Results of actions come back through :meth:`started`, :meth:`start_failed`,
:meth:`stopped`, :meth:`removed` and :meth:`probed`.

Rules:

1. A wanted allocation that does not run is started, unless it is waiting for a
   restart backoff, has given up (``failed``), completed (a job), or another
   allocation of the same slot (the one it replaces) still runs here: replacements
   are stop-first, so a fixed host port is free when the new one starts.
2. A workload whose allocation is not wanted (stopping, dropped, or unknown: it ran
   before a partition or a restart and was moved away meanwhile) is stopped and
   removed. This is how a node that comes back gives up what was moved away.
3. An exit is counted once by the restart backoff (:class:`RestartBackoff`): it
   decides whether and when to restart, and when to give up. A job that exits 0 is
   complete. The exited workload is removed from the driver right away (its logs
   stay).
4. A running workload with a health check is probed on the tracker's schedule
   (never two probes at once); when the liveness check fails ``retries`` times, the
   workload is stopped and restarted through the backoff. A readiness-only check
   only changes what is reported (DNS serves ready endpoints only).
5. Self-fencing: a spec with ``stop_after_disconnect_s`` stops its replicas once the
   node has been cut off from the Raft leader that long (Nomad's ``stop_after``);
   they start again when the node is back in touch.
6. Adoption: after a restart of meshd, workloads the driver still runs are taken
   over as they are (not restarted).

Every allocation's observed state is reported (:meth:`take_reports`) when it
changes; the agent sends the batch to the leader and hands back what it could not
deliver (:meth:`requeue`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from mesh.node.health import Health, HealthTracker, RestartBackoff
from mesh.node.spec import HealthSpec, WorkloadSpec
from mesh.raft.state import AllocRecord, Report
from mesh.types import AllocId, NodeId, ServiceId

if TYPE_CHECKING:
    from mesh.node.driver import Workload

LOGGER = logging.getLogger(__name__)

DEFAULT_STOP_GRACE_S = 10.0
"""Grace of a workload stopped whose spec is unknown (no allocation at all)."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start ``alloc`` with ``spec``."""

    alloc: AllocRecord
    spec: WorkloadSpec


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the workload of ``alloc`` (SIGTERM, then SIGKILL after ``grace_s``)."""

    alloc: AllocId
    grace_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Remove:
    """Make the driver forget the exited workload of ``alloc``."""

    alloc: AllocId


@dataclass(frozen=True, slots=True)
class Probe:
    """Run one health probe of ``alloc``."""

    alloc: AllocId
    check: HealthSpec
    ports: Mapping[str, int]
    run: int
    """Which run of the workload it probes: a result that arrives after the workload
    restarted is ignored (it says nothing about the new run)."""


Action: TypeAlias = Start | Stop | Remove | Probe


@dataclass(slots=True)
class _Local:
    """What this node remembers about one wanted allocation."""

    backoff: RestartBackoff
    phase: str = "idle"
    """idle, starting, running, stopping (for a restart), backoff, failed, complete."""
    health: HealthTracker | None = None
    probing: bool = False
    restart_at: float | None = None
    started_at: float = 0.0
    message: str = ""
    ports: tuple[tuple[str, int], ...] = ()
    since: float = 0.0
    generation: int = 0
    seen_exit: str = ""
    """The ref of the exited workload already counted (an exit counts once)."""
    run: int = 0
    """Counts the runs this node took over (started or adopted)."""
    stop_pending: bool = False
    """A liveness stop is in flight."""


@dataclass(slots=True)
class _Reported:
    state: str
    health: str
    ports: tuple[tuple[str, int], ...]
    message: str
    restarts: int
    since: float = field(default=0.0, compare=False)


class Reconciler:
    """Decides this node's start, stop, remove and probe actions (module docstring).

    Args:
        node: this node's id (for log lines).
        rng: jitter of restart backoffs.
    """

    def __init__(self, node: NodeId, rng: random.Random) -> None:
        self._node = node
        self._rng = rng
        self._local: dict[AllocId, _Local] = {}
        self._stopping: set[AllocId] = set()
        """Unwanted workloads with a stop in flight."""
        self._removing: set[AllocId] = set()
        self._reported: dict[AllocId, _Reported] = {}
        self._outbox: dict[AllocId, Report] = {}

    # ------------------------------------------------------------------ the step

    def step(self, wants: Mapping[AllocId, tuple[AllocRecord, WorkloadSpec]],
             stops: Iterable[AllocRecord], actual: Mapping[AllocId, Workload],
             now: float, wall: float, *, disconnected_s: float = 0.0,
             stop_grace: Mapping[AllocId, float] | None = None) -> list[Action]:
        """One pass: the actions to take now (see the module docstring).

        Args:
            wants: allocations of this node to run, with their spec.
            stops: allocations of this node to stop.
            actual: the driver's workloads by allocation.
            now: monotonic seconds.
            wall: wall-clock seconds (reported ``since``).
            disconnected_s: how long this node has been out of touch with the
                Raft leader (0 when in touch).
            stop_grace: the ``stop_grace_s`` of stopping allocations whose spec is
                known (others get :data:`DEFAULT_STOP_GRACE_S`).
        """
        actions: list[Action] = []
        fenced: dict[AllocId, str] = {}
        for aid, (_, spec) in wants.items():
            limit = spec.stop_after_disconnect_s
            if limit is not None and disconnected_s > limit:
                fenced[aid] = (f"stopped: cut off from the cluster for {disconnected_s:.0f}s "
                               f"(stop_after_disconnect {limit:g}s)")
        live_wants = {a: w for a, w in wants.items() if a not in fenced}

        # Rule 2: what runs but is not wanted stops, then is removed.
        busy_slots: set[tuple[ServiceId, int]] = set()
        for aid, w in actual.items():
            if aid in live_wants:
                continue
            if w.state == "running":
                busy_slots.add((w.service, self._slot_of(aid, wants, stops)))
                if aid not in self._stopping:
                    self._stopping.add(aid)
                    reason = fenced.get(aid) or "no longer allocated to this node"
                    grace = wants[aid][1].stop_grace_s if aid in wants else \
                        (stop_grace or {}).get(aid, DEFAULT_STOP_GRACE_S)
                    LOGGER.info("workload_stopping node=%s alloc=%s reason=%s",
                                self._node, aid, reason)
                    actions.append(Stop(aid, grace, reason))
            elif aid not in self._removing:
                self._removing.add(aid)
                actions.append(Remove(aid))
        for aid in list(self._stopping):
            if aid not in actual or actual[aid].state != "running":
                self._stopping.discard(aid)
        for aid in list(self._removing):
            if aid not in actual:
                self._removing.discard(aid)

        for alloc in stops:
            gone = actual.get(alloc.id)
            if gone is None or gone.state != "running":
                self._report(alloc.id, "stopped", "none", (), "stopped", 0, wall)
        for aid, why in fenced.items():
            local = self._local.get(aid)
            if local is not None and local.phase in ("running", "stopping", "backoff"):
                # stopped by rule 2 as unwanted; starts afresh once back in touch
                local.phase = "idle"
                local.health = None
                local.probing = False
            if local is not None and local.phase in ("failed", "complete"):
                continue  # nothing runs; what it reported stays true
            if aid not in actual or actual[aid].state != "running":
                self._report(aid, "stopped", "none", (), why, 0, wall)

        for aid, (alloc, spec) in live_wants.items():
            actions.extend(self._want(alloc, spec, actual.get(aid), busy_slots, now, wall))

        for aid in list(self._local):
            if aid not in wants:
                del self._local[aid]
        for aid in list(self._reported):
            if aid not in wants and all(s.id != aid for s in stops) and aid not in actual:
                del self._reported[aid]
        return actions

    @staticmethod
    def _slot_of(aid: AllocId, wants: Mapping[AllocId, tuple[AllocRecord, WorkloadSpec]],
                 stops: Iterable[AllocRecord]) -> int:
        for s in stops:
            if s.id == aid:
                return s.slot
        # unknown allocation: its id says its slot (<service>-<slot>-<n>)
        parts = aid.rsplit("-", 2)
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1

    def _want(self, alloc: AllocRecord, spec: WorkloadSpec, w: Workload | None,
              busy: set[tuple[ServiceId, int]], now: float, wall: float) -> list[Action]:
        local = self._local.get(alloc.id)
        if local is None:
            local = self._local[alloc.id] = _Local(RestartBackoff(spec.restart, self._rng),
                                                   since=wall, generation=alloc.generation)
        actions: list[Action] = []

        if w is not None and w.state == "running":
            if local.phase in ("idle", "starting", "backoff"):
                # started by us, or adopted after a meshd restart
                local.phase = "running"
                local.run += 1
                local.started_at = now
                local.ports = tuple(sorted(w.ports.items()))
                local.health = HealthTracker(spec.health, now) if spec.health else None
                local.message = w.message  # e.g. a limit the driver could not enforce
                local.since = w.started_at if w.started_at > 0 else wall  # adopted: kept
            if local.phase == "stopping" and not local.stop_pending:
                # a liveness stop: sent again until the workload is gone
                local.stop_pending = True
                actions.append(Stop(alloc.id, spec.stop_grace_s, local.message))
            if local.phase == "running":
                tracker = local.health
                if tracker is not None and tracker.wants_restart:
                    local.phase = "stopping"
                    local.message = f"unhealthy: {tracker.last_detail}"
                    LOGGER.warning("workload_unhealthy node=%s alloc=%s detail=%s",
                                   self._node, alloc.id, tracker.last_detail)
                    local.stop_pending = True
                    actions.append(Stop(alloc.id, spec.stop_grace_s, local.message))
                elif tracker is not None and not local.probing \
                        and tracker.next_probe_at() <= now:
                    local.probing = True
                    tracker.probe_started(now)
                    assert spec.health is not None  # a tracker exists only with a check
                    actions.append(Probe(alloc.id, spec.health, dict(local.ports),
                                         local.run))
            self._report_local(alloc.id, local, wall)
            return actions

        if w is not None and local.phase == "starting":
            # our Start is in flight: a container between create and start looks
            # exited; what the start returns decides (and an exit is seen after it)
            self._report_local(alloc.id, local, wall)
            return actions
        if w is not None:  # exited
            if local.seen_exit != w.ref:
                local.seen_exit = w.ref
                self._count_exit(alloc, spec, local, w.exit_code, w.message, now, wall,
                                 unhealthy=local.phase == "stopping")
            if alloc.id not in self._removing:
                self._removing.add(alloc.id)
                actions.append(Remove(alloc.id))
            self._report_local(alloc.id, local, wall)
            return actions

        # not running at all
        if local.phase in ("running", "stopping"):  # vanished without an exit we saw
            self._count_exit(alloc, spec, local, None, "disappeared", now, wall,
                             unhealthy=local.phase == "stopping")
        if local.phase == "backoff" and local.restart_at is not None and now < local.restart_at:
            self._report_local(alloc.id, local, wall)
            return actions
        if local.phase in ("failed", "complete", "starting"):
            self._report_local(alloc.id, local, wall)
            return actions
        if (alloc.service, alloc.slot) in busy:
            local.message = "waiting for the replica it replaces to stop"
            self._report_local(alloc.id, local, wall)
            return actions
        local.phase = "starting"
        local.since = wall
        local.message = ""
        self._report_local(alloc.id, local, wall)
        actions.append(Start(alloc, spec))
        return actions

    def _count_exit(self, alloc: AllocRecord, spec: WorkloadSpec, local: _Local,
                    exit_code: int | None, message: str, now: float, wall: float, *,
                    unhealthy: bool = False) -> None:
        ran = max(0.0, now - local.started_at)
        local.health = None
        local.probing = False
        local.stop_pending = False
        local.since = wall
        if spec.kind == "job" and exit_code == 0 and not unhealthy:
            local.phase = "complete"
            local.message = "completed"
            return
        what = message or (f"exited with status {exit_code}" if exit_code is not None
                           else "exited")
        if unhealthy and local.message:
            what = local.message
        restart_at = local.backoff.record_exit(now, ran, exit_code, unhealthy=unhealthy)
        if restart_at is None:
            local.phase = "failed" if (local.backoff.gave_up or exit_code != 0) else "complete"
            reason = local.backoff.reason
            # the backoff only knows the exit status: keep the driver's words too
            local.message = reason if reason and what in reason else \
                "; ".join(x for x in (what, reason) if x)
            LOGGER.warning("workload_not_restarted node=%s alloc=%s reason=%s",
                           self._node, alloc.id, local.message)
            return
        local.phase = "backoff"
        local.restart_at = restart_at
        local.message = f"{what}; restarting in {max(0.0, restart_at - now):.1f}s"
        LOGGER.info("workload_exited node=%s alloc=%s detail=%s", self._node, alloc.id,
                    local.message)

    # ------------------------------------------------------------------ results

    def started(self, alloc: AllocId, workload: Workload, now: float, wall: float) -> None:
        """The driver started ``alloc``."""
        local = self._local.get(alloc)
        if local is None or local.phase != "starting":
            return
        local.phase = "idle"  # the next step sees it running and takes it over
        local.started_at = now  # an exit before that step ran from here
        local.ports = tuple(sorted(workload.ports.items()))

    def start_failed(self, alloc: AllocRecord, spec: WorkloadSpec, message: str, now: float,
                     wall: float) -> None:
        """The driver could not start ``alloc``: counts as a failed run."""
        local = self._local.get(alloc.id)
        if local is None:
            return
        local.started_at = now
        self._count_exit(alloc, spec, local, None, f"cannot start: {message}", now, wall)
        self._report_local(alloc.id, local, wall)

    def stopped(self, alloc: AllocId, now: float) -> None:
        """A stop finished, or failed (the next step sends it again if the workload
        still runs)."""
        self._stopping.discard(alloc)
        local = self._local.get(alloc)
        if local is not None:
            local.stop_pending = False

    def removed(self, alloc: AllocId) -> None:
        """A remove finished (or failed: the next step retries)."""
        self._removing.discard(alloc)

    def probed(self, alloc: AllocId, run: int, ok: bool, detail: str, now: float,
               wall: float) -> None:
        """A health probe of run ``run`` of ``alloc`` finished."""
        local = self._local.get(alloc)
        if local is None or local.health is None or local.run != run or not local.probing:
            return
        local.probing = False
        changed = local.health.record(ok, now, detail)
        if changed is not None:
            LOGGER.info("workload_health node=%s alloc=%s health=%s detail=%s", self._node,
                        alloc, changed.value, detail)
            self._report_local(alloc, local, wall)

    # ------------------------------------------------------------------ reports

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`step` has something to do without new input."""
        times = []
        for local in self._local.values():
            if local.phase == "backoff" and local.restart_at is not None:
                times.append(local.restart_at)
            if local.phase == "running" and local.health is not None and not local.probing:
                times.append(local.health.next_probe_at())
        return min(times) if times else None

    def _report_local(self, aid: AllocId, local: _Local, wall: float) -> None:
        state = {"idle": "starting", "starting": "starting", "running": "running",
                 "stopping": "running", "backoff": "exited", "failed": "failed",
                 "complete": "complete"}[local.phase]
        health = "none"
        if state == "running" and local.health is not None:
            health = local.health.health.value
        self._report(aid, state, health, local.ports if state == "running" else (),
                     local.message, local.backoff.attempts, local.since or wall)

    def _report(self, aid: AllocId, state: str, health: str, ports: tuple[tuple[str, int], ...],
                message: str, restarts: int, since: float) -> None:
        new = _Reported(state, health, ports, message[:500], restarts, since)
        if self._reported.get(aid) == new:
            return
        self._reported[aid] = new
        self._outbox[aid] = Report(aid, state, health, ports, new.message, restarts, since)

    def take_reports(self) -> list[Report]:
        """The allocations whose observed state changed since the last call."""
        out = [self._outbox[a] for a in sorted(self._outbox)]
        self._outbox.clear()
        return out

    def requeue(self, reports: Iterable[Report]) -> None:
        """Reports that could not be delivered: send them with the next batch (a newer
        report of the same allocation wins)."""
        for r in reports:
            self._outbox.setdefault(r.alloc, r)

    def health_of(self, alloc: AllocId) -> Health | None:
        """The current health of ``alloc`` (``None``: no check or not running)."""
        local = self._local.get(alloc)
        return local.health.health if local is not None and local.health is not None else None
