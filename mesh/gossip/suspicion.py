"""Lifeguard's dynamic suspicion timeout, as pure functions (Lifeguard §IV-B).

A suspicion starts at ``max_s`` and shrinks towards ``min_s`` logarithmically as
independent members confirm it, so that a really dead node is declared dead fast
(many members notice) while a node that only one member fails to reach (a lossy link,
a slow prober) has time to refute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh.types import NodeId


def suspicion_bounds(
    suspicion_mult: int, max_timeout_mult: int, n_members: int, probe_interval_s: float
) -> tuple[float, float]:
    """Return ``(min_s, max_s)`` for a cluster of ``n_members``.

    ``min_s = suspicion_mult * max(1, log10(N)) * probe_interval_s`` and
    ``max_s = max_timeout_mult * min_s``.
    """
    node_scale = max(1.0, math.log10(max(1, n_members)))
    min_s = suspicion_mult * node_scale * probe_interval_s
    return min_s, max_timeout_mult * min_s


def confirmations_needed(suspicion_mult: int, n_members: int) -> int:
    """Independent confirmations that shrink the timeout fully: ``suspicion_mult - 2``,
    or 0 when the cluster is too small to have that many other members."""
    k = max(0, suspicion_mult - 2)
    return 0 if n_members - 2 < k else k


def remaining_suspicion_s(
    confirmations: int, k: int, elapsed_s: float, min_s: float, max_s: float
) -> float:
    """Seconds left before a suspicion expires.

    The total timeout is ``max_s - (max_s - min_s) * log(c + 1) / log(k + 1)``,
    floored at ``min_s`` (``k == 0`` means the minimum straight away); the elapsed
    time is subtracted. The result may be negative: the suspicion has expired.
    """
    if k <= 0:
        total = min_s
    else:
        frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
        total = max(min_s, max_s - (max_s - min_s) * frac)
    return total - elapsed_s


@dataclass(slots=True)
class Suspicion:
    """One running suspicion of one member.

    Attributes:
        start: time (s) the suspicion began here.
        k: confirmations that shrink the timeout to ``min_s``.
        min_s: the shortest timeout.
        max_s: the timeout with no confirmations.
    """

    start: float
    k: int
    min_s: float
    max_s: float
    first_from: NodeId
    _confirmers: set[NodeId] = field(default_factory=set)

    @property
    def confirmations(self) -> int:
        """Independent confirmations counted so far (the first accuser excluded)."""
        return len(self._confirmers)

    def confirm(self, from_node: NodeId) -> bool:
        """Count a confirmation from ``from_node``; True if it was new and useful."""
        if self.confirmations >= self.k or from_node == self.first_from:
            return False
        if from_node in self._confirmers:
            return False
        self._confirmers.add(from_node)
        return True

    def deadline(self) -> float:
        """Absolute time at which this suspicion turns into a death."""
        return self.start + remaining_suspicion_s(
            self.confirmations, self.k, 0.0, self.min_s, self.max_s
        )
