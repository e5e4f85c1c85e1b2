"""Choosing the Raft voters from the live members, one membership step at a time.

Theory of operation
===================

meshd picks its own voters (issue 4; Consul/Nomad autopilot, Swarm managers).
Two pure functions, no I/O, no clock, no ``hash()``, no set iteration order:

* :func:`target_voters` says which members *should* vote;
* :func:`next_step` says which single-server change (Raft dissertation §4.1:
  add a learner, promote it, remove a voter) the leader proposes next to move
  the current configuration toward that target.

The leader calls :func:`next_step` periodically and proposes the change it
returns; the core refuses a new change until the previous one is applied, so
the group moves one step at a time and every step is a configuration that Raft
already knows how to run.

How many voters
---------------
``desired`` (3 by default, 5 with ``--raft-voters 5``) capped by the number of
*available* nodes: current voters that are still members (alive or suspect)
plus healthy members that may vote, rounded down to an odd number. One or two
available nodes give one voter (two voters are strictly less available than
one: both must be up). Members labelled ``raft=false`` never vote.

Which voters (deterministic, stable, spread)
--------------------------------------------
A greedy pick over the available nodes, in order of
``(voters already picked in the node's zone, rank, name)`` where rank prefers
the leader, then current healthy voters, then current voters that are merely
suspect, then learners already being added, then other healthy members. The
zone term spreads the voters over the ``zone`` label (the first *k* picks
cover *k* zones when that many have nodes); the rank term keeps the current
voters (stability: a configuration that is already a target stays the target,
and a suspect voter is never replaced while it may come back). Nodes without a
zone label count as one zone of their own.

Which step first
----------------
1. Remove learners that are not in the target (e.g. a learner that died).
2. Add the first target member that is neither voter nor learner, as learner.
3. Promote the first target learner that has caught up (the caller decides
   what caught up means: the leader's progress for it).
4. Only when every target member votes: remove the voters outside the target,
   dead ones first, then suspect ones, then the others, the leader last.

Only the target voters are ever added as learners (a learner is a voter being
caught up): meshd's other nodes keep their replica through the watch stream of
:mod:`mesh.raft.watch`, so the leader replicates to the voters only. Step 1
also removes learners left from an earlier configuration (before watchers,
every live member was kept as a learner).

Adding and promoting the replacement *before* removing a dead voter is the
order of DESIGN.md ("adds a healthy member as learner, catches it up, promotes
it and removes the dead voter"); removing dead voters before live ones when
shrinking keeps a majority of the remaining voters alive after every step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh.errors import ConfigError
from mesh.gossip.messages import Status
from mesh.raft.messages import ConfChange, ConfChangeKind
from mesh.types import NodeId

RAFT_LABEL = "raft"
"""Label that opts a node out of voting with the value ``false``."""

ZONE_LABEL = "zone"
"""Label the voters are spread over."""

ALLOWED_VOTER_COUNTS = (1, 3, 5, 7)
"""Values accepted for ``desired`` (odd: an even group is never more available)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A member as the voter selection sees it."""

    node: NodeId
    labels: tuple[tuple[str, str], ...] = ()
    """Its labels, sorted ``(key, value)`` pairs."""
    healthy: bool = True
    """Alive (not suspect) and stable long enough to be made a voter. An
    unhealthy member that already votes keeps its vote; it is not picked anew."""

    @property
    def zone(self) -> str:
        """The ``zone`` label, or ``""``."""
        return dict(self.labels).get(ZONE_LABEL, "")

    @property
    def may_vote(self) -> bool:
        """False for nodes labelled ``raft=false``."""
        return dict(self.labels).get(RAFT_LABEL, "").lower() != "false"


class _MetaLike(Protocol):
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...


class MemberLike(Protocol):
    """The parts of :class:`mesh.gossip.core.MemberView` used here."""

    @property
    def node(self) -> NodeId: ...

    @property
    def status(self) -> Status: ...

    @property
    def meta(self) -> _MetaLike: ...

    @property
    def since(self) -> float: ...


def candidates(members: Iterable[MemberLike], now: float, stable_s: float = 0.0) -> list[Candidate]:
    """Turn gossip members into candidates, sorted by node.

    Dead and departed members are left out (their votes are to be replaced);
    suspect members are kept but unhealthy; alive members are healthy once
    they have been alive for ``stable_s`` (autopilot's stabilization time, so
    a flapping node is not made a voter).

    Args:
        members: e.g. ``Membership.members()``.
        now: the same clock as ``MemberView.since``.
        stable_s: seconds a member must have been alive to be healthy.
    """
    out = []
    for m in members:
        if m.status is Status.ALIVE:
            healthy = now - m.since >= stable_s
        elif m.status is Status.SUSPECT:
            healthy = False
        else:
            continue
        out.append(Candidate(m.node, tuple(sorted(m.meta.labels)), healthy))
    return sorted(out, key=lambda c: c.node)


def check_desired(desired: int) -> None:
    """Validate a desired voter count.

    Raises:
        ConfigError: not one of :data:`ALLOWED_VOTER_COUNTS`.
    """
    if isinstance(desired, bool) or desired not in ALLOWED_VOTER_COUNTS:
        raise ConfigError(
            f"raft voters must be one of {', '.join(map(str, ALLOWED_VOTER_COUNTS))}, "
            f"got {desired!r}"
        )


def voter_count(desired: int, available: int) -> int:
    """How many voters to run with ``available`` nodes: the largest odd number
    not above ``desired`` or ``available`` (0 when nothing is available)."""
    n = min(desired, available)
    if n <= 0:
        return 0
    return n if n % 2 == 1 else n - 1


def _pool(members: Sequence[Candidate], voters: Collection[NodeId]) -> dict[NodeId, Candidate]:
    pool: dict[NodeId, Candidate] = {}
    for c in members:
        if not c.may_vote:
            continue
        if c.node in voters or c.healthy:
            pool[c.node] = c
    return pool


def target_voters(
    members: Sequence[Candidate],
    voters: Collection[NodeId],
    *,
    desired: int = 3,
    leader: NodeId | None = None,
    learners: Collection[NodeId] = (),
) -> tuple[NodeId, ...]:
    """The voters the group should have (sorted); see the module docstring.

    Args:
        members: the live members (from :func:`candidates`).
        voters: the current voters.
        desired: wanted voter count (:data:`ALLOWED_VOTER_COUNTS`).
        leader: the current leader, kept first among equals.
        learners: learners being added, preferred over other new nodes.

    Returns:
        The current voters unchanged when no member is available at all.

    Raises:
        ConfigError: ``desired`` is not allowed.
    """
    check_desired(desired)
    by_node: dict[NodeId, Candidate] = {}
    for c in members:
        by_node.setdefault(c.node, c)  # a duplicate entry must not change the answer
    pool = _pool([by_node[n] for n in sorted(by_node)], voters)
    size = voter_count(desired, len(pool))
    if size == 0:
        return tuple(sorted(voters))
    learner_set = set(learners)
    voter_set = set(voters)

    def rank(c: Candidate) -> int:
        if c.node == leader and c.node in voter_set:
            return 0
        if c.node in voter_set:
            return 1 if c.healthy else 2
        return 3 if c.node in learner_set else 4

    chosen: list[NodeId] = []
    per_zone: dict[str, int] = {}
    remaining = sorted(pool.values(), key=lambda c: c.node)
    while len(chosen) < size:
        best = min(remaining, key=lambda c: (per_zone.get(c.zone, 0), rank(c), c.node))
        remaining.remove(best)
        chosen.append(best.node)
        per_zone[best.zone] = per_zone.get(best.zone, 0) + 1
    return tuple(sorted(chosen))


def next_step(
    members: Sequence[Candidate],
    voters: Collection[NodeId],
    learners: Collection[NodeId],
    *,
    desired: int = 3,
    leader: NodeId | None = None,
    caught_up: Collection[NodeId] = (),
) -> ConfChange | None:
    """The one membership change the leader should propose next, or ``None``.

    Args:
        members: the live members (from :func:`candidates`).
        voters: the current voters (``RaftStatus.voters``).
        learners: the current learners.
        desired: wanted voter count.
        leader: the leader (this node, when called on the leader).
        caught_up: learners whose log is close enough to the leader's to be
            promoted.

    Raises:
        ConfigError: ``desired`` is not allowed.
    """
    voter_list = sorted(set(voters))
    learner_list = sorted(set(learners) - set(voters))
    target = target_voters(
        members, voter_list, desired=desired, leader=leader, learners=learner_list
    )
    tset = set(target)
    for n in learner_list:
        if n not in tset:
            return ConfChange(ConfChangeKind.REMOVE, n)
    for n in target:
        if n not in voter_list and n not in learner_list:
            return ConfChange(ConfChangeKind.ADD_LEARNER, n)
    ready = set(caught_up)
    for n in target:
        if n in learner_list and n in ready:
            return ConfChange(ConfChangeKind.PROMOTE, n)
    if not tset.issubset(voter_list):
        return None  # wait for the replacements to catch up before removing anyone
    extra = [n for n in voter_list if n not in tset]
    if not extra:
        return None
    health = {c.node: c for c in members}

    def removal_order(n: NodeId) -> tuple[int, int, NodeId]:
        c = health.get(n)
        state = 0 if c is None else (1 if not c.healthy else 2)
        return (state, 1 if n == leader else 0, n)

    return ConfChange(ConfChangeKind.REMOVE, min(extra, key=removal_order))


__all__: Sequence[str] = (
    "ALLOWED_VOTER_COUNTS",
    "Candidate",
    "MemberLike",
    "RAFT_LABEL",
    "ZONE_LABEL",
    "candidates",
    "check_desired",
    "next_step",
    "target_voters",
    "voter_count",
)
