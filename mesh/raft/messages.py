"""Raft's data: log entries, membership, hard state, snapshots and peer messages.

Every peer message is a frozen dataclass with ``to_wire()`` and a ``from_wire()``
classmethod; :func:`from_wire` decodes any of them. The encoding is a
:mod:`mesh.wire` envelope whose type tag lies in raft's reserved range 48-79 and
whose body is a msgpack array of the fields in declaration order.

Decoding treats every byte as hostile (h11): each field is type- and
range-checked, node ids are bounded, entries must be contiguous and their terms
monotonic and no newer than the message's term, configuration-change payloads
must parse. Anything else raises :class:`~mesh.errors.RemoteProtocolError` and
nothing else; the adapter drops such a frame and counts it.

``src`` and ``dst`` travel inside the body so that the simulator and tests can
route messages; the adapter must check ``src`` against the peer's certificate
and ``dst`` against its own id before stepping a message into the core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self, TypeAlias, cast

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.raft.config import MAX_NODE_ID_BYTES
from mesh.types import NodeId

MAX_INDEX: Final = 2**63 - 1
"""Largest term or log index that crosses the wire (fits an int64)."""

MAX_CONTEXT_BYTES: Final = 4096
"""Largest opaque context (ReadIndex, conf-change context) the decoder accepts."""

MAX_VOTERS_ON_WIRE: Final = 1024
"""Largest voter or learner list the decoder accepts in a snapshot header."""


class EntryKind(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0
    """An application command (may be empty: a new leader's no-op entry)."""
    CONF_CHANGE = 1
    """An encoded :class:`ConfChange` (single-server membership change, §4.1)."""


class ConfChangeKind(enum.IntEnum):
    """The single-server membership changes (Raft thesis §4.1, etcd ConfChangeType)."""

    ADD_VOTER = 0
    """Add a new voter (or re-add); prefer ADD_LEARNER then PROMOTE."""
    ADD_LEARNER = 1
    """Add a non-voting member that receives the log but never votes or campaigns."""
    PROMOTE = 2
    """Turn an existing learner into a voter."""
    REMOVE = 3
    """Remove a voter or a learner."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry."""

    term: int
    """Term of the leader that created the entry."""
    index: int
    """Position in the log, from 1."""
    data: bytes = b""
    """The command (NORMAL) or an encoded ConfChange (CONF_CHANGE)."""
    kind: EntryKind = EntryKind.NORMAL
    """What ``data`` holds."""

    @property
    def size(self) -> int:
        """Payload bytes, used for every byte budget (messages, batches, backpressure)."""
        return len(self.data)

    def encode(self) -> list[Any]:
        """The msgpack-ready form ``[term, index, kind, data]``."""
        return [self.term, self.index, int(self.kind), self.data]

    @classmethod
    def decode(cls, raw: Any) -> Entry:
        """Parse the form produced by :meth:`encode`.

        Raises:
            RemoteProtocolError: wrong shape or out-of-range field, or a
                CONF_CHANGE entry whose payload is not a ConfChange.
        """
        if type(raw) is list and len(raw) == 4:
            # The common case, checked inline: a replicated or replayed command
            # (followers and WAL recovery decode every entry).
            term, index, kind, data = raw
            if (
                kind == 0
                and type(kind) is int
                and type(term) is int
                and type(index) is int
                and type(data) is bytes
                and 0 <= term <= MAX_INDEX
                and 1 <= index <= MAX_INDEX
                and len(data) <= wire.DEFAULT_MAX_FRAME_BYTES
            ):
                return cls(term, index, data, EntryKind.NORMAL)
        term, index, kind, data = _array(raw, 4, "entry")
        entry = cls(
            term=_uint(term, "entry.term"),
            index=_uint(index, "entry.index", lo=1),
            data=_bytes(data, "entry.data", wire.DEFAULT_MAX_FRAME_BYTES),
            kind=_enum(EntryKind, kind, "entry.kind"),
        )
        if entry.kind is EntryKind.CONF_CHANGE:
            ConfChange.decode(entry.data)
        return entry


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server membership change, the payload of a CONF_CHANGE entry."""

    kind: ConfChangeKind
    """Which change."""
    node: NodeId
    """The node it changes."""
    context: bytes = b""
    """Opaque bytes for the application (e.g. the node's address); not interpreted."""

    def encode(self) -> bytes:
        """Serialize for a log entry."""
        return wire.pack_body([int(self.kind), self.node, self.context])

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """Parse an entry payload.

        Raises:
            RemoteProtocolError: the payload is not a valid ConfChange.
        """
        kind, node, context = _array(wire.unpack_body(data, wire.DEFAULT_MAX_FRAME_BYTES), 3, "cc")
        return cls(
            kind=_enum(ConfChangeKind, kind, "cc.kind"),
            node=_node_id(node, "cc.node"),
            context=_bytes(context, "cc.context", MAX_CONTEXT_BYTES),
        )


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership of the group: sorted, disjoint voters and learners."""

    voters: tuple[NodeId, ...] = ()
    """Nodes that vote and count for the commit quorum, sorted."""
    learners: tuple[NodeId, ...] = ()
    """Nodes that only receive the log, sorted."""

    def __post_init__(self) -> None:
        if list(self.voters) != sorted(set(self.voters)) or list(self.learners) != sorted(
            set(self.learners)
        ):
            raise LocalProtocolError("ConfState voters and learners must be sorted and unique")
        if set(self.voters) & set(self.learners):
            raise LocalProtocolError("ConfState voters and learners must be disjoint")

    @classmethod
    def of(cls, voters: Any = (), learners: Any = ()) -> ConfState:
        """Build from any iterables of ids (sorted and de-duplicated here)."""
        return cls(tuple(sorted(set(voters))), tuple(sorted(set(learners))))

    def encode(self) -> list[Any]:
        """The msgpack-ready form ``[voters, learners]``."""
        return [list(self.voters), list(self.learners)]

    @classmethod
    def decode(cls, raw: Any) -> ConfState:
        """Parse the form produced by :meth:`encode`.

        Raises:
            RemoteProtocolError: wrong shape, bad ids, unsorted or overlapping lists.
        """
        voters, learners = _array(raw, 2, "conf_state")
        v = tuple(_node_id(x, "voter") for x in _list(voters, "voters", MAX_VOTERS_ON_WIRE))
        lr = tuple(_node_id(x, "learner") for x in _list(learners, "learners", MAX_VOTERS_ON_WIRE))
        try:
            return cls(v, lr)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class HardState:
    """What a node must persist before it sends anything (Raft Figure 2)."""

    term: int = 0
    """Latest term the node has seen."""
    vote: NodeId | None = None
    """Candidate it voted for in ``term``, if any."""
    commit: int = 0
    """Highest index known committed (an optimisation; safe to lose)."""


EMPTY_HARD_STATE: Final = HardState()


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot sits in the log and the membership at that point."""

    index: int = 0
    """Last log index the snapshot covers."""
    term: int = 0
    """Term of the entry at ``index``."""
    conf_state: ConfState = field(default_factory=ConfState)
    """Membership as of ``index``."""

    def encode(self) -> list[Any]:
        """The msgpack-ready form ``[index, term, conf_state]``."""
        return [self.index, self.term, self.conf_state.encode()]

    @classmethod
    def decode(cls, raw: Any) -> SnapshotMeta:
        """Parse the form produced by :meth:`encode`.

        Raises:
            RemoteProtocolError: wrong shape or out-of-range field.
        """
        index, term, conf_state = _array(raw, 3, "snapshot_meta")
        return cls(
            _uint(index, "snap.index"), _uint(term, "snap.term"), ConfState.decode(conf_state)
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application's state as of ``meta.index``, plus its metadata."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    """Position and membership."""
    data: bytes = b""
    """Opaque state machine image."""

    @property
    def is_empty(self) -> bool:
        """True for the placeholder snapshot at index 0."""
        return self.meta.index == 0


EMPTY_SNAPSHOT: Final = Snapshot()


# --------------------------------------------------------------------------- messages


class _WireMessage:
    """Shared ``to_wire``/``from_wire`` of every peer message (a slots mixin)."""

    __slots__ = ()
    TAG: ClassVar[int]

    def to_wire(self) -> bytes:
        """Encode as one wire envelope."""
        return to_wire(cast(RaftMessage, self))

    @classmethod
    def from_wire(cls, data: bytes, max_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> Self:
        """Decode from untrusted bytes.

        Raises:
            RemoteProtocolError: malformed bytes, or another message type.
        """
        msg = from_wire(data, max_bytes)
        if not isinstance(msg, cls):
            raise RemoteProtocolError(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg


@dataclass(frozen=True, slots=True)
class AppendEntries(_WireMessage):
    """Leader -> follower: entries after (``prev_log_index``, ``prev_log_term``) (§5.3)."""

    TAG: ClassVar[int] = 48
    src: NodeId
    dst: NodeId
    term: int
    prev_log_index: int
    """Index of the entry just before ``entries``."""
    prev_log_term: int
    """Term of that entry (the consistency check)."""
    commit: int
    """Leader's commit index."""
    entries: tuple[Entry, ...] = ()
    """Contiguous entries from ``prev_log_index + 1``; empty for a probe."""

    def _body(self) -> list[Any]:
        return [
            self.prev_log_index,
            self.prev_log_term,
            self.commit,
            [e.encode() for e in self.entries],
        ]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> AppendEntries:
        prev_index, prev_term, commit, raw_entries = _fields(rest, 4, cls)
        prev_index = _uint(prev_index, "prev_log_index")
        prev_term = _uint(prev_term, "prev_log_term")
        if prev_term > term:
            raise RemoteProtocolError(f"prev_log_term {prev_term} is newer than term {term}")
        entries = tuple(
            Entry.decode(x) for x in _list(raw_entries, "entries", wire.DEFAULT_MAX_FRAME_BYTES)
        )
        last_term = prev_term
        for offset, entry in enumerate(entries, start=1):
            if entry.index != prev_index + offset:
                raise RemoteProtocolError("AppendEntries entries are not contiguous")
            if not last_term <= entry.term <= term:
                raise RemoteProtocolError("AppendEntries entry terms are not monotonic")
            last_term = entry.term
        return cls(src, dst, term, prev_index, prev_term, _uint(commit, "commit"), entries)


@dataclass(frozen=True, slots=True)
class AppendEntriesResponse(_WireMessage):
    """Follower -> leader: accepted up to ``index``, or rejected with a hint (§5.3).

    On rejection, (``reject_hint``, ``hint_term``) name the follower's last entry
    at or before the probed index whose term is at most the probe's term; the
    leader skips a whole term per round trip (fast log backtracking, etcd's
    ``findConflictByTerm``). ``hint_term`` 0 means unknown.
    """

    TAG: ClassVar[int] = 49
    src: NodeId
    dst: NodeId
    term: int
    index: int
    """On success: the follower's last index matching the leader's log. On
    rejection: the ``prev_log_index`` that failed the check."""
    reject: bool = False
    reject_hint: int = 0
    hint_term: int = 0

    def _body(self) -> list[Any]:
        return [self.index, self.reject, self.reject_hint, self.hint_term]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> AppendEntriesResponse:
        index, reject, hint, hint_term = _fields(rest, 4, cls)
        return cls(
            src,
            dst,
            term,
            _uint(index, "index"),
            _bool(reject, "reject"),
            _uint(hint, "reject_hint"),
            _uint(hint_term, "hint_term"),
        )


@dataclass(frozen=True, slots=True)
class RequestVote(_WireMessage):
    """Candidate -> voter: vote for me in ``term`` (§5.2), or a PreVote probe (§9.6)."""

    TAG: ClassVar[int] = 50
    src: NodeId
    dst: NodeId
    term: int
    """The election's term; for a PreVote the term the candidate *would* use."""
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False
    """Sent on a leader's TimeoutNow: bypasses the CheckQuorum lease (§3.10)."""

    def _body(self) -> list[Any]:
        return [self.last_log_index, self.last_log_term, self.pre_vote, self.transfer]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> RequestVote:
        index, log_term, pre_vote, transfer = _fields(rest, 4, cls)
        return cls(
            src,
            dst,
            term,
            _uint(index, "last_log_index"),
            _uint(log_term, "last_log_term"),
            _bool(pre_vote, "pre_vote"),
            _bool(transfer, "transfer"),
        )


@dataclass(frozen=True, slots=True)
class RequestVoteResponse(_WireMessage):
    """Voter -> candidate: granted or not."""

    TAG: ClassVar[int] = 51
    src: NodeId
    dst: NodeId
    term: int
    granted: bool
    pre_vote: bool = False

    def _body(self) -> list[Any]:
        return [self.granted, self.pre_vote]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> RequestVoteResponse:
        granted, pre_vote = _fields(rest, 2, cls)
        return cls(src, dst, term, _bool(granted, "granted"), _bool(pre_vote, "pre_vote"))


@dataclass(frozen=True, slots=True)
class Heartbeat(_WireMessage):
    """Leader -> follower: I am alive; commit is ``min(leader commit, your match)``.

    A non-empty ``context`` asks the follower to echo it, which confirms the
    leadership for a ReadIndex request (§6.4).
    """

    TAG: ClassVar[int] = 52
    src: NodeId
    dst: NodeId
    term: int
    commit: int
    context: bytes = b""

    def _body(self) -> list[Any]:
        return [self.commit, self.context]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> Heartbeat:
        commit, context = _fields(rest, 2, cls)
        return cls(
            src, dst, term, _uint(commit, "commit"), _bytes(context, "context", MAX_CONTEXT_BYTES)
        )


@dataclass(frozen=True, slots=True)
class HeartbeatResponse(_WireMessage):
    """Follower -> leader: heartbeat received, echoing its context."""

    TAG: ClassVar[int] = 53
    src: NodeId
    dst: NodeId
    term: int
    context: bytes = b""

    def _body(self) -> list[Any]:
        return [self.context]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> HeartbeatResponse:
        (context,) = _fields(rest, 1, cls)
        return cls(src, dst, term, _bytes(context, "context", MAX_CONTEXT_BYTES))


@dataclass(frozen=True, slots=True)
class InstallSnapshot(_WireMessage):
    """Leader -> follower: one chunk of a snapshot (§7, thesis §5.3 chunked)."""

    TAG: ClassVar[int] = 54
    src: NodeId
    dst: NodeId
    term: int
    meta: SnapshotMeta
    total_bytes: int
    """Size of the whole snapshot data, the same in every chunk."""
    offset: int
    """Where ``data`` starts within the snapshot data."""
    data: bytes
    done: bool
    """True on the last chunk (``offset + len(data) == total_bytes``)."""

    def _body(self) -> list[Any]:
        return [self.meta.encode(), self.total_bytes, self.offset, self.data, self.done]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> InstallSnapshot:
        meta, total, offset, data, done = _fields(rest, 5, cls)
        m = SnapshotMeta.decode(meta)
        if m.index == 0 or m.term == 0 or m.term > term:
            raise RemoteProtocolError("InstallSnapshot names an impossible snapshot position")
        total = _uint(total, "total_bytes")
        offset = _uint(offset, "offset")
        chunk = _bytes(data, "data", wire.DEFAULT_MAX_FRAME_BYTES)
        done = _bool(done, "done")
        if offset + len(chunk) > total or done != (offset + len(chunk) == total):
            raise RemoteProtocolError("InstallSnapshot chunk does not fit its total size")
        return cls(src, dst, term, m, total, offset, chunk, done)


@dataclass(frozen=True, slots=True)
class InstallSnapshotResponse(_WireMessage):
    """Follower -> leader: send the snapshot at (``snapshot_index``,
    ``snapshot_term``) from ``next_offset`` on; ``reject`` abandons it."""

    TAG: ClassVar[int] = 55
    src: NodeId
    dst: NodeId
    term: int
    snapshot_index: int
    snapshot_term: int
    next_offset: int
    reject: bool = False

    def _body(self) -> list[Any]:
        return [self.snapshot_index, self.snapshot_term, self.next_offset, self.reject]

    @classmethod
    def _parse(
        cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]
    ) -> InstallSnapshotResponse:
        index, snap_term, offset, reject = _fields(rest, 4, cls)
        return cls(
            src,
            dst,
            term,
            _uint(index, "snapshot_index"),
            _uint(snap_term, "snapshot_term"),
            _uint(offset, "next_offset"),
            _bool(reject, "reject"),
        )


@dataclass(frozen=True, slots=True)
class TimeoutNow(_WireMessage):
    """Leader -> chosen successor: start an election now (leadership transfer, §3.10)."""

    TAG: ClassVar[int] = 56
    src: NodeId
    dst: NodeId
    term: int

    def _body(self) -> list[Any]:
        return []

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> TimeoutNow:
        _fields(rest, 0, cls)
        return cls(src, dst, term)


@dataclass(frozen=True, slots=True)
class ReadIndexRequest(_WireMessage):
    """Follower -> leader: tell me a read index for ``context`` (§6.4)."""

    TAG: ClassVar[int] = 57
    src: NodeId
    dst: NodeId
    term: int
    context: bytes

    def _body(self) -> list[Any]:
        return [self.context]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> ReadIndexRequest:
        (context,) = _fields(rest, 1, cls)
        return cls(src, dst, term, _bytes(context, "context", MAX_CONTEXT_BYTES))


@dataclass(frozen=True, slots=True)
class ReadIndexResponse(_WireMessage):
    """Leader -> follower: reads for ``context`` are linearizable once the
    follower has applied ``index``."""

    TAG: ClassVar[int] = 58
    src: NodeId
    dst: NodeId
    term: int
    index: int
    context: bytes

    def _body(self) -> list[Any]:
        return [self.index, self.context]

    @classmethod
    def _parse(cls, src: NodeId, dst: NodeId, term: int, rest: list[Any]) -> ReadIndexResponse:
        index, context = _fields(rest, 2, cls)
        return cls(
            src, dst, term, _uint(index, "index"), _bytes(context, "context", MAX_CONTEXT_BYTES)
        )


RaftMessage: TypeAlias = (
    AppendEntries
    | AppendEntriesResponse
    | RequestVote
    | RequestVoteResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | InstallSnapshotResponse
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)
"""Every message one Raft node sends another."""

MESSAGE_TYPES: Final[tuple[type[RaftMessage], ...]] = (
    AppendEntries,
    AppendEntriesResponse,
    RequestVote,
    RequestVoteResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
)
_BY_TAG: Final[dict[int, type[RaftMessage]]] = {t.TAG: t for t in MESSAGE_TYPES}
assert len(_BY_TAG) == len(MESSAGE_TYPES)
assert all(48 <= tag <= 79 for tag in _BY_TAG)


def to_wire(msg: RaftMessage) -> bytes:
    """Encode any raft message as one envelope (see the module docstring)."""
    return wire.encode(msg.TAG, [msg.src, msg.dst, msg.term, *msg._body()])


def from_wire(data: bytes, max_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> RaftMessage:
    """Decode one raft message from untrusted bytes.

    Args:
        data: one envelope (a TCP frame's payload).
        max_bytes: largest envelope accepted.

    Raises:
        RemoteProtocolError: anything wrong with the bytes; nothing else is raised.
    """
    env = wire.decode(data, max_bytes=max_bytes)
    cls = _BY_TAG.get(env.msg_type)
    if cls is None:
        raise RemoteProtocolError(f"message type {env.msg_type} is not a raft message")
    body = env.body
    if not isinstance(body, list) or len(body) < 3:
        raise RemoteProtocolError(f"{cls.__name__} body is not an array of at least 3 fields")
    src = _node_id(body[0], "src")
    dst = _node_id(body[1], "dst")
    term = _uint(body[2], "term")
    return cls._parse(src, dst, term, body[3:])


# --------------------------------------------------------------------------- validation


def _array(raw: Any, n: int, what: str) -> list[Any]:
    if not isinstance(raw, list) or len(raw) != n:
        raise RemoteProtocolError(f"{what} must be an array of {n} fields")
    return raw


def _fields(rest: list[Any], n: int, cls: type[Any]) -> list[Any]:
    if len(rest) != n:
        raise RemoteProtocolError(f"{cls.__name__} needs {n + 3} fields, got {len(rest) + 3}")
    return rest


def _list(raw: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(raw, list) or len(raw) > max_len:
        raise RemoteProtocolError(f"{what} must be an array of at most {max_len} items")
    return raw


def _uint(raw: Any, what: str, lo: int = 0) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= MAX_INDEX:
        raise RemoteProtocolError(f"{what} must be an integer in [{lo}, 2**63), got {raw!r:.40}")
    return raw


def _bool(raw: Any, what: str) -> bool:
    if not isinstance(raw, bool):
        raise RemoteProtocolError(f"{what} must be a boolean")
    return raw


def _bytes(raw: Any, what: str, max_len: int) -> bytes:
    if not isinstance(raw, bytes) or len(raw) > max_len:
        raise RemoteProtocolError(f"{what} must be at most {max_len} bytes")
    return raw


def _node_id(raw: Any, what: str) -> NodeId:
    if (
        not isinstance(raw, str)
        or not raw
        or len(raw.encode("utf-8", "surrogatepass")) > MAX_NODE_ID_BYTES
        or not raw.isprintable()
    ):
        raise RemoteProtocolError(f"{what} must be a printable node id of 1-255 bytes")
    return NodeId(raw)


def _enum(enum_cls: type[Any], raw: Any, what: str) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise RemoteProtocolError(f"{what} must be an integer")
    try:
        return enum_cls(raw)
    except ValueError:
        raise RemoteProtocolError(f"{what} {raw} is unknown") from None
