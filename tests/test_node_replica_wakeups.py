"""Who :meth:`Replica.wait_changed` wakes: only the readers a change concerns.

Replicas wrap the adapters of ``test_raft_adapter``'s in-memory cluster (real
cores, ready loops and snapshots; the adapter calls the replica at each Ready),
or run alone as in ``test_node_replica_kv_watch``, on trio's ``autojump_clock``.
Each follower records what woke it; the tests assert which ones a key-value
write, an allocation change, a leader change and a snapshot restore reach.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
from test_node_replica_kv_watch import ME, solo
from test_raft_adapter import CONFIG, Cluster, put

from mesh.node.agent import Wakeup, wake_on_changes
from mesh.node.daemon import EventFeed
from mesh.node.replica import Replica, ReplicaSettings
from mesh.raft.state import AllocPlan, KvPut, RunOp, ServicePut, Table
from mesh.raft.watch import StateGate, WatchBuffer, WatchConfig
from mesh.types import NodeId, ServiceId

WEB = ServiceId("web")
N1 = NodeId("n1")
"""Where the allocation goes (no node runs it)."""


def service_put() -> bytes:
    return ServicePut(WEB, b"spec").encode()


def alloc_plan() -> bytes:
    return AllocPlan((RunOp(WEB, 0, N1, 1),)).encode()


async def wrap(cluster: Cluster, node: NodeId) -> Replica:
    """A replica around ``node``'s running adapter (its state is the readers'),
    once it has heard from Raft (before, the watch stream would feed it)."""
    adapter = cluster.adapters[node]
    gate = StateGate(adapter.state, WatchBuffer(WatchConfig()))  # type: ignore[arg-type]
    replica = Replica(adapter, gate, cluster.storages[node], None, None,  # type: ignore[arg-type]
                      ReplicaSettings(cluster.config))
    while not replica.raft_feeds():
        await adapter.wait_changed()
    return replica


class Woken:
    """Follows a replica as a reader would; records ``(applied index, returned
    index)`` at each wake-up."""

    def __init__(self, replica: Replica, tables: Collection[Table] = (), *,
                 applied: bool = False, view: bool = False) -> None:
        self.replica = replica
        self.kw: dict[str, Any] = {"applied": applied, "view": view}
        self.tables = tables
        self.at: list[tuple[int, int]] = []

    async def run(self) -> None:
        while True:
            since = await self.replica.wait_changed(self.tables, **self.kw)
            self.at.append((self.replica.state.applied_index, since))


async def start_followers(nursery: trio.Nursery, *followers: Woken) -> None:
    for f in followers:
        nursery.start_soon(f.run)
    await trio.testing.wait_all_tasks_blocked()


async def test_key_value_writes_wake_no_reader_of_other_tables_an_alloc_change_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        leader = await c.wait_leader()
        follower = next(a for a in c.live() if not a.is_leader)
        replica = await wrap(c, follower.me)
        state = replica.state
        await c.wait_until(lambda: state.applied_index == leader.state.applied_index)
        alloc = Woken(replica, {Table.ALLOC})
        kv = Woken(replica, {Table.KV})
        applied = Woken(replica, applied=True)
        view = Woken(replica, view=True)
        wakes = Wakeup()
        views: list[int] = []
        nursery.start_soon(wake_on_changes, replica, frozenset({Table.ALLOC}), wakes,
                           lambda: views.append(state.applied_index))
        await start_followers(nursery, alloc, kv, applied, view)

        for i in range(5):
            kv_index = (await leader.propose(put(f"k{i}"))).index  # type: ignore[attr-defined]
        await c.wait_until(lambda: state.applied_index == kv_index)
        assert alloc.at == []
        assert view.at == []
        assert views == []
        assert kv.at[-1][0] == kv_index
        assert applied.at[-1][0] == kv_index

        kv_wakes = len(kv.at)
        service_index = (await leader.propose(service_put())).index  # type: ignore[attr-defined]
        await c.wait_until(lambda: state.applied_index == service_index)
        assert alloc.at == []                          # another table
        plan_index = (await leader.propose(alloc_plan())).index  # type: ignore[attr-defined]
        await c.wait_until(lambda: state.applied_index == plan_index)
        await trio.testing.wait_all_tasks_blocked()
        ((woke_at, since),) = alloc.at
        assert woke_at == plan_index
        assert service_index <= since < plan_index      # nothing of ALLOC at or below it
        assert [ch.table for ch in state.changes_since(since)] == [Table.ALLOC]
        assert len(kv.at) == kv_wakes                   # no KV change since the puts
        assert view.at == []
        assert views == [plan_index]                   # its task ran for the table only
        with trio.fail_after(1):                        # the table follower was woken
            await wakes.wait()
        nursery.cancel_scope.cancel()


async def test_a_leader_change_wakes_view_readers_not_table_readers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        old = await c.wait_leader()
        follower = next(a for a in c.live() if not a.is_leader)
        replica = await wrap(c, follower.me)
        tables = Woken(replica, {Table.ALLOC, Table.KV})
        view = Woken(replica, view=True)
        leaders: list[NodeId | None] = []
        wakes = Wakeup()
        nursery.start_soon(wake_on_changes, replica, frozenset({Table.ALLOC}), wakes,
                           lambda: leaders.append(replica.leader))
        await start_followers(nursery, tables, view)
        assert replica.leader == old.me

        c.crash(old.me)
        new = await c.wait_leader()
        await c.wait_until(lambda: replica.state.applied_index == new.state.applied_index)
        await trio.testing.wait_all_tasks_blocked()
        assert new.me != old.me
        assert view.at                                 # woken by the election
        assert leaders[-1] == new.me == replica.leader
        assert tables.at == []                         # the new term's empty entry is no table's
        nursery.cancel_scope.cancel()


async def test_a_snapshot_restore_wakes_the_readers_of_every_table(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = dataclasses.replace(CONFIG, snapshot_entries=8, snapshot_keep_entries=0)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], config=config)
        await c.start()
        leader = await c.wait_leader()
        behind = next(a for a in c.live() if not a.is_leader)
        replica = await wrap(c, behind.me)
        alloc, deny = Woken(replica, {Table.ALLOC}), Woken(replica, {Table.DENY})
        await start_followers(nursery, alloc, deny)

        await c.isolate(behind.me)
        for i in range(20):                            # key-value writes only
            await leader.propose(put(f"k{i}"))
        was = behind.state.applied_index
        assert c.storages[leader.me].first_index() > was + 1  # it needs a snapshot
        snapshot = c.storages[leader.me].snapshot().meta.index
        c.heal(behind.me)
        await c.wait_until(lambda: behind.statistics().snapshots_restored == 1)
        await trio.testing.wait_all_tasks_blocked()
        ((woke_at, since), *_) = alloc.at
        assert woke_at >= snapshot
        assert since == was
        assert deny.at[0] == alloc.at[0]
        nursery.cancel_scope.cancel()


class CountingRevoked:
    def __init__(self) -> None:
        self.calls: list[set[int]] = []

    async def add(self, serials: Iterable[int]) -> int:
        await trio.lowlevel.checkpoint()
        self.calls.append(set(serials))
        return 0


async def test_the_deny_list_follower_wakes_at_deny_list_changes_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    revoked = CountingRevoked()
    async with solo(tmp_path, trust=SimpleNamespace(revoked=revoked)) as replica:
        await trio.testing.wait_all_tasks_blocked()
        assert revoked.calls == [set()]                # at start
        for i in range(10):
            await replica.raft.propose(KvPut(f"k{i}", b"v").encode())
        await trio.testing.wait_all_tasks_blocked()
        assert revoked.calls == [set()]
        await replica.deny(["0a"], ME, "lost laptop")
        await trio.testing.wait_all_tasks_blocked()
        assert revoked.calls == [set(), {0x0A}]


class NoMembers:
    def subscribe(self) -> trio.MemoryReceiveChannel[Any]:
        self.send, recv = trio.open_memory_channel[Any](1)
        return recv


async def test_event_feed_logs_a_service_change_after_more_key_value_writes_than_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path, max_events=10) as replica:
        feed = EventFeed(SimpleNamespace(replica=replica, adapter=NoMembers()),  # type: ignore[arg-type]
                         trio.current_time)
        async with trio.open_nursery() as nursery:
            await nursery.start(feed.run)
            await trio.testing.wait_all_tasks_blocked()
            seq = feed.log.last_seq
            for i in range(30):  # three times the change list: the feed sleeps through
                await replica.raft.propose(KvPut(f"k{i}", b"v").encode())
            await trio.testing.wait_all_tasks_blocked()
            assert feed.log.last_seq == seq
            await replica.raft.propose(service_put())
            await trio.testing.wait_all_tasks_blocked()
            assert [(e.kind, e.subject, e.action) for e in feed.log.since(seq)] == [
                ("service", WEB, "created")]
            nursery.cancel_scope.cancel()
