"""The trio Raft adapter over in-memory streams, on trio's autojump clock.

Every test runs real cores, the real ready loop and real per-peer senders over
``MemoryNetwork`` streams; times are virtual and asserted exactly or within
stated bounds (no wall clock, no settling sleeps).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

from mesh import wire
from mesh.errors import NotLeader, ProposalDropped, RemoteProtocolError, StorageError
from mesh.gossip.adapter import MemoryNetwork, MemoryTransport
from mesh.node.metrics import render
from mesh.node.replica import Replica, ReplicaSettings
from mesh.raft.adapter import RaftAdapter
from mesh.raft.config import RaftConfig
from mesh.raft.messages import Heartbeat
from mesh.raft.state import KvBatcher, KvPut, MeshState, Result
from mesh.raft.storage import FileStorage, MemoryStorage, bootstrap
from mesh.raft.voters import Candidate
from mesh.raft.watch import StateGate, WatchBuffer, WatchConfig
from mesh.types import Addr, NodeId

CONFIG = RaftConfig.lan()  # 50 ms ticks, elections after 10-19 ticks
TICK_S = CONFIG.tick_interval_s
ELECTION_S = CONFIG.election_ticks * TICK_S  # 0.5 s
EPS = 1e-9


def ids(*names: str) -> list[NodeId]:
    return [NodeId(n) for n in names]


def put(key: str, value: bytes = b"v", **kw: object) -> bytes:
    return KvPut(key, value, **kw).encode()  # type: ignore[arg-type]


# ------------------------------------------------------------------ harness


class _LinkStream(trio.abc.Stream):
    """A client stream the cluster can break (a partition) or stall."""

    def __init__(self, inner: trio.abc.Stream, stall: bool) -> None:
        self.inner = inner
        self.stall = stall

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stall:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _LinkDialer:
    def __init__(self, cluster: Cluster, src: NodeId, ep: MemoryTransport) -> None:
        self._cluster = cluster
        self._src = src
        self._ep = ep

    async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
        dst = self._cluster.node_at(to)
        if expect != dst:  # as TlsDialer: the certificate must name the node dialled
            await trio.lowlevel.checkpoint()
            raise RemoteProtocolError(f"{to} is {dst}, expected {expect}")
        if self._cluster.blocked(self._src, dst):
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{to} unreachable")
        if dst in self._cluster.refused:
            await trio.lowlevel.checkpoint()
            raise RemoteProtocolError(f"{to} presents a revoked certificate")
        stream = _LinkStream(await self._ep.open_stream(to), stall=dst in self._cluster.stalled)
        self._cluster.links.append((self._src, dst, stream))
        return stream


class Cluster:
    """N adapters on one MemoryNetwork; crash/restart/isolate nodes."""

    def __init__(
        self,
        nursery: trio.Nursery,
        names: Iterable[str],
        *,
        voters: Iterable[str] | None = None,
        config: RaftConfig = CONFIG,
        seed: int = 1,
        batching: bool = False,
    ) -> None:
        self.nursery = nursery
        self.batching = batching
        """Give each adapter a KvBatcher (key-value writes share entries)."""
        self.net = MemoryNetwork(nursery)
        self.config = config
        self.names = ids(*names)
        self.addrs = {n: Addr(f"10.0.0.{i + 1}", 7947) for i, n in enumerate(self.names)}
        self._by_addr = {a: n for n, a in self.addrs.items()}
        initial = sorted(ids(*voters) if voters is not None else self.names)
        self.storages: dict[NodeId, MemoryStorage] = {}
        for n in self.names:
            self.storages[n] = MemoryStorage()
            if n in initial:
                bootstrap(self.storages[n], initial)
        self.endpoints = {n: self.net.endpoint(self.addrs[n]) for n in self.names}
        for n, ep in self.endpoints.items():
            ep.stream_handler = functools.partial(self._serve, n)
        self.adapters: dict[NodeId, RaftAdapter] = {}
        self.scopes: dict[NodeId, trio.CancelScope] = {}
        self.isolated: set[NodeId] = set()
        self.stalled: set[NodeId] = set()
        self.refused: set[NodeId] = set()
        """Links *to* these nodes are refused (TLS: revoked, another CA)."""
        self.links: list[tuple[NodeId, NodeId, _LinkStream]] = []
        self.rng = random.Random(seed)

    def node_at(self, addr: Addr) -> NodeId:
        return self._by_addr[addr]

    def blocked(self, src: NodeId, dst: NodeId) -> bool:
        return bool({src, dst} & self.isolated) or dst not in self.adapters

    async def _serve(self, n: NodeId, stream: trio.abc.Stream, src: Addr) -> None:
        adapter = self.adapters.get(n)
        if adapter is None:
            await trio.aclose_forcefully(stream)
            return
        await adapter.serve_stream(stream)

    async def start(self, *names: NodeId) -> None:
        for n in names or self.names:
            state = MeshState()
            adapter = RaftAdapter.create(
                self.config,
                n,
                self.storages[n],
                state,
                _LinkDialer(self, n, self.endpoints[n]),
                self.addrs.get,
                rng=random.Random(self.rng.getrandbits(64)),
                storage_in_thread=False,
                batcher=KvBatcher(state) if self.batching else None,
            )
            self.adapters[n] = adapter
            self.scopes[n] = await self.nursery.start(self._run, adapter)

    async def _run(
        self,
        adapter: RaftAdapter,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(adapter.run)
                task_status.started(scope)

    def crash(self, n: NodeId) -> None:
        """Stop n's adapter (memory lost, storage kept)."""
        self.scopes.pop(n).cancel()
        del self.adapters[n]

    async def isolate(self, n: NodeId) -> None:
        """Cut every link of n, both ways."""
        self.isolated.add(n)
        for src, dst, stream in list(self.links):
            if n in (src, dst):
                await trio.aclose_forcefully(stream)

    def heal(self, n: NodeId) -> None:
        self.isolated.discard(n)

    def live(self) -> list[RaftAdapter]:
        return [self.adapters[n] for n in sorted(self.adapters)]

    async def wait_until(self, pred: Callable[[], bool]) -> None:
        """Wait (on Ready handling, not on time) until ``pred()`` holds."""
        while not pred():
            async with trio.open_nursery() as nursery:
                for a in self.live():
                    nursery.start_soon(_cancel_after_change, a, nursery.cancel_scope)

    async def wait_leader(self, among: Iterable[NodeId] | None = None) -> RaftAdapter:
        group = list(among) if among is not None else None

        def agreed() -> bool:
            live = [a for a in self.live() if group is None or a.me in group]
            leaders = [a for a in live if a.is_leader]
            return len(leaders) == 1 and all(a.leader == leaders[0].me for a in live)

        await self.wait_until(agreed)
        return next(a for a in self.live() if a.is_leader)


async def _cancel_after_change(a: RaftAdapter, scope: trio.CancelScope) -> None:
    await a.wait_changed()
    scope.cancel()


# ------------------------------------------------------------------ tests


async def test_three_nodes_elect_one_leader_within_two_election_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        leader = await c.wait_leader()
        t = trio.current_time()
        # Randomized timeouts are 10..19 ticks and the network has no latency:
        # the first node to time out wins at once (PreVote + vote in one instant).
        assert ELECTION_S - EPS <= t <= 2 * ELECTION_S - TICK_S + EPS
        assert leader.core.term == 2
        assert {a.leader for a in c.live()} == {leader.me}
        nursery.cancel_scope.cancel()


async def test_propose_applies_on_every_node_in_zero_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        leader = await c.wait_leader()
        t0 = trio.current_time()
        result = await leader.propose(put("app/color", b"blue"))
        assert isinstance(result, Result)
        assert result.ok
        # No timer is involved: persist, send, ack, commit and apply all
        # happen at the same virtual instant.
        assert trio.current_time() == t0
        for a in c.live():
            await a.wait_applied(result.index)
            state = a.state
            assert isinstance(state, MeshState)
            entry = state.get("app/color")
            assert entry is not None
            assert entry.value == b"blue"
            assert entry.mod_index == result.index
        assert trio.current_time() == t0
        follower = next(a for a in c.live() if not a.is_leader)
        with pytest.raises(NotLeader) as info:
            await follower.propose(put("x"))
        assert info.value.leader_hint == leader.me
        nursery.cancel_scope.cancel()


async def test_concurrent_proposals_share_saves(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        leader = await c.wait_leader()
        saves0 = leader.statistics().saves
        results: list[object] = []

        async def one(i: int) -> None:
            results.append(await leader.propose(put(f"k{i:03d}")))

        async with trio.open_nursery() as clients:
            for i in range(100):
                clients.start_soon(one, i)
        assert len(results) == 100
        assert all(isinstance(r, Result) and r.ok for r in results)
        # 100 proposals: one save for the batch of entries, one for the commit.
        assert leader.statistics().saves - saves0 <= 3
        nursery.cancel_scope.cancel()


async def test_leader_crash_new_leader_and_writes_resume(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        old = await c.wait_leader()
        before = await old.propose(put("before", b"1"))
        assert isinstance(before, Result)
        assert before.ok
        t_crash = trio.current_time()
        c.crash(old.me)
        new = await c.wait_leader()
        failover = trio.current_time() - t_crash
        assert new.me != old.me
        # Followers time out 10..19 ticks after the last heartbeat (at most one
        # tick before the crash), then win PreVote and vote at once.
        assert ELECTION_S - TICK_S - EPS <= failover <= 2 * ELECTION_S + EPS
        t_elected = trio.current_time()
        after = await new.propose(put("after", b"2"))
        assert isinstance(after, Result)
        assert after.ok
        assert trio.current_time() == t_elected  # writes resume at once
        assert new.statistics().send_failures >= 1  # the dead leader is unreachable

        # The old leader comes back from its storage and catches up.
        await c.start(old.me)
        back = c.adapters[old.me]
        await back.wait_applied(after.index)
        states = [a.state for a in c.live()]
        assert all(isinstance(s, MeshState) for s in states)
        digests = {s.digest() for s in states if isinstance(s, MeshState)}
        assert len(digests) == 1
        assert back.leader == new.me
        nursery.cancel_scope.cancel()


async def test_isolated_leader_drops_proposal_and_retry_applies_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        old = await c.wait_leader()
        await c.isolate(old.me)
        t0 = trio.current_time()
        cmd = put("job", b"once", request_id=b"req-1")
        with pytest.raises(ProposalDropped, match="lost the leadership"):
            await old.propose(cmd)
        # CheckQuorum: the leader steps down after one election timeout
        # (10 ticks) without hearing from a quorum, at most two such periods.
        assert trio.current_time() - t0 <= 2 * ELECTION_S + EPS
        others = [n for n in c.names if n != old.me]
        new = await c.wait_leader(among=others)
        first = await new.propose(cmd)
        assert isinstance(first, Result)
        assert first.ok
        assert not first.duplicate
        again = await new.propose(cmd)  # the client's retry of the same request
        assert isinstance(again, Result)
        assert again.duplicate
        assert again.index == first.index
        c.heal(old.me)
        await old.wait_applied(first.index)
        state = old.state
        assert isinstance(state, MeshState)
        entry = state.get("job")
        assert entry is not None
        assert entry.mod_index == first.index
        nursery.cancel_scope.cancel()


async def test_read_index_on_follower_sees_the_latest_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        leader = await c.wait_leader()
        result = await leader.propose(put("k", b"fresh"))
        assert isinstance(result, Result)
        follower = next(a for a in c.live() if not a.is_leader)
        t0 = trio.current_time()
        index = await follower.read_index()
        assert index >= result.index
        assert follower.state.applied_index >= index
        state = follower.state
        assert isinstance(state, MeshState)
        got = state.get("k")
        assert got is not None
        assert got.value == b"fresh"
        # The leader confirms with the next heartbeat round, sent at once.
        assert trio.current_time() == t0
        assert await leader.read_index() >= result.index
        nursery.cancel_scope.cancel()


async def test_dials_name_the_peer_they_expect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dialled: list[tuple[Addr, NodeId | None]] = []

    class RecordingDialer:
        async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
            dialled.append((to, expect))
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError(errno.ECONNREFUSED, "nobody there")

    addrs = {NodeId("n2"): Addr("10.0.0.2", 7947), NodeId("n3"): Addr("10.0.0.3", 7947)}
    storage = MemoryStorage()
    bootstrap(storage, ids("n1", "n2", "n3"))
    adapter = RaftAdapter.create(
        CONFIG, NodeId("n1"), storage, MeshState(), RecordingDialer(), addrs.get,
        rng=random.Random(7), storage_in_thread=False,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        await trio.sleep(5 * CONFIG.election_ticks * CONFIG.tick_interval_s)  # it campaigns
        nursery.cancel_scope.cancel()
    assert dialled
    assert {(to, expect) for to, expect in dialled} == {(a, n) for n, a in addrs.items()}


async def test_malformed_frames_are_dropped_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class NoDialer:
        async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError(errno.ECONNREFUSED, "nobody there")

    storage = MemoryStorage()
    bootstrap(storage, ids("n1", "n2", "n3"))
    adapter = RaftAdapter.create(
        CONFIG,
        NodeId("n1"),
        storage,
        MeshState(),
        NoDialer(),
        lambda n: Addr("10.0.0.9", 7947),
        rng=random.Random(7),
        storage_in_thread=False,
    )
    n1, n2, n9 = ids("n1", "n2", "n9")
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(adapter.serve_stream, server, None)
        junk = [
            b"\x01\x00\x34\xc1",  # 0xc1 is never valid msgpack
            wire.encode(1, [1, 2, 3]),  # a gossip tag
            b"\x02\x00\x34\x90",  # another major version
            wire.encode(52, ["n2", "n1"]),  # a heartbeat with too few fields
            Heartbeat(n2, n9, 5, 0).to_wire(),  # not for this node
            Heartbeat(n2, n1, 5, 0).to_wire(),  # valid
        ]
        await client.send_all(b"".join(wire.frame(j) for j in junk))
        await trio.testing.wait_all_tasks_blocked()
        stats = adapter.statistics()
        assert (stats.frames_malformed, stats.frames_misrouted, stats.frames_in) == (4, 1, 1)
        assert adapter.core.term == 5
        assert adapter.leader == n2

        # A peer authenticated as n9 may not speak for n2.
        c2, s2 = trio.testing.memory_stream_pair()
        nursery.start_soon(adapter.serve_stream, s2, n9)
        await c2.send_all(wire.frame(Heartbeat(n2, n1, 5, 0).to_wire()))
        await trio.testing.wait_all_tasks_blocked()
        assert adapter.statistics().frames_misrouted == 2

        # An oversized length prefix makes the stream unusable: it is closed.
        await client.send_all(b"\xff\xff\xff\xff")
        assert await client.receive_some() == b""
        assert adapter.statistics().frames_malformed == 5

        # The adapter is unharmed: a new stream still feeds the core.
        c3, s3 = trio.testing.memory_stream_pair()
        nursery.start_soon(adapter.serve_stream, s3, None)
        await c3.send_all(wire.frame(Heartbeat(n2, n1, 6, 0).to_wire()))
        await trio.testing.wait_all_tasks_blocked()
        assert adapter.core.term == 6
        nursery.cancel_scope.cancel()


async def test_full_peer_queue_drops_instead_of_blocking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = dataclasses.replace(CONFIG, send_queue_msgs=4, send_timeout_s=60.0)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], config=config)
        c.stalled.add(NodeId("n3"))  # every write to n3 blocks forever
        await c.start()
        leader = await c.wait_leader(among=ids("n1", "n2"))
        assert leader.me != "n3"  # n3 never hears an answer, so it cannot win
        await trio.sleep(1.0)  # 20 heartbeat ticks toward a 4-slot queue
        assert leader.statistics().queue_drops >= 10
        t0 = trio.current_time()
        for i in range(20):
            result = await leader.propose(put(f"k{i}"))
            assert isinstance(result, Result)
            assert result.ok
        # The ready loop never waited on n3: 20 commits at one virtual instant.
        assert trio.current_time() == t0
        nursery.cancel_scope.cancel()


async def test_a_write_blocked_for_send_timeout_drops_the_stream_and_redials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = dataclasses.replace(CONFIG, send_timeout_s=2.0)
    n3 = NodeId("n3")
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], config=config)
        c.stalled.add(n3)  # every write to n3 blocks forever
        await c.start()
        leader = await c.wait_leader(among=ids("n1", "n2"))
        t0 = trio.current_time()
        before = leader.statistics()
        await trio.sleep(1.9)  # blocked, but not for send_timeout_s yet
        assert leader.statistics().send_failures == before.send_failures
        # The watchdog runs at every tick: the stuck write is cut within one
        # tick of send_timeout_s...
        await trio.sleep(0.1 + 1.5 * TICK_S)
        assert leader.statistics().send_failures == before.send_failures + 1
        # ...and a heartbeat after the reconnect backoff dials n3 again.
        await trio.sleep(config.reconnect_min_s + 2 * TICK_S)
        assert leader.statistics().dials == before.dials + 1
        assert [d for s_, d, _ in c.links if s_ == leader.me].count(n3) == 2
        assert trio.current_time() - t0 < config.send_timeout_s + 1.0
        nursery.cancel_scope.cancel()


def quiet(stream_idle_timeout_s: float) -> RaftConfig:
    """Nobody campaigns (a huge election timeout): a node only answers what it is sent."""
    return dataclasses.replace(CONFIG, election_ticks=100_000,
                               stream_idle_timeout_s=stream_idle_timeout_s)


def stream_into(nursery: trio.Nursery, adapter: RaftAdapter) -> trio.abc.Stream:
    """The client end of a new inbound stream ``adapter`` serves."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(adapter.serve_stream, server, None)
    return client


async def test_an_idle_peer_stream_closes_and_the_next_message_dials_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n1, n2 = ids("n1", "n2")
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], config=quiet(2.0))
        await c.start(n1, n2)
        a1 = c.adapters[n1]
        client = stream_into(nursery, a1)

        async def heartbeat_from_n2() -> None:
            await client.send_all(wire.frame(Heartbeat(n2, n1, 5, 0).to_wire()))
            await trio.testing.wait_all_tasks_blocked()

        await heartbeat_from_n2()  # n1 answers n2 over a stream it dials
        assert a1.statistics().dials == 1
        await trio.sleep(1.5)
        await heartbeat_from_n2()  # within the idle limit: the same stream
        assert a1.statistics().dials == 1
        await trio.sleep(2.0 + TICK_S)  # idle for the limit: closed at a tick
        await heartbeat_from_n2()
        assert a1.statistics().dials == 2
        assert a1.statistics().send_failures == 0  # closing an idle stream is no failure
        nursery.cancel_scope.cancel()


async def test_an_idle_inbound_stream_closes_between_the_limit_and_a_quarter_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n1, n2 = ids("n1", "n2")
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], config=quiet(4.0))
        await c.start(n1)
        client = stream_into(nursery, c.adapters[n1])
        t0 = trio.current_time()
        for at in (1.0, 2.0, 3.5, 6.0):  # each frame keeps the stream open
            await trio.sleep_until(t0 + at)
            await client.send_all(wire.frame(Heartbeat(n2, n1, 5, 0).to_wire()))
        assert await client.receive_some() == b""  # closed by n1 after the last frame
        idle = trio.current_time() - (t0 + 6.0)
        assert 4.0 <= idle <= 5.0
        nursery.cancel_scope.cancel()


async def test_file_storage_in_a_thread_with_snapshots_survives_restart(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # While a worker thread runs, the autojump clock sees every task blocked
    # and races ahead through the ticks; no timeout may fire meanwhile.
    config = dataclasses.replace(
        CONFIG, snapshot_entries=10, snapshot_keep_entries=3, propose_timeout_s=1e9
    )
    me = NodeId("solo")
    storage = FileStorage(tmp_path, sync=False)
    bootstrap(storage, [me])

    def build(st: FileStorage) -> RaftAdapter:
        class NoPeers:
            async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
                raise AssertionError("a single voter has no peers")

        return RaftAdapter.create(
            config, me, st, MeshState(), NoPeers(), lambda n: None, rng=random.Random(3)
        )

    adapter = build(storage)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.run)
            await adapter.wait_leader()
            async with trio.open_nursery() as clients:
                for i in range(25):
                    clients.start_soon(adapter.propose, put(f"key/{i:02d}", str(i).encode()))
            while adapter.statistics().snapshots_created == 0:
                await adapter.wait_changed()  # the snapshot follows the apply
            assert adapter.statistics().saves < 25  # proposals were batched into shared saves
            applied = adapter.state.applied_index
            digest = adapter.state.digest()  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()
    finally:
        storage.close()
    assert storage.first_index() > 1  # compacted

    reopened = FileStorage(tmp_path, sync=False)
    try:
        again = build(reopened)
        async with trio.open_nursery() as nursery:
            await nursery.start(again.run)
            await again.wait_applied(applied)
            state = again.state
            assert isinstance(state, MeshState)
            assert state.digest() == digest
            assert [e.key for e in state.items("key/")][:3] == ["key/00", "key/01", "key/02"]
            assert len(state) == 25
            nursery.cancel_scope.cancel()
    finally:
        reopened.close()


async def test_dead_voter_is_replaced_through_learner_and_snapshot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = dataclasses.replace(CONFIG, snapshot_entries=8, snapshot_keep_entries=0)
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3", "n4"], voters=["n1", "n2", "n3"], config=config)
        await c.start()
        alive = set(c.names)

        def members() -> list[Candidate]:
            return [Candidate(n) for n in sorted(alive)]

        for a in c.live():
            nursery.start_soon(functools.partial(a.manage_voters, members, interval_s=0.5))
        leader = await c.wait_leader(among=ids("n1", "n2", "n3"))
        for i in range(20):  # enough for snapshots: n4 must catch up from one
            await leader.propose(put(f"k{i}"))
        assert c.storages[leader.me].first_index() > 1  # compacted: n4 needs a snapshot
        victim = next(n for n in ids("n1", "n2", "n3") if n != leader.me)
        t0 = trio.current_time()
        c.crash(victim)
        alive.discard(victim)  # SWIM declared it dead
        want = tuple(sorted(alive))
        await c.wait_until(lambda: tuple(leader.core.status().voters) == want)
        # Three steps (add learner, promote, remove), one per 0.5 s look.
        assert trio.current_time() - t0 <= 3 * 0.5 + EPS
        assert leader.core.status().learners == ()
        n4 = c.adapters[NodeId("n4")]
        assert n4.statistics().snapshots_restored == 1
        await n4.wait_applied(leader.state.applied_index)
        assert n4.state.digest() == leader.state.digest()  # type: ignore[attr-defined]
        # The new group commits without the dead voter.
        result = await leader.propose(put("after"))
        assert isinstance(result, Result)
        assert result.ok
        nursery.cancel_scope.cancel()


async def test_transfer_leadership_and_status(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"])
        await c.start()
        leader = await c.wait_leader()
        await leader.propose(put("k"))  # every follower has acknowledged this
        status = leader.status()
        assert status["leader"] == leader.me
        assert status["voters"] == ["n1", "n2", "n3"]
        assert status["role"] == "leader"
        assert set(status["peers"]) == {n for n in c.names if n != leader.me}
        assert all(p["lag"] == 0 for p in status["peers"].values())
        target = next(n for n in c.names if n != leader.me)
        t0 = trio.current_time()
        assert await leader.transfer_leadership(target) == target
        assert trio.current_time() == t0  # caught up already: TimeoutNow at once
        new = await c.wait_leader()
        assert new.me == target
        assert c.adapters[target].status()["term"] == status["term"] + 1
        nursery.cancel_scope.cancel()


class FlakyStorage(MemoryStorage):
    """A disk that is full until ``fail`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def save(self, *args: object, **kwargs: object) -> None:
        if self.fail:
            raise StorageError("cannot write the raft WAL: No space left on device")
        super().save(*args, **kwargs)  # type: ignore[arg-type]


async def test_full_disk_stops_writes_and_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    me = NodeId("solo")
    storage = FlakyStorage()
    bootstrap(storage, [me])

    class NoPeers:
        async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
            raise AssertionError("a single voter has no peers")

    adapter = RaftAdapter.create(
        CONFIG,
        me,
        storage,
        MeshState(),
        NoPeers(),
        lambda n: None,
        rng=random.Random(5),
        storage_in_thread=False,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        await adapter.wait_leader()
        storage.fail = True
        results: list[object] = []
        done = trio.Event()

        async def first() -> None:
            results.append(await adapter.propose(put("kept", b"1"), timeout_s=60.0))
            done.set()

        nursery.start_soon(first)
        while adapter.status()["storage_error"] is None:
            await adapter.wait_changed()
        with pytest.raises(StorageError, match="writes are stopped"):
            await adapter.propose(put("refused"))
        t0 = trio.current_time()
        await trio.sleep(1.0)
        storage.fail = False
        await done.wait()
        # Retries back off 0.05, 0.1, ... up to storage_retry_max_s.
        assert trio.current_time() - t0 <= 1.0 + 0.8 + EPS
        assert isinstance(results[0], Result)
        assert results[0].ok
        assert adapter.status()["storage_error"] is None
        assert adapter.statistics().storage_errors >= 4
        state = adapter.state
        assert isinstance(state, MeshState)
        assert state.get("kept") is not None
        assert state.get("refused") is None
        nursery.cancel_scope.cancel()


async def test_refused_links_are_a_send_failure_not_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer whose link is refused (a revoked node, say) is unreachable: the others
    keep committing and no adapter dies of it."""
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["a", "b", "c"])
        await c.start()
        leader = await c.wait_leader()
        victim = next(n for n in c.names if n != leader.me)
        c.refused.add(victim)
        for src, dst, stream in list(c.links):
            if victim in (src, dst):
                await trio.aclose_forcefully(stream)
        for i in range(5):
            result = await leader.propose(put(f"k{i}"))
            assert isinstance(result, Result)
            assert result.ok
            # Advance virtual time past the reconnect backoff: senders redial.
            await trio.sleep(10 * ELECTION_S)
        assert leader.statistics().send_failures > 0
        assert all(a.core is not None for a in c.live())
        nursery.cancel_scope.cancel()


async def test_metrics_commit_latency_fsync_apply_lag_and_snapshots(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    me = NodeId("solo")
    storage = FileStorage(tmp_path, sync=False)
    bootstrap(storage, [me])

    class NoPeers:
        async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
            raise AssertionError("a single voter has no peers")

    config = dataclasses.replace(CONFIG, snapshot_entries=4, snapshot_keep_entries=1)
    adapter = RaftAdapter.create(
        config, me, storage, MeshState(), NoPeers(), lambda n: None,
        rng=random.Random(5), storage_in_thread=False,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        await adapter.wait_leader()
        for i in range(6):
            await adapter.propose(put(f"k{i}"))
        status = adapter.status()
        stats = adapter.statistics()
        nursery.cancel_scope.cancel()
    storage.close()
    assert status["commit_latency"]["count"] == 6
    assert status["apply_lag"] == 0
    assert status["leader_changes"] == 1
    assert status["snapshot_bytes"] > 0
    assert status["snapshot_bytes"] == stats.snapshot_bytes
    assert stats.snapshots_created >= 1
    assert stats.wal_sync_latency.count >= 6
    assert status["entries_per_fsync"] >= 1
    gate = StateGate(adapter.state, WatchBuffer(WatchConfig()))  # type: ignore[arg-type]
    replica = Replica(adapter, gate, storage, None, None,  # type: ignore[arg-type]
                      ReplicaSettings(RaftConfig.local()))
    text = render(replica.metrics(), {"node": "solo"})
    assert 'meshd_raft_commits_total{node="solo"} 6' in text
    assert 'meshd_raft_commit_latency_seconds{node="solo",quantile="0.99"}' in text
    assert 'meshd_raft_wal_fsync_seconds{node="solo",quantile="0.5"}' in text
    assert 'meshd_raft_apply_lag{node="solo"} 0' in text
    assert 'meshd_raft_leader_changes_total{node="solo"} 1' in text
    assert "# TYPE meshd_raft_commit_latency_seconds summary" in text
