"""The scheduler: deterministic consistent-hashing placement with constraints.

Theory of operation
-------------------

Placement is a pure function of (service specs, nodes, current allocations). The
same inputs give the same plan on any machine: every number that decides anything
comes from keyed blake2b (:mod:`mesh.placement.hashing`), inputs are put in a
canonical order before use, and no decision depends on ``hash()``, set order or the
order of the input sequences. :class:`Scheduler` keeps the working state so that a
change (a node dies) costs time in proportion to what it touches; :func:`place` is
``Scheduler(...).plan``, and every incremental update yields exactly the plan that
:func:`place` computes from the new inputs and the previous assignments (the tests
check this equivalence).

**Preference order.** Each node owns ``vnodes_per_node`` points on a 64-bit hash
ring. Replica slot ``i`` of service ``s`` hashes to a position; its preference
order is the nodes met walking clockwise from there: the first ``walk_steps``
points whose nodes pass the service's constraints, then every such node once, in
the order of a coarse ring with one point per node (this bounds the walk when the
near successors are full). Removing a node removes only its points, so only the
slots it held have to go anywhere; adding one inserts points, so a slot's order
changes only where the new node now comes first (Karger et al., "Consistent
Hashing and Random Trees", 1997). ``binpack`` services use one cluster-wide node
ranking instead, so the nodes that rank first fill up first.

**Feasibility.** A node is *hard-feasible* for a new replica when it is alive and
active, passes every constraint, has the cpu, memory and host ports free, holds
fewer than ``k`` replicas of the service, runs no anti-affine service and runs
every affine one. Two soft filters come on top: the spread quota (the replicas are
water-filled over the values of ``spread_over`` as evenly as the groups' node
counts allow) and the bounded-load cap, at most ``ceil((1 + eps) * R / N)`` replicas
of spread services per node (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing
with Bounded Loads", 2018; binpack and global replicas do not count; a service that
others have affinity to keeps room under the cap for them). A slot takes
the first node of its preference order at the best *level*: 0 both soft filters
hold, 1 outside the quota, 2 at the cap, 3 neither (the cap weighs more than the
quota: a node at the cap does not "allow" more). Only hard filters can leave a
replica unplaced.

**Rounds.** One update is one round: (1) every slot on a node that changed, or of
a service that changed, is taken off; (2) those slots are re-admitted where they
were, in canonical order, if their node still keeps replicas (alive or suspect, not
drained) and the hard filters still hold; (3) every slot without a node is placed,
in canonical order, against the state left by (2). The canonical order puts
affinity targets before their followers, followers right after them, then the
services whose constraints match the fewest nodes (the least choice), then ids;
slots go by index. Re-admission is node-local (it depends on the node and the
replicas placed there before in canonical order), which is why a round only needs
to revisit the affected nodes. Within a round the state only fills up, so a filter
a node fails stays failed; the walks use that to skip levels already proven empty
for a service, and a service left with unplaced slots is tried again in a later
round only if a node that could now take them changed (otherwise it would fail the
same way, and the result is the same as trying).

**Stability.** A replica stays on its node while that node keeps replicas and its
hard filters hold; the default ``k``, the quota and the cap shape only new
placements. So a node's loss moves exactly its replicas; a new node moves nothing
unless a rebalance is asked for. A rebalance moves a slot to a node that comes
before its own in its preference order and passes every filter (so a fresh plan
does not move, and after one node joins about 1/N of the slots do), then places
what fits in the room the moves freed.

**Explanations.** An unplaced replica's reasons are computed from the final state
of the round: each node counts once, under the first hard filter it fails, in a
fixed order (state, constraints, ports, anti-affinity, affinity, per-node limit,
cpu, memory). :meth:`Scheduler.explain` walks a placed replica's preference order
and says why each earlier node was skipped.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Final

from mesh.errors import ConfigError
from mesh.placement.config import PlacementConfig
from mesh.placement.constraints import first_failed, matches
from mesh.placement.hashing import (
    MAX_NODE_INDEX,
    NODE_BITS,
    NODE_MASK,
    build_ring,
    coarse_point,
    insert_points,
    node_rank,
    ring_index,
    slot_position,
    slot_positions,
    vnode_points,
    zone_rank,
)
from mesh.placement.model import (
    Availability,
    Change,
    Constraint,
    NodeInfo,
    NodeState,
    Op,
    Plan,
    Reason,
    ServiceSpec,
    Strategy,
    Unplaced,
    format_cpu,
    format_memory,
)
from mesh.types import NodeId, ServiceId

_SLOT_BITS: Final = 24
_SLOT_MASK: Final = (1 << _SLOT_BITS) - 1
_GLOBAL_SLOT: Final = _SLOT_MASK
"""Slot number of a global service's replica in a node's held-slot set."""
_INFEASIBLE: Final = 4
_NO_ZONE: Final = "(no label)"

_Index = tuple[int, list[int]]
"""A ring's bucket index: see :func:`mesh.placement.hashing.ring_index`."""

Current = Mapping[ServiceId, Sequence[NodeId | None]]
"""Current allocations: for each service, its slots' nodes (global: its nodes)."""


class _Sig:
    """A constraint signature: the nodes passing one set of constraints."""

    __slots__ = (
        "constraints",
        "cmask",
        "mask",
        "ccount",
        "feasible",
        "users",
        "ring",
        "coarse",
        "order",
        "version",
        "index",
        "zones",
        "failed",
        "failed_version",
    )

    def __init__(self, constraints: tuple[Constraint, ...]) -> None:
        self.constraints = constraints
        self.cmask = bytearray()
        """1 where the node exists and passes the constraints."""
        self.mask = bytearray()
        """1 where ``cmask`` holds and the node is schedulable."""
        self.ccount = 0
        self.feasible = 0
        self.users = 0
        self.ring: list[int] | None = None
        self.coarse: list[int] | None = None
        self.order: list[int] | None = None
        self.version = -1
        self.index: _Index | None = None
        self.zones: dict[str, tuple[int, list[int]]] = {}
        self.failed: dict[int, str] = {}
        """Explanations: the first constraint each node fails, as text (cached)."""
        self.failed_version = -1


class _Svc:
    """A service's working state."""

    __slots__ = (
        "spec",
        "sidx",
        "rank",
        "sig",
        "slots",
        "cnt",
        "unplaced",
        "anti",
        "cache",
        "balanced",
        "fail_k",
        "is_global",
        "is_target",
        "followers",
    )

    def __init__(self, spec: ServiceSpec, sidx: int, sig: _Sig) -> None:
        self.spec = spec
        self.sidx = sidx
        self.rank = 0
        self.sig = sig
        self.slots: list[int] = [] if spec.is_global else [-1] * spec.replicas
        """Node index of each slot, -1 if unplaced (replicated services)."""
        self.cnt: dict[int, int] = {}
        """Replicas of this service per node index."""
        self.unplaced = len(self.slots)
        self.anti: tuple[ServiceId, ...] = ()
        """Anti-affine services, both directions."""
        self.cache: tuple[NodeId | None, ...] | None = None
        self.is_global = spec.is_global
        self.balanced = not spec.is_global and spec.strategy is Strategy.SPREAD
        """True if its replicas count towards the bounded load (replicated spread)."""
        self.fail_k: int | None = None
        """The per-node limit of the last placement attempt that left slots unplaced;
        ``None`` if the next round must try them again whatever changed."""
        self.is_target = False
        """True if another service has affinity to this one."""
        self.followers = 0
        """How many spread services have affinity to this one: each new replica of
        this one leaves room under the load cap for one of each beside it."""


class _Zones:
    """The values of one spread label, numbered, and each node's value number."""

    __slots__ = ("names", "number", "of")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.number: dict[str, int] = {}
        self.of: list[int] = []


@dataclass(slots=True)
class _Ctx:
    """What the general walk needs about one service during one round."""

    svc: _Svc
    k: int
    cpu: int
    mem: int
    ports: frozenset[int]
    anti: list[dict[int, int]]
    aff: list[dict[int, int]]
    aff_ok: bool
    zone_of: list[int] | None
    quota: list[int] | None
    zone_count: list[int] | None
    capped: bool
    cap: int
    """The load cap for this service: the round's, less room for its followers."""
    binpack: bool
    cmask: bytearray
    mask: bytearray
    ring: list[int]
    index: _Index
    coarse: list[int]
    order: list[int]
    walk: int
    allowed: set[int] | None
    """With affinity: the nodes passing the constraints that run every target."""
    allowed_order: list[int]
    """``allowed`` in coarse-ring order."""
    allowed_pos: list[int]
    """The coarse-ring positions of ``allowed_order``."""


class Scheduler:
    """Placement state that follows changes incrementally.

    Construction places everything (``Scheduler(specs, nodes, current).plan`` is
    :func:`place`). Each update method runs one round and returns the replicas that
    changed node; :attr:`plan` is the result, identical to what :func:`place`
    returns for the new inputs and the previous assignments. Not thread-safe; all
    methods are synchronous and do no I/O.

    Args:
        specs: the services (ids must be unique).
        nodes: the nodes (ids must be unique).
        current: the allocations to keep where still feasible (e.g. the last
            committed plan's ``assignments``); unknown services, unknown nodes and
            slots beyond ``replicas`` are ignored.
        config: tunables; every leader must use the same.

    Raises:
        ConfigError: duplicate ids, or more nodes than a ring can index.
    """

    def __init__(
        self,
        specs: Iterable[ServiceSpec],
        nodes: Iterable[NodeInfo],
        current: Current | None = None,
        *,
        config: PlacementConfig | None = None,
    ) -> None:
        self._config = config or PlacementConfig()
        self._key = self._config.hash_key
        self._vnodes = self._config.vnodes_per_node
        # nodes, by internal index (never reused; a removed node leaves a tombstone)
        self._ids: list[NodeId] = []
        self._index: dict[NodeId, int] = {}
        self._info: list[NodeInfo | None] = []
        self._sched = bytearray()
        self._keep = bytearray()
        self._cpu: list[int] = []
        self._mem: list[int] = []
        self._load: list[int] = []
        self._ports: list[set[int]] = []
        self._held: list[set[int]] = []
        self._vpoints: list[list[int]] = []
        self._coarse_point: list[int] = []
        self._rank_key: list[tuple[int, str]] = []
        self._in_ring = bytearray()
        self._ring: list[int] = []
        self._ring_index: _Index | None = None
        self._coarse: list[int] = []
        self._order: list[int] = []
        self._live = 0
        self._schedulable = 0
        self._ring_version = 0
        self._state_version = 0
        self._value_index: dict[str, dict[str, list[int]]] = {}
        self._zones: dict[str, _Zones] = {}
        # services
        self._svcs: dict[ServiceId, _Svc] = {}
        self._by_sidx: dict[int, _Svc] = {}
        self._next_sidx = 0
        self._sigs: dict[tuple[Constraint, ...], _Sig] = {}
        self._ordered: list[_Svc] = []
        self._cap = 0
        self._unplaced_cache: dict[ServiceId, Unplaced] | None = None
        self._order_stale = False
        self._gained: dict[int, set[int]] = {}
        """Nodes that received a replica of an affinity target during this round."""

        node_list = list(nodes)
        spec_list = list(specs)
        _check_unique([n.id for n in node_list], "node")
        _check_unique([s.id for s in spec_list], "service")
        for node in sorted(node_list, key=lambda n: n.id):
            self._add_node(node, build=True)
        self._build_rings()
        for spec in sorted(spec_list, key=lambda s: s.id):
            self._add_service(spec)
        self._refresh_relations()
        readmit: list[tuple[_Svc, int, int]] = []
        for svc in self._ordered:
            entries = current.get(svc.spec.id, ()) if current is not None else ()
            if svc.spec.is_global:
                for node_id in sorted({n for n in entries if n is not None}):
                    j = self._index.get(node_id)
                    if j is not None:
                        readmit.append((svc, _GLOBAL_SLOT, j))
            else:
                for slot, nid in enumerate(entries[: svc.spec.replicas]):
                    j = self._index.get(nid) if nid is not None else None
                    if j is not None:
                        readmit.append((svc, slot, j))
        self._round(readmit)

    # ------------------------------------------------------------------ public API

    @property
    def config(self) -> PlacementConfig:
        """The configuration in use."""
        return self._config

    @property
    def load_cap(self) -> int:
        """The bounded-load cap of the last round."""
        return self._cap

    @property
    def plan(self) -> Plan:
        """The current plan (cheap to take repeatedly: unchanged services are cached)."""
        ids: list[NodeId | None] = [*self._ids, None]
        pick = ids.__getitem__
        assignments: dict[ServiceId, tuple[NodeId | None, ...]] = {}
        for sid in sorted(self._svcs):
            svc = self._svcs[sid]
            if svc.cache is None:
                if svc.spec.is_global:
                    svc.cache = tuple(sorted(self._ids[j] for j in svc.cnt))
                else:
                    svc.cache = tuple(map(pick, svc.slots))
            assignments[sid] = svc.cache
        if self._unplaced_cache is None:
            self._unplaced_cache = self._explain_all_unplaced()
        return Plan(
            assignments=MappingProxyType(assignments),
            unplaced=MappingProxyType(dict(self._unplaced_cache)),
            load_cap=self._cap,
        )

    def update(
        self,
        *,
        nodes: Iterable[NodeInfo] = (),
        removed_nodes: Iterable[NodeId] = (),
        specs: Iterable[ServiceSpec] = (),
        removed_services: Iterable[ServiceId] = (),
        rebalance: bool = False,
    ) -> list[Change]:
        """Apply several changes as one round.

        Args:
            nodes: nodes that are new or whose info changed (state, availability,
                labels, attributes, capacity). Unchanged ones cost a comparison.
            removed_nodes: nodes that left the cluster (unknown ids are ignored).
            specs: services that are new or changed.
            removed_services: services that are gone (unknown ids are ignored).
            rebalance: afterwards, move every slot that now prefers another node.

        Returns:
            The replicas whose node changed, in service and slot order.

        Raises:
            ConfigError: an id appears twice, or is both updated and removed.
        """
        node_list = list(nodes)
        gone_nodes = list(removed_nodes)
        spec_list = list(specs)
        gone_specs = list(removed_services)
        _check_unique([n.id for n in node_list] + gone_nodes, "node")
        _check_unique([s.id for s in spec_list] + gone_specs, "service")
        node_list = [n for n in node_list if self._node_changed(n)]
        gone_nodes = [n for n in gone_nodes if self._node_present(n)]
        spec_list = [s for s in spec_list if self._svcs.get(s.id) is None or self._svcs[s.id].spec != s]
        gone_specs = [s for s in gone_specs if s in self._svcs]
        if not (node_list or gone_nodes or spec_list or gone_specs or rebalance):
            return []

        touched: dict[int, int] = {}
        gtouched: dict[tuple[int, int], bool] = {}
        names: dict[int, ServiceId] = {}
        affected: set[int] = set()
        for node in node_list:
            j = self._index.get(node.id)
            if j is not None:
                affected.add(j)
        for node_id in gone_nodes:
            affected.add(self._index[node_id])
        for spec in spec_list:
            old = self._svcs.get(spec.id)
            if old is not None:
                affected.update(old.cnt)
        for sid in gone_specs:
            affected.update(self._svcs[sid].cnt)

        readmit: list[tuple[_Svc, int, int]] = []
        for j in sorted(affected):
            for key in sorted(self._held[j]):
                svc = self._by_sidx[key >> _SLOT_BITS]
                slot = key & _SLOT_MASK
                names[svc.sidx] = svc.spec.id
                if slot == _GLOBAL_SLOT:
                    gtouched.setdefault((svc.sidx, j), True)
                else:
                    touched.setdefault(key, j)
                self._unassign(svc, slot, j)
                readmit.append((svc, slot, j))

        dropped: set[int] = set()
        for sid in gone_specs:
            svc = self._svcs.pop(sid)
            del self._by_sidx[svc.sidx]
            self._release_sig(svc.sig)
            dropped.add(svc.sidx)
            for slot in range(len(svc.slots)):
                touched.setdefault((svc.sidx << _SLOT_BITS) | slot, -1)
                names[svc.sidx] = sid
        for spec in spec_list:
            old = self._svcs.get(spec.id)
            if old is None:
                self._add_service(spec)
                continue
            names[old.sidx] = spec.id
            if old.spec.is_global != spec.is_global:
                # a mode change is a new service under the same name
                dropped.add(old.sidx)
                for slot in range(len(old.slots)):
                    touched.setdefault((old.sidx << _SLOT_BITS) | slot, -1)
                del self._by_sidx[old.sidx]
                del self._svcs[spec.id]
                self._release_sig(old.sig)
                self._add_service(spec)
                continue
            self._replace_spec(old, spec, touched)
        readmit = [
            (svc, slot, j)
            for svc, slot, j in readmit
            if svc.sidx not in dropped
            and (slot == _GLOBAL_SLOT or slot < len(svc.slots))
        ]

        for node_id in gone_nodes:
            self._remove_node(self._index[node_id])
        for node in node_list:
            self._add_node(node, build=False)
        if gone_nodes or node_list:
            self._maybe_compact()
        if spec_list or gone_specs:
            self._refresh_relations()
        elif self._order_stale:
            self._refresh_order()

        for svc in self._svcs.values():
            if svc.unplaced:
                for slot, j in enumerate(svc.slots):
                    if j < 0:
                        touched.setdefault((svc.sidx << _SLOT_BITS) | slot, -1)
        if rebalance:
            for svc in self._ordered:
                if not svc.is_global:
                    for slot, j in enumerate(svc.slots):
                        touched.setdefault((svc.sidx << _SLOT_BITS) | slot, j)
        global_before = {
            svc.sidx: set(svc.cnt) for svc in self._ordered if svc.is_global
        }
        readmit.sort(key=lambda e: (e[0].rank, e[1]))
        improved = affected | {self._index[n.id] for n in node_list}
        self._round(readmit, improved, rebalance=rebalance)
        return self._changes(touched, gtouched, global_before, names)

    def upsert_node(self, node: NodeInfo) -> list[Change]:
        """A node joined or its info changed (see :meth:`update`)."""
        return self.update(nodes=[node])

    def remove_node(self, node_id: NodeId) -> list[Change]:
        """A node left (see :meth:`update`); exactly its replicas move."""
        return self.update(removed_nodes=[node_id])

    def upsert_service(self, spec: ServiceSpec) -> list[Change]:
        """A service was created or changed (see :meth:`update`)."""
        return self.update(specs=[spec])

    def remove_service(self, service: ServiceId) -> list[Change]:
        """A service was deleted: its replicas stop (see :meth:`update`)."""
        return self.update(removed_services=[service])

    def rebalance(self) -> list[Change]:
        """Move every replica whose preference order now puts another node first."""
        return self.update(rebalance=True)

    def sync(
        self, specs: Iterable[ServiceSpec], nodes: Iterable[NodeInfo], *, rebalance: bool = False
    ) -> list[Change]:
        """Bring the state to exactly these specs and nodes, as one round.

        Raises:
            ConfigError: duplicate ids.
        """
        spec_list = list(specs)
        node_list = list(nodes)
        _check_unique([s.id for s in spec_list], "service")
        _check_unique([n.id for n in node_list], "node")
        spec_ids = {s.id for s in spec_list}
        node_ids = {n.id for n in node_list}
        return self.update(
            nodes=node_list,
            removed_nodes=sorted(
                n for n, j in self._index.items() if n not in node_ids and self._info[j] is not None
            ),
            specs=spec_list,
            removed_services=sorted(s for s in self._svcs if s not in spec_ids),
            rebalance=rebalance,
        )

    def explain(self, service: ServiceId, index: int | None = None, node: NodeId | None = None) -> str:
        """Say why a replica runs where it does, or why it cannot run.

        Args:
            service: the service.
            index: the slot (replicated services).
            node: the node (global services).

        Returns:
            One paragraph for people.

        Raises:
            ConfigError: no such service or slot.
        """
        svc = self._svcs.get(service)
        if svc is None:
            raise ConfigError(f"no service {service!r}; meshctl ls lists the services")
        if svc.spec.is_global:
            return self._explain_global(svc, node)
        if index is None or not 0 <= index < len(svc.slots):
            raise ConfigError(
                f"service {service} has slots 0-{len(svc.slots) - 1}, not {index!r}"
            )
        j0 = svc.slots[index]
        if j0 < 0:
            live = [j for j, info in enumerate(self._info) if info is not None]
            reasons = ", ".join(r.text for r in self._reasons(svc, live))
            return f"{service}[{index}] is not placed: {reasons}."
        self._unassign(svc, index, j0)
        try:
            return self._explain_placed(svc, index, j0)
        finally:
            self._assign(svc, index, j0)

    # ------------------------------------------------------------------ nodes

    def _node_changed(self, node: NodeInfo) -> bool:
        j = self._index.get(node.id)
        return j is None or self._info[j] != node

    def _node_present(self, node_id: NodeId) -> bool:
        j = self._index.get(node_id)
        return j is not None and self._info[j] is not None

    def _add_node(self, node: NodeInfo, *, build: bool) -> None:
        j = self._index.get(node.id)
        if j is not None:  # a tombstone comes back
            self._change_node(j, node)
            if not self._in_ring[j]:
                self._insert_into_rings(j)
            return
        j = len(self._ids)
        if j > MAX_NODE_INDEX:
            raise ConfigError(
                f"more than {MAX_NODE_INDEX} nodes have been seen; restart the leader to compact"
            )
        self._ids.append(node.id)
        self._index[node.id] = j
        self._info.append(None)
        self._sched.append(0)
        self._keep.append(0)
        self._cpu.append(0)
        self._mem.append(0)
        self._load.append(0)
        self._ports.append(set())
        self._held.append(set())
        self._vpoints.append(vnode_points(self._key, node.id, j, self._vnodes))
        self._coarse_point.append(coarse_point(self._key, node.id, j))
        self._rank_key.append((node_rank(self._key, node.id), node.id))
        self._in_ring.append(0)
        for zones in self._zones.values():
            zones.of.append(self._zone_number(zones, None))
        for sig in self._sigs.values():
            sig.cmask.append(0)
            sig.mask.append(0)
        self._change_node(j, node)
        if not build:
            self._insert_into_rings(j)

    def _build_rings(self) -> None:
        points: list[int] = []
        for j, info in enumerate(self._info):
            if info is not None:
                points.extend(self._vpoints[j])
                self._in_ring[j] = 1
        name = self._ids.__getitem__
        self._ring = build_ring(points, name)
        self._ring_index = None
        self._coarse = build_ring(
            [self._coarse_point[j] for j in range(len(self._ids)) if self._in_ring[j]], name
        )
        self._order = sorted(
            (j for j in range(len(self._ids)) if self._in_ring[j]), key=self._rank_key.__getitem__
        )
        self._ring_version += 1

    def _insert_into_rings(self, j: int) -> None:
        name = self._ids.__getitem__
        insert_points(self._ring, sorted(self._vpoints[j]), name)
        self._ring_index = None
        insert_points(self._coarse, [self._coarse_point[j]], name)
        rank = self._rank_key[j]
        keys = [self._rank_key[x] for x in self._order]
        self._order.insert(bisect_left(keys, rank), j)
        self._in_ring[j] = 1
        self._ring_version += 1

    def _maybe_compact(self) -> None:
        tombstones = sum(self._in_ring) - self._live
        if tombstones > 16 + self._live // 4:
            for j in range(len(self._ids)):
                self._in_ring[j] = 0
            self._build_rings()

    def _change_node(self, j: int, node: NodeInfo) -> None:
        """Install new info for node ``j``, which holds no replicas right now."""
        old = self._info[j]
        assert not self._held[j], "a node's replicas are taken off before its info changes"
        self._state_version += 1
        if old is None:
            self._live += 1
        self._schedulable -= self._sched[j]
        self._info[j] = node
        sched = 1 if node.schedulable else 0
        self._sched[j] = sched
        self._keep[j] = 1 if node.keeps_replicas else 0
        self._schedulable += sched
        self._cpu[j] = node.capacity.cpu_millis
        self._mem[j] = node.capacity.memory_bytes
        self._load[j] = 0
        self._ports[j] = set()
        matching_changed = (
            old is None
            or old.labels != node.labels
            or old.attributes != node.attributes
        )
        if matching_changed:
            self._value_index.clear()
            self._ring_version += 1
            self._order_stale = True
            for key, zones in self._zones.items():
                zones.of[j] = self._zone_number(zones, node.labels.get(key))
        for sig in self._sigs.values():
            if matching_changed:
                ok = 1 if all(matches(c, node) for c in sig.constraints) else 0
                sig.ccount += ok - sig.cmask[j]
                sig.cmask[j] = ok
            new = sig.cmask[j] & sched
            sig.feasible += new - sig.mask[j]
            sig.mask[j] = new

    def _remove_node(self, j: int) -> None:
        assert not self._held[j]
        self._state_version += 1
        self._live -= 1
        self._schedulable -= self._sched[j]
        self._info[j] = None
        self._sched[j] = 0
        self._keep[j] = 0
        self._cpu[j] = 0
        self._mem[j] = 0
        # The rings keep the node's points until the next compaction (walks skip
        # nodes outside the constraint mask), so filtered rings stay valid.
        self._value_index.clear()
        self._order_stale = True
        for sig in self._sigs.values():
            sig.ccount -= sig.cmask[j]
            sig.feasible -= sig.mask[j]
            sig.cmask[j] = 0
            sig.mask[j] = 0

    # ------------------------------------------------------------------ services

    def _add_service(self, spec: ServiceSpec) -> _Svc:
        sidx = self._next_sidx
        self._next_sidx += 1
        svc = _Svc(spec, sidx, self._acquire_sig(spec.constraints))
        self._svcs[spec.id] = svc
        self._by_sidx[sidx] = svc
        return svc

    def _replace_spec(self, svc: _Svc, spec: ServiceSpec, touched: dict[int, int]) -> None:
        """Install a changed spec; the service holds no replicas right now."""
        assert not svc.cnt
        if spec.constraints != svc.spec.constraints:
            self._release_sig(svc.sig)
            svc.sig = self._acquire_sig(spec.constraints)
        old_n = len(svc.slots)
        if spec.replicas < old_n:
            for slot in range(spec.replicas, old_n):
                touched.setdefault((svc.sidx << _SLOT_BITS) | slot, -1)
            del svc.slots[spec.replicas :]
        else:
            svc.slots.extend([-1] * (spec.replicas - old_n))
        svc.unplaced = svc.slots.count(-1)
        svc.spec = spec
        svc.balanced = not spec.is_global and spec.strategy is Strategy.SPREAD
        svc.fail_k = None
        svc.cache = None

    def _acquire_sig(self, constraints: tuple[Constraint, ...]) -> _Sig:
        key = tuple(sorted(set(constraints), key=lambda c: (c.key, c.op.value, c.values)))
        sig = self._sigs.get(key)
        if sig is None:
            sig = _Sig(key)
            self._fill_sig(sig)
            self._sigs[key] = sig
        sig.users += 1
        return sig

    def _release_sig(self, sig: _Sig) -> None:
        sig.users -= 1
        if sig.users == 0:
            del self._sigs[sig.constraints]

    def _fill_sig(self, sig: _Sig) -> None:
        n = len(self._ids)
        cmask = bytearray(n)
        candidates: Iterable[int] = range(n)
        rest = sig.constraints
        for c in sig.constraints:
            if c.op in (Op.EQ, Op.IN):
                index = self._value_index_for(c.key)
                found: list[int] = []
                for value in c.values:
                    found.extend(index.get(value, ()))
                candidates = sorted(found)
                rest = tuple(x for x in sig.constraints if x is not c)
                break
        info = self._info
        for j in candidates:
            node = info[j]
            if node is not None and all(matches(c, node) for c in rest):
                cmask[j] = 1
        sig.cmask = cmask
        sig.mask = bytearray(a & b for a, b in zip(cmask, self._sched, strict=True))
        sig.ccount = sum(cmask)
        sig.feasible = sum(sig.mask)

    def _value_index_for(self, key: str) -> dict[str, list[int]]:
        index = self._value_index.get(key)
        if index is None:
            index = {}
            for j, node in enumerate(self._info):
                if node is not None:
                    value = node.value_of(key)
                    if value is not None:
                        index.setdefault(value, []).append(j)
            self._value_index[key] = index
        return index

    def _refresh_relations(self) -> None:
        """Recompute symmetric anti-affinity and the canonical service order."""
        anti: dict[ServiceId, set[ServiceId]] = {sid: set() for sid in self._svcs}
        for sid, svc in self._svcs.items():
            for other in svc.spec.anti_affinity:
                anti[sid].add(other)
                if other in anti:
                    anti[other].add(sid)
        affinity_targets: set[ServiceId] = set()
        followers: dict[ServiceId, int] = {}
        for sid, svc in self._svcs.items():
            svc.anti = tuple(sorted(anti[sid]))
            affinity_targets.update(svc.spec.affinity)
            if svc.balanced:
                for target in svc.spec.affinity:
                    followers[target] = followers.get(target, 0) + 1
        for sid, svc in self._svcs.items():
            svc.is_target = sid in affinity_targets
            svc.followers = followers.get(sid, 0)
        self._refresh_order()

    def _refresh_order(self) -> None:
        """The canonical service order: affinity targets before their users; among
        the services free to go, first those with affinity (so they follow their
        target before anything else takes the room it left), then the one whose
        constraints match fewest nodes (it has the least choice), then by id
        (Kahn's algorithm on a heap)."""
        self._order_stale = False
        waiting: dict[ServiceId, int] = {}
        users: dict[ServiceId, list[ServiceId]] = {}
        for sid, svc in self._svcs.items():
            targets = [t for t in svc.spec.affinity if t in self._svcs]
            waiting[sid] = len(targets)
            for t in targets:
                users.setdefault(t, []).append(sid)
        svcs = self._svcs

        def key(sid: ServiceId) -> tuple[int, int, ServiceId]:
            svc = svcs[sid]
            return (0 if svc.spec.affinity else 1), svc.sig.ccount, sid

        ready = [key(sid) for sid, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        ordered: list[_Svc] = []
        while ready:
            sid = heapq.heappop(ready)[2]
            ordered.append(svcs[sid])
            for user in users.get(sid, ()):
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, key(user))
        if len(ordered) < len(svcs):  # affinity cycles: the rest by id
            seen = {svc.spec.id for svc in ordered}
            ordered.extend(svcs[s] for s in sorted(svcs) if s not in seen)
        for rank, svc in enumerate(ordered):
            svc.rank = rank
        self._ordered = ordered

    # ------------------------------------------------------------------ assignment

    def _assign(self, svc: _Svc, slot: int, j: int) -> None:
        res = svc.spec.resources
        self._cpu[j] -= res.cpu_millis
        self._mem[j] -= res.memory_bytes
        if svc.balanced:
            self._load[j] += 1
        svc.cnt[j] = svc.cnt.get(j, 0) + 1
        if svc.is_target:
            self._gained.setdefault(svc.sidx, set()).add(j)
        self._ports[j].update(svc.spec.ports)
        self._held[j].add((svc.sidx << _SLOT_BITS) | slot)
        if slot != _GLOBAL_SLOT:
            svc.slots[slot] = j
            svc.unplaced -= 1
        svc.cache = None

    def _unassign(self, svc: _Svc, slot: int, j: int) -> None:
        res = svc.spec.resources
        self._cpu[j] += res.cpu_millis
        self._mem[j] += res.memory_bytes
        if svc.balanced:
            self._load[j] -= 1
        left = svc.cnt[j] - 1
        if left:
            svc.cnt[j] = left
        else:
            del svc.cnt[j]
        self._ports[j].difference_update(svc.spec.ports)
        self._held[j].discard((svc.sidx << _SLOT_BITS) | slot)
        if slot != _GLOBAL_SLOT:
            svc.slots[slot] = -1
            svc.unplaced += 1
        svc.cache = None

    def _hard_ok(self, svc: _Svc, j: int, k: int | None) -> bool:
        """Hard filters other than node state and constraints, on the live state."""
        spec = svc.spec
        res = spec.resources
        if self._cpu[j] < res.cpu_millis or self._mem[j] < res.memory_bytes:
            return False
        if k is not None and svc.cnt.get(j, 0) >= k:
            return False
        if spec.ports and not self._ports[j].isdisjoint(spec.ports):
            return False
        for other in svc.anti:
            o = self._svcs.get(other)
            if o is not None and j in o.cnt:
                return False
        for target in spec.affinity:
            t = self._svcs.get(target)
            if t is None or j not in t.cnt:
                return False
        return True

    # ------------------------------------------------------------------ rounds

    def _round(
        self,
        readmit: list[tuple[_Svc, int, int]],
        improved: set[int] | None = None,
        *,
        rebalance: bool = False,
    ) -> None:
        """Re-admit, then place every slot without a node (see the module docstring).

        Args:
            readmit: ``(service, slot, node)`` to keep if still feasible, in
                canonical order.
            improved: the nodes that may have become more able to take a replica
                since the last round (changed, emptied or new); ``None`` means any.
                A service whose slots stayed unplaced last round is tried again only
                if one of them passes its constraints, a node now runs one of its
                affinity targets, or its per-node limit changed: otherwise the
                attempt would fail the same way (the state only fills up between).
            rebalance: run a rebalance pass afterwards.
        """
        self._unplaced_cache = None
        self._gained = {}
        for svc, slot, j in readmit:
            if self._keep[j] and svc.sig.cmask[j] and self._hard_ok(svc, j, svc.spec.max_per_node):
                self._assign(svc, slot, j)
        self._cap = self._compute_cap()
        self._place_all(improved)
        if rebalance:
            self._rebalance()
            # moves free room: place what now fits, and try everything next round
            self._place_all(None)
            for svc in self._ordered:
                svc.fail_k = None

    def _place_all(self, improved: set[int] | None) -> None:
        for svc in self._ordered:
            if svc.is_global:
                self._place_global(svc)
            elif svc.unplaced:
                k = self._k(svc)
                if improved is not None and svc.fail_k == k and not self._may_fit(svc, improved):
                    continue
                slots = [i for i, j in enumerate(svc.slots) if j < 0]
                self._place_replicated(svc, slots)
                svc.fail_k = k if svc.unplaced else None

    def _may_fit(self, svc: _Svc, improved: set[int]) -> bool:
        mask = svc.sig.mask
        if any(mask[j] for j in improved):
            return True
        for target in svc.spec.affinity:
            t = self._svcs.get(target)
            if t is not None and any(mask[j] for j in self._gained.get(t.sidx, ())):
                return True
        return False

    def _compute_cap(self) -> int:
        """Most spread replicas a node may hold after a new placement.

        ``max(ceil(avg), floor((1 + eps) * avg))`` with ``avg`` the desired spread
        replicas per schedulable node: never above Mirrokni et al.'s
        ``ceil((1 + eps) * avg)``, and never above ``(1 + eps) * avg`` once that
        leaves room for the average itself.
        """
        if self._schedulable == 0:
            return 0
        total = sum(svc.spec.replicas for svc in self._ordered if svc.balanced)
        avg = Fraction(total, self._schedulable)
        return max(math.ceil(avg), math.floor((1 + self._config.eps) * avg))

    def _k(self, svc: _Svc) -> int:
        spec = svc.spec
        if spec.max_per_node is not None:
            return spec.max_per_node
        if spec.strategy is Strategy.BINPACK:
            return max(spec.replicas, 1)
        feasible = svc.sig.feasible
        if feasible == 0 or spec.replicas <= feasible:
            return 1
        return math.ceil((1 + self._config.eps) * Fraction(spec.replicas, feasible))

    def _rings(self, sig: _Sig) -> tuple[list[int], _Index, list[int], list[int]]:
        """The ring (with its bucket index), coarse ring and binpack order to walk
        for a signature: the cluster's, or filtered ones if it matches few nodes."""
        if sig.ccount * 2 >= self._live:
            if self._ring_index is None:
                self._ring_index = ring_index(self._ring)
            return self._ring, self._ring_index, self._coarse, self._order
        if sig.version != self._ring_version or sig.ring is None or sig.index is None:
            cm = sig.cmask
            nodes = [j for j in range(len(cm)) if cm[j] and self._in_ring[j]]
            points: list[int] = []
            for j in nodes:
                points.extend(self._vpoints[j])
            name = self._ids.__getitem__
            sig.ring = build_ring(points, name)
            sig.index = ring_index(sig.ring)
            sig.coarse = build_ring([self._coarse_point[j] for j in nodes], name)
            sig.order = sorted(nodes, key=self._rank_key.__getitem__)
            sig.version = self._ring_version
        assert sig.coarse is not None
        assert sig.order is not None
        return sig.ring, sig.index, sig.coarse, sig.order

    def _context(self, svc: _Svc) -> _Ctx:
        spec = svc.spec
        k = self._k(svc)
        ring, index, coarse, order = self._rings(svc.sig)
        anti = [self._svcs[s].cnt for s in svc.anti if s in self._svcs]
        aff_ok = all(t in self._svcs for t in spec.affinity)
        aff = [self._svcs[t].cnt for t in spec.affinity if t in self._svcs]
        zone_of = quota = zone_count = None
        if spec.spread_over is not None:
            zone_of, quota, zone_count = self._spread(svc, k)
        allowed: set[int] | None = None
        allowed_order: list[int] = []
        if spec.affinity:
            # Only nodes running every target can take a replica: walk just those,
            # in the order the full walk would meet them (same choice, less work).
            cm = svc.sig.cmask
            allowed = set()
            if aff_ok:
                smallest = min(aff, key=len)
                allowed = {j for j in smallest if cm[j] and all(j in t for t in aff)}
            ids = self._ids
            point = self._coarse_point
            allowed_order = sorted(allowed, key=lambda j: (point[j] >> NODE_BITS, ids[j]))
        return _Ctx(
            svc=svc,
            k=k,
            cpu=spec.resources.cpu_millis,
            mem=spec.resources.memory_bytes,
            ports=frozenset(spec.ports),
            anti=anti,
            aff=aff,
            aff_ok=aff_ok,
            zone_of=zone_of,
            quota=quota,
            zone_count=zone_count,
            capped=spec.strategy is Strategy.SPREAD,
            cap=self._cap - svc.followers,
            binpack=spec.strategy is Strategy.BINPACK,
            cmask=svc.sig.cmask,
            mask=svc.sig.mask,
            ring=ring,
            index=index,
            coarse=coarse,
            order=order,
            walk=min(self._config.walk_steps, svc.sig.ccount * self._vnodes),
            allowed=allowed,
            allowed_order=allowed_order,
            allowed_pos=[self._coarse_point[j] >> NODE_BITS for j in allowed_order],
        )

    def _zone_number(self, zones: _Zones, value: str | None) -> int:
        name = _NO_ZONE if value is None else value
        number = zones.number.get(name)
        if number is None:
            number = len(zones.names)
            zones.names.append(name)
            zones.number[name] = number
        return number

    def _zones_for(self, key: str) -> _Zones:
        zones = self._zones.get(key)
        if zones is None:
            zones = _Zones()
            for node in self._info:
                zones.of.append(
                    self._zone_number(zones, node.labels.get(key) if node is not None else None)
                )
            self._zones[key] = zones
        return zones

    def _spread(self, svc: _Svc, k: int) -> tuple[list[int], list[int], list[int]]:
        """Per-group quotas: the replicas water-filled over the groups' capacity."""
        key = svc.spec.spread_over
        assert key is not None
        zones = self._zones_for(key)
        sig = svc.sig
        cached = sig.zones.get(key)
        if cached is None or cached[0] != self._state_version:
            counts = [0] * len(zones.names)
            of = zones.of
            mask = sig.mask
            for j in range(len(mask)):
                if mask[j]:
                    counts[of[j]] += 1
            cached = (self._state_version, counts)
            sig.zones[key] = cached
        nodes_per_zone = cached[1]
        quota = _water_fill(
            svc.spec.replicas,
            [min(n * k, svc.spec.replicas) for n in nodes_per_zone],
            [zone_rank(self._key, svc.spec.id, name) for name in zones.names],
        )
        zone_count = [0] * len(zones.names)
        of = zones.of
        for j, n in svc.cnt.items():
            zone_count[of[j]] += n
        return of, quota, zone_count

    def _place_replicated(self, svc: _Svc, slots: list[int]) -> None:
        positions = slot_positions(self._key, svc.spec.id, slots[-1] + 1)
        ctx = self._context(svc)
        if ctx.binpack:
            self._place_general(ctx, slots, positions)
        else:
            self._place_spread(ctx, slots, positions)
        svc.cache = None

    def _place_spread(self, ctx: _Ctx, slots: list[int], positions: list[int]) -> None:
        """The hot path for spread services: the walk of :meth:`_sequence` and the
        levels of :meth:`_level` and :meth:`_choose`, inlined (same decisions)."""
        svc = ctx.svc
        ring = ctx.ring
        size = len(ring)
        shift, table = ctx.index
        cm = ctx.cmask
        mask = ctx.mask
        cpu = self._cpu
        mem = self._mem
        load = self._load
        held = self._held
        used_ports = self._ports
        cap = ctx.cap
        k = ctx.k
        need_cpu = ctx.cpu
        need_mem = ctx.mem
        ports = ctx.ports or None
        anti = ctx.anti or None
        allowed = ctx.allowed
        zone_of = ctx.zone_of
        quota = ctx.quota
        zone_count = ctx.zone_count
        if allowed is not None:
            coarse = ctx.allowed_order
            coarse_key = ctx.allowed_pos
            coarse_shift = NODE_BITS
        else:
            coarse = coarse_key = ctx.coarse
            coarse_shift = 0
        csize = len(coarse)
        cnt = svc.cnt
        get = cnt.get
        sl = svc.slots
        base = svc.sidx << _SLOT_BITS
        gained = self._gained.setdefault(svc.sidx, set()) if svc.is_target else None
        node_mask = NODE_MASK

        def level(j: int) -> int:
            if not mask[j] or cpu[j] < need_cpu or mem[j] < need_mem or get(j, 0) >= k:
                return _INFEASIBLE
            if allowed is not None and j not in allowed:
                return _INFEASIBLE
            if ports is not None and not ports.isdisjoint(used_ports[j]):
                return _INFEASIBLE
            if anti is not None:
                for other in anti:
                    if j in other:
                        return _INFEASIBLE
            if zone_of is None:
                return 0 if load[j] < cap else 2
            zone = zone_of[j]
            if load[j] < cap:
                return 0 if zone_count[zone] < quota[zone] else 1  # type: ignore[index]
            return 2 if zone_count[zone] < quota[zone] else 3  # type: ignore[index]

        floor = 0  # levels below this are proven empty for the rest of the round
        placed = 0
        for i in slots:
            p = positions[i]
            chosen = -1
            best = -1
            best_level = _INFEASIBLE
            bucket = p >> shift
            x = bisect_left(ring, p, table[bucket], table[bucket + 1])
            n = ctx.walk
            while n:
                if x == size:
                    x = 0
                j = ring[x] & node_mask
                x += 1
                if cm[j]:
                    n -= 1
                    lvl = level(j)
                    if lvl <= floor:
                        chosen = j
                        break
                    if lvl < best_level:
                        best, best_level = j, lvl
            else:
                y = bisect_left(coarse_key, p >> coarse_shift)
                n = csize
                while n:
                    if y == csize:
                        y = 0
                    j = coarse[y] & node_mask
                    y += 1
                    n -= 1
                    if cm[j]:
                        lvl = level(j)
                        if lvl <= floor:
                            chosen = j
                            break
                        if lvl < best_level:
                            best, best_level = j, lvl
                else:
                    if best < 0:
                        break  # nothing can take this slot, nor the later ones
                    chosen = best
                    floor = best_level
            sl[i] = chosen
            cnt[chosen] = get(chosen, 0) + 1
            load[chosen] += 1
            cpu[chosen] -= need_cpu
            mem[chosen] -= need_mem
            held[chosen].add(base | i)
            if ports is not None:
                used_ports[chosen].update(ports)
            if zone_count is not None:
                zone_count[zone_of[chosen]] += 1  # type: ignore[index]
            if gained is not None:
                gained.add(chosen)
            placed += 1
        svc.unplaced -= placed

    def _sequence(self, ctx: _Ctx, position: int, *, restrict: bool = True) -> Iterator[int]:
        """A slot's preference order (may repeat nodes; see the module docstring).

        With ``restrict``, nodes outside ``ctx.allowed`` (which cannot take the
        replica) are left out.
        """
        ring = ctx.ring
        size = len(ring)
        cm = ctx.cmask
        allowed = ctx.allowed if restrict else None
        shift, table = ctx.index
        bucket = position >> shift
        x = bisect_left(ring, position, table[bucket], table[bucket + 1])
        n = ctx.walk
        while n:
            if x == size:
                x = 0
            j = ring[x] & NODE_MASK
            x += 1
            if cm[j]:
                n -= 1
                if allowed is None or j in allowed:
                    yield j
        if allowed is not None:
            y = bisect_left(ctx.allowed_pos, position >> NODE_BITS)
            yield from ctx.allowed_order[y:]
            yield from ctx.allowed_order[:y]
            return
        coarse = ctx.coarse
        csize = len(coarse)
        y = bisect_left(coarse, position)
        for _ in range(csize):
            if y == csize:
                y = 0
            j = coarse[y] & NODE_MASK
            y += 1
            if cm[j]:
                yield j

    def _level(self, ctx: _Ctx, j: int) -> int:
        """0-3 as in the module docstring, or ``_INFEASIBLE``."""
        if (
            not ctx.mask[j]
            or self._cpu[j] < ctx.cpu
            or self._mem[j] < ctx.mem
            or ctx.svc.cnt.get(j, 0) >= ctx.k
            or not ctx.aff_ok
        ):
            return _INFEASIBLE
        if ctx.ports and not ctx.ports.isdisjoint(self._ports[j]):
            return _INFEASIBLE
        for other in ctx.anti:
            if j in other:
                return _INFEASIBLE
        for target in ctx.aff:
            if j not in target:
                return _INFEASIBLE
        in_quota = True
        if ctx.zone_of is not None:
            assert ctx.quota is not None
            assert ctx.zone_count is not None
            zone = ctx.zone_of[j]
            in_quota = ctx.zone_count[zone] < ctx.quota[zone]
        under_cap = not ctx.capped or self._load[j] < ctx.cap
        if under_cap:
            return 0 if in_quota else 1
        return 2 if in_quota else 3

    def _choose(self, ctx: _Ctx, seq: Iterable[int], floor: int) -> tuple[int, int]:
        """The first node at level <= floor, else the first at the best level seen."""
        best = -1
        best_level = _INFEASIBLE
        for j in seq:
            level = self._level(ctx, j)
            if level <= floor:
                return j, level
            if level < best_level:
                best, best_level = j, level
        return best, best_level

    def _place_general(self, ctx: _Ctx, slots: list[int], positions: list[int]) -> None:
        """Place slots through :meth:`_choose` (binpack services)."""
        svc = ctx.svc
        floor = 0
        start = 0  # binpack: nodes before this rank failed level <= floor
        order = ctx.order
        cm = ctx.cmask
        for i in slots:
            if ctx.binpack:
                seq: Iterable[int] = (order[x] for x in range(start, len(order)) if cm[order[x]])
                j, level = self._choose(ctx, seq, floor)
                if level > floor and start:
                    # the nodes before ``start`` failed only this level; a worse one
                    # may still be found among them
                    j, level = self._choose(ctx, (x for x in order if cm[x]), floor)
            else:
                j, level = self._choose(ctx, self._sequence(ctx, positions[i]), floor)
            if j < 0:
                break
            if level > floor:
                floor = level
                start = 0
            elif ctx.binpack:
                start = order.index(j, start)
            self._assign(svc, i, j)
            if ctx.zone_count is not None:
                assert ctx.zone_of is not None
                ctx.zone_count[ctx.zone_of[j]] += 1

    def _place_global(self, svc: _Svc) -> None:
        mask = svc.sig.mask
        cnt = svc.cnt
        for j in range(len(mask)):
            if mask[j] and j not in cnt and self._hard_ok(svc, j, None):
                self._assign(svc, _GLOBAL_SLOT, j)

    def _rebalance(self) -> None:
        """Move slots to a node that comes earlier in their order and is now ideal.

        A slot moves only to a node *before* its own in its preference order that
        passes every filter, the soft ones included (level 0); or, if its own node
        no longer passes the filters for a new replica (say the default per-node
        limit fell as nodes joined), to the best node anywhere. Later nodes never
        attract a slot, so a plan fresh from :func:`place` is left as it is (the
        nodes before each slot's own failed when it was placed and still fail).
        Replicas of services that others have affinity to stay put (moving one
        would strand its followers). Global services never move.
        """
        for svc in self._ordered:
            if svc.is_global or svc.is_target or svc.unplaced == len(svc.slots):
                continue
            positions = slot_positions(self._key, svc.spec.id, len(svc.slots))
            ctx = self._context(svc)
            for i, j0 in enumerate(svc.slots):
                if j0 < 0:
                    continue
                self._unassign(svc, i, j0)
                if ctx.zone_count is not None:
                    assert ctx.zone_of is not None
                    ctx.zone_count[ctx.zone_of[j0]] -= 1
                j = self._better_node(ctx, svc, i, j0, positions[i])
                self._assign(svc, i, j)
                if ctx.zone_count is not None:
                    assert ctx.zone_of is not None
                    ctx.zone_count[ctx.zone_of[j]] += 1

    def _preference(
        self,
        ctx: _Ctx,
        svc: _Svc,
        index: int,
        position: int | None = None,
        *,
        restrict: bool = True,
    ) -> Iterator[int]:
        if ctx.binpack:
            return (j for j in ctx.order if ctx.cmask[j])
        if position is None:
            position = slot_position(self._key, svc.spec.id, index)
        return self._sequence(ctx, position, restrict=restrict)

    def _better_node(self, ctx: _Ctx, svc: _Svc, index: int, j0: int, position: int) -> int:
        """Where a rebalance puts slot ``index`` (taken off ``j0``): see :meth:`_rebalance`."""
        if svc.is_target:
            return j0
        if self._level(ctx, j0) == _INFEASIBLE:
            j, _ = self._choose(ctx, self._preference(ctx, svc, index, position), 0)
            return j if j >= 0 else j0
        for j in self._preference(ctx, svc, index, position):
            if j == j0:
                break
            if self._level(ctx, j) == 0:
                return j
        return j0

    def _changes(
        self,
        touched: dict[int, int],
        gtouched: dict[tuple[int, int], bool],
        global_before: dict[int, set[int]],
        names: dict[int, ServiceId],
    ) -> list[Change]:
        ids = self._ids
        out: list[tuple[tuple[str, int, str], Change]] = []
        for key, old in touched.items():
            sidx, slot = key >> _SLOT_BITS, key & _SLOT_MASK
            svc = self._by_sidx.get(sidx)
            new = svc.slots[slot] if svc is not None and slot < len(svc.slots) else -1
            if new != old:
                sid = svc.spec.id if svc is not None else names[sidx]
                change = Change(sid, slot, ids[old] if old >= 0 else None, ids[new] if new >= 0 else None)
                out.append(((sid, slot, ""), change))
        before: dict[tuple[int, int], bool] = dict(gtouched)
        for sidx, nodes in global_before.items():
            for j in nodes:
                before.setdefault((sidx, j), True)
        after: set[tuple[int, int]] = set()
        for svc in self._ordered:
            if svc.is_global:
                after.update((svc.sidx, j) for j in svc.cnt)
        for pair in set(before) | after:
            sidx, j = pair
            if (pair in before) != (pair in after):
                svc = self._by_sidx.get(sidx)
                sid = svc.spec.id if svc is not None else names[sidx]
                was = pair in before
                change = Change(sid, None, ids[j] if was else None, None if was else ids[j])
                out.append(((sid, -1, ids[j]), change))
        out.sort(key=lambda e: e[0])
        return [c for _, c in out]

    # ------------------------------------------------------------------ explanations

    def _failure(self, svc: _Svc, j: int, k: int) -> tuple[str, str, str, int]:
        """The first hard filter node ``j`` fails for a new replica of ``svc``.

        Returns:
            ``(code, group, text, amount)``: ``group`` tells reasons of one code
            apart (the constraint, port or service), ``text`` completes "N nodes
            ...", ``amount`` is the free cpu or memory for ``best has``. ``code`` is
            ``""`` if the node passes every hard filter.
        """
        node = self._info[j]
        assert node is not None
        spec = svc.spec
        if node.state is not NodeState.ALIVE:
            code = "suspect" if node.state is NodeState.SUSPECT else "down"
            return code, "", code, 0
        if node.availability is not Availability.ACTIVE:
            code = "paused" if node.availability is Availability.PAUSE else "draining"
            return code, "", code, 0
        if not svc.sig.cmask[j]:
            failed = self._failed_constraint(svc.sig, j)
            return "constraint", failed, f"failed constraint {failed}", 0
        for port in spec.ports:
            if port in self._ports[j]:
                return "port", str(port), f"had host port {port} in use", 0
        for other in svc.anti:
            o = self._svcs.get(other)
            if o is not None and j in o.cnt:
                return "anti_affinity", other, f"ran {other} (anti-affinity)", 0
        for target in spec.affinity:
            t = self._svcs.get(target)
            if t is None:
                return "affinity", target, f"did not run {target} (affinity; no such service)", 0
            if j not in t.cnt:
                return "affinity", target, f"did not run {target} (affinity)", 0
        if svc.cnt.get(j, 0) >= k:
            return "max_per_node", "", f"already ran {k} of {spec.id} (max {k} per node)", 0
        if self._cpu[j] < spec.resources.cpu_millis:
            return "cpu", "", "lacked cpu", self._cpu[j]
        if self._mem[j] < spec.resources.memory_bytes:
            return "memory", "", "lacked memory", self._mem[j]
        return "", "", "", 0

    def _failed_constraint(self, sig: _Sig, j: int) -> str:
        """The first of the signature's constraints node ``j`` fails, as text (cached)."""
        if sig.failed_version != self._ring_version:
            sig.failed = {}
            sig.failed_version = self._ring_version
        text = sig.failed.get(j)
        if text is None:
            node = self._info[j]
            assert node is not None
            text = str(first_failed(sig.constraints, node))
            sig.failed[j] = text
        return text

    def _reasons(self, svc: _Svc, nodes: Iterable[int]) -> tuple[Reason, ...]:
        k = self._k(svc)
        order = list(_REASON_ORDER)
        counts: dict[tuple[str, str], int] = {}
        texts: dict[tuple[str, str], str] = {}
        best: dict[tuple[str, str], int] = {}
        mask = svc.sig.mask
        cpu = self._cpu
        mem = self._mem
        need_cpu = svc.spec.resources.cpu_millis
        need_mem = svc.spec.resources.memory_bytes
        cnt = svc.cnt
        simple = not svc.spec.ports and not svc.anti and not svc.spec.affinity
        for j in nodes:
            if simple and mask[j] and cnt.get(j, 0) < k:
                # the common case, inlined: only cpu or memory can fail here
                if cpu[j] < need_cpu:
                    pair, text, amount = ("cpu", ""), "lacked cpu", cpu[j]
                elif mem[j] < need_mem:
                    pair, text, amount = ("memory", ""), "lacked memory", mem[j]
                else:
                    raise AssertionError(f"node {self._ids[j]} could take a replica of {svc.spec.id}")
            else:
                code, group, text, amount = self._failure(svc, j, k)
                assert code, f"node {self._ids[j]} could take a replica of {svc.spec.id}"
                pair = (code, group)
            counts[pair] = counts.get(pair, 0) + 1
            texts[pair] = text
            if amount > best.get(pair, -1):
                best[pair] = amount
        constraint_rank = {str(c): n for n, c in enumerate(svc.sig.constraints)}

        def sort_key(pair: tuple[str, str]) -> tuple[int, int, str]:
            code, group = pair
            sub = constraint_rank.get(group, 0) if code == "constraint" else 0
            return order.index(code), sub, group.zfill(5) if code == "port" else group

        reasons: list[Reason] = []
        res = svc.spec.resources
        for pair in sorted(counts, key=sort_key):
            code, _ = pair
            n = counts[pair]
            subject = f"{n} node" if n == 1 else f"{n} nodes"
            if code in _STATE_WORDS:
                verb = "was" if n == 1 else "were"
                text = f"{subject} {verb} {_STATE_WORDS[code]}"
            elif code == "cpu":
                text = f"{subject} lacked cpu: need {format_cpu(res.cpu_millis)}, best has {format_cpu(best[pair])}"
            elif code == "memory":
                text = (
                    f"{subject} lacked memory: need {format_memory(res.memory_bytes)}, "
                    f"best has {format_memory(best[pair])}"
                )
            else:
                text = f"{subject} {texts[pair]}"
            reasons.append(Reason(code, n, text))
        if not reasons:
            reasons.append(Reason("no_nodes", 0, "the cluster has no nodes"))
        return tuple(reasons)

    def _explain_all_unplaced(self) -> dict[ServiceId, Unplaced]:
        out: dict[ServiceId, Unplaced] = {}
        live = [j for j, info in enumerate(self._info) if info is not None]
        for sid in sorted(self._svcs):
            svc = self._svcs[sid]
            if svc.spec.is_global:
                mask = svc.sig.mask
                missing = [j for j in live if mask[j] and j not in svc.cnt]
                if missing:
                    out[sid] = Unplaced(
                        service=sid,
                        desired=svc.sig.feasible,
                        slots=(),
                        nodes=tuple(sorted(self._ids[j] for j in missing)),
                        reasons=self._reasons(svc, missing),
                    )
            elif svc.unplaced:
                out[sid] = Unplaced(
                    service=sid,
                    desired=len(svc.slots),
                    slots=tuple(i for i, j in enumerate(svc.slots) if j < 0),
                    nodes=(),
                    reasons=self._reasons(svc, live),
                )
        return out

    def _skip_text(self, ctx: _Ctx, j: int, level: int) -> str:
        if level == _INFEASIBLE:
            code, _, text, amount = self._failure(ctx.svc, j, ctx.k)
            if code == "cpu":
                return f"lacked cpu: need {format_cpu(ctx.cpu)}, has {format_cpu(amount)}"
            if code == "memory":
                return f"lacked memory: need {format_memory(ctx.mem)}, has {format_memory(amount)}"
            if code in _STATE_WORDS:
                return _STATE_WORDS[code]
            return text
        parts = []
        if level in (1, 3) and ctx.zone_of is not None:
            assert ctx.quota is not None
            key = ctx.svc.spec.spread_over
            zones = self._zones_for(key or "")
            zone = ctx.zone_of[j]
            parts.append(f"{key} {zones.names[zone]} at its spread quota {ctx.quota[zone]}")
        if level in (2, 3):
            room = f", keeping room for {ctx.svc.followers} beside it" if ctx.svc.followers else ""
            parts.append(f"at the load cap {self._cap}{room}")
        return ", ".join(parts)

    def _explain_placed(self, svc: _Svc, index: int, j0: int) -> str:
        ctx = self._context(svc)
        ids = self._ids
        label = f"{svc.spec.id}[{index}] runs on {ids[j0]}"
        how = "in the cluster-wide binpack ranking" if ctx.binpack else "in this slot's preference order"
        target = self._better_node(ctx, svc, index, j0, slot_position(self._key, svc.spec.id, index))
        if target != j0:
            return (
                f"{label}: replicas stay where they run while their node keeps them and "
                f"the hard filters hold; {ids[target]} could take it now, so a rebalance "
                "would move it there."
            )
        own = self._level(ctx, j0)
        before: list[int] = []
        levels: dict[int, int] = {}
        for j in self._preference(ctx, svc, index, restrict=False):
            if j == j0:
                break
            if j not in levels:
                levels[j] = self._level(ctx, j)
                before.append(j)
        text = f"{label}: node {len(before) + 1} {how}"
        if before:
            limit = self._config.explain_max_nodes
            shown = [f"{ids[j]} ({self._skip_text(ctx, j, levels[j])})" for j in before[:limit]]
            more = len(before) - len(shown)
            text += "; skipped " + ", ".join(shown) + (f" and {more} more" if more else "")
        if own in (1, 3):
            text += f"; its {svc.spec.spread_over} group is at or above its spread quota"
        if own in (2, 3):
            text += f"; it is at or above the load cap {self._cap}"
        return text + "."

    def _explain_global(self, svc: _Svc, node: NodeId | None) -> str:
        sid = svc.spec.id
        if node is None:
            text = self.plan.explain_unplaced(sid)
            return f"{sid} is global: it runs on every node that passes its filters ({len(svc.cnt)} now)." + (
                f" {text}" if text else ""
            )
        j = self._index.get(node)
        if j is None or self._info[j] is None:
            raise ConfigError(f"no node {node!r}; meshctl nodes lists the nodes")
        if j in svc.cnt:
            return f"{sid} runs on {node}: a global service runs on every node that passes its filters."
        code, _, text, amount = self._failure(svc, j, 1)
        if not svc.sig.cmask[j]:
            failed = self._failed_constraint(svc.sig, j)
            return f"{sid} does not run on {node}: it failed constraint {failed}."
        if code == "cpu":
            text = f"lacked cpu: need {format_cpu(svc.spec.resources.cpu_millis)}, has {format_cpu(amount)}"
        elif code == "memory":
            text = (
                f"lacked memory: need {format_memory(svc.spec.resources.memory_bytes)}, "
                f"has {format_memory(amount)}"
            )
        elif code in _STATE_WORDS:
            text = f"was {_STATE_WORDS[code]}"
        return f"{sid} does not run on {node}: it {text}."


_REASON_ORDER: Final = (
    "down",
    "suspect",
    "paused",
    "draining",
    "constraint",
    "port",
    "anti_affinity",
    "affinity",
    "max_per_node",
    "cpu",
    "memory",
)
_STATE_WORDS: Final = {"down": "down", "suspect": "suspect", "paused": "paused", "draining": "draining"}


def _water_fill(total: int, capacity: list[int], tie: list[int]) -> list[int]:
    """Split ``total`` over groups as evenly as their capacities allow.

    Groups that cannot reach the even share get their capacity; the others share
    the rest, differing by at most one; the extra ones go to the groups with the
    lowest ``tie`` value.
    """
    quota = [0] * len(capacity)
    open_groups = sorted(range(len(capacity)), key=lambda g: (capacity[g], tie[g]))
    remaining = min(total, sum(capacity))
    while open_groups:
        share = remaining // len(open_groups)
        g = open_groups[0]
        if capacity[g] <= share:
            quota[g] = capacity[g]
            remaining -= capacity[g]
            open_groups.pop(0)
            continue
        extra = remaining - share * len(open_groups)
        for rank, g in enumerate(sorted(open_groups, key=lambda g: tie[g])):
            quota[g] = share + (1 if rank < extra else 0)
        break
    return quota


def _check_unique(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ConfigError(f"{what} {i!r} is listed twice")
        seen.add(i)


def place(
    specs: Iterable[ServiceSpec],
    nodes: Iterable[NodeInfo],
    current: Current | None = None,
    *,
    rebalance: bool = False,
    config: PlacementConfig | None = None,
) -> Plan:
    """Place every replica of every service: a pure function of its arguments.

    Args:
        specs: the services.
        nodes: every known node, whatever its state.
        current: the allocations in force (the last plan's ``assignments``); each
            stays where it is while its node keeps replicas and its hard filters
            hold.
        rebalance: also move replicas whose preference order now puts another node
            first (about 1/N of them after one node joins).
        config: tunables (the defaults unless every node agrees otherwise).

    Returns:
        The plan: assignments per slot and the reasons for unplaced replicas.

    Raises:
        ConfigError: a node or service id is listed twice.
    """
    scheduler = Scheduler(specs, nodes, current, config=config)
    if rebalance:
        scheduler.rebalance()
    return scheduler.plan


def explain(
    specs: Iterable[ServiceSpec],
    nodes: Iterable[NodeInfo],
    assignments: Current,
    service: ServiceId,
    index: int | None = None,
    *,
    node: NodeId | None = None,
    config: PlacementConfig | None = None,
) -> str:
    """Explain one replica of a committed plan (see :meth:`Scheduler.explain`).

    Rebuilds the scheduler state from the inputs, so it costs about as much as
    :func:`place`; a leader that keeps a :class:`Scheduler` should ask it instead.

    Raises:
        ConfigError: no such service, slot or node.
    """
    return Scheduler(specs, nodes, assignments, config=config).explain(service, index, node)
