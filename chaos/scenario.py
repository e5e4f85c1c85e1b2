"""Chaos scenarios: what a run does, parsed from YAML, and its seeded fault schedule.

A scenario file names the cluster (node count, gossip profile), the KV workload,
optional services (checked once workloads exist), and the faults. Faults come
either as a fixed list (``faults:``, run in order) or as a random draw
(``random:``) from which :func:`build_schedule` produces the list with a seeded
``random.Random``: the same scenario, node count, duration and seed always give
the same schedule, which the runner prints before it starts.

Faults run one after another. Each is injected, held for its ``duration_s``,
healed, and followed by a wait for the cluster to converge (which measures the
time to heal) and a ``gap_s`` of calm. Which node a fault hits is decided here
when the target names a node or ``random`` (seeded), and at run time when it
names a role (``leader``, ``follower``, ``watcher``), since roles are only known
then.

Pure: no I/O (the caller reads the file and hands over the parsed mapping).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mesh.errors import ConfigError


class ScenarioError(ConfigError):
    """A scenario file is malformed; the message names the field and what to write."""


class FaultKind(enum.Enum):
    """Every fault the harness can inject."""

    KILL = "kill"
    """SIGKILL one node; restart it from the same data dir after ``duration_s``."""
    FREEZE = "freeze"
    """SIGSTOP one node (a gray failure: its sockets stay open); SIGCONT after."""
    STARVE = "starve"
    """Duty-cycle SIGSTOP/SIGCONT so the node runs ``1 - stopped_fraction`` of the time."""
    LEADER_KILL = "leader_kill"
    """SIGKILL the current Raft leader; restart it after ``duration_s``."""
    VOTERS_KILL = "voters_kill"
    """SIGKILL one voter, then another ``gap_s`` later; restart both after ``duration_s``."""
    STALE_REJOIN = "stale_rejoin"
    """Copy a node's data dir, let the cluster move on for ``duration_s``, then
    restart the node from the old copy."""
    PARTITION = "partition"
    """Split the nodes into a majority and a minority that cannot reach each other."""
    ISOLATE = "isolate"
    """Cut one node off from every other."""
    ONEWAY = "oneway"
    """One node receives nothing from the others, while they still receive from it."""
    LOSS = "loss"
    """Drop a fraction (``probability``) of the packets every targeted node receives."""
    DISK_FULL = "disk_full"
    """Fill the file system holding one node's data dir; free it after ``duration_s``."""
    DELAY = "delay"
    """Hold every cluster packet a node sends ``delay_ms`` plus up to ``jitter_ms``
    (NFQUEUE and :mod:`chaos.netem`: the kernel has no netem)."""
    REORDER = "reorder"
    """Delay a node's outgoing packets by a random 0..``jitter_ms`` each, so that
    later packets overtake earlier ones."""
    DUPLICATE = "duplicate"
    """Send a copy of a fraction (``probability``) of a node's outgoing packets."""


QUEUE_FAULTS: Final = frozenset({FaultKind.DELAY, FaultKind.REORDER, FaultKind.DUPLICATE})
"""Faults done in user space on packets sent to an NFQUEUE."""

NETWORK_FAULTS: Final = frozenset(
    {FaultKind.PARTITION, FaultKind.ISOLATE, FaultKind.ONEWAY, FaultKind.LOSS}) | QUEUE_FAULTS
"""Faults that need a network namespace per node (skipped in loopback mode)."""

KILLING_FAULTS: Final = frozenset({FaultKind.KILL, FaultKind.LEADER_KILL, FaultKind.VOTERS_KILL})
"""Faults that kill processes (their heal times make "time to heal after a kill")."""

DETECTED_FAULTS: Final = KILLING_FAULTS | {FaultKind.FREEZE, FaultKind.ISOLATE}
"""Faults after which the others must see the victims dead (time to detect)."""

ROLE_TARGETS: Final = frozenset({"leader", "follower", "watcher"})
"""Targets resolved at run time from ``raft status``: the leader, a voter that
is not the leader, a node that is not a voter (it keeps its replica through the
watch stream)."""

_ROLE_ALIASES: Final = {"learner": "watcher"}
"""Older spellings of a role: non-voters were learners before they watched."""

DEFAULT_DURATION_S: Final = {
    FaultKind.KILL: 4.0, FaultKind.FREEZE: 4.0, FaultKind.STARVE: 6.0,
    FaultKind.LEADER_KILL: 4.0, FaultKind.VOTERS_KILL: 4.0, FaultKind.STALE_REJOIN: 5.0,
    FaultKind.PARTITION: 5.0, FaultKind.ISOLATE: 4.0, FaultKind.ONEWAY: 4.0,
    FaultKind.LOSS: 5.0, FaultKind.DISK_FULL: 4.0, FaultKind.DELAY: 5.0,
    FaultKind.REORDER: 5.0, FaultKind.DUPLICATE: 5.0,
}
"""How long a fault is held when the scenario does not say, in seconds."""

_DEFAULT_TARGET: Final = {
    FaultKind.LEADER_KILL: "leader", FaultKind.STALE_REJOIN: "watcher",
    FaultKind.LOSS: "all", FaultKind.PARTITION: "all", FaultKind.VOTERS_KILL: "voters",
}
_PARAMS: Final[Mapping[FaultKind, Mapping[str, float]]] = {
    FaultKind.STARVE: {"stopped_fraction": 0.8, "period_s": 0.25},
    FaultKind.LOSS: {"probability": 0.2},
    FaultKind.VOTERS_KILL: {"second_after_s": 3.0},
    FaultKind.DELAY: {"delay_ms": 50.0, "jitter_ms": 10.0},
    FaultKind.REORDER: {"delay_ms": 0.0, "jitter_ms": 40.0},
    FaultKind.DUPLICATE: {"probability": 0.2},
}
"""Per-kind parameters and their defaults."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault of a schedule.

    Attributes:
        kind: what to do.
        target: a node name, ``all``, ``voters``, or a role (:data:`ROLE_TARGETS`).
        duration_s: how long it is held before healing.
        gap_s: calm after the cluster converged, before the next fault.
        params: kind-specific numbers (see :data:`_PARAMS`), defaults filled in.
        minority: PARTITION: the nodes on the minority side.
    """

    kind: FaultKind
    target: str
    duration_s: float
    gap_s: float
    params: Mapping[str, float] = field(default_factory=dict)
    minority: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line, e.g. ``kill n3 for 4s`` or ``partition [n4,n5] | rest for 5s``."""
        if self.kind is FaultKind.PARTITION:
            what = f"partition [{','.join(self.minority)}] | rest"
        else:
            what = f"{self.kind.value} {self.target}"
        extra = "".join(f" {k}={v:g}" for k, v in sorted(self.params.items()))
        return f"{what} for {self.duration_s:g}s{extra}, then {self.gap_s:g}s calm"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (for the report)."""
        return {"kind": self.kind.value, "target": self.target, "duration_s": self.duration_s,
                "gap_s": self.gap_s, "params": dict(self.params),
                "minority": list(self.minority)}


@dataclass(frozen=True, slots=True)
class Workload:
    """The KV workload that runs through every fault.

    Attributes:
        clients: concurrent clients, each talking to its own node's API socket.
        keys: keys in use at once (each client picks among them).
        key_epoch_s: every this many seconds the clients move to fresh keys, so
            each key's history stays short for the linearizability checker.
        op_timeout_s: an operation not answered within this has an unknown outcome.
        pause_s: pause between two operations of one client.
    """

    clients: int = 3
    keys: int = 3
    key_epoch_s: float = 10.0
    op_timeout_s: float = 3.0
    pause_s: float = 0.05


@dataclass(frozen=True, slots=True)
class ServiceDecl:
    """A service the scenario deploys (enables the service invariants).

    Attributes:
        name: the service name (``<name>.service.mesh``).
        run_args: arguments after ``meshctl run``.
        converge_s: bound on convergence to the desired replicas after healing.
    """

    name: str
    run_args: tuple[str, ...]
    converge_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RandomSpec:
    """How a random scenario draws its faults.

    Attributes:
        kinds: kinds to draw from (uniformly).
        duration_s: (low, high) of each fault's hold time.
        gap_s: (low, high) of the calm after each fault.
    """

    kinds: tuple[FaultKind, ...]
    duration_s: tuple[float, float] = (3.0, 8.0)
    gap_s: tuple[float, float] = (1.0, 4.0)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A parsed scenario file.

    Attributes:
        name: the scenario's name.
        description: one paragraph for ``python -m chaos list``.
        nodes: default cluster size.
        duration_s: default length of the fault phase (random scenarios stop
            drawing faults once their planned time would exceed it).
        gossip_profile: ``--gossip-profile`` of every node (``local`` or ``lan``).
        settle_s: calm after the cluster formed, before the first fault.
        heal_timeout_s: bound on convergence after each heal and at the end.
        workload: the KV workload.
        services: services to deploy (empty: service invariants disabled).
        faults: the fixed fault list (empty for random scenarios).
        random: how to draw faults, for random scenarios.
    """

    name: str
    description: str = ""
    nodes: int = 5
    duration_s: float = 90.0
    gossip_profile: str = "local"
    settle_s: float = 2.0
    heal_timeout_s: float = 20.0
    workload: Workload = Workload()
    services: tuple[ServiceDecl, ...] = ()
    faults: tuple[Fault, ...] = ()
    random: RandomSpec | None = None


# --- parsing ------------------------------------------------------------------------


def _number(raw: Mapping[str, Any], key: str, default: float, where: str,
            minimum: float = 0.0) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: {key} must be a number, got {value!r}")
    if value < minimum:
        raise ScenarioError(f"{where}: {key} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _range(raw: Mapping[str, Any], key: str, default: tuple[float, float],
           where: str) -> tuple[float, float]:
    value = raw.get(key, list(default))
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1]):
        raise ScenarioError(f"{where}: {key} must be [low, high] with 0 <= low <= high, "
                            f"got {value!r}")
    return float(value[0]), float(value[1])


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(allowed))}")


def parse_kind(name: object, where: str) -> FaultKind:
    """A fault kind by its name.

    Raises:
        ScenarioError: unknown.
    """
    try:
        return FaultKind(name)
    except ValueError:
        raise ScenarioError(f"{where}: unknown fault kind {name!r}; known: "
                            f"{', '.join(k.value for k in FaultKind)}") from None


def _parse_fault(raw: object, where: str) -> Fault:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: a fault is a mapping with at least 'kind'")
    kind = parse_kind(raw.get("kind"), where)
    defaults = _PARAMS.get(kind, {})
    _check_keys(raw, {"kind", "target", "duration_s", "gap_s", "minority", *defaults}, where)
    target = raw.get("target", _DEFAULT_TARGET.get(kind, "random"))
    if not isinstance(target, str) or not target:
        raise ScenarioError(f"{where}: target must be a node name, 'random' or a role")
    target = _ROLE_ALIASES.get(target, target)
    params = {k: _number(raw, k, v, where) for k, v in defaults.items()}
    if kind in (FaultKind.LOSS, FaultKind.DUPLICATE) and not 0 < params["probability"] < 1:
        raise ScenarioError(f"{where}: probability must be between 0 and 1")
    if kind is FaultKind.STARVE and not 0 < params["stopped_fraction"] < 1:
        raise ScenarioError(f"{where}: stopped_fraction must be between 0 and 1")
    minority = raw.get("minority", [])
    if not isinstance(minority, list) or not all(isinstance(m, str) for m in minority):
        raise ScenarioError(f"{where}: minority must be a list of node names")
    return Fault(kind, target, _number(raw, "duration_s", DEFAULT_DURATION_S[kind], where),
                 _number(raw, "gap_s", 2.0, where), params, tuple(minority))


def parse_scenario(raw: object, source: str = "scenario") -> Scenario:
    """Validate a scenario mapping (a parsed YAML file).

    Raises:
        ScenarioError: anything malformed; the message names the field.
    """
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{source}: expected a mapping at the top level")
    _check_keys(raw, {"name", "description", "nodes", "duration_s", "gossip_profile",
                      "settle_s", "heal_timeout_s", "workload", "services", "faults",
                      "random"}, source)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{source}: give the scenario a name")
    nodes = raw.get("nodes", 5)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or not 3 <= nodes <= 50:
        raise ScenarioError(f"{source}: nodes must be an integer from 3 to 50")
    profile = raw.get("gossip_profile", "local")
    if profile not in ("local", "lan"):
        raise ScenarioError(f"{source}: gossip_profile must be local or lan")
    wl_raw = raw.get("workload", {}) or {}
    if not isinstance(wl_raw, Mapping):
        raise ScenarioError(f"{source}: workload must be a mapping")
    _check_keys(wl_raw, {"clients", "keys", "key_epoch_s", "op_timeout_s", "pause_s"},
                f"{source}: workload")
    wd = Workload()
    workload = Workload(
        clients=int(_number(wl_raw, "clients", wd.clients, f"{source}: workload")),
        keys=int(_number(wl_raw, "keys", wd.keys, f"{source}: workload", 1)),
        key_epoch_s=_number(wl_raw, "key_epoch_s", wd.key_epoch_s, f"{source}: workload", 1),
        op_timeout_s=_number(wl_raw, "op_timeout_s", wd.op_timeout_s, f"{source}: workload",
                             0.1),
        pause_s=_number(wl_raw, "pause_s", wd.pause_s, f"{source}: workload"))
    services = []
    for i, svc in enumerate(raw.get("services", []) or []):
        where = f"{source}: services[{i}]"
        if not isinstance(svc, Mapping) or not isinstance(svc.get("name"), str):
            raise ScenarioError(f"{where}: a service needs a name and run_args")
        _check_keys(svc, {"name", "run_args", "converge_s"}, where)
        args = svc.get("run_args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ScenarioError(f"{where}: run_args must be a list of strings")
        services.append(ServiceDecl(svc["name"], tuple(args),
                                    _number(svc, "converge_s", 30.0, where)))
    faults_raw = raw.get("faults", []) or []
    if not isinstance(faults_raw, list):
        raise ScenarioError(f"{source}: faults must be a list")
    faults = tuple(_parse_fault(f, f"{source}: faults[{i}]") for i, f in enumerate(faults_raw))
    rnd = _parse_random(raw.get("random"), f"{source}: random")
    if bool(faults) == (rnd is not None):
        raise ScenarioError(f"{source}: give either a 'faults' list or a 'random' section")
    return Scenario(
        name=name, description=str(raw.get("description", "")).strip(), nodes=nodes,
        duration_s=_number(raw, "duration_s", 90.0, source, 1),
        gossip_profile=profile, settle_s=_number(raw, "settle_s", 2.0, source),
        heal_timeout_s=_number(raw, "heal_timeout_s", 20.0, source, 1),
        workload=workload, services=tuple(services), faults=faults, random=rnd)


def _parse_random(raw: object, where: str) -> RandomSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: must be a mapping")
    _check_keys(raw, {"kinds", "duration_s", "gap_s"}, where)
    names = raw.get("kinds", [k.value for k in FaultKind])
    if not isinstance(names, list) or not names:
        raise ScenarioError(f"{where}: kinds must be a non-empty list")
    kinds = tuple(parse_kind(n, where) for n in names)
    return RandomSpec(kinds, _range(raw, "duration_s", (3.0, 8.0), where),
                      _range(raw, "gap_s", (1.0, 4.0), where))


# --- schedules ----------------------------------------------------------------------


def node_names(n: int) -> list[str]:
    """``n1`` ... ``nN``: the harness's node names."""
    return [f"n{i}" for i in range(1, n + 1)]


def _resolve(fault: Fault, names: Sequence[str], rng: random.Random) -> Fault:
    """Fix a ``random`` target and a partition's minority with the schedule's RNG."""
    target = fault.target
    if target == "random":
        target = rng.choice(list(names))
    elif target not in ROLE_TARGETS | {"all", "voters"} and target not in names:
        raise ScenarioError(f"fault {fault.kind.value}: no node named {target!r} in a "
                            f"{len(names)}-node cluster ({', '.join(names)})")
    minority = fault.minority
    if fault.kind is FaultKind.PARTITION:
        if not minority:
            minority = tuple(sorted(rng.sample(list(names), (len(names) - 1) // 2),
                                    key=names.index))
        bad = [m for m in minority if m not in names]
        if bad or not 0 < len(minority) < len(names) / 2:
            raise ScenarioError(f"partition minority {list(minority)} must be fewer than "
                                f"half of {list(names)}")
    return Fault(fault.kind, target, fault.duration_s, fault.gap_s, fault.params, minority)


def _draw(spec: RandomSpec, rng: random.Random) -> Fault:
    kind = rng.choice(spec.kinds)
    target = _DEFAULT_TARGET.get(kind, "random")
    return Fault(kind, target, round(rng.uniform(*spec.duration_s), 1),
                 round(rng.uniform(*spec.gap_s), 1), dict(_PARAMS.get(kind, {})))


def planned_time_s(fault: Fault) -> float:
    """Time a fault takes, assuming the cluster heals at once."""
    extra = fault.params.get("second_after_s", 0.0)
    return fault.duration_s + extra + fault.gap_s


def build_schedule(scenario: Scenario, nodes: int, duration_s: float,
                   seed: int) -> list[Fault]:
    """The faults a run injects, in order: same arguments, same schedule.

    Fixed scenarios keep their list (random targets and minorities drawn with
    the seed); random ones draw faults until their planned time would exceed
    ``duration_s``.

    Raises:
        ScenarioError: a fault names a node that the cluster does not have.
    """
    rng = random.Random(seed)
    names = node_names(nodes)
    if scenario.random is None:
        return [_resolve(f, names, rng) for f in scenario.faults]
    out: list[Fault] = []
    spent = 0.0
    while True:
        fault = _resolve(_draw(scenario.random, rng), names, rng)
        spent += planned_time_s(fault)
        if spent > duration_s and out:
            return out
        out.append(fault)
