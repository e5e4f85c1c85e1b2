"""The leader's orchestration core: placement diffs, healing, scaling, rolling
updates with pause and rollback, garbage collection. Pure: state in, commands out."""

from __future__ import annotations

from mesh.node.orchestrate import Orchestrator, driver_of, node_infos
from mesh.node.spec import HealthSpec, UpdateSpec, WorkloadSpec
from mesh.placement import Availability, NodeInfo, NodeState, Resources
from mesh.raft.messages import Entry
from mesh.raft.state import (
    AllocPlan,
    AllocRecord,
    AllocReport,
    Command,
    DropOp,
    MeshState,
    NodeOverride,
    Report,
    RunOp,
    ServiceDelete,
    ServicePut,
    ServiceRollout,
    StopOp,
)
from mesh.types import AllocId, NodeId, ServiceId

WEB = ServiceId("web")


def spec(replicas: int = 3, **kw: object) -> WorkloadSpec:
    base: dict[str, object] = {"name": WEB, "command": ("sleep", "60"), "replicas": replicas}
    base.update(kw)
    return WorkloadSpec(**base)  # type: ignore[arg-type]


def nodes(*names: str, dead: tuple[str, ...] = (), drained: tuple[str, ...] = ()
          ) -> list[NodeInfo]:
    return [NodeInfo(NodeId(n), attributes={"driver": "process"},
                     capacity=Resources(4000, 8 << 30),
                     state=NodeState.DEAD if n in dead else NodeState.ALIVE,
                     availability=Availability.DRAIN if n in drained else Availability.ACTIVE)
            for n in names]


class Cluster:
    """A MeshState and an orchestrator, with the leader's loop run by hand."""

    def __init__(self) -> None:
        self.state = MeshState()
        self.orch = Orchestrator()
        self.now = 0.0

    def apply(self, cmd: Command) -> None:
        self.state.apply(Entry(1, self.state.applied_index + 1, cmd.encode()))

    def decide(self, ns: list[NodeInfo]) -> list[Command]:
        cmds = self.orch.decide(self.state, ns, self.now)
        for c in cmds:
            self.apply(c)
        return cmds

    def settle(self, ns: list[NodeInfo], *, report: bool = True, rounds: int = 10) -> None:
        """Decide until nothing changes; nodes report what they were told."""
        for _ in range(rounds):
            cmds = self.decide(ns)
            reported = self.report_all(ns) if report else False
            if not cmds and not reported:
                return
        raise AssertionError("the orchestrator did not settle")

    def report_all(self, ns: list[NodeInfo], state: str = "running", health: str = "none"
                   ) -> bool:
        alive = {n.id for n in ns if n.state is NodeState.ALIVE}
        by_node: dict[NodeId, list[Report]] = {}
        for a in self.state.allocs():
            if a.node not in alive:
                continue
            want = state if a.desired == "run" else "stopped"
            if a.state != want or (a.desired == "run" and a.health != health):
                by_node.setdefault(a.node, []).append(
                    Report(a.id, want, health if want == "running" else "none"))
        for node, reports in by_node.items():
            self.apply(AllocReport(node, tuple(reports)))
        return bool(by_node)

    def running(self) -> list[AllocRecord]:
        return [a for a in self.state.allocs() if a.desired == "run"]


def test_new_service_is_placed_one_replica_per_node() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec().encode()))
    ns = nodes("n1", "n2", "n3")
    cmds = c.decide(ns)
    assert len(cmds) == 1
    plan = cmds[0]
    assert isinstance(plan, AllocPlan)
    assert sorted(op.node for op in plan.ops if isinstance(op, RunOp)) == ["n1", "n2", "n3"]
    # deciding again with nothing new changes nothing
    assert c.decide(ns) == []


def test_dead_node_replicas_move_and_only_those() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(6).encode()))
    ns = nodes("n1", "n2", "n3", "n4")
    c.settle(ns)
    before = {a.id: a.node for a in c.running()}
    victims = {aid for aid, n in before.items() if n == "n2"}
    assert victims
    cmds = c.decide(nodes("n1", "n2", "n3", "n4", dead=("n2",)))
    ops = [op for cmd in cmds if isinstance(cmd, AllocPlan) for op in cmd.ops]
    # the dead node's allocations are dropped at once (nobody there to stop them)
    assert {op.alloc for op in ops if isinstance(op, DropOp)} == victims
    assert not [op for op in ops if isinstance(op, StopOp)]
    moved = [op for op in ops if isinstance(op, RunOp)]
    assert len(moved) == len(victims)
    assert all(op.node != "n2" for op in moved)
    after = {a.id: a.node for a in c.running()}
    assert {k: v for k, v in before.items() if k not in victims}.items() <= after.items()


def test_scale_down_stops_then_drops_when_reported() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(4).encode()))
    ns = nodes("n1", "n2", "n3", "n4")
    c.settle(ns)
    c.apply(ServicePut(WEB, spec(2).encode(), restart=False))
    cmds = c.decide(ns)
    stops = [op for cmd in cmds if isinstance(cmd, AllocPlan) for op in cmd.ops
             if isinstance(op, StopOp)]
    assert len(stops) == 2
    assert len(c.running()) == 2
    assert {a.slot for a in c.running()} == {0, 1}
    c.report_all(ns)
    drops = [op for cmd in c.decide(ns) if isinstance(cmd, AllocPlan) for op in cmd.ops
             if isinstance(op, DropOp)]
    assert {d.alloc for d in drops} == {s.alloc for s in stops}
    assert len(c.state.allocs()) == 2


def test_deleted_service_is_stopped() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(2).encode()))
    ns = nodes("n1", "n2")
    c.settle(ns)
    c.apply(ServiceDelete(WEB))
    c.settle(ns)
    assert c.state.allocs() == []


def test_drained_node_gives_its_replicas_away() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(3).encode()))
    c.settle(nodes("n1", "n2", "n3"))
    c.settle(nodes("n1", "n2", "n3", drained=("n3",)))
    assert all(a.node != "n3" for a in c.running())
    assert len(c.running()) == 3


def test_rolling_update_goes_one_batch_at_a_time() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(3).encode()))
    ns = nodes("n1", "n2", "n3")
    c.settle(ns)
    c.apply(ServicePut(WEB, spec(3, env=(("V", "2"),)).encode(), restart=True))
    cmds = c.decide(ns)
    runs = [op for cmd in cmds if isinstance(cmd, AllocPlan) for op in cmd.ops
            if isinstance(op, RunOp)]
    assert len(runs) == 1  # parallelism 1
    assert runs[0].generation == 2
    assert any(isinstance(cmd, ServiceRollout) and cmd.rollout == "updating" for cmd in cmds)
    # the new replica is not running yet: no further batch
    assert not any(isinstance(cmd, AllocPlan) and any(isinstance(o, RunOp) for o in cmd.ops)
                   for cmd in c.decide(ns))
    c.settle(ns)
    assert {a.generation for a in c.running()} == {2}
    assert len(c.running()) == 3
    svc = c.state.service(WEB)
    assert svc is not None
    assert svc.rollout == "completed"


def test_failed_update_pauses_or_rolls_back() -> None:
    for action, expect in (("pause", "paused"), ("rollback", "rolled_back")):
        c = Cluster()
        c.apply(ServicePut(WEB, spec(3, update=UpdateSpec(failure_action=action)).encode()))
        ns = nodes("n1", "n2", "n3")
        c.settle(ns)
        bad = spec(3, command=("false",), update=UpdateSpec(failure_action=action))
        c.apply(ServicePut(WEB, bad.encode(), restart=True))
        c.decide(ns)
        new = [a for a in c.running() if a.generation == 2]
        assert len(new) == 1
        c.apply(AllocReport(new[0].node, (Report(new[0].id, "failed", message="exited 1"),)))
        c.settle(ns)
        svc = c.state.service(WEB)
        assert svc is not None
        assert svc.rollout == expect, action
        if action == "pause":
            assert sum(a.generation == 1 for a in c.running()) == 2
        else:
            assert WorkloadSpec.decode(svc.spec).command == ("sleep", "60")
            assert all(a.generation == svc.generation for a in c.running())


def test_duplicates_after_a_partition_keep_the_newest() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(1).encode()))
    ns = nodes("n1", "n2")
    c.settle(ns)
    (first,) = c.running()
    other = NodeId("n2" if first.node == "n1" else "n1")
    # a second allocation of slot 0 (as after a healed partition with two leaders' plans)
    c.apply(AllocPlan((RunOp(WEB, 0, other, 1),)))
    c.settle(ns)
    assert len(c.running()) == 1
    assert c.running()[0].id == first.id


def test_unplaceable_replicas_are_not_run() -> None:
    c = Cluster()
    c.apply(ServicePut(WEB, spec(2, constraints=("node.labels.zone==z9",)).encode()))
    assert c.decide(nodes("n1", "n2")) == []
    plan = c.orch.last_plan
    assert plan is not None
    assert "constraint" in (plan.explain_unplaced(WEB) or "")


def test_driver_constraint_and_node_infos() -> None:
    assert driver_of(spec(1)) == "process"
    assert driver_of(WorkloadSpec(name=WEB, image="busybox")) == "docker"
    c = Cluster()
    c.apply(ServicePut(WEB, WorkloadSpec(name=WEB, image="busybox", replicas=2).encode()))
    assert c.decide(nodes("n1", "n2")) == []  # no docker node


def test_node_infos_apply_overrides() -> None:
    from mesh.gossip.core import MemberView
    from mesh.gossip.messages import Meta, Status
    from mesh.types import Addr

    m = MemberView(NodeId("n1"), Addr("127.0.0.2", 7946), 1, Status.SUSPECT,
                   Meta.build({"zone": "a", "meshd.driver": "docker"}, 2000, 1 << 30), 0.0)
    (info,) = node_infos([m], {NodeId("n1"): NodeOverride(NodeId("n1"), True,
                                                           (("zone", "b"),), 5)})
    assert info.labels == {"zone": "b"}
    assert info.attributes["driver"] == "docker"
    assert info.state is NodeState.SUSPECT
    assert info.availability is Availability.DRAIN


def test_node_infos_leave_meshds_own_labels_out() -> None:
    from mesh.gossip.core import MemberView
    from mesh.gossip.messages import Meta, Status
    from mesh.types import Addr

    meta = Meta.build({"zone": "a", "meshd.driver": "process", "meshd.state": "2"}, 1000, 1)
    m = MemberView(NodeId("n1"), Addr("127.0.0.2", 7946), 1, Status.ALIVE, meta, 0.0)
    (info,) = node_infos([m], {})
    assert info.labels == {"zone": "a"}  # a constraint cannot name meshd.state
    assert info.attributes["driver"] == "process"


def test_health_check_spec_allocs_wait_for_healthy_before_next_batch() -> None:
    c = Cluster()
    hs = HealthSpec(kind="tcp")
    from mesh.node.spec import PortSpec
    s1 = spec(2, ports=(PortSpec("http"),), health=hs)
    c.apply(ServicePut(WEB, s1.encode()))
    ns = nodes("n1", "n2")
    c.settle(ns, report=False)
    c.report_all(ns, health="healthy")
    s2 = spec(2, ports=(PortSpec("http"),), health=hs, env=(("V", "2"),))
    c.apply(ServicePut(WEB, s2.encode(), restart=True))
    c.decide(ns)
    c.report_all(ns, health="starting")  # running but not yet healthy
    cmds = c.decide(ns)
    assert not any(isinstance(cmd, AllocPlan) and any(isinstance(o, RunOp) for o in cmd.ops)
                   for cmd in cmds)
    c.report_all(ns, health="healthy")
    c.settle(ns, report=False)
    c.report_all(ns, health="healthy")
    c.settle(ns, report=False)
    assert {a.generation for a in c.running()} == {2}
    assert AllocId("web-0-1") not in {a.id for a in c.running()}
