"""Workload specifications: what a user asks meshd to run, validated and canonical.

A spec exists in two forms:

* the **user form** that people write in YAML or JSON (``docs/specs.md``). It
  accepts the spellings people type: ``cpu: 500m``, ``memory: 1Gi``,
  ``interval: 1m30s``, ``ports: ["8080:80/udp"]``, ``env`` as a mapping or a list
  of ``K=V``, ``command`` as a list or a shell-like string. :func:`parse_spec`
  reads one document, :func:`load_specs` a whole file;
* the **stored form**, :meth:`WorkloadSpec.to_dict`: every field, units in the
  names (``interval_s``, ``cpu_millis``), JSON- and msgpack-ready and canonical,
  so that equal specs encode to equal bytes (:meth:`WorkloadSpec.encode`) and
  ``meshctl apply`` of an unchanged file is recognisably a no-op. The user form
  accepts the stored form too, so ``meshctl inspect --json`` output can be edited
  and applied again.

Every problem is a :class:`~mesh.errors.ConfigError` whose message names the field
path and the problem (``service web: ports[1].host_port: 70000 is out of range
1-65535``); bad input never escapes as another exception. Everything is bounded
(name lengths, numbers of ports, variables, labels, tags, the encoded size), and
error messages never print more than a short excerpt of what they quote.
Bytes from a peer go through :meth:`WorkloadSpec.decode`, which raises
:class:`~mesh.errors.RemoteProtocolError` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple

import yaml

from mesh import wire
from mesh.errors import ConfigError, RemoteProtocolError
from mesh.placement import (
    MAX_REPLICAS,
    Mode,
    Resources,
    ServiceSpec,
    format_cpu,
    format_memory,
    parse_constraint,
)
from mesh.placement import parse_cpu as _parse_cpu
from mesh.placement import parse_memory as _parse_memory
from mesh.types import ServiceId

# -- limits ------------------------------------------------------------------------

MAX_SPEC_BYTES: Final = 64 * 1024
"""Largest encoded spec (:meth:`WorkloadSpec.encode`); :meth:`WorkloadSpec.decode`
refuses anything longer before parsing it."""
MAX_FILE_BYTES: Final = 4 * 1024 * 1024
"""Largest spec or compose file :func:`load_specs` reads."""
MAX_SPECS_PER_FILE: Final = 1000
"""Most specs one file may hold."""
MAX_YAML_NODES: Final = 200_000
"""Most values a file may hold once YAML aliases are expanded (a bound on
"billion laughs" documents)."""
MAX_ARGS: Final = 256
"""Most arguments in ``command``, ``entrypoint`` or an exec health check."""
MAX_ARG_CHARS: Final = 8192
"""Longest single argument."""
MAX_ENV: Final = 256
"""Most environment variables."""
MAX_ENV_VALUE_CHARS: Final = 16384
"""Longest environment value."""
MAX_PORTS: Final = 64
"""Most ports of one workload."""
MAX_LABELS: Final = 64
"""Most labels of one workload."""
MAX_LABEL_KEY_CHARS: Final = 253
MAX_LABEL_VALUE_CHARS: Final = 1024
MAX_TAGS: Final = 32
"""Most DNS tags of one workload."""
MAX_CONSTRAINTS: Final = 32
MAX_AFFINITY: Final = 32
"""Most services in ``affinity`` (and, separately, in ``anti_affinity``)."""
MAX_TEXT_CHARS: Final = 1024
"""Longest free text (image reference, http path, constraint)."""
MAX_CPU_MILLIS: Final = 1_000_000
"""1000 cores."""
MAX_MEMORY_BYTES: Final = 1 << 50
"""1 PiB."""
MAX_DURATION_S: Final = 7 * 24 * 3600.0
"""Longest duration any field accepts (one week)."""

_DNS_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?")
_DNS_LABEL_RULE: Final = (
    "use 1-63 lower-case letters, digits, '-' or '_', starting and ending with a letter or digit"
)
_KINDS: Final = ("service", "job")
_DRIVERS: Final = ("", "docker", "process")
_MODES: Final = ("replicated", "global")
_PROTOCOLS: Final = ("tcp", "udp")
_HEALTH_KINDS: Final = ("http", "tcp", "exec")
_RESTART_POLICIES: Final = ("always", "on-failure", "never")
_FAILURE_ACTIONS: Final = ("pause", "rollback", "continue")
_UPDATE_ORDERS: Final = ("stop-first", "start-first")

# -- small checks shared by the dataclasses and the parsers --------------------------


def _show(value: object) -> str:
    """A short description of ``value`` for an error message; never prints much."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**18 else "a very large number"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    return f"a value of type {type(value).__name__}"


def _fail(path: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}" if path else problem)


def _check_text(value: object, path: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"expected text, got {_show(value)}")
    if len(value) > max_chars:
        raise _fail(path, f"is {len(value)} characters long; the limit is {max_chars}")
    if "\x00" in value:
        raise _fail(path, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, "is not valid Unicode text") from None
    return value


def _check_token(value: object, path: str, what: str) -> str:
    """Non-empty text without whitespace or control characters."""
    text = _check_text(value, path)
    if not text:
        raise _fail(path, f"{what} is empty")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise _fail(path, f"{what} {_show(text)} contains whitespace or control characters")
    return text


def _check_label(value: object, path: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL_RE.fullmatch(value):
        raise _fail(path, f"{_show(value)} is not a DNS label; {_DNS_LABEL_RULE}")
    return value


def _check_choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        shown = ", ".join(repr(c) if c else '"" (the default)' for c in choices)
        raise _fail(path, f"{_show(value)} is not one of {shown}")
    return value


def _check_int(value: object, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected a whole number, got {_show(value)}")
    if not lo <= value <= hi:
        raise _fail(path, f"{_show(value)} is out of range {lo}-{hi}")
    return value


def _check_seconds(
    value: object, path: str, *, hi: float = MAX_DURATION_S, positive: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"expected a number of seconds, got {_show(value)}")
    if isinstance(value, int) and abs(value) >= 10**18:
        raise _fail(path, "is far too large")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        need = "more than 0" if positive else "0 or more"
        raise _fail(path, f"{_show(value)} must be {need} seconds")
    if seconds > hi:
        raise _fail(path, f"{_fmt_seconds(seconds)} is longer than the limit {_fmt_seconds(hi)}")
    return seconds


def _check_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {_show(value)}")
    return value


def _as_tuple(value: object, path: str, max_items: int) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(path, f"expected a list, got {_show(value)}")
    if len(value) > max_items:
        raise _fail(path, f"has {len(value)} items; the limit is {max_items}")
    return tuple(value)


def _check_argv(value: object, path: str) -> tuple[str, ...]:
    items = _as_tuple(value, path, MAX_ARGS)
    for i, arg in enumerate(items):
        _check_text(arg, f"{path}[{i}]", MAX_ARG_CHARS)
    return items


def _check_pairs(
    value: object, path: str, max_items: int, check: Callable[[object, object, str], None]
) -> tuple[tuple[str, str], ...]:
    """A tuple of ``(key, value)`` pairs, sorted by key, keys unique."""
    items = _as_tuple(value, path, max_items)
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise _fail(f"{path}[{i}]", f"expected a (key, value) pair, got {_show(item)}")
        check(item[0], item[1], path)
        pairs.append((item[0], item[1]))
    pairs.sort()
    for (a, _), (b, _) in zip(pairs, pairs[1:], strict=False):
        if a == b:
            raise _fail(f"{path}.{a}", "is given twice")
    return tuple(pairs)


def _check_env_pair(key: object, value: object, path: str) -> None:
    name = _check_text(key, f"{path} key", 256)
    if not name or "=" in name or any(c.isspace() or not c.isprintable() for c in name):
        raise _fail(
            path, f"{_show(key)} is not a variable name (no '=', whitespace or control characters)"
        )
    _check_text(value, f"{path}.{name}", MAX_ENV_VALUE_CHARS)


def _check_label_pair(key: object, value: object, path: str) -> None:
    name = _check_token(key, f"{path} key", "a label key")
    if len(name) > MAX_LABEL_KEY_CHARS or "=" in name:
        raise _fail(path, f"label key {_show(key)} is longer than {MAX_LABEL_KEY_CHARS} or has '='")
    _check_text(value, f"{path}.{name}", MAX_LABEL_VALUE_CHARS)


def _labels_tuple(value: object, path: str, max_items: int) -> tuple[str, ...]:
    """DNS labels, sorted, duplicates removed."""
    items = _as_tuple(value, path, max_items)
    for i, item in enumerate(items):
        _check_label(item, f"{path}[{i}]")
    return tuple(sorted(set(items)))


def _fmt_seconds(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        if minutes < 60:
            return f"{minutes}m"
        return f"{minutes // 60}h{minutes % 60}m" if minutes % 60 else f"{minutes // 60}h"
    return f"{seconds:g}s"


def port_env_name(name: str) -> str:
    """The variable a port is handed in as: ``http-alt`` -> ``MESH_PORT_HTTP_ALT``."""
    return "MESH_PORT_" + name.upper().replace("-", "_")


# -- the spec dataclasses ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One port a workload listens on.

    Attributes:
        name: a DNS label naming the port (health checks, ``$MESH_PORT_<NAME>``, SRV
            records). The parsers name unnamed ports ``p<container port>`` (or
            ``p<host port>``, or ``p<index>``).
        container_port: the port inside the container; 0 means the same as the
            host port (the process driver has no container, so it is always 0 there).
        host_port: the port on the node; 0 lets the node pick a free one and hand it
            in as ``$PORT`` (the first port) and ``$MESH_PORT_<NAME>``. A non-zero
            host port is a placement constraint: two replicas never share it on a node.
        protocol: ``tcp`` or ``udp``.

    Raises:
        ConfigError: ``"<field>: <problem>"``; callers prefix the field path.
    """

    name: str
    container_port: int = 0
    host_port: int = 0
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        _check_label(self.name, "name")
        _check_int(self.container_port, "container_port", 0, 65535)
        _check_int(self.host_port, "host_port", 0, 65535)
        _check_choice(self.protocol, "protocol", _PROTOCOLS)

    def __str__(self) -> str:
        body = str(self.container_port or self.host_port or "auto")
        if self.host_port and self.container_port and self.host_port != self.container_port:
            body = f"{self.host_port}:{self.container_port}"
        elif self.container_port and not self.host_port:
            body = f"auto:{self.container_port}"
        return f"{self.name}={body}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """How the node checks that a replica is healthy.

    Attributes:
        kind: ``http`` (a GET answered 2xx or 3xx), ``tcp`` (a connection is
            accepted) or ``exec`` (a command exits 0; run inside the container by
            the docker driver, next to the process by the process driver).
        path: the http path, beginning with ``/`` (http only).
        port: the name of the port to probe; ``""`` is the first port (http, tcp).
        command: the argv of an exec check.
        interval_s: seconds between checks. Default 2.
        timeout_s: seconds one check may take. Default 1.
        retries: consecutive failures that make a replica unhealthy. Default 3.
        start_period_s: seconds after start during which failures do not count.
        readiness_only: if true, failing never restarts the replica; it only takes
            its endpoint out of DNS until it passes again.

    Raises:
        ConfigError: ``"<field>: <problem>"``; callers prefix the field path.
    """

    kind: str
    path: str = "/"
    port: str = ""
    command: tuple[str, ...] = ()
    interval_s: float = 2.0
    timeout_s: float = 1.0
    retries: int = 3
    start_period_s: float = 0.0
    readiness_only: bool = False

    def __post_init__(self) -> None:
        _check_choice(self.kind, "kind", _HEALTH_KINDS)
        path = _check_token(self.path, "path", "the http path")
        if not path.startswith("/"):
            raise _fail("path", f"{_show(path)} must begin with '/'")
        if self.kind != "http" and path != "/":
            raise _fail("path", f"only http checks have a path, this is a {self.kind} check")
        if self.port != "":
            _check_label(self.port, "port")
        if self.kind == "exec" and self.port:
            raise _fail("port", "an exec check does not use a port")
        command = _check_argv(self.command, "command")
        object.__setattr__(self, "command", command)
        if self.kind == "exec" and not command:
            raise _fail("command", "an exec check needs a command")
        if self.kind != "exec" and command:
            raise _fail("command", f"only exec checks run a command, this is a {self.kind} check")
        object.__setattr__(self, "interval_s", _check_seconds(self.interval_s, "interval_s",
                                                               hi=86400.0, positive=True))
        object.__setattr__(self, "timeout_s", _check_seconds(self.timeout_s, "timeout_s",
                                                              hi=86400.0, positive=True))
        _check_int(self.retries, "retries", 1, 1000)
        object.__setattr__(self, "start_period_s",
                           _check_seconds(self.start_period_s, "start_period_s"))
        _check_bool(self.readiness_only, "readiness_only")

    def __str__(self) -> str:
        if self.kind == "http":
            what = f"http GET {self.path} on port {self.port or '(first)'}"
        elif self.kind == "tcp":
            what = f"tcp connect to port {self.port or '(first)'}"
        else:
            what = "exec " + shlex.join(self.command)
        role = "readiness" if self.readiness_only else "liveness"
        return (f"{what} every {_fmt_seconds(self.interval_s)}, timeout "
                f"{_fmt_seconds(self.timeout_s)}, {self.retries} retries ({role})")


@dataclass(frozen=True, slots=True)
class RestartSpec:
    """When and how fast the node restarts a replica that exited or failed liveness.

    Attributes:
        policy: ``always`` (any exit), ``on-failure`` (non-zero exit or failed
            liveness) or ``never``.
        max_attempts: restarts before giving up (the replica is then reported
            failed); 0 = unlimited.
        delay_s: the first backoff delay; each restart doubles it.
        max_delay_s: the backoff never exceeds this.
        window_s: a replica that has run this long resets its backoff and attempts.

    Raises:
        ConfigError: ``"<field>: <problem>"``; callers prefix the field path.
    """

    policy: str = "always"
    max_attempts: int = 0
    delay_s: float = 0.5
    max_delay_s: float = 30.0
    window_s: float = 30.0

    def __post_init__(self) -> None:
        _check_choice(self.policy, "policy", _RESTART_POLICIES)
        _check_int(self.max_attempts, "max_attempts", 0, 1_000_000)
        delay = _check_seconds(self.delay_s, "delay_s", hi=3600.0)
        max_delay = _check_seconds(self.max_delay_s, "max_delay_s", hi=86400.0)
        if max_delay < delay:
            raise _fail("max_delay_s", f"{_fmt_seconds(max_delay)} is less than delay_s "
                        f"{_fmt_seconds(delay)}")
        object.__setattr__(self, "delay_s", delay)
        object.__setattr__(self, "max_delay_s", max_delay)
        object.__setattr__(self, "window_s", _check_seconds(self.window_s, "window_s"))


@dataclass(frozen=True, slots=True)
class UpdateSpec:
    """How a changed spec rolls out over the running replicas.

    Attributes:
        parallelism: replicas replaced at a time; 0 = all at once.
        delay_s: pause between batches.
        failure_action: what a failed batch does: ``pause`` the rollout,
            ``rollback`` to the previous spec, or ``continue``.
        monitor_s: how long a new replica must stay healthy to count as updated.
        max_failure_ratio: the fraction of replicas that may fail before
            ``failure_action`` applies (0 = the first failure).
        order: ``stop-first`` (stop the old replica, then start the new) or
            ``start-first`` (overlap them briefly).

    Raises:
        ConfigError: ``"<field>: <problem>"``; callers prefix the field path.
    """

    parallelism: int = 1
    delay_s: float = 0.0
    failure_action: str = "pause"
    monitor_s: float = 5.0
    max_failure_ratio: float = 0.0
    order: str = "stop-first"

    def __post_init__(self) -> None:
        _check_int(self.parallelism, "parallelism", 0, MAX_REPLICAS)
        object.__setattr__(self, "delay_s", _check_seconds(self.delay_s, "delay_s"))
        _check_choice(self.failure_action, "failure_action", _FAILURE_ACTIONS)
        object.__setattr__(self, "monitor_s", _check_seconds(self.monitor_s, "monitor_s"))
        ratio = self.max_failure_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise _fail("max_failure_ratio", f"{_show(ratio)} is not a fraction from 0 to 1")
        object.__setattr__(self, "max_failure_ratio", float(ratio))
        _check_choice(self.order, "order", _UPDATE_ORDERS)


_DEFAULT_RESTART: Final = RestartSpec()
_JOB_RESTART: Final = RestartSpec(policy="on-failure")


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A service or a job: everything meshd needs to place, run, check and update it.

    Field defaults are those of ``docs/specs.md``. Sequences are normalised on
    construction (lists become tuples; ``env``, ``labels``, ``tags``, ``affinity``
    and ``anti_affinity`` are sorted; constraints are rewritten in their canonical
    spelling), so equal specs compare and encode equal.

    Attributes:
        name: the service's DNS label.
        kind: ``service`` (kept running) or ``job`` (runs to completion; its
            restart policy defaults to ``on-failure``).
        driver: ``""`` (the node's default), ``docker`` or ``process``.
        image: the container image (required for docker).
        command: the argv (required for process; overrides the image's CMD).
        entrypoint: overrides the image's ENTRYPOINT (docker only).
        env: environment variables as ``(name, value)`` pairs sorted by name.
        ports: the ports it listens on.
        mode: ``replicated`` (``replicas`` copies) or ``global`` (one per eligible
            node; ``replicas`` stays 1).
        replicas: how many copies.
        constraints: placement constraints, e.g. ``zone==a`` (see
            :func:`mesh.placement.parse_constraint`).
        spread_over: a node label whose values the replicas spread over.
        max_per_node: at most this many replicas on one node.
        affinity: services it must share a node with.
        anti_affinity: services it must never share a node with.
        cpu_millis: cpu each replica reserves, in millicores.
        memory_bytes: memory each replica reserves.
        cpu_limit_millis: cpu limit (0 = none; at least the reservation).
        memory_limit_bytes: memory limit (0 = none; at least the reservation).
        health: the health check, or ``None``.
        restart: the restart policy.
        update: the rolling update policy.
        labels: metadata ``(key, value)`` pairs sorted by key.
        tags: DNS tags (``<tag>.<name>.service.mesh``), sorted.
        stop_grace_s: seconds between the stop signal and a kill.
        stop_after_disconnect_s: stop the replicas of a node cut off from the Raft
            quorum for this long (self-fencing); ``None`` keeps them running.

    Raises:
        ConfigError: ``"service <name>: <field path>: <problem>"``.
    """

    name: ServiceId
    kind: str = "service"
    driver: str = ""
    image: str = ""
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    ports: tuple[PortSpec, ...] = ()
    mode: str = "replicated"
    replicas: int = 1
    constraints: tuple[str, ...] = ()
    spread_over: str | None = None
    max_per_node: int | None = None
    affinity: tuple[ServiceId, ...] = ()
    anti_affinity: tuple[ServiceId, ...] = ()
    cpu_millis: int = 0
    memory_bytes: int = 0
    cpu_limit_millis: int = 0
    memory_limit_bytes: int = 0
    health: HealthSpec | None = None
    restart: RestartSpec = _DEFAULT_RESTART
    update: UpdateSpec = UpdateSpec()
    labels: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    stop_grace_s: float = 10.0
    stop_after_disconnect_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _DNS_LABEL_RE.fullmatch(self.name):
            raise ConfigError(f"service name {_show(self.name)} is not a DNS label; "
                              f"{_DNS_LABEL_RULE}")
        where = f"job {self.name}" if self.kind == "job" else f"service {self.name}"
        try:
            self._validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        try:
            self.placement()
        except ConfigError as exc:
            # The scheduler's own messages already begin with "service <name>: ".
            raise ConfigError(str(exc).replace(f"service {self.name}", where, 1)) from None
        size = len(self.encode())
        if size > MAX_SPEC_BYTES:
            raise ConfigError(f"{where}: the spec is {size} bytes encoded; the limit is "
                              f"{MAX_SPEC_BYTES} (move large values out of env and labels)")

    def _validate(self) -> None:
        set_ = object.__setattr__
        _check_choice(self.kind, "kind", _KINDS)
        _check_choice(self.driver, "driver", _DRIVERS)
        if self.image:
            _check_token(self.image, "image", "the image")
        else:
            _check_text(self.image, "image")
        set_(self, "command", _check_argv(self.command, "command"))
        set_(self, "entrypoint", _check_argv(self.entrypoint, "entrypoint"))
        if self.driver == "docker" and not self.image:
            raise _fail("image", "the docker driver needs an image")
        if self.driver == "process":
            if not self.command:
                raise _fail("command", "the process driver needs a command (the argv to run)")
            if self.entrypoint:
                raise _fail("entrypoint", "only the docker driver has an entrypoint; put the "
                            "program first in command")
        if not self.driver and not self.image and not self.command:
            raise _fail("image", "give an image (docker) or a command (process)")
        set_(self, "env", _check_pairs(self.env, "env", MAX_ENV, _check_env_pair))
        self._validate_ports()
        _check_choice(self.mode, "mode", _MODES)
        _check_int(self.replicas, "replicas", 0, MAX_REPLICAS)
        if self.mode == "global" and self.replicas != 1:
            raise _fail("replicas", "a global workload runs one replica on each eligible node; "
                        "leave replicas out or use mode: replicated")
        if self.kind == "job" and self.mode == "global":
            raise _fail("mode", "a job cannot be global; give it a replica count")
        set_(self, "constraints", self._canonical_constraints())
        if self.spread_over is not None:
            _check_token(self.spread_over, "spread_over", "the label key")
        if self.max_per_node is not None:
            _check_int(self.max_per_node, "max_per_node", 1, MAX_REPLICAS)
        set_(self, "affinity", _labels_tuple(self.affinity, "affinity", MAX_AFFINITY))
        set_(self, "anti_affinity",
             _labels_tuple(self.anti_affinity, "anti_affinity", MAX_AFFINITY))
        for request, limit, maximum, fmt in (
            ("cpu_millis", "cpu_limit_millis", MAX_CPU_MILLIS, format_cpu),
            ("memory_bytes", "memory_limit_bytes", MAX_MEMORY_BYTES, format_memory),
        ):
            wanted = _check_int(getattr(self, request), request, 0, maximum)
            cap = _check_int(getattr(self, limit), limit, 0, maximum)
            if cap and cap < wanted:
                raise _fail(limit, f"the limit {fmt(cap)} is less than the reservation "
                            f"{fmt(wanted)} ({request})")
        self._validate_health()
        if not isinstance(self.restart, RestartSpec):
            raise _fail("restart", f"expected a RestartSpec, got {_show(self.restart)}")
        if self.kind == "job" and self.restart.policy == "always":
            if self.restart != _DEFAULT_RESTART:
                raise _fail("restart.policy", "a job runs to completion, so 'always' would run "
                            "it forever; use on-failure or never")
            set_(self, "restart", _JOB_RESTART)
        if not isinstance(self.update, UpdateSpec):
            raise _fail("update", f"expected an UpdateSpec, got {_show(self.update)}")
        set_(self, "labels", _check_pairs(self.labels, "labels", MAX_LABELS, _check_label_pair))
        set_(self, "tags", _labels_tuple(self.tags, "tags", MAX_TAGS))
        set_(self, "stop_grace_s", _check_seconds(self.stop_grace_s, "stop_grace_s", hi=3600.0))
        if self.stop_after_disconnect_s is not None:
            set_(self, "stop_after_disconnect_s",
                 _check_seconds(self.stop_after_disconnect_s, "stop_after_disconnect_s",
                                positive=True))

    def _validate_ports(self) -> None:
        ports = _as_tuple(self.ports, "ports", MAX_PORTS)
        object.__setattr__(self, "ports", ports)
        names: dict[str, int] = {}
        bound: dict[tuple[int, str], int] = {}
        for i, port in enumerate(ports):
            if not isinstance(port, PortSpec):
                raise _fail(f"ports[{i}]", f"expected a PortSpec, got {_show(port)}")
            variable = port_env_name(port.name)
            if variable in names:
                raise _fail(f"ports[{i}].name", f"{port.name!r} clashes with ports"
                            f"[{names[variable]}] (both are handed in as ${variable})")
            names[variable] = i
            if port.host_port:
                key = (port.host_port, port.protocol)
                if key in bound:
                    raise _fail(f"ports[{i}].host_port", f"{port.host_port}/{port.protocol} is "
                                f"already published by ports[{bound[key]}]")
                bound[key] = i
            if (self.driver == "process" and port.container_port
                    and port.container_port != port.host_port):
                raise _fail(f"ports[{i}].container_port", "the process driver runs on the "
                            "node's network, so there is no container port: write "
                            f"{port.container_port}:{port.container_port} to bind that port on "
                            "the node, or a name such as http to let the node pick one and "
                            "hand it in as $PORT")

    def _canonical_constraints(self) -> tuple[str, ...]:
        texts = _as_tuple(self.constraints, "constraints", MAX_CONSTRAINTS)
        canonical = []
        for i, text in enumerate(texts):
            _check_text(text, f"constraints[{i}]")
            try:
                parsed = parse_constraint(text)
            except ConfigError as exc:
                raise _fail(f"constraints[{i}]", str(exc)) from None
            # Prefer the canonical spelling, unless quoting makes it read differently.
            short = str(parsed)
            try:
                same = parse_constraint(short) == parsed
            except ConfigError:
                same = False
            canonical.append(short if same else text.strip())
        return tuple(canonical)

    def _validate_health(self) -> None:
        health = self.health
        if health is None:
            return
        if not isinstance(health, HealthSpec):
            raise _fail("health", f"expected a HealthSpec, got {_show(health)}")
        if health.kind == "exec":
            return
        if not self.ports:
            article = "an" if health.kind == "http" else "a"
            raise _fail("health", f"{article} {health.kind} check needs a port; add one under "
                        "ports")
        if health.port and health.port not in self.port_names():
            raise _fail("health.port", f"{health.port!r} names no port; the ports are "
                        + ", ".join(self.port_names()))

    # -- views ---------------------------------------------------------------------

    def port_names(self) -> tuple[str, ...]:
        """The names of the ports, in order."""
        return tuple(p.name for p in self.ports)

    def placement(self) -> ServiceSpec:
        """What this workload asks of the scheduler.

        Raises:
            ConfigError: the scheduler refuses the combination (e.g. affinity to
                itself); the message begins with ``service <name>:``.
        """
        constraints = tuple(parse_constraint(c) for c in self.constraints)
        return ServiceSpec(
            id=self.name,
            replicas=self.replicas,
            mode=Mode(self.mode),
            constraints=constraints,
            resources=Resources(self.cpu_millis, self.memory_bytes),
            # Placement knows no protocols: tcp and udp on one number is one port to it.
            ports=tuple(sorted({p.host_port for p in self.ports if p.host_port})),
            max_per_node=self.max_per_node,
            spread_over=self.spread_over,
            affinity=self.affinity,
            anti_affinity=self.anti_affinity,
        )

    def with_replicas(self, n: int) -> WorkloadSpec:
        """This spec scaled to ``n`` replicas.

        Raises:
            ConfigError: ``n`` is out of range, or the workload is global.
        """
        return dataclasses.replace(self, replicas=n)

    # -- stored form ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The canonical stored form: every field, plain JSON/msgpack types.

        ``env`` and ``labels`` are mappings in key order, tuples are lists, nested
        specs are mappings, ``health`` is ``None`` or a mapping.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("env", "labels"):
                out[f.name] = dict(value)
            elif f.name == "ports":
                out[f.name] = [_flat(p) for p in value]
            elif isinstance(value, HealthSpec | RestartSpec | UpdateSpec):
                out[f.name] = _flat(value)
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkloadSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Strict: unknown keys and wrong types are errors; a missing key takes its
        default (so a spec stored by an older meshd still loads).

        Raises:
            ConfigError: the data is not a stored spec; the message names the field.
        """
        name = data.get("name") if isinstance(data, Mapping) else None
        where = f"service {name}" if isinstance(name, str) and len(name) <= 63 else "service"
        try:
            fields = _stored_fields(cls, data, "")
            if "env" in fields:
                fields["env"] = _stored_pairs(fields["env"], "env")
            if "labels" in fields:
                fields["labels"] = _stored_pairs(fields["labels"], "labels")
            if "ports" in fields:
                fields["ports"] = tuple(
                    _stored(PortSpec, item, f"ports[{i}]")
                    for i, item in enumerate(_as_tuple(fields["ports"], "ports", MAX_PORTS))
                )
            if fields.get("health") is not None:
                fields["health"] = _stored(HealthSpec, fields["health"], "health")
            if "restart" in fields:
                fields["restart"] = _stored(RestartSpec, fields["restart"], "restart")
            if "update" in fields:
                fields["update"] = _stored(UpdateSpec, fields["update"], "update")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return cls(**fields)

    def encode(self) -> bytes:
        """Canonical msgpack of :meth:`to_dict` (equal specs give equal bytes)."""
        return wire.pack_body(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> WorkloadSpec:
        """Decode untrusted bytes from :meth:`encode`.

        Raises:
            RemoteProtocolError: too long, not msgpack, or not a valid spec.
        """
        if len(data) > MAX_SPEC_BYTES:
            raise RemoteProtocolError(f"spec of {len(data)} bytes exceeds limit {MAX_SPEC_BYTES}")
        body = wire.unpack_body(data, MAX_SPEC_BYTES)
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"a spec is a mapping, got {_show(body)}")
        try:
            return cls.from_dict(body)
        except ConfigError as exc:
            raise RemoteProtocolError(f"invalid spec: {exc}") from None


def _flat(spec: PortSpec | HealthSpec | RestartSpec | UpdateSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _stored_fields(cls: type[Any], data: object, path: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(path, f"expected a mapping, got {_show(data)}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            raise _unknown_key(key, names, path)
    for f in fields:
        if f.name not in data and f.default is dataclasses.MISSING:
            raise _fail(f"{path}.{f.name}" if path else f.name, "is missing")
    return dict(data)


def _stored(cls: type[Any], data: object, path: str) -> Any:
    fields = _stored_fields(cls, data, path)
    with _within(path):
        return cls(**fields)


def _stored_pairs(value: object, path: str) -> tuple[tuple[Any, Any], ...]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a mapping, got {_show(value)}")
    return tuple(value.items())


@contextlib.contextmanager
def _within(path: str) -> Iterator[None]:
    """Prefix a nested spec's ``"<field>: <problem>"`` errors with its path."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None


def _unknown_key(key: object, known: Sequence[str], path: str) -> ConfigError:
    if not isinstance(key, str):
        return _fail(path, f"keys must be text, got {_show(key)}")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean {close[0]!r}?"
    else:
        hint = " (known keys: " + ", ".join(sorted(set(known))) + ")"
    return _fail(path, f"unknown key {_show(key)}{hint}")


# -- the user form -----------------------------------------------------------------


def parse_duration(value: object, *, field: str = "duration") -> float:
    """Seconds from ``5``, ``2.5``, ``"5s"``, ``"1m30s"``, ``"250ms"``, ``"1h"``.

    A number is seconds; text is a number or a sequence of number+unit (``h``,
    ``m``, ``s``, ``ms``, ``us``, ``ns``), as Go and Docker Compose write them.

    Raises:
        ConfigError: ``"<field>: <problem>"``: negative, not a duration, or longer
            than a week.
    """
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 64 or not text:
            raise _fail(field, f"{_show(value)} is not a duration; write e.g. 5s, 1m30s or 250ms")
        total = Decimal(0)
        try:
            if _NUMBER_RE.fullmatch(text):
                total = Decimal(text)
            else:
                pos = 0
                for match in _DURATION_PART_RE.finditer(text):
                    if match.start() != pos:
                        break
                    total += Decimal(match[1]) * _DURATION_UNITS[match[2]]
                    pos = match.end()
                if pos != len(text) or pos == 0:
                    raise _fail(field, f"{_show(value)} is not a duration; write e.g. 5s, "
                                "1m30s or 250ms")
        except InvalidOperation:
            raise _fail(field, f"{_show(value)} is not a duration") from None
        if total > Decimal(int(MAX_DURATION_S)):
            raise _fail(field, f"{_show(value)} is longer than the limit "
                        f"{_fmt_seconds(MAX_DURATION_S)}")
        return float(total)
    return _check_seconds(value, field)


_NUMBER_RE: Final = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_DURATION_UNITS: Final = {
    "h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001"),
    "us": Decimal("0.000001"), "µs": Decimal("0.000001"), "ns": Decimal("0.000000001"),
}

_PORT_RANGE_RE: Final = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_PORT_FORMS: Final = ("write e.g. 80, 8080:80, 8080:80/udp, 8000-8002:8000-8002, "
                      "NAME (the node picks) or NAME=8080:80")


def parse_ports(value: object, *, field: str = "ports") -> tuple[PortSpec, ...]:
    """Ports from the spellings people write, with default names filled in.

    Each item is an integer or text (``"80"`` = container port 80, the node picks
    the host port; ``"8080:80"``; ``"8080:80/udp"``; ranges ``"8000-8002:9000-9002"``;
    a bare name ``"http"`` = a port the node picks; ``"http=8080:80"``) or a
    mapping ``{name, container_port|target, host_port|published, protocol}``.
    Unnamed ports are named ``p<container port>`` (else ``p<host port>``, else
    ``p<index>``), with ``-<protocol>``, else ``-<index>``, appended on a clash.

    Raises:
        ConfigError: ``"<field>[<i>]...: <problem>"``.
    """
    items = _as_tuple(value, field, MAX_PORTS)
    raw: list[tuple[str | None, int, int, str, str]] = []
    for i, item in enumerate(items):
        path = f"{field}[{i}]"
        for name, container, host, protocol in _parse_port(item, path):
            raw.append((name, container, host, protocol, path))
    if len(raw) > MAX_PORTS:
        raise _fail(field, f"describes {len(raw)} ports; the limit is {MAX_PORTS}")
    taken = {name for name, *_ in raw if name is not None}
    ports = []
    for index, (name, container, host, protocol, path) in enumerate(raw):
        if name is None:
            base = f"p{container or host or index}"
            name = base if base not in taken else f"{base}-{protocol}"
            suffix = index
            while name in taken:  # ends: at most MAX_PORTS names are taken
                name = f"{base}-{suffix}"
                suffix += 1
            taken.add(name)
        with _within(path):
            ports.append(PortSpec(name, container, host, protocol))
    return tuple(ports)


def _parse_port(item: object, path: str) -> list[tuple[str | None, int, int, str]]:
    if isinstance(item, bool):
        raise _fail(path, f"{_show(item)} is not a port; {_PORT_FORMS}")
    if isinstance(item, int):
        return [(None, _check_int(item, path, 1, 65535), 0, "tcp")]
    if isinstance(item, Mapping):
        return [_parse_port_mapping(item, path)]
    text = _check_text(item, path).strip()
    name: str | None = None
    if "=" in text:
        name, _, text = text.partition("=")
        _check_label(name, f"{path}.name")
    body, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    if protocol not in _PROTOCOLS:
        raise _fail(path, f"protocol {_show(protocol)} is not tcp or udp")
    if name is None and body[:1].isalpha() and _DNS_LABEL_RE.fullmatch(body):
        return [(body, 0, 0, protocol)]
    parts = body.split(":")
    if len(parts) > 2:
        raise _fail(path, f"{_show(item)}: a host address is not supported (meshd publishes "
                    f"on every address of the node); {_PORT_FORMS}")
    ranges = [_port_range(part, path, item) for part in parts]
    if len(ranges) == 1:
        hosts, containers = [0] * len(ranges[0]), ranges[0]
    else:
        hosts, containers = ranges
        if len(hosts) != len(containers):
            raise _fail(path, f"{_show(item)}: the host and container ranges differ in length")
    if name is not None and len(containers) > 1:
        raise _fail(path, f"{_show(item)}: a name can only be given to a single port")
    if len(containers) > MAX_PORTS:
        raise _fail(path, f"{_show(item)} describes {len(containers)} ports; the limit is "
                    f"{MAX_PORTS}")
    return [(name, c, h, protocol) for h, c in zip(hosts, containers, strict=True)]


def _port_range(text: str, path: str, item: object) -> list[int]:
    match = _PORT_RANGE_RE.fullmatch(text.strip())
    if match is None:
        raise _fail(path, f"{_show(item)} is not a port; {_PORT_FORMS}")
    first = int(match[1])
    last = int(match[2]) if match[2] else first
    if not 0 <= first <= last <= 65535 or (match[2] and first == 0):
        raise _fail(path, f"{_show(item)}: {text} is not a port or an increasing range "
                    "within 1-65535")
    return list(range(first, last + 1))


_PORT_KEYS: Final = {
    "name": ("name",),
    "container_port": ("container_port", "target"),
    "host_port": ("host_port", "published"),
    "protocol": ("protocol",),
}


def _parse_port_mapping(item: Mapping[Any, Any], path: str) -> tuple[str | None, int, int, str]:
    got = _take(item, path, _PORT_KEYS)
    numbers = []
    for key in ("container_port", "host_port"):
        value = got.get(key, 0)
        if isinstance(value, str) and value.strip().isdigit() and len(value) <= 5:
            value = int(value)
        numbers.append(_check_int(value, f"{path}.{key}", 0, 65535))
    name = got.get("name")
    if name is not None:
        _check_label(name, f"{path}.name")
    protocol = got.get("protocol", "tcp")
    _check_choice(protocol, f"{path}.protocol", _PROTOCOLS)
    return name, numbers[0], numbers[1], protocol


def parse_env(value: object, *, field: str = "env") -> tuple[tuple[str, str], ...]:
    """Variables from a mapping or a list of ``"K=V"``; numbers and booleans
    become text (``true``/``false``).

    Raises:
        ConfigError: ``"<field>...: <problem>"``, including a variable with no value.
    """
    pairs = _key_values(value, field, MAX_ENV, allow_bare=False)
    return _check_pairs(pairs, field, MAX_ENV, _check_env_pair)


def _key_values(
    value: object, path: str, max_items: int, *, allow_bare: bool
) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        if len(value) > max_items:
            raise _fail(path, f"has {len(value)} entries; the limit is {max_items}")
        pairs = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(path, f"keys must be text, got {_show(key)}")
            pairs.append((key, _scalar_text(item, f"{path}.{key}", allow_null=allow_bare)))
        return tuple(pairs)
    items = _as_tuple(value, path, max_items)
    pairs = []
    for i, item in enumerate(items):
        text = _check_text(item, f"{path}[{i}]", MAX_ENV_VALUE_CHARS + 256)
        key, sep, val = text.partition("=")
        if not sep and not allow_bare:
            raise _fail(f"{path}[{i}]", f"{_show(text)} has no '='; write {text}=VALUE")
        pairs.append((key, val))
    return tuple(pairs)


def _scalar_text(value: object, path: str, *, allow_null: bool = False) -> str:
    if value is None and allow_null:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) < 10**18:
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return value
    raise _fail(path, f"expected text or a number, got {_show(value)} (quote it to write \"\")"
                if value is None else f"expected text or a number, got {_show(value)}")


def parse_argv(value: object, *, field: str = "command", shell: bool = False) -> tuple[str, ...]:
    """An argv from a list (integers become text) or from text, which is split as a
    shell would (``shell=False``, like Compose's ``command``) or run by ``sh -c``
    (``shell=True``, like Docker's ``CMD-SHELL`` health checks).

    Raises:
        ConfigError: ``"<field>...: <problem>"``: unbalanced quotes, too many or too
            long arguments, or an argument that is not text.
    """
    path = field
    if isinstance(value, str):
        _check_text(value, path, MAX_ARG_CHARS)
        if shell:
            return ("sh", "-c", value)
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise _fail(path, f"{_show(value)} cannot be split into arguments: {exc}") from None
    items = _as_tuple(value, path, MAX_ARGS)
    out = []
    for i, arg in enumerate(items):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) < 10**18:
            arg = str(arg)
        if not isinstance(arg, str):
            raise _fail(f"{path}[{i}]", f"expected text, got {_show(arg)}; quote it")
        out.append(arg)
    return _check_argv(out, path)


def _amount(value: object, path: str, parse: Callable[[Any], int]) -> int:
    if not isinstance(value, str | int | float) or (isinstance(value, int) and abs(value) > 2**62):
        raise _fail(path, f"{_show(value)} is not an amount")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, f"{_show(value)} is not an amount")
    try:
        return parse(value)
    except ConfigError as exc:
        raise _fail(path, str(exc)) from None


def parse_cpu_millis(value: object, *, field: str = "cpu") -> int:
    """Millicores from ``"500m"``, ``"0.5"``, ``0.5`` or ``2``.

    Raises:
        ConfigError: ``"<field>: <problem>"``.
    """
    return _amount(value, field, _parse_cpu)


def parse_memory_bytes(value: object, *, field: str = "memory") -> int:
    """Bytes from ``"512M"``, ``"1Gi"``, ``"1.5g"``, ``"64KiB"`` or ``1048576``
    (binary units, as Docker reads them).

    Raises:
        ConfigError: ``"<field>: <problem>"``.
    """
    if isinstance(value, float):
        raise _fail(field, f"{_show(value)} is not a whole number of bytes; write e.g. 512M")
    return _amount(value, field, _parse_memory)


def is_dns_label(text: object) -> bool:
    """True for a valid service, port or tag name (see :class:`WorkloadSpec`)."""
    return isinstance(text, str) and _DNS_LABEL_RE.fullmatch(text) is not None


def _whole(value: object, path: str, hi: int) -> int:
    return _check_int(value, path, 0, hi)


def _take(data: object, path: str, spellings: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """The keys of a user mapping by canonical name; ``None`` values are left out.

    Raises:
        ConfigError: not a mapping, an unknown key (with the closest known one), or
            one field given under two spellings.
    """
    if not isinstance(data, Mapping):
        raise _fail(path, f"expected a mapping, got {_show(data)}")
    canonical = {s: name for name, spelled in spellings.items() for s in spelled}
    got: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        name = canonical.get(key) if isinstance(key, str) else None
        if name is None:
            if isinstance(key, str) and key in _COMPOSE_ONLY and not path:
                raise _fail(path, f"unknown key {key!r}; this looks like a Docker Compose "
                            "service: deploy the file with `meshctl stack deploy -c FILE NAME`")
            raise _unknown_key(key, list(canonical), path)
        if name in seen:
            raise _fail(path, f"{seen[name]!r} and {key!r} give the same field; keep one")
        seen[name] = key
        if value is not None:
            got[name] = value
    return got


_COMPOSE_ONLY: Final = frozenset(
    {"deploy", "build", "volumes", "networks", "depends_on", "secrets", "configs", "healthcheck"}
)

_SPEC_KEYS: Final = {
    "name": ("name",),
    "kind": ("kind",),
    "driver": ("driver",),
    "image": ("image",),
    "command": ("command",),
    "entrypoint": ("entrypoint",),
    "env": ("env", "environment"),
    "ports": ("ports",),
    "mode": ("mode",),
    "replicas": ("replicas",),
    "constraints": ("constraints",),
    "spread_over": ("spread_over", "spread"),
    "max_per_node": ("max_per_node",),
    "affinity": ("affinity",),
    "anti_affinity": ("anti_affinity",),
    "resources": ("resources",),
    "cpu": ("cpu",),
    "cpu_millis": ("cpu_millis",),
    "memory": ("memory",),
    "memory_bytes": ("memory_bytes",),
    "cpu_limit_millis": ("cpu_limit_millis",),
    "memory_limit_bytes": ("memory_limit_bytes",),
    "health": ("health",),
    "restart": ("restart",),
    "update": ("update",),
    "labels": ("labels",),
    "tags": ("tags",),
    "stop_grace_s": ("stop_grace", "stop_grace_period", "stop_grace_s"),
    "stop_after_disconnect_s": ("stop_after_disconnect", "stop_after_disconnect_s"),
}
_RESOURCE_KEYS: Final = {
    "cpu": ("cpu", "cpus"), "memory": ("memory",), "requests": ("requests", "reservations"),
    "limits": ("limits",),
}
_AMOUNT_KEYS: Final = {"cpu": ("cpu", "cpus"), "memory": ("memory",)}
_HEALTH_KEYS: Final = {
    "http": ("http",), "tcp": ("tcp",), "cmd": ("cmd", "exec"), "port": ("port",),
    "kind": ("kind",), "path": ("path",), "command": ("command",),
    "interval_s": ("interval", "interval_s"), "timeout_s": ("timeout", "timeout_s"),
    "retries": ("retries",), "start_period_s": ("start_period", "start_period_s"),
    "readiness_only": ("readiness_only",),
}
_RESTART_KEYS: Final = {
    "policy": ("policy", "condition"), "max_attempts": ("max_attempts",),
    "delay_s": ("delay", "delay_s"), "max_delay_s": ("max_delay", "max_delay_s"),
    "window_s": ("window", "window_s"),
}
_UPDATE_KEYS: Final = {
    "parallelism": ("parallelism",), "delay_s": ("delay", "delay_s"),
    "failure_action": ("failure_action",), "monitor_s": ("monitor", "monitor_s"),
    "max_failure_ratio": ("max_failure_ratio",), "order": ("order",),
}
_RESTART_WORDS: Final = {
    "always": "always", "any": "always", "unless-stopped": "always",
    "on-failure": "on-failure", "never": "never", "no": "never", "none": "never",
}


def parse_spec(doc: Mapping[str, Any], *, source: str = "") -> WorkloadSpec:
    """Read one spec in the user form (see ``docs/specs.md``).

    Also accepts the stored form (:meth:`WorkloadSpec.to_dict`), so the output of
    ``meshctl inspect --json`` can be edited and applied again.

    Args:
        doc: the parsed YAML or JSON mapping.
        source: prefixed to error messages (a file name, ``file.yaml:12``).

    Raises:
        ConfigError: ``"<source>: service <name>: <field path>: <problem>"``; an
            unknown key names the closest known one.
    """
    return _parse_spec(doc, source)


def _parse_spec(doc: object, source: str) -> WorkloadSpec:
    try:
        return _parse_spec_fields(doc)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _parse_spec_fields(doc: object) -> WorkloadSpec:
    name = doc.get("name") if isinstance(doc, Mapping) else None
    where = f"service {name}" if isinstance(name, str) and len(name) <= 63 else "service"
    if isinstance(doc, Mapping) and doc.get("kind") == "job":
        where = where.replace("service", "job", 1)
    try:
        fields = _user_fields(doc)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return WorkloadSpec(**fields)


def _user_fields(doc: object) -> dict[str, Any]:
    got = _take(doc, "", _SPEC_KEYS)
    if "name" not in got:
        raise _fail("name", "is missing; every workload needs a name")
    out: dict[str, Any] = {"name": got["name"]}
    for key in ("kind", "driver", "image", "mode", "spread_over"):
        if key in got:
            out[key] = got[key]
    kind = got.get("kind", "service")
    for key in ("command", "entrypoint"):
        if key in got:
            out[key] = parse_argv(got[key], field=key)
    if "env" in got:
        out["env"] = parse_env(got["env"], field="env")
    if "ports" in got:
        out["ports"] = parse_ports(got["ports"])
    if "replicas" in got:
        out["replicas"] = got["replicas"]
    if "constraints" in got:
        if isinstance(got["constraints"], str):
            raise _fail("constraints", "expected a list of constraints, e.g. [\"zone==a\"]")
        out["constraints"] = got["constraints"]
    if "max_per_node" in got:
        out["max_per_node"] = got["max_per_node"]
    for key in ("affinity", "anti_affinity", "tags"):
        if key in got:
            value = got[key]
            out[key] = (value,) if isinstance(value, str) else value
    out.update(_user_resources(got))
    if "health" in got:
        out["health"] = _user_health(got["health"])
    out["restart"] = _user_restart(got.get("restart"), kind)
    if "update" in got:
        fields = _durations(_take(got["update"], "update", _UPDATE_KEYS), "update")
        with _within("update"):
            out["update"] = UpdateSpec(**fields)
    if "labels" in got:
        pairs = _key_values(got["labels"], "labels", MAX_LABELS, allow_bare=True)
        out["labels"] = _check_pairs(pairs, "labels", MAX_LABELS, _check_label_pair)
    for key in ("stop_grace_s", "stop_after_disconnect_s"):
        if key in got:
            out[key] = parse_duration(got[key], field=key.removesuffix("_s"))
    return out


def _durations(got: dict[str, Any], path: str) -> dict[str, Any]:
    """Parse every ``*_s`` field of a user mapping as a duration."""
    for key, value in got.items():
        if key.endswith("_s"):
            got[key] = parse_duration(value, field=f"{path}.{key.removesuffix('_s')}")
    return got


def _user_resources(got: Mapping[str, Any]) -> dict[str, int]:
    """Requests and limits from ``resources``, top-level ``cpu``/``memory`` and the
    stored ``*_millis``/``*_bytes`` fields; each amount may be given once."""
    found: dict[str, tuple[str, int]] = {}

    def put(field: str, path: str, amount: int) -> None:
        if field in found:
            raise _fail(path, f"is given twice (also as {found[field][0]}); keep one")
        found[field] = (path, amount)

    if "cpu" in got:
        put("cpu_millis", "cpu", parse_cpu_millis(got["cpu"]))
    if "memory" in got:
        put("memory_bytes", "memory", parse_memory_bytes(got["memory"]))
    for key, hi in (("cpu_millis", MAX_CPU_MILLIS), ("memory_bytes", MAX_MEMORY_BYTES),
                    ("cpu_limit_millis", MAX_CPU_MILLIS),
                    ("memory_limit_bytes", MAX_MEMORY_BYTES)):
        if key in got:
            put(key, key, _whole(got[key], key, hi))
    if "resources" in got:
        res = _take(got["resources"], "resources", _RESOURCE_KEYS)
        groups = [("resources", res, "")]
        if "requests" in res:
            groups.append(("resources.requests",
                           _take(res["requests"], "resources.requests", _AMOUNT_KEYS), ""))
        if "limits" in res:
            groups.append(("resources.limits",
                           _take(res["limits"], "resources.limits", _AMOUNT_KEYS), "_limit"))
        for path, amounts, infix in groups:
            if "cpu" in amounts:
                put(f"cpu{infix}_millis", f"{path}.cpu",
                    parse_cpu_millis(amounts["cpu"], field=f"{path}.cpu"))
            if "memory" in amounts:
                put(f"memory{infix}_bytes", f"{path}.memory",
                    parse_memory_bytes(amounts["memory"], field=f"{path}.memory"))
    return {field: amount for field, (_, amount) in found.items()}


def _user_health(value: object) -> HealthSpec:
    got = _take(value, "health", _HEALTH_KEYS)
    forms = [k for k in ("http", "tcp", "cmd", "kind") if k in got]
    if len(forms) != 1:
        raise _fail("health", "give exactly one of http: PATH, tcp: PORT or cmd: COMMAND"
                    + (f" (got {', '.join(forms)})" if forms else ""))
    fields = _durations({k: v for k, v in got.items() if k not in ("http", "tcp", "cmd")},
                        "health")
    form = forms[0]
    if form == "http":
        if "path" in got:
            raise _fail("health.path", "the path is the value of http:; remove path")
        path = "/" if got["http"] is True else got["http"]
        if not isinstance(path, str):
            raise _fail("health.http", f"expected a path such as /healthz, got {_show(path)}")
        fields.update(kind="http", path=path)
    elif form == "tcp":
        if "port" in got:
            raise _fail("health.port", "the port is the value of tcp:; remove port")
        port = "" if got["tcp"] is True else got["tcp"]
        if not isinstance(port, str):
            raise _fail("health.tcp", f"expected a port name (or true for the first port), "
                        f"got {_show(port)}")
        fields.update(kind="tcp", port=port)
    elif form == "cmd":
        fields.update(kind="exec", command=parse_argv(got["cmd"], field="health.cmd", shell=True))
    elif "command" in fields:
        fields["command"] = parse_argv(fields["command"], field="health.command", shell=True)
    with _within("health"):
        return HealthSpec(**fields)


def _user_restart(value: object, kind: object) -> RestartSpec:
    default_policy = "on-failure" if kind == "job" else "always"
    if value is None:
        return RestartSpec(policy=default_policy)
    if isinstance(value, str | bool):
        got: dict[str, Any] = {"policy": value}
    else:
        got = _durations(_take(value, "restart", _RESTART_KEYS), "restart")
    policy = got.get("policy", default_policy)
    if policy is False:  # YAML reads an unquoted `no` as false
        policy = "never"
    word = _RESTART_WORDS.get(policy) if isinstance(policy, str) else None
    if word is None:
        raise _fail("restart.policy",
                    f"{_show(policy)} is not one of 'always', 'on-failure', 'never'")
    if kind == "job" and word == "always":
        raise _fail("restart.policy", "a job runs to completion, so 'always' would run it "
                    "forever; use on-failure or never")
    got["policy"] = word
    with _within("restart"):
        return RestartSpec(**got)


# -- files -------------------------------------------------------------------------


class Document(NamedTuple):
    """One YAML or JSON document of a file, with where it came from.

    Attributes:
        data: the parsed value.
        line: the 1-based line the document starts on.
        node: the YAML node tree (``None`` for JSON), for :meth:`line_of`.
    """

    data: Any
    line: int
    node: Any

    def line_of(self, *path: str | int) -> int:
        """The 1-based line of the value at ``path`` (mapping keys, list indexes),
        or of its deepest ancestor found."""
        node = self.node
        line = self.line
        for step in path:
            if isinstance(node, yaml.MappingNode) and isinstance(step, str):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == step:
                        node, line = value, key.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
                if not 0 <= step < len(node.value):
                    return line
                node = node.value[step]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def read_documents(text: str, *, source: str = "") -> list[Document]:
    """Parse YAML (every document of a multi-document file) or JSON.

    Text that begins with ``{`` or ``[`` is read as JSON, for exact JSON error
    positions. Empty documents are skipped.

    Raises:
        ConfigError: too large (:data:`MAX_FILE_BYTES`, or more than
            :data:`MAX_YAML_NODES` values once aliases are expanded), or a syntax
            error with its line and column.
    """
    where = source or "input"
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected text, got {_show(text)}")
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters is more than the limit "
                          f"{MAX_FILE_BYTES}")
    documents: list[Document] = []
    try:
        if text.lstrip()[:1] in ("{", "["):
            try:
                documents.append(Document(json.loads(text), 1, None))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: "
                                  f"{exc.msg}") from None
        else:
            loader = yaml.SafeLoader(text)
            try:
                while loader.check_node():
                    node = loader.get_node()
                    documents.append(Document(loader.construct_document(node),
                                              node.start_mark.line + 1, node))
            finally:
                loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}{at}: invalid YAML: {problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"{where}: cannot read a value: {exc}") from None
    budget = MAX_YAML_NODES
    for doc in documents:
        budget = _count_values(doc.data, budget, where)
    return [d for d in documents if d.data is not None]


def _count_values(data: object, budget: int, where: str) -> int:
    """Walk ``data`` as a tree (aliases count every time they are used)."""
    stack = [data]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{where}: holds more than {MAX_YAML_NODES} values once YAML "
                              "aliases are expanded")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return budget


def load_specs(text: str, *, source: str = "") -> list[WorkloadSpec]:
    """Read every spec of a YAML (multi-document) or JSON file.

    Each document is one spec, a list of specs, ``{"services": [spec, ...]}`` or
    ``{"services": {name: spec}}`` (the key is the name).

    Raises:
        ConfigError: ``"<source>:<line>: service <name>: <field path>: <problem>"``;
            also for a name defined twice.
    """
    where = source or "input"
    specs: list[WorkloadSpec] = []
    lines: dict[str, int] = {}
    for doc in read_documents(text, source=source):
        for line, entry in _entries(doc, where):
            if len(specs) >= MAX_SPECS_PER_FILE:
                raise ConfigError(f"{where}: holds more than {MAX_SPECS_PER_FILE} specs")
            spec = _parse_spec(entry, f"{where}:{line}")
            if spec.name in lines:
                raise ConfigError(f"{where}:{line}: service {spec.name} is already defined on "
                                  f"line {lines[spec.name]}; names must be unique")
            lines[spec.name] = line
            specs.append(spec)
    return specs


def _entries(doc: Document, where: str) -> Iterator[tuple[int, object]]:
    data = doc.data
    if isinstance(data, list):
        for i, item in enumerate(data):
            yield doc.line_of(i), item
        return
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}:{doc.line}: expected a spec (a mapping) or a list of "
                          f"specs, got {_show(data)}")
    if "services" not in data:
        yield doc.line, data
        return
    extra = [k for k in data if k != "services"]
    if extra:
        raise ConfigError(f"{where}:{doc.line}: a file with 'services' holds nothing else; "
                          f"{_show(extra[0])} is not allowed beside it")
    services = data["services"]
    if isinstance(services, list):
        for i, item in enumerate(services):
            yield doc.line_of("services", i), item
    elif isinstance(services, Mapping):
        for name, item in services.items():
            line = doc.line_of("services", name) if isinstance(name, str) else doc.line
            if item is None:
                item = {}
            if not isinstance(item, Mapping):
                raise ConfigError(f"{where}:{line}: service {_show(name)}: expected a mapping, "
                                  f"got {_show(item)}")
            if "name" in item and item["name"] != name:
                raise ConfigError(f"{where}:{line}: service {_show(name)}: name "
                                  f"{_show(item['name'])} differs from its key; remove name")
            yield line, {"name": name, **item}
    else:
        raise ConfigError(f"{where}:{doc.line}: services: expected a list or a mapping, got "
                          f"{_show(services)}")


# -- comparing specs ---------------------------------------------------------------

RUNTIME_FIELDS: Final = (
    "name", "kind", "driver", "image", "command", "entrypoint", "env", "ports",
    "cpu_limit_millis", "memory_limit_bytes",
)
"""The fields a running replica is started with: changing any of them replaces the
replicas (a rolling update). Everything else (replicas, placement, reservations,
health, restart and update policies, labels, tags, timeouts) the node applies to
replicas as they run, or the scheduler to where they run."""


def needs_restart(old: WorkloadSpec, new: WorkloadSpec) -> bool:
    """True if going from ``old`` to ``new`` must replace running replicas.

    Scaling, placement fields, reservations, health, restart and update policy,
    labels, tags and timeouts do not (see :data:`RUNTIME_FIELDS`).
    """
    return any(getattr(old, f) != getattr(new, f) for f in RUNTIME_FIELDS)


_DISPLAY_NAMES: Final = {
    "cpu_millis": "cpu", "memory_bytes": "memory", "cpu_limit_millis": "cpu_limit",
    "memory_limit_bytes": "memory_limit",
}


def spec_diff(old: WorkloadSpec, new: WorkloadSpec) -> list[str]:
    """What changed, one line per field, for people: ``replicas: 3 -> 5``.

    Environment values are not shown (they often hold secrets): a changed
    variable reads ``env.TOKEN: changed``.
    """
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    lines = []
    for key in list(before) + [k for k in after if k not in before]:
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key.startswith("env."):
            state = "added" if a is None else "removed" if b is None else "changed"
            lines.append(f"{key}: {state}")
        elif a is None:
            lines.append(f"{key}: added {b}")
        elif b is None:
            lines.append(f"{key}: removed (was {a})")
        else:
            lines.append(f"{key}: {a} -> {b}")
    return lines


def _flatten(stored: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in stored.items():
        name = _DISPLAY_NAMES.get(key, key.removesuffix("_s"))
        if key == "health":
            out[name] = "none" if value is None else str(HealthSpec(**value))
        elif key in ("env", "labels", "restart", "update"):
            for sub, item in value.items():
                out[f"{name}.{sub.removesuffix('_s')}"] = _display(sub, item)
        elif key == "ports":
            out[name] = "[" + ", ".join(str(PortSpec(**p)) for p in value) + "]"
        else:
            out[name] = _display(key, value)
    return out


def _display(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        if key in ("command", "entrypoint"):
            return shlex.join(value) if value else "none"
        return "[" + ", ".join(value) + "]"
    if key.endswith("_s") and isinstance(value, float):
        return _fmt_seconds(value)
    if key.endswith("_millis"):
        return format_cpu(value) if value else "none"
    if key.endswith("_bytes"):
        return format_memory(value) if value else "none"
    if isinstance(value, str):
        return value if value else '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


__all__ = [
    "MAX_SPEC_BYTES",
    "RUNTIME_FIELDS",
    "Document",
    "HealthSpec",
    "PortSpec",
    "RestartSpec",
    "UpdateSpec",
    "WorkloadSpec",
    "is_dns_label",
    "load_specs",
    "needs_restart",
    "parse_argv",
    "parse_cpu_millis",
    "parse_duration",
    "parse_env",
    "parse_memory_bytes",
    "parse_ports",
    "parse_spec",
    "port_env_name",
    "read_documents",
    "spec_diff",
]
