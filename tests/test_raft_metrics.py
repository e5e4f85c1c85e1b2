"""Latency windows behind the Raft metrics (mesh/raft/metrics.py)."""

from __future__ import annotations

import pytest

from mesh.raft.metrics import LatencyWindow


def test_empty_window_reports_no_quantiles() -> None:
    s = LatencyWindow().summary()
    assert (s.count, s.sum_s, s.quantiles, s.max_s) == (0, 0.0, (), 0.0)
    assert s.as_dict() == {"count": 0, "sum_s": 0.0, "max_s": 0.0}


def test_quantiles_are_nearest_rank_over_the_recent_window() -> None:
    w = LatencyWindow(size=100)
    for ms in range(1, 201):  # 1..200 ms; the window keeps 101..200
        w.observe(ms / 1000)
    s = w.summary()
    assert s.count == w.count == 200
    assert s.sum_s == pytest.approx(sum(range(1, 201)) / 1000)
    assert dict(s.quantiles) == {0.5: 0.150, 0.9: 0.190, 0.99: 0.199}
    assert s.max_s == 0.2
    assert s.as_dict()["p99_s"] == 0.199


def test_negative_latencies_count_as_zero_and_size_is_checked() -> None:
    w = LatencyWindow(size=2)
    w.observe(-1.0)
    assert w.summary().quantiles[0] == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        LatencyWindow(size=0)
