"""Read replicas for nodes that are not Raft members: the resumable watch stream.

Theory of operation
===================

DESIGN.md (State): "Non-voting nodes keep a local read replica of the state
through a resumable watch stream from any voter (changes since index N, or a
snapshot if too far behind)." Only the voters (and, for the moments it takes to
catch one up before its promotion, a learner) receive the Raft log; every other
node *watches* one voter. The leader's replication work therefore grows with
the number of voters, not with the size of the cluster, and a slow node shows
only in the progress of the voter it watches, never in the leader's.

This module is the pure part (no I/O, no clock: time is an argument); the trio
loop in :mod:`mesh.node.replica` only moves requests and answers over
``mesh-rpc/1`` and feeds what :class:`WatchClient` returns into
:class:`StateGate`. Four pieces:

* :class:`WatchBuffer`, on every node: the last committed entries this node
  applied (at most :attr:`WatchConfig.buffer_entries` entries and
  :attr:`WatchConfig.buffer_bytes` bytes).
* :class:`WatchServer`, on a voter: turns a request "entries after index N
  (whose term is T)" into the next batch of entries (at most
  :attr:`WatchConfig.max_answer_bytes`, at least one entry), or, when N is
  older than the buffer or belongs to another history (the term of entry N
  differs: the group was recovered by an operator, ``meshctl raft recover``),
  a chunk of a snapshot image of the whole state; or "nothing yet" (the
  caller long-polls and asks again when the state moves). Snapshot images are
  cut in :attr:`WatchConfig.snapshot_chunk_bytes` chunks so that no answer
  exceeds the API's frame limit; the server keeps its latest image and serves
  it to every watcher that needs one while entries after it are still in the
  buffer.
* :class:`WatchClient`, on a watcher: which voter to ask (a rendezvous hash on
  the node names spreads the watchers over the voters; live followers come
  before the leader, so the leader serves watchers only when no follower is
  alive), what to ask next (entries after the local applied index, or the next
  chunk of the snapshot being assembled), when to switch (a failed call backs
  the voter off exponentially; a voter that has had no leader for
  :attr:`WatchConfig.no_leader_switch_s` is left for another one; a voter
  removed from the configuration is no longer a candidate), and what the
  cluster looks like (voters, learners, leader, term and commit index, taken
  from the freshest answer: the highest ``(term, commit)``). Voters are
  learned from the answers: a request to a node that is not a voter is
  answered with a *redirect* carrying that node's view, so a new watcher that
  knows nobody asks any live member first.
* :class:`StateGate`, on every node: the one place both feeds go through. The
  Raft adapter applies to the gate (it is the adapter's state machine); the
  watch stream applies to it too. Each log index is applied to the readers'
  :class:`~mesh.raft.state.MeshState` exactly once, by whichever feed delivers
  it first, and only forward: a snapshot at or below the readers' index is
  ignored. Entries and snapshots are committed, so the two feeds can only
  differ in *how far* they are, never in *what* an index holds (a group that
  an operator recovered with ``meshctl raft recover`` is the exception the
  server's term check exists for: such a watcher receives a snapshot of the
  new history once it moves past the watcher's index).

Hand-over between the feeds
---------------------------

A watcher that the voter manager adds as a learner (it is about to be
promoted) starts receiving the log where its Raft storage stopped: at index 0
for a node that never was a member, or at the index where it was removed. The
readers' state is ahead of that. The gate keeps the adapter's view apart:
:attr:`StateGate.applied_index` is what the adapter applied, and while it is
behind the readers' index the adapter's entries and snapshots go to a
*shadow* state (rebuilt from a copy of the readers' state taken when the
watch stream first moved past the adapter, the *base*), so the snapshots the
adapter takes for log compaction (``snapshot()`` at its applied index) and the
results it hands to proposers stay exact. When the adapter reaches the
readers' index the shadow is dropped and the adapter applies to the readers'
state again. The readers therefore never see the state go backwards, and they
never see an index applied twice. The base costs one copy of the state image
on a node that left the configuration and watches since; on a node that never
was a member it is the image of the empty state.

The replica decides which feed *should* run (the watch loop idles while Raft
feeds this node: it is a voter or learner in its own configuration, knows a
leader and heard from the group recently); the gate makes it safe for both to
deliver for a while, which is what happens around every transition.

Answers and requests travel as msgpack maps inside API calls
(:meth:`WatchRequest.to_params`, :meth:`WatchAnswer.to_wire`); decoding
checks every field and raises :class:`~mesh.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mesh.errors import ConfigError, RemoteProtocolError
from mesh.raft.messages import MAX_INDEX, Entry, EntryKind
from mesh.raft.state import (
    Applied,
    CaSet,
    MeshState,
    TokenSet,
    carries_secrets,
    decode_command,
    redact,
)
from mesh.raft.vault import Vault
from mesh.types import NodeId

MAX_NODES_ON_WIRE: Final = 1024
"""Largest voter or learner list a watch answer may carry."""

MAX_NODE_NAME_BYTES: Final = 255
"""Longest node name in a watch request or answer."""


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """Bounds and timings of the watch stream (one for the whole node).

    ``__post_init__`` raises :class:`ConfigError` for a value out of range.
    """

    buffer_entries: int = 4096
    """Committed entries a node keeps for watchers, newest last. Default 4,096."""
    buffer_bytes: int = 8 * 1024 * 1024
    """Payload bytes those entries may hold (the newest entry is always kept).
    Default 8 MiB."""
    max_answer_bytes: int = 1024 * 1024
    """Entry payload bytes in one answer (at least one entry is sent whatever
    its size). Default 1 MiB, well under the 16 MiB API frame limit."""
    snapshot_chunk_bytes: int = 1024 * 1024
    """Bytes of a snapshot image in one answer. Default 1 MiB."""
    max_snapshot_bytes: int = 1024 * 1024 * 1024
    """Largest snapshot image a watcher assembles. Default 1 GiB (Raft's limit)."""
    long_poll_s: float = 5.0
    """How long a voter holds a request that has nothing new to answer.
    Default 5 s (under the API's 30 s idle limit)."""
    no_leader_switch_s: float = 5.0
    """A watcher leaves a voter that has named no leader for this long (a
    voter removed from the group, or cut off from it). Default 5 s: an
    election takes well under a second."""
    leader_stale_s: float = 12.0
    """A watcher stops naming a leader when no answer came for this long
    (:meth:`WatchClient.leader`; self-fencing reads it). Default 12 s: two
    long polls and some."""
    backoff_min_s: float = 0.25
    """First pause before a voter whose call failed is asked again. Default 0.25 s."""
    backoff_max_s: float = 8.0
    """Longest such pause (doubling from ``backoff_min_s``). Default 8 s."""

    def __post_init__(self) -> None:
        for name in ("buffer_entries", "buffer_bytes", "max_answer_bytes",
                     "snapshot_chunk_bytes", "max_snapshot_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"watch {name} must be a positive integer, got {value!r}")
        for name in ("long_poll_s", "no_leader_switch_s", "leader_stale_s", "backoff_min_s",
                     "backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"watch {name} must be > 0 seconds, got {value!r}")
        if self.backoff_max_s < self.backoff_min_s:
            raise ConfigError("watch backoff_max_s must be at least backoff_min_s")


# =========================================================================== wire


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What a node answering a watch request knows of the group."""

    node: NodeId
    """The node that answered."""
    term: int = 0
    leader: NodeId | None = None
    voters: tuple[NodeId, ...] = ()
    learners: tuple[NodeId, ...] = ()
    commit: int = 0
    """Its commit index (a watcher's: the highest it heard of)."""

    @property
    def freshness(self) -> tuple[int, int, bool]:
        """Views compare by ``(term, commit)``: the higher one is newer (and one
        that names a leader beats one that does not)."""
        return (self.term, self.commit, self.leader is not None)

    def to_wire(self) -> list[Any]:
        """A msgpack-ready list."""
        return [self.node, self.term, self.leader or "", list(self.voters),
                list(self.learners), self.commit]

    @classmethod
    def from_wire(cls, raw: Any) -> ClusterView:
        """Decode (untrusted).

        Raises:
            RemoteProtocolError: malformed.
        """
        if not isinstance(raw, list) or len(raw) != 6:
            raise RemoteProtocolError("watch view must be an array of 6")
        node, term, leader, voters, learners, commit = raw
        return cls(_node(node), _uint(term, "term"), _node(leader) if leader else None,
                   _nodes(voters), _nodes(learners), _uint(commit, "commit"))


@dataclass(frozen=True, slots=True)
class SnapshotCursor:
    """Where a watcher is in the snapshot image it assembles."""

    index: int
    term: int
    offset: int


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """"Entries after ``after`` (whose term is ``term``, 0: unknown)", or the
    next chunk of a snapshot image (``snapshot``)."""

    node: NodeId
    """The watcher (for the voter's status page; not an authorisation)."""
    after: int
    term: int = 0
    snapshot: SnapshotCursor | None = None
    wait_s: float = 0.0
    """How long the voter may hold the request when it has nothing new."""

    def to_params(self) -> dict[str, Any]:
        """API parameters."""
        snap = self.snapshot
        return {"node": self.node, "after": self.after, "term": self.term,
                "snapshot": [snap.index, snap.term, snap.offset] if snap else None,
                "wait_s": self.wait_s}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> WatchRequest:
        """Decode API parameters (untrusted).

        Raises:
            RemoteProtocolError: malformed.
        """
        snap = params.get("snapshot")
        cursor = None
        if snap is not None:
            if not isinstance(snap, list) or len(snap) != 3:
                raise RemoteProtocolError("watch snapshot cursor must be an array of 3")
            cursor = SnapshotCursor(_uint(snap[0], "snapshot index"),
                                    _uint(snap[1], "snapshot term"),
                                    _uint(snap[2], "snapshot offset"))
        wait_s = params.get("wait_s", 0.0)
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not (
                0 <= wait_s <= 60):
            raise RemoteProtocolError("watch wait_s must be 0-60 seconds")
        return cls(_node(params.get("node")), _uint(params.get("after"), "after"),
                   _uint(params.get("term", 0), "term"), cursor, float(wait_s))


class AnswerKind(enum.Enum):
    """What a watch answer carries."""

    ENTRIES = "entries"
    """The next committed entries, in order."""
    SNAPSHOT = "snapshot"
    """A chunk of a snapshot image of the whole state."""
    NOTHING = "nothing"
    """Nothing new within the long poll: ask again."""
    REDIRECT = "redirect"
    """The node does not serve watchers (not a voter): ask one of ``view.voters``."""


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """``data`` is ``image[offset:offset + len(data)]`` of an image of ``total``
    bytes taken at ``index`` (entry term ``term``)."""

    index: int
    term: int
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WatchAnswer:
    """One answer to a :class:`WatchRequest`."""

    kind: AnswerKind
    view: ClusterView
    entries: tuple[Entry, ...] = ()
    chunk: SnapshotChunk | None = None

    def to_wire(self) -> dict[str, Any]:
        """An API result."""
        out: dict[str, Any] = {"kind": self.kind.value, "view": self.view.to_wire()}
        if self.entries:
            out["entries"] = [[e.term, e.index, int(e.kind), e.data] for e in self.entries]
        if self.chunk is not None:
            c = self.chunk
            out["chunk"] = [c.index, c.term, c.offset, c.total, c.data]
        return out

    @classmethod
    def from_wire(cls, raw: Any) -> WatchAnswer:
        """Decode an API result (untrusted): entries must be contiguous with
        non-decreasing terms.

        Raises:
            RemoteProtocolError: malformed.
        """
        if not isinstance(raw, dict):
            raise RemoteProtocolError("watch answer must be a map")
        try:
            kind = AnswerKind(raw.get("kind"))
        except ValueError:
            raise RemoteProtocolError(f"unknown watch answer kind {raw.get('kind')!r:.20}"
                                      ) from None
        view = ClusterView.from_wire(raw.get("view"))
        entries: list[Entry] = []
        chunk = None
        if kind is AnswerKind.ENTRIES:
            items = raw.get("entries")
            if not isinstance(items, list) or not items:
                raise RemoteProtocolError("watch entries must be a non-empty array")
            for item in items:
                if not isinstance(item, list) or len(item) != 4:
                    raise RemoteProtocolError("watch entry must be an array of 4")
                term, index, ek, data = item
                try:
                    entry_kind = EntryKind(ek)
                except ValueError:
                    raise RemoteProtocolError(f"unknown entry kind {ek!r:.20}") from None
                if not isinstance(data, bytes):
                    raise RemoteProtocolError("watch entry data must be bytes")
                e = Entry(_uint(term, "entry term"), _uint(index, "entry index"), data,
                          entry_kind)
                if entries and (e.index != entries[-1].index + 1 or e.term < entries[-1].term):
                    raise RemoteProtocolError("watch entries must be contiguous, terms "
                                              "non-decreasing")
                entries.append(e)
        elif kind is AnswerKind.SNAPSHOT:
            c = raw.get("chunk")
            if not isinstance(c, list) or len(c) != 5 or not isinstance(c[4], bytes):
                raise RemoteProtocolError("watch snapshot chunk must be an array of 5")
            chunk = SnapshotChunk(_uint(c[0], "snapshot index"), _uint(c[1], "snapshot term"),
                                  _uint(c[2], "offset"), _uint(c[3], "total"), c[4])
            if chunk.offset + len(chunk.data) > chunk.total or (
                    not chunk.data and chunk.offset < chunk.total):
                raise RemoteProtocolError("watch snapshot chunk lies outside its image")
        return cls(kind, view, tuple(entries), chunk)


def _uint(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_INDEX:
        raise RemoteProtocolError(f"watch {what} must be an integer in [0, 2**63)")
    return raw


def _node(raw: Any) -> NodeId:
    if (not isinstance(raw, str) or not raw or not raw.isprintable()
            or len(raw.encode("utf-8", "surrogatepass")) > MAX_NODE_NAME_BYTES):
        raise RemoteProtocolError("watch node name must be printable text of 1-255 bytes")
    return NodeId(raw)


def _nodes(raw: Any) -> tuple[NodeId, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_NODES_ON_WIRE:
        raise RemoteProtocolError("watch node list must be an array")
    return tuple(sorted({_node(n) for n in raw}))


# =========================================================================== buffer


class WatchBuffer:
    """The last committed entries applied on this node, for watchers.

    Starts at ``base`` (the index before its first entry, with that entry's term,
    0 when unknown); :meth:`reset` moves the base after a snapshot restore.
    """

    def __init__(self, config: WatchConfig, base_index: int = 0, base_term: int = 0) -> None:
        self._cfg = config
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._base_index = base_index
        self._base_term = base_term

    @property
    def base_index(self) -> int:
        """The index just before the first kept entry."""
        return self._base_index

    @property
    def last_index(self) -> int:
        """The last index applied (and kept, or the base)."""
        return self._entries[-1].index if self._entries else self._base_index

    @property
    def last_term(self) -> int:
        """The term of :attr:`last_index` (0: unknown)."""
        return self._entries[-1].term if self._entries else self._base_term

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self, index: int, term: int) -> None:
        """Drop every entry: the state was replaced by a snapshot at ``index``."""
        self._entries.clear()
        self._bytes = 0
        self._base_index, self._base_term = index, term

    def append(self, entry: Entry) -> None:
        """Keep ``entry`` (the next index), dropping the oldest beyond the bounds."""
        assert entry.index == self.last_index + 1, (
            f"watch buffer at {self.last_index} got entry {entry.index}")
        self._entries.append(entry)
        self._bytes += entry.size
        while len(self._entries) > 1 and (len(self._entries) > self._cfg.buffer_entries
                                          or self._bytes > self._cfg.buffer_bytes):
            old = self._entries.popleft()
            self._bytes -= old.size
            self._base_index, self._base_term = old.index, old.term

    def term_at(self, index: int) -> int | None:
        """The term of entry ``index`` if known here (0 for index 0), else ``None``."""
        if index == self._base_index:
            return self._base_term if self._base_term or index == 0 else None
        if self._base_index < index <= self.last_index:
            return self._entries[index - self._base_index - 1].term
        return None

    def entries_after(self, index: int, max_bytes: int) -> list[Entry]:
        """Entries after ``index`` (kept here), at most ``max_bytes`` of payload but
        at least one."""
        assert self._base_index <= index < self.last_index
        out: list[Entry] = []
        size = 0
        for e in itertools.islice(self._entries, index - self._base_index, None):
            if out and size + e.size > max_bytes:
                break
            out.append(e)
            size += e.size
        return out


# =========================================================================== server


@dataclass(frozen=True, slots=True)
class SnapshotImage:
    """A snapshot image of the whole state taken at ``index`` (entry term ``term``)."""

    index: int
    term: int
    data: bytes


ImageSource = Callable[[], SnapshotImage]
"""Takes an image of the state as it is now (``MeshState.snapshot()``)."""


class WatchServer:
    """A voter's answers to watch requests (one per node, shared by all watchers).

    :meth:`answer` returns ``None`` when there is nothing new yet: the caller
    waits for the state to change (or the long poll to end) and asks again.
    """

    def __init__(self, config: WatchConfig, buffer: WatchBuffer) -> None:
        self._cfg = config
        self._buffer = buffer
        self._image: SnapshotImage | None = None
        self._watchers: dict[NodeId, float] = {}
        self.images_taken = 0
        """Snapshot images taken for watchers (each costs one ``snapshot()``)."""

    def watchers(self, now: float, within_s: float) -> list[NodeId]:
        """Watchers that asked within the last ``within_s`` seconds, sorted."""
        return sorted(n for n, t in self._watchers.items() if now - t <= within_s)

    def answer(self, request: WatchRequest, view: ClusterView, take_image: ImageSource,
               now: float) -> WatchAnswer | None:
        """The answer to ``request`` now, or ``None`` (nothing new yet).

        Args:
            request: what the watcher asks.
            view: this node's view of the group, sent along.
            take_image: a snapshot image of the state right now (called only
                when no kept image can serve).
            now: for the watcher list only.
        """
        self._watchers[request.node] = now
        if len(self._watchers) > MAX_NODES_ON_WIRE:
            oldest = min(self._watchers, key=lambda n: self._watchers[n])
            del self._watchers[oldest]
        buf = self._buffer
        cursor = request.snapshot
        if cursor is not None:
            image = self._image
            if image is not None and (image.index, image.term) == (cursor.index, cursor.term) \
                    and cursor.offset < len(image.data):
                return self._chunk(image, cursor.offset, view)
            # That image is gone: start over below from the watcher's index.
        after, last = request.after, buf.last_index
        if after > last:
            return None  # this voter is behind the watcher: wait until it catches up
        mine = buf.term_at(after)
        if mine is not None and request.term and mine != request.term:
            # Another history (an operator recovered the group): send the state
            # once it is past the watcher's index, so the watcher moves forward.
            return self._snapshot(view, take_image, after) if after < last else None
        if after == last:
            return None
        if after < buf.base_index:
            return self._snapshot(view, take_image, after)
        return WatchAnswer(AnswerKind.ENTRIES, view,
                           tuple(buf.entries_after(after, self._cfg.max_answer_bytes)))

    def _snapshot(self, view: ClusterView, take_image: ImageSource, after: int) -> WatchAnswer:
        image = self._image
        # Reuse the kept image while the watcher can continue from it with entries.
        if image is None or image.index <= after or image.index < self._buffer.base_index:
            image = take_image()
            self._image = image
            self.images_taken += 1
        return self._chunk(image, 0, view)

    def _chunk(self, image: SnapshotImage, offset: int, view: ClusterView) -> WatchAnswer:
        data = image.data[offset:offset + self._cfg.snapshot_chunk_bytes]
        return WatchAnswer(AnswerKind.SNAPSHOT, view,
                           chunk=SnapshotChunk(image.index, image.term, offset, len(image.data),
                                               data))


# =========================================================================== client


@dataclass(frozen=True, slots=True)
class ApplyEntries:
    """Output: apply these committed entries (some may be applied already)."""

    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class RestoreSnapshot:
    """Output: restore the state from this image (taken at ``index``, term ``term``)."""

    index: int
    term: int
    data: bytes


WatchOutput = ApplyEntries | RestoreSnapshot


def rendezvous_score(watcher: NodeId, voter: NodeId) -> bytes:
    """Highest random weight of ``voter`` for ``watcher`` (blake2b: the same on
    every machine, unlike ``hash()``)."""
    return hashlib.blake2b(f"{voter}\0{watcher}".encode(), digest_size=8).digest()


@dataclass(slots=True)
class _Assembly:
    node: NodeId
    index: int
    term: int
    total: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


class WatchClient:
    """A watcher's decisions: whom to ask, what to ask, what an answer means.

    Drive it with :meth:`choose` (whom to call now), :meth:`request` (what to
    send), then :meth:`handle_answer` or :meth:`handle_failure`. Outputs of
    :meth:`handle_answer` are applied to the :class:`StateGate` in order; the
    next request is built from the gate's readers' index again, so an output
    that the gate skipped (the Raft feed got there first) costs nothing.
    """

    def __init__(self, me: NodeId, config: WatchConfig) -> None:
        self._me = me
        self._cfg = config
        self._view: ClusterView | None = None
        self._heard_at: float | None = None
        self._source: NodeId | None = None
        self._not_voters: dict[NodeId, float] = {}
        """Nodes that redirected us, until when they are not asked again."""
        self._backoff: dict[NodeId, tuple[float, float]] = {}
        """Failed voters: (retry at, current pause)."""
        self._leaderless_since: dict[NodeId, float] = {}
        self._assembly: _Assembly | None = None
        self.switches = 0
        """Times the voter followed changed."""
        self.snapshots = 0
        """Snapshot images received whole."""

    # ------------------------------------------------------------------ reading

    @property
    def view(self) -> ClusterView | None:
        """The freshest view of the group heard so far."""
        return self._view

    @property
    def source(self) -> NodeId | None:
        """The voter the last answer came from."""
        return self._source

    def leader(self, now: float) -> NodeId | None:
        """The leader the freshest view names, while answers keep coming."""
        if self._view is None or self._heard_at is None:
            return None
        if now - self._heard_at > self._cfg.leader_stale_s:
            return None
        return self._view.leader

    # ------------------------------------------------------------------ deciding

    def choose(self, live: Collection[NodeId], now: float) -> NodeId | None:
        """The node to ask now, or ``None`` (nobody can be asked: wait a little).

        Candidates are the known voters that are live and not backed off, live
        followers before the leader, each group in rendezvous order for this
        watcher. While no voter is known, any live node (it redirects).
        """
        view = self._view
        voters = [v for v in (view.voters if view else ()) if v != self._me and v in live]
        if not voters:
            voters = sorted(n for n in live if n != self._me
                            and self._not_voters.get(n, -1.0) < now)
        leader = view.leader if view else None
        ok = [v for v in voters if self._backoff.get(v, (-1.0, 0.0))[0] <= now]
        if not ok:
            return None
        return min(ok, key=lambda v: (v == leader, _neg(rendezvous_score(self._me, v)), v))

    def next_wake(self, live: Collection[NodeId], now: float) -> float | None:
        """When :meth:`choose` may name someone again after returning ``None``."""
        times = [t for t, _ in self._backoff.values() if t > now]
        times += [t for t in self._not_voters.values() if t > now]
        return min(times) if times else None

    def request(self, node: NodeId, applied: int, term: int) -> WatchRequest:
        """What to ask ``node``, the readers' state being at ``applied`` (``term``)."""
        a = self._assembly
        cursor = None
        if a is not None and a.node == node and a.index > applied:
            cursor = SnapshotCursor(a.index, a.term, a.received)
        elif a is not None:
            self._assembly = None  # another voter, or the state moved past it
        return WatchRequest(self._me, applied, term, cursor, self._cfg.long_poll_s)

    # ------------------------------------------------------------------ answers

    def handle_answer(self, node: NodeId, request: WatchRequest, answer: WatchAnswer,
                      now: float) -> list[WatchOutput]:
        """Take ``answer`` from ``node`` to ``request``; returns what to apply.

        Raises:
            RemoteProtocolError: the answer does not fit the request (entries that
                do not start right after ``request.after``, an oversized image);
                the caller treats it as a failure of ``node``.
        """
        self._learn(answer.view, now)
        if answer.kind is AnswerKind.REDIRECT:
            self._not_voters[node] = now + self._cfg.long_poll_s
            self._backoff.pop(node, None)
            return []
        if node != self._source:
            self._source = node
            self.switches += 1
        self._backoff.pop(node, None)
        if answer.view.leader is None:
            since = self._leaderless_since.setdefault(node, now)
            if now - since >= self._cfg.no_leader_switch_s:
                self._leaderless_since.pop(node, None)
                self._back_off(node, now)
        else:
            self._leaderless_since.pop(node, None)
        if answer.kind is AnswerKind.ENTRIES:
            if answer.entries[0].index != request.after + 1:
                raise RemoteProtocolError(
                    f"{node} answered entries from {answer.entries[0].index} to a watch "
                    f"after {request.after}")
            return [ApplyEntries(answer.entries)]
        if answer.kind is AnswerKind.SNAPSHOT:
            assert answer.chunk is not None
            return self._take_chunk(node, answer.chunk)
        return []

    def handle_failure(self, node: NodeId, now: float) -> None:
        """A call to ``node`` failed (link broken, timeout, bad answer): back it
        off and start any snapshot assembly over."""
        self._back_off(node, now)
        if self._assembly is not None and self._assembly.node == node:
            self._assembly = None
        if self._source == node:
            self._source = None

    def _back_off(self, node: NodeId, now: float) -> None:
        _, pause = self._backoff.get(node, (0.0, 0.0))
        pause = min(self._cfg.backoff_max_s, max(self._cfg.backoff_min_s, 2 * pause))
        self._backoff[node] = (now + pause, pause)

    def _learn(self, view: ClusterView, now: float) -> None:
        if view.voters and (self._view is None or view.freshness >= self._view.freshness):
            self._view = view
        if view.voters and view.node in view.voters:
            self._heard_at = now  # a voter answered: its leader is news

    def _take_chunk(self, node: NodeId, c: SnapshotChunk) -> list[WatchOutput]:
        if c.total > self._cfg.max_snapshot_bytes:
            raise RemoteProtocolError(f"{node} offers a snapshot of {c.total} bytes, more "
                                      f"than the {self._cfg.max_snapshot_bytes} accepted")
        a = self._assembly
        if c.offset == 0:
            a = self._assembly = _Assembly(node, c.index, c.term, c.total)
        elif a is None or (a.node, a.index, a.term, a.received) != (node, c.index, c.term,
                                                                     c.offset):
            self._assembly = None  # not the image being assembled: start over
            return []
        a.parts.append(c.data)
        a.received += len(c.data)
        if a.received < a.total:
            return []
        self._assembly = None
        self.snapshots += 1
        return [RestoreSnapshot(a.index, a.term, b"".join(a.parts))]


def _neg(score: bytes) -> bytes:
    """Orders scores high to low under ``min``."""
    return bytes(255 - b for b in score)


# =========================================================================== gate


@dataclass(frozen=True, slots=True)
class GateStatistics:
    """What the gate counted."""

    raft_applied: int
    """Entries the Raft feed applied to the readers' state."""
    watch_applied: int
    """Entries the watch feed applied to the readers' state."""
    skipped: int
    """Entries or snapshots a feed delivered that the readers' state had already."""
    shadow_applied: int
    """Entries the Raft feed applied to the shadow while catching up."""
    raft_restores: int
    """Snapshots from Raft restored into the readers' state."""
    watch_restores: int
    """Snapshots from the watch stream restored into the readers' state."""


class StateGate:
    """The readers' :class:`MeshState`, fed by Raft and by the watch stream
    (see "Hand-over between the feeds" in the module docstring).

    It is the Raft adapter's state machine (``applied_index``, ``apply``,
    ``snapshot``, ``restore`` are the adapter's view); the watch stream uses
    :meth:`watch_apply` and :meth:`watch_restore`. Every entry the readers'
    state applies is also kept in ``buffer`` for the node's own watchers,
    redacted (:func:`~mesh.raft.state.redact`).

    Only the Raft feed fills :attr:`vault` (the CA key and the join token's
    secret), whichever feed reached the readers' state first, and only Raft
    snapshots (:meth:`snapshot`) carry it: watchers never receive a secret.

    Args:
        state: the readers' state (at the adapter's index when the gate is made).
        buffer: where applied entries are kept for watchers.
        term_of: the term of a log index from Raft's storage, when known (a
            Raft snapshot restore does not say it).
    """

    def __init__(self, state: MeshState, buffer: WatchBuffer,
                 term_of: Callable[[int], int | None] = lambda index: None) -> None:
        self._state = state
        self._buffer = buffer
        self._term_of = term_of
        self._raft_applied = state.applied_index
        self._term = buffer.last_term
        self.vault = Vault()
        """The secrets the Raft feed gave this node (Raft members only)."""
        self._base: bytes | None = None
        """Image of the state at the adapter's index, while the readers are ahead."""
        self._shadow: MeshState | None = None
        """The state at the adapter's index, once the adapter applies while behind."""
        self._c = dict.fromkeys(GateStatistics.__dataclass_fields__, 0)

    # ------------------------------------------------------------------ reading

    @property
    def state(self) -> MeshState:
        """The readers' state (read it; only the feeds change it)."""
        return self._state

    @property
    def buffer(self) -> WatchBuffer:
        """The entries kept for this node's watchers."""
        return self._buffer

    @property
    def readers_index(self) -> int:
        """The readers' applied index (the watch stream resumes after it)."""
        return self._state.applied_index

    @property
    def readers_term(self) -> int:
        """The term of the readers' last entry (0: unknown)."""
        return self._term

    @property
    def raft_behind(self) -> int:
        """How far the Raft feed is behind the readers (0: in step)."""
        return self._state.applied_index - self._raft_applied

    def statistics(self) -> GateStatistics:
        """Counters since start."""
        return GateStatistics(**self._c)

    # ------------------------------------------------------------------ Raft's side

    @property
    def applied_index(self) -> int:
        """The index the Raft adapter applied (the adapter's ``StateMachine``)."""
        return self._raft_applied

    def apply(self, entry: Entry) -> Applied:
        """The adapter applies one committed entry (``applied_index + 1``)."""
        assert entry.index == self._raft_applied + 1, (
            f"raft applies {entry.index} after {self._raft_applied}")
        if self.raft_behind == 0:
            # In step: the readers' state is the adapter's.
            self._raft_applied = entry.index
            self._base = None
            result = self._state.apply(entry)
            self._kept(entry)
            self._c["raft_applied"] += 1
            if carries_secrets(entry):
                self._take_secrets(entry, result)
            return result
        # Behind the readers, who have this entry: keep the shadow exact (its
        # snapshots and the results it returns are the adapter's).
        shadow = self._shadow_state()
        self._raft_applied = entry.index
        result = shadow.apply(entry)
        self._c["shadow_applied"] += 1
        self._c["skipped"] += 1
        if self.raft_behind == 0:
            self._shadow = None
        if carries_secrets(entry):
            self._take_secrets(entry, result)
        return result

    def _take_secrets(self, entry: Entry, result: Applied) -> None:
        try:
            command = decode_command(entry.data)
        except RemoteProtocolError:
            return  # invalid on every replica: nothing to keep
        if isinstance(command, (CaSet, TokenSet)):  # else crafted bytes fooled the sniff
            self.vault.take(command, result)

    def snapshot(self) -> bytes:
        """The state at the adapter's index, with the vault (for Raft's log
        compaction; never sent to watchers)."""
        vault = self.vault.section()
        if self.raft_behind == 0:
            return self._state.snapshot(vault)
        return self._shadow_state().snapshot(vault)

    def restore(self, data: bytes, index: int) -> None:
        """The adapter restores a snapshot taken at ``index``.

        Raises:
            StorageError: the image is malformed (nothing changed).
        """
        if index > self._state.applied_index:
            self.vault.restore(self._state.restore(data, index))
            self._raft_applied = index
            self._base = self._shadow = None
            self._reset_buffer(index, self._term_of(index) or 0)
            self._c["raft_restores"] += 1
            return
        shadow = MeshState()
        self.vault.restore(shadow.restore(data, index))
        self._raft_applied = index
        self._c["skipped"] += 1
        if index == self._state.applied_index:
            self._base = self._shadow = None
        else:
            self._shadow, self._base = shadow, None

    # ------------------------------------------------------------------ the watch side

    def watch_apply(self, entries: Iterable[Entry]) -> int:
        """Apply committed entries from the watch stream; those the readers
        have already are skipped. Returns how many were applied.

        The first new entry must be ``readers_index + 1`` (the watch client
        checks that answers start right after what it asked for).
        """
        applied = 0
        for e in entries:
            if e.index <= self._state.applied_index:
                self._c["skipped"] += 1
                continue
            assert e.index == self._state.applied_index + 1, (
                f"watch applies {e.index} after {self._state.applied_index}")
            self._keep_base()
            self._state.apply(e)
            self._kept(e)
            self._c["watch_applied"] += 1
            applied += 1
        return applied

    def watch_restore(self, data: bytes, index: int, term: int) -> bool:
        """Restore a snapshot image from the watch stream if it is ahead of the
        readers; returns whether it was.

        Raises:
            StorageError: the image is malformed (nothing changed).
        """
        if index <= self._state.applied_index:
            self._c["skipped"] += 1
            return False
        self._keep_base()
        self._state.restore(data, index)  # unchanged if the image is malformed
        self._reset_buffer(index, term)
        self._c["watch_restores"] += 1
        return True

    # ------------------------------------------------------------------ inside

    def _keep_base(self) -> None:
        """The readers are about to move past the adapter: keep the state at the
        adapter's index (once)."""
        if self.raft_behind == 0 and self._base is None and self._shadow is None:
            self._base = self._state.snapshot()

    def _shadow_state(self) -> MeshState:
        if self._shadow is None:
            assert self._base is not None, "the readers moved ahead without a base"
            shadow = MeshState()
            shadow.restore(self._base, self._raft_applied)
            self._shadow, self._base = shadow, None
        return self._shadow

    def _kept(self, entry: Entry) -> None:
        self._buffer.append(redact(entry))
        self._term = entry.term

    def _reset_buffer(self, index: int, term: int) -> None:
        self._buffer.reset(index, term)
        self._term = term


__all__: Sequence[str] = (
    "AnswerKind",
    "ApplyEntries",
    "ClusterView",
    "GateStatistics",
    "ImageSource",
    "RestoreSnapshot",
    "SnapshotChunk",
    "SnapshotCursor",
    "SnapshotImage",
    "StateGate",
    "WatchAnswer",
    "WatchBuffer",
    "WatchClient",
    "WatchConfig",
    "WatchOutput",
    "WatchRequest",
    "WatchServer",
    "rendezvous_score",
)
