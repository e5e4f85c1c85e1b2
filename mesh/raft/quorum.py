"""Pure quorum arithmetic: committed index and election outcome (etcd ``quorum/``).

A *majority* configuration is a set of voters; a *joint* configuration is two of
them (Raft §6 joint consensus), and a decision needs a majority of each. The
core uses single-server changes (a joint configuration with an empty outgoing
half), but the math is general so joint consensus can be added without touching
it. Every function is a pure function of its arguments and sorts before it
iterates, so results never depend on set or dict order.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

from mesh.types import NodeId

UNBOUNDED_INDEX: Final = 2**64 - 1
"""Committed index of an empty configuration: it never restricts a joint minimum."""


class VoteResult(enum.Enum):
    """Outcome of an election as far as the votes received tell."""

    PENDING = "pending"
    """Neither won nor lost yet: some voters have not answered."""
    LOST = "lost"
    """A majority can no longer be reached."""
    WON = "won"
    """A majority granted the vote."""


def quorum_size(n_voters: int) -> int:
    """Smallest majority of ``n_voters`` (``n // 2 + 1``)."""
    return n_voters // 2 + 1


def majority_committed_index(
    voters: Collection[NodeId], acked: Callable[[NodeId], int | None]
) -> int:
    """Largest index acknowledged by a majority of ``voters``.

    Args:
        voters: the configuration.
        acked: highest index each voter has durably matched, ``None`` if unknown
            (counted as 0).

    Returns:
        The committed index; :data:`UNBOUNDED_INDEX` for an empty configuration.
    """
    if not voters:
        return UNBOUNDED_INDEX
    indexes = sorted((acked(v) or 0 for v in voters), reverse=True)
    # The quorum-th largest index is held by at least a quorum of voters.
    return indexes[quorum_size(len(indexes)) - 1]


def majority_vote_result(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    """Election outcome in one majority configuration.

    Args:
        voters: the configuration.
        votes: answers received (True granted, False rejected); ids outside
            ``voters`` are ignored.

    Returns:
        WON for an empty configuration (so it never blocks a joint decision).
    """
    if not voters:
        return VoteResult.WON
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    missing = len(voters) - granted - rejected
    need = quorum_size(len(voters))
    if granted >= need:
        return VoteResult.WON
    if granted + missing >= need:
        return VoteResult.PENDING
    return VoteResult.LOST


def majority_active(voters: Collection[NodeId], active: Callable[[NodeId], bool]) -> bool:
    """Whether a majority of ``voters`` is recently active (CheckQuorum)."""
    if not voters:
        return True
    return sum(1 for v in voters if active(v)) >= quorum_size(len(voters))


@dataclass(frozen=True, slots=True)
class JointConfig:
    """Two majority configurations; decisions need both (§6). Single-server
    changes use ``outgoing=()``."""

    incoming: frozenset[NodeId]
    """The current (or new, during a joint change) voters."""
    outgoing: frozenset[NodeId] = frozenset()
    """The old voters during a joint change; empty otherwise."""

    def voters(self) -> list[NodeId]:
        """Every voter of either half, sorted."""
        return sorted(self.incoming | self.outgoing)

    def committed_index(self, acked: Callable[[NodeId], int | None]) -> int:
        """Largest index committed in both halves."""
        return min(
            majority_committed_index(self.incoming, acked),
            majority_committed_index(self.outgoing, acked),
        )

    def vote_result(self, votes: Mapping[NodeId, bool]) -> VoteResult:
        """Election outcome: won in both halves, lost in either, else pending."""
        r1 = majority_vote_result(self.incoming, votes)
        r2 = majority_vote_result(self.outgoing, votes)
        if r1 is r2:
            return r1
        if VoteResult.LOST in (r1, r2):
            return VoteResult.LOST
        return VoteResult.PENDING

    def active(self, active: Callable[[NodeId], bool]) -> bool:
        """Whether both halves have a recently active majority."""
        return majority_active(self.incoming, active) and majority_active(self.outgoing, active)
