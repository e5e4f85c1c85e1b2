"""``kv_watch``: the API long poll behind ``meshctl kv watch PREFIX``.

The answer itself (:func:`kv_watch_answer`) is a pure function of a
:class:`MeshState`, tested synchronously: paging, byte bounds, deletions,
compaction. The handler runs on a real one-voter :class:`Replica` (real Raft
adapter on a file WAL, fake gossip and trust) on trio's autojump clock: it
answers as soon as a change under the prefix is applied, and at its deadline
otherwise.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mesh.gossip.messages import Status
from mesh.node import api
from mesh.node.replica import (
    KV_WATCH_MAX_BYTES,
    KV_WATCH_MAX_EVENTS,
    KV_WATCH_MAX_WAIT_S,
    Replica,
    ReplicaSettings,
    kv_watch_answer,
)
from mesh.raft.adapter import RaftAdapter
from mesh.raft.config import RaftConfig
from mesh.raft.messages import Entry
from mesh.raft.state import (
    MAX_VALUE_BYTES,
    Command,
    KvDelete,
    KvPut,
    MeshState,
    NodeSet,
    Result,
)
from mesh.raft.storage import FileStorage, bootstrap
from mesh.raft.watch import StateGate, WatchBuffer, WatchConfig
from mesh.types import Addr, NodeId

ME = NodeId("solo")


def apply_all(sm: MeshState, commands: Iterable[Command]) -> None:
    for cmd in commands:
        sm.apply(Entry(2, sm.applied_index + 1, cmd.encode()))


# ------------------------------------------------------------------ the answer (pure)


def test_answer_lists_puts_and_deletions_under_the_prefix_in_index_order() -> None:
    sm = MeshState()
    apply_all(sm, [KvPut("app/a", b"1"),     # 1
                   KvPut("other", b"x"),     # 2
                   KvPut("app/a", b"2"),     # 3
                   KvPut("app/b", b"3"),     # 4
                   KvDelete("app/a"),        # 5
                   KvPut("other", b"y")])    # 6
    answer = kv_watch_answer(sm, 1, "app/")
    assert answer == {"index": 6, "compacted": False, "events": [
        {"index": 3, "op": "put", "key": "app/a", "value": b"2", "create_index": 1,
         "mod_index": 3},
        {"index": 4, "op": "put", "key": "app/b", "value": b"3", "create_index": 4,
         "mod_index": 4},
        {"index": 5, "op": "del", "key": "app/a", "create_index": 0, "mod_index": 5},
    ]}
    assert kv_watch_answer(sm, 6, "app/") == {"index": 6, "events": [], "compacted": False}
    # An index from the future (another replica, ahead) is kept, not moved back.
    assert kv_watch_answer(sm, 9, "app/")["index"] == 9


def test_answer_is_bounded_in_events_and_the_next_one_resumes() -> None:
    sm = MeshState()
    apply_all(sm, [KvPut(f"k/{i:04}", b"v") for i in range(KV_WATCH_MAX_EVENTS + 5)])
    first = kv_watch_answer(sm, 0, "k/")
    assert len(first["events"]) == KV_WATCH_MAX_EVENTS
    assert first["index"] == KV_WATCH_MAX_EVENTS  # the last event's, not the applied index
    rest = kv_watch_answer(sm, first["index"], "k/")
    assert [e["key"] for e in rest["events"]] == [f"k/{i:04}" for i in range(1000, 1005)]
    assert rest["index"] == sm.applied_index


def test_answer_is_bounded_in_bytes() -> None:
    sm = MeshState()
    big = b"x" * MAX_VALUE_BYTES
    count = KV_WATCH_MAX_BYTES // MAX_VALUE_BYTES + 2
    apply_all(sm, [KvPut(f"big/{i}", big) for i in range(count)])
    first = kv_watch_answer(sm, 0, "big/")
    sizes = [len(e["key"]) + len(e["value"]) for e in first["events"]]
    assert 0 < len(sizes) < count
    assert sum(sizes) <= KV_WATCH_MAX_BYTES
    rest = kv_watch_answer(sm, first["index"], "big/")
    assert len(first["events"]) + len(rest["events"]) == count
    assert rest["index"] == sm.applied_index


def test_compacted_answer_lists_the_current_entries_as_puts() -> None:
    sm = MeshState(max_events=3)
    apply_all(sm, [KvPut("app/a", b"1"), KvPut("app/b", b"2"), KvPut("app/c", b"3"),
                   KvDelete("app/b"), KvPut("app/a", b"4"), KvPut("zzz", b"")])  # 1..6
    answer = kv_watch_answer(sm, 1, "app/")
    assert answer["compacted"] is True
    assert answer["index"] == 6
    # app/b's deletion in the gap is not reported: it simply is not listed.
    assert [(e["op"], e["key"], e["value"], e["index"]) for e in answer["events"]] == [
        ("put", "app/a", b"4", 5), ("put", "app/c", b"3", 3)]
    assert kv_watch_answer(sm, answer["index"], "app/")["compacted"] is False


def test_no_kv_change_since_a_compacted_index_is_not_compaction() -> None:
    sm = MeshState(max_events=2)
    apply_all(sm, [KvPut("app/a", b"1"),
                   *(NodeSet.build(NodeId(f"n{i}"), drain=True) for i in range(3))])
    assert sm.first_change_index > 1
    assert kv_watch_answer(sm, 1, "app/") == {"index": 4, "events": [], "compacted": False}


def test_compacted_answer_too_big_to_send_says_what_to_do() -> None:
    sm = MeshState(max_events=1)
    big = b"x" * MAX_VALUE_BYTES
    apply_all(sm, [KvPut(f"big/{i}", big) for i in range(KV_WATCH_MAX_BYTES // len(big) + 1)])
    with pytest.raises(api.ApiError, match="narrower prefix"):
        kv_watch_answer(sm, 0, "big/")


# ------------------------------------------------------------------ the handler


@dataclass(frozen=True)
class _Meta:
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Member:
    node: NodeId
    addr: Addr
    status: Status = Status.ALIVE
    meta: _Meta = _Meta()
    since: float = -100.0


class FakeCore:
    """Gossip as the replica reads it: this node alone, alive."""

    def members(self) -> list[_Member]:
        return [_Member(ME, Addr("10.0.0.1", 7946))]

    def member(self, node: NodeId) -> _Member | None:
        return next((m for m in self.members() if m.node == node), None)


class FakeRevoked:
    async def add(self, serials: Iterable[int]) -> int:
        await trio.lowlevel.checkpoint()
        return 0


class FakeTrust:
    revoked = FakeRevoked()


class NoPeers:
    async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
        raise AssertionError("a single voter has no peers")


@asynccontextmanager
async def solo(tmp_path: Path, max_events: int = 10_000,
               trust: Any = None) -> AsyncIterator[Replica]:
    """A running one-voter replica that leads (``trust``: what it revokes
    certificates in; default a deny set that accepts everything)."""
    storage = FileStorage(tmp_path, sync=False)
    bootstrap(storage, [ME])
    gate = StateGate(MeshState(max_events=max_events), WatchBuffer(WatchConfig()))
    config = RaftConfig.lan()
    adapter = RaftAdapter.create(config, ME, storage, gate, NoPeers(), lambda n: None,
                                 rng=random.Random(3), storage_in_thread=False)
    replica = Replica(adapter, gate, storage, FakeCore(),  # type: ignore[arg-type]
                      FakeTrust() if trust is None else trust,  # type: ignore[arg-type]
                      ReplicaSettings(config))
    try:
        async with trio.open_nursery() as nursery:
            await replica.start(nursery)
            await adapter.wait_leader()
            yield replica
            nursery.cancel_scope.cancel()
    finally:
        await replica.aclose()


async def commit(replica: Replica, command: Command) -> int:
    result = await replica.raft.propose(command.encode())
    assert isinstance(result, Result)
    assert result.ok
    return result.index


async def put(replica: Replica, key: str, value: bytes = b"v") -> int:
    return await commit(replica, KvPut(key, value))


async def delete(replica: Replica, key: str) -> int:
    return await commit(replica, KvDelete(key))


async def test_long_poll_answers_when_a_change_under_the_prefix_is_applied(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path) as replica:
        after = await put(replica, "other/x")
        answers: list[tuple[float, dict[str, Any]]] = []

        async def watch() -> None:
            answer = await replica.kv_watch({"prefix": "app/", "after": after, "wait_s": 10})
            answers.append((trio.current_time(), answer))

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(2)
            await put(replica, "other/y")           # not under the prefix: no answer
            assert answers == []
            await trio.sleep(1)
            index = await put(replica, "app/a", b"1")
            committed = trio.current_time()
        ((at, answer),) = answers
        assert at == committed                      # at once, not at the deadline
        assert start + 3 <= at < start + 10
        assert answer == {"index": index, "compacted": False, "events": [
            {"index": index, "op": "put", "key": "app/a", "value": b"1",
             "create_index": index, "mod_index": index}]}


async def test_long_poll_ends_at_its_deadline_with_the_index_to_resume_from(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path) as replica:
        after = await put(replica, "app/a")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, replica, "other/x")
            answer = await replica.kv_watch({"prefix": "app/", "after": after, "wait_s": 5})
        assert trio.current_time() == start + 5
        assert answer == {"index": replica.state.applied_index, "events": [],
                          "compacted": False}
        assert answer["index"] > after              # other/x was looked at already
        start = trio.current_time()
        await replica.kv_watch({"prefix": "app/", "after": after, "wait_s": 1e9})
        assert trio.current_time() == start + KV_WATCH_MAX_WAIT_S


async def test_resuming_from_the_answer_index_sees_every_change_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path) as replica:
        seen: list[tuple[str, str, int]] = []

        async def watch(after: int, want: int) -> None:
            with trio.fail_after(300):  # virtual seconds: a lost event fails, not hangs
                while len(seen) < want:
                    answer = await replica.kv_watch({"prefix": "app/", "after": after,
                                                     "wait_s": 30})
                    seen.extend((e["op"], e["key"], e["index"]) for e in answer["events"])
                    after = answer["index"]

        first = replica.state.applied_index
        written: list[tuple[str, str, int]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, first, 4)
            for key in ("app/a", "app/b"):
                written.append(("put", key, await put(replica, key)))
                await trio.sleep(0.5)
            written.append(("del", "app/a", await delete(replica, "app/a")))
            await put(replica, "elsewhere")
            written.append(("put", "app/c", await put(replica, "app/c")))
        assert seen == written


async def test_without_after_it_starts_from_now(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path) as replica:
        await put(replica, "app/old")
        now = replica.state.applied_index
        for params in ({"prefix": "app/"}, {"prefix": "app/", "stale": True}):
            answer = await replica.kv_watch(params)     # wait_s 0: at once
            assert answer == {"index": now, "events": [], "compacted": False}

        async def put_later() -> None:
            await trio.sleep(1)  # the watch has its read point by then
            await put(replica, "app/new")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put_later)
            answer = await replica.kv_watch({"prefix": "app/", "wait_s": 10})
        assert [e["key"] for e in answer["events"]] == ["app/new"]


async def test_a_watcher_too_far_behind_gets_the_current_entries(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path, max_events=2) as replica:
        first = await put(replica, "app/a", b"1")
        await put(replica, "app/b", b"2")
        await delete(replica, "app/b")
        await put(replica, "app/c", b"3")
        answer = await replica.kv_watch({"prefix": "app/", "after": first, "wait_s": 10})
        assert answer["compacted"] is True
        assert answer["index"] == replica.state.applied_index
        assert [(e["op"], e["key"], e["value"]) for e in answer["events"]] == [
            ("put", "app/a", b"1"), ("put", "app/c", b"3")]


@pytest.mark.parametrize(("params", "message"), [
    ({"prefix": 3}, "prefix must be text"),
    ({"after": -1}, "after takes a log index"),
    ({"after": True}, "after takes a log index"),
    ({"after": "7"}, "after takes a log index"),
    ({"after": 2**63}, "after takes a log index"),
    ({"wait_s": -1}, "wait_s takes seconds"),
    ({"wait_s": math.nan}, "wait_s takes seconds"),
    ({"wait_s": math.inf}, "wait_s takes seconds"),
    ({"wait_s": "5"}, "wait_s takes seconds"),
])
async def test_bad_params_are_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, params: dict[str, Any],
    message: str,
) -> None:
    async with solo(tmp_path) as replica:
        assert "kv_watch" in replica.handlers()
        with pytest.raises(api.ApiError, match=message):
            await replica.handlers()["kv_watch"](params)


async def test_kv_ls_refuses_a_listing_one_answer_cannot_carry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path) as replica:
        big = b"x" * MAX_VALUE_BYTES
        for i in range(KV_WATCH_MAX_BYTES // len(big) + 1):
            await put(replica, f"big/{i:02d}", big)
        await put(replica, "small/a", b"1")
        with pytest.raises(api.ApiError, match="list a narrower prefix"):
            await replica.kv_ls({"prefix": "big/"})
        listed = await replica.kv_ls({"prefix": "big/0"})  # fewer: fits
        assert [e["key"] for e in listed] == [f"big/0{i}" for i in range(10)]
        assert [e["key"] for e in await replica.kv_ls({"prefix": "small/"})] == ["small/a"]


async def test_an_index_beyond_the_last_commit_is_refused_unless_stale(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with solo(tmp_path) as replica:
        index = await put(replica, "app/a")
        with pytest.raises(api.ApiError, match=f"index {index + 1000} is beyond the last "
                                               f"committed index \\({index}\\)"):
            await replica.kv_watch({"prefix": "app/", "after": index + 1000})
        # --stale cannot know the cluster's commit index: it waits, as it always did.
        answer = await replica.kv_watch({"prefix": "app/", "after": index + 1000,
                                         "stale": True, "wait_s": 1})
        assert answer["events"] == []
        # An index this replica has reached is a normal resume point.
        assert (await replica.kv_watch({"prefix": "app/", "after": index}))["events"] == []
