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
  placement plans), 64-71 cluster configuration, 72-79 CA material, 96 a
  batch of key-value commands (below);
* ``request_id`` (0-64 bytes) makes a command idempotent: a command whose id
  is in the dedup table is not applied again, and the result recorded the
  first time is returned (flagged ``duplicate``). The table keeps the last
  :data:`DEDUP_ENTRIES` ids in apply order and travels in snapshots, so a
  client that retries after a leader change or a timeout with the *same*
  request id gets exactly-once semantics. Empty ids are never deduplicated.

A *batch* (:class:`Batch`, ``[format, 96, b"", [command, ...]]``) carries up to
:data:`MAX_BATCH_COMMANDS` key-value commands on distinct keys in one log
entry: the leader joins the writes proposed together (:class:`KvBatcher`), so
that the per-entry costs of Raft (log, WAL record, replication, apply
bookkeeping) are paid once per batch rather than once per write. Each command
of a batch is applied in order exactly as if it had an entry of its own at the
batch's index (its own request id, deduplication and result), so its records'
``mod_index`` is the batch's index; keys being distinct, a compare-and-swap
still names exactly one version. A batch with two commands on one key, another
batch inside, or a command that is not a put or a delete is invalid as a whole.

Implemented now: the key-value store (put with optional compare-and-swap on
the key's ``mod_index``, delete), node overrides (drain, labels), the deny
list of certificate serials, services (a spec blob with versions),
allocations (the committed placement plan plus the status each node reports
for its own allocations), the cluster configuration (:class:`ClusterConfig`:
the voter count, set with an optional compare-and-swap) and the CA material
(72-79): the registry of the certificates the CA issued (:class:`CertIssued`:
what ``meshctl node rm`` revokes), the CA (:class:`CaSet`) and the join token
(:class:`TokenSet`). A snapshot carries these in a tenth field, a map of later
sections, only once one is not empty, so images of clusters that use none of
them stay readable by older versions.

Secrets
-------

:class:`CaSet` carries the CA's private key and :class:`TokenSet` the join
token's secret, so that every Raft member can issue certificates and no node is
special. Those two secrets must reach the Raft members only, never the watchers
(every other node), yet every replica must agree on the state. So the state
records only the public part (:class:`ClusterCa`: the CA certificate and the
indexes of the two entries) and the same rules decide both commands without
looking at the secrets. The secrets go to a :class:`~mesh.raft.vault.Vault`,
which the node's Raft feed fills (:class:`~mesh.raft.watch.StateGate`) and Raft
snapshots carry (``snapshot(vault=...)``); the watch stream sends
redacted entries (:func:`redact`) and images without the vault. A redacted command has
the same kind, request id and public fields, hence the same effect and result.

Services and allocations
------------------------

A service's spec is an opaque, size-bounded blob here (the node layer encodes
and validates it); the state machine keeps what must be agreed on: its
``version`` (bumped by every change), its ``generation`` (bumped only by a
change that needs the replicas restarted, so that scaling is not a rolling
update), the previous spec and generation (``meshctl rollback``), and the
rollout status the leader records. Allocations name one replica: a slot of a
service (``slot`` -1 for a global service) on a node, at a generation. The
leader commits plans (:class:`AllocPlan`: run, stop, drop); a node reports the
observed state of its own allocations (:class:`AllocReport`), and a report
about another node's allocation is ignored, so a node can only speak for
itself. Allocation ids are assigned at apply time from a counter that travels
in snapshots: ``<service>-<slot>-<n>`` (``<service>-g-<n>`` for global), the
same on every replica.

Indexes and watches
-------------------

The log index of the entry that last changed a record is its ``mod_index``
(etcd's ``mod_revision``, Consul's ``ModifyIndex``); a key also keeps its
``create_index``. Every change is appended to a bounded event list;
:meth:`MeshState.changes_since` returns the changes after an index so that a
watch stream can resume where it stopped (one entry may make several changes at
its index; a limited page never splits them), or raises
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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, TypeAlias

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError, StorageError
from mesh.raft.messages import Entry, EntryKind
from mesh.raft.storage import Compacted
from mesh.types import AllocId, NodeId, ServiceId

LOGGER = logging.getLogger(__name__)

COMMAND_FORMAT: Final = 1
"""Version of the command envelope."""

STATE_LEVEL: Final = 2
"""The command kinds this version applies: 1, every kind up to ``CERT_ISSUED``
(72); 2, also ``CA_SET`` and ``TOKEN_SET``. A node announces its level in its
gossip metadata, and a command of a newer level is proposed only once every Raft
member announces it: a member of an older version would apply it as invalid, and
its state would differ from the others'."""

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

EXPECTED_COMMANDS: Final = 4096
"""Decoded commands :meth:`MeshState.expect` keeps (more than the proposals a
leader has in flight)."""

MAX_BATCH_COMMANDS: Final = 1024
"""Commands in one :class:`Batch`."""

MAX_BATCH_BYTES: Final = 1024 * 1024
"""Largest encoded :class:`Batch` (a command that would make a batch bigger is
proposed in an entry of its own)."""

MAX_NODE_ID_BYTES: Final = 255
MAX_LABELS: Final = 64
MAX_LABEL_BYTES: Final = 253
MAX_SERIAL_CHARS: Final = 64
MAX_REASON_BYTES: Final = 1024
MAX_INDEX: Final = 2**63 - 1
MAX_SERVICE_NAME_BYTES: Final = 63
"""A service name is one DNS label."""
MAX_SPEC_BYTES: Final = 256 * 1024
MAX_PLAN_OPS: Final = 4096
"""Operations in one allocation plan (a bigger plan is split by its proposer)."""
MAX_REPORTS: Final = 4096
MAX_MESSAGE_BYTES: Final = 512
MAX_PORTS: Final = 64
MAX_PEM_BYTES: Final = 16 * 1024
"""Largest CA certificate or key (PEM) in :class:`CaSet`."""
TOKEN_SECRET_BYTES: Final = 32
"""A join token's secret (:data:`mesh.security.token.SECRET_BYTES`)."""

ALLOC_STATES: Final = frozenset(
    {"pending", "starting", "running", "exited", "complete", "failed", "stopped"}
)
"""Observed states a node may report for an allocation (``pending`` until it does)."""
HEALTH_STATES: Final = frozenset({"none", "starting", "healthy", "unhealthy"})
ROLLOUT_STATES: Final = frozenset(
    {"", "updating", "paused", "rolling_back", "rolled_back", "completed"}
)

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
    SERVICE_PUT = 32
    SERVICE_DELETE = 33
    SERVICE_ROLLOUT = 34
    ALLOC_PLAN = 48
    ALLOC_REPORT = 49
    CONFIG_SET = 64
    CERT_ISSUED = 72
    CA_SET = 73
    TOKEN_SET = 74
    BATCH = 96


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
    SERVICE = "service"
    ALLOC = "alloc"
    CONFIG = "config"
    CERT = "cert"
    CA = "ca"


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


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A service as the state machine keeps it."""

    name: ServiceId
    spec: bytes
    """The encoded spec (opaque here; see :mod:`mesh.node.spec`)."""
    version: int
    """1 when created; bumped by every change of the spec."""
    generation: int
    """1 when created; bumped only by changes that need the replicas restarted.
    An allocation of an older generation is replaced by a rolling update."""
    previous: bytes
    """The spec before the last change (``b""`` for none): what rollback restores."""
    previous_generation: int
    rollout: str
    """``""``, ``updating``, ``paused``, ``rolling_back``, ``rolled_back`` or
    ``completed``: the leader's rolling-update state for :attr:`generation`."""
    rollout_message: str
    create_index: int
    mod_index: int

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form (``spec`` stays bytes)."""
        return {
            "name": self.name,
            "spec": self.spec,
            "version": self.version,
            "generation": self.generation,
            "previous_generation": self.previous_generation,
            "rollout": self.rollout,
            "rollout_message": self.rollout_message,
            "create_index": self.create_index,
            "mod_index": self.mod_index,
        }


@dataclass(frozen=True, slots=True)
class AllocRecord:
    """One replica of a service placed on one node: the plan's part (service,
    slot, node, generation, desired) and the node's report (the rest)."""

    id: AllocId
    service: ServiceId
    slot: int
    """Replica slot; -1 for a global service (named by its node)."""
    node: NodeId
    generation: int
    desired: str
    """``run`` or ``stop``."""
    state: str = "pending"
    """What the node last reported (see :data:`ALLOC_STATES`)."""
    health: str = "none"
    """``none`` (no check), ``starting``, ``healthy`` or ``unhealthy``."""
    ports: tuple[tuple[str, int], ...] = ()
    """Port name -> host port in use, sorted by name."""
    message: str = ""
    restarts: int = 0
    since: float = 0.0
    """Wall-clock seconds of the last state change, as the node saw it."""
    create_index: int = 0
    mod_index: int = 0

    @property
    def ready(self) -> bool:
        """Running and not failing its checks: DNS may answer with it."""
        return self.desired == "run" and self.state == "running" and self.health in (
            "none", "healthy")

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {
            "id": self.id,
            "service": self.service,
            "slot": self.slot,
            "node": self.node,
            "generation": self.generation,
            "desired": self.desired,
            "state": self.state,
            "health": self.health,
            "healthy": self.ready,
            "ports": dict(self.ports),
            "message": self.message,
            "restarts": self.restarts,
            "since": self.since,
            "create_index": self.create_index,
            "mod_index": self.mod_index,
        }


MAX_RAFT_VOTERS: Final = 15
"""Largest voter count the cluster configuration holds (the node refuses counts
it does not run: :data:`mesh.raft.voters.ALLOWED_VOTER_COUNTS`; the state
machine accepts any odd count up to this, so that a later version's counts do
not make older replicas disagree)."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The cluster-wide settings agreed through Raft (``meshctl raft config``).

    A field that is ``None`` was never set: each node then uses its own flag
    (e.g. ``--raft-voters``)."""

    raft_voters: int | None = None
    """Voters the leader keeps (fewer while fewer members qualify)."""
    mod_index: int = 0
    """Log index of the last change (0: never set; the CAS token)."""

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {"raft_voters": self.raft_voters, "mod_index": self.mod_index}


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A node certificate the cluster CA issued (what ``meshctl node rm`` revokes)."""

    serial: str
    """Lower-case hexadecimal certificate serial."""
    node: NodeId
    """The node it was issued to."""
    mod_index: int

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {"serial": self.serial, "node": self.node, "mod_index": self.mod_index}


@dataclass(frozen=True, slots=True)
class ClusterCa:
    """The cluster CA as every replica records it: its certificate and which log
    entries set it and the current join token. The CA's private key and the
    token's secret are not here: they live in the :class:`~mesh.raft.vault.Vault`
    of Raft members only (see "Secrets" in the module docstring)."""

    cert_pem: bytes = b""
    """The CA certificate (PEM; empty: no CA recorded yet)."""
    ca_index: int = 0
    """Log index that recorded the CA (0: none)."""
    token_index: int = 0
    """Log index of the current join token (0: none recorded; the CAS token of
    :class:`TokenSet`)."""

    def as_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready form."""
        return {"cert_pem": self.cert_pem.decode("ascii", "replace"),
                "ca_index": self.ca_index, "token_index": self.token_index}


CONFIG_KEY: Final = "cluster"
"""The key of the cluster configuration's changes (there is one record)."""

CA_KEY: Final = "ca"
"""The key of the cluster CA record's changes (there is one record)."""

Record: TypeAlias = (KvEntry | NodeOverride | DenyEntry | ServiceRecord | AllocRecord
                     | ClusterConfig | IssuedCert | ClusterCa)


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
class CertIssued(_Command):
    """Record a certificate the CA issued to ``node`` (idempotent: a serial is
    recorded once)."""

    KIND: ClassVar[CommandKind] = CommandKind.CERT_ISSUED
    serial: str
    node: NodeId
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.serial, self.node]

    def _validate(self) -> None:
        _serial(self.serial)
        _node(self.node)


@dataclass(frozen=True, slots=True)
class CaSet(_Command):
    """Record the cluster CA: its certificate and private key (PEM). Set once:
    a second one with another certificate fails (meshd does not rotate its CA);
    the same certificate again is a no-op.

    ``key_pem`` is a secret: empty in the copy watchers receive (:func:`redact`)."""

    KIND: ClassVar[CommandKind] = CommandKind.CA_SET
    cert_pem: bytes
    key_pem: bytes = b""
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.cert_pem, self.key_pem]

    def _validate(self) -> None:
        if not self.cert_pem:
            raise _Invalid("the CA certificate is empty")
        _bytes(self.cert_pem, "cert_pem", MAX_PEM_BYTES)
        _bytes(self.key_pem, "key_pem", MAX_PEM_BYTES)

    def redacted(self) -> CaSet:
        """This command without its secret."""
        return replace(self, key_pem=b"")


@dataclass(frozen=True, slots=True)
class TokenSet(_Command):
    """Make ``secret`` the join token's secret (the token names the recorded CA).

    ``cas``: ``None`` writes unconditionally (``meshctl token rotate``);
    otherwise only if the token's ``token_index`` is ``cas`` (0: the first token
    of a cluster whose CA was just recorded). Fails while no CA is recorded.

    ``secret`` is a secret: empty in the copy watchers receive (:func:`redact`)."""

    KIND: ClassVar[CommandKind] = CommandKind.TOKEN_SET
    secret: bytes
    cas: int | None = None
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.secret, self.cas]

    def _validate(self) -> None:
        if len(_bytes(self.secret, "secret", TOKEN_SECRET_BYTES)) not in (0, TOKEN_SECRET_BYTES):
            raise _Invalid(f"a join token secret is {TOKEN_SECRET_BYTES} bytes")
        _cas(self.cas)

    def redacted(self) -> TokenSet:
        """This command without its secret."""
        return replace(self, secret=b"")


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


@dataclass(frozen=True, slots=True)
class ConfigSet(_Command):
    """Change the cluster configuration: a field left ``None`` keeps its value.

    ``cas``: ``None`` writes unconditionally; otherwise only if the
    configuration's ``mod_index`` is ``cas`` (0: never set)."""

    KIND: ClassVar[CommandKind] = CommandKind.CONFIG_SET
    raft_voters: int | None = None
    cas: int | None = None
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.raft_voters, self.cas]

    def _validate(self) -> None:
        _voters(self.raft_voters)
        _cas(self.cas)


@dataclass(frozen=True, slots=True)
class ServicePut(_Command):
    """Create or change a service.

    ``restart``: the change needs the replicas restarted (bumps the
    generation); the proposer decides, since only it understands specs.
    ``cas`` as in :class:`KvPut`, on the service's ``mod_index``. Putting the
    spec a service already has changes nothing (``apply`` twice is a no-op).
    """

    KIND: ClassVar[CommandKind] = CommandKind.SERVICE_PUT
    name: ServiceId
    spec: bytes
    restart: bool = True
    cas: int | None = None
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.name, self.spec, self.restart, self.cas]

    def _validate(self) -> None:
        _service(self.name)
        _bytes(self.spec, "spec", MAX_SPEC_BYTES)
        if not self.spec:
            raise _Invalid("spec must not be empty")
        _bool(self.restart, "restart")
        _cas(self.cas)


@dataclass(frozen=True, slots=True)
class ServiceDelete(_Command):
    """Delete a service (its allocations are stopped by the next plan)."""

    KIND: ClassVar[CommandKind] = CommandKind.SERVICE_DELETE
    name: ServiceId
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.name]

    def _validate(self) -> None:
        _service(self.name)


@dataclass(frozen=True, slots=True)
class ServiceRollout(_Command):
    """The leader records the rolling-update state of a service's generation
    (ignored if the service has moved to another generation meanwhile)."""

    KIND: ClassVar[CommandKind] = CommandKind.SERVICE_ROLLOUT
    name: ServiceId
    generation: int
    rollout: str
    message: str = ""
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.name, self.generation, self.rollout, self.message]

    def _validate(self) -> None:
        _service(self.name)
        _uint(self.generation, "generation")
        _choice(self.rollout, "rollout", ROLLOUT_STATES)
        _str(self.message, "message", MAX_MESSAGE_BYTES)


@dataclass(frozen=True, slots=True)
class RunOp:
    """Plan operation: start ``slot`` of ``service`` on ``node`` at ``generation``."""

    service: ServiceId
    slot: int
    node: NodeId
    generation: int


@dataclass(frozen=True, slots=True)
class StopOp:
    """Plan operation: allocation ``alloc`` should stop (its node stops it and
    reports ``stopped``)."""

    alloc: AllocId


@dataclass(frozen=True, slots=True)
class DropOp:
    """Plan operation: forget allocation ``alloc`` (stopped, or its node is
    gone; a node that comes back stops what it runs without an allocation)."""

    alloc: AllocId


PlanOp: TypeAlias = RunOp | StopOp | DropOp


@dataclass(frozen=True, slots=True)
class AllocPlan(_Command):
    """A batch of allocation changes, applied in order as one command.

    A run of a service that no longer exists, or at a generation other than
    the service's current or previous one, is skipped (the plan was computed
    from an older state); stops and drops of unknown ids are no-ops.
    """

    KIND: ClassVar[CommandKind] = CommandKind.ALLOC_PLAN
    ops: tuple[PlanOp, ...]
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        out: list[Any] = []
        for op in self.ops:
            if isinstance(op, RunOp):
                out.append(["run", op.service, op.slot, op.node, op.generation])
            elif isinstance(op, StopOp):
                out.append(["stop", op.alloc])
            else:
                out.append(["drop", op.alloc])
        return [out]

    def _validate(self) -> None:
        if len(self.ops) > MAX_PLAN_OPS:
            raise _Invalid(f"a plan holds at most {MAX_PLAN_OPS} operations")
        for op in self.ops:
            if isinstance(op, RunOp):
                _service(op.service)
                _slot(op.slot)
                _node(op.node)
                _uint(op.generation, "generation")
            elif isinstance(op, (StopOp, DropOp)):
                _alloc(op.alloc)
            else:
                raise _Invalid(f"plan operation {op!r:.60} is not RunOp, StopOp or DropOp")


@dataclass(frozen=True, slots=True)
class Report:
    """What a node observed about one of its allocations."""

    alloc: AllocId
    state: str
    health: str = "none"
    ports: tuple[tuple[str, int], ...] = ()
    message: str = ""
    restarts: int = 0
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class AllocReport(_Command):
    """A node reports the observed state of its own allocations."""

    KIND: ClassVar[CommandKind] = CommandKind.ALLOC_REPORT
    node: NodeId
    reports: tuple[Report, ...]
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [self.node, [[r.alloc, r.state, r.health, dict(r.ports), r.message,
                             r.restarts, r.since] for r in self.reports]]

    def _validate(self) -> None:
        _node(self.node)
        if len(self.reports) > MAX_REPORTS:
            raise _Invalid(f"a report holds at most {MAX_REPORTS} allocations")
        for r in self.reports:
            _report(r)


@dataclass(frozen=True, slots=True)
class Batch(_Command):
    """Key-value commands on distinct keys, applied in order at one log index as
    if each had an entry of its own (see "Commands" in the module docstring).
    :func:`encode_batch` builds the same bytes from commands already encoded."""

    KIND: ClassVar[CommandKind] = CommandKind.BATCH
    commands: tuple[KvPut | KvDelete, ...]
    request_id: bytes = b""

    def _fields(self) -> list[Any]:
        return [[[COMMAND_FORMAT, int(c.KIND), c.request_id, *c._fields()]
                 for c in self.commands]]

    def _validate(self) -> None:
        if self.request_id:
            raise _Invalid("a batch has no request id (its commands have theirs)")
        if not 0 < len(self.commands) <= MAX_BATCH_COMMANDS:
            raise _Invalid(f"a batch holds 1 to {MAX_BATCH_COMMANDS} commands")
        keys = set()
        for c in self.commands:
            if type(c) is not KvPut and type(c) is not KvDelete:
                raise _Invalid(f"a batch holds key-value commands only, not {c.KIND.name}")
            keys.add(c.key)
        if len(keys) != len(self.commands):
            raise _Invalid("a batch has two commands on one key")


Command: TypeAlias = (KvPut | KvDelete | NodeSet | NodeClear | DenyAdd | DenyRemove
                      | ServicePut | ServiceDelete | ServiceRollout | AllocPlan | AllocReport
                      | ConfigSet | CertIssued | CaSet | TokenSet | Batch)

Applied: TypeAlias = Result | tuple[Result, ...] | None
"""What :meth:`MeshState.apply` returns for one entry: a command's result, one
result per command of a :class:`Batch`, or ``None`` for an entry that holds no
command."""

_COMMAND_KINDS: Final = {int(k): k for k in CommandKind}

_MAX_COMMAND_BYTES: Final = MAX_VALUE_BYTES + 64 * 1024
"""Largest encoded command other than a batch."""

_BATCH_HEAD: Final = bytes((0x94,)) + wire.pack_body(COMMAND_FORMAT) + wire.pack_body(
    int(CommandKind.BATCH)) + wire.pack_body(b"")
"""A batch's bytes up to its list of commands: a 4-element array's header, the
format, the kind and the empty request id."""

BATCH_OVERHEAD_BYTES: Final = len(_BATCH_HEAD) + 5
"""A batch's bytes beyond its commands' (the head and the longest array header)."""


def encode_batch(commands: Sequence[bytes]) -> bytes:
    """The bytes of the :class:`Batch` of ``commands`` (each one command's
    :meth:`encode`), without decoding them: a msgpack array is its header
    followed by its elements."""
    return b"".join((_BATCH_HEAD, wire.pack_array_header(len(commands)), *commands))


class KvBatcher:
    """Joins the key-value writes a leader proposes together into one
    :class:`Batch` entry (the ``batcher`` of the node's
    :class:`~mesh.raft.adapter.RaftAdapter`; the caller keeps keys distinct by
    proposing each write with its key as the batch key).

    Args:
        state: the state the batch will be applied to; the commands it expects
            (:meth:`MeshState.expect`) become one expected batch.
    """

    max_commands: Final = MAX_BATCH_COMMANDS
    max_bytes: Final = MAX_BATCH_BYTES - BATCH_OVERHEAD_BYTES

    def __init__(self, state: MeshState) -> None:
        self._state = state

    def join(self, commands: Sequence[bytes]) -> bytes:
        """One batch command holding ``commands``, in order."""
        data = encode_batch(commands)
        self._state.expect_batch(data, commands)
        return data


def decode_command(data: bytes) -> Command:
    """Parse a command from an untrusted log entry payload.

    Raises:
        RemoteProtocolError: not a command this version understands.
    """
    raw = wire.unpack_body(data, MAX_BATCH_BYTES)
    if len(data) > _MAX_COMMAND_BYTES and not (
            type(raw) is list and len(raw) > 1 and raw[1] == CommandKind.BATCH):
        raise RemoteProtocolError(
            f"body of {len(data)} bytes exceeds limit {_MAX_COMMAND_BYTES}")
    return _parse_command(raw, batch_ok=True)


def _parse_command(raw: Any, *, batch_ok: bool) -> Command:
    if not isinstance(raw, list) or len(raw) < 3:
        raise RemoteProtocolError("command must be an array [format, kind, request_id, ...]")
    fmt, kind, request_id, *fields = raw
    if fmt != COMMAND_FORMAT or isinstance(fmt, bool):
        raise RemoteProtocolError(
            f"command format {fmt!r:.20} is not {COMMAND_FORMAT}; upgrade this meshd"
        )
    ck = _COMMAND_KINDS.get(kind) if type(kind) is int else None
    if ck is None:
        raise RemoteProtocolError(
            f"command kind {kind!r:.20} is not supported by this meshd version; upgrade it"
        )
    try:
        rid = _bytes(request_id, "request_id", MAX_REQUEST_ID_BYTES)
        cmd: Command
        if ck is CommandKind.KV_PUT:  # the hot path: KvPut validates its fields itself
            key, value, cas = _array(fields, 3, "kv_put")
            cmd = KvPut(key, value, cas, rid)
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
        elif ck is CommandKind.DENY_REMOVE:
            (serial,) = _array(fields, 1, "deny_remove")
            cmd = DenyRemove(_serial(serial), rid)
        elif ck is CommandKind.CONFIG_SET:
            voters, cas = _array(fields, 2, "config_set")
            cmd = ConfigSet(_voters(voters), _cas(cas), rid)
        elif ck is CommandKind.CERT_ISSUED:
            serial, node = _array(fields, 2, "cert_issued")
            cmd = CertIssued(_serial(serial), _node(node), rid)
        elif ck is CommandKind.CA_SET:
            cert_pem, key_pem = _array(fields, 2, "ca_set")
            cmd = CaSet(cert_pem, key_pem, rid)
        elif ck is CommandKind.TOKEN_SET:
            secret, cas = _array(fields, 2, "token_set")
            cmd = TokenSet(secret, _cas(cas), rid)
        elif ck is CommandKind.SERVICE_PUT:
            name, spec, restart, cas = _array(fields, 4, "service_put")
            cmd = ServicePut(_service(name), _bytes(spec, "spec", MAX_SPEC_BYTES),
                             _bool(restart, "restart"), _cas(cas), rid)
        elif ck is CommandKind.SERVICE_DELETE:
            (name,) = _array(fields, 1, "service_delete")
            cmd = ServiceDelete(_service(name), rid)
        elif ck is CommandKind.SERVICE_ROLLOUT:
            name, generation, rollout, message = _array(fields, 4, "service_rollout")
            cmd = ServiceRollout(_service(name), _uint(generation, "generation"),
                                 _choice(rollout, "rollout", ROLLOUT_STATES),
                                 _str(message, "message", MAX_MESSAGE_BYTES), rid)
        elif ck is CommandKind.ALLOC_PLAN:
            (raw_ops,) = _array(fields, 1, "alloc_plan")
            cmd = AllocPlan(tuple(_plan_op(op) for op in _list(raw_ops, "ops")), rid)
        elif ck is CommandKind.ALLOC_REPORT:
            node, raw_reports = _array(fields, 2, "alloc_report")
            reports = tuple(_decode_report(r) for r in _list(raw_reports, "reports"))
            cmd = AllocReport(_node(node), reports, rid)
        else:
            if not batch_ok:
                raise _Invalid("a batch inside a batch")
            (raw_cmds,) = _array(fields, 1, "batch")
            cmd = Batch(_parse_batched(_list(raw_cmds, "commands")), rid)
    except (_Invalid, LocalProtocolError) as exc:
        raise RemoteProtocolError(f"bad {ck.name.lower()} command: {exc}") from None
    return cmd


def _parse_batched(raw_cmds: list[Any]) -> tuple[KvPut | KvDelete, ...]:
    """The commands of a batch (its hot path: a put's fields go straight to
    :class:`KvPut`, which validates them).

    Raises:
        _Invalid: one of them is not a key-value command.
        RemoteProtocolError: one of them is malformed.
    """
    out: list[KvPut | KvDelete] = []
    for raw in raw_cmds:
        if (type(raw) is list and len(raw) == 6 and raw[1] == _KV_PUT_KIND
                and type(raw[1]) is int and raw[0] == COMMAND_FORMAT and type(raw[0]) is int):
            out.append(KvPut(raw[3], raw[4], raw[5], raw[2]))
            continue
        c = _parse_command(raw, batch_ok=False)
        if type(c) is not KvPut and type(c) is not KvDelete:
            raise _Invalid("a batch holds key-value commands only")
        out.append(c)
    return tuple(out)


_KV_PUT_KIND: Final = int(CommandKind.KV_PUT)

_LATER_SECTIONS: Final = frozenset({"config", "issued", "ca", "vault"})

_SECRET_KINDS: Final = frozenset({int(CommandKind.CA_SET), int(CommandKind.TOKEN_SET)})


def carries_secrets(entry: Entry) -> bool:
    """Whether ``entry`` may hold a command with secrets (:class:`CaSet`,
    :class:`TokenSet`). Cheap: a command's kind is its third byte (the array
    header and the format are one byte each; these kinds are positive fixints)."""
    data = entry.data
    return len(data) > 2 and data[2] in _SECRET_KINDS and entry.kind is EntryKind.NORMAL


def redact(entry: Entry) -> Entry:
    """``entry`` as a node outside the Raft group receives it: a command that
    carries secrets is re-encoded without them (same kind, request id and public
    fields, so it has the same effect on :class:`MeshState` and the same result);
    one that does not decode keeps only its first bytes, which do not decode
    either. Any other entry is returned as it is."""
    if not carries_secrets(entry):
        return entry
    try:
        cmd = decode_command(entry.data)
    except RemoteProtocolError:
        return replace(entry, data=entry.data[:3])
    if not isinstance(cmd, (CaSet, TokenSet)):  # crafted bytes that fooled the sniff
        return replace(entry, data=entry.data[:3])
    return replace(entry, data=cmd.redacted().encode())


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
        self._services: dict[ServiceId, ServiceRecord] = {}
        self._allocs: dict[AllocId, AllocRecord] = {}
        self._alloc_seq = 0
        """The last allocation number handed out (ids are never reused)."""
        self._config = ClusterConfig()
        self._issued: dict[str, IssuedCert] = {}
        self._ca = ClusterCa()
        self._dedup: OrderedDict[bytes, Result] = OrderedDict()
        self._events: deque[Change] = deque()
        self._events_floor = 0
        self._table_floor: dict[Table, int] = {}
        """Per table, the index of its latest change dropped from ``_events`` (or
        of the last restore): its changes after that are all kept."""
        """Every change with an index above this is in ``_events``."""
        self._table_changed: dict[Table, int] = {}
        """Per table, the index of its latest change (see :meth:`last_change`)."""
        self._ok = Result(ResultCode.OK, 0)
        """The result of a successful put at ``_ok.index`` (the puts of a batch
        share it)."""
        self._vault_section: list[bytes] | None = None
        """Set on a state decoded from an image only (see :meth:`restore`)."""
        self._expected: OrderedDict[bytes, Command] = OrderedDict()
        """Commands this node built or validated, by their encoded bytes (see
        :meth:`expect`)."""

    # ------------------------------------------------------------------ reads

    @property
    def applied_index(self) -> int:
        """Index of the last entry applied (or restored from a snapshot)."""
        return self._applied

    def last_change(self, table: Table) -> int:
        """Index of the latest change to ``table`` (a restored snapshot counts as a
        change of every table; 0: none yet). A follower that saw the state at
        index ``i`` has news of ``table`` exactly when this is above ``i``; cheaper
        than :meth:`changes_since` when most changes are of other tables."""
        return self._table_changed.get(table, 0)

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

    def cluster_config(self) -> ClusterConfig:
        """The cluster-wide settings (:class:`ClusterConfig`)."""
        return self._config

    def issued_certs(self) -> list[IssuedCert]:
        """Every certificate recorded as issued, by serial."""
        return [self._issued[s] for s in sorted(self._issued)]

    def cluster_ca(self) -> ClusterCa:
        """The cluster CA record (empty until the CA is recorded)."""
        return self._ca

    def issued_to(self, node: NodeId) -> list[IssuedCert]:
        """The certificates recorded as issued to ``node``, by serial."""
        return [c for c in self.issued_certs() if c.node == node]

    def service(self, name: ServiceId) -> ServiceRecord | None:
        """The service called ``name``, if any."""
        return self._services.get(name)

    def services(self) -> list[ServiceRecord]:
        """Every service, sorted by name."""
        return [self._services[n] for n in sorted(self._services)]

    def alloc(self, alloc: AllocId) -> AllocRecord | None:
        """The allocation ``alloc``, if any."""
        return self._allocs.get(alloc)

    def allocs(self, *, service: ServiceId | None = None,
               node: NodeId | None = None) -> list[AllocRecord]:
        """Allocations (optionally of one service and/or on one node), sorted by
        service, slot and id."""
        out = [a for a in self._allocs.values()
               if (service is None or a.service == service) and (node is None or a.node == node)]
        out.sort(key=lambda a: (a.service, a.slot, a.id))
        return out

    @property
    def first_change_index(self) -> int:
        """:meth:`changes_since` accepts any index from this one on."""
        return self._events_floor

    def changes_since(
        self,
        index: int,
        *,
        table: Table | Collection[Table] | None = None,
        prefix: str = "",
        limit: int | None = None,
    ) -> list[Change]:
        """Changes applied after ``index``, oldest first (a watch resumes here).

        Args:
            index: the last index the watcher has seen (0: from the start).
            table: only changes of this table, or of these tables (default
                all). Changes of other tables dropped from the bounded list
                meanwhile do not make this call raise ``Compacted``.
            prefix: only changes whose key starts with this.
            limit: cut the list after the ``limit``-th change (positive), but
                never inside one log index: one entry may make several changes
                (an allocation plan, several KV commands), all at its index, so
                the list runs on to the last change of that index and may hold
                more than ``limit``. Every change at the last index returned is
                in the list: the watcher resumes with ``changes_since(last.index)``.

        Raises:
            Compacted: changes after ``index`` are no longer kept; read the
                whole state (or a snapshot) and resume from its index.
        """
        assert limit is None or limit > 0, f"limit {limit} must be positive"
        tables: Collection[Table] | None = (table,) if isinstance(table, Table) else table
        floor = self._events_floor if tables is None else max(
            (self._table_floor.get(t, 0) for t in tables), default=0)
        if index < floor:
            raise Compacted(
                f"changes since {index} are gone (kept from {floor}); "
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
        cut: int | None = None  # once ``limit`` is reached: the last index still taken
        for i in range(lo, len(events)):
            ch = events[i]
            if cut is not None and ch.index > cut:
                break
            if (tables is None or ch.table in tables) and ch.key.startswith(prefix):
                out.append(ch)
                if cut is None and limit is not None and len(out) >= limit:
                    cut = ch.index
        return out

    # ------------------------------------------------------------------ apply

    def expect(self, data: bytes, command: Command) -> None:
        """Note that ``data`` encodes ``command`` (this node built or decoded it and
        is about to propose it): applying an entry with exactly these bytes then
        skips decoding them again. Only a cache: at most :data:`EXPECTED_COMMANDS`
        are kept, and an entry whose bytes were not noted is decoded as usual."""
        self._expected[data] = command
        if len(self._expected) > EXPECTED_COMMANDS:
            self._expected.popitem(last=False)

    def expect_batch(self, data: bytes, commands: Sequence[bytes]) -> None:
        """Like :meth:`expect`, for the batch ``data`` of ``commands`` (see
        :class:`KvBatcher`): if every one of them is expected, the batch is
        expected instead."""
        parts: list[KvPut | KvDelete] = []
        for c in commands:
            cmd = self._expected.pop(c, None)
            if type(cmd) is not KvPut and type(cmd) is not KvDelete:
                return  # not noted (or forgotten): decoded when applied
            parts.append(cmd)
        try:
            self.expect(data, Batch(tuple(parts)))
        except LocalProtocolError:
            pass  # not a valid batch: applying it says so

    def apply(self, entry: Entry) -> Applied:
        """Apply one committed entry; never raises for bad data (see module doc).

        Returns:
            The command's :class:`Result`; for a :class:`Batch`, a tuple with the
            result of each of its commands (one invalid :class:`Result` if the
            batch itself is invalid); ``None`` for entries that are not commands
            (a leader's empty entry, a membership change).
        """
        assert entry.index == self._applied + 1, (
            f"applying entry {entry.index} after {self._applied}: entries must be applied in order"
        )
        self._applied = entry.index
        if entry.kind is not EntryKind.NORMAL or not entry.data:
            return None
        cmd = self._expected.pop(entry.data, None) if self._expected else None
        if cmd is None:
            try:
                cmd = decode_command(entry.data)
            except RemoteProtocolError as exc:
                LOGGER.warning("state_command_rejected index=%s reason=%s", entry.index, exc)
                return Result(ResultCode.INVALID, entry.index, message=str(exc))
        if type(cmd) is Batch:
            return tuple([self._apply_command(c, entry.index) for c in cmd.commands])
        return self._apply_command(cmd, entry.index)

    def _apply_command(self, cmd: Command, index: int) -> Result:
        if cmd.request_id:
            seen = self._dedup.get(cmd.request_id)
            if seen is not None:
                return replace(seen, duplicate=True)
        result = self._execute(cmd, index)
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
            ok = self._ok
            if ok.index != index:  # one shared (immutable) result per batch
                ok = self._ok = Result(ResultCode.OK, index, index)
            return ok
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
        if isinstance(cmd, DenyRemove):
            if self._deny.pop(cmd.serial, None) is not None:
                self._record(Change(index, Table.DENY, cmd.serial, None))
            return Result(ResultCode.OK, index, 0)
        if isinstance(cmd, ServicePut):
            return self._service_put(cmd, index)
        if isinstance(cmd, ServiceDelete):
            if self._services.pop(cmd.name, None) is not None:
                self._record(Change(index, Table.SERVICE, cmd.name, None))
            return Result(ResultCode.OK, index, 0)
        if isinstance(cmd, ServiceRollout):
            svc = self._services.get(cmd.name)
            if svc is None or svc.generation != cmd.generation:
                return Result(ResultCode.OK, index, svc.mod_index if svc else 0,
                              "the service moved on; rollout state not recorded")
            if (svc.rollout, svc.rollout_message) == (cmd.rollout, cmd.message):
                return Result(ResultCode.OK, index, svc.mod_index)
            new_svc = replace(svc, rollout=cmd.rollout, rollout_message=cmd.message,
                              mod_index=index)
            self._services[cmd.name] = new_svc
            self._record(Change(index, Table.SERVICE, cmd.name, new_svc))
            return Result(ResultCode.OK, index, index)
        if isinstance(cmd, ConfigSet):
            return self._config_set(cmd, index)
        if isinstance(cmd, CertIssued):
            known = self._issued.get(cmd.serial)
            if known is not None:
                return Result(ResultCode.OK, index, known.mod_index)
            cert = self._issued[cmd.serial] = IssuedCert(cmd.serial, cmd.node, index)
            self._record(Change(index, Table.CERT, cmd.serial, cert))
            return Result(ResultCode.OK, index, index)
        if isinstance(cmd, CaSet):
            return self._ca_set(cmd, index)
        if isinstance(cmd, TokenSet):
            return self._token_set(cmd, index)
        if isinstance(cmd, AllocPlan):
            for op in cmd.ops:
                self._plan_op(op, index)
            return Result(ResultCode.OK, index, index)
        assert isinstance(cmd, AllocReport)
        for report in cmd.reports:
            held = self._allocs.get(report.alloc)
            if held is None or held.node != cmd.node:
                continue  # a node speaks only for its own allocations
            fresh = replace(held, state=report.state, health=report.health,
                            ports=report.ports, message=report.message,
                            restarts=report.restarts, since=report.since, mod_index=index)
            if replace(fresh, mod_index=held.mod_index) != held:
                self._allocs[held.id] = fresh
                self._record(Change(index, Table.ALLOC, held.id, fresh))
        return Result(ResultCode.OK, index, index)

    def _config_set(self, cmd: ConfigSet, index: int) -> Result:
        cur = self._config
        if cmd.cas is not None and cmd.cas != cur.mod_index:
            return Result(ResultCode.CAS_FAILED, index, cur.mod_index,
                          f"the cluster configuration is at index {cur.mod_index}, not "
                          f"{cmd.cas}; read it again and retry")
        voters = cmd.raft_voters if cmd.raft_voters is not None else cur.raft_voters
        if voters == cur.raft_voters:
            return Result(ResultCode.OK, index, cur.mod_index)
        self._config = ClusterConfig(voters, index)
        self._record(Change(index, Table.CONFIG, CONFIG_KEY, self._config))
        return Result(ResultCode.OK, index, index)

    def _ca_set(self, cmd: CaSet, index: int) -> Result:
        cur = self._ca
        if cur.ca_index:
            if cur.cert_pem == cmd.cert_pem:
                return Result(ResultCode.OK, index, cur.ca_index)
            return Result(ResultCode.CAS_FAILED, index, cur.ca_index,
                          f"the cluster CA was recorded at index {cur.ca_index} with another "
                          "certificate; meshd does not replace its CA")
        self._ca = ClusterCa(cmd.cert_pem, index, 0)
        self._record(Change(index, Table.CA, CA_KEY, self._ca))
        return Result(ResultCode.OK, index, index)

    def _token_set(self, cmd: TokenSet, index: int) -> Result:
        cur = self._ca
        if not cur.ca_index:
            return Result(ResultCode.CAS_FAILED, index, 0,
                          "no cluster CA is recorded yet, so a join token cannot name it")
        if cmd.cas is not None and cmd.cas != cur.token_index:
            return Result(ResultCode.CAS_FAILED, index, cur.token_index,
                          f"the join token is at index {cur.token_index}, not {cmd.cas}")
        self._ca = replace(cur, token_index=index)
        self._record(Change(index, Table.CA, CA_KEY, self._ca))
        return Result(ResultCode.OK, index, index)

    def _service_put(self, cmd: ServicePut, index: int) -> Result:
        cur = self._services.get(cmd.name)
        if cmd.cas is not None:
            have = cur.mod_index if cur else 0
            if (cmd.cas == 0) != (cur is None) or (cmd.cas and cmd.cas != have):
                return Result(ResultCode.CAS_FAILED, index, have,
                              f"service {cmd.name} is at index {have}, not {cmd.cas}; "
                              "read it again and retry")
        if cur is None:
            new = ServiceRecord(cmd.name, cmd.spec, 1, 1, b"", 0, "", "", index, index)
        elif cur.spec == cmd.spec:
            return Result(ResultCode.OK, index, cur.mod_index)
        else:
            generation = cur.generation + 1 if cmd.restart else cur.generation
            new = ServiceRecord(
                cmd.name, cmd.spec, cur.version + 1, generation, cur.spec, cur.generation,
                cur.rollout if generation == cur.generation else "",
                cur.rollout_message if generation == cur.generation else "",
                cur.create_index, index)
        self._services[cmd.name] = new
        self._record(Change(index, Table.SERVICE, cmd.name, new))
        return Result(ResultCode.OK, index, index)

    def _plan_op(self, op: PlanOp, index: int) -> None:
        if isinstance(op, RunOp):
            svc = self._services.get(op.service)
            if svc is None or op.generation not in (svc.generation, svc.previous_generation):
                return
            self._alloc_seq += 1
            slot = "g" if op.slot < 0 else str(op.slot)
            alloc = AllocId(f"{op.service}-{slot}-{self._alloc_seq}")
            new = AllocRecord(alloc, op.service, op.slot, op.node, op.generation, "run",
                              create_index=index, mod_index=index)
            self._allocs[alloc] = new
            self._record(Change(index, Table.ALLOC, alloc, new))
            return
        cur = self._allocs.get(op.alloc)
        if cur is None:
            return
        if isinstance(op, DropOp):
            del self._allocs[op.alloc]
            self._record(Change(index, Table.ALLOC, op.alloc, None))
        elif cur.desired != "stop":
            new = replace(cur, desired="stop", mod_index=index)
            self._allocs[op.alloc] = new
            self._record(Change(index, Table.ALLOC, op.alloc, new))

    def _record(self, change: Change) -> None:
        self._table_changed[change.table] = change.index
        self._events.append(change)
        while len(self._events) > self._max_events:
            dropped = self._events.popleft()
            self._events_floor = self._table_floor[dropped.table] = dropped.index

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, vault: list[bytes] | None = None) -> bytes:
        """The whole state as bytes (deterministic: same state, same bytes).

        Args:
            vault: the secrets a Raft snapshot carries besides the state
                (:meth:`mesh.raft.vault.Vault.section`); ``None`` for an image
                that leaves the node's Raft group (a watcher's).
        """
        later = self._later_sections()
        if vault is not None:
            later["vault"] = vault
        return wire.pack_body(
            [
                SNAPSHOT_FORMAT,
                self._applied,
                [[e.key, e.value, e.create_index, e.mod_index] for e in self.items()],
                [[o.node, o.drain, dict(o.labels), o.mod_index] for o in self.node_overrides()],
                [[d.serial, d.node, d.reason, d.mod_index] for d in self.deny_list()],
                [[rid, *res._encode()] for rid, res in self._dedup.items()],
                [[v.name, v.spec, v.version, v.generation, v.previous, v.previous_generation,
                  v.rollout, v.rollout_message, v.create_index, v.mod_index]
                 for v in self.services()],
                [[a.id, a.service, a.slot, a.node, a.generation, a.desired, a.state, a.health,
                  dict(a.ports), a.message, a.restarts, a.since, a.create_index, a.mod_index]
                 for a in sorted(self._allocs.values(), key=lambda a: a.id)],
                self._alloc_seq,
                # Later sections, only when not empty: an image without them stays
                # readable by older versions.
                *([later] if later else []),
            ]
        )

    def _later_sections(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._config.mod_index:
            out["config"] = [self._config.raft_voters, self._config.mod_index]
        if self._issued:
            out["issued"] = [[c.serial, c.node, c.mod_index]
                             for c in sorted(self._issued.values(), key=lambda c: c.serial)]
        if self._ca.ca_index:
            out["ca"] = [self._ca.cert_pem, self._ca.ca_index, self._ca.token_index]
        return out

    def restore(self, data: bytes, index: int) -> list[bytes] | None:
        """Replace the whole state with a snapshot image taken at ``index``.

        Returns:
            The image's vault section (what ``snapshot(vault=...)`` was given;
            ``None`` if it has none): the caller that keeps the vault restores it.

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
        self._services = fresh._services
        self._allocs = fresh._allocs
        self._alloc_seq = fresh._alloc_seq
        self._config = fresh._config
        self._issued = fresh._issued
        self._ca = fresh._ca
        self._dedup = fresh._dedup
        self._events = deque()
        self._events_floor = index
        self._table_floor = dict.fromkeys(Table, index)
        self._table_changed = dict.fromkeys(Table, index)  # anything may have changed
        return fresh._vault_section

    def _decode_snapshot(self, data: bytes) -> MeshState:
        raw = wire.unpack_body(data, max(len(data), 1))
        later: Any = {}
        if isinstance(raw, list) and len(raw) == 10:
            *raw, later = raw
            if not isinstance(later, dict) or not set(later) <= _LATER_SECTIONS:
                raise _Invalid("the snapshot's later sections must be a map of "
                               + ", ".join(sorted(_LATER_SECTIONS)))
        fmt, applied, kv, nodes, deny, dedup, services, allocs, seq = _array(raw, 9, "snapshot")
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
        for item in _list(services, "services"):
            (name, spec, version, generation, previous, prev_gen, rollout, message, create,
             mod) = _array(item, 10, "service")
            sname = _service(name)
            st._services[sname] = ServiceRecord(
                sname, _bytes(spec, "spec", MAX_SPEC_BYTES), _uint(version, "version"),
                _uint(generation, "generation"), _bytes(previous, "previous", MAX_SPEC_BYTES),
                _uint(prev_gen, "previous_generation"), _choice(rollout, "rollout", ROLLOUT_STATES),
                _str(message, "message", MAX_MESSAGE_BYTES), _uint(create, "create"),
                _uint(mod, "mod"))
        for item in _list(allocs, "allocs"):
            (aid, service, slot, node, generation, desired, state, health, ports, message,
             restarts, since, create, mod) = _array(item, 14, "alloc")
            report = _report(Report(aid, state, health, _ports(ports), message, restarts,
                                    since))
            a = _alloc(aid)
            st._allocs[a] = AllocRecord(
                a, _service(service), _slot(slot), _node(node), _uint(generation, "generation"),
                _choice(desired, "desired", frozenset({"run", "stop"})), report.state,
                report.health, report.ports, report.message, report.restarts, report.since,
                _uint(create, "create"), _uint(mod, "mod"))
        st._alloc_seq = _uint(seq, "alloc_seq")
        if "config" in later:
            voters, mod = _array(later["config"], 2, "cluster config")
            st._config = ClusterConfig(_voters(voters), _uint(mod, "mod"))
        for item in _list(later.get("issued", []), "issued"):
            serial, node, mod = _array(item, 3, "issued certificate")
            s = _serial(serial)
            st._issued[s] = IssuedCert(s, _node(node), _uint(mod, "mod"))
        if "ca" in later:
            cert_pem, ca_index, token_index = _array(later["ca"], 3, "cluster CA")
            st._ca = ClusterCa(_bytes(cert_pem, "cert_pem", MAX_PEM_BYTES),
                               _uint(ca_index, "ca_index"), _uint(token_index, "token_index"))
        if "vault" in later:
            cert_pem, key_pem, secret = _array(later["vault"], 3, "vault")
            st._vault_section = [_bytes(cert_pem, "vault cert", MAX_PEM_BYTES),
                                 _bytes(key_pem, "vault key", MAX_PEM_BYTES),
                                 _bytes(secret, "vault secret", TOKEN_SECRET_BYTES)]
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
        # (at most 4 bytes per character: only a long key is worth encoding)
        or (len(raw) > MAX_KEY_BYTES // 4
            and len(raw.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES)
        or not raw.isprintable()
    ):
        raise _Invalid(f"key must be printable text of 1-{MAX_KEY_BYTES} bytes, got {raw!r:.60}")
    return raw


def _cas(raw: Any) -> int | None:
    if raw is None:
        return None
    return _uint(raw, "cas")


def _voters(raw: Any) -> int | None:
    if raw is None:
        return None
    if type(raw) is not int or not 0 < raw <= MAX_RAFT_VOTERS or raw % 2 == 0:
        raise _Invalid(f"raft_voters must be an odd number from 1 to {MAX_RAFT_VOTERS}")
    return raw


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


def _bool(raw: Any, what: str) -> bool:
    if not isinstance(raw, bool):
        raise _Invalid(f"{what} must be a boolean")
    return raw


def _choice(raw: Any, what: str, allowed: frozenset[str]) -> str:
    if not isinstance(raw, str) or raw not in allowed:
        raise _Invalid(f"{what} must be one of {', '.join(sorted(allowed))}, got {raw!r:.40}")
    return raw


_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _service(raw: Any) -> ServiceId:
    if (
        not isinstance(raw, str)
        or not 0 < len(raw) <= MAX_SERVICE_NAME_BYTES
        or not _NAME_CHARS.issuperset(raw)
    ):
        raise _Invalid(f"service name must be 1-{MAX_SERVICE_NAME_BYTES} of [a-z0-9_-], "
                       f"got {raw!r:.80}")
    return ServiceId(raw)


def _alloc(raw: Any) -> AllocId:
    if not isinstance(raw, str) or not 0 < len(raw) <= 96 or not _NAME_CHARS.issuperset(raw):
        raise _Invalid(f"allocation id must be 1-96 of [a-z0-9_-], got {raw!r:.100}")
    return AllocId(raw)


def _slot(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not -1 <= raw < 1 << 24:
        raise _Invalid("slot must be an integer in [-1, 2**24)")
    return raw


def _ports(raw: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, dict) or len(raw) > MAX_PORTS:
        raise _Invalid(f"ports must be a map of at most {MAX_PORTS} entries")
    out = []
    for name, port in raw.items():
        _str(name, "port name", 63)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _Invalid(f"port {name!r:.20} must be 1-65535")
        out.append((name, port))
    return tuple(sorted(out))


def _report(r: Report) -> Report:
    _alloc(r.alloc)
    _choice(r.state, "state", ALLOC_STATES)
    _choice(r.health, "health", HEALTH_STATES)
    _ports(dict(r.ports))
    if list(r.ports) != sorted(dict(r.ports).items()):
        raise _Invalid("ports must be sorted (name, port) pairs with unique names")
    _str(r.message, "message", MAX_MESSAGE_BYTES)
    _uint(r.restarts, "restarts")
    if isinstance(r.since, bool) or not isinstance(r.since, (int, float)) or not (
            0 <= r.since < 1e12):
        raise _Invalid("since must be wall-clock seconds")
    return r


def _decode_report(raw: Any) -> Report:
    alloc, state, health, ports, message, restarts, since = _array(raw, 7, "report")
    return _report(Report(alloc, state, health, _ports(ports), message, restarts,
                          float(since) if isinstance(since, int) and not isinstance(since, bool)
                          else since))


def _plan_op(raw: Any) -> PlanOp:
    if not isinstance(raw, list) or not raw:
        raise _Invalid("plan operation must be a non-empty array")
    if raw[0] == "run":
        _, service, slot, node, generation = _array(raw, 5, "run")
        return RunOp(_service(service), _slot(slot), _node(node), _uint(generation, "generation"))
    if raw[0] == "stop":
        return StopOp(_alloc(_array(raw, 2, "stop")[1]))
    if raw[0] == "drop":
        return DropOp(_alloc(_array(raw, 2, "drop")[1]))
    raise _Invalid(f"plan operation {raw[0]!r:.20} is not run, stop or drop")


def iter_records(state: MeshState) -> Iterable[tuple[Table, str, Record]]:
    """Every record of ``state`` (a watcher's full read), in a stable order."""
    for e in state.items():
        yield Table.KV, e.key, e
    for o in state.node_overrides():
        yield Table.NODE, o.node, o
    for d in state.deny_list():
        yield Table.DENY, d.serial, d
    for v in state.services():
        yield Table.SERVICE, v.name, v
    for a in state.allocs():
        yield Table.ALLOC, a.id, a
    if state.cluster_config().mod_index:
        yield Table.CONFIG, CONFIG_KEY, state.cluster_config()
    for c in state.issued_certs():
        yield Table.CERT, c.serial, c
    if state.cluster_ca().ca_index:
        yield Table.CA, CA_KEY, state.cluster_ca()


__all__: Sequence[str] = (
    "COMMAND_FORMAT",
    "Change",
    "AllocPlan",
    "AllocRecord",
    "AllocReport",
    "CaSet",
    "CertIssued",
    "ClusterCa",
    "ClusterConfig",
    "Command",
    "CommandKind",
    "ConfigSet",
    "DenyAdd",
    "DenyEntry",
    "DenyRemove",
    "IssuedCert",
    "KvDelete",
    "KvEntry",
    "KvPut",
    "MeshState",
    "NodeClear",
    "NodeOverride",
    "DropOp",
    "NodeSet",
    "PlanOp",
    "Record",
    "Report",
    "Result",
    "ResultCode",
    "RunOp",
    "ServiceDelete",
    "ServicePut",
    "ServiceRecord",
    "ServiceRollout",
    "StopOp",
    "Table",
    "TokenSet",
    "carries_secrets",
    "decode_command",
    "iter_records",
    "redact",
)
