"""Services and allocations in the replicated state: versions, generations,
plans, reports, snapshots, and bad commands failing the same way everywhere."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.raft.messages import Entry
from mesh.raft.state import (
    AllocPlan,
    AllocReport,
    Command,
    CommandKind,
    DropOp,
    MeshState,
    Report,
    Result,
    ResultCode,
    RunOp,
    ServiceDelete,
    ServicePut,
    ServiceRollout,
    StopOp,
    Table,
    decode_command,
)
from mesh.types import AllocId, NodeId, ServiceId

WEB = ServiceId("web")
N1, N2 = NodeId("n1"), NodeId("n2")


class Replica:
    def __init__(self) -> None:
        self.sm = MeshState()

    def apply(self, cmd: Command | bytes) -> Result:
        data = cmd if isinstance(cmd, bytes) else cmd.encode()
        result = self.sm.apply(Entry(2, self.sm.applied_index + 1, data))
        assert result is not None
        return result


def test_service_versions_and_generations() -> None:
    r = Replica()
    assert r.apply(ServicePut(WEB, b"spec-1")).ok
    svc = r.sm.service(WEB)
    assert svc is not None
    assert (svc.version, svc.generation, svc.previous) == (1, 1, b"")
    # the same spec again changes nothing (apply -f twice)
    again = r.apply(ServicePut(WEB, b"spec-1"))
    assert again.ok
    assert again.mod_index == svc.mod_index
    assert r.sm.service(WEB) == svc
    # a change that does not need a restart (scaling) keeps the generation
    r.apply(ServicePut(WEB, b"spec-2", restart=False))
    svc2 = r.sm.service(WEB)
    assert svc2 is not None
    assert (svc2.version, svc2.generation, svc2.previous) == (2, 1, b"spec-1")
    r.apply(ServicePut(WEB, b"spec-3", restart=True))
    svc3 = r.sm.service(WEB)
    assert svc3 is not None
    assert (svc3.version, svc3.generation, svc3.previous, svc3.previous_generation) == (
        3, 2, b"spec-2", 1)
    assert svc3.create_index == svc.create_index


def test_service_cas() -> None:
    r = Replica()
    assert r.apply(ServicePut(WEB, b"a", cas=0)).ok
    assert r.apply(ServicePut(WEB, b"b", cas=0)).code is ResultCode.CAS_FAILED
    mod = r.sm.service(WEB).mod_index  # type: ignore[union-attr]
    assert r.apply(ServicePut(WEB, b"b", cas=mod + 7)).code is ResultCode.CAS_FAILED
    assert r.apply(ServicePut(WEB, b"b", cas=mod)).ok
    assert r.sm.service(WEB).spec == b"b"  # type: ignore[union-attr]


def test_plan_assigns_ids_and_skips_stale_runs() -> None:
    r = Replica()
    r.apply(ServicePut(WEB, b"s"))
    r.apply(AllocPlan((RunOp(WEB, 0, N1, 1), RunOp(WEB, 1, N2, 1), RunOp(WEB, 2, N1, 9),
                       RunOp(ServiceId("gone"), 0, N1, 1))))
    allocs = r.sm.allocs(service=WEB)
    assert [(a.id, a.slot, a.node, a.desired, a.state) for a in allocs] == [
        ("web-0-1", 0, N1, "run", "pending"), ("web-1-2", 1, N2, "run", "pending")]
    r.apply(AllocPlan((RunOp(WEB, -1, N2, 1),)))
    assert r.sm.alloc(AllocId("web-g-3")) is not None
    assert [a.id for a in r.sm.allocs(node=N2)] == ["web-g-3", "web-1-2"]
    r.apply(AllocPlan((StopOp(AllocId("web-0-1")), DropOp(AllocId("web-1-2")),
                       StopOp(AllocId("nope")))))
    assert r.sm.alloc(AllocId("web-0-1")).desired == "stop"  # type: ignore[union-attr]
    assert r.sm.alloc(AllocId("web-1-2")) is None
    # ids are never reused, even after a drop
    r.apply(AllocPlan((RunOp(WEB, 1, N2, 1),)))
    assert r.sm.alloc(AllocId("web-1-4")) is not None


def test_reports_only_from_the_allocations_node() -> None:
    r = Replica()
    r.apply(ServicePut(WEB, b"s"))
    r.apply(AllocPlan((RunOp(WEB, 0, N1, 1),)))
    aid = AllocId("web-0-1")
    report = Report(aid, "running", "healthy", (("http", 31000),), "", 0, 1700000000.0)
    r.apply(AllocReport(N2, (report,)))
    assert r.sm.alloc(aid).state == "pending"  # type: ignore[union-attr]
    res = r.apply(AllocReport(N1, (report,)))
    a = r.sm.alloc(aid)
    assert a is not None
    assert a.state == "running"
    assert a.ready
    assert a.mod_index == res.index
    assert a.as_dict()["ports"] == {"http": 31000}
    assert a.as_dict()["healthy"] is True
    # an identical report records no change
    before = r.sm.changes_since(res.index)
    r.apply(AllocReport(N1, (report,)))
    assert r.sm.changes_since(res.index) == before == []
    r.apply(AllocReport(N1, (Report(aid, "running", "unhealthy", (("http", 31000),)),)))
    assert not r.sm.alloc(aid).ready  # type: ignore[union-attr]


def test_rollout_state_only_for_current_generation() -> None:
    r = Replica()
    r.apply(ServicePut(WEB, b"s"))
    r.apply(ServiceRollout(WEB, 1, "updating", "1 of 3"))
    assert r.sm.service(WEB).rollout == "updating"  # type: ignore[union-attr]
    r.apply(ServiceRollout(WEB, 7, "paused", "x"))
    assert r.sm.service(WEB).rollout == "updating"  # type: ignore[union-attr]
    r.apply(ServicePut(WEB, b"t", restart=True))
    assert r.sm.service(WEB).rollout == ""  # type: ignore[union-attr]


def test_delete_and_watch_events() -> None:
    r = Replica()
    r.apply(ServicePut(WEB, b"s"))
    r.apply(AllocPlan((RunOp(WEB, 0, N1, 1),)))
    r.apply(ServiceDelete(WEB))
    tables = [(c.table, c.key, c.record is None) for c in r.sm.changes_since(0)]
    assert tables == [(Table.SERVICE, "web", False), (Table.ALLOC, "web-0-1", False),
                      (Table.SERVICE, "web", True)]
    assert r.sm.service(WEB) is None
    # allocations outlive their service until the leader's next plan stops them
    assert [a.id for a in r.sm.allocs()] == ["web-0-1"]


def test_snapshot_round_trip_keeps_everything() -> None:
    r = Replica()
    r.apply(ServicePut(WEB, b"s"))
    r.apply(ServicePut(WEB, b"t"))
    r.apply(AllocPlan((RunOp(WEB, 0, N1, 2), RunOp(WEB, -1, N2, 2))))
    r.apply(AllocReport(N1, (Report(AllocId("web-0-1"), "running", "starting",
                                    (("a", 1), ("b", 2)), "ok", 3, 12.5),)))
    image = r.sm.snapshot()
    other = MeshState()
    other.restore(image, r.sm.applied_index)
    assert other.snapshot() == image
    assert other.allocs() == r.sm.allocs()
    assert other.services() == r.sm.services()
    # the id counter travels too: both replicas hand out the same next id
    for st_ in (r.sm, other):
        st_.apply(Entry(2, st_.applied_index + 1, AllocPlan((RunOp(WEB, 1, N1, 2),)).encode()))
    assert other.digest() == r.sm.digest()
    assert other.alloc(AllocId("web-1-3")) is not None


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServicePut(ServiceId("Bad Name"), b"s"),
        lambda: ServicePut(WEB, b""),
        lambda: ServiceRollout(WEB, 1, "sideways"),
        lambda: AllocPlan((RunOp(WEB, -2, N1, 1),)),
        lambda: AllocReport(N1, (Report(AllocId("web-0-1"), "dancing"),)),
        lambda: AllocReport(N1, (Report(AllocId("web-0-1"), "running", ports=(("p", 0),)),)),
    ],
)
def test_building_a_bad_command_raises(make: object) -> None:
    with pytest.raises(LocalProtocolError):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    "fields",
    [
        [CommandKind.SERVICE_PUT, b"", "web", b"s", "yes", None],
        [CommandKind.ALLOC_PLAN, b"", [["launch", "web", 0, "n1", 1]]],
        [CommandKind.ALLOC_PLAN, b"", [["run", "web", 0, "n1"]]],
        [CommandKind.ALLOC_REPORT, b"", "n1", [["web-0-1", "running", "none", {}, "", -1, 0]]],
        [CommandKind.SERVICE_DELETE, b"", "WEB"],
    ],
)
def test_bad_committed_commands_fail_the_same_everywhere(fields: list[object]) -> None:
    data = wire.pack_body([1, *fields])
    with pytest.raises(RemoteProtocolError):
        decode_command(data)
    a, b = Replica(), Replica()
    ra, rb = a.apply(data), b.apply(data)
    assert ra == rb
    assert ra.code is ResultCode.INVALID
    assert a.sm.digest() == b.sm.digest()


_names = st.sampled_from(["web", "db", "api"])
_ops = st.one_of(
    st.builds(lambda s, slot, n, g: RunOp(ServiceId(s), slot, NodeId(n), g),
              _names, st.integers(-1, 4), st.sampled_from(["n1", "n2"]), st.integers(0, 3)),
    st.builds(lambda s, i: StopOp(AllocId(f"{s}-0-{i}")), _names, st.integers(1, 20)),
    st.builds(lambda s, i: DropOp(AllocId(f"{s}-0-{i}")), _names, st.integers(1, 20)),
)
_commands = st.one_of(
    st.builds(lambda n, spec, rs: ServicePut(ServiceId(n), spec, rs), _names,
              st.sampled_from([b"a", b"b", b"c"]), st.booleans()),
    st.builds(lambda n: ServiceDelete(ServiceId(n)), _names),
    st.builds(lambda ops: AllocPlan(tuple(ops)), st.lists(_ops, max_size=5)),
    st.builds(lambda n, i, state: AllocReport(NodeId(n), (Report(AllocId(f"web-0-{i}"), state),)),
              st.sampled_from(["n1", "n2"]), st.integers(1, 20),
              st.sampled_from(["running", "exited", "stopped"])),
)


@settings(max_examples=60)
@given(st.lists(_commands, max_size=30), st.integers(0, 30))
def test_replicas_agree_with_or_without_a_snapshot(cmds: list[Command], cut: int) -> None:
    a, b = Replica(), Replica()
    for i, cmd in enumerate(cmds):
        a.apply(cmd)
        b.apply(cmd)
        if i == cut:
            fresh = MeshState()
            fresh.restore(b.sm.snapshot(), b.sm.applied_index)
            b.sm = fresh
    assert a.sm.digest() == b.sm.digest()
    for alloc in a.sm.allocs():
        assert alloc.desired in ("run", "stop")
