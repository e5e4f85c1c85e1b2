"""Voter selection: examples, then Hypothesis properties (deterministic, stable,
spread over zones, never ``raft=false``, one valid step at a time that keeps a
majority of the voters alive and converges to the target)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.gossip.messages import Meta, Status
from mesh.raft.messages import ConfChange, ConfChangeKind
from mesh.raft.voters import (
    Candidate,
    candidates,
    next_step,
    target_voters,
    voter_count,
)
from mesh.types import NodeId


def cand(
    name: str, zone: str | None = None, *, healthy: bool = True, vote: bool = True
) -> Candidate:
    labels = {}
    if zone is not None:
        labels["zone"] = zone
    if not vote:
        labels["raft"] = "false"
    return Candidate(NodeId(name), tuple(sorted(labels.items())), healthy)


def names(*ns: str) -> tuple[NodeId, ...]:
    return tuple(NodeId(n) for n in ns)


def cc(kind: ConfChangeKind, node: str) -> ConfChange:
    return ConfChange(kind, NodeId(node))


# ------------------------------------------------------------------ examples


@pytest.mark.parametrize(
    ("desired", "available", "want"),
    [
        (3, 0, 0),
        (3, 1, 1),
        (3, 2, 1),
        (3, 3, 3),
        (3, 4, 3),
        (3, 9, 3),
        (5, 4, 3),
        (5, 5, 5),
        (5, 6, 5),
        (1, 5, 1),
        (7, 6, 5),
    ],
)
def test_voter_count(desired: int, available: int, want: int) -> None:
    assert voter_count(desired, available) == want


def test_desired_must_be_odd_and_small() -> None:
    for bad in (0, 2, 4, 9, True):
        with pytest.raises(ConfigError, match="raft voters"):
            target_voters([cand("a")], [], desired=bad)


def test_small_clusters() -> None:
    assert target_voters([cand("a")], names("a")) == names("a")
    # A second node does not become a voter: two voters are worse than one.
    assert next_step([cand("a"), cand("b")], names("a"), (), leader=NodeId("a")) is None
    # A third one makes it worth growing to three.
    members = [cand("a"), cand("b"), cand("c")]
    assert target_voters(members, names("a")) == names("a", "b", "c")
    assert next_step(members, names("a"), ()) == cc(ConfChangeKind.ADD_LEARNER, "b")


def test_raft_false_never_votes_and_is_moved_out() -> None:
    members = [cand("a"), cand("b", vote=False), cand("c"), cand("d")]
    assert target_voters(members, names("a", "b", "c")) == names("a", "c", "d")
    step = next_step(members, names("a", "b", "c"), ())
    assert step == cc(ConfChangeKind.ADD_LEARNER, "d")  # replacement first
    step = next_step(members, names("a", "b", "c"), names("d"), caught_up=names("d"))
    assert step == cc(ConfChangeKind.PROMOTE, "d")
    assert next_step(members, names("a", "b", "c", "d"), ()) == cc(ConfChangeKind.REMOVE, "b")


def test_dead_voter_replaced_learner_promoted_before_removal() -> None:
    members = [cand("a"), cand("b"), cand("d")]  # c is dead (not a member any more)
    voters = names("a", "b", "c")
    assert next_step(members, voters, (), leader=NodeId("a")) == cc(ConfChangeKind.ADD_LEARNER, "d")
    # Not caught up yet: wait, do not remove c.
    assert next_step(members, voters, names("d"), leader=NodeId("a")) is None
    assert next_step(members, voters, names("d"), caught_up=names("d")) == cc(
        ConfChangeKind.PROMOTE, "d"
    )
    assert next_step(members, names("a", "b", "c", "d"), ()) == cc(ConfChangeKind.REMOVE, "c")
    assert next_step(members, names("a", "b", "d"), ()) is None


def test_suspect_voter_is_kept_and_suspect_member_not_picked() -> None:
    members = [cand("a"), cand("b", healthy=False), cand("c"), cand("d")]
    assert target_voters(members, names("a", "b", "c")) == names("a", "b", "c")
    assert target_voters([cand("a"), cand("b", healthy=False)], names("a")) == names("a")


def test_shrinking_removes_dead_voters_before_live_ones() -> None:
    # Three voters, one dead, nobody to replace it: two nodes run one voter,
    # but c must go before b or {a, c} would have no live majority.
    members = [cand("a"), cand("b")]
    voters = names("a", "b", "c")
    assert target_voters(members, voters, leader=NodeId("b")) == names("b")
    assert next_step(members, voters, (), leader=NodeId("b")) == cc(ConfChangeKind.REMOVE, "c")
    assert next_step(members, names("a", "b"), (), leader=NodeId("b")) == cc(
        ConfChangeKind.REMOVE, "a"
    )


def test_spread_over_zones_and_rebalance_one_step_at_a_time() -> None:
    members = [cand("a1", "a"), cand("a2", "a"), cand("a3", "a"), cand("b1", "b"), cand("c1", "c")]
    assert target_voters(members, names("a1", "a2", "a3")) == names("a1", "b1", "c1")
    assert target_voters(members, names("a1", "a2", "a3"), leader=NodeId("a2")) == names(
        "a2", "b1", "c1"
    )
    five = [*members, cand("b2", "b"), cand("c2", "c")]
    assert target_voters(five, (), desired=5) == names("a1", "a2", "b1", "b2", "c1")


def test_candidates_from_gossip_members() -> None:
    @dataclass(frozen=True)
    class View:
        node: NodeId
        status: Status
        meta: Meta
        since: float

    meta = Meta.build({"zone": "a"}, 1000, 1 << 30, "worker", {})
    views = [
        View(NodeId("old"), Status.ALIVE, meta, 0.0),
        View(NodeId("new"), Status.ALIVE, meta, 95.0),
        View(NodeId("sus"), Status.SUSPECT, meta, 0.0),
        View(NodeId("dead"), Status.DEAD, meta, 0.0),
        View(NodeId("left"), Status.LEFT, meta, 0.0),
    ]
    got = candidates(views, now=100.0, stable_s=10.0)
    assert [(c.node, c.healthy, c.zone) for c in got] == [
        ("new", False, "a"),
        ("old", True, "a"),
        ("sus", False, "a"),
    ]


# ------------------------------------------------------------------ properties

NAMES = [NodeId(f"n{i}") for i in range(9)]


@st.composite
def clusters(
    draw: st.DrawFn,
) -> tuple[list[Candidate], tuple[NodeId, ...], tuple[NodeId, ...], int, NodeId | None]:
    present = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=9))
    members = [
        cand(
            n,
            draw(st.sampled_from([None, "a", "b", "c"])),
            healthy=draw(st.booleans()) or draw(st.booleans()),
            vote=draw(st.integers(0, 5)) > 0,
        )
        for n in present
    ]
    voters = tuple(
        sorted(draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=6)))
    )
    learners = tuple(
        sorted(
            n
            for n in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
            if n not in voters
        )
    )
    desired = draw(st.sampled_from([1, 3, 5]))
    live_voters = [c.node for c in members if c.node in voters]
    leader = draw(st.one_of(st.none(), st.sampled_from(live_voters))) if live_voters else None
    return members, voters, learners, desired, leader


def _pool(members: list[Candidate], voters: tuple[NodeId, ...]) -> list[Candidate]:
    return [c for c in members if c.may_vote and (c.healthy or c.node in voters)]


@given(clusters(), st.randoms(use_true_random=False))
def test_target_is_deterministic_and_well_formed(
    cluster: tuple[list[Candidate], tuple[NodeId, ...], tuple[NodeId, ...], int, NodeId | None],
    rnd: random.Random,
) -> None:
    members, voters, learners, desired, leader = cluster
    target = target_voters(members, voters, desired=desired, leader=leader, learners=learners)
    shuffled = list(members) + list(members[:2])  # order and duplicates do not matter
    rnd.shuffle(shuffled)
    shuffled_voters = list(voters)
    rnd.shuffle(shuffled_voters)
    assert (
        target_voters(shuffled, shuffled_voters, desired=desired, leader=leader, learners=learners)
        == target
    )
    pool = _pool(members, voters)
    if not pool:
        assert target == voters
        return
    assert list(target) == sorted(set(target))
    assert len(target) == voter_count(desired, len(pool))
    by_node = {c.node: c for c in pool}
    assert all(n in by_node for n in target)  # never raft=false, never dead, never new+unhealthy
    zones = {c.zone for c in pool}
    assert len({by_node[n].zone for n in target}) == min(len(target), len(zones))
    if leader is not None and leader in by_node:
        assert leader in target
    # Stable: a target is its own target.
    assert target_voters(members, target, desired=desired, leader=leader) == target


@given(clusters())
def test_healthy_voters_are_kept_when_there_is_room(
    cluster: tuple[list[Candidate], tuple[NodeId, ...], tuple[NodeId, ...], int, NodeId | None],
) -> None:
    members, voters, _, desired, leader = cluster
    members = [Candidate(c.node, (), c.healthy) for c in members]  # no zones, everyone may vote
    pool = _pool(members, voters)
    size = voter_count(desired, len(pool))
    kept = [n for n in voters if n in {c.node for c in pool}]
    target = target_voters(members, voters, desired=desired, leader=leader)
    if len(kept) <= size:
        assert set(kept) <= set(target)
    else:
        assert set(target) <= set(kept)


def _apply(step: ConfChange, voters: set[NodeId], learners: set[NodeId]) -> None:
    n = step.node
    if step.kind is ConfChangeKind.ADD_LEARNER:
        assert n not in voters
        assert n not in learners
        learners.add(n)
    elif step.kind is ConfChangeKind.PROMOTE:
        assert n in learners
        learners.discard(n)
        voters.add(n)
    else:
        assert step.kind is ConfChangeKind.REMOVE
        assert n in voters or n in learners
        assert voters != {n}, "removed the last voter"
        voters.discard(n)
        learners.discard(n)


@given(clusters())
def test_steps_are_valid_keep_a_live_majority_and_converge(
    cluster: tuple[list[Candidate], tuple[NodeId, ...], tuple[NodeId, ...], int, NodeId | None],
) -> None:
    members, voters0, learners0, desired, leader = cluster
    present = {c.node for c in members}
    voters, learners = set(voters0), set(learners0)
    bound = 2 * len(NAMES) + len(voters) + len(learners)
    for _ in range(bound):
        if leader is not None and leader not in voters:
            leader = None  # it removed itself and handed over
        step = next_step(
            members,
            sorted(voters),
            sorted(learners),
            desired=desired,
            leader=leader,
            caught_up=sorted(learners),
        )
        if step is None:
            break
        live_before = len(voters & present)
        had_majority = live_before > len(voters) // 2
        _apply(step, voters, learners)
        if had_majority:
            assert len(voters & present) > len(voters) // 2, (step, voters)
    else:
        pytest.fail("no fixed point")
    target = target_voters(members, sorted(voters), desired=desired, leader=leader)
    if _pool(members, tuple(voters)):
        assert tuple(sorted(voters)) == target
        assert not learners


def test_learners_outside_the_target_are_removed_one_at_a_time() -> None:
    # e.g. left from the time every live member was kept as a learner
    members = [Candidate(NodeId(f"n{i}"), (), True) for i in range(5)]
    voters = [NodeId("n0"), NodeId("n1"), NodeId("n2")]
    learners = [NodeId("n3"), NodeId("n4")]
    step = next_step(members, voters, learners, desired=3, leader=NodeId("n0"))
    assert step == ConfChange(ConfChangeKind.REMOVE, NodeId("n3"))
    assert next_step(members, voters, learners[1:], desired=3, leader=NodeId("n0")) == \
        ConfChange(ConfChangeKind.REMOVE, NodeId("n4"))
    assert next_step(members, voters, [], desired=3, leader=NodeId("n0")) is None
