"""Simulation tests: many real SWIM cores on a virtual clock over a faulty network.

Every bound below is in *virtual* seconds, so the tests are deterministic and do not
depend on the machine's speed. A failing seed replays with ``MESH_SIM_SEED=<seed>``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.gossip.config import GossipConfig
from mesh.gossip.core import HealthChanged
from mesh.gossip.messages import Meta, Status
from mesh.testing.net import LinkFaults
from mesh.testing.sim import GossipSimulator, seed_from_env
from mesh.types import NodeId


def names(sim: GossipSimulator) -> list[NodeId]:
    return [n.name for n in sim.up_nodes()]


def test_cluster_forms_by_joining_through_one_seed() -> None:
    sim = GossipSimulator(50, seed=seed_from_env(11), join=True)
    took = sim.run_until_true(sim.converged, timeout_s=10.0)
    assert took is not None, f"50 joiners did not converge in 10 s (seed {sim.seed})"


def test_crashed_node_is_declared_dead_by_all_of_120() -> None:
    sim = GossipSimulator(120, seed=seed_from_env(1))
    sim.run_for(3.0)
    victim = NodeId("n042")
    t0 = sim.now
    sim.crash(victim)
    took = sim.run_until_true(lambda: sim.all_see(victim, Status.DEAD), timeout_s=15.0)
    assert took is not None, f"not every node declared {victim} dead (seed {sim.seed})"
    first, every = sim.first_and_all(victim, Status.DEAD, t0, names(sim))
    assert first is not None
    assert every is not None
    assert first <= every <= 15.0
    assert sim.deaths_of([n for n in names(sim)]) == []


def test_detection_in_a_ten_node_cluster_takes_a_few_seconds() -> None:
    """The default (lan) config: suspicion min = 3 * 1 * 0.4 s, plus probing and
    dissemination, so every survivor agrees well within 4 virtual seconds."""
    sim = GossipSimulator(10, seed=seed_from_env(2))
    sim.run_for(2.0)
    t0 = sim.now
    sim.crash(NodeId("n005"))
    sim.run_for(10.0)
    _, every = sim.first_and_all(NodeId("n005"), Status.DEAD, t0, names(sim))
    assert every is not None
    assert every < 4.0


def test_isolated_node_is_suspected_then_alive_again_after_healing() -> None:
    sim = GossipSimulator(12, seed=seed_from_env(3))
    sim.run_for(2.0)
    cut = NodeId("n007")
    sim.net.isolate(cut)
    assert sim.run_until_true(lambda: sim.all_see(cut, Status.DEAD), timeout_s=20.0) is not None
    sim.run_for(45.0)  # longer than gossip_to_the_dead_s: only reconnect can merge us
    sim.net.heal()
    took = sim.run_until_true(sim.converged, timeout_s=30.0)
    assert took is not None, f"cluster did not heal (seed {sim.seed})"
    core = sim.nodes[cut].core
    assert core is not None
    assert core.incarnation >= 1


def test_minority_partition_heals() -> None:
    sim = GossipSimulator(9, seed=seed_from_env(4))
    sim.run_for(2.0)
    minority = [NodeId("n000"), NodeId("n001"), NodeId("n002")]
    majority = [n for n in names(sim) if n not in minority]
    sim.net.partition(minority, majority)
    sim.run_until_true(lambda: all(sim.status(o, m) == Status.DEAD
                                   for o in majority for m in minority), timeout_s=20.0)
    assert all(sim.status(o, m) == Status.DEAD for o in majority for m in minority)
    sim.net.heal()
    assert sim.run_until_true(sim.converged, timeout_s=30.0) is not None


def test_ten_and_twenty_percent_loss_cause_no_false_deaths() -> None:
    for loss, seed in ((0.1, 5), (0.2, 6)):
        sim = GossipSimulator(10, seed=seed_from_env(seed))
        sim.net.default = LinkFaults(loss=loss)
        sim.run_for(180.0)
        assert sim.deaths_of(names(sim)) == [], f"false death at {loss:.0%} (seed {sim.seed})"
        suspicions = sum(n.core.statistics().suspicions for n in sim.up_nodes() if n.core)
        assert suspicions > 0  # the loss was real: members were suspected and refuted


def test_duplication_and_reordering_are_harmless() -> None:
    sim = GossipSimulator(10, seed=seed_from_env(7))
    sim.net.default = LinkFaults(duplicate=0.3, delay_s=0.001, jitter_s=0.05)
    sim.run_for(60.0)
    assert sim.deaths_of(names(sim)) == []
    sim.crash(NodeId("n003"))
    assert sim.run_until_true(lambda: sim.all_see(NodeId("n003"), Status.DEAD), 10.0) \
        is not None


def test_slow_node_does_not_get_healthy_nodes_declared_dead() -> None:
    """Lifeguard: a node that freezes for long stretches wakes with expired probe
    timers and suspects healthy peers; those peers must survive it."""
    sim = GossipSimulator(10, seed=seed_from_env(8))
    slow = NodeId("n004")
    for _ in range(30):
        sim.pause(slow, 1.0)
        sim.run_for(3.0)
    healthy = [n for n in names(sim) if n != slow]
    assert sim.deaths_of(healthy) == [], f"slow node killed a healthy one (seed {sim.seed})"
    core = sim.nodes[slow].core
    assert core is not None
    assert core.statistics().suspicions > 0


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    sim = GossipSimulator(10, seed=seed_from_env(9))
    sim.run_for(2.0)
    sim.leave(NodeId("n006"))
    assert sim.run_until_true(lambda: sim.all_see(NodeId("n006"), Status.LEFT), 5.0) \
        is not None
    sim.run_for(10.0)
    assert sim.deaths_of([NodeId("n006")]) == []


def test_restarted_node_rejoins_under_its_name_with_a_higher_incarnation() -> None:
    sim = GossipSimulator(8, seed=seed_from_env(10))
    sim.run_for(2.0)
    node = NodeId("n002")
    sim.crash(node)
    assert sim.run_until_true(lambda: sim.all_see(node, Status.DEAD), 10.0) is not None
    sim.restart(node, seeds=[NodeId("n000")])
    assert sim.run_until_true(sim.converged, 10.0) is not None
    core = sim.nodes[NodeId("n005")].core
    assert core is not None
    view = core.member(node)
    assert view is not None
    assert view.incarnation >= 1


def test_metadata_changes_reach_everyone() -> None:
    sim = GossipSimulator(100, seed=seed_from_env(12))
    sim.run_for(1.0)
    sim.update_meta(NodeId("n010"), Meta.build({"zone": "b"}))

    def everyone_knows() -> bool:
        views = [n.core.member(NodeId("n010")) for n in sim.up_nodes() if n.core]
        return all(v is not None and v.meta.labels_dict == {"zone": "b"} for v in views)

    took = sim.run_until_true(everyone_knows, timeout_s=2.0, step_s=0.01)
    assert took is not None
    assert took <= 2.0


def test_same_seed_replays_exactly() -> None:
    def trace(seed: int) -> list[tuple[float, str, str, int]]:
        sim = GossipSimulator(10, seed=seed)
        sim.net.default = LinkFaults(loss=0.2)
        sim.run_for(30.0)
        sim.crash(NodeId("n001"))
        sim.run_for(10.0)
        return [(e.at, e.observer, e.node, int(e.status)) for e in sim.events]

    assert trace(77) == trace(77)
    assert trace(77) != trace(78)


FAULTS = st.lists(
    st.tuples(st.sampled_from(["crash", "restart", "isolate", "heal", "loss", "pause"]),
              st.integers(0, 7), st.floats(0.5, 8.0)),
    max_size=12,
)


@settings(max_examples=15, deadline=None)
@given(FAULTS, st.integers(0, 2**32))
def test_any_fault_schedule_converges_after_healing(faults: list[tuple[str, int, float]],
                                                    seed: int) -> None:
    """The fault schedule is data, so hypothesis shrinks a failure to few steps."""
    sim = GossipSimulator(8, seed=seed, config=GossipConfig.lan())
    for action, i, dt in faults:
        name = NodeId(f"n{i:03d}")
        node = sim.nodes[name]
        if action == "crash" and node.up and len(sim.up_nodes()) > 2:
            sim.crash(name)
        elif action == "restart" and not node.up:
            sim.restart(name)
        elif action == "isolate":
            sim.net.isolate(name)
        elif action == "heal":
            sim.net.heal()
        elif action == "loss":
            sim.net.default = LinkFaults(loss=min(dt / 20, 0.3))
        elif action == "pause" and node.up:
            sim.pause(name, dt / 2)
        sim.run_for(dt)
    sim.net.heal()
    sim.net.default = LinkFaults()
    for node in list(sim.nodes.values()):
        if not node.up:
            sim.restart(node.name)
    took = sim.run_until_true(sim.converged, timeout_s=40.0, step_s=0.5)
    assert took is not None, f"no convergence 40 s after healing (seed {seed}, {faults})"


def test_relays_nack_in_time_so_probers_of_a_dead_node_stay_healthy() -> None:
    """Lifeguard counts *missing* nacks against the prober. Relays must nack before
    the prober's probe ends, or every prober of a really dead node would blame
    itself (its health score would rise by ``indirect_checks``)."""
    sim = GossipSimulator(10, seed=seed_from_env(13))
    peak: dict[NodeId, int] = {}

    def watch(_sim: GossipSimulator, node: NodeId, out: object) -> None:
        if isinstance(out, HealthChanged):
            peak[node] = max(peak.get(node, 0), out.score)

    sim.observers.append(watch)
    sim.run_for(2.0)
    sim.crash(NodeId("n004"))
    sim.run_for(10.0)
    stats = [n.core.statistics() for n in sim.up_nodes() if n.core]
    asked = sum(s.indirect_probes for s in stats)
    assert asked > 0
    assert sum(s.nacks for s in stats) == asked  # every live relay's nack counted
    assert peak == {}                              # nobody blamed itself
