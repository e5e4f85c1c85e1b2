"""The placement data model: nodes, services, constraints, resources and plans.

Everything here is a frozen value. Units go last in names and are integers, so that
sums and comparisons are exact on every machine: cpu in millicores (``500`` is half
a core), memory in bytes. :func:`parse_cpu` and :func:`parse_memory` read the
spellings people type (``"0.5"``, ``"500m"``, ``"512M"``, ``"1.5G"``);
:func:`format_cpu` and :func:`format_memory` write them back for explanations.

A :class:`Plan` maps each service to a tuple indexed by replica slot: slot ``i`` of
service ``web`` runs on ``plan.assignments["web"][i]`` (``None`` if unplaced). A
global service has no slot numbers; its tuple lists the nodes that run it, sorted
by node id, so its allocations are named by ``(service, node)``.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import msgpack

from mesh.errors import ConfigError
from mesh.types import NodeId, ServiceId

MAX_REPLICAS: Final = (1 << 24) - 2
"""Largest replica count of one service (slots are packed into 24 bits)."""

MILLICORES_PER_CORE: Final = 1000

_KIB: Final = 1024


class NodeState(enum.Enum):
    """What membership (SWIM) says about a node."""

    ALIVE = "alive"
    """Answering probes: may receive new replicas and keeps its own."""
    SUSPECT = "suspect"
    """Suspected dead: keeps its replicas (it may only be slow) but receives no new ones."""
    DEAD = "dead"
    """Declared dead: its replicas are placed elsewhere."""
    LEFT = "left"
    """Left the cluster on purpose: its replicas are placed elsewhere."""


class Availability(enum.Enum):
    """What an operator asked of a node (Swarm's words)."""

    ACTIVE = "active"
    """Normal: receives and keeps replicas."""
    PAUSE = "pause"
    """Keeps its replicas, receives no new ones."""
    DRAIN = "drain"
    """Receives nothing and gives its replicas away."""


class Strategy(enum.Enum):
    """How the replicas of a service are laid out over the feasible nodes."""

    SPREAD = "spread"
    """Each slot takes the first feasible node of its own consistent-hash preference
    order, under the bounded-load cap (the default)."""
    BINPACK = "binpack"
    """Every slot takes the first feasible node of one cluster-wide node ranking, so
    the nodes that rank first fill up before the others are used."""


class Mode(enum.Enum):
    """Replicated (a replica count) or global (one replica per eligible node)."""

    REPLICATED = "replicated"
    GLOBAL = "global"


class Op(enum.Enum):
    """A constraint operator, spelled as it is parsed and printed."""

    EQ = "=="
    NE = "!="
    IN = "in"
    NOT_IN = "not in"
    EXISTS = "exists"
    NOT_EXISTS = "not exists"


_LABEL_PREFIX: Final = "node.labels."
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")


@dataclass(frozen=True, slots=True)
class Constraint:
    """One hard requirement on a node's id, attributes or labels.

    ``key`` is canonical: ``node.id``, ``node.<attribute>`` (``node.hostname``,
    ``node.platform.os``) or ``node.labels.<label>``. A node that lacks the key
    satisfies ``!=``, ``not in`` and ``not exists`` and fails the others (as Swarm
    does). Build one with :func:`mesh.placement.constraints.parse_constraint`.

    Raises:
        ConfigError: the key is malformed, or the number of values does not fit
            the operator (one for ``==``/``!=``, at least one for ``in``/``not in``,
            none for ``exists``/``not exists``).
    """

    key: str
    op: Op
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.key.startswith("node.") or not _KEY_RE.fullmatch(self.key):
            raise ConfigError(
                f"constraint key {self.key!r} is malformed; use node.id, node.<attribute> "
                "or node.labels.<label>"
            )
        if self.key.startswith(_LABEL_PREFIX) and len(self.key) == len(_LABEL_PREFIX):
            raise ConfigError("constraint key 'node.labels.' names no label")
        if any(not isinstance(v, str) or not v for v in self.values):
            raise ConfigError(f"constraint on {self.key} has an empty or non-text value")
        if self.op in (Op.EQ, Op.NE) and len(self.values) != 1:
            raise ConfigError(f"operator {self.op.value} on {self.key} takes exactly one value")
        if self.op in (Op.IN, Op.NOT_IN):
            if not self.values:
                raise ConfigError(f"operator '{self.op.value}' on {self.key} needs at least one value")
            object.__setattr__(self, "values", tuple(sorted(set(self.values))))
        if self.op in (Op.EXISTS, Op.NOT_EXISTS) and self.values:
            raise ConfigError(f"operator '{self.op.value}' on {self.key} takes no value")

    @property
    def short_key(self) -> str:
        """The key as people write it: labels without ``node.labels.``."""
        if self.key.startswith(_LABEL_PREFIX):
            label = self.key[len(_LABEL_PREFIX) :]
            if not label.startswith(("node.", "engine.")):
                return label
        return self.key

    def __str__(self) -> str:
        key = self.short_key
        if self.op in (Op.EQ, Op.NE):
            return f"{key}{self.op.value}{self.values[0]}"
        if self.op in (Op.IN, Op.NOT_IN):
            return f"{key} {self.op.value} ({', '.join(self.values)})"
        return f"{key} {self.op.value}"


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of cpu and memory: a node's allocatable capacity or a replica's request.

    Raises:
        ConfigError: a value is negative or not an integer.
    """

    cpu_millis: int = 0
    """Cpu in millicores (1000 = one core)."""
    memory_bytes: int = 0
    """Memory in bytes."""

    def __post_init__(self) -> None:
        for name in ("cpu_millis", "memory_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")

    @classmethod
    def parse(cls, cpu: str | int | float = 0, memory: str | int = 0) -> Resources:
        """Build from people's spellings: ``Resources.parse("500m", "512M")``.

        Raises:
            ConfigError: see :func:`parse_cpu` and :func:`parse_memory`.
        """
        return cls(parse_cpu(cpu), parse_memory(memory))

    def __str__(self) -> str:
        return f"cpu {format_cpu(self.cpu_millis)}, memory {format_memory(self.memory_bytes)}"


def _readonly(mapping: Mapping[str, str], what: str) -> Mapping[str, str]:
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise ConfigError(f"{what} must map non-empty text to text, got {key!r}: {value!r}")
    return MappingProxyType(dict(sorted(mapping.items())))


@dataclass(frozen=True, slots=True, eq=True)
class NodeInfo:
    """A node as the scheduler sees it.

    Attributes:
        id: the node's id (its certificate subject).
        labels: operator labels, matched by ``node.labels.<key>`` or a bare ``<key>``.
        attributes: facts the node reports, matched by ``node.<key>``: e.g.
            ``hostname``, ``role``, ``platform.os``, ``platform.arch``.
        capacity: allocatable cpu and memory.
        state: membership state (only ``ALIVE`` receives new replicas).
        availability: operator availability (only ``ACTIVE`` receives new replicas).

    Raises:
        ConfigError: an id, label or attribute is empty or not text.
    """

    id: NodeId
    labels: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)
    capacity: Resources = field(default_factory=Resources)
    state: NodeState = NodeState.ALIVE
    availability: Availability = Availability.ACTIVE

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"node id must be non-empty text, got {self.id!r}")
        object.__setattr__(self, "labels", _readonly(self.labels, f"labels of node {self.id}"))
        object.__setattr__(
            self, "attributes", _readonly(self.attributes, f"attributes of node {self.id}")
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def schedulable(self) -> bool:
        """True if the node may receive new replicas (alive and active)."""
        return self.state is NodeState.ALIVE and self.availability is Availability.ACTIVE

    @property
    def keeps_replicas(self) -> bool:
        """True if replicas already on the node may stay (alive or suspect; not drained)."""
        return (
            self.state in (NodeState.ALIVE, NodeState.SUSPECT)
            and self.availability is not Availability.DRAIN
        )

    def value_of(self, key: str) -> str | None:
        """The value a canonical constraint key reads on this node, or ``None``."""
        if key == "node.id":
            return self.id
        if key.startswith(_LABEL_PREFIX):
            return self.labels.get(key[len(_LABEL_PREFIX) :])
        return self.attributes.get(key[len("node.") :])


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What a service asks of the scheduler.

    Attributes:
        id: the service's id.
        replicas: how many replica slots (0 to :data:`MAX_REPLICAS`); ignored for
            global services.
        mode: replicated (a count) or global (one per eligible node).
        strategy: ``SPREAD`` (default) or ``BINPACK``.
        constraints: hard requirements on nodes, all of which must hold.
        resources: what each replica reserves on its node.
        ports: host ports each replica binds; two replicas never share one on a node.
        max_per_node: at most this many replicas of the service on one node. ``None``
            means: 1 when the service has at least as many feasible nodes as
            replicas, else ``ceil((1 + eps) * replicas / feasible nodes)`` (spread),
            or no limit (binpack). An explicit value also binds replicas already
            placed; the default only shapes new placements.
        spread_over: a label key (``zone`` or ``node.labels.zone``) whose values the
            replicas are spread over as evenly as the nodes allow; nodes without the
            label form one more group.
        affinity: services this one must share a node with (each of them).
        anti_affinity: services this one must never share a node with. The relation
            is symmetric: the other service avoids this one too.

    Raises:
        ConfigError: a value is out of range or the fields contradict each other.
    """

    id: ServiceId
    replicas: int = 1
    mode: Mode = Mode.REPLICATED
    strategy: Strategy = Strategy.SPREAD
    constraints: tuple[Constraint, ...] = ()
    resources: Resources = field(default_factory=Resources)
    ports: tuple[int, ...] = ()
    max_per_node: int | None = None
    spread_over: str | None = None
    affinity: tuple[ServiceId, ...] = ()
    anti_affinity: tuple[ServiceId, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"service id must be non-empty text, got {self.id!r}")
        where = f"service {self.id}"
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int):
            raise ConfigError(f"{where}: replicas must be an integer, got {self.replicas!r}")
        if not 0 <= self.replicas <= MAX_REPLICAS:
            raise ConfigError(f"{where}: replicas must be 0-{MAX_REPLICAS}, got {self.replicas}")
        for c in self.constraints:
            if not isinstance(c, Constraint):
                raise ConfigError(
                    f"{where}: constraint {c!r} is not a Constraint; "
                    "parse text with mesh.placement.parse_constraints()"
                )
        object.__setattr__(self, "constraints", tuple(self.constraints))
        ports = tuple(self.ports)
        for port in ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"{where}: host port {port!r} is out of range 1-65535")
        if len(set(ports)) != len(ports):
            raise ConfigError(f"{where}: host ports {list(ports)} list a port twice")
        object.__setattr__(self, "ports", tuple(sorted(ports)))
        if self.max_per_node is not None and (
            isinstance(self.max_per_node, bool)
            or not isinstance(self.max_per_node, int)
            or self.max_per_node < 1
        ):
            raise ConfigError(f"{where}: max_per_node must be at least 1, got {self.max_per_node!r}")
        if self.spread_over is not None:
            key = self.spread_over.strip()
            if key.startswith(_LABEL_PREFIX):
                key = key[len(_LABEL_PREFIX) :]
            if not key or not _KEY_RE.fullmatch(key):
                raise ConfigError(
                    f"{where}: spread_over {self.spread_over!r} is not a label key (e.g. zone)"
                )
            object.__setattr__(self, "spread_over", key)
        affinity = tuple(sorted(set(self.affinity)))
        anti = tuple(sorted(set(self.anti_affinity)))
        if self.id in affinity:
            raise ConfigError(f"{where}: a service cannot have affinity to itself")
        if self.id in anti:
            raise ConfigError(
                f"{where}: a service cannot be anti-affine to itself; use max_per_node=1"
            )
        both = set(affinity) & set(anti)
        if both:
            raise ConfigError(
                f"{where}: {', '.join(sorted(both))} is listed in both affinity and anti_affinity"
            )
        object.__setattr__(self, "affinity", affinity)
        object.__setattr__(self, "anti_affinity", anti)

    @property
    def is_global(self) -> bool:
        """True for a global service (one replica per eligible node)."""
        return self.mode is Mode.GLOBAL


@dataclass(frozen=True, slots=True)
class Reason:
    """Why some nodes could not take a replica: one line of an explanation.

    Attributes:
        code: a stable machine name: ``down``, ``suspect``, ``paused``, ``draining``,
            ``constraint``, ``port``, ``anti_affinity``, ``affinity``,
            ``max_per_node``, ``cpu``, ``memory``, ``no_nodes``.
        nodes: how many nodes failed for this reason (each node counts once, under
            the first filter it fails, in the order above).
        text: the line for people, e.g. ``"2 nodes lacked memory: need 512M, best has 256M"``.
    """

    code: str
    nodes: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Unplaced:
    """The replicas of one service that could not be placed, and why.

    Every unplaced replica of a service fails for the same reasons, since they ask
    for the same things; the reasons describe the final state of the plan.

    Attributes:
        service: the service.
        desired: its replica count (global: the number of eligible nodes).
        slots: the unplaced slot indices (replicated services).
        nodes: the eligible nodes that do not run it (global services).
        reasons: counts per reason; the node counts add up to the cluster size.
    """

    service: ServiceId
    desired: int
    slots: tuple[int, ...]
    nodes: tuple[NodeId, ...]
    reasons: tuple[Reason, ...]

    @property
    def count(self) -> int:
        """How many replicas are unplaced."""
        return len(self.slots) + len(self.nodes)

    @property
    def text(self) -> str:
        """One line for people: what is missing, then the reasons."""
        return f"{self.service}: {self.count} of {self.desired} replicas unplaced: " + ", ".join(
            r.text for r in self.reasons
        )

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Change:
    """One replica's node changed.

    ``old is None`` starts a replica, ``new is None`` stops one, otherwise it moves.
    ``index`` is ``None`` for a global service (its replicas are named by node).
    """

    service: ServiceId
    index: int | None
    old: NodeId | None
    new: NodeId | None


@dataclass(frozen=True, slots=True)
class Plan:
    """The result of placement: where every replica slot runs, and what could not run.

    Attributes:
        assignments: for each service, a tuple indexed by slot with the node running
            that slot or ``None``; for a global service, the nodes running it,
            sorted. Services are in id order.
        unplaced: the services with unplaced replicas and the reasons.
        load_cap: the most replicas of spread services a new placement let a node
            hold (see ``PlacementConfig.load_bound_eps``).
    """

    assignments: Mapping[ServiceId, tuple[NodeId | None, ...]]
    unplaced: Mapping[ServiceId, Unplaced]
    load_cap: int

    def node_of(self, service: ServiceId, index: int) -> NodeId | None:
        """The node running slot ``index`` of ``service``, or ``None``."""
        slots = self.assignments.get(service, ())
        return slots[index] if 0 <= index < len(slots) else None

    def replicas(self) -> Iterator[tuple[ServiceId, int, NodeId]]:
        """Every placed replica as ``(service, slot, node)`` (global: slot = position)."""
        for service, slots in self.assignments.items():
            for index, node in enumerate(slots):
                if node is not None:
                    yield service, index, node

    @property
    def placed_count(self) -> int:
        """How many replicas are placed."""
        return sum(len(s) - s.count(None) for s in self.assignments.values())

    @property
    def unplaced_count(self) -> int:
        """How many replicas are unplaced."""
        return sum(u.count for u in self.unplaced.values())

    def load(self) -> dict[NodeId, int]:
        """Replicas per node (nodes running nothing are absent)."""
        counts: dict[NodeId, int] = {}
        for slots in self.assignments.values():
            for node in slots:
                if node is not None:
                    counts[node] = counts.get(node, 0) + 1
        return counts

    def explain_unplaced(self, service: ServiceId) -> str | None:
        """The explanation line for ``service``'s unplaced replicas, if any."""
        entry = self.unplaced.get(service)
        return entry.text if entry is not None else None

    def digest(self) -> str:
        """A hex blake2b digest of the assignments (equal plans, equal digests)."""
        body = [[str(s), [None if n is None else str(n) for n in slots]]
                for s, slots in sorted(self.assignments.items())]
        return hashlib.blake2b(msgpack.packb(body, use_bin_type=True), digest_size=16).hexdigest()


# -- units -------------------------------------------------------------------------

_CPU_RE: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(m?)")
_MEM_RE: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)
_MEM_UNITS: Final = {"": 1, "k": _KIB, "m": _KIB**2, "g": _KIB**3, "t": _KIB**4, "p": _KIB**5}


def parse_cpu(value: str | int | float) -> int:
    """Cpu in millicores from ``"500m"``, ``"0.5"``, ``2`` or ``1.5``.

    Raises:
        ConfigError: not a non-negative amount, or finer than one millicore.
    """
    if isinstance(value, bool):
        raise ConfigError(f"cpu {value!r} is not an amount")
    text = str(value).strip() if not isinstance(value, str) else value.strip()
    match = _CPU_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"cpu {value!r} is not an amount; write e.g. 0.5, 2 or 500m")
    number, milli = match.groups()
    whole, _, frac = number.partition(".")
    scaled = int(whole or "0") * int(10 ** len(frac)) + int(frac or "0")
    factor = 1 if milli else MILLICORES_PER_CORE
    millis, rest = divmod(scaled * factor, int(10 ** len(frac)))
    if rest:
        raise ConfigError(f"cpu {value!r} is finer than one millicore")
    return millis


def parse_memory(value: str | int) -> int:
    """Memory in bytes from ``"512M"``, ``"1.5G"``, ``"256Mi"``, ``"64KiB"`` or ``1024``.

    Units are binary (k = 1024, as Docker reads them), case-insensitive, with an
    optional ``i`` and/or ``b``.

    Raises:
        ConfigError: not a non-negative amount, or not a whole number of bytes.
    """
    if isinstance(value, bool):
        raise ConfigError(f"memory {value!r} is not an amount")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"memory {value} is negative")
        return value
    match = _MEM_RE.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"memory {value!r} is not an amount; write e.g. 512M, 1.5G or 1073741824")
    number, unit, _ = match.groups()
    whole, _, frac = number.partition(".")
    scaled = (int(whole or "0") * int(10 ** len(frac)) + int(frac or "0")) * _MEM_UNITS[
        unit.lower()
    ]
    amount, rest = divmod(scaled, int(10 ** len(frac)))
    if rest:
        raise ConfigError(f"memory {value!r} is not a whole number of bytes")
    return amount


def format_cpu(millis: int) -> str:
    """``500`` -> ``"500m"``, ``2000`` -> ``"2"``, ``1500`` -> ``"1.5"``."""
    if millis % MILLICORES_PER_CORE == 0:
        return str(millis // MILLICORES_PER_CORE)
    if millis < MILLICORES_PER_CORE:
        return f"{millis}m"
    return f"{millis / MILLICORES_PER_CORE:g}"


def format_memory(size_bytes: int) -> str:
    """``536870912`` -> ``"512M"``; one decimal when not a whole unit (``"1.5G"``)."""
    for unit in ("P", "T", "G", "M", "K"):
        scale = _MEM_UNITS[unit.lower()]
        if size_bytes >= scale:
            if size_bytes % scale == 0:
                return f"{size_bytes // scale}{unit}"
            return f"{size_bytes / scale:.1f}{unit}"
    return f"{size_bytes}B"
