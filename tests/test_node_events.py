"""The event feed: observations in, one event per thing people care about."""

from __future__ import annotations

from mesh.node.events import EventLog
from mesh.raft.state import AllocRecord, Change, NodeOverride, ServiceRecord, Table
from mesh.types import AllocId, NodeId, ServiceId

A = AllocId("web-0-1")


def alloc(**kw: object) -> AllocRecord:
    base: dict[str, object] = {"id": A, "service": ServiceId("web"), "slot": 0,
                               "node": NodeId("n1"), "generation": 1, "desired": "run"}
    base.update(kw)
    return AllocRecord(**base)  # type: ignore[arg-type]


def svc(version: int, generation: int, rollout: str = "") -> ServiceRecord:
    return ServiceRecord(ServiceId("web"), b"s", version, generation, b"", 0, rollout, "m", 1,
                         version)


def test_alloc_lifecycle_events() -> None:
    log = EventLog()
    log.changes(1.0, [Change(1, Table.ALLOC, A, alloc())])
    log.changes(2.0, [Change(2, Table.ALLOC, A, alloc(state="running", health="healthy"))])
    log.changes(3.0, [Change(3, Table.ALLOC, A, alloc(state="exited", message="status 1",
                                                      restarts=1))])
    log.changes(4.0, [Change(4, Table.ALLOC, A, alloc(desired="stop", state="exited",
                                                      restarts=1))])
    log.changes(5.0, [Change(5, Table.ALLOC, A, None)])
    assert [e.action for e in log.since(0)] == [
        "placed", "running", "healthy", "exited", "restarted", "stopping", "removed"]
    assert "status 1" in log.since(0)[3].detail
    assert [e.seq for e in log.since(5)] == [6, 7]
    assert log.last_seq == 7


def test_service_node_member_and_leader_events() -> None:
    log = EventLog()
    log.changes(1.0, [Change(1, Table.SERVICE, "web", svc(1, 1))])
    log.changes(2.0, [Change(2, Table.SERVICE, "web", svc(2, 1))])
    log.changes(3.0, [Change(3, Table.SERVICE, "web", svc(3, 2))])
    log.changes(4.0, [Change(4, Table.SERVICE, "web", svc(3, 2, "paused"))])
    log.changes(5.0, [Change(5, Table.SERVICE, "web", None)])
    log.changes(6.0, [Change(6, Table.NODE, "n2", NodeOverride(NodeId("n2"), True, (), 6))])
    log.changes(6.5, [Change(7, Table.KV, "some/key", None)])  # not an event
    log.member(7.0, "n3", "dead", "127.0.0.4:7946")
    log.leader(8.0, "n1", 3)
    log.leader(9.0, None, 4)
    got = [(e.kind, e.subject, e.action) for e in log.since(0)]
    assert got == [("service", "web", "created"), ("service", "web", "updated"),
                   ("service", "web", "updated"), ("service", "web", "update_paused"),
                   ("service", "web", "removed"), ("node", "n2", "drain"),
                   ("member", "n3", "dead"), ("leader", "n1", "elected"),
                   ("leader", "-", "lost")]
    assert "no restart" in log.since(0)[1].detail
    assert "rolling update" in log.since(0)[2].detail


def test_seeded_records_do_not_repeat_and_the_ring_is_bounded() -> None:
    log = EventLog(max_events=3)
    log.seed([alloc(state="running")])
    log.changes(1.0, [Change(1, Table.ALLOC, A, alloc(state="running"))])
    assert log.since(0) == []
    for i in range(5):
        log.member(float(i), f"n{i}", "alive", "x")
    assert [e.seq for e in log.since(0)] == [3, 4, 5]
    assert log.since(0, limit=1)[0].seq == 3


def test_logs_follow_prints_only_new_lines() -> None:
    from mesh.node.cli_workloads import new_lines

    assert new_lines([], ["a", "b"]) == ["a", "b"]
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["x", "y", "y"], ["x", "y", "y", "y"]) == ["y"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines(["gone"], ["fresh"]) == ["fresh"]  # rotated: the whole tail
