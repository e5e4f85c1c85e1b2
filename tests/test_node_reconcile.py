"""The node's reconciler core: desired allocations plus what runs give actions.

Table-style tests of the rules in :mod:`mesh.node.reconcile` (the module docstring's
rules 1-6 are the spec), driven with plain values and a virtual ``now``; a Hypothesis
test runs random schedules against a small model of a driver.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.node.driver import Workload
from mesh.node.reconcile import Action, Probe, Reconciler, Remove, Start, Stop
from mesh.node.spec import HealthSpec, PortSpec, RestartSpec, WorkloadSpec
from mesh.raft.state import AllocRecord, Report
from mesh.types import AllocId, NodeId, ServiceId

N1 = NodeId("n1")
WEB = ServiceId("web")
T0 = 100.0
"""Monotonic time of the first step (a non-zero origin, as trio's clock has)."""
WALL0 = 1_700_000_000.0
SEED = 7
JITTER = 1.0 + random.Random(SEED).random() * 0.2
"""The jitter factor of the first backoff run of a reconciler seeded with SEED
(RestartBackoff draws one ``random()`` per run; JITTER_FRACTION is 0.2)."""

TCP_CHECK = HealthSpec("tcp", interval_s=2.0, timeout_s=1.0, retries=2)


def spec(**kw: object) -> WorkloadSpec:
    """A process service ``web`` with one auto port; ``kw`` overrides fields."""
    fields: dict[str, object] = {"name": WEB, "command": ("srv",),
                                 "ports": (PortSpec("http"),)}
    fields.update(kw)
    return WorkloadSpec(**fields)  # type: ignore[arg-type]


def alloc(slot: int = 0, n: int = 1, *, desired: str = "run",
          service: ServiceId = WEB) -> AllocRecord:
    """An allocation of ``service`` slot ``slot`` on n1, named as MeshState names it."""
    return AllocRecord(AllocId(f"{service}-{slot}-{n}"), service, slot, N1, 1, desired)


def running(a: AllocRecord | AllocId, ref: str = "r1", ports: dict[str, int] | None = None,
            service: ServiceId = WEB) -> Workload:
    aid = a.id if isinstance(a, AllocRecord) else a
    return Workload(aid, service, 1, "running", None, ports or {}, WALL0, None, ref)


def exited(a: AllocRecord | AllocId, code: int | None, ref: str = "r1",
           message: str = "") -> Workload:
    aid = a.id if isinstance(a, AllocRecord) else a
    return Workload(aid, WEB, 1, "exited", code, {}, WALL0, WALL0 + 1, ref, message)


class Bench:
    """One reconciler and a virtual clock (``now``; wall = WALL0 + now)."""

    def __init__(self, seed: int = SEED) -> None:
        self.rec = Reconciler(N1, random.Random(seed))
        self.now = T0
        self.probes: dict[AllocId, Probe] = {}

    def step(self, wants: Iterable[tuple[AllocRecord, WorkloadSpec]] = (),
             stops: Iterable[AllocRecord] = (), actual: Iterable[Workload] = (), *,
             disconnected_s: float = 0.0) -> list[Action]:
        actions = self.rec.step({a.id: (a, s) for a, s in wants}, list(stops),
                                {w.alloc: w for w in actual}, self.now, WALL0 + self.now,
                                disconnected_s=disconnected_s)
        self.probes.update({p.alloc: p for p in actions if isinstance(p, Probe)})
        return actions

    def probed(self, aid: AllocId, ok: bool, detail: str = "") -> None:
        """Feed in the result of the last probe of ``aid`` that :meth:`step` asked for."""
        self.rec.probed(aid, self.probes[aid].run, ok, detail, self.now, WALL0 + self.now)

    def reports(self) -> dict[AllocId, Report]:
        return {r.alloc: r for r in self.rec.take_reports()}

    def report(self, aid: AllocId) -> Report:
        """The one new report of ``aid`` (fails if there is none)."""
        got = self.reports()
        assert aid in got, f"no new report of {aid}: {got}"
        return got[aid]

    def run_to_running(self, a: AllocRecord, s: WorkloadSpec, ref: str = "r1",
                       ports: dict[str, int] | None = None) -> list[Action]:
        """Start ``a`` and see it running at ``now``; returns the second step's actions."""
        assert self.step([(a, s)]) == [Start(a, s)]
        w = running(a, ref, ports)
        self.rec.started(a.id, w, self.now, WALL0 + self.now)
        return self.step([(a, s)], actual=[w])


# ---------------------------------------------------------------------- rule 1: start


def test_a_wanted_allocation_is_started_once_and_reported_starting() -> None:
    b, a, s = Bench(), alloc(), spec()
    assert b.step([(a, s)]) == [Start(a, s)]
    r = b.report(a.id)
    assert (r.state, r.health, r.restarts, r.since) == ("starting", "none", 0, WALL0 + T0)
    # the start is in flight: the driver does not show it yet, and no second Start
    for dt in (0.0, 1.0, 60.0):
        b.now = T0 + dt
        assert b.step([(a, s)]) == []
    assert b.reports() == {}


def test_a_started_workload_is_reported_running_with_its_ports() -> None:
    b, a, s = Bench(), alloc(), spec()
    assert b.run_to_running(a, s, ports={"http": 20000}) == []
    r = b.report(a.id)
    assert (r.state, r.health, r.ports, r.message) == ("running", "none",
                                                       (("http", 20000),), "")
    b.now += 5
    assert b.step([(a, s)], actual=[running(a, ports={"http": 20000})]) == []
    assert b.reports() == {}


def test_a_running_workload_reports_what_its_driver_says_of_it() -> None:
    b, a, s = Bench(), alloc(), spec()
    warned = dataclasses.replace(running(a), message="running without its cpu 200m limit")
    assert b.step([(a, s)]) == [Start(a, s)]
    b.rec.started(a.id, warned, b.now, WALL0 + b.now)
    assert b.step([(a, s)], actual=[warned]) == []
    r = b.report(a.id)
    assert (r.state, r.message) == ("running", "running without its cpu 200m limit")


def test_the_driver_showing_it_running_before_started_returns_takes_it_over() -> None:
    b, a, s = Bench(), alloc(), spec()
    assert b.step([(a, s)]) == [Start(a, s)]
    assert b.step([(a, s)], actual=[running(a)]) == []
    b.rec.started(a.id, running(a), b.now, WALL0 + b.now)  # late: changes nothing
    assert b.step([(a, s)], actual=[running(a)]) == []
    assert b.report(a.id).state == "running"


# ---------------------------------------------------------------------- rule 6: adoption


def test_a_running_workload_is_adopted_after_a_restart_of_meshd() -> None:
    b, a, s = Bench(), alloc(), spec()
    assert b.step([(a, s)], actual=[running(a, ports={"http": 20001})]) == []
    r = b.report(a.id)
    assert (r.state, r.ports, r.restarts) == ("running", (("http", 20001),), 0)
    b.now += 1
    assert b.step([(a, s)], actual=[running(a, ports={"http": 20001})]) == []
    assert b.rec.next_deadline() is None


def test_an_adopted_workload_that_already_exited_is_counted_and_restarted() -> None:
    b, a, s = Bench(), alloc(), spec()
    assert b.step([(a, s)], actual=[exited(a, 1)]) == [Remove(a.id)]
    r = b.report(a.id)
    assert (r.state, r.restarts) == ("exited", 1)
    assert b.rec.next_deadline() == pytest.approx(T0 + 0.5 * JITTER)


# ---------------------------------------------------------------------- rule 2: unwanted


def test_an_unwanted_running_workload_is_stopped_once_then_removed_once() -> None:
    b, a = Bench(), alloc(desired="stop")
    assert b.step(stops=[a], actual=[running(a)]) == [
        Stop(a.id, 10.0, "no longer allocated to this node")]
    assert b.reports() == {}  # still running: not yet "stopped"
    # the stop is in flight
    assert b.step(stops=[a], actual=[running(a)]) == []
    b.rec.stopped(a.id, b.now)
    assert b.step(stops=[a], actual=[exited(a, 143)]) == [Remove(a.id)]
    r = b.report(a.id)
    assert (r.state, r.message) == ("stopped", "stopped")
    assert b.step(stops=[a], actual=[exited(a, 143)]) == []  # the remove is in flight
    b.rec.removed(a.id)
    assert b.step(stops=[a]) == []
    assert b.reports() == {}  # reported once


def test_a_stop_that_did_not_take_is_sent_again() -> None:
    b, a = Bench(), alloc(desired="stop")
    assert len(b.step(stops=[a], actual=[running(a)])) == 1
    b.rec.stopped(a.id, b.now)  # the driver failed; the agent reports it done anyway
    assert b.step(stops=[a], actual=[running(a)]) == [
        Stop(a.id, 10.0, "no longer allocated to this node")]


def test_a_remove_that_failed_is_sent_again() -> None:
    b, a = Bench(), alloc(desired="stop")
    assert b.step(stops=[a], actual=[exited(a, 0)]) == [Remove(a.id)]
    b.rec.removed(a.id)
    assert b.step(stops=[a], actual=[exited(a, 0)]) == [Remove(a.id)]


def test_an_exited_unwanted_workload_is_only_removed() -> None:
    b, a = Bench(), alloc(desired="stop")
    assert b.step(stops=[a], actual=[exited(a, 1)]) == [Remove(a.id)]
    assert b.report(a.id).state == "stopped"


def test_a_workload_without_any_allocation_is_stopped_and_removed() -> None:
    b = Bench()
    orphan = AllocId("web-3-9")  # ran before a partition; its allocation was dropped
    assert b.step(actual=[running(orphan)]) == [
        Stop(orphan, 10.0, "no longer allocated to this node")]
    assert b.step(actual=[running(orphan)]) == []
    b.rec.stopped(orphan, b.now)
    assert b.step(actual=[exited(orphan, 143)]) == [Remove(orphan)]
    assert b.reports() == {}  # nothing to report about an allocation nobody has


def test_a_stopped_allocation_that_never_ran_here_is_reported_stopped() -> None:
    b, a = Bench(), alloc(desired="stop")
    assert b.step(stops=[a]) == []
    assert b.report(a.id).state == "stopped"


# ---------------------------------------------------------------------- rule 1: stop-first


def test_a_replacement_waits_until_the_replica_it_replaces_has_stopped() -> None:
    b, s = Bench(), spec()
    old, new = alloc(0, 1, desired="stop"), alloc(0, 2)
    assert b.step([(new, s)], [old], [running(old)]) == [
        Stop(old.id, 10.0, "no longer allocated to this node")]
    r = b.report(new.id)
    assert (r.state, r.message) == ("starting", "waiting for the replica it replaces to stop")
    assert b.step([(new, s)], [old], [running(old)]) == []
    b.rec.stopped(old.id, b.now)
    assert b.step([(new, s)], [old], [exited(old, 143)]) == [Remove(old.id), Start(new, s)]


def test_a_replacement_also_waits_for_a_dropped_replica_of_its_slot() -> None:
    b, s = Bench(), spec()
    new = alloc(0, 5)
    # web-0-1 was dropped meanwhile: only its id says its slot
    assert b.step([(new, s)], actual=[running(AllocId("web-0-1"))]) == [
        Stop(AllocId("web-0-1"), 10.0, "no longer allocated to this node")]


def test_other_slots_and_services_do_not_wait() -> None:
    b, s = Bench(), spec()
    old = alloc(0, 1, desired="stop")
    other_slot = alloc(1, 2)
    api = ServiceId("api")
    other_service = alloc(0, 3, service=api)
    api_spec = spec(name=api)
    actions = b.step([(other_slot, s), (other_service, api_spec)], [old], [running(old)])
    assert Start(other_slot, s) in actions
    assert Start(other_service, api_spec) in actions


# ---------------------------------------------------------------------- rule 3: exits


def test_an_exit_is_removed_backs_off_and_restarts_at_the_backoff_time() -> None:
    b, a, s = Bench(), alloc(), spec()
    b.run_to_running(a, s)
    b.reports()
    b.now = T0 + 2.0
    assert b.step([(a, s)], actual=[exited(a, 1, message="exited with status 1")]) == [
        Remove(a.id)]
    restart_at = T0 + 2.0 + 0.5 * JITTER
    assert b.rec.next_deadline() == pytest.approx(restart_at)
    r = b.report(a.id)
    assert (r.state, r.restarts, r.since) == ("exited", 1, WALL0 + T0 + 2.0)
    assert r.message == f"exited with status 1; restarting in {0.5 * JITTER:.1f}s"
    b.rec.removed(a.id)
    b.now = restart_at - 0.01
    assert b.step([(a, s)]) == []
    b.now = restart_at
    assert b.step([(a, s)]) == [Start(a, s)]
    assert b.report(a.id).state == "starting"


def test_quick_exits_in_a_row_double_the_delay() -> None:
    b, a, s = Bench(), alloc(), spec()
    delays = []
    for i in range(4):
        b.run_to_running(a, s, ref=f"r{i}")
        b.now += 1.0  # ran 1 s: less than restart.window_s
        assert b.step([(a, s)], actual=[exited(a, 1, ref=f"r{i}")]) == [Remove(a.id)]
        b.rec.removed(a.id)
        deadline = b.rec.next_deadline()
        assert deadline is not None
        delays.append(deadline - b.now)
        b.now = deadline
    assert delays == pytest.approx([0.5 * JITTER, 1.0 * JITTER, 2.0 * JITTER, 4.0 * JITTER])
    assert b.report(a.id).restarts == 4


def test_a_run_longer_than_the_window_resets_the_backoff() -> None:
    b, a, s = Bench(), alloc(), spec()
    b.run_to_running(a, s, ref="r1")
    b.now += 1.0
    b.step([(a, s)], actual=[exited(a, 1, ref="r1")])
    b.rec.removed(a.id)
    first = b.rec.next_deadline()
    assert first is not None
    b.now = first
    b.run_to_running(a, s, ref="r2")
    b.now += 31.0  # longer than restart.window_s (30 s)
    b.step([(a, s)], actual=[exited(a, 1, ref="r2")])
    again = b.rec.next_deadline()
    assert again is not None
    # a new backoff run draws a new jitter factor, from [1, 1.2)
    assert 0.5 <= again - b.now < 0.6
    assert b.report(a.id).restarts == 1


def test_an_exit_is_counted_once_however_often_step_sees_it() -> None:
    b, a, s = Bench(), alloc(), spec()
    b.run_to_running(a, s)
    b.now += 1.0
    gone = exited(a, 1)
    assert b.step([(a, s)], actual=[gone]) == [Remove(a.id)]
    deadline = b.rec.next_deadline()
    assert b.report(a.id).restarts == 1
    for _ in range(3):  # the remove is slow: the same exit shows up again
        b.now += 0.1
        assert b.step([(a, s)], actual=[gone]) == []
    assert b.rec.next_deadline() == deadline
    assert b.reports() == {}


def test_a_workload_that_vanished_without_an_exit_is_restarted_through_the_backoff() -> None:
    b, a, s = Bench(), alloc(), spec()
    b.run_to_running(a, s)
    b.reports()
    b.now += 1.0
    assert b.step([(a, s)]) == []
    r = b.report(a.id)
    assert (r.state, r.restarts) == ("exited", 1)
    assert r.message.startswith("disappeared; restarting in ")
    b.now = T0 + 1.0 + 0.5 * JITTER
    assert b.step([(a, s)]) == [Start(a, s)]


@pytest.mark.parametrize(
    ("kind", "policy", "code", "state", "message"),
    [
        ("service", "always", 0, "exited", "exited with status 0; restarting in"),
        ("service", "always", 1, "exited", "exited with status 1; restarting in"),
        ("service", "on-failure", 1, "exited", "exited with status 1; restarting in"),
        ("service", "on-failure", None, "exited", "exited; restarting in"),
        ("service", "on-failure", 0, "complete",
         "exited with status 0; not restarting (restart.policy=on-failure)"),
        ("service", "never", 0, "complete",
         "exited with status 0; not restarting (restart.policy=never)"),
        ("service", "never", 1, "failed",
         "exited with status 1; not restarting (restart.policy=never)"),
        ("job", "on-failure", 0, "complete", "completed"),
        ("job", "always", 0, "complete", "completed"),
        ("job", "on-failure", 3, "exited", "exited with status 3; restarting in"),
    ],
)
def test_restart_policies(kind: str, policy: str, code: int | None, state: str,
                          message: str) -> None:
    b, a = Bench(), alloc()
    s = spec(kind=kind, restart=RestartSpec(policy=policy))
    b.run_to_running(a, s)
    b.reports()
    b.now += 1.0
    assert b.step([(a, s)], actual=[exited(a, code)]) == [Remove(a.id)]
    r = b.report(a.id)
    assert r.state == state
    assert r.message.startswith(message)
    b.rec.removed(a.id)
    b.now += 60.0
    restarts = b.step([(a, s)])
    assert restarts == ([Start(a, s)] if state == "exited" else [])
    if state != "exited":
        assert b.rec.next_deadline() is None
        for _ in range(3):
            b.now += 60.0
            assert b.step([(a, s)]) == []


def test_max_attempts_gives_up_and_says_why() -> None:
    b, a = Bench(), alloc()
    s = spec(restart=RestartSpec(max_attempts=2))
    for i in range(3):
        b.run_to_running(a, s, ref=f"r{i}")
        b.now += 1.0
        assert b.step([(a, s)], actual=[exited(a, 1, ref=f"r{i}")]) == [Remove(a.id)]
        b.rec.removed(a.id)
        if i < 2:
            deadline = b.rec.next_deadline()
            assert deadline is not None
            b.now = deadline
    assert b.rec.next_deadline() is None
    r = {x.alloc: x for x in b.rec.take_reports()}[a.id]
    assert r.state == "failed"
    assert "3 exits in a row" in r.message
    assert "restart.max_attempts=2" in r.message
    assert "fix the workload" in r.message
    for _ in range(3):
        b.now += 100.0
        assert b.step([(a, s)]) == []


def test_a_failed_start_counts_as_a_failed_run() -> None:
    b, a, s = Bench(), alloc(), spec()
    assert b.step([(a, s)]) == [Start(a, s)]
    b.reports()
    b.now += 0.25
    b.rec.start_failed(a, s, "port 8080/tcp is in use", b.now, WALL0 + b.now)
    r = b.report(a.id)
    assert (r.state, r.restarts) == ("exited", 1)
    assert r.message.startswith("cannot start: port 8080/tcp is in use; restarting in ")
    restart_at = T0 + 0.25 + 0.5 * JITTER
    assert b.rec.next_deadline() == pytest.approx(restart_at)
    assert b.step([(a, s)]) == []
    b.now = restart_at
    assert b.step([(a, s)]) == [Start(a, s)]


def test_a_failed_start_with_restart_never_is_failed() -> None:
    b, a = Bench(), alloc()
    s = spec(restart=RestartSpec(policy="never"))
    b.step([(a, s)])
    b.rec.start_failed(a, s, "no such image", b.now, WALL0 + b.now)
    r = b.report(a.id)
    assert r.state == "failed"
    assert "restart.policy=never" in r.message
    b.now += 100
    assert b.step([(a, s)]) == []


def test_a_start_that_failed_for_good_reports_why_it_could_not_start() -> None:
    b, a = Bench(), alloc()
    s = spec(restart=RestartSpec(policy="never"))
    b.step([(a, s)])
    b.rec.start_failed(a, s, "no such image busybox:9", b.now, WALL0 + b.now)
    assert "no such image busybox:9" in b.report(a.id).message


# ---------------------------------------------------------------------- rule 4: health


def test_the_first_probe_runs_at_once_and_never_two_at_a_time() -> None:
    b, a = Bench(), alloc()
    s = spec(health=TCP_CHECK)
    ports = {"http": 20000}
    assert b.run_to_running(a, s, ports=ports) == [Probe(a.id, TCP_CHECK, ports, 1)]
    r = b.report(a.id)
    assert (r.state, r.health) == ("running", "starting")
    assert b.rec.next_deadline() is None  # the probe is in flight
    for dt in (0.5, 3.0, 10.0):  # a slow probe: still none in parallel
        b.now = T0 + dt
        assert b.step([(a, s)], actual=[running(a, ports=ports)]) == []
    b.probed(a.id, True, "connected")
    assert (b.report(a.id).health) == "healthy"
    assert b.rec.health_of(a.id) is not None
    # the next one is due at once: the last one took longer than the interval
    assert b.rec.next_deadline() == T0 + 10.0
    assert b.step([(a, s)], actual=[running(a, ports=ports)]) == [
        Probe(a.id, TCP_CHECK, ports, 1)]


def test_probes_follow_the_interval() -> None:
    b, a = Bench(), alloc()
    s = spec(health=TCP_CHECK)
    b.run_to_running(a, s)
    b.now = T0 + 0.1
    b.probed(a.id, True, "ok")
    assert b.rec.next_deadline() == T0 + 2.0
    b.now = T0 + 1.9
    assert b.step([(a, s)], actual=[running(a)]) == []
    b.now = T0 + 2.0
    assert b.step([(a, s)], actual=[running(a)]) == [Probe(a.id, TCP_CHECK, {}, 1)]


def test_a_liveness_failure_stops_and_restarts_through_the_backoff() -> None:
    b, a = Bench(), alloc()
    s = spec(health=TCP_CHECK, stop_grace_s=3.0)
    b.run_to_running(a, s)
    b.probed(a.id, True, "ok")
    for i in range(2):  # retries=2
        b.now = T0 + 2.0 * (i + 1)
        assert b.step([(a, s)], actual=[running(a)]) == [Probe(a.id, TCP_CHECK, {}, 1)]
        b.probed(a.id, False, "connection refused")
    b.reports()
    assert b.step([(a, s)], actual=[running(a)]) == [
        Stop(a.id, 3.0, "unhealthy: connection refused")]
    r = b.report(a.id)
    assert (r.state, r.health) == ("running", "unhealthy")
    assert b.step([(a, s)], actual=[running(a)]) == []  # the stop is in flight
    b.rec.stopped(a.id, b.now)
    b.now += 0.5
    assert b.step([(a, s)], actual=[exited(a, 143)]) == [Remove(a.id)]
    r = b.report(a.id)
    assert (r.state, r.restarts) == ("exited", 1)
    assert r.message.startswith("unhealthy: connection refused; restarting in ")
    restart_at = b.now + 0.5 * JITTER
    assert b.rec.next_deadline() == pytest.approx(restart_at)
    b.rec.removed(a.id)
    b.now = restart_at
    assert b.step([(a, s)]) == [Start(a, s)]
    # the new run gets a fresh tracker: probed at once, health starting again
    b.rec.started(a.id, running(a, ref="r2"), b.now, WALL0 + b.now)
    assert b.step([(a, s)], actual=[running(a, ref="r2")]) == [Probe(a.id, TCP_CHECK, {}, 2)]
    assert b.report(a.id).health == "starting"


def test_a_liveness_failure_restarts_even_with_restart_on_failure() -> None:
    b, a = Bench(), alloc()
    check = HealthSpec("tcp", retries=1)
    s = spec(health=check, restart=RestartSpec(policy="on-failure"))
    b.run_to_running(a, s)
    b.probed(a.id, False, "refused")
    assert b.step([(a, s)], actual=[running(a)]) == [Stop(a.id, 10.0, "unhealthy: refused")]
    b.rec.stopped(a.id, b.now)
    b.step([(a, s)], actual=[exited(a, 0)])  # it even exited 0 on SIGTERM
    assert b.report(a.id).state == "exited"
    assert b.rec.next_deadline() is not None


def test_a_readiness_only_check_never_restarts_but_reports_unhealthy() -> None:
    b, a = Bench(), alloc()
    check = HealthSpec("tcp", interval_s=1.0, retries=1, readiness_only=True)
    s = spec(health=check)
    assert b.run_to_running(a, s) == [Probe(a.id, check, {}, 1)]
    b.reports()
    b.probed(a.id, False, "refused")
    r = b.report(a.id)
    assert (r.state, r.health) == ("running", "unhealthy")
    for _ in range(10):
        b.now += 1.0
        actions = b.step([(a, s)], actual=[running(a)])
        assert actions == [Probe(a.id, check, {}, 1)]
        b.probed(a.id, False, "refused")
    b.now += 1.0
    b.step([(a, s)], actual=[running(a)])
    b.probed(a.id, True, "connected")
    r = b.report(a.id)
    assert (r.state, r.health, r.restarts) == ("running", "healthy", 0)


def test_a_probe_result_after_the_allocation_went_away_is_ignored() -> None:
    b, a = Bench(), alloc()
    s = spec(health=TCP_CHECK)
    b.run_to_running(a, s)
    b.step(stops=[a], actual=[running(a)])  # no longer wanted
    b.probed(a.id, False, "refused")
    assert b.rec.health_of(a.id) is None


# ---------------------------------------------------------------------- rule 5: fencing

FENCE_REASON = "stopped: cut off from the cluster for 12s (stop_after_disconnect 10s)"


def test_self_fencing_stops_reports_stopped_and_starts_again_when_back() -> None:
    b, a = Bench(), alloc()
    s = spec(stop_after_disconnect_s=10.0, stop_grace_s=2.0)
    b.run_to_running(a, s)
    b.reports()
    # exactly the limit: not yet
    assert b.step([(a, s)], actual=[running(a)], disconnected_s=10.0) == []
    assert b.step([(a, s)], actual=[running(a)], disconnected_s=12.0) == [
        Stop(a.id, 2.0, FENCE_REASON)]
    assert b.reports() == {}  # "stopped" once it no longer runs
    assert b.step([(a, s)], actual=[running(a)], disconnected_s=12.4) == []
    b.rec.stopped(a.id, b.now)
    assert b.step([(a, s)], actual=[exited(a, 143)], disconnected_s=12.4) == [Remove(a.id)]
    r = b.report(a.id)
    assert (r.state, r.message) == ("stopped", FENCE_REASON)
    b.rec.removed(a.id)
    for d in (20.0, 300.0):  # still cut off: stays stopped
        assert b.step([(a, s)], disconnected_s=d) == []
    assert b.step([(a, s)], disconnected_s=0.0) == [Start(a, s)]
    assert b.report(a.id).state == "starting"


def test_services_without_stop_after_disconnect_keep_running() -> None:
    b, a = Bench(), alloc()
    s = spec()
    b.run_to_running(a, s)
    assert b.step([(a, s)], actual=[running(a)], disconnected_s=10_000.0) == []


def test_a_fenced_allocation_is_not_started() -> None:
    b, a = Bench(), alloc()
    s = spec(stop_after_disconnect_s=10.0)
    assert b.step([(a, s)], disconnected_s=12.0) == []
    r = b.report(a.id)
    assert (r.state, r.message) == ("stopped", FENCE_REASON)


# ---------------------------------------------------------------------- reports


def test_take_reports_returns_each_change_once_in_alloc_order() -> None:
    b, s = Bench(), spec()
    a1, a2 = alloc(1, 2), alloc(0, 1)
    b.step([(a1, s), (a2, s)])
    got = b.rec.take_reports()
    assert [r.alloc for r in got] == sorted([a1.id, a2.id])
    assert b.rec.take_reports() == []
    b.now += 1.0
    b.step([(a1, s), (a2, s)])  # nothing changed (since alone does not count)
    assert b.rec.take_reports() == []


def test_requeue_keeps_the_newest_report() -> None:
    b, a, s = Bench(), alloc(), spec()
    b.step([(a, s)])
    lost = b.rec.take_reports()
    assert [r.state for r in lost] == ["starting"]
    b.rec.requeue(lost)  # the leader did not answer
    assert b.rec.take_reports() == lost
    b.rec.started(a.id, running(a), b.now, WALL0 + b.now)
    b.step([(a, s)], actual=[running(a)])
    b.rec.requeue(lost)  # an older report comes back after a newer one was made
    assert [r.state for r in b.rec.take_reports()] == ["running"]


def test_a_report_is_made_again_after_a_change_back() -> None:
    b, a = Bench(), alloc()
    check = HealthSpec("tcp", interval_s=1.0, retries=1, readiness_only=True)
    s = spec(health=check)
    b.run_to_running(a, s)
    b.reports()
    healths = []
    for ok in (True, False, True):
        b.now += 1.0
        b.step([(a, s)], actual=[running(a)])
        b.probed(a.id, ok, "")
        healths.append(b.report(a.id).health)
    assert healths == ["healthy", "unhealthy", "healthy"]


# ---------------------------------------------------------------------- next_deadline


def test_next_deadline() -> None:
    b, s = Bench(), spec()
    assert b.rec.next_deadline() is None
    a = alloc()
    b.run_to_running(a, s)
    assert b.rec.next_deadline() is None  # running without a check: nothing timed
    checked = alloc(1, 2)
    hs = spec(health=TCP_CHECK)
    b.step([(a, s), (checked, hs)], actual=[running(a), running(checked, ref="c")])
    assert b.rec.next_deadline() is None  # the first probe is in flight
    b.probed(checked.id, True, "")
    assert b.rec.next_deadline() == T0 + 2.0
    b.now = T0 + 1.0
    b.step([(a, s), (checked, hs)], actual=[exited(a, 1), running(checked, ref="c")])
    assert b.rec.next_deadline() == pytest.approx(T0 + 1.0 + 0.5 * JITTER)  # the sooner one


# ---------------------------------------------------------------------- found bugs and edges


def test_a_probe_result_of_an_earlier_run_is_ignored() -> None:
    b, a = Bench(), alloc()
    s = spec(health=TCP_CHECK)
    b.run_to_running(a, s, ref="r1")
    old = b.probes[a.id]  # a slow probe of run 1
    b.now += 0.2
    b.step([(a, s)], actual=[exited(a, 1, ref="r1")])
    b.rec.removed(a.id)
    deadline = b.rec.next_deadline()
    assert deadline is not None
    b.now = deadline
    assert b.run_to_running(a, s, ref="r2") == [Probe(a.id, TCP_CHECK, {}, 2)]
    b.rec.probed(a.id, old.run, False, "refused", b.now, WALL0 + b.now)  # arrives late
    b.probed(a.id, True, "connected")  # the new run's own result: accepted, no error
    assert b.report(a.id).health == "healthy"


def _crash_right_after_start(b: Bench, a: AllocRecord, s: WorkloadSpec, ref: str) -> None:
    """Start ``a``; it exits before any step saw it running (``false`` as a command)."""
    assert b.step([(a, s)]) == [Start(a, s)]
    b.rec.started(a.id, running(a, ref), b.now, WALL0 + b.now)
    b.now += 0.05
    assert b.step([(a, s)], actual=[exited(a, 1, ref=ref)]) == [Remove(a.id)]
    b.rec.removed(a.id)


def test_a_workload_that_crashes_before_a_step_sees_it_running_still_backs_off() -> None:
    b, a = Bench(), alloc()
    s = spec(restart=RestartSpec(max_attempts=2))
    for i in range(3):
        _crash_right_after_start(b, a, s, f"r{i}")
        deadline = b.rec.next_deadline()
        if deadline is not None:
            b.now = deadline
    r = b.report(a.id)
    assert r.state == "failed"
    assert "restart.max_attempts=2" in r.message


def test_a_liveness_stop_that_did_not_take_is_sent_again() -> None:
    b, a = Bench(), alloc()
    s = spec(health=HealthSpec("tcp", retries=1))
    b.run_to_running(a, s)
    b.probed(a.id, False, "refused")
    assert b.step([(a, s)], actual=[running(a)]) == [Stop(a.id, 10.0, "unhealthy: refused")]
    b.rec.stopped(a.id, b.now)  # the driver failed; the agent reports the stop done anyway
    b.now += 1.0
    assert b.step([(a, s)], actual=[running(a)]) == [Stop(a.id, 10.0, "unhealthy: refused")]


def test_a_liveness_stopped_workload_that_vanished_is_restarted() -> None:
    b, a = Bench(), alloc()
    s = spec(health=HealthSpec("tcp", retries=1))
    b.run_to_running(a, s)
    b.probed(a.id, False, "refused")
    b.step([(a, s)], actual=[running(a)])
    b.rec.stopped(a.id, b.now)
    b.now += 1.0
    b.step([(a, s)])  # gone, no exit seen
    b.now += 60.0
    assert b.step([(a, s)]) == [Start(a, s)]


def test_a_completed_job_is_not_started_again_after_a_disconnect() -> None:
    b, a = Bench(), alloc()
    s = spec(kind="job", stop_after_disconnect_s=5.0)
    b.run_to_running(a, s)
    b.now += 1.0
    b.step([(a, s)], actual=[exited(a, 0)])
    b.rec.removed(a.id)
    assert b.report(a.id).state == "complete"
    assert b.step([(a, s)], disconnected_s=6.0) == []
    assert b.step([(a, s)]) == []
    assert a.id not in b.reports()  # nothing changed: it stays reported complete


def test_an_allocation_that_gave_up_survives_a_disconnect() -> None:
    b, a = Bench(), alloc()
    s = spec(restart=RestartSpec(max_attempts=1), stop_after_disconnect_s=5.0)
    for i in range(2):
        b.run_to_running(a, s, ref=f"r{i}")
        b.now += 1.0
        b.step([(a, s)], actual=[exited(a, 1, ref=f"r{i}")])
        b.rec.removed(a.id)
        deadline = b.rec.next_deadline()
        if deadline is not None:
            b.now = deadline
    assert b.report(a.id).state == "failed"
    b.step([(a, s)], disconnected_s=6.0)
    actions = b.step([(a, s)])
    if actions == [Start(a, s)]:  # it should not be started at all; if it is, it
        b.rec.started(a.id, running(a, "r9"), b.now, WALL0 + b.now)  # must not crash
        b.step([(a, s)], actual=[running(a, "r9")])
        b.step([(a, s)], actual=[exited(a, 1, ref="r9")])
    assert actions == []


def test_no_second_start_when_back_in_touch_while_a_start_is_in_flight() -> None:
    b, a = Bench(), alloc()
    s = spec(stop_after_disconnect_s=5.0)
    assert b.step([(a, s)]) == [Start(a, s)]
    b.now += 6.0
    assert b.step([(a, s)], disconnected_s=6.0) == []
    b.now += 1.0
    assert b.step([(a, s)]) == []  # the first start has not returned yet


# ---------------------------------------------------------------------- property


@dataclass
class _Model:
    """A driver that does what it is told when the test says so: actions stay in
    flight until an op completes (or fails) them, in any order."""

    bench: Bench
    spec: WorkloadSpec
    desired: dict[AllocId, str] = field(default_factory=dict)
    """run, stop or dropped; never back to run (ids are not reused)."""
    workloads: dict[AllocId, Workload] = field(default_factory=dict)
    in_flight: list[Action] = field(default_factory=list)
    refs: int = 0

    def step(self) -> None:
        wants = [(POOL[a], self.spec) for a in sorted(self.desired)
                 if self.desired[a] == "run"]
        stops = [POOL[a] for a in sorted(self.desired) if self.desired[a] == "stop"]
        actual = dict(self.workloads)
        actions = self.bench.step(wants, stops, actual.values())
        assert len(actions) == len(set(map(repr, actions))), actions
        for act in actions:
            if isinstance(act, Start):
                aid = act.alloc.id
                assert self.desired.get(aid) == "run", f"{aid} started but not wanted"
                w = actual.get(aid)
                assert w is None or w.state != "running", f"{aid} started while running"
                assert not any(isinstance(x, Start) and x.alloc.id == aid
                               for x in self.in_flight), f"{aid}: a second Start in flight"
                # stop-first: what it replaces (an unwanted replica of its slot) is gone
                rivals = [x.alloc for x in actual.values() if x.state == "running"
                          and self.desired.get(x.alloc) != "run"
                          and POOL[x.alloc].slot == act.alloc.slot]
                assert not rivals, f"{aid} started while {rivals} of its slot run"
        self.in_flight.extend(actions)

    def finish(self, i: int, ok: bool) -> None:
        if not self.in_flight:
            return
        act = self.in_flight.pop(i % len(self.in_flight))
        b = self.bench
        wall = WALL0 + b.now
        if isinstance(act, Start):
            aid = act.alloc.id
            held = self.workloads.get(aid)
            if not ok or (held is not None and held.state == "running"):
                b.rec.start_failed(act.alloc, act.spec, "refused", b.now, wall)
                return
            self.refs += 1
            w = running(aid, ref=f"r{self.refs}")
            self.workloads[aid] = w
            b.rec.started(aid, w, b.now, wall)
        elif isinstance(act, Stop):
            target = self.workloads.get(act.alloc)
            if ok and target is not None and target.state == "running":
                self.workloads[act.alloc] = exited(act.alloc, 143, ref=target.ref)
            b.rec.stopped(act.alloc, b.now)
        elif isinstance(act, Remove):
            gone = self.workloads.get(act.alloc)
            if ok and gone is not None and gone.state != "running":
                del self.workloads[act.alloc]
            b.rec.removed(act.alloc)
        else:
            b.rec.probed(act.alloc, act.run, ok, "", b.now, wall)

    def crash(self, aid: AllocId, code: int) -> None:
        w = self.workloads.get(aid)
        if w is not None and w.state == "running":
            self.workloads[aid] = exited(aid, code, ref=w.ref)


POOL = {a.id: a for a in (alloc(0, 1), alloc(0, 2), alloc(1, 3))}
"""web-0-2 replaces web-0-1 in slot 0; web-1-3 has a slot of its own."""

_FINISH = st.tuples(st.just("finish"), st.integers(0, 7), st.booleans())
_OPS = st.one_of(
    st.tuples(st.just("want"), st.sampled_from(sorted(POOL))),
    st.tuples(st.just("stop"), st.sampled_from(sorted(POOL))),
    st.tuples(st.just("drop"), st.sampled_from(sorted(POOL))),
    st.tuples(st.just("crash"), st.sampled_from(sorted(POOL)), st.sampled_from([0, 1, 137])),
    _FINISH, _FINISH, _FINISH,  # drawn more often: actions complete in any order
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.3, 1.0, 5.0, 40.0])),
)


@settings(max_examples=300)
@given(health=st.booleans(), policy=st.sampled_from(["always", "on-failure", "never"]),
       ops=st.lists(_OPS, max_size=80))
def test_never_two_starts_and_never_a_start_of_what_runs(
        health: bool, policy: str, ops: Sequence[tuple[object, ...]]) -> None:
    check = HealthSpec("tcp", interval_s=1.0, retries=1) if health else None
    m = _Model(Bench(), spec(health=check, restart=RestartSpec(policy=policy)))
    for op in ops:
        match op:
            case ("want", str(aid)) if aid not in m.desired:
                m.desired[AllocId(aid)] = "run"
            case ("stop", str(aid)) if m.desired.get(AllocId(aid)) == "run":
                m.desired[AllocId(aid)] = "stop"
            case ("drop", str(aid)) if m.desired.get(AllocId(aid)) in ("run", "stop"):
                m.desired[AllocId(aid)] = "dropped"
            case ("crash", str(aid), int(code)):
                m.crash(AllocId(aid), code)
            case ("finish", int(i), bool(ok)):
                m.finish(i, ok)
            case ("advance", float(dt)):
                m.bench.now += dt
            case _:
                continue
        m.step()
    # settle: finish everything, with time passing; whatever is wanted ends up running
    # or given up, and nothing unwanted runs
    for _ in range(40):
        while m.in_flight:
            m.finish(0, True)
        m.bench.now += 40.0
        m.step()
    for aid, w in m.workloads.items():
        if w.state == "running":
            assert m.desired.get(aid) == "run", f"{aid} runs but is {m.desired.get(aid)}"
    reports = {r.alloc: r for r in m.bench.rec.take_reports()}
    for aid, d in m.desired.items():
        if d == "run" and aid in reports:
            assert reports[aid].state in ("running", "failed", "complete"), reports[aid]
