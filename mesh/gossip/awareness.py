"""Lifeguard's local health multiplier (Lifeguard §IV-A, memberlist awareness.go).

A node that misses acks and nacks it should have received is probably the slow one;
it stretches its own probe interval and timeouts instead of accusing healthy peers.
"""

from __future__ import annotations


class Awareness:
    """A score in ``[0, max_multiplier - 1]``; timeouts scale by ``score + 1``."""

    def __init__(self, max_multiplier: int) -> None:
        assert max_multiplier >= 1
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """The current health score; 0 is healthy."""
        return self._score

    def apply_delta(self, delta: int) -> bool:
        """Add ``delta`` (clamped); True if the score changed."""
        new = min(max(self._score + delta, 0), self._max - 1)
        changed = new != self._score
        self._score = new
        return changed

    def scale(self, timeout_s: float) -> float:
        """``timeout_s`` stretched by the current score."""
        return timeout_s * (self._score + 1)
