"""Focused unit tests of the scheduler: each filter, strategy, update and explanation."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mesh.errors import ConfigError
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
    explain,
    parse_constraints,
    place,
)
from mesh.types import NodeId, ServiceId

MIB = 2**20
GIB = 2**30
S = ServiceId
N = NodeId


def node(
    name: str,
    zone: str | None = None,
    *,
    cpu: int = 4000,
    mem: int = 8 * GIB,
    state: NodeState = NodeState.ALIVE,
    availability: Availability = Availability.ACTIVE,
    **labels: str,
) -> NodeInfo:
    if zone is not None:
        labels["zone"] = zone
    return NodeInfo(
        N(name), labels=labels, attributes={"hostname": name, "platform.os": "linux"},
        capacity=Resources(cpu, mem), state=state, availability=availability,
    )


def svc(name: str, replicas: int = 1, *constraints: str, **kwargs: object) -> ServiceSpec:
    return ServiceSpec(
        S(name), replicas=replicas, constraints=parse_constraints(constraints), **kwargs  # type: ignore[arg-type]
    )


def nodes_of(plan: Plan, service: str) -> list[NodeId]:
    return [n for n in plan.assignments[S(service)] if n is not None]


def cluster(count: int, zones: str = "abc", **kwargs: object) -> list[NodeInfo]:
    return [node(f"n{i:02d}", zones[i % len(zones)], **kwargs) for i in range(count)]  # type: ignore[arg-type]


# -- basics ---------------------------------------------------------------------------


def test_every_slot_gets_a_distinct_node_when_there_are_enough() -> None:
    plan = place([svc("web", 5)], cluster(8))
    placed = nodes_of(plan, "web")
    assert len(placed) == 5
    assert len(set(placed)) == 5  # default max_per_node is 1 with enough nodes
    assert plan.unplaced == {}
    assert plan.placed_count == 5
    assert plan.node_of(S("web"), 0) == placed[0]
    assert plan.node_of(S("web"), 7) is None


def test_empty_inputs() -> None:
    plan = place([], [])
    assert dict(plan.assignments) == {}
    plan = place([svc("web", 2)], [])
    assert plan.assignments[S("web")] == (None, None)
    assert plan.unplaced[S("web")].text == "web: 2 of 2 replicas unplaced: the cluster has no nodes"
    assert place([svc("web", 0)], cluster(3)).assignments[S("web")] == ()


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="node 'n00' is listed twice"):
        place([], [node("n00"), node("n00")])
    with pytest.raises(ConfigError, match="service 'web' is listed twice"):
        place([svc("web"), svc("web", 2)], cluster(2))
    scheduler = Scheduler([svc("web")], cluster(2))
    with pytest.raises(ConfigError, match="listed twice"):
        scheduler.update(nodes=[node("n00")], removed_nodes=[N("n00")])


def test_plan_helpers() -> None:
    plan = place([svc("web", 3), svc("agent", mode=Mode.GLOBAL)], cluster(3))
    assert sorted(plan.load().values()) == [2, 2, 2]
    assert len(list(plan.replicas())) == 6
    assert plan.digest() == place([svc("web", 3), svc("agent", mode=Mode.GLOBAL)], cluster(3)).digest()
    assert plan.digest() != place([svc("web", 2), svc("agent", mode=Mode.GLOBAL)], cluster(3)).digest()


# -- filters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "allowed_zones"),
    [
        ("zone==b", {"b"}),
        ("node.labels.zone==b", {"b"}),
        ("zone!=b", {"a", "c"}),
        ("zone in (a, c)", {"a", "c"}),
        ("zone not in (a)", {"b", "c"}),
        ("disk exists", {"a"}),
    ],
)
def test_constraints_hold(constraint: str, allowed_zones: set[str]) -> None:
    nodes = [node(f"n{i}", "abc"[i % 3], **({"disk": "ssd"} if i % 3 == 0 else {})) for i in range(9)]
    zone_of = {n.id: n.labels["zone"] for n in nodes}
    plan = place([svc("web", 3, constraint)], nodes)
    placed = nodes_of(plan, "web")
    assert len(placed) == 3
    assert {zone_of[n] for n in placed} <= allowed_zones


def test_node_id_and_attribute_constraints() -> None:
    plan = place([svc("pinned", 1, "node.id==n04"), svc("named", 1, "node.hostname==n02")], cluster(6))
    assert plan.assignments[S("pinned")] == (N("n04"),)
    assert plan.assignments[S("named")] == (N("n02"),)


@pytest.mark.parametrize(
    ("state", "availability"),
    [
        (NodeState.DEAD, Availability.ACTIVE),
        (NodeState.LEFT, Availability.ACTIVE),
        (NodeState.SUSPECT, Availability.ACTIVE),
        (NodeState.ALIVE, Availability.PAUSE),
        (NodeState.ALIVE, Availability.DRAIN),
    ],
)
def test_only_alive_active_nodes_receive_new_replicas(
    state: NodeState, availability: Availability
) -> None:
    nodes = [node("bad", state=state, availability=availability), node("good")]
    plan = place([svc("web", 2)], nodes)
    assert plan.assignments[S("web")].count(N("bad")) == 0
    assert N("good") in plan.assignments[S("web")]


@pytest.mark.parametrize(
    ("state", "availability", "keeps"),
    [
        (NodeState.SUSPECT, Availability.ACTIVE, True),
        (NodeState.ALIVE, Availability.PAUSE, True),
        (NodeState.ALIVE, Availability.DRAIN, False),
        (NodeState.DEAD, Availability.ACTIVE, False),
        (NodeState.SUSPECT, Availability.DRAIN, False),
    ],
)
def test_existing_replicas_stay_on_suspect_and_paused_nodes_only(
    state: NodeState, availability: Availability, keeps: bool
) -> None:
    nodes = cluster(4)
    before = place([svc("web", 4)], nodes)
    victim = before.assignments[S("web")][0]
    assert victim is not None
    changed = [node(n.id, n.labels["zone"], state=state, availability=availability)
               if n.id == victim else n for n in nodes]
    after = place([svc("web", 4)], changed, before.assignments)
    assert (after.assignments[S("web")][0] == victim) is keeps
    assert after.assignments[S("web")][1:] == before.assignments[S("web")][1:]


def test_resources_are_never_overcommitted() -> None:
    nodes = cluster(3, cpu=1000, mem=GIB)
    specs = [svc(f"s{i}", 3, resources=Resources(300, 300 * MIB)) for i in range(5)]
    plan = place(specs, nodes)
    used: Counter[NodeId] = Counter()
    for slots in plan.assignments.values():
        for n in slots:
            if n is not None:
                used[n] += 1
    assert all(count <= 3 for count in used.values())  # 3 x 300m <= 1000m, 4 x 300M > 1G
    assert plan.placed_count == 9
    assert plan.unplaced_count == 6


def test_host_ports_are_never_shared() -> None:
    specs = [svc("a", 2, ports=(80,)), svc("b", 2, ports=(80, 443)), svc("c", 3, ports=(443,))]
    plan = place(specs, cluster(4))
    seen: dict[tuple[NodeId, int], str] = {}
    for spec in specs:
        for n in nodes_of(plan, spec.id):
            for port in spec.ports:
                assert (n, port) not in seen, f"{spec.id} and {seen.get((n, port))} share {port}"
                seen[(n, port)] = spec.id
    assert plan.placed_count == 6  # c fits beside a, not beside b or itself
    assert plan.unplaced[S("c")].text == (
        "c: 1 of 3 replicas unplaced: 4 nodes had host port 443 in use"
    )


def test_max_per_node_explicit_and_default() -> None:
    nodes = cluster(3)
    plan = place([svc("web", 7), svc("two", 7, max_per_node=2)], nodes)
    web = Counter(nodes_of(plan, "web"))
    assert max(web.values()) <= math.ceil(1.25 * 7 / 3)  # 3: more replicas than nodes
    assert sum(web.values()) == 7
    two = Counter(nodes_of(plan, "two"))
    assert max(two.values()) == 2
    assert sum(two.values()) == 6
    assert "3 nodes already ran 2 of two (max 2 per node)" in plan.unplaced[S("two")].text


def test_spread_over_a_label_is_even() -> None:
    nodes = cluster(12, zones="abc")
    zone_of = {n.id: n.labels["zone"] for n in nodes}
    plan = place([svc("web", 6, spread_over="zone"), svc("odd", 7, spread_over="node.labels.zone")], nodes)
    assert Counter(zone_of[n] for n in nodes_of(plan, "web")) == {"a": 2, "b": 2, "c": 2}
    assert sorted(Counter(zone_of[n] for n in nodes_of(plan, "odd")).values()) == [2, 2, 3]


def test_spread_as_evenly_as_the_nodes_allow() -> None:
    # zone a has one node, b and c four each; 7 replicas at most one per node
    nodes = [node("a0", "a")] + [node(f"{z}{i}", z) for z in "bc" for i in range(4)] + [node("x0")]
    zone_of = {n.id: n.labels.get("zone", "-") for n in nodes}
    plan = place([svc("web", 7, spread_over="zone")], nodes)
    counts = Counter(zone_of[n] for n in nodes_of(plan, "web"))
    assert counts["a"] == 1  # all that zone a allows
    assert counts["-"] == 1  # nodes without the label are one more group
    assert sorted([counts["b"], counts["c"]]) == [2, 3]


def test_affinity_co_locates_and_anti_affinity_separates() -> None:
    nodes = cluster(10)
    specs = [
        svc("db", 3),
        svc("cache", 3, affinity=(S("db"),)),
        svc("batch", 4, anti_affinity=(S("db"),)),
        svc("web", 4),  # declares nothing, but batch's anti-affinity to db is one-way
    ]
    plan = place(specs, nodes)
    db = set(nodes_of(plan, "db"))
    assert set(nodes_of(plan, "cache")) <= db
    assert len(nodes_of(plan, "cache")) == 3
    assert not set(nodes_of(plan, "batch")) & db


def test_anti_affinity_is_symmetric() -> None:
    # batch is placed first (fewer matching nodes) and says nothing about db; db must
    # still avoid it, because db declared the anti-affinity
    nodes = cluster(6)
    specs = [svc("db", 3, anti_affinity=(S("batch"),)), svc("batch", 3, "zone in (a, b)")]
    plan = place(specs, nodes)
    assert not set(nodes_of(plan, "db")) & set(nodes_of(plan, "batch"))
    assert plan.placed_count == 6


def test_affinity_to_a_missing_service_explains_itself() -> None:
    plan = place([svc("cache", 2, affinity=(S("db"),))], cluster(3))
    assert plan.unplaced[S("cache")].text == (
        "cache: 2 of 2 replicas unplaced: 3 nodes did not run db (affinity; no such service)"
    )


def test_global_services_run_on_every_eligible_node() -> None:
    nodes = [*cluster(4), node("small", "a", mem=64 * MIB), node("gone", "a", state=NodeState.DEAD)]
    spec = ServiceSpec(S("agent"), mode=Mode.GLOBAL, resources=Resources(100, 128 * MIB),
                       constraints=parse_constraints(["zone!=c"]))
    plan = place([spec], nodes)
    assert plan.assignments[S("agent")] == (N("n00"), N("n01"), N("n03"))
    unplaced = plan.unplaced[S("agent")]
    assert unplaced.nodes == (N("small"),)
    assert unplaced.text == (
        "agent: 1 of 4 replicas unplaced: 1 node lacked memory: need 128M, best has 64M"
    )
    scheduler = Scheduler([spec], nodes)
    assert scheduler.upsert_node(node("n09", "b")) == [Change(S("agent"), None, None, N("n09"))]
    assert scheduler.remove_node(N("n00")) == [Change(S("agent"), None, N("n00"), None)]


def test_binpack_fills_the_first_ranked_nodes() -> None:
    nodes = cluster(5, cpu=1000)
    plan = place([svc("batch", 6, strategy=Strategy.BINPACK, resources=Resources(250, 0))], nodes)
    counts = sorted(Counter(nodes_of(plan, "batch")).values())
    assert counts == [2, 4]  # four fill a node, the rest go to the next one
    spread = place([svc("web", 6, resources=Resources(250, 0))], nodes)
    assert max(Counter(nodes_of(spread, "web")).values()) <= 2


def test_load_cap_bounds_every_node() -> None:
    nodes = cluster(10)
    specs = [svc(f"s{i}", 10, max_per_node=10) for i in range(10)]
    plan = place(specs, nodes)
    cap = max(math.ceil(10), math.floor(1.25 * 10))
    assert plan.load_cap == cap
    assert max(plan.load().values()) <= cap
    assert plan.placed_count == 100


# -- explanations ---------------------------------------------------------------------


def test_unplaced_explanation_reads_like_the_issue() -> None:
    nodes = [node(f"a{i}", "a") for i in range(3)] + [node(f"b{i}", "b", mem=256 * MIB) for i in range(2)]
    plan = place([svc("web", 1, "zone==b", resources=Resources(100, 512 * MIB))], nodes)
    entry = plan.unplaced[S("web")]
    assert entry.text == (
        "web: 1 of 1 replicas unplaced: 3 nodes failed constraint zone==b, "
        "2 nodes lacked memory: need 512M, best has 256M"
    )
    assert [(r.code, r.nodes) for r in entry.reasons] == [("constraint", 3), ("memory", 2)]
    assert entry.slots == (0,)
    assert plan.explain_unplaced(S("web")) == entry.text
    assert plan.explain_unplaced(S("other")) is None


def test_unplaced_explanation_counts_states_with_grammar() -> None:
    nodes = [
        node("d0", state=NodeState.DEAD),
        node("r0", availability=Availability.DRAIN),
        node("r1", availability=Availability.DRAIN),
        node("p0", availability=Availability.PAUSE),
        node("s0", state=NodeState.SUSPECT),
        node("c0", cpu=100),
    ]
    plan = place([svc("web", 1, resources=Resources(500, 0))], nodes)
    assert plan.unplaced[S("web")].text == (
        "web: 1 of 1 replicas unplaced: 1 node was down, 1 node was suspect, "
        "1 node was paused, 2 nodes were draining, 1 node lacked cpu: need 500m, best has 100m"
    )


def test_explain_a_placed_replica() -> None:
    nodes = cluster(6)
    scheduler = Scheduler([svc("web", 3)], nodes)
    text = scheduler.explain(S("web"), 0)
    target = scheduler.plan.assignments[S("web")][0]
    assert text == f"web[0] runs on {target}: node 1 in this slot's preference order."
    assert explain([svc("web", 3)], nodes, scheduler.plan.assignments, S("web"), 0) == text


def test_explain_names_the_nodes_it_skipped() -> None:
    nodes = cluster(6)
    first = place([svc("web", 1)], nodes).assignments[S("web")][0]
    assert first is not None
    full = [node(n.id, n.labels["zone"], mem=0) if n.id == first else n for n in nodes]
    scheduler = Scheduler([svc("web", 1, resources=Resources(0, MIB))], full)
    text = scheduler.explain(S("web"), 0)
    assert f"node 2 in this slot's preference order; skipped {first} (lacked memory: need 1M, has 0B)." in text


def test_explain_names_the_load_cap_and_the_spread_quota() -> None:
    two = [NodeInfo(N("n0")), NodeInfo(N("n1"))]
    scheduler = Scheduler([ServiceSpec(S("web1"), replicas=10, max_per_node=10)], two)
    assert scheduler.load_cap == 6  # max(ceil(5), floor(1.25 * 5))
    texts = [scheduler.explain(S("web1"), i) for i in range(10)]
    assert texts[7] == (
        "web1[7] runs on n1: node 2 in this slot's preference order; skipped n0 (at the load cap 6)."
    )
    assert sorted(scheduler.plan.load().values()) == [4, 6]
    zoned = [NodeInfo(N(f"n{i}"), labels={"zone": "ab"[i % 2]}) for i in range(4)]
    scheduler = Scheduler([ServiceSpec(S("web"), replicas=6, max_per_node=6, spread_over="zone")], zoned)
    assert scheduler.explain(S("web"), 4) == (
        "web[4] runs on n2: node 2 in this slot's preference order; "
        "skipped n1 (zone b at its spread quota 3)."
    )


def test_explain_says_when_a_rebalance_would_move_a_replica() -> None:
    nodes = cluster(6)
    first = place([svc("web", 1)], nodes).assignments[S("web")][0]
    assert first is not None
    others = [n for n in nodes if n.id != first]
    scheduler = Scheduler([svc("web", 1)], others)
    elsewhere = scheduler.plan.assignments[S("web")][0]
    assert scheduler.upsert_node(next(n for n in nodes if n.id == first)) == []
    text = scheduler.explain(S("web"), 0)
    assert text == (
        f"web[0] runs on {elsewhere}: replicas stay where they run while their node keeps "
        f"them and the hard filters hold; {first} could take it now, so a rebalance would "
        "move it there."
    )
    assert scheduler.rebalance() == [Change(S("web"), 0, elsewhere, first)]


def test_explain_unplaced_global_and_errors() -> None:
    nodes = [node("big"), node("tiny", mem=0)]
    spec = ServiceSpec(S("agent"), mode=Mode.GLOBAL, resources=Resources(0, MIB))
    scheduler = Scheduler([spec, svc("web", 3, "zone==q")], nodes)
    assert scheduler.explain(S("web"), 1) == (
        "web[1] is not placed: 2 nodes failed constraint zone==q."
    )
    assert scheduler.explain(S("agent"), node=N("big")).startswith("agent runs on big")
    assert scheduler.explain(S("agent"), node=N("tiny")) == (
        "agent does not run on tiny: it lacked memory: need 1M, has 0B."
    )
    with pytest.raises(ConfigError, match="no service 'nope'"):
        scheduler.explain(S("nope"), 0)
    with pytest.raises(ConfigError, match="has slots 0-2"):
        scheduler.explain(S("web"), 3)
    with pytest.raises(ConfigError, match="no node 'zz'"):
        scheduler.explain(S("agent"), node=N("zz"))


# -- changes over time ----------------------------------------------------------------


def test_node_loss_moves_exactly_its_replicas() -> None:
    nodes = cluster(12)
    specs = [svc(f"s{i}", 5, spread_over="zone" if i % 2 else None) for i in range(8)]
    scheduler = Scheduler(specs, nodes)
    before = scheduler.plan
    victim = N("n05")
    on_victim = {(sid, i) for sid, i, n in before.replicas() if n == victim}
    changes = scheduler.remove_node(victim)
    assert {(c.service, c.index) for c in changes} == on_victim
    assert all(c.old == victim and c.new is not None and c.new != victim for c in changes)
    after = scheduler.plan
    assert after == place(specs, [n for n in nodes if n.id != victim], before.assignments)


def test_node_arrival_moves_nothing_until_a_rebalance() -> None:
    nodes = cluster(40)
    specs = [svc(f"s{i:02d}", 20) for i in range(40)]
    fresh = Scheduler(specs, nodes)
    assert fresh.upsert_node(node("n99", "a")) == []
    assert fresh.plan.load().get(N("n99"), 0) == 0
    moved = fresh.rebalance()
    assert moved, "some slots prefer the new node"
    assert all(c.old is not None and c.new is not None for c in moved)
    assert len(moved) <= 2 * 800 / 41 + 5  # about 1/N of the replicas
    assert sum(1 for c in moved if c.new == N("n99")) >= len(moved) // 2
    assert fresh.rebalance() == []  # a rebalanced plan is stable


def test_a_fresh_plan_does_not_rebalance() -> None:
    specs = [svc(f"s{i}", 6, spread_over="zone") for i in range(6)] + [
        svc("bp", 5, strategy=Strategy.BINPACK, resources=Resources(300, 0))
    ]
    assert Scheduler(specs, cluster(9, cpu=1000)).rebalance() == []
    assert place(specs, cluster(9, cpu=1000), rebalance=True) == place(specs, cluster(9, cpu=1000))


def test_scaling_changes_only_the_slots_it_must() -> None:
    nodes = cluster(8)
    scheduler = Scheduler([svc("web", 4)], nodes)
    before = scheduler.plan.assignments[S("web")]
    down = scheduler.upsert_service(svc("web", 2))
    assert down == [Change(S("web"), 2, before[2], None), Change(S("web"), 3, before[3], None)]
    up = scheduler.upsert_service(svc("web", 5))
    assert [(c.index, c.old) for c in up] == [(2, None), (3, None), (4, None)]
    assert scheduler.plan.assignments[S("web")][:2] == before[:2]


def test_changed_constraints_move_only_the_misplaced() -> None:
    nodes = cluster(9)
    zone_of = {n.id: n.labels["zone"] for n in nodes}
    scheduler = Scheduler([svc("web", 3)], nodes)
    before = scheduler.plan.assignments[S("web")]
    changes = scheduler.upsert_service(svc("web", 3, "zone!=a"))
    moved = {c.index for c in changes}
    assert moved == {i for i, n in enumerate(before) if n is not None and zone_of[n] == "a"}
    assert all(zone_of[n] != "a" for n in nodes_of(scheduler.plan, "web"))


def test_relabelled_node_loses_only_replicas_that_no_longer_match() -> None:
    nodes = cluster(6)
    specs = [svc("pinned", 2, "zone==a"), svc("free", 6)]
    scheduler = Scheduler(specs, nodes)
    before = scheduler.plan
    victim = before.assignments[S("pinned")][0]
    assert victim is not None
    changes = scheduler.upsert_node(node(victim, "b"))
    assert [(c.service, c.index, c.old) for c in changes] == [(S("pinned"), 0, victim)]


def test_removed_service_stops_and_frees_room() -> None:
    nodes = cluster(2, cpu=1000)
    big = svc("big", 2, resources=Resources(1000, 0))
    small = svc("small", 1, resources=Resources(500, 0))
    scheduler = Scheduler([big, small], nodes)
    assert scheduler.plan.unplaced_count == 1
    changes = scheduler.remove_service(S("big"))
    assert {(c.service, c.new is None) for c in changes} == {(S("big"), True), (S("small"), False)}
    assert scheduler.plan.unplaced_count == 0
    assert S("big") not in scheduler.plan.assignments


def test_mode_change_is_a_new_service() -> None:
    nodes = cluster(3)
    scheduler = Scheduler([svc("x", 2)], nodes)
    changes = scheduler.upsert_service(ServiceSpec(S("x"), mode=Mode.GLOBAL))
    assert sum(1 for c in changes if c.index is None and c.old is None) == 3
    assert sum(1 for c in changes if c.index is not None and c.new is None) == 2
    assert len(scheduler.plan.assignments[S("x")]) == 3


def test_sync_and_compaction_match_a_fresh_placement() -> None:
    config = PlacementConfig.local()
    specs = [svc(f"s{i}", 4) for i in range(5)]
    scheduler = Scheduler(specs, cluster(30), config=config)
    previous = scheduler.plan
    survivors = cluster(30)[:8]  # 22 tombstones force a ring compaction
    scheduler.sync(specs, survivors)
    assert scheduler.plan == place(specs, survivors, previous.assignments, config=config)
    previous = scheduler.plan
    back = cluster(30)[:12]
    scheduler.sync(specs, back)
    assert scheduler.plan == place(specs, back, previous.assignments, config=config)


def test_current_allocations_on_unknown_things_are_ignored() -> None:
    current = {S("web"): [N("ghost"), None, N("n01"), N("n02")], S("gone"): [N("n00")]}
    plan = place([svc("web", 3)], cluster(4), current)
    assert plan.assignments[S("web")][2] == N("n01")
    assert N("ghost") not in plan.assignments[S("web")]
    assert S("gone") not in plan.assignments
