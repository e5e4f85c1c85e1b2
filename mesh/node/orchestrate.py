"""The leader's orchestration core: desired state plus live nodes give plan commands.

Theory of operation
===================

DESIGN's flow: a spec is committed, then "the leader runs placement over (spec, live
members from SWIM, current allocations)" and commits the plan. This module is that
step, pure: :meth:`Orchestrator.decide` reads the replicated :class:`MeshState` and
the nodes as the leader sees them and returns the commands to propose
(:class:`AllocPlan`, :class:`ServiceRollout`, and for an automatic rollback a
:class:`ServicePut`). The leader's loop (:mod:`mesh.node.agent`) proposes them,
waits for them to apply, and asks again; since a decision is computed only from
committed state, a new leader simply carries on where the old one stopped.

One decision:

1. Placement. The scheduler (:mod:`mesh.placement`) gets every service's placement
   spec, the nodes, and the current assignment read from the allocations that should
   run, so that a replica stays where it is while that is still feasible and a dead
   node's replicas, and only those, move.
2. Diff. For each slot (or, for a global service, each node): no allocation yet, a
   ``run``; placed elsewhere now, the old allocation stops (or is dropped at once when
   its node is dead: nobody is there to stop it, and a node that comes back stops
   whatever it runs without an allocation) and a new one runs on the new node; no
   longer placed (scaled down, service deleted, constraint no longer met), a
   ``stop``. Extra allocations of the same slot (a partition healed) are stopped:
   the one kept is the newest generation, then the lowest id, the same choice on
   every leader.
3. Rolling update. Allocations of an older generation on the right node are
   replaced in place, ``update.parallelism`` at a time (0: all at once): a new batch
   starts only when the previous one is running and healthy and ``update.delay_s``
   has passed. A replacement that fails (gave up restarting, or was restarted while
   the update waited for it) triggers ``update.failure_action``: ``pause`` records
   the rollout as paused (``meshctl update`` or ``rollback`` moves it on),
   ``rollback`` puts the previous spec back as a new generation, ``continue``
   ignores it.
4. Garbage. A stopping allocation is dropped once its node reports it stopped (or
   exited, failed, complete), or its node is dead or unknown.

A job (``kind: job``) slot whose allocation completed is left alone: it ran.

Determinism: the same state, nodes and ``now`` give the same commands. The only
memory kept between calls is the time of each service's last update batch (for
``update.delay_s``), which a new leader rebuilds as "no batch yet".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mesh.errors import ConfigError, MeshError
from mesh.gossip.core import MemberView
from mesh.gossip.messages import Meta, Status
from mesh.node.config import RESERVED_LABEL_PREFIX
from mesh.node.spec import WorkloadSpec
from mesh.placement import (
    Availability,
    Constraint,
    NodeInfo,
    NodeState,
    Op,
    PlacementConfig,
    Plan,
    Resources,
    Scheduler,
    ServiceSpec,
)
from mesh.raft.state import (
    MAX_PLAN_OPS,
    AllocPlan,
    AllocRecord,
    Command,
    DropOp,
    MeshState,
    NodeOverride,
    PlanOp,
    RunOp,
    ServicePut,
    ServiceRecord,
    ServiceRollout,
    StopOp,
)
from mesh.types import NodeId, ServiceId

LOGGER = logging.getLogger(__name__)

DRIVER_LABEL = "meshd.driver"
"""The label through which a node announces its workload driver in its gossip
metadata; the scheduler sees it as the attribute ``node.driver``."""

STATE_LEVEL_LABEL = "meshd.state"
"""The label through which a node announces the state commands it applies
(:data:`mesh.raft.state.STATE_LEVEL`)."""


def user_labels(meta: Meta) -> dict[str, str]:
    """A member's labels without meshd's own (``meshd.*``: driver, state level)."""
    return {k: v for k, v in meta.labels if not k.startswith(RESERVED_LABEL_PREFIX)}

FINISHED_STATES = frozenset({"stopped", "exited", "complete", "failed"})
"""Reported states in which a stopping allocation is known not to run."""

_STATUS_TO_STATE = {
    Status.ALIVE: NodeState.ALIVE,
    Status.SUSPECT: NodeState.SUSPECT,
    Status.DEAD: NodeState.DEAD,
    Status.LEFT: NodeState.LEFT,
}


def node_infos(members: Iterable[MemberView],
               overrides: Mapping[NodeId, NodeOverride]) -> list[NodeInfo]:
    """The nodes as the scheduler sees them: SWIM's view plus the operator's overrides.

    Labels set with ``meshctl node label`` replace the node's own; a drained node
    is ``DRAIN``. The node's driver becomes the attribute ``driver`` (so a spec that
    names a driver can only land where that driver runs), its role ``role``.
    """
    out = []
    for m in members:
        labels = user_labels(m.meta)
        driver = m.meta.labels_dict.get(DRIVER_LABEL, "")
        override = overrides.get(m.node)
        if override is not None and override.labels:
            labels = dict(override.labels)
        attributes = {"hostname": m.node, "role": m.meta.role}
        if driver:
            attributes["driver"] = driver
        out.append(NodeInfo(
            id=m.node,
            labels=labels,
            attributes=attributes,
            capacity=Resources(m.meta.cpu_millis, m.meta.memory_bytes),
            state=_STATUS_TO_STATE[m.status],
            availability=Availability.DRAIN if override is not None and override.drain
            else Availability.ACTIVE,
        ))
    return out


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A service's record with its decoded specs (the current and the previous one)."""

    record: ServiceRecord
    spec: WorkloadSpec
    previous: WorkloadSpec | None


def decode_services(state: MeshState, cache: dict[tuple[ServiceId, int], ServiceView] | None = None
                    ) -> dict[ServiceId, ServiceView]:
    """Decode every service's spec; a spec that does not decode (written by a newer
    meshd) is left out with a warning, so its allocations are left as they are.

    Args:
        state: the replicated state.
        cache: decoded views by ``(name, version)``, reused and refreshed in place.
    """
    out: dict[ServiceId, ServiceView] = {}
    for rec in state.services():
        key = (rec.name, rec.version)
        view = cache.get(key) if cache is not None else None
        if view is None or view.record != rec:
            try:
                spec = WorkloadSpec.decode(rec.spec)
                previous = WorkloadSpec.decode(rec.previous) if rec.previous else None
            except MeshError as exc:
                LOGGER.warning("service_spec_unreadable service=%s version=%d reason=%s; "
                               "upgrade this meshd", rec.name, rec.version, exc)
                continue
            view = ServiceView(rec, spec, previous)
        out[rec.name] = view
    if cache is not None:
        cache.clear()
        cache.update({(v.record.name, v.record.version): v for v in out.values()})
    return out


def spec_for(view: ServiceView, generation: int) -> WorkloadSpec | None:
    """The spec an allocation of ``generation`` runs, if it is still known."""
    if generation == view.record.generation:
        return view.spec
    if generation == view.record.previous_generation:
        return view.previous
    return None


def driver_of(spec: WorkloadSpec) -> str:
    """The driver a spec needs: the one it names, or the one its fields imply (an
    image without a command: docker; a command without an image: process), or
    ``""`` when either would do."""
    if spec.driver:
        return spec.driver
    if spec.image and not spec.command:
        return "docker"
    if spec.command and not spec.image:
        return "process"
    return ""


def placement_spec(spec: WorkloadSpec) -> ServiceSpec:
    """What ``spec`` asks of the scheduler, with the driver it needs as a constraint.

    Raises:
        ConfigError: the scheduler refuses the spec.
    """
    base = spec.placement()
    driver = driver_of(spec)
    if not driver:
        return base
    need = Constraint("node.driver", Op.EQ, (driver,))
    return dataclasses.replace(base, constraints=(*base.constraints, need))


def scheduler_for(views: Mapping[ServiceId, ServiceView],
                  allocs: Mapping[ServiceId, Sequence[AllocRecord]],
                  nodes: Sequence[NodeInfo], config: PlacementConfig | None = None
                  ) -> Scheduler:
    """The scheduler over every service, with the allocations that should run as
    the current assignment (a replica stays where it is while that is feasible).

    The leader plans with it; any node rebuilds the same one to explain a placement
    or a pending replica (same inputs, same answer).
    """
    specs = []
    current: dict[ServiceId, Sequence[NodeId | None]] = {}
    for name, view in views.items():
        try:
            specs.append(placement_spec(view.spec))
        except ConfigError as exc:
            LOGGER.warning("service_unplaceable service=%s reason=%s", name, exc)
            continue
        running = [a for a in allocs.get(name, ()) if a.desired == "run"]
        if view.spec.mode == "global":
            current[name] = [*sorted({a.node for a in running})]
        else:
            slots: list[NodeId | None] = [None] * view.spec.replicas
            for slot in range(view.spec.replicas):
                held = [a for a in running if a.slot == slot]
                if held:
                    slots[slot] = _pick(held).node
            current[name] = slots
    return Scheduler(specs, nodes, current, config=config)


def _pick(allocs: Sequence[AllocRecord]) -> AllocRecord:
    """The allocation of a slot that stays when there are several."""
    return sorted(allocs, key=lambda a: (-a.generation, len(a.id), a.id))[0]


class Orchestrator:
    """Computes the leader's plan commands; see the module docstring.

    Args:
        config: placement tunables (every leader must use the same).
    """

    def __init__(self, config: PlacementConfig | None = None) -> None:
        self._config = config or PlacementConfig()
        self._cache: dict[tuple[ServiceId, int], ServiceView] = {}
        self._last_batch: dict[tuple[ServiceId, int], float] = {}
        self._plan: Plan | None = None

    @property
    def last_plan(self) -> Plan | None:
        """The placement computed by the last :meth:`decide` (for explanations)."""
        return self._plan

    def decide(self, state: MeshState, nodes: Sequence[NodeInfo], now: float) -> list[Command]:
        """The commands that move the cluster toward its desired state (may be empty).

        Args:
            state: the committed state (the leader's replica).
            nodes: every node SWIM knows, with overrides (:func:`node_infos`).
            now: the leader's clock (for ``update.delay_s``).
        """
        views = decode_services(state, self._cache)
        by_service: dict[ServiceId, list[AllocRecord]] = {}
        for a in state.allocs():
            by_service.setdefault(a.service, []).append(a)
        alive = {n.id for n in nodes if n.state in (NodeState.ALIVE, NodeState.SUSPECT)}

        plan = scheduler_for(views, by_service, nodes, self._config).plan
        self._plan = plan

        ops: list[PlanOp] = []
        commands: list[Command] = []
        for name, view in views.items():
            if name not in plan.assignments:
                continue
            ops.extend(self._service_ops(view, plan.assignments[name],
                                         by_service.get(name, []), alive, now, commands))
        for name, allocs in by_service.items():
            if name not in views:  # deleted service: stop everything it has
                ops.extend(StopOp(a.id) for a in allocs if a.desired == "run")
        for allocs in by_service.values():
            for a in allocs:
                if a.desired == "stop" and (a.state in FINISHED_STATES or a.node not in alive):
                    ops.append(DropOp(a.id))
        plans: list[Command] = [AllocPlan(tuple(ops[i:i + MAX_PLAN_OPS]))
                                for i in range(0, len(ops), MAX_PLAN_OPS)]
        return plans + commands

    # ------------------------------------------------------------------ one service

    def _service_ops(self, view: ServiceView, assigned: Sequence[NodeId | None],
                     allocs: list[AllocRecord], alive: set[NodeId], now: float,
                     commands: list[Command]) -> list[PlanOp]:
        spec, rec = view.spec, view.record
        gen = rec.generation
        ops: list[PlanOp] = []
        running = [a for a in allocs if a.desired == "run"]

        def retire(a: AllocRecord) -> None:
            ops.append(StopOp(a.id) if a.node in alive else DropOp(a.id))

        keep: list[AllocRecord] = []
        if spec.mode == "global":
            for node in sorted(set(n for n in assigned if n is not None)):
                held = [a for a in running if a.node == node]
                if not held:
                    ops.append(RunOp(rec.name, -1, node, gen))
                    continue
                kept = _pick(held)
                keep.append(kept)
                ops.extend(StopOp(a.id) for a in held if a is not kept)
            placed = set(assigned)
            for a in running:
                if a.node not in placed:
                    retire(a)
        else:
            for slot, target in enumerate(assigned):
                held = [a for a in running if a.slot == slot]
                chosen: AllocRecord | None = _pick(held) if held else None
                for a in held:
                    if a is not chosen:
                        retire(a)
                if chosen is not None and spec.kind == "job" and chosen.state == "complete":
                    continue  # the job's slot ran to completion
                if target is None:
                    if chosen is not None:
                        retire(chosen)
                elif chosen is None:
                    ops.append(RunOp(rec.name, slot, target, gen))
                elif chosen.node != target:
                    retire(chosen)
                    ops.append(RunOp(rec.name, slot, target, gen))
                else:
                    keep.append(chosen)
            for a in running:
                if a.slot >= len(assigned) or a.slot < 0:
                    retire(a)
        ops.extend(self._rollout(view, keep, now, commands))
        return ops

    def _rollout(self, view: ServiceView, keep: list[AllocRecord], now: float,
                 commands: list[Command]) -> list[PlanOp]:
        """Replace allocations of older generations, a batch at a time."""
        spec, rec = view.spec, view.record
        gen = rec.generation
        outdated = [a for a in keep if a.generation < gen]
        fresh = [a for a in keep if a.generation == gen]
        in_flight = [a for a in fresh if not a.ready]
        failed = [a for a in fresh if a.state == "failed" or (a.restarts > 0 and not a.ready)]
        if not outdated:
            self._last_batch.pop((rec.name, gen), None)
            if rec.rollout in ("updating", "rolling_back") and not in_flight:
                done = "rolled_back" if rec.rollout == "rolling_back" else "completed"
                commands.append(ServiceRollout(rec.name, gen, done,
                                               f"{len(fresh)} replicas at generation {gen}"))
            return []
        if rec.rollout == "paused":
            return []
        policy = spec.update
        if failed and policy.failure_action != "continue":
            first = failed[0]
            why = (f"replica {first.id} on {first.node} failed at generation {gen}: "
                   f"{first.message or first.state}")
            if policy.failure_action == "rollback" and view.previous is not None \
                    and rec.rollout != "rolling_back":
                commands.append(ServicePut(rec.name, view.previous.encode(), restart=True,
                                           cas=rec.mod_index))
                commands.append(ServiceRollout(rec.name, gen + 1, "rolling_back",
                                               "rollback: " + why))
                LOGGER.warning("rollout_rolling_back service=%s generation=%d reason=%s",
                               rec.name, gen, why)
                return []
            commands.append(ServiceRollout(rec.name, gen, "paused", why + "; update paused"))
            LOGGER.warning("rollout_paused service=%s generation=%d reason=%s",
                           rec.name, gen, why)
            return []
        label = rec.rollout if rec.rollout in ("updating", "rolling_back") else "updating"
        message = f"{len(keep) - len(outdated)} of {len(keep)} replicas at generation {gen}"
        if rec.rollout_message.startswith("rollback: "):
            message = rec.rollout_message  # keep the reason visible until it completes
        if (rec.rollout, rec.rollout_message) != (label, message):
            commands.append(ServiceRollout(rec.name, gen, label, message))
        parallelism = policy.parallelism or len(outdated)
        budget = parallelism - len(in_flight)
        if budget <= 0:
            return []
        last = self._last_batch.get((rec.name, gen))
        if last is not None and now < last + policy.delay_s:
            return []
        ops: list[PlanOp] = []
        for a in sorted(outdated, key=lambda a: (a.slot, a.node, a.id))[:budget]:
            ops.append(StopOp(a.id))
            ops.append(RunOp(rec.name, a.slot, a.node, gen))
        self._last_batch[(rec.name, gen)] = now
        return ops

    def next_deadline(self, state: MeshState) -> float | None:
        """When a decision may change without any input changing (an update delay)."""
        times = []
        for (name, gen), last in self._last_batch.items():
            rec = state.service(name)
            view = self._cache.get((name, rec.version)) if rec is not None else None
            if view is not None and view.record.generation == gen and view.spec.update.delay_s:
                times.append(last + view.spec.update.delay_s)
        return min(times) if times else None
