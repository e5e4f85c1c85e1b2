"""The Raft log as one node sees it: stable entries in storage plus an unstable tail.

Shaped like etcd's ``raftLog`` (``log.go``/``log_unstable.go``)::

    storage: [compaction point] .. stable entries ..   (durable, RaftStorage)
    unstable:                    [snapshot?] .. entries not yet persisted ..
                                 ^ offset

    applied <= committed <= last_index

Entries enter the unstable tail (``append``/``maybe_append``/``restore``), are
handed to the caller in a Ready, and leave it when the caller reports them
persisted (``stable_to``/``stable_snap_to``). ``committed`` only moves forward;
``applied`` follows it as the caller applies entries.
"""

from __future__ import annotations

from mesh.raft.messages import Entry, Snapshot
from mesh.raft.storage import Compacted, RaftStorage, Unavailable, limit_size


class Unstable:
    """Entries (and possibly a snapshot) not yet persisted."""

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        """A snapshot received from the leader, to persist and apply."""
        self.entries: list[Entry] = []
        """Entries from ``offset`` on."""
        self.offset = offset
        """Index of ``entries[0]`` (or where it would be)."""

    def maybe_first_index(self) -> int | None:
        """First index if a pending snapshot determines it."""
        if self.snapshot is not None:
            return self.snapshot.meta.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        """Last index if the unstable part determines it."""
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, index: int) -> int | None:
        """Term at ``index`` if the unstable part knows it."""
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to (``index``, ``term``) are persisted; drop them from here.

        Ignored if the entry at ``index`` has since been replaced (another term).
        """
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        """The pending snapshot at ``index`` is persisted."""
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        """Replace everything with ``snapshot``."""
        self.offset = snapshot.meta.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry]) -> None:
        """Append, replacing any unstable entries from ``entries[0].index`` on."""
        first = entries[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif first <= self.offset:
            # Replaces everything unstable; the caller persists from `first`.
            self.offset = first
            self.entries = list(entries)
        else:
            del self.entries[first - self.offset :]
            self.entries.extend(entries)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Unstable entries ``[lo, hi)``; the range must lie in the unstable part."""
        assert self.offset <= lo <= hi <= self.offset + len(self.entries), (lo, hi, self.offset)
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    """The combined log (etcd ``raftLog``). Not thread-safe; owned by one core."""

    def __init__(self, storage: RaftStorage) -> None:
        self.storage = storage
        """Stable entries and snapshots."""
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        """Entries not yet persisted."""
        self.committed = first - 1
        """Highest index known to be committed."""
        self.applied = first - 1
        """Highest index the caller has applied."""

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, len(unstable)={len(self.unstable.entries)})"
        )

    # ------------------------------------------------------------------ positions

    def first_index(self) -> int:
        """First index still available."""
        first = self.unstable.maybe_first_index()
        return first if first is not None else self.storage.first_index()

    def last_index(self) -> int:
        """Index of the last entry."""
        last = self.unstable.maybe_last_index()
        return last if last is not None else self.storage.last_index()

    def persisted_index(self) -> int:
        """Highest index such that every entry up to it is durable."""
        if self.unstable.snapshot is not None:
            return 0
        return self.unstable.offset - 1

    def term(self, index: int) -> int:
        """Term of the entry at ``index`` (valid from the compaction point on).

        Raises:
            Compacted: before the compaction point.
            Unavailable: after the last index.
        """
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        if index > self.last_index():
            raise Unavailable(f"index {index} is past the last index {self.last_index()}")
        if index < self.first_index() - 1:
            raise Compacted(f"index {index} is compacted")
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        """Term at ``index``, or 0 where it is unknown."""
        try:
            return self.term(index)
        except (Compacted, Unavailable):
            return 0

    def last_term(self) -> int:
        """Term of the last entry."""
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        """Whether our entry at ``index`` has ``term``."""
        try:
            return self.term(index) == term
        except (Compacted, Unavailable):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a log ending at (``last_index``, ``term``) is at least as
        up-to-date as ours (Raft §5.4.1 election restriction)."""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    # ------------------------------------------------------------------ appending

    def find_conflict(self, entries: list[Entry]) -> int:
        """Index of the first entry that is new or conflicts with ours, 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest (i, term(i)) with i <= ``index`` and term(i) <= ``term``.

        Used for fast backtracking on both sides: every entry after the
        returned index has a term greater than ``term``, so it cannot match a
        probe at ``term`` (etcd ``findConflictByTerm``). Returns (index, 0) if
        the term at ``index`` is unknown (compacted or missing).
        """
        while index > 0:
            try:
                our = self.term(index)
            except (Compacted, Unavailable):
                return index, 0
            if our <= term:
                return index, our
            index -= 1
        return 0, 0

    def maybe_append(
        self, index: int, log_term: int, committed: int, entries: list[Entry]
    ) -> int | None:
        """Follower side of AppendEntries (§5.3).

        Returns:
            The last index now known to match the leader, or ``None`` if the
            consistency check at (``index``, ``log_term``) fails.
        """
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, (
                f"entry {conflict} conflicts with committed entry (committed={self.committed}): "
                "two leaders disagree on a committed entry, Raft safety is broken"
            )
            self.append(entries[conflict - index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, entries: list[Entry]) -> int:
        """Append (truncating any conflicting suffix); returns the new last index."""
        if not entries:
            return self.last_index()
        assert entries[0].index - 1 >= self.committed, "append would overwrite committed entries"
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    # ------------------------------------------------------------------ reading

    def entries(self, lo: int, max_bytes: int | None) -> list[Entry]:
        """Entries from ``lo`` to the end, within ``max_bytes`` (at least one).

        Raises:
            Compacted: ``lo`` is compacted; send a snapshot instead.
        """
        if lo > self.last_index():
            return []
        return self.slice(lo, self.last_index() + 1, max_bytes)

    def slice(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        """Entries ``[lo, hi)`` within ``max_bytes`` (at least one).

        Raises:
            Compacted: ``lo`` is before the first available index.
        """
        if lo < self.first_index():
            raise Compacted(f"index {lo} is compacted (first {self.first_index()})")
        assert hi <= self.last_index() + 1, (lo, hi, self.last_index())
        if lo == hi:
            return []
        out: list[Entry] = []
        off = self.unstable.offset
        if lo < off:
            out = self.storage.entries(lo, min(hi, off), max_bytes)
            if len(out) < min(hi, off) - lo:
                return out  # cut by size
        if hi > off:
            out = out + self.unstable.slice(max(lo, off), hi)
        return limit_size(out, max_bytes)

    def has_pending_snapshot(self) -> bool:
        """Whether a received snapshot waits to be persisted and applied."""
        return self.unstable.snapshot is not None

    def next_committed_entries(self, max_bytes: int) -> list[Entry]:
        """Committed entries not yet applied, within ``max_bytes`` (at least one).

        Empty while a snapshot is pending: it must be applied first.
        """
        if self.has_pending_snapshot():
            return []
        lo = max(self.applied + 1, self.first_index())
        if self.committed + 1 <= lo:
            return []
        return self.slice(lo, self.committed + 1, max_bytes)

    def snapshot(self) -> Snapshot:
        """The newest snapshot: the pending one, else the stored one.

        Raises:
            Unavailable: the storage is producing one.
        """
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # ------------------------------------------------------------------ progress

    def commit_to(self, index: int) -> None:
        """Move the commit index forward to ``index`` (never back)."""
        if index > self.committed:
            assert index <= self.last_index(), f"commit {index} is past last {self.last_index()}"
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit up to ``index`` if that entry is from ``term``.

        A leader only counts replicas for entries of its own term (Raft §5.4.2,
        Figure 8); earlier entries commit indirectly with them.
        """
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        """The caller applied everything up to ``index``."""
        if index == 0:
            return
        assert self.applied <= index <= self.committed, (self.applied, index, self.committed)
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to (``index``, ``term``) are durable."""
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        """The pending snapshot at ``index`` is durable."""
        self.unstable.stable_snap_to(index)

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the log with ``snapshot`` (a follower installing one)."""
        self.committed = snapshot.meta.index
        self.unstable.restore(snapshot)
