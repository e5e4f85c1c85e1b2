"""Raft wire codec: round trips, validation, and fuzzing with hostile bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import ConfigError, RemoteProtocolError
from mesh.raft.config import RaftConfig
from mesh.raft.messages import (
    MESSAGE_TYPES,
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    RaftMessage,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
    from_wire,
)
from mesh.types import NodeId

ids = st.text(
    alphabet=st.characters(categories=("L", "N"), max_codepoint=0x2FF), min_size=1, max_size=20
).map(NodeId)
u63 = st.integers(0, 2**63 - 1)
small = st.integers(0, 10**6)
blobs = st.binary(max_size=64)


@st.composite
def append_entries(draw: st.DrawFn) -> AppendEntries:
    term = draw(st.integers(1, 1000))
    prev_index = draw(small)
    prev_term = draw(st.integers(0, term))
    n = draw(st.integers(0, 5))
    entries = []
    t = prev_term
    for i in range(n):
        t = draw(st.integers(t, term))
        if draw(st.booleans()):
            cc = ConfChange(draw(st.sampled_from(ConfChangeKind)), draw(ids), draw(blobs))
            entries.append(Entry(t, prev_index + 1 + i, cc.encode(), EntryKind.CONF_CHANGE))
        else:
            entries.append(Entry(t, prev_index + 1 + i, draw(blobs)))
    return AppendEntries(
        draw(ids), draw(ids), term, prev_index, prev_term, draw(u63), tuple(entries)
    )


@st.composite
def install_snapshot(draw: st.DrawFn) -> InstallSnapshot:
    term = draw(st.integers(1, 1000))
    voters = draw(st.lists(ids, max_size=5, unique=True))
    learners = [x for x in draw(st.lists(ids, max_size=3, unique=True)) if x not in voters]
    meta = SnapshotMeta(
        draw(st.integers(1, 10**9)), draw(st.integers(1, term)), ConfState.of(voters, learners)
    )
    data = draw(blobs)
    total = draw(st.integers(len(data), len(data) + 100))
    offset = total - len(data)
    return (
        InstallSnapshot(draw(ids), draw(ids), term, meta, total, offset, data, True)
        if offset + len(data) == total
        else InstallSnapshot(draw(ids), draw(ids), term, meta, total, 0, data, False)
    )


messages = st.one_of(
    append_entries(),
    st.builds(AppendEntriesResponse, ids, ids, u63, u63, st.booleans(), u63, u63),
    st.builds(RequestVote, ids, ids, u63, u63, u63, st.booleans(), st.booleans()),
    st.builds(RequestVoteResponse, ids, ids, u63, st.booleans(), st.booleans()),
    st.builds(Heartbeat, ids, ids, u63, u63, blobs),
    st.builds(HeartbeatResponse, ids, ids, u63, blobs),
    install_snapshot(),
    st.builds(InstallSnapshotResponse, ids, ids, u63, u63, u63, u63, st.booleans()),
    st.builds(TimeoutNow, ids, ids, u63),
    st.builds(ReadIndexRequest, ids, ids, u63, blobs),
    st.builds(ReadIndexResponse, ids, ids, u63, u63, blobs),
)


@given(messages)
def test_roundtrip(msg: RaftMessage) -> None:
    data = msg.to_wire()
    assert 48 <= data[2] <= 79
    assert from_wire(data) == msg
    assert type(msg).from_wire(data) == msg


def test_every_message_type_has_a_unique_tag_in_range() -> None:
    tags = [t.TAG for t in MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)
    assert all(48 <= t <= 79 for t in tags)


@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        from_wire(data)
    except RemoteProtocolError:
        pass


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=30,
)


@given(st.integers(48, 58), st.lists(_values, max_size=9))
def test_fuzz_structured_bodies_only_raise_remote_protocol_error(
    tag: int, body: list[object]
) -> None:
    data = bytes((wire.PROTOCOL_MAJOR, wire.PROTOCOL_MINOR, tag)) + msgpack.packb(body)
    try:
        from_wire(data)
    except RemoteProtocolError:
        pass


@given(messages, st.integers(0, 400), st.integers(0, 255))
def test_fuzz_mutated_valid_messages(msg: RaftMessage, pos: int, byte: int) -> None:
    data = bytearray(msg.to_wire())
    data[pos % len(data)] = byte
    try:
        from_wire(bytes(data))
    except RemoteProtocolError:
        pass
    try:
        from_wire(bytes(data[: pos % len(data)]))
    except RemoteProtocolError:
        pass


def _raw(tag: int, body: list[object]) -> bytes:
    return wire.encode(tag, body)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (["a", "b", 5, 0, 0, 0, [[6, 1, 0, b""]]], "term newer than message"),
        (["a", "b", 5, 0, 0, 0, [[1, 2, 0, b""]]], "not contiguous"),
        (["a", "b", 5, 0, 3, 0, [[2, 1, 0, b""]]], "older than prev term"),
        (["a", "b", 5, 0, 0, 0, [[1, 1, 1, b"junk"]]], "bad conf change"),
        (["a", "b", 5, 0, 0, 0, [[1, 1, 9, b""]]], "unknown kind"),
        (["", "b", 5, 0, 0, 0, []], "empty id"),
        (["a", "b", -1, 0, 0, 0, []], "negative term"),
        (["a", "b", 5, 0, 0, 0, [], "extra"], "extra field"),
        (["a", "b", True, 0, 0, 0, []], "bool as int"),
        (["a\n", "b", 5, 0, 0, 0, []], "unprintable id"),
        (["a" * 256, "b", 5, 0, 0, 0, []], "id too long"),
    ],
)
def test_append_entries_validation(body: list[object], why: str) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(_raw(AppendEntries.TAG, body))


def test_snapshot_chunk_must_fit() -> None:
    meta = [10, 2, [["a"], []]]
    with pytest.raises(RemoteProtocolError):
        from_wire(_raw(InstallSnapshot.TAG, ["a", "b", 3, meta, 4, 2, b"xyz", True]))
    with pytest.raises(RemoteProtocolError):  # done flag lies
        from_wire(_raw(InstallSnapshot.TAG, ["a", "b", 3, meta, 3, 0, b"xyz", False]))
    with pytest.raises(RemoteProtocolError):  # voters and learners overlap
        from_wire(
            _raw(InstallSnapshot.TAG, ["a", "b", 3, [10, 2, [["a"], ["a"]]], 3, 0, b"xyz", True])
        )
    ok = from_wire(_raw(InstallSnapshot.TAG, ["a", "b", 3, meta, 3, 0, b"xyz", True]))
    assert isinstance(ok, InstallSnapshot)
    assert ok.done


def test_unknown_tag_and_wrong_class() -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(_raw(79, ["a", "b", 1]))
    data = TimeoutNow(NodeId("a"), NodeId("b"), 1).to_wire()
    with pytest.raises(RemoteProtocolError):
        AppendEntries.from_wire(data)


def test_config_validation_and_presets() -> None:
    for preset in (RaftConfig.lan(), RaftConfig.local(), RaftConfig.wan()):
        assert preset.election_ticks > preset.heartbeat_ticks
    with pytest.raises(ConfigError, match="election_ticks"):
        RaftConfig(election_ticks=3, heartbeat_ticks=3)
    with pytest.raises(ConfigError):
        RaftConfig(max_inflight_msgs=0)
    with pytest.raises(ConfigError):
        RaftConfig(tick_interval_s=0)
    with pytest.raises(ConfigError):
        RaftConfig(max_uncommitted_bytes=1, max_entry_bytes=2)
