"""Quorum math against deliberately simple references (etcd quorum/quick_test.go)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.raft.quorum import (
    UNBOUNDED_INDEX,
    JointConfig,
    VoteResult,
    majority_committed_index,
    majority_vote_result,
)
from mesh.types import NodeId

NAMES = [NodeId(f"n{i}") for i in range(9)]
voter_sets = st.sets(st.sampled_from(NAMES), max_size=7)
acks = st.dictionaries(st.sampled_from(NAMES), st.integers(0, 20), max_size=9)
votes = st.dictionaries(st.sampled_from(NAMES), st.booleans(), max_size=9)


def _ref_committed(voters: set[NodeId], acked: dict[NodeId, int]) -> int:
    """Largest i such that a strict majority of voters acked >= i, by brute force."""
    if not voters:
        return UNBOUNDED_INDEX
    best = 0
    for i in range(0, 21):
        if sum(1 for v in voters if acked.get(v, 0) >= i) * 2 > len(voters):
            best = i
    return best


def _ref_vote(voters: set[NodeId], votes: dict[NodeId, bool]) -> VoteResult:
    if not voters:
        return VoteResult.WON
    yes = sum(1 for v in voters if votes.get(v) is True)
    no = sum(1 for v in voters if votes.get(v) is False)
    if yes * 2 > len(voters):
        return VoteResult.WON
    if no * 2 >= len(voters):
        return VoteResult.LOST
    return VoteResult.PENDING


@given(voter_sets, acks)
def test_majority_committed_matches_reference(
    voters: set[NodeId], acked: dict[NodeId, int]
) -> None:
    assert majority_committed_index(voters, acked.get) == _ref_committed(voters, acked)


@given(voter_sets, voter_sets, acks)
def test_joint_committed_is_min_of_halves(
    a: set[NodeId], b: set[NodeId], acked: dict[NodeId, int]
) -> None:
    joint = JointConfig(frozenset(a), frozenset(b))
    assert joint.committed_index(acked.get) == min(
        _ref_committed(a, acked), _ref_committed(b, acked)
    )
    # A joint config with an empty outgoing half is the plain majority.
    assert JointConfig(frozenset(a)).committed_index(acked.get) == _ref_committed(a, acked)


@given(voter_sets, votes)
def test_majority_vote_matches_reference(voters: set[NodeId], v: dict[NodeId, bool]) -> None:
    assert majority_vote_result(voters, v) is _ref_vote(voters, v)


@given(voter_sets, voter_sets, votes)
def test_joint_vote(a: set[NodeId], b: set[NodeId], v: dict[NodeId, bool]) -> None:
    r1, r2 = _ref_vote(a, v), _ref_vote(b, v)
    got = JointConfig(frozenset(a), frozenset(b)).vote_result(v)
    if r1 is VoteResult.WON and r2 is VoteResult.WON:
        assert got is VoteResult.WON
    elif VoteResult.LOST in (r1, r2):
        assert got is VoteResult.LOST
    else:
        assert got is VoteResult.PENDING


def test_examples() -> None:
    v = {NodeId("a"), NodeId("b"), NodeId("c")}
    assert majority_committed_index(v, {"a": 5, "b": 3, "c": 1}.get) == 3
    assert majority_committed_index(v, {"a": 5}.get) == 0
    assert majority_vote_result(v, {NodeId("a"): True}) is VoteResult.PENDING
    assert majority_vote_result(v, {NodeId("a"): False, NodeId("b"): False}) is VoteResult.LOST
