"""Key-value writes proposed together share one log entry (state.Batch, KvBatcher
and RaftAdapter.propose_nowait with a batch key): the encoding, what applying a
batch means, and the adapter's joining, on trio's autojump clock."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from test_raft_adapter import CONFIG, Cluster, put

from mesh import wire
from mesh.errors import LocalProtocolError, NotLeader, ProposalDropped, RemoteProtocolError
from mesh.raft.adapter import RaftAdapter, _StorageThread
from mesh.raft.messages import Entry, HardState, Snapshot
from mesh.raft.state import (
    MAX_BATCH_BYTES,
    MAX_BATCH_COMMANDS,
    MAX_VALUE_BYTES,
    Batch,
    DenyAdd,
    KvBatcher,
    KvDelete,
    KvPut,
    MeshState,
    Result,
    ResultCode,
    decode_command,
    encode_batch,
)
from mesh.raft.storage import FileStorage, bootstrap
from mesh.types import Addr, NodeId

# ------------------------------------------------------------------ the command


def test_batch_bytes_from_encoded_commands_equal_the_batch_encoding() -> None:
    for n in (1, 2, 15, 16, 300):  # fixarray, array16 headers
        cmds = [KvPut(f"k{i}", b"v" * i, cas=None if i % 2 else 0, request_id=bytes([i % 256]))
                if i % 3 else KvDelete(f"k{i}", request_id=b"d") for i in range(n)]
        batch = Batch(tuple(cmds))
        assert encode_batch([c.encode() for c in cmds]) == batch.encode()
        assert decode_command(batch.encode()) == batch


@pytest.mark.parametrize(
    ("commands", "problem"),
    [
        ([KvPut("a", b"1"), KvPut("a", b"2")], "two commands on one key"),
        ([KvPut("a", b"1"), KvDelete("a")], "two commands on one key"),
        ([], "1 to"),
    ],
)
def test_invalid_batches_are_refused_when_built(commands: list[KvPut | KvDelete],
                                                 problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=problem):
        Batch(tuple(commands))


def test_a_batch_holds_key_value_commands_only_and_no_request_id() -> None:
    deny = DenyAdd("ab12", NodeId("n1"), "lost").encode()
    nested = encode_batch([KvPut("x", b"1").encode()])
    for parts, problem in (([KvPut("a", b"1").encode(), deny], "key-value commands only"),
                           ([KvPut("a", b"1").encode(), nested], "a batch inside a batch")):
        with pytest.raises(RemoteProtocolError, match=problem):
            decode_command(encode_batch(parts))
    with_id = wire.pack_body([1, 96, b"rid", [[1, 1, b"", "a", b"1", None]]])
    with pytest.raises(RemoteProtocolError, match="no request id"):
        decode_command(with_id)
    too_many = [KvPut(f"k{i}", b"").encode() for i in range(MAX_BATCH_COMMANDS + 1)]
    with pytest.raises(RemoteProtocolError, match="1 to"):
        decode_command(encode_batch(too_many))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ([1, True, b"", "a", b"1", None], "not supported"),  # a boolean is not kind 1
        ([True, 1, b"", "a", b"1", None], "format"),
        ([1, 1, b"", "", b"1", None], "key must be"),
        ([1, 1, b"", "a\n", b"1", None], "key must be"),
        ([1, 1, b"", "a", "text", None], "value must be"),
        ([1, 1, b"", "a", b"1", True], "cas must be"),
        ([1, 1, "rid", "a", b"1", None], "request_id must be"),
        ([1, 1, b"", "a", b"1"], "3 fields"),
    ],
)
def test_a_batched_put_is_validated_like_one_of_its_own(raw: list[object],
                                                         problem: str) -> None:
    # The batch's fast path hands a put's fields straight to KvPut: every field
    # is still checked (as decoding the put alone does).
    with pytest.raises(RemoteProtocolError, match=problem):
        decode_command(wire.pack_body(raw))
    batch = wire.pack_body([1, 96, b"", [[1, 1, b"", "ok", b"1", None], raw]])
    with pytest.raises(RemoteProtocolError, match=problem):
        decode_command(batch)


def test_only_a_batch_may_exceed_one_commands_size() -> None:
    # One put's value may not exceed MAX_VALUE_BYTES; a batch of several big
    # ones may be up to MAX_BATCH_BYTES.
    big = KvPut("big", b"x" * MAX_VALUE_BYTES).encode()
    assert decode_command(big) == KvPut("big", b"x" * MAX_VALUE_BYTES)
    two = encode_batch([big, KvPut("big2", b"y" * (MAX_BATCH_BYTES // 3)).encode()])
    assert len(two) > MAX_VALUE_BYTES + 64 * 1024
    assert isinstance(decode_command(two), Batch)
    oversized = wire.pack_body([1, 1, b"", "k", b"x" * (MAX_VALUE_BYTES + 64 * 1024), None])
    with pytest.raises(RemoteProtocolError, match="exceeds limit"):
        decode_command(oversized)


# ------------------------------------------------------------------ applying


def test_each_command_of_a_batch_applies_at_the_batch_index() -> None:
    sm = MeshState()
    assert isinstance(sm.apply(Entry(1, 1, KvPut("a", b"old").encode())), Result)
    batch = Batch((KvPut("a", b"new", cas=1, request_id=b"r1"), KvPut("b", b"1", cas=0),
                   KvDelete("c"), KvPut("d", b"1", cas=5)))
    results = sm.apply(Entry(1, 2, batch.encode()))
    assert isinstance(results, tuple)
    assert [r.code for r in results] == [ResultCode.OK, ResultCode.OK, ResultCode.OK,
                                         ResultCode.CAS_FAILED]
    assert [r.index for r in results] == [2, 2, 2, 2]
    a, b = sm.get("a"), sm.get("b")
    assert a is not None
    assert b is not None
    assert (a.value, a.create_index, a.mod_index) == (b"new", 1, 2)
    assert (b.value, b.create_index, b.mod_index) == (b"1", 2, 2)
    assert sm.get("d") is None
    assert [(c.index, c.key) for c in sm.changes_since(1)] == [(2, "a"), (2, "b")]
    # A retry of r1 in a later batch is recognised as a duplicate.
    again = sm.apply(Entry(1, 3, Batch((KvPut("a", b"new", cas=1, request_id=b"r1"),
                                        KvPut("e", b"1"))).encode()))
    assert isinstance(again, tuple)
    assert again[0].duplicate
    assert again[0].index == 2
    assert again[1].ok
    assert again[1].index == 3


def test_an_invalid_batch_fails_as_a_whole_the_same_everywhere() -> None:
    data = encode_batch([KvPut("a", b"1").encode(), KvPut("a", b"2").encode()])
    for sm in (MeshState(), MeshState()):
        result = sm.apply(Entry(1, 1, data))
        assert isinstance(result, Result)
        assert result.code is ResultCode.INVALID
        assert "two commands on one key" in result.message
        assert sm.get("a") is None


def test_the_batcher_hands_the_leader_its_commands_without_decoding() -> None:
    sm = MeshState()
    cmds: list[KvPut | KvDelete] = [KvPut("a", b"1"), KvDelete("b")]
    parts = [c.encode() for c in cmds]
    for c, data in zip(cmds, parts, strict=True):
        sm.expect(data, c)
    batcher = KvBatcher(sm)
    data = batcher.join(parts)
    assert data == Batch(tuple(cmds)).encode()
    assert batcher.max_bytes + len(encode_batch([b""] * 70_000)) - 70_000 <= MAX_BATCH_BYTES
    expected = sm._expected  # the cache holds the batch now, not its parts
    assert list(expected) == [data]
    results = sm.apply(Entry(1, 1, data))
    assert isinstance(results, tuple)
    assert [r.ok for r in results] == [True, True]
    assert not expected


KEYS = st.sampled_from(["a", "b", "c", "d"])
OPS = st.lists(st.tuples(st.booleans(), KEYS, st.sampled_from([None, 0]), st.binary(max_size=3)),
               max_size=40)


@given(ops=OPS, cut=st.lists(st.integers(0, 40), max_size=8))
def test_batched_writes_end_in_the_state_unbatched_writes_do(
    ops: list[tuple[bool, str, int | None, bytes]], cut: list[int]
) -> None:
    """Split a sequence of puts and deletes into batches the way the adapter does
    (a new batch on a repeated key, or anywhere else): every command's outcome and
    every key's final value are those of one entry per command."""
    cmds = [KvPut(k, v, cas=cas) if is_put else KvDelete(k, cas=cas)
            for is_put, k, cas, v in ops]
    one_by_one = MeshState()
    codes = []
    for i, c in enumerate(cmds, start=1):
        r = one_by_one.apply(Entry(1, i, c.encode()))
        assert isinstance(r, Result)
        codes.append(r.code)
    batched = MeshState()
    batches: list[list[KvPut | KvDelete]] = [[]]
    for i, c in enumerate(cmds):
        if c.key in {b.key for b in batches[-1]} or i in cut:
            batches.append([])
        batches[-1].append(c)
    batched_codes = []
    for i, group in enumerate((g for g in batches if g), start=1):
        data = encode_batch([c.encode() for c in group])
        out = batched.apply(Entry(1, i, data))
        assert isinstance(out, tuple)
        batched_codes += [r.code for r in out]
    assert batched_codes == codes
    assert [(e.key, e.value) for e in batched.items()] == \
        [(e.key, e.value) for e in one_by_one.items()]


# ------------------------------------------------------------------ the adapter


async def test_writes_proposed_together_share_one_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], batching=True)
        await c.start()
        leader = await c.wait_leader()
        last = leader.core.status().last_index
        proposals = [leader.propose_nowait(put(f"k{i:03d}", request_id=os.urandom(8)),
                                           batch_key=f"k{i:03d}") for i in range(100)]
        for p in proposals:
            await p.wait()
        results = [p.outcome() for p in proposals]
        assert all(isinstance(r, Result) and r.ok for r in results)
        assert {r.index for r in results if isinstance(r, Result)} == {last + 1}
        assert leader.core.status().last_index == last + 1
        assert leader.statistics().proposals_committed >= 100
        for a in c.live():
            await a.wait_applied(last + 1)
            assert isinstance(a.state, MeshState)
            entry = a.state.get("k042")
            assert entry is not None
            assert entry.mod_index == last + 1
        nursery.cancel_scope.cancel()


async def test_writes_to_one_key_get_entries_of_their_own_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], batching=True)
        await c.start()
        leader = await c.wait_leader()
        first = leader.propose_nowait(put("a", b"1"), batch_key="a")
        second = leader.propose_nowait(put("a", b"2"), batch_key="a")
        other = leader.propose_nowait(put("b", b"1"), batch_key="b")
        unkeyed = leader.propose_nowait(put("c", b"1"))  # after the batch in progress
        for p in (first, second, other, unkeyed):
            await p.wait()
        r1, r2, r3, r4 = (p.outcome() for p in (first, second, other, unkeyed))
        assert isinstance(r1, Result)
        assert isinstance(r2, Result)
        assert isinstance(r3, Result)
        assert isinstance(r4, Result)
        assert r1.index < r2.index == r3.index < r4.index
        assert isinstance(leader.state, MeshState)
        entry = leader.state.get("a")
        assert entry is not None
        assert entry.value == b"2"
        nursery.cancel_scope.cancel()


async def test_a_follower_refuses_batched_writes_at_once_and_a_crash_drops_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, ["n1", "n2", "n3"], batching=True)
        await c.start()
        leader = await c.wait_leader()
        follower = next(a for a in c.live() if not a.is_leader)
        with pytest.raises(NotLeader) as info:
            follower.propose_nowait(put("x"), batch_key="x")
        assert info.value.leader_hint == leader.me
        waiting = leader.propose_nowait(put("y"), batch_key="y")
        lost0 = leader.statistics().proposals_lost
        c.crash(leader.me)  # before its ready loop proposed the batch
        with pytest.raises(ProposalDropped, match="raft stopped"):
            await waiting.wait()
        assert leader.statistics().proposals_lost == lost0 + 1
        nursery.cancel_scope.cancel()


async def test_writes_waiting_behind_a_stalled_disk_time_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    config = dataclasses.replace(CONFIG, propose_timeout_s=5.0)
    me = NodeId("solo")
    storage = _StallingStorage(tmp_path)
    bootstrap(storage, [me])
    state = MeshState()

    class NoPeers:
        async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
            raise AssertionError("a single voter has no peers")

    adapter = RaftAdapter.create(config, me, storage, state, NoPeers(), lambda n: None,
                                 rng=random.Random(3), batcher=KvBatcher(state))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.run)
            await adapter.wait_leader()
            storage.stall.clear()
            first = adapter.propose_nowait(put("a"), batch_key="a", timeout_s=1e9)
            await trio.to_thread.run_sync(storage.stalled.wait)  # the ready loop is stuck
            behind = adapter.propose_nowait(put("b"), batch_key="b")
            with pytest.raises(ProposalDropped, match="not proposed within the propose timeout"):
                await behind.wait()
            assert trio.current_time() >= behind.deadline
            storage.stall.set()
            result = await first.wait()  # proposed before the stall: it commits
            assert isinstance(result, Result)
            assert result.ok
            assert state.get("b") is None
            nursery.cancel_scope.cancel()
    finally:
        storage.close()


class _StallingStorage(FileStorage):
    """A WAL whose synced saves wait (in the adapter's storage thread) until
    ``stall`` is set."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, sync=False)
        self.stall = threading.Event()
        self.stall.set()
        self.stalled = threading.Event()

    def save(self, hard_state: HardState | None, entries: Sequence[Entry],
             snapshot: Snapshot | None = None, *, sync: bool = True) -> None:
        if sync and not self.stall.is_set():
            self.stalled.set()
            self.stall.wait()
        super().save(hard_state, entries, snapshot, sync=sync)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling classes")
async def test_the_storage_thread_does_not_preempt_the_trio_thread() -> None:
    thread = _StorageThread("raft-storage-test")
    thread.start()
    try:
        policy = await thread.call(lambda: os.sched_getscheduler(0))
    finally:
        thread.stop()
    assert policy == os.SCHED_BATCH
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # only that thread
