"""Raft scenarios in the spirit of the Raft lab suites and etcd's raft_test.go.

Every scenario runs real cores on :class:`mesh.raft.testing.Network`, whose
checkers raise on a broken safety property (one leader per term, leader
completeness, state machine safety) at the step that breaks it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mesh.errors import LocalProtocolError, NotLeader, ProposalDropped
from mesh.raft.config import RaftConfig
from mesh.raft.core import ProgressState, RaftCore, Role
from mesh.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeKind,
    Heartbeat,
    InstallSnapshot,
    RaftMessage,
    RequestVote,
    TimeoutNow,
)
from mesh.raft.storage import FileStorage, MemoryStorage, RaftStorage, bootstrap
from mesh.raft.testing import Network
from mesh.types import NodeId

ABC = ["a", "b", "c"]
FIVE = ["s1", "s2", "s3", "s4", "s5"]


def _cfg(**kw: object) -> RaftConfig:
    return dataclasses.replace(RaftConfig(election_ticks=10, heartbeat_ticks=1), **kw)  # type: ignore[arg-type]


def _leader_among(net: Network, group: list[str], max_ticks: int = 200) -> str:
    for _ in range(max_ticks):
        for n in group:
            node = net.nodes[NodeId(n)]
            if node.core is not None and node.core.role is Role.LEADER:
                return n
        net.tick()
    raise AssertionError(f"no leader among {group}")


def _commit_all(net: Network, lead: str, datas: list[bytes]) -> None:
    for d in datas:
        net.propose(lead, d)
    net.deliver_all()
    net.tick(2)


def test_initial_election() -> None:
    net = Network(ABC, seed=1)
    lead = net.wait_leader()
    terms = {net.core(n).term for n in ABC}
    assert len(terms) == 1
    assert [n for n in ABC if net.core(n).role is Role.LEADER] == [lead]
    assert all(net.core(n).leader == lead for n in ABC)
    # No new election while nothing fails.
    term = net.core(lead).term
    net.tick(100)
    assert net.leader() == lead
    assert net.core(lead).term == term


def test_single_node_cluster_commits_alone() -> None:
    net = Network(["solo"], seed=3)
    lead = net.wait_leader()
    assert lead == "solo"
    _commit_all(net, lead, [b"x", b"y"])
    assert net.nodes[NodeId("solo")].sm.commands()[-2:] == [b"x", b"y"]


def test_reelection_after_leader_loss() -> None:
    net = Network(ABC, seed=2)
    old = net.wait_leader()
    net.isolate(old)
    net.tick(40)
    others = [n for n in ABC if n != old]
    new = net.leader()
    assert new in others
    # CheckQuorum: the cut-off leader stepped down on its own.
    assert net.core(old).role is not Role.LEADER
    net.recover()
    net.tick(5)
    assert net.leader() == new
    assert net.core(old).leader == new


def test_no_quorum_no_leader() -> None:
    net = Network(FIVE, seed=4)
    net.wait_leader()
    for n in FIVE[:3]:
        net.crash(n)
    net.tick(100)
    assert net.leader() is None
    net.restart(FIVE[0])
    lead = net.wait_leader()
    assert lead in (FIVE[0], FIVE[3], FIVE[4])


def test_agreement_despite_follower_failure() -> None:
    net = Network(ABC, seed=5)
    lead = net.wait_leader()
    follower = next(n for n in ABC if n != lead)
    net.crash(follower)
    _commit_all(net, lead, [b"1", b"2", b"3"])
    assert net.nodes[NodeId(lead)].sm.commands()[-3:] == [b"1", b"2", b"3"]
    net.restart(follower)
    net.tick(5)
    assert net.nodes[NodeId(follower)].sm.commands()[-3:] == [b"1", b"2", b"3"]
    net.check_log_matching()


def test_rejoin_of_partitioned_leader() -> None:
    net = Network(ABC, seed=6)
    old = net.wait_leader()
    _commit_all(net, old, [b"committed"])
    net.isolate(old)
    for d in (b"lost1", b"lost2"):
        net.propose(old, d)  # never reach a quorum
    new = _leader_among(net, [n for n in ABC if n != old])
    _commit_all(net, new, [b"after"])
    net.recover()
    net.tick(10)
    assert net.leader() == new
    for n in ABC:
        cmds = net.nodes[NodeId(n)].sm.commands()
        assert b"after" in cmds
        assert b"lost1" not in cmds
        assert b"lost2" not in cmds
    net.check_log_matching()


def test_figure_8_leader_commits_only_current_term_entries() -> None:
    """Raft paper Figure 8: an old-term entry on a majority is not committed."""
    net = Network(FIVE, seed=7, config=_cfg(pre_vote=False, check_quorum=False))
    s1, s2, s3, s4, s5 = FIVE
    net.campaign(s1)
    assert net.leader() == s1
    base = net.core(s1).commit_index
    # (a) s1 (term 2) replicates X to s2 only, then crashes.
    net.partition([s1, s2], [s3, s4, s5])
    net.propose(s1, b"X")
    net.deliver_all()
    x_index = base + 1
    assert net.core(s2).log.last_index() == x_index
    net.crash(s1)
    net.recover()
    # (b) s5 wins term 3 with s3, s4 and appends Y locally only, then crashes.
    net.msg_filter = lambda m: not (m.src == s5 and isinstance(m, AppendEntries))
    net.campaign(s5)
    assert net.core(s5).role is Role.LEADER
    net.propose(s5, b"Y")
    net.crash(s5)
    net.msg_filter = None
    # (c) s1 restarts and wins term 4; its appends reach only s3: X is now on
    # s1, s2, s3 (a majority) but the term-4 entry only on s1 and s3.
    net.restart(s1)
    net.msg_filter = lambda m: (
        not (m.src == s1 and isinstance(m, AppendEntries) and m.dst in (s2, s4))
    )
    while net.core(s1).role is not Role.LEADER:
        net.campaign(s1)
    net.deliver_all()
    assert net.core(s3).log.term(x_index) == net.core(s2).log.term(x_index)
    assert net.core(s1).commit_index < x_index, "committed an old-term entry by counting"
    # (d) s1 crashes; s5 wins with s2 and s4 and overwrites X everywhere.
    net.crash(s1)
    net.msg_filter = None
    net.restart(s5)
    while net.core(s5).role is not Role.LEADER:
        net.campaign(s5)
    net.tick(3)
    net.restart(s1)
    net.tick(5)
    assert all(net.core(n).log.term(x_index) == 3 for n in FIVE)
    for n in FIVE:
        assert b"X" not in net.nodes[NodeId(n)].sm.commands()
        assert b"Y" in net.nodes[NodeId(n)].sm.commands()
    net.check_log_matching()


def test_fast_log_backtracking() -> None:
    """A follower far behind with a divergent tail is fixed in few round trips."""
    net = Network(FIVE, seed=8)
    s1, s2, s3, s4, s5 = FIVE
    net.campaign(s1)
    # s1 keeps 40 uncommitted entries of its term, cut off with s2.
    net.partition([s1, s2], [s3, s4, s5])
    for i in range(40):
        net.propose(s1, b"old%d" % i)
    net.deliver_all()
    # s3..s5 move on over several terms with many entries each.
    new = _leader_among(net, [s3, s4, s5])
    for round_ in range(3):
        for i in range(40):
            net.propose(new, b"new%d-%d" % (round_, i))
        net.deliver_all()
        net.tick(2)
        net.crash(new)
        net.restart(new)
        new = _leader_among(net, [s3, s4, s5])
    rejects: list[RaftMessage] = []

    def count(m: RaftMessage) -> bool:
        if isinstance(m, AppendEntriesResponse) and m.reject:
            rejects.append(m)
        return True

    net.msg_filter = count
    net._cut.clear()
    net.tick(10)
    assert len(rejects) <= 6, f"{len(rejects)} rejections: backtracking is not by term"
    net.check_log_matching()
    assert net.core(s1).applied_index == net.core(new).commit_index


def test_persistence_across_crash_of_every_node() -> None:
    net = Network(ABC, seed=9)
    lead = net.wait_leader()
    _commit_all(net, lead, [b"p1", b"p2"])
    term = net.core(lead).term
    for n in ABC:
        net.crash(n)
    for n in ABC:
        net.restart(n)
    # Restarted nodes keep their term and vote, and re-apply from the log.
    assert all(net.core(n).term >= term for n in ABC)
    lead = net.wait_leader()
    _commit_all(net, lead, [b"p3"])
    for n in ABC:
        assert net.nodes[NodeId(n)].sm.commands()[-3:] == [b"p1", b"p2", b"p3"]


def test_persistence_with_file_storage(tmp_path: Path) -> None:
    def factory(nid: NodeId) -> RaftStorage:
        return FileStorage(tmp_path / nid, sync=False)

    with Network(ABC, seed=10, storage_factory=factory) as net:
        _file_persistence(net)


def _file_persistence(net: Network) -> None:
    lead = net.wait_leader()
    _commit_all(net, lead, [b"f%d" % i for i in range(20)])
    net.compact(lead, keep=5)
    for n in ABC:
        net.crash(n)
        net.restart(n)
    lead = net.wait_leader()
    _commit_all(net, lead, [b"after"])
    for n in ABC:
        cmds = net.nodes[NodeId(n)].sm.commands()
        assert cmds[-21:] == [b"f%d" % i for i in range(20)] + [b"after"]
    net.check_log_matching()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_unreliable_network(seed: int) -> None:
    net = Network(FIVE, seed=seed, codec=True)
    net.wait_leader()
    net.drop_rate, net.dup_rate, net.reorder = 0.1, 0.1, True
    datas = [b"u%d" % i for i in range(15)]
    for d in datas:
        net.propose_until_committed(d)
    net.recover()
    net.tick(10)
    net.check_log_matching()
    for n in FIVE:
        cmds = net.nodes[NodeId(n)].sm.commands()
        for d in datas:
            assert d in cmds, f"{n} lacks {d!r}"
    net.check_converged()


@pytest.mark.parametrize("seed", [21, 22])
def test_churn(seed: int) -> None:
    net = Network(FIVE, seed=seed)
    net.wait_leader()
    rng = net.rng
    datas = []
    for i in range(20):
        victim = rng.choice(FIVE)
        if net.nodes[NodeId(victim)].core is not None and len(net.alive()) > 3:
            net.crash(victim)
        else:
            for n in FIVE:
                if net.nodes[NodeId(n)].core is None:
                    net.restart(n)
                    break
        d = b"c%d" % i
        datas.append(d)
        net.propose_until_committed(d)
    for n in FIVE:
        if net.nodes[NodeId(n)].core is None:
            net.restart(n)
    net.tick(20)
    net.check_log_matching()
    net.check_converged()
    for n in FIVE:
        cmds = net.nodes[NodeId(n)].sm.commands()
        assert all(d in cmds for d in datas)


def test_snapshot_install_in_chunks() -> None:
    net = Network(ABC, seed=14, config=_cfg(snapshot_chunk_bytes=64))
    lead = net.wait_leader()
    lagger = next(n for n in ABC if n != lead)
    net.crash(lagger)
    _commit_all(net, lead, [b"s%03d" % i for i in range(60)])
    index = net.compact(lead)
    assert net.nodes[NodeId(lead)].storage.first_index() == index + 1
    chunks: list[InstallSnapshot] = []

    def watch(m: RaftMessage) -> bool:
        if isinstance(m, InstallSnapshot):
            chunks.append(m)
        return True

    net.msg_filter = watch
    net.restart(lagger)
    net.tick(5)
    assert len(chunks) > 3
    assert chunks[-1].done
    lag = net.core(lagger)
    assert lag.log.first_index() == index + 1
    assert net.nodes[NodeId(lagger)].sm.entries == net.nodes[NodeId(lead)].sm.entries
    _commit_all(net, lead, [b"post"])
    assert net.nodes[NodeId(lagger)].sm.commands()[-1] == b"post"
    net.check_log_matching()


def test_snapshot_install_survives_lost_chunks() -> None:
    net = Network(ABC, seed=15, config=_cfg(snapshot_chunk_bytes=32))
    lead = net.wait_leader()
    lagger = next(n for n in ABC if n != lead)
    net.crash(lagger)
    _commit_all(net, lead, [b"z%03d" % i for i in range(40)])
    net.compact(lead)
    net.restart(lagger)
    net.drop_rate = 0.3
    net.tick(200)
    net.recover()
    net.tick(30)
    assert net.nodes[NodeId(lagger)].sm.entries == net.nodes[NodeId(lead)].sm.entries


def test_follower_restart_after_installing_snapshot(tmp_path: Path) -> None:
    def factory(nid: NodeId) -> RaftStorage:
        return FileStorage(tmp_path / nid, sync=False)

    with Network(
        ABC, seed=16, storage_factory=factory, config=_cfg(snapshot_chunk_bytes=100)
    ) as net:
        _restart_after_snapshot(net)


def _restart_after_snapshot(net: Network) -> None:
    lead = net.wait_leader()
    lagger = next(n for n in ABC if n != lead)
    net.crash(lagger)
    _commit_all(net, lead, [b"q%03d" % i for i in range(30)])
    net.compact(lead)
    net.restart(lagger)
    net.tick(5)
    net.crash(lagger)
    net.restart(lagger)
    net.tick(3)
    assert net.nodes[NodeId(lagger)].sm.entries == net.nodes[NodeId(lead)].sm.entries


def test_membership_add_learner_promote_remove() -> None:
    net = Network(ABC, seed=17)
    lead = net.wait_leader()
    net.add_node("d")
    core = net.core(lead)
    core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, NodeId("d")))
    # One change at a time.
    with pytest.raises(ProposalDropped):
        core.propose_conf_change(ConfChange(ConfChangeKind.PROMOTE, NodeId("d")))
    net.process(lead)
    net.tick(5)
    assert net.core("d").conf_state.learners == ("d",)
    assert net.nodes[NodeId("d")].sm.entries == net.nodes[NodeId(lead)].sm.entries
    with pytest.raises(LocalProtocolError):
        net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.ADD_VOTER, NodeId(lead)))
    net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.PROMOTE, NodeId("d")))
    net.process(lead)
    net.tick(5)
    assert all(net.core(n).conf_state.voters == ("a", "b", "c", "d") for n in net.alive())
    victim = next(n for n in ABC if n != lead)
    net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.REMOVE, NodeId(victim)))
    net.process(lead)
    net.tick(5)
    remaining = tuple(sorted({"a", "b", "c", "d"} - {victim}))
    assert net.core(lead).conf_state.voters == remaining
    # The group of three works without the removed node.
    net.crash(victim)
    _commit_all(net, lead, [b"after-remove"])
    assert b"after-remove" in net.nodes[NodeId("d")].sm.commands()


def test_removed_leader_hands_over() -> None:
    net = Network(ABC, seed=18)
    lead = net.wait_leader()
    net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.REMOVE, NodeId(lead)))
    net.process(lead)
    net.deliver_all()
    net.tick(2)
    assert net.core(lead).role is Role.FOLLOWER
    new = net.wait_leader(max_ticks=5)  # TimeoutNow: no election timeout needed
    assert new != lead
    assert net.core(new).conf_state.voters == tuple(sorted(set(ABC) - {lead}))


@pytest.mark.parametrize("seed", [31, 32])
def test_membership_changes_under_faults(seed: int) -> None:
    net = Network(ABC, seed=seed)
    net.wait_leader()
    net.add_node("d")
    net.add_node("e")
    changes = [
        ConfChange(ConfChangeKind.ADD_LEARNER, NodeId("d")),
        ConfChange(ConfChangeKind.PROMOTE, NodeId("d")),
        ConfChange(ConfChangeKind.ADD_VOTER, NodeId("e")),
        ConfChange(ConfChangeKind.REMOVE, NodeId("a")),
    ]
    net.drop_rate, net.reorder = 0.15, True
    for cc in changes:
        for _ in range(100):
            lead = net.leader()
            if lead is not None:
                core = net.core(lead)
                if core.conf_state == _after(core.conf_state, cc):
                    break
                try:
                    core.propose_conf_change(cc)
                    net.process(lead)
                except (ProposalDropped, NotLeader, LocalProtocolError):
                    pass
            net.tick(3)
            if net.nodes[NodeId("a")].core is not None and net.rng.random() < 0.1:
                victim = net.rng.choice(net.alive())
                net.crash(victim)
                net.tick(2)
                net.restart(victim)
        else:
            raise AssertionError(f"{cc} never applied")
    net.recover()
    net.tick(30)
    lead = net.wait_leader()
    assert net.core(lead).conf_state.voters == ("b", "c", "d", "e")
    net.propose_until_committed(b"final")
    net.check_log_matching()


def _after(cs: object, cc: ConfChange) -> object:
    from mesh.raft.messages import ConfState

    assert isinstance(cs, ConfState)
    voters, learners = set(cs.voters), set(cs.learners)
    if cc.kind in (ConfChangeKind.ADD_VOTER, ConfChangeKind.PROMOTE):
        learners.discard(cc.node)
        voters.add(cc.node)
    elif cc.kind is ConfChangeKind.ADD_LEARNER:
        learners.add(cc.node)
    else:
        voters.discard(cc.node)
        learners.discard(cc.node)
    return ConfState.of(voters, learners)


def test_leadership_transfer() -> None:
    net = Network(ABC, seed=19)
    lead = net.wait_leader()
    target = next(n for n in ABC if n != lead)
    net.crash(target)
    _commit_all(net, lead, [b"t1", b"t2"])
    net.restart(target)
    term = net.core(lead).term
    net.core(lead).transfer_leadership(NodeId(target))
    with pytest.raises(ProposalDropped):
        net.core(lead).propose(b"during")
    net.process(lead)
    net.deliver_all()  # catches the target up, then TimeoutNow
    assert net.leader() == target
    assert net.core(target).term == term + 1
    assert net.core(lead).role is Role.FOLLOWER
    _commit_all(net, target, [b"t3"])
    assert net.nodes[NodeId(lead)].sm.commands()[-1] == b"t3"


def test_leadership_transfer_aborts_after_election_timeout() -> None:
    net = Network(ABC, seed=20)
    lead = net.wait_leader()
    target = next(n for n in ABC if n != lead)
    net.isolate(target)
    net.core(lead).transfer_leadership(NodeId(target))
    net.process(lead)
    net.tick(net.config.election_ticks + 1, nodes=[n for n in ABC if n != target])
    assert net.core(lead).status().lead_transferee is None
    net.propose(lead, b"accepted again")


def test_transfer_bypasses_lease_but_disruptive_candidates_do_not() -> None:
    net = Network(ABC, seed=23)
    lead = net.wait_leader()
    follower = next(n for n in ABC if n != lead)
    core = net.core(follower)
    term = core.term
    # A vote request at a higher term without transfer is ignored in the lease.
    core.step(RequestVote(NodeId("x"), NodeId(follower), term + 5, 10**6, term + 4))
    assert core.term == term
    core.step(RequestVote(NodeId("x"), NodeId(follower), term + 5, 10**6, term + 4, transfer=True))
    assert core.term == term + 5


def test_read_index_on_leader_and_follower() -> None:
    net = Network(ABC, seed=24)
    lead = net.wait_leader()
    _commit_all(net, lead, [b"r1"])
    commit = net.core(lead).commit_index
    net.core(lead).read_index(b"req-1")
    net.process(lead)
    net.deliver_all()
    assert [(r.index, r.context) for r in net.nodes[NodeId(lead)].read_states] == [
        (commit, b"req-1")
    ]
    follower = next(n for n in ABC if n != lead)
    net.core(follower).read_index(b"req-2")
    net.process(follower)
    net.deliver_all()
    assert [(r.index, r.context) for r in net.nodes[NodeId(follower)].read_states] == [
        (commit, b"req-2")
    ]
    with pytest.raises(LocalProtocolError):
        net.core(lead).read_index(b"")


def test_read_index_needs_a_quorum() -> None:
    net = Network(ABC, seed=25)
    lead = net.wait_leader()
    net.isolate(lead)
    net.core(lead).read_index(b"stale?")
    net.process(lead)
    net.tick(3, nodes=[lead])
    assert net.nodes[NodeId(lead)].read_states == []


def test_read_index_waits_for_commit_in_new_term() -> None:
    net = Network(ABC, seed=26)
    old = net.wait_leader()
    _commit_all(net, old, [b"x"])
    net.crash(old)
    new = net.wait_leader()
    # Freshly elected: ask before anything else was delivered.
    net.core(new).read_index(b"early")
    net.process(new)
    net.deliver_all()
    net.tick(1)
    states = net.nodes[NodeId(new)].read_states
    assert [r.context for r in states] == [b"early"]
    assert net.core(new).log.term(states[0].index) == net.core(new).term


def test_learners_do_not_vote_or_campaign() -> None:
    net = Network(["a"], seed=27)
    net.wait_leader()
    net.add_node("l")
    net.core("a").propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, NodeId("l")))
    net.process("a")
    net.tick(3)
    assert net.core("l").conf_state.learners == ("l",)
    # The lone voter commits alone: the learner is not in the quorum.
    net.isolate("l")
    _commit_all(net, "a", [b"no learner needed"])
    assert b"no learner needed" in net.nodes[NodeId("a")].sm.commands()
    # A learner never campaigns, however long it hears nothing.
    net.crash("a")
    net.tick(200)
    assert net.core("l").role is Role.FOLLOWER
    assert net.core("l").term == net.core("l").status().term


def test_prevote_keeps_rejoining_node_from_disrupting() -> None:
    net = Network(ABC, seed=28)
    lead = net.wait_leader()
    term = net.core(lead).term
    follower = next(n for n in ABC if n != lead)
    net.isolate(follower)
    net.tick(100)
    assert net.core(follower).term == term  # PreVote never won, term unchanged
    net.recover()
    net.tick(5)
    assert net.leader() == lead
    assert net.core(lead).term == term


def test_a_node_holding_campaigns_never_starts_one_until_released() -> None:
    """What a voter removed while it was away does once it learns of it: it stops
    PreVote rounds that cannot win, and starts them again when released."""
    net = Network(ABC, seed=30)
    lead = net.wait_leader()
    follower = next(n for n in ABC if n != lead)
    net.isolate(follower)
    core = net.core(follower)
    core.hold_campaigns(True)
    roles = set()
    for _ in range(100):
        net.tick(1)
        roles.add(core.role)
    assert roles == {Role.FOLLOWER}
    core.hold_campaigns(False)
    for _ in range(100):
        net.tick(1)
        roles.add(core.role)
    assert Role.PRE_CANDIDATE in roles


def test_without_prevote_rejoining_node_bumps_term() -> None:
    net = Network(ABC, seed=29, config=_cfg(pre_vote=False, check_quorum=False))
    lead = net.wait_leader()
    term = net.core(lead).term
    follower = next(n for n in ABC if n != lead)
    net.isolate(follower)
    net.tick(100)
    assert net.core(follower).term > term


def test_proposals_to_followers_raise_not_leader_with_hint() -> None:
    net = Network(ABC, seed=30)
    lead = net.wait_leader()
    follower = next(n for n in ABC if n != lead)
    with pytest.raises(NotLeader) as info:
        net.core(follower).propose(b"x")
    assert info.value.leader_hint == lead
    with pytest.raises(ProposalDropped):
        net.core(lead).propose(b"x" * (net.config.max_entry_bytes + 1))


def test_ready_contract_is_enforced() -> None:
    storage = MemoryStorage()
    bootstrap(storage, [NodeId("a")])
    import random

    core = RaftCore(_cfg(), NodeId("a"), storage, random.Random(1))
    rd = core.ready()
    assert rd is not None
    with pytest.raises(LocalProtocolError):
        core.ready()
    storage.save(rd.hard_state, rd.entries, rd.snapshot)
    core.advance(rd)
    with pytest.raises(LocalProtocolError):
        core.advance(rd)


def test_batching_many_proposals_one_ready_one_message_per_peer() -> None:
    net = Network(ABC, seed=33)
    lead = net.wait_leader()
    net.tick(2)
    core = net.core(lead)
    for i in range(500):
        core.propose(b"b%d" % i)
    rd = core.ready()
    assert rd is not None
    assert len(rd.entries) == 500
    assert rd.must_sync
    appends = [m for m in rd.messages if isinstance(m, AppendEntries)]
    assert sorted(m.dst for m in appends) == sorted(n for n in ABC if n != lead)
    assert all(len(m.entries) == 500 for m in appends)
    net.nodes[NodeId(lead)].storage.save(rd.hard_state, rd.entries, rd.snapshot)
    for m in rd.messages:
        net.in_flight.append(m)
    core.advance(rd)
    net.process(lead)
    net.deliver_all()
    assert core.commit_index == core.last_index


def test_pipelining_respects_inflight_window() -> None:
    net = Network(ABC, seed=34, config=_cfg(max_inflight_msgs=3, max_size_per_msg=1))
    lead = net.wait_leader()
    net.tick(2)
    follower = next(n for n in ABC if n != lead)
    core = net.core(lead)
    assert core.status().progress[NodeId(follower)].state is ProgressState.REPLICATE
    for i in range(10):
        core.propose(b"w%d" % i)
    rd = core.ready()
    assert rd is not None
    to_follower = [m for m in rd.messages if isinstance(m, AppendEntries) and m.dst == follower]
    assert len(to_follower) == 3  # one entry per message (size limit), window of 3
    net.nodes[NodeId(lead)].storage.save(rd.hard_state, rd.entries, rd.snapshot)
    net.in_flight.extend(rd.messages)
    core.advance(rd)
    net.deliver_all()
    net.tick(2)
    assert all(net.core(n).commit_index == core.last_index for n in ABC)


def test_check_quorum_leader_steps_down_when_cut_off() -> None:
    net = Network(FIVE, seed=35)
    lead = net.wait_leader()
    net.isolate(lead)
    net.tick(net.config.election_ticks * 2 + 1, nodes=[lead])
    assert net.core(lead).role is Role.FOLLOWER


def test_timeout_now_from_stale_term_is_ignored() -> None:
    net = Network(ABC, seed=36)
    lead = net.wait_leader()
    follower = next(n for n in ABC if n != lead)
    core = net.core(follower)
    term = core.term
    core.step(TimeoutNow(NodeId(lead), NodeId(follower), term - 1))
    assert core.role is Role.FOLLOWER
    assert core.term == term


def test_same_seed_same_run() -> None:
    def trace(seed: int) -> list[bytes]:
        net = Network(FIVE, seed=seed)
        out: list[bytes] = []

        def rec(m: RaftMessage) -> bool:
            out.append(m.to_wire())
            return True

        net.msg_filter = rec
        net.drop_rate = 0.1
        net.wait_leader()
        for i in range(5):
            net.propose_until_committed(b"d%d" % i)
        return out

    assert trace(41) == trace(41)
    assert trace(41) != trace(42)


def test_read_index_batches_many_reads_into_one_heartbeat_round() -> None:
    net = Network(ABC, seed=37)
    lead = net.wait_leader()
    net.tick(2)
    core = net.core(lead)
    for i in range(10):
        core.read_index(b"read-%d" % i)
    rd = core.ready()
    assert rd is not None
    heartbeats = [m for m in rd.messages if isinstance(m, Heartbeat)]
    assert sorted(m.dst for m in heartbeats) == sorted(n for n in ABC if n != lead)
    assert all(m.context == b"read-9" for m in heartbeats)
    net.nodes[NodeId(lead)].storage.save(rd.hard_state, rd.entries, rd.snapshot)
    net.in_flight.extend(rd.messages)
    core.advance(rd)
    net.deliver_all()
    got = [r.context for r in net.nodes[NodeId(lead)].read_states]
    assert got == [b"read-%d" % i for i in range(10)]


def test_only_a_leader_with_durable_term_and_vote_may_send_before_persisting() -> None:
    net = Network(ABC, seed=4, config=_cfg(pre_vote=False, check_quorum=False))
    lead = net.wait_leader()
    _commit_all(net, lead, [b"a"])
    # A follower that campaigns must write its new term and vote first.
    follower = next(n for n in ABC if n != lead)
    net.isolate(follower)
    core = net.core(follower)
    for _ in range(4 * net.config.election_ticks):
        core.tick()
        rd = core.ready()
        if rd is None:
            continue
        votes = [m for m in rd.messages if isinstance(m, RequestVote) and not m.pre_vote]
        if votes:
            assert rd.hard_state is not None
            assert rd.hard_state.vote == follower
            assert not rd.send_before_persist
            break
        core.advance(rd)
    else:
        raise AssertionError("the isolated follower never campaigned")
    # The leader's Ready with new entries may leave before its own write.
    net.core(lead).propose(b"x")
    rd = net.core(lead).ready()
    assert rd is not None
    assert rd.entries
    assert any(isinstance(m, AppendEntries) for m in rd.messages)
    assert rd.send_before_persist


def test_leader_crash_between_sending_and_persisting_loses_nothing_committed() -> None:
    net = Network(ABC, seed=6)
    lead = net.wait_leader()
    _commit_all(net, lead, [b"a"])
    core = net.core(lead)
    core.propose(b"x")
    rd = core.ready()
    assert rd is not None
    assert rd.send_before_persist
    net.in_flight.extend(rd.messages)  # sent; the leader's own write never happens
    net.crash(lead)
    net.deliver_all()  # both followers persist x
    others = [n for n in ABC if n != lead]
    new = _leader_among(net, others)
    _commit_all(net, new, [b"y"])
    net.restart(lead)
    net.tick(5)
    net.deliver_all()
    net.tick(5)
    net.deliver_all()
    for n in ABC:
        assert net.nodes[NodeId(n)].sm.commands()[-3:] == [b"a", b"x", b"y"], n
