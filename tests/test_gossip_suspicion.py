"""Lifeguard's suspicion timeout math (table tests, as memberlist's suspicion_test)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.gossip.awareness import Awareness
from mesh.gossip.suspicion import (
    Suspicion,
    confirmations_needed,
    remaining_suspicion_s,
    suspicion_bounds,
)
from mesh.types import NodeId


@pytest.mark.parametrize(("n", "expected_min"), [(1, 1.2), (5, 1.2), (10, 1.2),
                                                 (100, 2.4), (1000, 3.6)])
def test_bounds_scale_with_log10_n(n: int, expected_min: float) -> None:
    lo, hi = suspicion_bounds(3, 6, n, 0.4)
    assert lo == pytest.approx(expected_min)
    assert hi == pytest.approx(6 * expected_min)


@pytest.mark.parametrize(("mult", "n", "k"), [(3, 10, 1), (4, 10, 2), (4, 3, 0), (5, 4, 0),
                                              (2, 100, 0)])
def test_confirmations_needed(mult: int, n: int, k: int) -> None:
    assert confirmations_needed(mult, n) == k


@pytest.mark.parametrize(("c", "k", "elapsed", "expected"), [
    (0, 3, 0.0, 30.0),
    (1, 3, 2.0, 30.0 - 28.0 * math.log(2) / math.log(4) - 2.0),
    (2, 3, 3.0, 30.0 - 28.0 * math.log(3) / math.log(4) - 3.0),
    (3, 3, 4.0, 2.0 - 4.0),
    (4, 3, 5.0, 2.0 - 5.0),   # more confirmations than needed: still the minimum
    (0, 0, 1.0, 2.0 - 1.0),   # k == 0: the minimum straight away
])
def test_remaining_time_table(c: int, k: int, elapsed: float, expected: float) -> None:
    assert remaining_suspicion_s(c, k, elapsed, 2.0, 30.0) == pytest.approx(expected)


@given(st.integers(0, 10), st.integers(0, 10), st.floats(0.1, 10), st.floats(1, 10))
def test_timeout_never_grows_as_confirmations_arrive(k: int, c: int, lo: float, mult: float
                                                     ) -> None:
    hi = lo * mult
    a = remaining_suspicion_s(c, k, 0.0, lo, hi)
    b = remaining_suspicion_s(c + 1, k, 0.0, lo, hi)
    assert b <= a + 1e-9
    assert lo - 1e-9 <= b <= hi + 1e-9


def test_suspicion_counts_each_independent_confirmer_once() -> None:
    s = Suspicion(start=10.0, k=2, min_s=1.0, max_s=6.0, first_from=NodeId("a"))
    assert s.deadline() == pytest.approx(16.0)
    assert not s.confirm(NodeId("a"))        # the first accuser is not a confirmation
    assert s.confirm(NodeId("b"))
    assert not s.confirm(NodeId("b"))        # nor is the same one twice
    mid = s.deadline()
    assert 11.0 < mid < 16.0
    assert s.confirm(NodeId("c"))
    assert s.deadline() == pytest.approx(11.0)
    assert not s.confirm(NodeId("d"))        # beyond k: no longer useful


def test_awareness_is_clamped_and_scales() -> None:
    a = Awareness(max_multiplier=3)
    assert a.scale(0.5) == 0.5
    assert a.apply_delta(5)
    assert a.score == 2
    assert a.scale(0.5) == 1.5
    assert not a.apply_delta(1)
    assert a.apply_delta(-10)
    assert a.score == 0
