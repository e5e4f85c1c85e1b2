"""The trio adapter over MemoryNetwork, on trio's autojump clock (virtual time)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
import trio.testing

from mesh import wire
from mesh.gossip.adapter import GossipAdapter, MemoryNetwork, MemoryTransport
from mesh.gossip.config import GossipConfig
from mesh.gossip.core import MemberChanged, Membership
from mesh.gossip.messages import Meta, Status
from mesh.types import Addr, NodeId

CFG = GossipConfig.lan()


class Cluster:
    """Adapters on one MemoryNetwork, each in a cancel scope of its own (a process)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.net = MemoryNetwork(nursery)
        self.adapters: dict[str, GossipAdapter] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str, seed: int, config: GossipConfig = CFG) -> GossipAdapter:
        addr = Addr(f"10.0.0.{len(self.adapters) + 1}", 7946)
        ep = self.net.endpoint(addr)
        core = Membership(config, NodeId(name), addr, Meta(), random.Random(seed),
                          trio.current_time())
        adapter = GossipAdapter(core, ep, ep)
        ep.stream_handler = adapter.serve_push_pull
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await adapter.run(task_status=task_status)

        await self.nursery.start(run)
        self.adapters[name] = adapter
        self.scopes[name] = scope
        return adapter

    def kill(self, name: str) -> None:
        self.scopes[name].cancel()
        self.net.cut(self.adapters[name].core.member(NodeId(name)).addr)  # type: ignore[union-attr]

    def status(self, observer: str, node: str) -> Status | None:
        view = self.adapters[observer].core.member(NodeId(node))
        return view.status if view else None


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    """Poll a core's state in virtual time (autojump: costs no wall time)."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the cores expose state, not events
            await trio.sleep(0.01)


async def test_three_nodes_join_and_detect_a_crash(autojump_clock: trio.testing.MockClock
                                                   ) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a", 1)
        b = await c.start("b", 2)
        d = await c.start("d", 3)
        seed = a.core.member(NodeId("a")).addr  # type: ignore[union-attr]
        t0 = trio.current_time()
        assert (await b.join([seed])).ok == (seed,)
        assert (await d.join([seed])).ok == (seed,)
        assert trio.current_time() == t0  # memory streams: joining takes no virtual time
        await wait_until(lambda: all(c.status(o, n) == Status.ALIVE
                                     for o in "abd" for n in "abd"), 2.0)
        events = a.subscribe()
        crash_at = trio.current_time()
        c.kill("d")
        await wait_until(lambda: c.status("a", "d") == Status.DEAD
                         and c.status("b", "d") == Status.DEAD, 10.0)
        took = trio.current_time() - crash_at
        # Detection needs a failed probe (<= 2 probe intervals to reach d, with
        # local health possibly stretching them) plus the suspicion timeout, which
        # with N=3 and no confirmations possible is the minimum, 3*1*0.4 s.
        assert took >= 1.2
        assert took <= 1.2 + 5 * CFG.probe_interval_s * 2
        seen = []
        while True:
            try:
                ev = events.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(ev, MemberChanged):
                seen.append(ev.member.status)
        assert seen == [Status.SUSPECT, Status.DEAD]
        nursery.cancel_scope.cancel()


async def test_join_reports_unreachable_seed(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a", 1)
        missing = Addr("10.9.9.9", 7946)
        result = await a.join([missing])
        assert result.ok == ()
        assert result.failed[0][0] == missing
        nursery.cancel_scope.cancel()


async def test_garbage_datagrams_are_counted_and_ignored(autojump_clock: trio.testing.MockClock
                                                         ) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a", 1)
        b = await c.start("b", 2)
        await b.join([a.core.member(NodeId("a")).addr])  # type: ignore[union-attr]
        attacker: MemoryTransport = c.net.endpoint(Addr("10.6.6.6", 1))
        target = a.core.member(NodeId("a")).addr  # type: ignore[union-attr]
        for junk in (b"", b"\x00" * 10, b"\x01\x00\x01\xff\xff", wire.encode(1, [[6, "b"]])):
            await attacker.send_packet(target, junk)
        await wait_until(lambda: a.statistics().datagrams_rejected == 4, 1.0)
        assert a.core.statistics().malformed >= 3
        await trio.sleep(3.0)
        assert c.status("a", "b") == Status.ALIVE
        nursery.cancel_scope.cancel()


async def test_leave_announces_departure(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a", 1)
        b = await c.start("b", 2)
        await b.join([a.core.member(NodeId("a")).addr])  # type: ignore[union-attr]
        await wait_until(lambda: c.status("a", "b") == Status.ALIVE, 1.0)
        t0 = trio.current_time()
        await b.leave()
        assert trio.current_time() - t0 == pytest.approx(CFG.leave_propagate_s)
        assert c.status("a", "b") == Status.LEFT
        nursery.cancel_scope.cancel()


async def test_slow_subscriber_is_dropped_not_blocking(autojump_clock: trio.testing.MockClock
                                                       ) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery)
        a = await c.start("a", 1)
        slow = a.subscribe(max_buffer=1)
        for i in range(3):
            b = await c.start(f"b{i}", 10 + i)
            await b.join([a.core.member(NodeId("a")).addr])  # type: ignore[union-attr]
        await wait_until(lambda: len(a.core.members()) == 4, 1.0)
        assert isinstance(slow.receive_nowait(), MemberChanged)
        with pytest.raises(trio.EndOfChannel):
            slow.receive_nowait()
        nursery.cancel_scope.cancel()
