"""The replicated state machine: what the Raft log's commands build, on every replica.

Theory of operation
===================

Raft (§5.3, Figure 2 "apply log[lastApplied] to state machine") only orders
commands; this module gives them meaning. :class:`MeshState` is a plain,
deterministic object: the same committed entries applied in the same order
produce the same state, the same results and the same snapshot bytes on every
node. It does no I/O and never reads a clock.

Rule 1 (as in h11): everything that decides what a command does lives here.
That includes the rejection of a malformed or unknown command: a committed
entry is applied on every replica, so a bad one must fail *the same way*
everywhere (it becomes a ``Result`` with code ``invalid``); it never raises.
Every limit that influences a result (key and value sizes, the dedup table's
size) is therefore a module constant, never a per-node setting.

Commands
--------

A command is a msgpack array ``[format, kind, request_id, *fields]``:

* ``format`` is :data:`COMMAND_FORMAT` (1);
* ``kind`` is a :class:`CommandKind`; ranges are reserved so later commands
  slot in without renumbering: 1-15 key-value store, 16-23 node overrides,
  24-31 deny list, 32-47 services and jobs, 48-63 allocations (committed
  placement plans), 64-71 cluster configuration, 72-79 CA material;
* ``request_id`` (0-64 bytes) makes a command idempotent: a command whose id
  is in the dedup table is not applied again, and the result recorded the
  first time is returned (flagged ``duplicate``). The table keeps the last
  :data:`DEDUP_ENTRIES` ids in apply order and travels in snapshots, so a
  client that retries after a leader change or a timeout with the *same*
  request id gets exactly-once semantics. Empty ids are never deduplicated.

Implemented now: the key-value store (put with optional compare-and-swap on
the key's ``mod_index``, delete), node overrides (drain, labels) and the deny
list of certificate serials.

Indexes and watches
-------------------

The log index of the entry that last changed a record is its ``mod_index``
(etcd's ``mod_revision``, Consul's ``ModifyIndex``); a key also keeps its
``create_index``. Every change is appended to a bounded event list;
:meth:`MeshState.changes_since` returns the changes after an index so that a
watch stream can resume where it stopped, or raises
:class:`~mesh.raft.storage.Compacted` when they were dropped (the watcher then
starts over from a full read or a snapshot).

Snapshots
---------

:meth:`MeshState.snapshot` serialises the whole state (records, dedup table,
applied index) as msgpack, deterministically (sorted); :meth:`MeshState.restore`
replaces the state with one. The event list is not part of a snapshot: after a
restore, changes are available from the snapshot's index on.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, TypeAlias

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError, StorageError
from mesh.raft.messages import Entry, EntryKind
from mesh.raft.storage import Compacted
from mesh.types import NodeId

LOGGER = logging.getLogger(__name__)

COMMAND_FORMAT: Final = 1
"""Version of the command envelope."""

SNAPSHOT_FORMAT: Final = 1
"""Version of the snapshot image."""

MAX_KEY_BYTES: Final = 512
"""Longest key (UTF-8 bytes)."""

MAX_VALUE_BYTES: Final = 512 * 1024
"""Largest value (Consul's limit)."""

MAX_REQUEST_ID_BYTES: Final = 64
"""Longest request id."""

DEDUP_ENTRIES: Final = 10_000
"""Request ids remembered for deduplication (oldest forgotten first). Part of
the replicated semantics: every replica must use the same value."""

MAX_NODE_ID_BYTES: Final = 255
MAX_LABELS: Final = 64
MAX_LABEL_BYTES: Final = 253
MAX_SERIAL_CHARS: Final = 64
MAX_REASON_BYTES: Final = 1024
MAX_INDEX: Final = 2**63 - 1

DEFAULT_MAX_EVENTS: Final = 10_000
"""Changes kept for watchers by default (local, not replicated semantics)."""


class CommandKind(enum.IntEnum):
    """Command type tags (see the module docstring for the reserved ranges)."""

    KV_PUT = 1
    KV_DELETE = 2
    NODE_SET = 16
    NODE_CLEAR = 17
    DENY_ADD = 24
    DENY_REMOVE = 25


class ResultCode(enum.Enum):
    """How a command ended."""

    OK = "ok"
    CAS_FAILED = "cas_failed"
    """The compare-and-swap index did not match; nothing changed."""
    INVALID = "invalid"
    """The command was malformed or of an unknown kind; nothing changed."""


class Table(enum.Enum):
    """The kinds of records the state holds (for watches)."""

    KV = "kv"
    NODE = "node"
    DENY = "deny"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One key of the key-value store."""

    key: str
    value: bytes
    create_index: int
    """Log index of the put that created the key."""
    mod_index: int
    """Log index of the put that last changed it (the CAS token)."""

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form (``value`` stays bytes)."""
        return {
            "key": self.key,
            "value": self.value,
            "create_index": self.create_index,
            "mod_index": self.mod_index,
        }


@dataclass(frozen=True, slots=True)
class NodeOverride:
    """Operator settings for one node that outlive its restarts."""

    node: NodeId
    drain: bool
    """No new allocations are placed on the node; existing ones move away."""
    labels: tuple[tuple[str, str], ...]
    """Labels set by the operator, sorted; they override the node's own."""
    mod_index: int

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {
            "node": self.node,
            "drain": self.drain,
            "labels": dict(self.labels),
            "mod_index": self.mod_index,
        }


@dataclass(frozen=True, slots=True)
class DenyEntry:
    """A certificate serial that every link refuses."""

    serial: str
    """Lower-case hexadecimal certificate serial."""
    node: NodeId
    """The node the certificate was issued to."""
    reason: str
    mod_index: int

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {
            "serial": self.serial,
            "node": self.node,
            "reason": self.reason,
            "mod_index": self.mod_index,
        }


Record: TypeAlias = KvEntry | NodeOverride | DenyEntry


@dataclass(frozen=True, slots=True)
class Change:
    """One change, for watchers: ``record`` is the new record, or ``None`` if
    ``key`` was deleted."""

    index: int
    table: Table
    key: str
    record: Record | None


@dataclass(frozen=True, slots=True)
class Result:
    """What applying one command did (identical on every replica)."""

    code: ResultCode
    index: int
    """Log index at which the command took effect (for a duplicate: the
    original's index)."""
    mod_index: int = 0
    """The record's ``mod_index`` after the command (0: absent). For
    ``cas_failed``, the record's current ``mod_index``."""
    message: str = ""
    """Why it failed, for a person; empty on success."""
    duplicate: bool = False
    """The request id was seen before: this is the first attempt's result and
    nothing was applied again."""

    @property
    def ok(self) -> bool:
        """Whether the command took effect."""
        return self.code is ResultCode.OK

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {
            "ok": self.ok,
            "code": self.code.value,
            "index": self.index,
            "mod_index": self.mod_index,
            "message": self.message,
            "duplicate": self.duplicate,
        }

    def _encode(self) -> list[Any]:
        return [self.code.value, self.index, self.mod_index, self.message]

    @classmethod
    def _decode(cls, raw: Any) -> Result:
        code, index, mod_index, message = _array(raw, 4, "result")
        try:
            rc = ResultCode(code)
        except ValueError:
            raise _Invalid(f"result code {code!r:.20} is unknown") from None
        return cls(
            rc, _uint(index, "index"), _uint(mod_index, "mod_index"), _str(message, "message", 4096)
        )


# --------------------------------------------------------------------------- commands


class _Invalid(Exception):
    """A field failed validation (turned into Local- or RemoteProtocolError)."""


class _Command:
    """Base of the command dataclasses: envelope encoding and validation."""

    __slots__ = ()
    KIND: ClassVar[CommandKind]
    request_id: bytes

    def _fields(self) -> list[Any]:
        raise NotImplementedError

    def _validate(self) -> None:
        raise NotImplementedError

    def __post_init__(self) -> None:
        try:
            _bytes(self.request_id, "request_id", MAX_REQUEST_ID_BYTES)
            self._validate()
        except _Invalid as exc:
            raise LocalProtocolError(str(exc)) from None

    def encode(self) -> bytes:
        """The bytes to propose."""
        return wire.pack_body([COMMAND_FORMAT, int(self.KIND), self.request_id, *self._fields()])


@dataclass(frozen=True, slots=True)
class KvPut(_Command):
    """Set ``key`` to ``value``.

    ``cas``: ``None`` writes unconditionally; ``0`` only if the key does not
    exist; ``n > 0`` only if the key's ``mod_index`` is ``n``.
    """

    KIND: ClassVar[CommandKind] = CommandKind.KV_PUT
    key: str
    value: bytes
    cas: int | None = None
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.key, self.value, self.cas]

    def _validate(self) -> None:
        _key(self.key)
        _bytes(self.value, "value", MAX_VALUE_BYTES)
        _cas(self.cas)


@dataclass(frozen=True, slots=True)
class KvDelete(_Command):
    """Delete ``key``; ``cas`` as in :class:`KvPut`. Deleting a missing key is a
    successful no-op (``mod_index`` 0) unless ``cas`` > 0."""

    KIND: ClassVar[CommandKind] = CommandKind.KV_DELETE
    key: str
    cas: int | None = None
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.key, self.cas]

    def _validate(self) -> None:
        _key(self.key)
        _cas(self.cas)


@dataclass(frozen=True, slots=True)
class NodeSet(_Command):
    """Set a node's overrides; a ``None`` field keeps its current value
    (``labels`` replaces the whole label set when given)."""

    KIND: ClassVar[CommandKind] = CommandKind.NODE_SET
    node: NodeId
    drain: bool | None = None
    labels: tuple[tuple[str, str], ...] | None = None
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.node, self.drain, None if self.labels is None else dict(self.labels)]

    def _validate(self) -> None:
        _node(self.node)
        if self.drain is not None and not isinstance(self.drain, bool):
            raise _Invalid("drain must be a boolean or None")
        if self.labels is not None:
            if list(self.labels) != sorted(dict(self.labels).items()):
                raise _Invalid("labels must be sorted (key, value) pairs with unique keys")
            _labels(dict(self.labels))

    @classmethod
    def build(
        cls,
        node: NodeId,
        *,
        drain: bool | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: bytes = b"",
    ) -> NodeSet:
        """Build from a labels mapping (sorted here)."""
        pairs = None if labels is None else tuple(sorted(labels.items()))
        return cls(node, drain, pairs, request_id)


@dataclass(frozen=True, slots=True)
class NodeClear(_Command):
    """Remove every override of a node."""

    KIND: ClassVar[CommandKind] = CommandKind.NODE_CLEAR
    node: NodeId
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.node]

    def _validate(self) -> None:
        _node(self.node)


@dataclass(frozen=True, slots=True)
class DenyAdd(_Command):
    """Put a certificate serial on the deny list."""

    KIND: ClassVar[CommandKind] = CommandKind.DENY_ADD
    serial: str
    node: NodeId
    reason: str = ""
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.serial, self.node, self.reason]

    def _validate(self) -> None:
        _serial(self.serial)
        _node(self.node)
        _str(self.reason, "reason", MAX_REASON_BYTES)


@dataclass(frozen=True, slots=True)
class DenyRemove(_Command):
    """Take a certificate serial off the deny list."""

    KIND: ClassVar[CommandKind] = CommandKind.DENY_REMOVE
    serial: str
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.serial]

    def _validate(self) -> None:
        _serial(self.serial)


Command: TypeAlias = KvPut | KvDelete | NodeSet | NodeClear | DenyAdd | DenyRemove


def decode_command(data: bytes) -> Command:
    """Parse a command from an untrusted log entry payload.

    Raises:
        RemoteProtocolError: not a command this version understands.
    """
    raw = wire.unpack_body(data, MAX_VALUE_BYTES + 64 * 1024)
    if not isinstance(raw, list) or len(raw) < 3:
        raise RemoteProtocolError("command must be an array [format, kind, request_id, ...]")
    fmt, kind, request_id, *fields = raw
    if fmt != COMMAND_FORMAT or isinstance(fmt, bool):
        raise RemoteProtocolError(
            f"command format {fmt!r:.20} is not {COMMAND_FORMAT}; upgrade this meshd"
        )
    try:
        ck = CommandKind(kind) if isinstance(kind, int) and not isinstance(kind, bool) else None
    except ValueError:
        ck = None
    if ck is None:
        raise RemoteProtocolError(
            f"command kind {kind!r:.20} is not supported by this meshd version; upgrade it"
        )
    try:
        rid = _bytes(request_id, "request_id", MAX_REQUEST_ID_BYTES)
        cmd: Command
        if ck is CommandKind.KV_PUT:
            key, value, cas = _array(fields, 3, "kv_put")
            cmd = KvPut(_key(key), _bytes(value, "value", MAX_VALUE_BYTES), _cas(cas), rid)
        elif ck is CommandKind.KV_DELETE:
            key, cas = _array(fields, 2, "kv_delete")
            cmd = KvDelete(_key(key), _cas(cas), rid)
        elif ck is CommandKind.NODE_SET:
            node, drain, labels = _array(fields, 3, "node_set")
            if drain is not None and not isinstance(drain, bool):
                raise _Invalid("drain must be a boolean or nil")
            pairs = None if labels is None else tuple(sorted(_labels(labels).items()))
            cmd = NodeSet(_node(node), drain, pairs, rid)
        elif ck is CommandKind.NODE_CLEAR:
            (node,) = _array(fields, 1, "node_clear")
            cmd = NodeClear(_node(node), rid)
        elif ck is CommandKind.DENY_ADD:
            serial, node, reason = _array(fields, 3, "deny_add")
            cmd = DenyAdd(
                _serial(serial), _node(node), _str(reason, "reason", MAX_REASON_BYTES), rid
            )
        else:
            (serial,) = _array(fields, 1, "deny_remove")
            cmd = DenyRemove(_serial(serial), rid)
    except (_Invalid, LocalProtocolError) as exc:
        raise RemoteProtocolError(f"bad {ck.name.lower()} command: {exc}") from None
    return cmd


# --------------------------------------------------------------------------- the state


class MeshState:
    """The desired state of the cluster, built by applying committed entries.

    Args:
        max_events: changes kept for :meth:`changes_since` (a local choice:
            it does not affect results or snapshots).
    """

    def __init__(self, *, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        assert max_events > 0
        self._max_events = max_events
        self._applied = 0
        self._kv: dict[str, KvEntry] = {}
        self._keys: list[str] = []
        """Sorted keys of ``_kv``, for prefix listing."""
        self._nodes: dict[NodeId, NodeOverride] = {}
        self._deny: dict[str, DenyEntry] = {}
        self._dedup: OrderedDict[bytes, Result] = OrderedDict()
        self._events: deque[Change] = deque()
        self._events_floor = 0
        """Every change with an index above this is in ``_events``."""

    # ------------------------------------------------------------------ reads

    @property
    def applied_index(self) -> int:
        """Index of the last entry applied (or restored from a snapshot)."""
        return self._applied

    def get(self, key: str) -> KvEntry | None:
        """The entry for ``key``, or ``None``."""
        return self._kv.get(key)

    def items(self, prefix: str = "", limit: int | None = None) -> list[KvEntry]:
        """Entries whose key starts with ``prefix``, in key order, at most ``limit``."""
        out: list[KvEntry] = []
        i = bisect.bisect_left(self._keys, prefix)
        while i < len(self._keys) and self._keys[i].startswith(prefix):
            if limit is not None and len(out) >= limit:
                break
            out.append(self._kv[self._keys[i]])
            i += 1
        return out

    def __len__(self) -> int:
        """Number of keys in the key-value store."""
        return len(self._kv)

    def node_override(self, node: NodeId) -> NodeOverride | None:
        """The overrides of ``node``, if any."""
        return self._nodes.get(node)

    def node_overrides(self) -> list[NodeOverride]:
        """Every node override, sorted by node."""
        return [self._nodes[n] for n in sorted(self._nodes)]

    def is_denied(self, serial: str) -> bool:
        """Whether a certificate serial (hex, any case) is on the deny list."""
        return serial.lower() in self._deny

    def deny_list(self) -> list[DenyEntry]:
        """The deny list, sorted by serial."""
        return [self._deny[s] for s in sorted(self._deny)]

    @property
    def first_change_index(self) -> int:
        """:meth:`changes_since` accepts any index from this one on."""
        return self._events_floor

    def changes_since(
        self,
        index: int,
        *,
        table: Table | None = None,
        prefix: str = "",
        limit: int | None = None,
    ) -> list[Change]:
        """Changes applied after ``index``, oldest first (a watch resumes here).

        Args:
            index: the last index the watcher has seen (0: from the start).
            table: only changes of this table (default all).
            prefix: only changes whose key starts with this.
            limit: at most this many changes (the watcher asks again from the
                last one's index).

        Raises:
            Compacted: changes after ``index`` are no longer kept; read the
                whole state (or a snapshot) and resume from its index.
        """
        if index < self._events_floor:
            raise Compacted(
                f"changes since {index} are gone (kept from {self._events_floor}); "
                "read the full state and watch from its index"
            )
        out: list[Change] = []
        if index >= self._applied:
            return out
        # Events are in index order: skip older ones by bisecting on index.
        events = self._events
        lo, hi = 0, len(events)
        while lo < hi:
            mid = (lo + hi) // 2
            if events[mid].index <= index:
                lo = mid + 1
            else:
                hi = mid
        for i in range(lo, len(events)):
            ch = events[i]
            if (table is None or ch.table is table) and ch.key.startswith(prefix):
                out.append(ch)
                if limit is not None and len(out) >= limit:
                    break
        return out

    # ------------------------------------------------------------------ apply

    def apply(self, entry: Entry) -> Result | None:
        """Apply one committed entry; never raises for bad data (see module doc).

        Returns:
            The command's :class:`Result`, or ``None`` for entries that are not
            commands (a leader's empty entry, a membership change).
        """
        assert entry.index == self._applied + 1, (
            f"applying entry {entry.index} after {self._applied}: entries must be applied in order"
        )
        self._applied = entry.index
        if entry.kind is not EntryKind.NORMAL or not entry.data:
            return None
        try:
            cmd = decode_command(entry.data)
        except RemoteProtocolError as exc:
            LOGGER.warning("state_command_rejected index=%s reason=%s", entry.index, exc)
            return Result(ResultCode.INVALID, entry.index, message=str(exc))
        if cmd.request_id:
            seen = self._dedup.get(cmd.request_id)
            if seen is not None:
                return replace(seen, duplicate=True)
        result = self._execute(cmd, entry.index)
        if cmd.request_id:
            self._remember(cmd.request_id, result)
        return result

    def _remember(self, request_id: bytes, result: Result) -> None:
        self._dedup[request_id] = result
        while len(self._dedup) > DEDUP_ENTRIES:
            self._dedup.popitem(last=False)

    def _execute(self, cmd: Command, index: int) -> Result:
        if isinstance(cmd, KvPut):
            cur = self._kv.get(cmd.key)
            problem = _cas_problem(cmd.key, cur, cmd.cas)
            if problem:
                return Result(ResultCode.CAS_FAILED, index, cur.mod_index if cur else 0, problem)
            if cur is None:
                bisect.insort(self._keys, cmd.key)
            new = KvEntry(cmd.key, cmd.value, cur.create_index if cur else index, index)
            self._kv[cmd.key] = new
            self._record(Change(index, Table.KV, cmd.key, new))
            return Result(ResultCode.OK, index, index)
        if isinstance(cmd, KvDelete):
            cur = self._kv.get(cmd.key)
            problem = _cas_problem(cmd.key, cur, cmd.cas)
            if problem:
                return Result(ResultCode.CAS_FAILED, index, cur.mod_index if cur else 0, problem)
            if cur is None:
                return Result(ResultCode.OK, index, 0)
            del self._kv[cmd.key]
            del self._keys[bisect.bisect_left(self._keys, cmd.key)]
            self._record(Change(index, Table.KV, cmd.key, None))
            return Result(ResultCode.OK, index, 0)
        if isinstance(cmd, NodeSet):
            cur_node = self._nodes.get(cmd.node)
            drain = cmd.drain if cmd.drain is not None else (cur_node.drain if cur_node else False)
            if cmd.labels is not None:
                labels = cmd.labels
            else:
                labels = cur_node.labels if cur_node else ()
            override = NodeOverride(cmd.node, drain, labels, index)
            self._nodes[cmd.node] = override
            self._record(Change(index, Table.NODE, cmd.node, override))
            return Result(ResultCode.OK, index, index)
        if isinstance(cmd, NodeClear):
            if self._nodes.pop(cmd.node, None) is not None:
                self._record(Change(index, Table.NODE, cmd.node, None))
            return Result(ResultCode.OK, index, 0)
        if isinstance(cmd, DenyAdd):
            deny = DenyEntry(cmd.serial, cmd.node, cmd.reason, index)
            self._deny[cmd.serial] = deny
            self._record(Change(index, Table.DENY, cmd.serial, deny))
            return Result(ResultCode.OK, index, index)
        assert isinstance(cmd, DenyRemove)
        if self._deny.pop(cmd.serial, None) is not None:
            self._record(Change(index, Table.DENY, cmd.serial, None))
        return Result(ResultCode.OK, index, 0)

    def _record(self, change: Change) -> None:
        self._events.append(change)
        while len(self._events) > self._max_events:
            self._events_floor = self._events.popleft().index

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> bytes:
        """The whole state as bytes (deterministic: same state, same bytes)."""
        return wire.pack_body(
            [
                SNAPSHOT_FORMAT,
                self._applied,
                [[e.key, e.value, e.create_index, e.mod_index] for e in self.items()],
                [[o.node, o.drain, dict(o.labels), o.mod_index] for o in self.node_overrides()],
                [[d.serial, d.node, d.reason, d.mod_index] for d in self.deny_list()],
                [[rid, *res._encode()] for rid, res in self._dedup.items()],
            ]
        )

    def restore(self, data: bytes, index: int) -> None:
        """Replace the whole state with a snapshot image taken at ``index``.

        Raises:
            StorageError: the image is malformed or not taken at ``index``; the
                state is left unchanged.
        """
        try:
            fresh = self._decode_snapshot(data)
        except (_Invalid, RemoteProtocolError) as exc:
            raise StorageError(
                f"raft snapshot at index {index} holds a bad state image ({exc}); restore the "
                "data dir from a backup or rejoin with an empty one"
            ) from None
        if fresh._applied != index:
            raise StorageError(
                f"raft snapshot at index {index} holds a state image of index {fresh._applied}"
            )
        self._applied = fresh._applied
        self._kv = fresh._kv
        self._keys = fresh._keys
        self._nodes = fresh._nodes
        self._deny = fresh._deny
        self._dedup = fresh._dedup
        self._events = deque()
        self._events_floor = index

    def _decode_snapshot(self, data: bytes) -> MeshState:
        raw = wire.unpack_body(data, max(len(data), 1))
        fmt, applied, kv, nodes, deny, dedup = _array(raw, 6, "snapshot")
        if fmt != SNAPSHOT_FORMAT:
            raise _Invalid(f"snapshot format {fmt!r:.20} is not {SNAPSHOT_FORMAT}")
        st = MeshState(max_events=self._max_events)
        st._applied = _uint(applied, "applied")
        for item in _list(kv, "kv"):
            key, value, create, mod = _array(item, 4, "kv entry")
            k = _key(key)
            st._kv[k] = KvEntry(
                k,
                _bytes(value, "value", MAX_VALUE_BYTES),
                _uint(create, "create"),
                _uint(mod, "mod"),
            )
        st._keys = sorted(st._kv)
        for item in _list(nodes, "nodes"):
            node, drain, labels, mod = _array(item, 4, "node override")
            n = _node(node)
            if not isinstance(drain, bool):
                raise _Invalid("drain must be a boolean")
            st._nodes[n] = NodeOverride(
                n, drain, tuple(sorted(_labels(labels).items())), _uint(mod, "mod")
            )
        for item in _list(deny, "deny"):
            serial, node, reason, mod = _array(item, 4, "deny entry")
            s = _serial(serial)
            st._deny[s] = DenyEntry(
                s, _node(node), _str(reason, "reason", MAX_REASON_BYTES), _uint(mod, "mod")
            )
        for item in _list(dedup, "dedup"):
            if not isinstance(item, list) or len(item) != 5:
                raise _Invalid("dedup entry must be an array of 5")
            rid = _bytes(item[0], "request_id", MAX_REQUEST_ID_BYTES)
            st._dedup[rid] = Result._decode(item[1:])
        if len(st._dedup) > DEDUP_ENTRIES:
            raise _Invalid("dedup table is larger than DEDUP_ENTRIES")
        return st

    def digest(self) -> str:
        """A short hash of :meth:`snapshot` (compare replicas in tests and checks)."""
        return hashlib.blake2b(self.snapshot(), digest_size=16).hexdigest()


def _cas_problem(key: str, cur: KvEntry | None, cas: int | None) -> str:
    if cas is None:
        return ""
    if cas == 0:
        if cur is not None:
            return f"key {key!r} exists (mod_index {cur.mod_index}); cas 0 expects it absent"
        return ""
    if cur is None:
        return f"key {key!r} does not exist; cas {cas} expects mod_index {cas}"
    if cur.mod_index != cas:
        return f"key {key!r} is at mod_index {cur.mod_index}, not {cas}; read it again and retry"
    return ""


# --------------------------------------------------------------------------- validation


def _array(raw: Any, n: int, what: str) -> list[Any]:
    if not isinstance(raw, list) or len(raw) != n:
        raise _Invalid(f"{what} must be an array of {n} fields")
    return raw


def _list(raw: Any, what: str) -> list[Any]:
    if not isinstance(raw, list):
        raise _Invalid(f"{what} must be an array")
    return raw


def _uint(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_INDEX:
        raise _Invalid(f"{what} must be an integer in [0, 2**63)")
    return raw


def _bytes(raw: Any, what: str, max_len: int) -> bytes:
    if not isinstance(raw, bytes) or len(raw) > max_len:
        raise _Invalid(f"{what} must be at most {max_len} bytes")
    return raw


def _str(raw: Any, what: str, max_bytes: int) -> str:
    if not isinstance(raw, str) or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _Invalid(f"{what} must be text of at most {max_bytes} bytes")
    return raw


def _key(raw: Any) -> str:
    if (
        not isinstance(raw, str)
        or not raw
        or len(raw.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES
        or not raw.isprintable()
    ):
        raise _Invalid(f"key must be printable text of 1-{MAX_KEY_BYTES} bytes, got {raw!r:.60}")
    return raw


def _cas(raw: Any) -> int | None:
    if raw is None:
        return None
    return _uint(raw, "cas")


def _node(raw: Any) -> NodeId:
    if (
        not isinstance(raw, str)
        or not raw
        or len(raw.encode("utf-8", "surrogatepass")) > MAX_NODE_ID_BYTES
        or not raw.isprintable()
    ):
        raise _Invalid(f"node must be a printable id of 1-{MAX_NODE_ID_BYTES} bytes")
    return NodeId(raw)


def _labels(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or len(raw) > MAX_LABELS:
        raise _Invalid(f"labels must be a map of at most {MAX_LABELS} entries")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not k or not k.isprintable():
            raise _Invalid("label keys must be non-empty printable text")
        out[_str(k, "label key", MAX_LABEL_BYTES)] = _str(v, "label value", MAX_LABEL_BYTES)
    return out


def _serial(raw: Any) -> str:
    if (
        not isinstance(raw, str)
        or not 0 < len(raw) <= MAX_SERIAL_CHARS
        or raw != raw.lower()
        or any(c not in "0123456789abcdef" for c in raw)
    ):
        raise _Invalid(f"serial must be 1-{MAX_SERIAL_CHARS} lower-case hex digits")
    return raw


def iter_records(state: MeshState) -> Iterable[tuple[Table, str, Record]]:
    """Every record of ``state`` (a watcher's full read), in a stable order."""
    for e in state.items():
        yield Table.KV, e.key, e
    for o in state.node_overrides():
        yield Table.NODE, o.node, o
    for d in state.deny_list():
        yield Table.DENY, d.serial, d


__all__: Sequence[str] = (
    "COMMAND_FORMAT",
    "Change",
    "Command",
    "CommandKind",
    "DenyAdd",
    "DenyEntry",
    "DenyRemove",
    "KvDelete",
    "KvEntry",
    "KvPut",
    "MeshState",
    "NodeClear",
    "NodeOverride",
    "NodeSet",
    "Record",
    "Result",
    "ResultCode",
    "Table",
    "decode_command",
    "iter_records",
)
