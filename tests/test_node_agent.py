"""The node agent: committed allocations run through the driver, reports go back.

The agent runs against :class:`~mesh.testing.fakes.FakeDriver` and a small fake of
the replica surface it uses (``raft.me``, ``leader``, ``wait_changed``,
``state``, ``write_command``), on trio's ``autojump_clock``: times asserted are
exact virtual times. ``wall_clock`` is ``trio.current_time`` too, so a workload's
``started_at`` says when the driver started it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from mesh.errors import ProposalDropped
from mesh.node.agent import REPORT_BATCH_S, Agent
from mesh.node.driver import Workload
from mesh.node.spec import HealthSpec, RestartSpec, WorkloadSpec
from mesh.raft.messages import Entry
from mesh.raft.state import (
    AllocPlan,
    AllocRecord,
    AllocReport,
    Command,
    MeshState,
    RunOp,
    ServicePut,
    StopOp,
    Table,
)
from mesh.testing.fakes import FakeDriver
from mesh.types import AllocId, NodeId, ServiceId

N1 = NodeId("n1")
WEB = ServiceId("web")
FIRST = AllocId("web-0-1")
"""The id MeshState gives the first allocation of ``web`` slot 0."""
SEED = 3
JITTER = 1.0 + random.Random(SEED).random() * 0.2
"""The jitter of the first backoff run of an agent seeded with SEED."""


class FakeRaft:
    """What the agent reads of the Raft adapter."""

    def __init__(self, me: NodeId) -> None:
        self.me = me
        self.leader: NodeId | None = me
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


class FakeReplica:
    """A one-node replica: ``write_command`` commits at once (or fails on request)."""

    def __init__(self, me: NodeId) -> None:
        self.raft = FakeRaft(me)
        self.state = MeshState()
        self.fail_writes = 0
        """How many of the next writes fail (no leader)."""
        self.reports: list[tuple[float, AllocReport]] = []
        """Committed reports with their virtual commit time."""
        self.fresh = trio.Event()
        """Set: the replica has caught up with the cluster (tests clear it)."""
        self.fresh.set()

    def commit(self, command: Command) -> None:
        self.state.apply(Entry(1, self.state.applied_index + 1, command.encode()))
        self.raft.notify()

    async def write_command(self, command: Command) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if self.fail_writes:
            self.fail_writes -= 1
            raise ProposalDropped("no leader; retry")
        self.commit(command)
        if isinstance(command, AllocReport):
            self.reports.append((trio.current_time(), command))
        return {}

    @property
    def leader(self) -> NodeId | None:
        return self.raft.leader

    async def wait_changed(self, tables: Collection[Table] = (), *, applied: bool = False,
                           view: bool = False) -> int:
        """Wakes at every commit, whatever it changed (more often than a replica:
        the agent must not care)."""
        seen = self.state.applied_index
        await self.raft.wait_changed()
        return seen

    async def wait_fresh(self) -> None:
        await self.fresh.wait()

    async def wait_for(self, pred: Callable[[], bool]) -> None:
        """Wait until ``pred()`` holds after a commit."""
        while not pred():
            await self.raft.wait_changed()

    def alloc(self, aid: AllocId = FIRST) -> AllocRecord:
        rec = self.state.alloc(aid)
        assert rec is not None
        return rec

    def in_state(self, state: str, aid: AllocId = FIRST, restarts: int | None = None
                 ) -> Callable[[], bool]:
        def pred() -> bool:
            rec = self.state.alloc(aid)
            return rec is not None and rec.state == state and (
                restarts is None or rec.restarts == restarts)
        return pred


def service(**kw: Any) -> WorkloadSpec:
    return WorkloadSpec(name=WEB, command=("srv",), **kw)


@asynccontextmanager
async def running_agent(replica: FakeReplica, driver: FakeDriver) -> AsyncIterator[Agent]:
    agent = Agent(replica, driver, "127.0.0.1", trio.current_time,  # type: ignore[arg-type]
                  random.Random(SEED))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        yield agent
        nursery.cancel_scope.cancel()


def setup(spec: WorkloadSpec | None = None) -> tuple[FakeReplica, FakeDriver]:
    """A replica with service ``web`` and its slot 0 placed on n1; an idle driver."""
    replica = FakeReplica(N1)
    replica.commit(ServicePut(WEB, (spec or service()).encode()))
    replica.commit(AllocPlan((RunOp(WEB, 0, N1, 1),)))
    driver = FakeDriver(N1, wall_clock=trio.current_time, sleep=trio.sleep)
    return replica, driver


async def test_a_committed_allocation_is_started_and_reported_running(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    async with running_agent(replica, driver) as agent:
        await replica.wait_for(replica.in_state("running"))
        assert trio.current_time() == REPORT_BATCH_S  # one batch: starting was overtaken
        assert [r.alloc for r in driver.started] == [FIRST]
        run = driver.started[0]
        assert (run.service, run.version, run.command, run.labels["mesh.node"]) == (
            WEB, 1, ("srv",), N1)
        assert agent.workloads[FIRST].started_at == 0.0
        assert [[r.state for r in rep.reports] for _, rep in replica.reports] == [["running"]]
        rec = replica.alloc()
        assert (rec.health, rec.restarts, rec.ready) == ("none", 0, True)
        await trio.sleep(10.0)  # nothing changes: no second start, no more reports
        assert len(driver.started) == 1
        assert len(replica.reports) == 1


async def test_nothing_is_started_before_the_replica_has_caught_up(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    replica.fresh = trio.Event()  # a restarted node whose replica may be stale
    async with running_agent(replica, driver):
        await trio.sleep(30.0)
        assert not driver.started
        replica.fresh.set()
        await replica.wait_for(replica.in_state("running"))
        assert [r.alloc for r in driver.started] == [FIRST]
        assert trio.current_time() == pytest.approx(30.0 + REPORT_BATCH_S)


async def test_a_crash_is_restarted_after_the_backoff(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    async with running_agent(replica, driver) as agent:
        await replica.wait_for(replica.in_state("running"))
        await trio.sleep(5.0 - trio.current_time())
        driver.exit(FIRST, 1)
        await replica.wait_for(replica.in_state("exited"))
        assert trio.current_time() == pytest.approx(5.0 + REPORT_BATCH_S)
        rec = replica.alloc()
        assert rec.restarts == 1
        assert rec.message.startswith("exited with status 1; restarting in ")
        assert driver.removed == (FIRST,)
        await replica.wait_for(replica.in_state("running", restarts=1))
        restart_at = 5.0 + 0.5 * JITTER
        assert len(driver.started) == 2
        assert agent.workloads[FIRST].started_at == pytest.approx(restart_at)
        assert trio.current_time() == pytest.approx(restart_at + REPORT_BATCH_S)


async def test_a_stopped_allocation_is_stopped_in_the_driver(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    async with running_agent(replica, driver):
        await replica.wait_for(replica.in_state("running"))
        await trio.sleep(3.0 - trio.current_time())
        replica.commit(AllocPlan((StopOp(FIRST),)))
        await replica.wait_for(replica.in_state("stopped"))
        assert trio.current_time() == pytest.approx(3.0 + REPORT_BATCH_S)
        assert driver.stopped == (FIRST,)
        assert driver.removed == (FIRST,)
        assert await driver.list() == []
        await trio.sleep(10.0)
        assert len(driver.started) == 1  # not started again


async def test_reports_that_fail_to_commit_are_retried(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    replica.fail_writes = 2
    async with running_agent(replica, driver):
        await replica.wait_for(replica.in_state("running"))
        # tried at 0.02 and 0.54; each failure waits 0.5 s, then batches for 0.02 s
        assert trio.current_time() == pytest.approx(3 * REPORT_BATCH_S + 2 * 0.5)
        assert replica.fail_writes == 0
        assert [[r.state for r in rep.reports] for _, rep in replica.reports] == [["running"]]


async def test_a_workload_that_runs_already_is_adopted_not_restarted(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    driver.adopt(Workload(FIRST, WEB, 1, "running", None, {}, -50.0, None, "old-7"))
    async with running_agent(replica, driver) as agent:
        await replica.wait_for(replica.in_state("running"))
        assert driver.started == ()
        assert agent.workloads[FIRST].ref == "old-7"
        assert replica.alloc().restarts == 0


async def test_a_failed_start_is_retried_after_the_backoff(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()
    driver.fail_next_start("port 8080/tcp is in use on node n1")
    async with running_agent(replica, driver) as agent:
        await replica.wait_for(replica.in_state("exited"))
        assert replica.alloc().message.startswith(
            "cannot start: port 8080/tcp is in use on node n1; restarting in ")
        await replica.wait_for(replica.in_state("running"))
        assert agent.workloads[FIRST].started_at == pytest.approx(0.5 * JITTER)


async def test_a_failing_liveness_check_restarts_the_workload(
        autojump_clock: trio.testing.MockClock) -> None:
    check = HealthSpec("exec", command=("check",), interval_s=1.0, retries=2)
    replica, driver = setup(service(health=check, stop_grace_s=4.0))
    async with running_agent(replica, driver) as agent:
        await replica.wait_for(lambda: replica.alloc().health == "healthy")
        assert trio.current_time() == REPORT_BATCH_S  # probed at once
        await trio.sleep(5.0 - trio.current_time())
        driver.set_exec_result(FIRST, 1, b"down")
        # probes at 5 and 6 fail: stopped at 6, restarted after the backoff
        await replica.wait_for(replica.in_state("exited"))
        assert trio.current_time() == pytest.approx(6.0 + REPORT_BATCH_S)
        rec = replica.alloc()
        assert rec.message.startswith("unhealthy: exec check -> status 1: down; restarting")
        assert driver.stopped == (FIRST,)
        driver.set_exec_result(FIRST, 0)
        await replica.wait_for(replica.in_state("running", restarts=1))
        assert agent.workloads[FIRST].started_at == pytest.approx(6.0 + 0.5 * JITTER)
        calls = [c.argv for c in driver.exec_calls]
        assert calls
        assert all(argv == ("check",) for argv in calls)


async def test_restart_policy_never_leaves_a_crashed_workload_failed(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup(service(restart=RestartSpec(policy="never")))
    async with running_agent(replica, driver):
        await replica.wait_for(replica.in_state("running"))
        driver.exit(FIRST, 2)
        await replica.wait_for(replica.in_state("failed"))
        assert "restart.policy=never" in replica.alloc().message
        await trio.sleep(60.0)
        assert len(driver.started) == 1


async def test_a_stopped_allocation_gets_its_services_stop_grace(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup(service(stop_grace_s=30.0))
    async with running_agent(replica, driver):
        await replica.wait_for(replica.in_state("running"))
        driver.trap_sigterm(FIRST)
        await trio.sleep(1.0 - trio.current_time())
        replica.commit(AllocPlan((StopOp(FIRST),)))
        await replica.wait_for(replica.in_state("stopped"))
        assert trio.current_time() == pytest.approx(1.0 + 30.0 + REPORT_BATCH_S)


async def test_a_workload_that_ignores_sigterm_is_killed_after_the_grace(
        autojump_clock: trio.testing.MockClock) -> None:
    replica, driver = setup()  # stop_grace_s: 10 s by default
    async with running_agent(replica, driver):
        await replica.wait_for(replica.in_state("running"))
        driver.trap_sigterm(FIRST)
        await trio.sleep(1.0 - trio.current_time())
        replica.commit(AllocPlan((StopOp(FIRST),)))
        await replica.wait_for(replica.in_state("stopped"))
        assert trio.current_time() == pytest.approx(1.0 + 10.0 + REPORT_BATCH_S)
        assert driver.removed == (FIRST,)
