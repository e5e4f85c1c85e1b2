"""Durable Raft state: the :class:`RaftStorage` boundary, an in-memory fake and a WAL.

The core only *reads* storage (etcd ``storage.go``); the caller *writes* it
while handling a :class:`~mesh.raft.core.Ready` (``save``) and when it compacts
(``create_snapshot``, ``compact``). ``save`` takes a whole Ready's worth of
state at once so that a file-backed store turns any number of proposals into a
single write and a single fsync.

:class:`FileStorage` layout (one directory)::

    wal-0000000000000001.log   append-only segments, rotated at segment_bytes
    snap-00000000000000001234.snap   the latest snapshot, written atomically

A WAL record is ``u32 length | u32 crc32(payload) | u32 crc32(header) | payload``
(big-endian; the header CRC covers the first 8 bytes so a damaged length is told
apart from a torn write). Payloads are msgpack arrays:

* ``[0, b"meshwal", 1, seq]`` opens every segment;
* ``[1, hard_state|nil, snapshot_marker|nil, [entries]]`` is one ``save``;
  a marker ``[index, term, reset]`` says a snapshot file at that position is
  complete; ``reset`` (an installed snapshot) discards every earlier entry.

Replay applies records in order: an entry at index *i* replaces every entry at
*i* and after, as in etcd's WAL. Recovery truncates a torn tail of the last
segment (an incomplete record, or a damaged last record followed only by zeros
or nothing) and refuses anything damaged *before* valid data with a
:class:`~mesh.errors.StorageError` that names the file and offset.

File I/O here is plain blocking ``os``/file calls; the adapter runs them through
``trio.to_thread``. Errors from the operating system (``ENOSPC``, ``EIO``,
``EACCES``) become ``StorageError`` and leave both the files and the in-memory
view exactly as they were after the last successful call.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError, StorageError
from mesh.raft.messages import (
    EMPTY_HARD_STATE,
    EMPTY_SNAPSHOT,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from mesh.types import NodeId


class Compacted(StorageError):  # noqa: N818 - etcd's name (ErrCompacted)
    """The requested index is older than the first index kept (compacted away).

    Not a failure: the leader answers it by sending a snapshot instead.
    """


class Unavailable(StorageError):  # noqa: N818 - etcd's name (ErrUnavailable)
    """The requested index is past the last index, or no snapshot is ready yet."""


class SnapshotOutOfDate(StorageError):  # noqa: N818 - etcd's name (ErrSnapOutOfDate)
    """A snapshot older than (or as old as) the current one was offered."""


class RaftStorage(Protocol):
    """What a :class:`~mesh.raft.core.RaftCore` needs from durable storage.

    Reads (``initial_state`` .. ``snapshot``) are called by the core; writes by
    the caller. Indexes are Raft log indexes (from 1). Implementations must not
    call back into the core.
    """

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the membership as of the latest snapshot."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``, cut after ``max_bytes`` of payload (always at least one).

        Raises:
            Compacted: ``lo`` is at or before the compaction point.
            Unavailable: ``hi`` is past ``last_index() + 1``.
        """
        ...

    def term(self, index: int) -> int:
        """Term of the entry at ``index`` (also valid at the compaction point).

        Raises:
            Compacted: ``index`` is before the compaction point.
            Unavailable: ``index`` is past ``last_index()``.
        """
        ...

    def first_index(self) -> int:
        """Index of the first entry still available (compaction point + 1)."""
        ...

    def last_index(self) -> int:
        """Index of the last entry (the compaction point if there is none)."""
        ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (``EMPTY_SNAPSHOT`` if none).

        Raises:
            Unavailable: a snapshot is being produced; the core retries later.
        """
        ...

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        *,
        sync: bool = True,
    ) -> None:
        """Persist one Ready: snapshot first, then entries, then hard state.

        Entries replace any existing entries from their first index on. When
        this returns with ``sync=True`` everything is durable; with
        ``sync=False`` (Ready.must_sync false: only the commit index moved) it
        may be lost in a crash, which Raft tolerates.

        Raises:
            StorageError: the write failed; nothing of this call was applied.
        """
        ...

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's image at ``index`` (which it has applied).

        Raises:
            SnapshotOutOfDate: not newer than the current snapshot.
            StorageError: the write failed.
        """
        ...

    def compact(self, index: int) -> None:
        """Discard entries before ``index`` (``index`` <= latest snapshot index).

        Raises:
            Compacted: already compacted past ``index``.
            StorageError: the files could not be removed.
        """
        ...


class MemoryStorage:
    """:class:`RaftStorage` in memory (etcd ``MemoryStorage``); a fake for tests,
    the simulator and benchmarks, and the in-memory half of :class:`FileStorage`."""

    def __init__(self) -> None:
        self._hard_state = EMPTY_HARD_STATE
        self._snapshot = EMPTY_SNAPSHOT
        # Entries after the compaction point; _offset is the index just before
        # _ents[0] and _offset_term its term (answered by term()).
        self._offset = 0
        self._offset_term = 0
        self._ents: list[Entry] = []

    # ------------------------------------------------------------------ reads

    @property
    def hard_state(self) -> HardState:
        """The last hard state saved."""
        return self._hard_state

    def initial_state(self) -> tuple[HardState, ConfState]:
        """See :meth:`RaftStorage.initial_state`."""
        return self._hard_state, self._snapshot.meta.conf_state

    def first_index(self) -> int:
        """See :meth:`RaftStorage.first_index`."""
        return self._offset + 1

    def last_index(self) -> int:
        """See :meth:`RaftStorage.last_index`."""
        return self._offset + len(self._ents)

    def term(self, index: int) -> int:
        """See :meth:`RaftStorage.term`."""
        if index < self._offset:
            raise Compacted(f"index {index} is compacted (first kept {self._offset + 1})")
        if index == self._offset:
            return self._offset_term
        if index > self.last_index():
            raise Unavailable(f"index {index} is past the last index {self.last_index()}")
        return self._ents[index - self._offset - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """See :meth:`RaftStorage.entries`."""
        if lo <= self._offset:
            raise Compacted(f"index {lo} is compacted (first kept {self._offset + 1})")
        if hi > self.last_index() + 1:
            raise Unavailable(f"entries up to {hi - 1} requested, last is {self.last_index()}")
        out = self._ents[lo - self._offset - 1 : hi - self._offset - 1]
        return limit_size(out, max_bytes)

    def snapshot(self) -> Snapshot:
        """See :meth:`RaftStorage.snapshot`."""
        return self._snapshot

    # ------------------------------------------------------------------ writes

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        *,
        sync: bool = True,
    ) -> None:
        """See :meth:`RaftStorage.save`."""
        self._check_save(entries, snapshot)
        if snapshot is not None:
            self._apply_snapshot(snapshot)
        if entries:
            self._append(entries)
        if hard_state is not None:
            self._hard_state = hard_state

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """See :meth:`RaftStorage.create_snapshot`."""
        snap = self._make_snapshot(index, conf_state, data)
        self._snapshot = snap
        return snap

    def compact(self, index: int) -> None:
        """See :meth:`RaftStorage.compact`."""
        self._check_compact(index)
        self._compact(index)

    # ------------------------------------------------------------------ helpers

    def _check_save(self, entries: Sequence[Entry], snapshot: Snapshot | None) -> None:
        # Validate everything before changing anything, so a refused save is a no-op.
        base_last = self.last_index()
        if snapshot is not None:
            if snapshot.meta.index <= self._snapshot.meta.index:
                raise SnapshotOutOfDate(
                    f"snapshot at {snapshot.meta.index} is not newer than "
                    f"{self._snapshot.meta.index}"
                )
            base_last = snapshot.meta.index
        for prev, cur in zip(entries, entries[1:], strict=False):
            if cur.index != prev.index + 1:
                raise LocalProtocolError("entries to save are not contiguous")
        if entries and entries[0].index > base_last + 1:
            raise LocalProtocolError(
                f"entries start at {entries[0].index}, leaving a gap after {base_last}"
            )

    def _apply_snapshot(self, snap: Snapshot) -> None:
        self._snapshot = snap
        self._offset = snap.meta.index
        self._offset_term = snap.meta.term
        self._ents = []

    def _append(self, entries: Sequence[Entry]) -> None:
        first = self.first_index()
        if entries[-1].index < first:
            return  # entirely compacted: already covered by the snapshot
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        keep = entries[0].index - self._offset - 1
        del self._ents[keep:]
        self._ents.extend(entries)

    def _make_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        if index <= self._snapshot.meta.index:
            raise SnapshotOutOfDate(
                f"snapshot at {index} is not newer than {self._snapshot.meta.index}"
            )
        if index > self.last_index():
            raise LocalProtocolError(f"snapshot at {index} is past the last index")
        return Snapshot(SnapshotMeta(index, self.term(index), conf_state), bytes(data))

    def _check_compact(self, index: int) -> None:
        if index <= self._offset:
            raise Compacted(f"already compacted to {self._offset}")
        if index > self._snapshot.meta.index:
            raise LocalProtocolError(
                f"compact({index}) is past the latest snapshot at {self._snapshot.meta.index}; "
                "create a snapshot first"
            )

    def _compact(self, index: int) -> None:
        term = self.term(index)
        del self._ents[: index - self._offset]
        self._offset = index
        self._offset_term = term


def limit_size(entries: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix of ``entries`` within ``max_bytes`` of payload, at least one."""
    if max_bytes is None or not entries:
        return entries
    total = entries[0].size
    for i in range(1, len(entries)):
        total += entries[i].size
        if total > max_bytes:
            return entries[:i]
    return entries


def bootstrap(storage: RaftStorage, voters: Sequence[NodeId]) -> None:
    """Write the first configuration into an empty storage (etcd ``Bootstrap``).

    Every initial member runs this with the same sorted ``voters``: entries
    1..n are ``ADD_VOTER`` changes in term 1, already committed. A node that
    joins later starts from empty storage instead and learns everything from
    the leader.

    Raises:
        LocalProtocolError: the storage is not empty or ``voters`` is empty.
    """
    hard_state, _ = storage.initial_state()
    if storage.last_index() != 0 or hard_state != EMPTY_HARD_STATE:
        raise LocalProtocolError("bootstrap needs empty storage; this node already has state")
    if not voters:
        raise LocalProtocolError("bootstrap needs at least one voter")
    ordered = sorted(set(voters))
    entries = [
        Entry(1, i, ConfChange(ConfChangeKind.ADD_VOTER, v).encode(), EntryKind.CONF_CHANGE)
        for i, v in enumerate(ordered, start=1)
    ]
    storage.save(HardState(term=1, vote=None, commit=len(entries)), entries, None)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :func:`force_new_configuration` did (or would do).

    Attributes:
        node: the node that becomes the only voter.
        voters: the voters before.
        learners: the learners before.
        last_index: the last entry of this node's log before recovery.
        commit_before: this node's commit index before recovery.
        term: the new term.
        new_last_index: the last entry after the configuration entries.
    """

    node: NodeId
    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...]
    last_index: int
    commit_before: int
    term: int
    new_last_index: int

    @property
    def uncommitted(self) -> int:
        """Entries that were in this node's log but not known committed, and that
        recovery commits (they may never have been acknowledged to anyone)."""
        return self.last_index - self.commit_before


def force_new_configuration(storage: RaftStorage, node: NodeId, *, apply: bool) -> Recovery:
    """Make ``node`` the only voter of its group, from what its storage holds
    (etcd's ``--force-new-cluster``): the way back when a majority of voters is lost
    for good.

    Every entry in this node's log is treated as committed, then configuration
    entries remove every other member, in a new term, committed at once. Writes
    the lost voters committed beyond this node's log are lost; entries here that
    were never committed become committed. The other members must not come back
    with their old data (their old configuration could elect a leader of its own):
    wipe their data dirs and let them join again.

    Args:
        storage: the node's storage (the daemon must not be running).
        node: this node's id.
        apply: write the change (``False``: only say what it would do).

    Raises:
        LocalProtocolError: the storage is empty (nothing to recover).
    """
    hard, conf = storage.initial_state()
    last = storage.last_index()
    if last == 0 and not conf.voters:
        raise LocalProtocolError("this data dir holds no Raft state: nothing to recover")
    voters, learners = set(conf.voters), set(conf.learners)
    first = storage.snapshot().meta.index + 1
    for e in storage.entries(first, last + 1) if last >= first else []:
        if e.kind is not EntryKind.CONF_CHANGE:
            continue
        cc = ConfChange.decode(e.data)
        if cc.kind in (ConfChangeKind.ADD_VOTER, ConfChangeKind.PROMOTE):
            learners.discard(cc.node)
            voters.add(cc.node)
        elif cc.kind is ConfChangeKind.ADD_LEARNER:
            learners.add(cc.node)
        else:
            voters.discard(cc.node)
            learners.discard(cc.node)
    term = max(hard.term, storage.term(last) if last else 0) + 1
    changes = [ConfChange(ConfChangeKind.REMOVE, n) for n in sorted((voters | learners) - {node})]
    if node not in voters:
        changes.append(ConfChange(ConfChangeKind.ADD_VOTER, node))
    entries = [Entry(term, last + i, c.encode(), EntryKind.CONF_CHANGE)
               for i, c in enumerate(changes, start=1)]
    new_last = last + len(entries)
    if apply:
        storage.save(HardState(term=term, vote=node, commit=new_last), entries, None)
    return Recovery(node, tuple(sorted(voters)), tuple(sorted(learners)), last,
                    hard.commit, term, new_last)


# ---------------------------------------------------------------------- file storage

_HEADER: Final = struct.Struct(">III")
_REC_OPEN: Final = 0
_REC_SAVE: Final = 1
_WAL_MAGIC: Final = b"meshwal"
_SNAP_MAGIC: Final = b"meshsnap"
_FORMAT_VERSION: Final = 1
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
"""Size at which a WAL segment is closed and the next one started."""
PREALLOCATE_BYTES: Final = 4 * 1024 * 1024
"""The WAL's segment is zero-filled this far ahead of its last record (and synced
once per fill): a record then lands inside the file, so its ``fdatasync`` writes the
data alone, without a journal commit for a new file size (half the sync time with
three WALs on one disk, as etcd preallocates its segments). Recovery reads the
zeros after the last record as the end of the log."""

MAX_RECORD_BYTES: Final = 1024 * 1024 * 1024
"""Largest WAL record or snapshot file recovery will read (1 GiB)."""


class WalFile(Protocol):
    """The part of a binary file FileStorage uses; tests inject failing ones."""

    def write(self, data: bytes, /) -> int | None: ...
    def flush(self) -> None: ...
    def fileno(self) -> int: ...
    def truncate(self, size: int | None = ..., /) -> int: ...
    def seek(self, offset: int, whence: int = ..., /) -> int: ...
    def close(self) -> None: ...


OpenFile = Callable[[str, str], WalFile]
"""``open_file(path, mode)`` for mode ``"w+b"`` (a new WAL segment), ``"r+b"`` (the
last segment, reopened), ``"ab"`` (a torn tail cut off) or ``"wb"`` (snapshot temp)."""


def _default_open(path: str, mode: str) -> WalFile:
    return io.FileIO(path, mode, opener=_private)


def _private(path: str, flags: int) -> int:
    """Create files readable by their owner only: the log of a Raft member holds the
    cluster's CA key (:mod:`mesh.raft.vault`)."""
    return os.open(path, flags, 0o600)


def _encode_record(payload: bytes) -> bytes:
    length = len(payload)
    head = struct.pack(">II", length, zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    max_index: int = 0
    """Largest entry index written into the segment (0: none)."""


class FileStorage(MemoryStorage):
    """Durable :class:`RaftStorage`: a checksummed, segmented WAL plus snapshot files.

    Reads are served from memory (everything after the compaction point is
    kept there, as etcd keeps a MemoryStorage next to its WAL); writes go to
    disk first and reach memory only once they are durable.

    Args:
        directory: created if missing; must be used by one process at a time.
        sync: fsync the WAL (and snapshots) before a write counts as done.
            Turn off only for tests and benchmarks.
        segment_bytes: WAL segment size before rotation.
        open_file: file opener, replaceable to inject I/O faults in tests.

    Raises:
        StorageError: the directory cannot be used, or its WAL is corrupted
            before its tail (the message names the file and offset).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        sync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        open_file: OpenFile = _default_open,
    ) -> None:
        super().__init__()
        self._dir = Path(directory)
        self._sync = sync
        self._segment_bytes = segment_bytes
        self._open = open_file
        self._segments: list[_Segment] = []
        self._file: WalFile | None = None
        self._size = 0
        """Where the next record goes: the end of the last one."""
        self._allocated = 0
        """The open segment's length on disk (zeros after ``_size``)."""
        self._failed: str | None = None
        self._marker_seq = 0
        """Segment holding the record of the latest snapshot (0: none yet)."""
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)  # private also where an older version made it 0755
            self._recover()
        except OSError as exc:
            raise StorageError(f"cannot open raft storage in {self._dir}: {exc}") from exc

    @property
    def directory(self) -> Path:
        """Where the files live."""
        return self._dir

    def close(self) -> None:
        """Close the open WAL segment (idempotent), without its zero-filled tail."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._seal()
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ writes

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
        *,
        sync: bool = True,
    ) -> None:
        """See :meth:`RaftStorage.save`; one WAL record and at most one fsync."""
        self._check_usable()
        self._check_save(entries, snapshot)
        if hard_state is None and not entries and snapshot is None:
            return
        marker = None
        if snapshot is not None:
            self._write_snapshot_file(snapshot)
            marker = [snapshot.meta.index, snapshot.meta.term, True]
        self._append_record(
            [
                _REC_SAVE,
                _encode_hs(hard_state),
                marker,
                [e.encode() for e in entries],
            ],
            sync=sync or snapshot is not None,
            max_index=entries[-1].index if entries else 0,
        )
        super().save(hard_state, entries, snapshot)
        if snapshot is not None:
            self._marker_seq = self._segments[-1].seq
            self._remove_stale_snapshots()
        self._maybe_rotate()

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """See :meth:`RaftStorage.create_snapshot`; the file is written atomically
        and recorded in the WAL before this returns."""
        self._check_usable()
        snap = self._make_snapshot(index, conf_state, data)
        self._write_snapshot_file(snap)
        self._append_record([_REC_SAVE, None, [index, snap.meta.term, False], []], sync=True)
        self._snapshot = snap
        self._marker_seq = self._segments[-1].seq
        self._remove_stale_snapshots()
        return snap

    def compact(self, index: int) -> None:
        """See :meth:`RaftStorage.compact`; also deletes WAL segments wholly
        covered by the latest snapshot."""
        self._check_usable()
        self._check_compact(index)
        self._compact(index)
        snap_index = self._snapshot.meta.index
        # A segment may go once every entry in it is covered by the snapshot and
        # a later segment holds the snapshot's marker; every segment starts with
        # the then-current hard state, so no newer hard state is lost either.
        while (
            len(self._segments) > 1
            and self._segments[0].max_index <= snap_index
            and self._segments[0].seq < self._marker_seq
        ):
            seg = self._segments[0]
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot remove old WAL segment {seg.path}: {exc}") from exc
            self._segments.pop(0)

    # ------------------------------------------------------------------ WAL

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageError(
                f"raft storage in {self._dir} is unusable after an earlier failure "
                f"({self._failed}); restart the node once the disk is fixed"
            )

    def _append_record(self, body: list[Any], *, sync: bool, max_index: int = 0) -> None:
        assert self._file is not None
        record = _encode_record(wire.pack_body(body))
        start = self._size
        try:
            if start + len(record) > self._allocated:
                self._preallocate(start + len(record))
            _write_all(self._file, record)
            if sync and self._sync:
                self._file.flush()
                # fdatasync (as etcd's WAL): the data and what reading it back needs
                # (the file's size), without the timestamps; ~5% less per sync here.
                os.fdatasync(self._file.fileno())
        except OSError as exc:
            self._undo_write(start, exc)
            raise StorageError(_os_error_text("write the raft WAL", self._dir, exc)) from exc
        self._size += len(record)
        if max_index:
            self._segments[-1].max_index = max(self._segments[-1].max_index, max_index)

    def _preallocate(self, needed: int) -> None:
        """Zero-fill the open segment to hold ``needed`` bytes and more (up to
        :data:`PREALLOCATE_BYTES` ahead, within the segment size), synced, and put
        the file position back at the end of the last record."""
        assert self._file is not None
        target = max(needed, min(self._allocated + PREALLOCATE_BYTES, self._segment_bytes))
        self._file.seek(self._allocated)
        _write_all(self._file, bytes(target - self._allocated))
        if self._sync:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._allocated = target
        self._file.seek(self._size)

    def _seal(self) -> None:
        """Cut the open segment's zero-filled tail off (before it is closed for good)."""
        assert self._file is not None
        if self._allocated > self._size:
            self._file.truncate(self._size)
            if self._sync:
                os.fsync(self._file.fileno())
            self._allocated = self._size

    def _undo_write(self, start: int, exc: OSError) -> None:
        # Cut the partial record (and the zeros after it) off so the WAL stays a
        # clean prefix and later saves do not land after garbage; if even that
        # fails, refuse all writes.
        assert self._file is not None
        try:
            self._file.truncate(start)
            self._file.seek(start)
            self._allocated = start
            if self._sync:
                os.fsync(self._file.fileno())
        except OSError as exc2:
            self._failed = f"{exc}; truncating the partial record failed: {exc2}"

    def _maybe_rotate(self) -> None:
        if self._size < self._segment_bytes:
            return
        seq = self._segments[-1].seq + 1
        assert self._file is not None
        try:
            self._seal()  # only the last segment may end in zeros
        except OSError as exc:
            self._failed = f"WAL rotation failed: {exc}"
            raise StorageError(_os_error_text("finish a WAL segment", self._dir, exc)) from exc
        self.close()
        try:
            self._open_segment(seq)
            # Carry the state forward so that older segments can be deleted.
            snap = self._snapshot.meta
            mark = [snap.index, snap.term, False] if snap.index else None
            self._append_record([_REC_SAVE, _encode_hs(self._hard_state), mark, []], sync=True)
            if mark is not None:
                self._marker_seq = seq
        except (OSError, StorageError) as exc:
            self._failed = f"WAL rotation failed: {exc}"
            raise StorageError(f"cannot start a new WAL segment in {self._dir}: {exc}") from exc

    def _open_segment(self, seq: int) -> None:
        path = self._dir / f"wal-{seq:016d}.log"
        self._file = self._open(str(path), "w+b")
        self._size = self._allocated = 0
        self._segments.append(_Segment(seq, path))
        self._append_record([_REC_OPEN, _WAL_MAGIC, _FORMAT_VERSION, seq], sync=True)
        _fsync_dir(self._dir, self._sync)

    # ------------------------------------------------------------------ snapshots

    def _snap_path(self, index: int) -> Path:
        return self._dir / f"snap-{index:020d}.snap"

    def _write_snapshot_file(self, snap: Snapshot) -> None:
        final = self._snap_path(snap.meta.index)
        tmp = final.with_suffix(".tmp")
        payload = wire.pack_body([snap.meta.encode(), snap.data])
        blob = _SNAP_MAGIC + bytes([_FORMAT_VERSION]) + _encode_record(payload)
        f = None
        try:
            f = self._open(str(tmp), "wb")
            _write_all(f, blob)
            f.flush()
            if self._sync:
                os.fsync(f.fileno())
            f.close()
            f = None
            os.replace(tmp, final)
            _fsync_dir(self._dir, self._sync)
        except OSError as exc:
            if f is not None:
                f.close()
            try:
                tmp.unlink()
            except OSError:
                pass  # best effort: recovery deletes stray temp files too
            raise StorageError(_os_error_text("write a raft snapshot", self._dir, exc)) from exc

    def _remove_stale_snapshots(self) -> None:
        keep = self._snap_path(self._snapshot.meta.index).name
        for path in sorted(self._dir.glob("snap-*.snap")):
            if path.name != keep:
                try:
                    path.unlink()
                except OSError as exc:
                    raise StorageError(f"cannot remove old snapshot {path}: {exc}") from exc

    def _read_snapshot_file(self, index: int, term: int) -> Snapshot:
        path = self._snap_path(index)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise StorageError(
                f"raft snapshot {path} is recorded in the WAL but missing; restore the "
                "data directory from a backup or rejoin this node with an empty one"
            ) from None
        head = len(_SNAP_MAGIC) + 1
        if blob[: len(_SNAP_MAGIC)] != _SNAP_MAGIC or len(blob) < head + _HEADER.size:
            raise StorageError(f"raft snapshot {path} is not a meshd snapshot")
        payload, end, problem = _parse_record(blob, head)
        if payload is None or end != len(blob):
            raise StorageError(f"raft snapshot {path} is damaged ({problem or 'trailing bytes'})")
        try:
            meta_raw, data = _as_list(wire.unpack_body(payload, MAX_RECORD_BYTES), 2)
            meta = SnapshotMeta.decode(meta_raw)
        except (RemoteProtocolError, ValueError) as exc:
            raise StorageError(f"raft snapshot {path} is damaged ({exc})") from None
        if (meta.index, meta.term) != (index, term) or not isinstance(data, bytes):
            raise StorageError(f"raft snapshot {path} does not match its WAL record")
        return Snapshot(meta, data)

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        for stray in self._dir.glob("*.tmp"):
            stray.unlink()
        paths = sorted(self._dir.glob("wal-*.log"))
        hard_state = EMPTY_HARD_STATE
        marker: tuple[int, int] | None = None
        ents: list[Entry] = []  # replayed log, contiguous from ents[0].index
        reopen: int | None = None
        for n, path in enumerate(paths):
            last = n == len(paths) - 1
            seq = int(path.stem.split("-")[1])
            seg = _Segment(seq, path)
            records, has_header = self._read_segment(path, seq, last)
            if not has_header:  # crashed while creating the last segment
                path.unlink()
                reopen = seq
                break
            for hs_raw, mark, raw_entries in records:
                if mark is not None:
                    marker = (mark[0], mark[1])
                    self._marker_seq = seq
                    if mark[2]:  # an installed snapshot replaces the whole log
                        ents = []
                try:
                    batch = [Entry.decode(x) for x in raw_entries]
                except RemoteProtocolError as exc:
                    raise StorageError(f"raft WAL {path} has a bad entry: {exc}") from None
                if batch:
                    ents = _replay(ents, batch, path)
                    seg.max_index = max(seg.max_index, batch[-1].index)
                if hs_raw is not None:
                    hard_state = _decode_hs(hs_raw, path)
            self._segments.append(seg)
        snapshot = EMPTY_SNAPSHOT
        if marker is not None:
            snapshot = self._read_snapshot_file(*marker)
        for path in self._dir.glob("snap-*.snap"):
            if marker is None or path != self._snap_path(marker[0]):
                path.unlink()  # written but never recorded: an interrupted save
        snap_index = snapshot.meta.index
        kept = [e for e in ents if e.index > snap_index]
        if kept and kept[0].index != snap_index + 1:
            raise StorageError(
                f"raft WAL in {self._dir} lacks entries {snap_index + 1}..{kept[0].index - 1} "
                "after its snapshot; restore from a backup or rejoin with an empty directory"
            )
        self._snapshot = snapshot
        self._offset = snap_index
        self._offset_term = snapshot.meta.term
        self._ents = kept
        last_index = self.last_index()
        if hard_state.commit > last_index:
            raise StorageError(
                f"raft WAL in {self._dir} says index {hard_state.commit} is committed but "
                f"holds entries only up to {last_index}; the log was truncated or lost"
            )
        self._hard_state = hard_state
        if not self._segments or reopen is not None:
            self._open_segment(reopen if reopen is not None else 1)
            if self._hard_state != EMPTY_HARD_STATE or snap_index:
                snap = snapshot.meta
                mark = [snap.index, snap.term, False] if snap.index else None
                self._append_record([_REC_SAVE, _encode_hs(hard_state), mark, []], sync=True)
                if mark is not None:
                    self._marker_seq = self._segments[-1].seq
            return
        last_seg = self._segments[-1]
        self._file = self._open(str(last_seg.path), "r+b")
        self._size = self._allocated = last_seg.path.stat().st_size
        self._file.seek(self._size)

    def _read_segment(self, path: Path, seq: int, last: bool) -> tuple[list[list[Any]], bool]:
        """Valid save records of one segment, and whether it has its header."""
        blob = path.read_bytes()
        out: list[list[Any]] = []
        pos = 0
        first = True
        while pos < len(blob):
            payload, end, problem = _parse_record(blob, pos)
            body: Any = None
            if payload is not None:
                try:
                    body = wire.unpack_body(payload, MAX_RECORD_BYTES)
                except RemoteProtocolError as exc:
                    problem = f"undecodable record ({exc})"
                    payload = None
            if payload is None:
                # Torn: the record runs past the end, or only zeros follow it (the
                # segment's preallocated tail, see PREALLOCATE_BYTES).
                torn = end >= len(blob) or not any(blob[pos:]) or not any(blob[end:])
                if last and torn:
                    self._truncate_tail(path, pos)
                    break
                raise StorageError(
                    f"raft WAL {path} is corrupted at offset {pos} ({problem}) with valid data "
                    "after it; this is not a torn write. Restore the data directory from a "
                    "backup, or remove it and rejoin this node to the cluster"
                )
            try:
                if first:
                    kind, magic, version, rec_seq = _as_list(body, 4)
                    if (kind, magic, rec_seq) != (_REC_OPEN, _WAL_MAGIC, seq):
                        raise ValueError("bad segment header")
                    if version != _FORMAT_VERSION:
                        raise StorageError(
                            f"raft WAL {path} has format {version}, this meshd reads "
                            f"{_FORMAT_VERSION}; upgrade meshd"
                        )
                else:
                    kind, hs_raw, mark, raw_entries = _as_list(body, 4)
                    if kind != _REC_SAVE or not isinstance(raw_entries, list):
                        raise ValueError("unknown record kind")
                    if mark is not None:
                        m_index, m_term, reset = _as_list(mark, 3)
                        if not (
                            isinstance(m_index, int)
                            and isinstance(m_term, int)
                            and isinstance(reset, bool)
                            and m_index > 0
                        ):
                            raise ValueError("bad snapshot marker")
                    out.append([hs_raw, mark, raw_entries])
            except (ValueError, TypeError) as exc:
                raise StorageError(f"raft WAL {path} has a bad record at {pos}: {exc}") from None
            first = False
            pos = end
        if first and not last:
            raise StorageError(f"raft WAL {path} has no header but is not the last segment")
        return out, not first

    def _truncate_tail(self, path: Path, pos: int) -> None:
        f = self._open(str(path), "ab")
        try:
            f.truncate(pos)
            if self._sync:
                os.fsync(f.fileno())
        finally:
            f.close()


# ---------------------------------------------------------------------- helpers


def _parse_record(blob: bytes, pos: int) -> tuple[bytes | None, int, str]:
    """One record at ``pos``: (payload or None, end offset, problem)."""
    if pos + _HEADER.size > len(blob):
        return None, len(blob), "incomplete header"
    length, crc, head_crc = _HEADER.unpack_from(blob, pos)
    if zlib.crc32(blob[pos : pos + 8]) != head_crc:
        # A damaged header: its length cannot be trusted, so the record is
        # "torn" only if nothing valid could follow (checked by the caller).
        return None, pos + _HEADER.size, "header checksum mismatch"
    end = pos + _HEADER.size + length
    if length > MAX_RECORD_BYTES:
        return None, end, f"record of {length} bytes exceeds {MAX_RECORD_BYTES}"
    if end > len(blob):
        return None, end, "incomplete record"
    payload = blob[pos + _HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None, end, "payload checksum mismatch"
    return payload, end, ""


def _replay(ents: list[Entry], batch: list[Entry], path: Path) -> list[Entry]:
    """Apply one saved batch: it replaces every entry from its first index on."""
    if not ents:
        return batch
    start, first = ents[0].index, batch[0].index
    if first > start + len(ents):
        raise StorageError(f"raft WAL {path} has a gap before index {first}")
    if first <= start:
        return batch
    del ents[first - start :]
    ents.extend(batch)
    return ents


def _as_list(raw: Any, n: int) -> list[Any]:
    if not isinstance(raw, list) or len(raw) != n:
        raise ValueError(f"expected an array of {n}")
    return raw


def _encode_hs(hs: HardState | None) -> list[Any] | None:
    if hs is None:
        return None
    return [hs.term, hs.vote, hs.commit]


def _decode_hs(raw: Any, path: Path) -> HardState:
    try:
        term, vote, commit = _as_list(raw, 3)
        if not (isinstance(term, int) and isinstance(commit, int)):
            raise ValueError("bad hard state")
        if vote is not None and not isinstance(vote, str):
            raise ValueError("bad vote")
    except ValueError as exc:
        raise StorageError(f"raft WAL {path} has a bad hard state: {exc}") from None
    return HardState(term, NodeId(vote) if vote is not None else None, commit)


def _write_all(f: WalFile, data: bytes) -> None:
    while data:
        n = f.write(data)
        if n is None:  # a non-blocking file took nothing; never expected for disk files
            raise OSError(errno.EAGAIN, "write accepted no bytes")
        data = data[n:]


def _fsync_dir(directory: Path, sync: bool) -> None:
    if not sync:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error_text(what: str, directory: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"cannot {what} in {directory}: the disk is full. Nothing acknowledged was "
            "lost; free space, then restart the node"
        )
    return f"cannot {what} in {directory}: {exc}"
