"""MemoryStorage semantics and FileStorage durability: torn tails, corruption, full disks."""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import StorageError
from mesh.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from mesh.raft.storage import (
    PREALLOCATE_BYTES,
    Compacted,
    FileStorage,
    MemoryStorage,
    SnapshotOutOfDate,
    Unavailable,
    WalFile,
    bootstrap,
)
from mesh.types import NodeId

CS = ConfState.of([NodeId("a"), NodeId("b"), NodeId("c")])


def ents(lo: int, hi: int, term: int = 1, size: int = 3) -> list[Entry]:
    return [Entry(term, i, bytes([i % 256]) * size) for i in range(lo, hi + 1)]


def all_entries(s: MemoryStorage) -> list[Entry]:
    return (
        s.entries(s.first_index(), s.last_index() + 1) if s.last_index() >= s.first_index() else []
    )


# ---------------------------------------------------------------------- memory


def test_memory_storage_reads_and_errors() -> None:
    s = MemoryStorage()
    s.save(HardState(1, NodeId("a"), 0), ents(1, 5), None)
    assert (s.first_index(), s.last_index()) == (1, 5)
    assert s.term(0) == 0
    assert s.term(5) == 1
    with pytest.raises(Unavailable):
        s.term(6)
    assert [e.index for e in s.entries(2, 5)] == [2, 3, 4]
    assert [e.index for e in s.entries(1, 6, max_bytes=7)] == [1, 2]
    assert [e.index for e in s.entries(1, 6, max_bytes=0)] == [1]  # at least one
    s.save(None, ents(3, 4, term=2), None)  # overwrites 3.. and drops 5
    assert s.last_index() == 4
    assert s.term(3) == 2
    s.create_snapshot(3, CS, b"img")
    s.compact(3)
    assert s.first_index() == 4
    assert s.term(3) == 2
    with pytest.raises(Compacted):
        s.term(2)
    with pytest.raises(Compacted):
        s.entries(3, 4)
    with pytest.raises(SnapshotOutOfDate):
        s.create_snapshot(3, CS, b"again")
    with pytest.raises(SnapshotOutOfDate):
        s.save(None, [], Snapshot(SnapshotMeta(2, 1, CS)))
    s.save(None, [], Snapshot(SnapshotMeta(10, 3, CS), b"new"))
    assert (s.first_index(), s.last_index(), s.term(10)) == (11, 10, 3)
    assert s.initial_state()[1] == CS


def test_bootstrap_needs_empty_storage() -> None:
    s = MemoryStorage()
    bootstrap(s, [NodeId("b"), NodeId("a")])
    assert s.last_index() == 2
    assert s.hard_state.commit == 2
    from mesh.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        bootstrap(s, [NodeId("a")])


# ---------------------------------------------------------------------- file


def _wal(path: Path) -> Path:
    return sorted(path.glob("wal-*.log"))[-1]


def test_roundtrip_across_reopen(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.save(HardState(2, NodeId("b"), 3), ents(1, 6), None)
    s.save(None, ents(5, 7, term=2), None)
    s.save(HardState(2, NodeId("b"), 6), [], None, sync=False)
    s.close()
    r = FileStorage(tmp_path)
    assert r.hard_state == HardState(2, NodeId("b"), 6)
    assert all_entries(r) == ents(1, 4) + ents(5, 7, term=2)
    r.close()


def test_torn_tail_is_truncated(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.save(HardState(1, None, 0), ents(1, 3), None)
    s.save(None, ents(4, 6), None)
    s.close()
    wal = _wal(tmp_path)
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        f.truncate(size - 5)  # the last record was half written
    r = FileStorage(tmp_path)
    assert r.last_index() == 3
    r.save(None, ents(4, 5, term=1), None)  # the WAL keeps working after repair
    r.close()
    r2 = FileStorage(tmp_path)
    assert all_entries(r2) == ents(1, 5)
    r2.close()


def test_torn_tail_with_zero_fill_is_truncated(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.save(HardState(1, None, 0), ents(1, 3), None)
    s.close()
    with open(_wal(tmp_path), "ab") as f:
        f.write(b"\0" * 4096)  # the file grew but the data never landed
    r = FileStorage(tmp_path)
    assert r.last_index() == 3
    r.close()


def test_a_crash_leaves_the_preallocated_zeros_and_recovery_cuts_them(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = FileStorage(live)
    s.save(HardState(1, None, 2), ents(1, 3), None)
    s.save(None, ents(4, 6), None)
    wal = _wal(live)
    assert wal.stat().st_size >= PREALLOCATE_BYTES  # records land inside the file
    crashed = tmp_path / "crashed"
    shutil.copytree(live, crashed)  # what the disk holds if meshd dies now
    s.close()
    assert not _wal(live).read_bytes().endswith(b"\0" * 16)  # a clean stop cuts them
    r = FileStorage(crashed)
    assert all_entries(r) == ents(1, 6)
    assert r.hard_state.commit == 2
    assert not _wal(crashed).read_bytes().endswith(b"\0" * 16)
    r.save(None, ents(7, 8), None)  # and writes on after them
    r.close()
    r2 = FileStorage(crashed)
    assert all_entries(r2) == ents(1, 8)
    r2.close()


def test_a_torn_record_before_the_zeros_is_a_torn_tail(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = FileStorage(live)
    s.save(HardState(1, None, 0), ents(1, 3), None)
    s.close()
    end_of_first = _wal(live).stat().st_size
    s = FileStorage(live)
    s.save(None, ents(4, 6), None)
    crashed = tmp_path / "crashed"
    shutil.copytree(live, crashed)
    s.close()
    with open(_wal(crashed), "r+b") as f:  # the last record's end never landed
        f.seek(end_of_first + 14)
        f.write(b"\0" * 20)
    r = FileStorage(crashed)
    assert all_entries(r) == ents(1, 3)
    assert _wal(crashed).stat().st_size == end_of_first
    r.close()


def test_only_the_last_segment_is_preallocated(tmp_path: Path) -> None:
    s = FileStorage(tmp_path, segment_bytes=300)
    for lo in range(1, 60, 3):
        s.save(HardState(1, None, lo - 1), ents(lo, lo + 2), None)
    segments = sorted(tmp_path.glob("wal-*.log"))
    assert len(segments) > 3
    for older in segments[:-1]:  # sealed when the next one started
        assert not older.read_bytes().endswith(b"\0" * 16)
    crashed = tmp_path.parent / (tmp_path.name + "-crashed")
    shutil.copytree(tmp_path, crashed)
    s.close()
    r = FileStorage(crashed)
    assert all_entries(r) == ents(1, 60)
    r.close()


def test_corrupted_middle_is_refused(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.save(HardState(1, None, 0), ents(1, 3), None)
    s.close()  # without the zero-filled tail: the file ends where the next save goes
    mid = _wal(tmp_path).stat().st_size
    s = FileStorage(tmp_path)
    s.save(None, ents(4, 6), None)
    s.save(None, ents(7, 9), None)
    s.close()
    wal = _wal(tmp_path)
    data = bytearray(wal.read_bytes())
    data[mid + 20] ^= 0xFF  # inside the second save's payload
    wal.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="corrupted at offset"):
        FileStorage(tmp_path)
    # A damaged header in the middle is refused too, not mistaken for a tail.
    data[mid + 20] ^= 0xFF
    data[mid + 1] ^= 0xFF
    wal.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="not a torn write"):
        FileStorage(tmp_path)


class _FullDisk:
    """A file that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, real: io.FileIO, budget: list[int]) -> None:
        self._real = real
        self._budget = budget

    def write(self, data: bytes) -> int | None:
        if self._budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self._budget[0])
        self._budget[0] -= n
        return self._real.write(data[:n])  # a short write, then ENOSPC next time

    def flush(self) -> None:
        self._real.flush()

    def fileno(self) -> int:
        return self._real.fileno()

    def truncate(self, size: int | None = None) -> int:
        return self._real.truncate(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._real.seek(offset, whence)

    def close(self) -> None:
        self._real.close()


def test_full_disk_loses_nothing_acknowledged(tmp_path: Path) -> None:
    budget = [10**9]

    def opener(path: str, mode: str) -> WalFile:
        return _FullDisk(io.FileIO(path, mode), budget)

    s = FileStorage(tmp_path, open_file=opener)
    s.save(HardState(1, NodeId("a"), 2), ents(1, 4), None)
    budget[0] = 10  # the disk fills up in the middle of the next record
    with pytest.raises(StorageError, match="disk is full"):
        s.save(HardState(1, NodeId("a"), 4), ents(5, 9), None)
    assert s.last_index() == 4
    assert s.hard_state.commit == 2
    with pytest.raises(StorageError):
        s.create_snapshot(3, CS, b"image")
    budget[0] = 10**9  # space freed: the same storage works again
    s.save(None, ents(5, 6), None)
    s.close()
    r = FileStorage(tmp_path)
    assert all_entries(r) == ents(1, 6)
    assert r.hard_state.commit == 2
    assert not list(tmp_path.glob("*.tmp"))
    r.close()


def test_snapshot_atomicity_and_compaction(tmp_path: Path) -> None:
    s = FileStorage(tmp_path, segment_bytes=200)
    s.save(HardState(1, None, 0), ents(1, 10), None)
    for lo in range(11, 60, 7):
        s.save(HardState(1, None, lo - 1), ents(lo, lo + 6), None)
    segments = len(list(tmp_path.glob("wal-*.log")))
    assert segments > 3
    s.create_snapshot(40, CS, b"state@40")
    s.compact(40)
    assert len(list(tmp_path.glob("wal-*.log"))) < segments
    s.close()
    # A crash while writing the next snapshot leaves a temp file and an
    # unrecorded snapshot file: both are ignored.
    (tmp_path / "snap-00000000000000000050.tmp").write_bytes(b"partial")
    (tmp_path / "snap-00000000000000000050.snap").write_bytes(b"never recorded")
    r = FileStorage(tmp_path)
    assert r.snapshot().meta == SnapshotMeta(40, 1, CS)
    assert r.snapshot().data == b"state@40"
    assert r.first_index() == 41
    assert r.last_index() == 59
    assert [p.name for p in tmp_path.glob("snap-*")] == ["snap-00000000000000000040.snap"]
    r.close()


def test_installed_snapshot_replaces_log_durably(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.save(HardState(1, None, 2), ents(1, 5), None)
    snap = Snapshot(SnapshotMeta(100, 3, CS), b"leader image")
    s.save(HardState(3, None, 100), [], snap)
    s.save(None, ents(101, 102, term=3), None)
    s.close()
    r = FileStorage(tmp_path)
    assert r.snapshot() == snap
    assert (r.first_index(), r.last_index()) == (101, 102)
    assert r.hard_state == HardState(3, None, 100)
    r.close()


def test_missing_recorded_snapshot_is_refused(tmp_path: Path) -> None:
    s = FileStorage(tmp_path)
    s.save(HardState(1, None, 3), ents(1, 3), None)
    s.create_snapshot(3, CS, b"x")
    s.close()
    next(tmp_path.glob("snap-*.snap")).unlink()
    with pytest.raises(StorageError, match="missing"):
        FileStorage(tmp_path)


def test_unusable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="cannot open"):
        FileStorage(blocker / "sub")


def test_storage_is_private_to_its_owner(tmp_path: Path) -> None:
    """Raft members' logs and snapshots hold the cluster's CA key."""
    d = tmp_path / "raft"
    d.mkdir(mode=0o755)  # as an older version left it
    s = FileStorage(d)
    s.save(HardState(1, None, 2), ents(1, 2), None)
    s.create_snapshot(2, CS, b"x")
    s.close()
    assert d.stat().st_mode & 0o777 == 0o700
    files = list(d.iterdir())
    assert {f.suffix for f in files} >= {".log", ".snap"}
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600, f.name


def test_crash_while_creating_segment(tmp_path: Path) -> None:
    s = FileStorage(tmp_path, segment_bytes=100)
    s.save(HardState(1, NodeId("a"), 0), ents(1, 20), None)  # rotates
    s.close()
    last = _wal(tmp_path)
    last.write_bytes(b"")  # the new segment's header never landed
    r = FileStorage(tmp_path)
    assert r.last_index() == 20
    assert r.hard_state.vote == "a"
    r.close()
    r2 = FileStorage(tmp_path)
    assert r2.last_index() == 20
    r2.close()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(1, 30), st.integers(1, 5), st.integers(1, 4)),
        st.tuples(st.just("hs"), st.integers(1, 9), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("snap"), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=40)
@given(ops)
def test_file_storage_matches_memory_model(
    tmp_path_factory: pytest.TempPathFactory, script: list[tuple[str, int, int, int]]
) -> None:
    d = tmp_path_factory.mktemp("wal")
    model = MemoryStorage()
    real = FileStorage(d, sync=False, segment_bytes=256)
    term = 1
    try:
        for op, a, b, c in script:
            if op == "save":
                lo = max(min(a, model.last_index() + 1), model.first_index())
                term = max(term, c)
                batch = [Entry(term, i, b"%d" % i) for i in range(lo, lo + b)]
                model.save(None, batch, None)
                real.save(None, batch, None)
            elif op == "hs":
                hs = HardState(a, NodeId(f"n{b}") if b else None, 0)
                model.save(hs, [], None)
                real.save(hs, [], None, sync=False)
            elif op == "snap" and model.last_index() > model.snapshot().meta.index:
                index = model.last_index()
                model.create_snapshot(index, CS, b"s%d" % index)
                real.create_snapshot(index, CS, b"s%d" % index)
                model.compact(index)
                real.compact(index)
            elif op == "reopen":
                real.close()
                real = FileStorage(d, sync=False, segment_bytes=256)
            assert all_entries(real) == all_entries(model)
            assert real.hard_state == model.hard_state
            assert real.snapshot() == model.snapshot()
    finally:
        real.close()
    for p in d.iterdir():
        os.unlink(p)
