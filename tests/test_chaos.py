"""The chaos harness: its pure parts, and (marked ``chaos``) one real smoke run.

Scenario parsing and schedules, the invariant checkers fed with synthetic
observations, the firewall rules it writes, the report and its PNG are plain
functions and are tested here without processes. ``test_smoke_scenario`` runs
``python -m chaos run smoke`` for real (root, namespaces, about two minutes); it
is excluded from the default run by the ``chaos`` marker.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from chaos import invariants as inv
from chaos import nfq
from chaos.png import Canvas
from chaos.report import (
    KIND_COLORS,
    FaultRecord,
    InvariantResult,
    build_report,
    summary,
    timeline_png,
)
from chaos.scenario import (
    Fault,
    FaultKind,
    ScenarioError,
    Workload,
    build_schedule,
    node_names,
    parse_scenario,
    planned_time_s,
)
from chaos.topology import (
    NodeRules,
    count_drops,
    iptables_restore_text,
    oneway_rules,
    partition_rules,
)
from chaos.workload import KvWorkload, is_cas_failure
from mesh.errors import MeshError
from mesh.raft.messages import Entry
from mesh.raft.state import KvDelete, KvPut, MeshState
from mesh.testing.linearizability import Outcome, check_kv

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "chaos" / "scenarios"


def load(name: str) -> Any:
    return yaml.safe_load((SCENARIOS / f"{name}.yaml").read_text())


# --- scenarios and schedules ----------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_parses_and_schedules(path: Path) -> None:
    sc = parse_scenario(yaml.safe_load(path.read_text()), str(path))
    assert sc.name == path.stem
    schedule = build_schedule(sc, sc.nodes, sc.duration_s, seed=3)
    assert schedule


def test_smoke_has_every_fault_kind_and_fits_two_minutes() -> None:
    sc = parse_scenario(load("smoke"))
    schedule = build_schedule(sc, sc.nodes, sc.duration_s, seed=1)
    assert {f.kind for f in schedule} == set(FaultKind)
    assert sc.nodes == 5
    # the faults' own time; forming the cluster and healing add ~25 s on this machine
    assert sum(planned_time_s(f) for f in schedule) + sc.settle_s <= 90


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    sc = parse_scenario(load("random"))
    a = build_schedule(sc, 10, 600, seed=7)
    assert a == build_schedule(sc, 10, 600, seed=7)
    assert a != build_schedule(sc, 10, 600, seed=8)


def test_random_schedule_fits_its_duration_and_names_real_nodes() -> None:
    sc = parse_scenario(load("random"))
    schedule = build_schedule(sc, 7, 300, seed=11)
    names = set(node_names(7))
    assert sum(planned_time_s(f) for f in schedule) <= 300
    for f in schedule:
        assert f.target in names | {"leader", "watcher", "voters", "all"}
        if f.kind is FaultKind.PARTITION:
            assert 0 < len(f.minority) < 7 / 2
            assert set(f.minority) <= names


def test_the_old_role_name_learner_means_a_watcher() -> None:
    sc = parse_scenario({"name": "t", "faults": [{"kind": "kill", "target": "learner"},
                                                  {"kind": "stale_rejoin"}]})
    assert [f.target for f in build_schedule(sc, 5, 60, seed=1)] == ["watcher", "watcher"]


def test_fixed_random_targets_are_drawn_from_the_seed() -> None:
    sc = parse_scenario({"name": "t", "faults": [{"kind": "kill"}, {"kind": "partition"}]})
    s1 = build_schedule(sc, 5, 60, seed=1)
    assert s1[0].target in node_names(5)
    assert len(s1[1].minority) == 2
    assert s1 == build_schedule(sc, 5, 60, seed=1)


def test_defaults_fill_in() -> None:
    sc = parse_scenario({"name": "t", "faults": [{"kind": "starve", "target": "n2"},
                                                  {"kind": "loss"}]})
    starve, loss = sc.faults
    assert starve.params == {"stopped_fraction": 0.8, "period_s": 0.25}
    assert starve.duration_s == 6.0
    assert loss.target == "all"
    assert loss.params == {"probability": 0.2}
    assert sc.workload.clients == 3
    assert sc.gossip_profile == "local"


@pytest.mark.parametrize(("raw", "message"), [
    ({"faults": [{"kind": "kill"}]}, "give the scenario a name"),
    ({"name": "t", "faults": [{"kind": "explode"}]}, "unknown fault kind 'explode'"),
    ({"name": "t", "faults": [{"kind": "duplicate", "probability": 0}]}, "between 0 and 1"),
    ({"name": "t", "faults": [{"kind": "loss", "probability": 1.5}]}, "between 0 and 1"),
    ({"name": "t", "faults": [{"kind": "kill", "colour": "red"}]}, "unknown field(s) colour"),
    ({"name": "t", "faults": [{"kind": "kill", "duration_s": -1}]}, "duration_s must be >= 0"),
    ({"name": "t"}, "either a 'faults' list or a 'random' section"),
    ({"name": "t", "faults": [{"kind": "kill"}], "random": {}}, "either a 'faults'"),
    ({"name": "t", "nodes": 2, "faults": [{"kind": "kill"}]}, "from 3 to 50"),
    ({"name": "t", "gossip_profile": "wan", "faults": [{"kind": "kill"}]}, "local or lan"),
    ({"name": "t", "random": {"duration_s": [5, 1]}}, "low <= high"),
    ({"name": "t", "services": [{"name": "web", "run_args": "x"}], "faults": [{"kind": "kill"}]},
     "run_args must be a list"),
])
def test_malformed_scenarios_are_refused_with_the_field_named(raw: Any, message: str) -> None:
    with pytest.raises(ScenarioError, match=None) as err:
        parse_scenario(raw)
    assert message in str(err.value)


@pytest.mark.parametrize(("fault", "message"), [
    ({"kind": "kill", "target": "n9"}, "no node named 'n9'"),
    ({"kind": "partition", "minority": ["n1", "n2", "n3"]}, "fewer than half"),
    ({"kind": "partition", "minority": ["n7"]}, "fewer than half"),
])
def test_schedule_refuses_targets_the_cluster_lacks(fault: Any, message: str) -> None:
    sc = parse_scenario({"name": "t", "faults": [fault]})
    with pytest.raises(ScenarioError) as err:
        build_schedule(sc, 5, 60, seed=0)
    assert message in str(err.value)


def test_fault_describe() -> None:
    f = Fault(FaultKind.PARTITION, "all", 5, 1, {}, ("n4", "n5"))
    assert f.describe() == "partition [n4,n5] | rest for 5s, then 1s calm"


# --- invariants -----------------------------------------------------------------------


def test_one_leader_per_term_accepts_agreement_and_flags_a_second_leader() -> None:
    tracker = inv.LeaderTracker()
    assert tracker.observe(inv.RaftObs(1.0, "n1", 3, "n1")) is None
    assert tracker.observe(inv.RaftObs(1.1, "n2", 3, "n1")) is None
    assert tracker.observe(inv.RaftObs(1.2, "n3", 3, None)) is None
    assert tracker.observe(inv.RaftObs(2.0, "n2", 4, "n2")) is None
    v = tracker.observe(inv.RaftObs(2.5, "n4", 3, "n4"))
    assert v is not None
    assert v.invariant == "one_leader_per_term"
    assert v.t == 2.5
    assert "term 3" in v.message
    assert "n1" in v.message
    assert tracker.terms() == {3: "n1", 4: "n2"}
    assert tracker.changes == [(1.0, 3, "n1"), (2.0, 4, "n2")]


def _m(t: float, observer: str, **statuses: str) -> inv.MemberObs:
    return inv.MemberObs(t, observer, statuses)


def test_membership_converged_needs_every_live_view_to_match() -> None:
    views = {"n1": _m(1, "n1", n1="alive", n2="alive"), "n2": _m(1, "n2", n1="alive", n2="alive")}
    assert inv.membership_converged(views, ["n1", "n2"])
    assert not inv.membership_converged(views, ["n1", "n2", "n3"])  # n3 has no view
    views["n2"] = _m(2, "n2", n1="suspect", n2="alive")
    assert not inv.membership_converged(views, ["n1", "n2"])


def test_leader_agreed() -> None:
    r = {n: inv.RaftObs(1, n, 2, "n1") for n in ("n1", "n2")}
    assert inv.leader_agreed(r, ["n1", "n2"]) == "n1"
    assert inv.leader_agreed(r, ["n2"]) is None  # n1 is not live
    r["n2"] = inv.RaftObs(1, "n2", 2, "n1", storage_error="disk full")
    assert inv.leader_agreed(r, ["n1", "n2"]) is None
    r["n2"] = inv.RaftObs(1, "n2", 2, None)
    assert inv.leader_agreed(r, ["n1", "n2"]) is None


def test_first_healed_ignores_views_from_before_the_heal() -> None:
    live = ["n1", "n2"]
    members = [_m(1.0, "n1", n1="alive", n2="alive"), _m(1.0, "n2", n1="alive", n2="alive"),
               _m(5.0, "n1", n1="alive", n2="alive"), _m(6.0, "n2", n1="alive", n2="alive")]
    rafts = [inv.RaftObs(1.0, "n1", 1, "n1"), inv.RaftObs(1.0, "n2", 1, "n1"),
             inv.RaftObs(5.5, "n1", 1, "n1"), inv.RaftObs(6.5, "n2", 1, "n1")]
    assert inv.first_healed(members, rafts, 4.0, live) == 6.5
    assert inv.first_healed(members, rafts, 0.0, live) == 1.0
    assert inv.first_healed(members, rafts, 7.0, live) is None


def test_time_to_detect_is_the_slowest_observer() -> None:
    members = [_m(9.0, "n1", n3="dead"),  # before the kill: does not count
               _m(10.5, "n1", n3="suspect"), _m(11.0, "n1", n3="dead"),
               _m(11.5, "n2", n3="dead"), _m(12.0, "n2", n3="left")]
    assert inv.time_to_detect(members, 10.0, "n3", ["n1", "n2"]) == 1.5
    assert inv.time_to_detect(members, 10.0, "n3", ["n1", "n2", "n4"]) is None


def test_crash_violations_only_for_exits_the_harness_did_not_cause() -> None:
    exits = [inv.ProcessExit(3.0, "n1", -9, True), inv.ProcessExit(4.0, "n2", 1, False, "boom")]
    vs = inv.crash_violations(exits)
    assert [(v.t, v.invariant) for v in vs] == [(4.0, "no_crash")]
    assert "n2 exited with status 1" in vs[0].message
    assert "boom" in vs[0].message


def test_dns_node_violations() -> None:
    expected = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    good = {"n1": ("10.0.0.1",), "n2": ("10.0.0.2",), "n3": ()}
    assert inv.dns_node_violations(1.0, "n1", good, expected, ["n3"]) == []
    bad = {"n1": ("10.0.0.1",), "n2": (), "n3": ("10.0.0.3",)}
    vs = inv.dns_node_violations(1.0, "n1", bad, expected, ["n3"])
    assert [v.invariant for v in vs] == ["dns_live_nodes_only"] * 2
    assert "n2.node.mesh with [], expected [10.0.0.2]" in vs[0].message
    assert "still answers n3.node.mesh" in vs[1].message


def _svc(name: str, desired: int, running: int, healthy: int) -> dict[str, Any]:
    return {"name": name, "desired": desired, "running": running, "healthy": healthy}


def _alloc(i: int, node: str, state: str = "running", healthy: bool = True) -> dict[str, Any]:
    return {"id": f"a{i}", "service": "web", "node": node, "state": state, "healthy": healthy}


def test_service_violations_accept_a_converged_service() -> None:
    allocs = [_alloc(1, "n1"), _alloc(2, "n2"), _alloc(3, "n4", state="stopped")]
    assert inv.service_violations(1.0, [_svc("web", 2, 2, 2)], allocs, ["n1", "n2", "n3"],
                                  ["web"]) == []


def test_service_violations_flag_short_missing_and_orphaned() -> None:
    allocs = [_alloc(1, "n1"), _alloc(2, "n5")]
    vs = inv.service_violations(1.0, [_svc("web", 2, 2, 2)], allocs, ["n1", "n2"],
                                ["web", "db"])
    messages = [v.message for v in vs]
    assert any("service db is not listed" in m for m in messages)
    assert any("healthy allocations on live nodes 1" in m for m in messages)
    assert any("a2 of web runs on n5, which is not live" in m for m in messages)


def test_unreadable_services_names_the_node_and_an_empty_timeout() -> None:
    timeout = inv.unreadable_services(4.0, "n1", trio.TooSlowError())
    assert (timeout.t, timeout.invariant) == (4.0, "services_converge")
    assert timeout.message == "cannot read services through n1's API: TooSlowError"
    refused = inv.unreadable_services(5.0, "n2", MeshError("no leader"))
    assert refused.message == "cannot read services through n2's API: MeshError: no leader"


def test_service_dns_violations() -> None:
    allocs = [_alloc(1, "n1"), _alloc(2, "n2", healthy=False)]
    ips = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    assert inv.service_dns_violations(1.0, "n3", "web", ["10.0.0.1"], allocs, ips) == []
    vs = inv.service_dns_violations(1.0, "n3", "web", ["10.0.0.1", "10.0.0.2"], allocs, ips)
    assert len(vs) == 1
    assert vs[0].invariant == "dns_ready_endpoints_only"


def test_orphan_violations_count_groups_against_live_allocations() -> None:
    allocs = [_alloc(1, "n1"), _alloc(2, "n1", state="starting"), _alloc(3, "n1", state="exited"),
              _alloc(4, "n2")]
    assert inv.orphan_violations(1.0, "n1", 2, allocs) == []
    vs = inv.orphan_violations(1.0, "n1", 3, allocs)
    assert [v.invariant for v in vs] == ["no_orphan_workloads"]
    assert "3 workload process group(s) but holds 2" in vs[0].message


def test_distribution() -> None:
    d = inv.distribution([3.0, 1.0, 2.0, 10.0])
    assert d == {"count": 4, "min": 1.0, "median": 2.5, "p90": 10.0, "max": 10.0}
    assert inv.distribution([])["median"] is None
    assert inv.distribution([0.5] * 10)["p90"] == 0.5


# --- workload: meshd's CAS refusals ---------------------------------------------------


def test_cas_failure_messages_match_what_meshd_says() -> None:
    state = MeshState()

    def put(index: int, cas: int | None) -> str:
        result = state.apply(Entry(1, index, KvPut("k", b"v", cas=cas).encode()))
        assert result is not None
        return "" if result.ok else result.message

    assert is_cas_failure(put(1, 5))  # absent, expects index 5
    assert put(2, 0) == ""
    assert is_cas_failure(put(3, 0))  # exists, expects absent
    assert is_cas_failure(put(4, 99))  # wrong index
    assert put(5, 2) == ""  # right index
    assert not is_cas_failure("the cluster has no Raft leader right now")


class FakeKvNode:
    """A node backed by meshd's real state machine, answering after a short pause.

    ``lose_every``: acknowledge every Nth put without applying it (a lost write).
    """

    def __init__(self, name: str, state: MeshState, log: list[int], lose_every: int = 0) -> None:
        self.name = name
        self.state = state
        self.log = log  # shared last index, as one Raft log would be
        self.lose_every = lose_every
        self.puts = 0

    def responsive(self) -> bool:
        return True

    def _apply(self, command: KvPut | KvDelete) -> dict[str, Any]:
        self.log[0] += 1
        result = self.state.apply(Entry(1, self.log[0], command.encode()))
        assert result is not None
        if not result.ok:
            raise MeshError(result.message)
        return result.as_dict()

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float = 2.0) -> Any:
        assert params is not None
        await trio.sleep(0.01)
        key = params["key"]
        if method == "kv_get":
            entry = self.state.get(key)
            if entry is None:
                raise MeshError(f"key {key!r} not found")
            return entry.as_dict()
        if method == "kv_del":
            return self._apply(KvDelete(key, cas=params.get("cas")))
        assert method == "kv_put"
        self.puts += 1
        if self.lose_every and self.puts % self.lose_every == 0:
            return {"index": self.log[0]}  # acknowledged, never applied
        return self._apply(KvPut(key, params["value"].encode(), cas=params.get("cas")))


async def _run_workload(nodes: list[FakeKvNode]) -> KvWorkload:
    wl = KvWorkload(Workload(clients=3, keys=2, key_epoch_s=5.0, pause_s=0.01), nodes,
                    random.Random(5), trio.current_time)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(wl.run_client, i)
        await trio.sleep(12.0)
        nursery.cancel_scope.cancel()
    assert await wl.final_reads() == []
    return wl


async def test_workload_history_of_a_correct_store_is_linearizable(
        autojump_clock: trio.testing.MockClock) -> None:
    state, log = MeshState(), [0]
    wl = await _run_workload([FakeKvNode(f"n{i}", state, log) for i in range(3)])
    ops = wl.history.operations()
    assert len(ops) > 500
    assert {op.kind.value for op in ops} == {"get", "put", "cas", "delete"}
    assert any(op.output is False for op in ops if op.kind.value == "cas")  # refused CASes
    assert any(op.output is True for op in ops if op.kind.value == "cas")
    assert wl.stats.unknown == 0
    assert check_kv(ops).outcome is Outcome.OK


async def test_workload_catches_an_acknowledged_write_that_was_lost(
        autojump_clock: trio.testing.MockClock) -> None:
    state, log = MeshState(), [0]
    nodes = [FakeKvNode("n0", state, log), FakeKvNode("n1", state, log, lose_every=7)]
    wl = await _run_workload(nodes)
    result = check_kv(wl.history.operations())
    assert result.outcome is Outcome.FAILED
    assert result.culprit is not None


# --- network rules --------------------------------------------------------------------


def test_partition_rules_cut_both_ways() -> None:
    ips = {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    rules = partition_rules([["n1"], ["n2", "n3"]], ips)
    assert rules["n1"] == NodeRules(frozenset({"10.0.0.2", "10.0.0.3"}),
                                    frozenset({"10.0.0.2", "10.0.0.3"}))
    assert rules["n2"].drop_from == frozenset({"10.0.0.1"})
    assert rules["n3"].drop_to == frozenset({"10.0.0.1"})


def test_oneway_rules_only_deafen_the_victim() -> None:
    ips = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    assert oneway_rules("n1", ips) == {"n1": NodeRules(drop_from=frozenset({"10.0.0.2"}))}


def test_iptables_text() -> None:
    text = iptables_restore_text(NodeRules(frozenset({"10.0.0.2"}), frozenset({"10.0.0.3"}),
                                           0.25), "10.0.0.0/24", exempt="10.0.0.1")
    lines = text.splitlines()
    assert lines[0] == "*filter"
    assert lines[-1] == "COMMIT"
    assert lines.index("-A CHAOS_IN -s 10.0.0.1/32 -j RETURN") < lines.index(
        "-A CHAOS_IN -s 10.0.0.0/24 -m statistic --mode random --probability 0.2500 -j DROP")
    assert "-A CHAOS_IN -s 10.0.0.2/32 -j DROP" in lines
    assert "-A CHAOS_OUT -d 10.0.0.3/32 -j DROP" in lines
    healed = iptables_restore_text(NodeRules(), "10.0.0.0/24")
    assert "DROP" not in healed


def test_count_drops_reads_iptables_counters() -> None:
    listing = """Chain CHAOS_IN (1 references)
    pkts      bytes target     prot opt in     out     source               destination
      12     1040 RETURN     0    --  *      *       10.0.0.1             0.0.0.0/0
     250    31000 DROP       0    --  *      *       10.0.0.2             0.0.0.0/0
       3      120 DROP       0    --  *      *       10.0.0.0/24          0.0.0.0/0   statistic mode random probability 0.2
"""
    assert count_drops(listing) == 253
    assert count_drops("") == 0


def test_queue_rules_let_marked_duplicates_pass() -> None:
    lines = iptables_restore_text(NodeRules(queue=True), "10.0.0.0/24").splitlines()
    mark = lines.index("-A CHAOS_OUT -m mark --mark 0xc4a0 -j RETURN")
    queue = lines.index("-A CHAOS_OUT -d 10.0.0.0/24 -j NFQUEUE --queue-num 7 --queue-bypass")
    assert mark < queue


# --- nfnetlink_queue messages ---------------------------------------------------------


def _nlmsg(kind: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 0, 0) + body


def _nlattr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_bind_and_verdict_messages() -> None:
    msg = nfq.bind_queue(7, seq=5)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) == 16 + 4 + 8
    assert kind == 0x0302  # subsystem queue, config
    assert flags == nfq.NLM_F_REQUEST | nfq.NLM_F_ACK
    assert seq == 5
    assert struct.unpack_from("!BBH", msg, 16) == (0, 0, 7)
    assert struct.unpack_from("=HH", msg, 20) == (8, nfq.NFQA_CFG_CMD)
    assert struct.unpack_from("!BxH", msg, 24) == (nfq.NFQNL_CFG_CMD_BIND, 2)
    v = nfq.verdict(7, 0x01020304)
    assert struct.unpack_from("=HH", v, 20) == (12, nfq.NFQA_VERDICT_HDR)
    assert struct.unpack_from("!II", v, 24) == (nfq.NF_ACCEPT, 0x01020304)
    params = nfq.copy_packets(7)
    assert struct.unpack_from("!IB", params, 24) == (0xFFFF, nfq.NFQNL_COPY_PACKET)


def test_parse_packets_acks_and_errors() -> None:
    body = struct.pack("!BBH", 2, 0, 7) + _nlattr(nfq.NFQA_PACKET_HDR,
                                                  struct.pack("!IHB", 42, 0x0800, 3))
    body += _nlattr(nfq.NFQA_PAYLOAD, b"\x45abc")
    two = _nlmsg(0x0300, body) + _nlmsg(0x0300, body.replace(struct.pack("!I", 42),
                                                             struct.pack("!I", 43)))
    assert nfq.parse(two) == [nfq.QueuedPacket(42, b"\x45abc"), nfq.QueuedPacket(43, b"\x45abc")]
    assert nfq.parse(_nlmsg(nfq.NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16)) == []
    with pytest.raises(nfq.NetlinkError):
        nfq.parse(_nlmsg(nfq.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16))
    assert nfq.parse(b"\x01\x02") == []  # truncated: nothing


def _checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    segment = packet[ihl:]
    data = packet[12:20] + struct.pack("!BBH", 0, packet[9], len(segment)) + segment
    data += b"\0" * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@pytest.mark.parametrize(("proto", "header"), [
    (17, struct.pack("!HHHH", 4000, 7946, 8 + 5, 0x1234)),  # UDP, wrong checksum
    (6, struct.pack("!HHIIBBHHH", 4000, 7946, 1, 2, 5 << 4, 0x18, 512, 0xBEEF, 0)),  # TCP
])
def test_l4_checksum_is_recomputed(proto: int, header: bytes) -> None:
    payload = header + b"hello"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                     bytes([10, 213, 0, 10]), bytes([10, 213, 0, 11]))
    packet = ip + payload
    assert not _checksum_ok(packet)
    fixed = nfq.with_l4_checksum(packet)
    assert len(fixed) == len(packet)
    assert fixed[:20] == ip
    assert _checksum_ok(fixed)
    assert nfq.with_l4_checksum(b"\x60" + b"\0" * 39) == b"\x60" + b"\0" * 39  # IPv6: as is


# --- report and PNG -------------------------------------------------------------------


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_canvas_png_round_trips() -> None:
    c = Canvas(4, 3)
    c.rect(1, 1, 3, 2, (255, 0, 0))
    assert c.pixel(1, 1) == (255, 0, 0)
    assert c.pixel(0, 0) == (255, 255, 255)
    w, h, raw = _decode_png(c.png())
    assert (w, h) == (4, 3)
    row1 = raw[1 * (1 + 4 * 3):2 * (1 + 4 * 3)]
    assert row1[0] == 0  # filter type
    assert row1[1 + 3:1 + 6] == b"\xff\x00\x00"


def test_canvas_text_draws_ink_and_clips() -> None:
    c = Canvas(40, 12)
    end = c.text(0, 0, "n1", (0, 0, 0), scale=1)
    assert end == 8
    assert c.pixel(0, 0) == (0, 0, 0)  # N's top-left pixel
    c.rect(-5, -5, 100, 100, (1, 2, 3))  # clipped, no error
    assert c.pixel(39, 11) == (1, 2, 3)


def _report() -> dict[str, Any]:
    kill = Fault(FaultKind.KILL, "n2", 3, 1)
    loss = Fault(FaultKind.LOSS, "all", 3, 1, {"probability": 0.2})
    records = [FaultRecord(0, kill, ("n2",), 5.0, 8.0, "", 1.2, 0.8, "", 2.1),
               FaultRecord(1, loss, (), None, None, "network faults need namespace mode")]
    invariants = [InvariantResult("one_leader_per_term", "ok", 40, "3 terms"),
                  InvariantResult("services_converge", "skipped", 0, "no services")]
    violations = [inv.Violation(7.0, "no_crash", "n3 exited with status 1")]
    meta = {"scenario": "smoke", "seed": 4, "nodes": 3, "node_names": ["n1", "n2", "n3"],
            "mode": "loopback", "elapsed_s": 20.0}
    return build_report(meta, records, invariants, violations,
                        {"ops": 10, "ok": 8, "failed": 1, "unknown": 1, "keys": 2,
                         "verdict": "linearizable"},
                        [(1.0, 1, "n1"), (6.0, 2, "n3")], [(1.0, 3), (6.0, 2), (9.0, 3)],
                        [(2.0, 3), (6.5, 2)])


def test_report_records_verdict_faults_and_distributions() -> None:
    r = _report()
    assert r["passed"] is False
    assert r["violations"] == [{"t": 7.0, "invariant": "no_crash",
                                "message": "n3 exited with status 1"}]
    assert r["faults"][0]["detect_s"] == 1.2
    assert r["faults"][1]["skipped"] == "network faults need namespace mode"
    assert r["time_to_detect_s"]["count"] == 1
    assert r["time_to_heal_after_kill_s"]["median"] == 0.8
    assert r["time_to_recover_s"]["max"] == 2.1
    assert json.loads(json.dumps(r)) == r


def test_summary_names_everything_a_person_needs() -> None:
    text = summary(_report())
    assert text.startswith("chaos run smoke: FAILED")
    assert "SKIPPED: network faults need namespace mode" in text
    assert "VIOLATIONS (1):" in text
    assert "t=7.00s no_crash: n3 exited with status 1" in text
    assert "time_to_detect_s: n=1" in text
    assert "detect 1.20s  recover 2.10s  heal 0.80s" in text


def test_every_fault_kind_has_a_legend_colour() -> None:
    assert set(KIND_COLORS) == {k.value for k in FaultKind}


def test_timeline_png_is_a_valid_image_with_fault_colours() -> None:
    width, height, raw = _decode_png(timeline_png(_report(), width=600))
    assert width == 600
    assert height > 100
    assert b"\xd6\x27\x28" in raw  # the kill fault's red bar
    assert b"\xd9\x5f\x02" in raw  # the healthy replicas line


# --- a real run -----------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.slow
def test_smoke_scenario(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("namespace mode needs root")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "run", "smoke", "--seed", "1",
         "--report-dir", str(tmp_path / "report")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    assert report["passed"]
    assert report["mode"] == "netns"
    assert not [f for f in report["faults"] if f["skipped"]]
    assert (tmp_path / "report" / "timeline.png").read_bytes()[:4] == b"\x89PNG"
