"""Latency summaries for Raft metrics (pure: the caller measures, this only counts).

A :class:`LatencyWindow` keeps the total count and sum of every observation and
the last ``size`` observations for quantiles, as a Prometheus *summary* over a
sliding window does (client_golang's ``Summary`` with ``MaxAge``, by count here
instead of time so that it needs no clock). Observing is O(1); quantiles sort
the window, which is only done when metrics are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_WINDOW = 1024
"""Observations kept for quantiles."""

QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)
"""The quantiles a :class:`LatencySummary` reports."""


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """A read-out of a :class:`LatencyWindow` (seconds)."""

    count: int
    """Observations ever made."""
    sum_s: float
    """Their total, in seconds."""
    quantiles: tuple[tuple[float, float], ...]
    """``(q, seconds)`` for each of :data:`QUANTILES` over the recent window;
    empty before the first observation."""
    max_s: float
    """Largest observation in the recent window (0 before the first)."""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (``raft status --json``): quantiles keyed ``p50``...``p99``."""
        out: dict[str, object] = {"count": self.count, "sum_s": round(self.sum_s, 6),
                                  "max_s": round(self.max_s, 6)}
        for q, v in self.quantiles:
            out[f"p{round(q * 100):d}_s"] = round(v, 6)
        return out


class LatencyWindow:
    """Count, sum and recent quantiles of a latency.

    Args:
        size: observations kept for quantiles (at least 1).
    """

    __slots__ = ("_ring", "_size", "_next", "_count", "_sum")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError("a latency window keeps at least one observation")
        self._ring: list[float] = []
        self._size = size
        self._next = 0
        self._count = 0
        self._sum = 0.0

    @property
    def count(self) -> int:
        """Observations ever made."""
        return self._count

    def observe(self, seconds: float) -> None:
        """Record one latency (negative values count as 0)."""
        value = seconds if seconds > 0 else 0.0
        self._count += 1
        self._sum += value
        if len(self._ring) < self._size:
            self._ring.append(value)
        else:
            self._ring[self._next] = value
            self._next = (self._next + 1) % self._size

    def summary(self, quantiles: Sequence[float] = QUANTILES) -> LatencySummary:
        """Count, sum and nearest-rank quantiles of the recent window."""
        ordered = sorted(self._ring)
        n = len(ordered)
        qs = tuple(
            (q, ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]) for q in quantiles if n
        )
        return LatencySummary(self._count, self._sum, qs, ordered[-1] if n else 0.0)


__all__: Sequence[str] = ("DEFAULT_WINDOW", "QUANTILES", "LatencySummary", "LatencyWindow")
