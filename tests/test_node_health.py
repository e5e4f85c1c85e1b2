"""The pure health tracker and restart backoff (mesh/node/health.py)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError
from mesh.node.health import JITTER_FRACTION, Health, HealthTracker, RestartBackoff
from mesh.node.spec import HealthSpec, RestartSpec

S, H, U = Health.STARTING, Health.HEALTHY, Health.UNHEALTHY

# Each step is (probe started at, result at, ok); each expectation is what record()
# returns (the new health, or None when it did not change), then the final health
# and counted failures. The workload starts at 0.
TRANSITIONS = [
    ("first success is healthy at once", {}, [(0, 0.1, True)], [H], H, 0),
    ("failures below retries keep starting", {}, [(0, 0, False), (2, 2, False)],
     [None, None], S, 2),
    ("retries failures make it unhealthy", {},
     [(0, 0, False), (2, 2, False), (4, 4, False)], [None, None, U], U, 3),
    ("retries=1: one failure is enough", {"retries": 1}, [(0, 0, False)], [U], U, 1),
    ("healthy survives retries-1 failures", {},
     [(0, 0, True), (2, 2, False), (4, 4, False)], [H, None, None], H, 2),
    ("healthy then retries failures", {},
     [(0, 0, True), (2, 2, False), (4, 4, False), (6, 6, False)], [H, None, None, U], U, 3),
    ("one success recovers and resets the count", {"retries": 2},
     [(0, 0, False), (2, 2, False), (4, 4, True), (6, 6, False)], [None, U, H, None], H, 1),
    ("failures in the start period do not count", {"start_period_s": 5.0},
     [(0, 0, False), (2, 2, False), (4, 4, False), (6, 6, False), (8, 8, False)],
     [None, None, None, None, None], S, 2),
    ("counting starts after the start period", {"start_period_s": 5.0},
     [(0, 0, False), (4, 4, False), (6, 6, False), (8, 8, False), (10, 10, False)],
     [None, None, None, None, U], U, 3),
    ("a success ends the start period at once", {"start_period_s": 100.0},
     [(0, 0, True), (2, 2, False), (4, 4, False), (6, 6, False)], [H, None, None, U], U, 3),
    ("the probe's start decides the start period", {"start_period_s": 5.0, "retries": 1},
     [(4.9, 5.5, False), (7, 7, False)], [None, U], U, 1),
]


@pytest.mark.parametrize(
    ("overrides", "steps", "changes", "final", "failures"),
    [row[1:] for row in TRANSITIONS],
    ids=[row[0] for row in TRANSITIONS],
)
def test_transitions(
    overrides: dict[str, Any],
    steps: list[tuple[float, float, bool]],
    changes: list[Health | None],
    final: Health,
    failures: int,
) -> None:
    tracker = HealthTracker(HealthSpec(kind="http", **overrides), started_at=0.0)
    assert tracker.health is S
    got = []
    for started, done, ok in steps:
        tracker.probe_started(started)
        got.append(tracker.record(ok, done, detail=f"probe at {started}"))
    assert got == changes
    assert tracker.health is final
    assert tracker.failures == failures
    assert tracker.checks == len(steps)
    assert tracker.last_detail == f"probe at {steps[-1][0]}"


def _fail(tracker: HealthTracker, times: int, start: float) -> None:
    for i in range(times):
        tracker.probe_started(start + 2 * i)
        tracker.record(False, start + 2 * i, "GET / -> 503")


def test_liveness_failure_wants_restart() -> None:
    tracker = HealthTracker(HealthSpec(kind="http"), started_at=0.0)
    tracker.probe_started(0.0)
    tracker.record(True, 0.0)
    assert tracker.ready
    assert not tracker.wants_restart
    _fail(tracker, 3, start=2.0)
    assert tracker.health is U
    assert not tracker.ready
    assert tracker.wants_restart
    assert tracker.last_detail == "GET / -> 503"


def test_readiness_only_never_wants_restart() -> None:
    tracker = HealthTracker(HealthSpec(kind="tcp", readiness_only=True), started_at=0.0)
    _fail(tracker, 10, start=0.0)
    assert tracker.health is U
    assert not tracker.ready
    assert not tracker.wants_restart
    tracker.probe_started(30.0)
    assert tracker.record(True, 30.0) is H
    assert tracker.ready


def test_next_probe_at_spacing() -> None:
    tracker = HealthTracker(HealthSpec(kind="http", interval_s=2.0), started_at=100.0)
    assert tracker.next_probe_at() == 100.0  # first probe at once
    tracker.probe_started(100.0)
    assert tracker.next_probe_at() == math.inf  # in flight: no overlap
    tracker.record(True, 100.25)
    assert tracker.next_probe_at() == 102.0  # interval from the probe's start
    tracker.probe_started(103.0)  # the agent was late
    tracker.record(True, 103.5)
    assert tracker.next_probe_at() == 105.0
    tracker.probe_started(105.0)
    tracker.record(False, 108.0)  # slower than the interval
    assert tracker.next_probe_at() == 108.0  # due as soon as the result is in


def test_probes_never_overlap() -> None:
    tracker = HealthTracker(HealthSpec(kind="http"), started_at=0.0)
    with pytest.raises(LocalProtocolError, match="call probe_started"):
        tracker.record(True, 0.0)
    tracker.probe_started(0.0)
    with pytest.raises(LocalProtocolError, match="no result yet"):
        tracker.probe_started(0.5)
    with pytest.raises(LocalProtocolError, match="before its probe started"):
        tracker.record(True, -1.0)
    assert tracker.checks == 0
    assert tracker.record(True, 0.5) is H


# --- restart backoff ---------------------------------------------------------------

# random.Random(7).random() == 0.3238327648331629: the first run's jitter is 1.0647...
SEEDED_DELAYS = [
    0.5323832764833163,
    1.0647665529666326,
    2.129533105933265,
    4.25906621186653,
    8.51813242373306,
    17.03626484746612,
    31.942996588998977,  # capped at max_delay_s=30, times the jitter
    31.942996588998977,
]


def test_backoff_sequence_with_seeded_rng() -> None:
    backoff = RestartBackoff(RestartSpec(), random.Random(7))
    delays = [backoff.record_exit(0.0, ran_s=1.0, exit_code=1) for _ in SEEDED_DELAYS]
    assert delays == SEEDED_DELAYS
    assert backoff.attempts == len(SEEDED_DELAYS)
    assert backoff.reason == "exited with status 1; restarting in 31.94s (restart 8 in a row)"
    assert not backoff.gave_up


def test_restart_time_is_relative_to_the_exit() -> None:
    backoff = RestartBackoff(RestartSpec(delay_s=1.0), random.Random(7))
    assert backoff.record_exit(50.0, ran_s=1.0, exit_code=1) == 50.0 + 1.0647665529666326


def test_window_resets_the_backoff() -> None:
    rng = random.Random(7)
    backoff = RestartBackoff(RestartSpec(window_s=30.0), rng)
    for _ in range(4):
        backoff.record_exit(0.0, ran_s=29.9, exit_code=1)
    assert backoff.attempts == 4
    expected_rng = random.Random(7)
    expected_rng.random()  # the first run's jitter
    second_jitter = 1.0 + expected_rng.random() * JITTER_FRACTION
    assert backoff.record_exit(0.0, ran_s=30.0, exit_code=1) == 0.5 * second_jitter
    assert backoff.attempts == 1
    assert backoff.record_exit(0.0, ran_s=3.0, exit_code=1) == 1.0 * second_jitter


POLICIES = [
    # policy, exit code, liveness failure, restarts
    ("always", 0, False, True),
    ("always", 1, False, True),
    ("always", None, False, True),
    ("always", 0, True, True),
    ("on-failure", 0, False, False),
    ("on-failure", 1, False, True),
    ("on-failure", 137, False, True),
    ("on-failure", None, False, True),
    ("on-failure", 0, True, True),
    ("never", 0, False, False),
    ("never", 1, False, False),
    ("never", None, False, False),
    ("never", 0, True, False),
]


@pytest.mark.parametrize(("policy", "exit_code", "unhealthy", "restarts"), POLICIES)
def test_policy(policy: str, exit_code: int | None, unhealthy: bool, restarts: bool) -> None:
    backoff = RestartBackoff(RestartSpec(policy=policy), random.Random(1))
    assert backoff.should_restart(exit_code, unhealthy=unhealthy) is restarts
    at = backoff.record_exit(10.0, ran_s=1.0, exit_code=exit_code, unhealthy=unhealthy)
    assert (at is not None) is restarts
    assert not backoff.gave_up
    assert backoff.attempts == int(restarts)


def test_policy_refusal_says_why() -> None:
    backoff = RestartBackoff(RestartSpec(policy="on-failure"), random.Random(1))
    assert backoff.record_exit(1.0, ran_s=1.0, exit_code=0) is None
    assert backoff.reason == "exited with status 0; not restarting (restart.policy=on-failure)"
    assert not backoff.gave_up
    never = RestartBackoff(RestartSpec(policy="never"), random.Random(1))
    assert never.record_exit(1.0, ran_s=1.0, exit_code=None, unhealthy=True) is None
    assert never.reason == "failed its liveness check; not restarting (restart.policy=never)"


def test_max_attempts_gives_up_with_a_reason() -> None:
    backoff = RestartBackoff(RestartSpec(max_attempts=5), random.Random(3))
    for i in range(5):
        assert backoff.record_exit(float(i), ran_s=2.0, exit_code=1) is not None
    assert not backoff.gave_up
    assert backoff.record_exit(5.0, ran_s=2.0, exit_code=1) is None
    assert backoff.gave_up
    assert backoff.reason == (
        "exited with status 1 (6 exits in a row, each after less than "
        "restart.window_s=30s); not restarting (restart.max_attempts=5); fix the "
        "workload, then apply its service again"
    )
    with pytest.raises(LocalProtocolError, match="after giving up"):
        backoff.record_exit(6.0, ran_s=2.0, exit_code=1)


def test_max_attempts_counts_only_restarts_in_a_row() -> None:
    backoff = RestartBackoff(RestartSpec(max_attempts=2), random.Random(3))
    assert backoff.record_exit(0.0, ran_s=2.0, exit_code=1) is not None
    assert backoff.record_exit(0.0, ran_s=2.0, exit_code=1) is not None
    assert backoff.attempts == 2  # all of max_attempts used up
    for _ in range(10):
        assert backoff.record_exit(0.0, ran_s=60.0, exit_code=1) is not None  # ran: reset
        assert backoff.attempts == 1
        assert backoff.record_exit(0.0, ran_s=2.0, exit_code=1) is not None
        assert backoff.attempts == 2
    assert not backoff.gave_up
    assert backoff.record_exit(0.0, ran_s=2.0, exit_code=1) is None
    assert backoff.gave_up


@given(
    seed=st.integers(0, 2**32),
    delay_s=st.floats(0.01, 10.0),
    max_delay_s=st.floats(0.01, 600.0),
    window_s=st.floats(1.0, 120.0),
    runs=st.lists(st.floats(0.0, 200.0), min_size=1, max_size=60),
)
def test_backoff_bounded_and_monotonic(
    seed: int, delay_s: float, max_delay_s: float, window_s: float, runs: list[float]
) -> None:
    spec = RestartSpec(delay_s=delay_s, max_delay_s=max(delay_s, max_delay_s), window_s=window_s)
    backoff = RestartBackoff(spec, random.Random(seed))
    previous: float | None = None
    for ran_s in runs:
        at = backoff.record_exit(0.0, ran_s=ran_s, exit_code=1)
        assert at is not None
        assert 0.0 < at <= spec.max_delay_s * (1.0 + JITTER_FRACTION)
        if previous is not None and ran_s < window_s:
            assert at >= previous  # no reset in between: never shorter
        previous = at


def test_a_starting_workload_is_probed_fast_but_fails_no_sooner() -> None:
    tracker = HealthTracker(HealthSpec(kind="http", interval_s=2.0, retries=3), started_at=0.0)
    times = []
    now = 0.0
    while tracker.health is Health.STARTING:
        now = tracker.next_probe_at()
        times.append(now)
        tracker.probe_started(now)
        tracker.record(False, now + 0.01)
    # probes every 0.25 s while starting, but only one failure per 2 s interval counts:
    # unhealthy at the third counted failure, at 4.0 s, as with plain 2 s probing
    assert times[:3] == [0.0, 0.25, 0.5]
    assert now == pytest.approx(4.0)
    assert tracker.failures == 3


def test_a_fast_start_probe_success_makes_it_healthy_at_once() -> None:
    tracker = HealthTracker(HealthSpec(kind="http", interval_s=2.0), started_at=0.0)
    for ok in (False, False, True):
        now = tracker.next_probe_at()
        tracker.probe_started(now)
        tracker.record(ok, now)
    assert tracker.health is Health.HEALTHY
    assert now == pytest.approx(0.5)
    assert tracker.next_probe_at() == pytest.approx(2.5)  # then the normal interval
