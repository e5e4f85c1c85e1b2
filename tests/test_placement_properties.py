"""Hypothesis properties of placement, checked against simple reference code.

Every property draws a small cluster (nodes with zones, disks, sizes, states) and a
few services (constraints, resources, ports, limits, spread, affinity, global,
binpack), places them, and checks the plan with code written independently of the
scheduler: hard constraints, resources, balance, stability, determinism,
idempotence, explanations, and that incremental updates equal a fresh ``place()``.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.placement import (
    Availability,
    Change,
    Mode,
    NodeInfo,
    NodeState,
    PlacementConfig,
    Plan,
    Resources,
    Scheduler,
    ServiceSpec,
    Strategy,
    matches,
    parse_constraints,
    place,
)
from mesh.types import NodeId, ServiceId

MIB = 2**20
ZONES = ("a", "b", "c")
CONSTRAINTS = (
    "zone==a",
    "zone!=b",
    "zone in (a, c)",
    "zone not in (c)",
    "disk exists",
    "disk==ssd",
    "node.platform.os==linux",
    "node.id!=n0",
)
CONFIG = PlacementConfig(vnodes_per_node=8, walk_steps=6)
"""Few points and short walks, so that the coarse-ring fallback is exercised too."""

# -- strategies -----------------------------------------------------------------------


@st.composite
def a_node(draw: st.DrawFn, name: str, live: bool = False) -> NodeInfo:
    labels: dict[str, str] = {}
    zone = draw(st.sampled_from((*ZONES, None)))
    if zone is not None:
        labels["zone"] = zone
    if draw(st.booleans()):
        labels["disk"] = draw(st.sampled_from(("ssd", "hdd")))
    states = (NodeState.ALIVE,) if live else (NodeState.ALIVE,) * 6 + tuple(NodeState)
    availabilities = (Availability.ACTIVE,) if live else (Availability.ACTIVE,) * 6 + tuple(Availability)
    return NodeInfo(
        NodeId(name),
        labels=labels,
        attributes={"platform.os": draw(st.sampled_from(("linux", "linux", "windows")))},
        capacity=Resources(
            draw(st.sampled_from((500, 1000, 2000, 4000))),
            draw(st.sampled_from((256, 512, 1024, 4096))) * MIB,
        ),
        state=draw(st.sampled_from(states)),
        availability=draw(st.sampled_from(availabilities)),
    )


@st.composite
def a_cluster(draw: st.DrawFn, min_nodes: int = 0, max_nodes: int = 9) -> list[NodeInfo]:
    count = draw(st.integers(min_nodes, max_nodes))
    return [draw(a_node(f"n{i}")) for i in range(count)]


@st.composite
def a_spec(draw: st.DrawFn, index: int, earlier: Sequence[ServiceId]) -> ServiceSpec:
    sid = ServiceId(f"s{index}")
    affinity: tuple[ServiceId, ...] = ()
    anti: tuple[ServiceId, ...] = ()
    if earlier and draw(st.integers(0, 4)) == 0:
        affinity = (draw(st.sampled_from(earlier)),)
    others = [s for s in earlier if s not in affinity]
    if others and draw(st.integers(0, 4)) == 0:
        anti = (draw(st.sampled_from(others)),)
    return ServiceSpec(
        sid,
        replicas=draw(st.integers(0, 8)),
        mode=Mode.GLOBAL if draw(st.integers(0, 7)) == 0 else Mode.REPLICATED,
        strategy=Strategy.BINPACK if draw(st.integers(0, 4)) == 0 else Strategy.SPREAD,
        constraints=parse_constraints(draw(st.lists(st.sampled_from(CONSTRAINTS), max_size=2, unique=True))),
        resources=Resources(
            draw(st.sampled_from((0, 100, 250, 500))), draw(st.sampled_from((0, 64, 128, 512))) * MIB
        ),
        ports=draw(st.sampled_from(((), (), (80,), (443,), (80, 443)))),
        max_per_node=draw(st.sampled_from((None, None, 1, 2, 3))),
        spread_over=draw(st.sampled_from((None, None, "zone"))),
        affinity=affinity,
        anti_affinity=anti,
    )


@st.composite
def a_workload(draw: st.DrawFn, max_services: int = 6) -> list[ServiceSpec]:
    specs: list[ServiceSpec] = []
    for i in range(draw(st.integers(0, max_services))):
        specs.append(draw(a_spec(i, [s.id for s in specs])))
    return specs


# -- reference checks -----------------------------------------------------------------


def default_k(spec: ServiceSpec, nodes: Sequence[NodeInfo], eps: Fraction = Fraction(1, 4)) -> int | None:
    """The per-node limit a new replica respects (None: no limit)."""
    if spec.max_per_node is not None:
        return spec.max_per_node
    if spec.strategy is Strategy.BINPACK:
        return None
    feasible = sum(1 for n in nodes if n.schedulable and all(matches(c, n) for c in spec.constraints))
    if feasible == 0 or spec.replicas <= feasible:
        return 1
    return math.ceil((1 + eps) * Fraction(spec.replicas, feasible))


def anti_sets(specs: Sequence[ServiceSpec]) -> dict[ServiceId, set[ServiceId]]:
    anti: dict[ServiceId, set[ServiceId]] = {s.id: set(s.anti_affinity) for s in specs}
    for s in specs:
        for other in s.anti_affinity:
            if other in anti:
                anti[other].add(s.id)
    return anti


def check_hard_constraints(
    specs: Sequence[ServiceSpec], nodes: Sequence[NodeInfo], plan: Plan, *, fresh: bool
) -> None:
    """Every placed replica satisfies every hard filter; nothing is over-committed."""
    by_id = {n.id: n for n in nodes}
    cpu: Counter[NodeId] = Counter()
    mem: Counter[NodeId] = Counter()
    ports: Counter[tuple[NodeId, int]] = Counter()
    running: dict[ServiceId, Counter[NodeId]] = {}
    assert set(plan.assignments) == {s.id for s in specs}
    for spec in specs:
        slots = plan.assignments[spec.id]
        if not spec.is_global:
            assert len(slots) == spec.replicas
            unplaced = plan.unplaced.get(spec.id)
            missing = tuple(i for i, n in enumerate(slots) if n is None)
            assert (unplaced.slots if unplaced else ()) == missing
        counts = running[spec.id] = Counter(n for n in slots if n is not None)
        for node_id, count in counts.items():
            node = by_id[node_id]
            assert node.keeps_replicas
            if fresh:
                assert node.schedulable
            for c in spec.constraints:
                assert matches(c, node), f"{spec.id} on {node_id} breaks {c}"
            cpu[node_id] += count * spec.resources.cpu_millis
            mem[node_id] += count * spec.resources.memory_bytes
            for port in spec.ports:
                ports[(node_id, port)] += count
            if spec.max_per_node is not None:
                assert count <= spec.max_per_node
            k = default_k(spec, nodes)
            if fresh and k is not None and not spec.is_global:
                assert count <= k, f"{spec.id} has {count} on {node_id}, default limit {k}"
    for node_id in cpu:
        node = by_id[node_id]
        assert cpu[node_id] <= node.capacity.cpu_millis, f"cpu over-committed on {node_id}"
        assert mem[node_id] <= node.capacity.memory_bytes, f"memory over-committed on {node_id}"
    assert all(count == 1 for count in ports.values()), "a host port is shared"
    anti = anti_sets(specs)
    for spec in specs:
        for node_id in running[spec.id]:
            for other in anti[spec.id]:
                assert node_id not in running.get(other, {}), f"{spec.id} and {other} share {node_id}"
            for target in spec.affinity:
                assert node_id in running.get(target, {}), f"{spec.id} on {node_id} without {target}"
    for spec in specs:
        if spec.is_global:
            eligible = {n.id for n in nodes if n.schedulable and all(matches(c, n) for c in spec.constraints)}
            placed = set(plan.assignments[spec.id])
            if fresh:
                assert placed <= eligible
            unplaced = plan.unplaced.get(spec.id)
            assert set(unplaced.nodes if unplaced else ()) == eligible - placed


def reference_reason(
    spec: ServiceSpec, node: NodeInfo, plan: Plan, specs: Sequence[ServiceSpec], nodes: Sequence[NodeInfo]
) -> str | None:
    """The first hard filter ``node`` fails for one more replica of ``spec``."""
    if node.state is not NodeState.ALIVE:
        return "suspect" if node.state is NodeState.SUSPECT else "down"
    if node.availability is not Availability.ACTIVE:
        return "paused" if node.availability is Availability.PAUSE else "draining"
    if not all(matches(c, node) for c in spec.constraints):
        return "constraint"
    on_node = {s.id: plan.assignments[s.id].count(node.id) for s in specs}
    by_id = {s.id: s for s in specs}
    if any(on_node[s.id] and set(s.ports) & set(spec.ports) for s in specs):
        return "port"
    if any(on_node.get(other, 0) for other in anti_sets(specs)[spec.id]):
        return "anti_affinity"
    if any(not on_node.get(t, 0) for t in spec.affinity):
        return "affinity"
    k = 1 if spec.is_global else default_k(spec, nodes)
    if k is not None and on_node[spec.id] >= k:
        return "max_per_node"
    free_cpu = node.capacity.cpu_millis - sum(on_node[s] * by_id[s].resources.cpu_millis for s in on_node)
    free_mem = node.capacity.memory_bytes - sum(on_node[s] * by_id[s].resources.memory_bytes for s in on_node)
    if free_cpu < spec.resources.cpu_millis:
        return "cpu"
    if free_mem < spec.resources.memory_bytes:
        return "memory"
    return None


def check_explanations(specs: Sequence[ServiceSpec], nodes: Sequence[NodeInfo], plan: Plan) -> None:
    """Each unplaced service's reasons count every relevant node once, under the
    same first failing filter the reference finds."""
    live = list(nodes)
    for spec in specs:
        entry = plan.unplaced.get(spec.id)
        if entry is None:
            continue
        counted = Counter()
        for reason in entry.reasons:
            counted[reason.code] += reason.nodes
            if reason.code != "no_nodes":
                assert reason.text.startswith(f"{reason.nodes} node")
        if spec.is_global:
            relevant = [n for n in live if n.id in entry.nodes]
        else:
            relevant = live
        expected = Counter(reference_reason(spec, n, plan, specs, nodes) for n in relevant)
        assert None not in expected, f"a node could take {spec.id}, yet it is unplaced"
        if relevant:
            assert counted == expected, entry.text
        else:
            assert [r.code for r in entry.reasons] == ["no_nodes"]
        assert entry.text.startswith(f"{spec.id}: {entry.count} of ")


def unchanged_except(
    before: Plan, after: Plan, node_id: NodeId | None, global_ids: set[ServiceId]
) -> None:
    """Every replica not on ``node_id`` is where it was."""
    for sid, slots in before.assignments.items():
        new = after.assignments[sid]
        if sid in global_ids:
            kept = set(slots) - {node_id}
            assert kept <= set(new), f"global {sid} lost {kept - set(new)}"
            continue
        for i, n in enumerate(slots):
            if n is not None and n != node_id:
                assert new[i] == n, f"{sid}[{i}] moved from {n} to {new[i]}"


# -- properties -----------------------------------------------------------------------


@given(a_workload(), a_cluster(), st.randoms(use_true_random=False))
def test_hard_constraints_resources_and_explanations(
    specs: list[ServiceSpec], nodes: list[NodeInfo], rnd: random.Random
) -> None:
    plan = place(specs, nodes, config=CONFIG)
    check_hard_constraints(specs, nodes, plan, fresh=True)
    check_explanations(specs, nodes, plan)
    eligible = sum(1 for n in nodes if n.schedulable)
    if eligible:
        total = sum(s.replicas for s in specs if not s.is_global and s.strategy is Strategy.SPREAD)
        assert plan.load_cap <= math.ceil(Fraction(5, 4) * Fraction(total, eligible))
    # determinism: the order of the inputs does not matter
    shuffled_specs, shuffled_nodes = specs[:], nodes[:]
    rnd.shuffle(shuffled_specs)
    rnd.shuffle(shuffled_nodes)
    assert place(shuffled_specs, shuffled_nodes, config=CONFIG) == plan


@given(a_workload(), a_cluster(), st.randoms(use_true_random=False))
def test_idempotent_and_kept_allocations_stay_valid(
    specs: list[ServiceSpec], nodes: list[NodeInfo], rnd: random.Random
) -> None:
    plan = place(specs, nodes, config=CONFIG)
    current = dict(plan.assignments)
    keys = list(current)
    rnd.shuffle(keys)
    again = place(specs, nodes, {k: current[k] for k in keys}, config=CONFIG)
    assert again == plan
    assert place(specs, nodes, plan.assignments, rebalance=True, config=CONFIG) == plan


@given(a_workload(), a_cluster(min_nodes=1), st.data())
def test_node_loss_moves_exactly_its_replicas(
    specs: list[ServiceSpec], nodes: list[NodeInfo], data: st.DataObject
) -> None:
    global_ids = {s.id for s in specs if s.is_global}
    plan = place(specs, nodes, config=CONFIG)
    victim = data.draw(st.sampled_from(nodes))
    how = data.draw(st.sampled_from(("removed", "dead", "drained")))
    if how == "removed":
        after_nodes = [n for n in nodes if n.id != victim.id]
    else:
        changed = NodeInfo(
            victim.id, victim.labels, victim.attributes, victim.capacity,
            state=NodeState.DEAD if how == "dead" else victim.state,
            availability=Availability.DRAIN if how == "drained" else victim.availability,
        )
        after_nodes = [changed if n.id == victim.id else n for n in nodes]
    after = place(specs, after_nodes, plan.assignments, config=CONFIG)
    unchanged_except(plan, after, victim.id, global_ids)
    for slots in after.assignments.values():
        assert victim.id not in slots
    check_hard_constraints(specs, after_nodes, after, fresh=False)
    check_explanations(specs, after_nodes, after)
    # the incremental scheduler reports exactly those moves, and the same plan
    scheduler = Scheduler(specs, nodes, config=CONFIG)
    if how == "removed":
        changes = scheduler.remove_node(victim.id)
    else:
        changes = scheduler.upsert_node(after_nodes[[n.id for n in nodes].index(victim.id)])
    assert scheduler.plan == after
    assert all(c.old == victim.id or c.old is None for c in changes)
    assert {(c.service, c.index) for c in changes if c.old == victim.id} == {
        (sid, None if sid in global_ids else i)
        for sid, slots in plan.assignments.items()
        for i, n in enumerate(slots)
        if n == victim.id
    }


@given(a_workload(), a_cluster(), st.data())
def test_node_arrival_moves_nothing_without_rebalance(
    specs: list[ServiceSpec], nodes: list[NodeInfo], data: st.DataObject
) -> None:
    plan = place(specs, nodes, config=CONFIG)
    newcomer = data.draw(a_node("new", live=True))
    after = place(specs, [*nodes, newcomer], plan.assignments, config=CONFIG)
    unchanged_except(plan, after, None, {s.id for s in specs if s.is_global})
    scheduler = Scheduler(specs, nodes, config=CONFIG)
    changes = scheduler.upsert_node(newcomer)
    assert all(c.old is None for c in changes)  # only starts: unplaced ones may now fit
    assert scheduler.plan == after
    rebalanced = scheduler.rebalance()
    assert scheduler.plan == place(specs, [*nodes, newcomer], plan.assignments, rebalance=True, config=CONFIG)
    check_hard_constraints(specs, [*nodes, newcomer], scheduler.plan, fresh=False)
    # a rebalance moves replicas and may start some in the room it freed; it stops none
    assert all(c.new is not None for c in rebalanced)


@given(st.integers(1, 12), st.lists(st.integers(1, 12), min_size=1, max_size=8), st.booleans())
def test_balance_within_the_bound(node_count: int, replicas: list[int], spread: bool) -> None:
    nodes = [NodeInfo(NodeId(f"n{i}"), labels={"zone": ZONES[i % 3]}) for i in range(node_count)]
    specs = [
        ServiceSpec(ServiceId(f"s{i}"), replicas=r, max_per_node=r, spread_over="zone" if spread else None)
        for i, r in enumerate(replicas)
    ]
    plan = place(specs, nodes, config=CONFIG)
    total = sum(replicas)
    avg = Fraction(total, node_count)
    assert plan.load_cap == max(math.ceil(avg), math.floor(Fraction(5, 4) * avg))
    assert max(plan.load().values()) <= plan.load_cap
    assert plan.placed_count == total


OPS = st.one_of(
    st.tuples(st.just("remove_node"), st.integers(0, 20)),
    st.tuples(st.just("kill"), st.integers(0, 20)),
    st.tuples(st.just("revive"), st.integers(0, 20)),
    st.tuples(st.just("drain"), st.integers(0, 20)),
    st.tuples(st.just("relabel"), st.integers(0, 20), st.sampled_from(ZONES)),
    st.tuples(st.just("add_node"), st.integers(0, 1000)),
    st.tuples(st.just("scale"), st.integers(0, 20), st.integers(0, 8)),
    st.tuples(st.just("remove_service"), st.integers(0, 20)),
    st.tuples(st.just("add_service"), st.integers(0, 1000)),
    st.tuples(st.just("rebalance")),
)


@settings(max_examples=60)
@given(a_workload(max_services=5), a_cluster(max_nodes=7), st.lists(OPS, max_size=6), st.data())
def test_incremental_updates_equal_a_fresh_placement(
    specs: list[ServiceSpec],
    nodes: list[NodeInfo],
    ops: list[tuple[object, ...]],
    data: st.DataObject,
) -> None:
    scheduler = Scheduler(specs, nodes, config=CONFIG)
    plan = scheduler.plan
    assert plan == place(specs, nodes, config=CONFIG)
    for op in ops:
        kind = op[0]
        rebalance = False
        specs_before = specs
        if kind == "rebalance":
            changes = scheduler.rebalance()
            rebalance = True
        elif kind == "add_node":
            new = data.draw(a_node(f"x{op[1]}"))
            if any(n.id == new.id for n in nodes):
                continue
            nodes = [*nodes, new]
            changes = scheduler.upsert_node(new)
        elif kind == "add_service":
            index = 100 + int(op[1])  # type: ignore[call-overload]
            if any(s.id == f"s{index}" for s in specs):
                continue
            spec = data.draw(a_spec(index, [s.id for s in specs]))
            specs = [*specs, spec]
            changes = scheduler.upsert_service(spec)
        elif kind in ("scale", "remove_service"):
            if not specs:
                continue
            target = specs[int(op[1]) % len(specs)]  # type: ignore[call-overload]
            if kind == "scale":
                spec = ServiceSpec(**{f: getattr(target, f) for f in target.__slots__ if f != "replicas"},
                                   replicas=int(op[2]))  # type: ignore[call-overload, arg-type]
                specs = [spec if s.id == target.id else s for s in specs]
                changes = scheduler.upsert_service(spec)
            else:
                specs = [s for s in specs if s.id != target.id]
                changes = scheduler.remove_service(target.id)
        else:
            if not nodes:
                continue
            victim = nodes[int(op[1]) % len(nodes)]  # type: ignore[call-overload]
            if kind == "remove_node":
                nodes = [n for n in nodes if n.id != victim.id]
                changes = scheduler.remove_node(victim.id)
            else:
                state, availability, labels = victim.state, victim.availability, dict(victim.labels)
                if kind == "kill":
                    state = NodeState.DEAD
                elif kind == "revive":
                    state, availability = NodeState.ALIVE, Availability.ACTIVE
                elif kind == "drain":
                    availability = Availability.DRAIN
                else:
                    labels["zone"] = str(op[2])
                changed = NodeInfo(victim.id, labels, victim.attributes, victim.capacity, state, availability)
                nodes = [changed if n.id == victim.id else n for n in nodes]
                changes = scheduler.upsert_node(changed)
        expected = place(specs, nodes, plan.assignments, rebalance=rebalance, config=CONFIG)
        new_plan = scheduler.plan
        assert new_plan == expected, f"after {op}"
        assert changes == diff(plan, new_plan, specs_before, specs), f"after {op}"
        plan = new_plan


def diff(
    before: Plan, after: Plan, specs_before: Sequence[ServiceSpec], specs_after: Sequence[ServiceSpec]
) -> list[Change]:
    """The changes between two plans, computed the slow obvious way."""
    mode_before = {s.id: s.is_global for s in specs_before}
    mode_after = {s.id: s.is_global for s in specs_after}
    out: list[tuple[tuple[str, int, str], Change]] = []

    def slots(plan: Plan, sid: ServiceId, mode: Mapping[ServiceId, bool], is_global: bool) -> tuple[NodeId | None, ...]:
        if sid in mode and mode[sid] == is_global:
            return plan.assignments[sid]
        return ()

    for sid in sorted(set(mode_before) | set(mode_after)):
        for is_global in (False, True):
            old = slots(before, sid, mode_before, is_global)
            new = slots(after, sid, mode_after, is_global)
            if is_global:
                for n in sorted(set(old) ^ set(new), key=str):
                    assert n is not None
                    was = n in old
                    out.append(((sid, -1, n), Change(sid, None, n if was else None, None if was else n)))
            else:
                for i in range(max(len(old), len(new))):
                    o = old[i] if i < len(old) else None
                    w = new[i] if i < len(new) else None
                    if o != w:
                        out.append(((sid, i, ""), Change(sid, i, o, w)))
    out.sort(key=lambda e: e[0])
    return [c for _, c in out]


# -- across processes -----------------------------------------------------------------

_SCENARIO = """
import json, sys
from mesh.placement import *
from mesh.types import NodeId, ServiceId
zones = ["east", "west", "north"]
nodes = [NodeInfo(NodeId(f"node-{i}"), labels={"zone": zones[i % 3], "disk": "ssd" if i % 2 else "hdd"},
                  capacity=Resources(2000 + 500 * (i % 3), (1 + i % 4) * 2**30)) for i in range(40)]
specs = []
for s in range(30):
    specs.append(ServiceSpec(ServiceId(f"svc-{s}"), replicas=1 + s % 7,
        constraints=parse_constraints([["zone!=west"], [], ["disk in (ssd)"]][s % 3]),
        resources=Resources(100 * (s % 4), 2**27 * (s % 3)), spread_over="zone" if s % 4 == 0 else None,
        strategy=Strategy.BINPACK if s % 9 == 0 else Strategy.SPREAD, ports=(8000 + s % 5,) if s % 6 == 0 else (),
        affinity=(ServiceId(f"svc-{s - 1}"),) if s % 10 == 5 else (),
        anti_affinity=(ServiceId(f"svc-{s - 2}"),) if s % 10 == 7 else ()))
specs.append(ServiceSpec(ServiceId("agent"), mode=Mode.GLOBAL, resources=Resources(50, 2**26)))
order = sys.argv[1:] == ["reverse"]
plan = place(specs[::-1] if order else specs, nodes[::-1] if order else nodes)
print(json.dumps([plan.digest(), sorted(u.text for u in plan.unplaced.values()), plan.load_cap]))
"""


@pytest.mark.parametrize("seed", ["0", "4242"])
def test_identical_plan_under_another_hash_seed(seed: str) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _SCENARIO, *args], env=env, check=True, capture_output=True, text=True
        ).stdout
        for args in ([], ["reverse"])
    ]
    here: dict[str, object] = {}
    exec(compile(_SCENARIO.replace("sys.argv[1:]", "[]"), "<scenario>", "exec"), here)  # noqa: S102
    expected = json.dumps(json.loads(outputs[0]))
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])[0] == here["plan"].digest()  # type: ignore[attr-defined]
    assert expected == outputs[0].strip()
