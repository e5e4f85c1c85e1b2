"""Docker Compose files as ``docker stack deploy`` reads them, turned into specs.

:func:`from_compose` reads the part of the Compose file format that Swarm's
``docker stack deploy`` uses and that means the same thing on meshd: ``image``,
``command``, ``entrypoint``, ``environment``, ``ports``, ``labels``,
``healthcheck``, ``stop_grace_period`` and ``deploy.{mode, replicas, placement,
resources, restart_policy, update_config, labels}``. Service ``web`` of stack
``shop`` becomes the docker workload ``shop_web``, labelled
``com.docker.stack.namespace=shop`` as Swarm labels it.

Rule: nothing is dropped silently. Every key meshd does not support (volumes,
networks, secrets, build, ...) becomes a warning naming it; behaviour that
differs from Swarm's (no ingress routing mesh, no variable substitution) becomes
a warning too. Input that cannot be honoured safely is an error instead: a port
bound to one host address (meshd would expose it on every address), a placement
constraint that cannot be translated, a service without an image.

Fields the file does not set take meshd's defaults (``docs/specs.md``), not
Swarm's: e.g. a restart backs off from 0.5 s instead of waiting a fixed 5 s.
Pure: no I/O; the caller reads the file and prints the warnings.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, Final

from mesh.errors import ConfigError
from mesh.node.spec import (
    HealthSpec,
    RestartSpec,
    UpdateSpec,
    WorkloadSpec,
    is_dns_label,
    parse_argv,
    parse_cpu_millis,
    parse_duration,
    parse_env,
    parse_memory_bytes,
    parse_ports,
    read_documents,
)
from mesh.placement import parse_constraint
from mesh.types import ServiceId

STACK_LABEL: Final = "com.docker.stack.namespace"
"""The label naming a workload's stack (the same key Swarm uses)."""

_SUPPORTED: Final = frozenset({
    "image", "command", "entrypoint", "environment", "ports", "labels", "healthcheck",
    "stop_grace_period", "deploy",
})
_COMPOSE_KEYS: Final = frozenset({
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup",
    "cgroup_parent", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period",
    "cpu_quota", "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset",
    "credential_spec", "depends_on", "develop", "device_cgroup_rules", "devices", "dns",
    "dns_opt", "dns_search", "domainname", "driver_opts", "env_file", "expose", "extends",
    "external_links", "extra_hosts", "gpus", "group_add", "hostname", "init", "ipc",
    "isolation", "label_file", "links", "logging", "mac_address", "mem_limit",
    "mem_reservation", "mem_swappiness", "memswap_limit", "network_mode", "networks",
    "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform", "post_start",
    "pre_stop", "privileged", "profiles", "pull_policy", "read_only", "restart", "runtime",
    "scale", "secrets", "security_opt", "shm_size", "stdin_open", "stop_signal",
    "storage_opt", "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode", "uts",
    "volumes", "volumes_from", "working_dir",
}) | _SUPPORTED
_TOP_UNSUPPORTED: Final = frozenset({"networks", "volumes", "secrets", "configs", "include",
                                     "models"})
_DEFAULT_MAX_DELAY_S: Final = RestartSpec().max_delay_s
_CONDITIONS: Final = {"none": "never", "on-failure": "on-failure", "any": "always"}
_VARIABLE_RE: Final = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def from_compose(
    text: str, stack: str, *, source: str = "docker-compose.yml"
) -> tuple[list[WorkloadSpec], list[str]]:
    """Translate a Compose file into workload specs, as ``docker stack deploy`` would.

    Args:
        text: the file's contents (YAML).
        stack: the stack name; services are named ``<stack>_<service>``, lower-cased.
        source: the file name, for error messages.

    Returns:
        The specs, in file order, and one warning line per ignored or differently
        behaving field (``"service web: volumes is not supported by meshd and was
        ignored"``).

    Raises:
        ConfigError: ``"<source>:<line>: service <name>: <field path>: <problem>"``,
            for what cannot be deployed faithfully.
    """
    if not isinstance(stack, str) or not is_dns_label(stack.lower()):
        raise ConfigError(f"stack name {stack!r} is not a DNS label; use 1-63 letters, digits, "
                          "'-' or '_', starting and ending with a letter or digit")
    documents = read_documents(text, source=source)
    if len(documents) != 1:
        raise ConfigError(f"{source}: a Compose file holds one YAML document, this one holds "
                          f"{len(documents)}")
    document = documents[0]
    top = document.data
    if not isinstance(top, Mapping):
        raise ConfigError(f"{source}: expected a Compose file (a mapping with services:)")
    warnings: list[str] = []
    for key in top:
        if key in ("version", "services") or (isinstance(key, str) and key.startswith("x-")):
            continue
        if key == "name":
            warnings.append(f"name is ignored: the stack is named {stack} on the command line")
        elif key in _TOP_UNSUPPORTED:
            warnings.append(f"top-level {key} is not supported by meshd and was ignored")
        else:
            warnings.append(f"top-level {key!s:.60} is not a Compose key meshd knows and was "
                            "ignored")
    services = top.get("services")
    if not isinstance(services, Mapping) or not services:
        raise ConfigError(f"{source}:{document.line_of('services')}: services: expected a "
                          "mapping of service names to services")
    specs: list[WorkloadSpec] = []
    for name, body in services.items():
        line = document.line_of("services", name) if isinstance(name, str) else document.line
        shown = name if isinstance(name, str) and len(name) <= 63 else repr(name)[:60]
        try:
            spec, notes = _service(stack.lower(), name, body)
        except ConfigError as exc:
            raise ConfigError(f"{source}:{line}: service {shown}: {exc}") from None
        specs.append(spec)
        warnings.extend(f"service {shown}: {note}" for note in notes)
    return specs, warnings


def _service(stack: str, name: object, body: object) -> tuple[WorkloadSpec, list[str]]:
    if not isinstance(name, str):
        raise ConfigError(f"the service name must be text, got {name!r:.60}")
    full = f"{stack}_{name}".lower()
    if not is_dns_label(full):
        raise ConfigError(f"the workload name {full!r:.70} (<stack>_<service>) is not a DNS "
                          "label: rename the service with letters, digits, '-' or '_' and "
                          "keep the two names under 63 characters together")
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise ConfigError(f"expected a mapping, got {type(body).__name__}")
    notes: list[str] = []
    variables: list[str] = []
    body = _unescape(body, variables)
    assert isinstance(body, Mapping)
    for key in body:
        if isinstance(key, str) and key.startswith("x-"):
            continue
        if key not in _SUPPORTED:
            notes.append(_unsupported(key, _COMPOSE_KEYS, _SUPPORTED))
    if variables:
        notes.append("variable substitution is not performed by meshd; "
                     + ", ".join(dict.fromkeys(variables))
                     + " kept as written (substitute first, e.g. with `docker compose config`)")
    fields: dict[str, Any] = {"name": ServiceId(full), "driver": "docker"}
    if "build" in body and "image" not in body:
        raise ConfigError("image: is missing; meshd does not build images (build: is not "
                          "supported): build and push the image, then name it in image:")
    if "image" not in body:
        raise ConfigError("image: is missing; every service needs an image")
    fields["image"] = body["image"]
    for key in ("command", "entrypoint"):
        if body.get(key) is not None:
            fields[key] = parse_argv(body[key], field=key)
    if body.get("environment") is not None:
        fields["env"] = parse_env(_environment(body["environment"], notes), field="environment")
    if body.get("ports") is not None:
        fields["ports"] = parse_ports(_ports(body["ports"], notes))
    if body.get("stop_grace_period") is not None:
        fields["stop_grace_s"] = parse_duration(body["stop_grace_period"],
                                                field="stop_grace_period")
    deploy = _mapping(body.get("deploy"), "deploy")
    fields.update(_deploy(deploy, notes))
    health = _healthcheck(body.get("healthcheck"), notes)
    if health is not None:
        fields["health"] = health
    labels = _labels(body.get("labels"), deploy.get("labels"), stack, notes)
    fields["labels"] = tuple(labels.items())
    try:
        return WorkloadSpec(**fields), notes
    except ConfigError as exc:
        # Named by the caller already ("service web:"), not by its workload name.
        message = str(exc)
        for kind in ("service", "job"):
            message = message.removeprefix(f"{kind} {full}: ")
        raise ConfigError(message) from None


def _unsupported(key: object, known: frozenset[str], supported: frozenset[str],
                 path: str = "") -> str:
    shown = f"{path}{key!s:.60}"
    if isinstance(key, str) and not path and key in _WHY:
        return f"{shown} {_WHY[key]}"
    if key in known or not isinstance(key, str):
        return f"{shown} is not supported by meshd and was ignored"
    candidates = {f"{path}{k}": k for k in supported}
    if not path:
        candidates.update({f"deploy.{k}": k for k in _DEPLOY})
    close = difflib.get_close_matches(key, sorted(set(candidates.values())), n=1, cutoff=0.6)
    spelled = [full for full, k in sorted(candidates.items()) if close and k == close[0]]
    hint = f" (did you mean {spelled[0]}?)" if spelled else ""
    return f"{shown} is not a Compose key meshd knows{hint} and was ignored"


_WHY: Final = {
    "restart": "is ignored by docker stack deploy and by meshd; use deploy.restart_policy",
    "env_file": "is not supported by meshd (nodes read no files for a spec) and was ignored; "
                "list the variables under environment",
    "build": "is not supported by meshd (it does not build images) and was ignored",
    "expose": "is documentation only and was ignored",
}


def _unescape(value: object, variables: list[str]) -> object:
    """Compose's ``$$`` is a literal ``$``; any other ``$VAR`` or ``${VAR}`` is an
    interpolation meshd does not perform: keep it and remember its name."""
    if isinstance(value, str):
        if "$" not in value:
            return value

        def replace(match: re.Match[str]) -> str:
            if match[0] == "$$":
                return "$"
            variables.append(match[0][:40])
            return match[0]

        return _VARIABLE_RE.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: _unescape(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape(v, variables) for v in value]
    return value


def _mapping(value: object, path: str) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[Any, Any], path: str, supported: frozenset[str],
                known: frozenset[str], notes: list[str]) -> None:
    for key in data:
        if key not in supported and not (isinstance(key, str) and key.startswith("x-")):
            notes.append(_unsupported(key, known | supported, supported, f"{path}."))


def _environment(value: object, notes: list[str]) -> object:
    """Drop (with a note) the variables Compose would copy from the shell."""
    if isinstance(value, Mapping):
        kept = {}
        for key, item in value.items():
            if item is None:
                notes.append(f"environment.{key!s:.60} has no value (Compose copies it from "
                             "the shell); it was left out")
            else:
                kept[key] = item
        return kept
    if isinstance(value, list):
        kept_list = []
        for item in value:
            if isinstance(item, str) and "=" not in item:
                notes.append(f"environment.{item:.60} has no value (Compose copies it from the "
                             "shell); it was left out")
            else:
                kept_list.append(item)
        return kept_list
    return value


def _ports(value: object, notes: list[str]) -> object:
    """Strip what only Swarm's routing mesh means; refuse a bind to one address."""
    if not isinstance(value, list):
        return value
    out: list[object] = []
    published = False
    for i, item in enumerate(value):
        if isinstance(item, str):
            item, host = _split_host_ip(item)
            _refuse_host_ip(host, f"ports[{i}]")
            published = published or ":" in item
        elif isinstance(item, Mapping):
            entry = dict(item)
            mode = entry.pop("mode", "ingress")
            _refuse_host_ip(entry.pop("host_ip", None), f"ports[{i}].host_ip")
            if entry.pop("app_protocol", None) is not None:
                notes.append(f"ports[{i}].app_protocol is not supported by meshd and was ignored")
            published = published or (entry.get("published") is not None and mode != "host")
            item = entry
        out.append(item)
    if published:
        notes.append("published ports are bound only on the nodes running a replica (Swarm's "
                     "mode: host); meshd has no ingress routing mesh, find replicas through DNS")
    return out


def _split_host_ip(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        return (rest, host) if sep else (text, None)
    body = text.partition("/")[0]
    if body.count(":") == 2:
        host, _, rest = text.partition(":")
        return rest, host
    return text, None


def _refuse_host_ip(host: object, path: str) -> None:
    if host is None or host in ("", "0.0.0.0", "::"):
        return
    raise ConfigError(f"{path}: binds the host address {host!s:.60}, which meshd cannot do (it "
                      "publishes on every address of the node); remove the address, or the "
                      "port if it must stay private")


_DEPLOY: Final = frozenset({"mode", "replicas", "placement", "resources", "restart_policy",
                            "update_config", "labels", "endpoint_mode", "rollback_config"})
_PLACEMENT: Final = frozenset({"constraints", "preferences", "max_replicas_per_node"})
_RESOURCES: Final = frozenset({"limits", "reservations"})
_AMOUNTS: Final = frozenset({"cpus", "memory"})
_AMOUNTS_KNOWN: Final = frozenset({"pids", "devices", "generic_resources"})
_RESTART: Final = frozenset({"condition", "delay", "max_attempts", "window"})
_UPDATE: Final = frozenset({"parallelism", "delay", "failure_action", "monitor",
                            "max_failure_ratio", "order"})
_HEALTH: Final = frozenset({"test", "interval", "timeout", "retries", "start_period",
                            "disable"})
_HEALTH_KNOWN: Final = frozenset({"start_interval"})


def _deploy(deploy: Mapping[Any, Any], notes: list[str]) -> dict[str, Any]:
    _check_keys(deploy, "deploy", _DEPLOY, frozenset(), notes)
    if deploy.get("endpoint_mode", "dnsrr") != "dnsrr":
        notes.append("deploy.endpoint_mode is not supported by meshd and was ignored: there is "
                     "no virtual IP, DNS answers with the replicas' addresses (as dnsrr)")
    if "rollback_config" in deploy:
        notes.append("deploy.rollback_config is not supported by meshd and was ignored: a "
                     "rollback uses update_config's settings")
    fields: dict[str, Any] = {}
    mode = deploy.get("mode", "replicated")
    if mode == "global-job":
        raise ConfigError("deploy.mode: global-job is not supported; meshd jobs have a "
                          "replica count (use replicated-job)")
    if mode not in ("replicated", "global", "replicated-job"):
        raise ConfigError(f"deploy.mode: {mode!r:.60} is not replicated, global or "
                          "replicated-job")
    if mode == "replicated-job":
        fields["kind"] = "job"
    else:
        fields["mode"] = mode
    if deploy.get("replicas") is not None:
        if mode == "global":
            raise ConfigError("deploy.replicas: a global service runs one replica on each node; "
                              "remove replicas or use mode: replicated")
        fields["replicas"] = deploy["replicas"]
    fields.update(_placement(_mapping(deploy.get("placement"), "deploy.placement"), notes))
    fields.update(_resources(_mapping(deploy.get("resources"), "deploy.resources"), notes))
    restart = _restart(_mapping(deploy.get("restart_policy"), "deploy.restart_policy"),
                       fields.get("kind", "service"), notes)
    if restart is not None:
        fields["restart"] = restart
    fields["update"] = _update(_mapping(deploy.get("update_config"), "deploy.update_config"),
                               notes)
    return fields


def _placement(placement: Mapping[Any, Any], notes: list[str]) -> dict[str, Any]:
    _check_keys(placement, "deploy.placement", _PLACEMENT, frozenset(), notes)
    fields: dict[str, Any] = {}
    constraints = placement.get("constraints")
    if constraints is not None:
        if not isinstance(constraints, list):
            raise ConfigError("deploy.placement.constraints: expected a list")
        for i, text in enumerate(constraints):
            try:
                parsed = parse_constraint(text)
            except ConfigError as exc:
                raise ConfigError(f"deploy.placement.constraints[{i}]: {exc}") from None
            if parsed.key == "node.role":
                notes.append(f"deploy.placement.constraints[{i}]: meshd has no manager nodes; "
                             "node.role matches the --role a node was started with (default "
                             "worker)")
        fields["constraints"] = constraints
    preferences = placement.get("preferences")
    if preferences is not None:
        if not isinstance(preferences, list):
            raise ConfigError("deploy.placement.preferences: expected a list")
        for i, preference in enumerate(preferences):
            spread = preference.get("spread") if isinstance(preference, Mapping) else None
            key = spread.removeprefix("node.labels.") if isinstance(spread, str) else None
            if i > 0 or not key or key == spread:
                notes.append(f"deploy.placement.preferences[{i}] is not supported by meshd and "
                             "was ignored (meshd spreads over one node label: the first "
                             "spread: node.labels.<label>)")
            else:
                fields["spread_over"] = key
    if placement.get("max_replicas_per_node") is not None:
        fields["max_per_node"] = placement["max_replicas_per_node"]
    return fields


def _resources(resources: Mapping[Any, Any], notes: list[str]) -> dict[str, int]:
    _check_keys(resources, "deploy.resources", _RESOURCES, frozenset(), notes)
    fields: dict[str, int] = {}
    for group, infix in (("reservations", ""), ("limits", "_limit")):
        path = f"deploy.resources.{group}"
        amounts = _mapping(resources.get(group), path)
        _check_keys(amounts, path, _AMOUNTS, _AMOUNTS_KNOWN, notes)
        if amounts.get("cpus") is not None:
            fields[f"cpu{infix}_millis"] = parse_cpu_millis(amounts["cpus"], field=f"{path}.cpus")
        if amounts.get("memory") is not None:
            fields[f"memory{infix}_bytes"] = parse_memory_bytes(amounts["memory"],
                                                                field=f"{path}.memory")
    return fields


def _restart(policy: Mapping[Any, Any], kind: str, notes: list[str]) -> RestartSpec | None:
    path = "deploy.restart_policy"
    _check_keys(policy, path, _RESTART, frozenset(), notes)
    if not policy:
        return None
    default = "on-failure" if kind == "job" else "any"
    condition = policy.get("condition", default)
    if condition not in _CONDITIONS:
        raise ConfigError(f"{path}.condition: {condition!r:.60} is not none, on-failure or any")
    fields: dict[str, Any] = {"policy": _CONDITIONS[condition]}
    if policy.get("delay") is not None:
        delay = parse_duration(policy["delay"], field=f"{path}.delay")
        fields["delay_s"] = delay
        fields["max_delay_s"] = max(delay, _DEFAULT_MAX_DELAY_S)
    if policy.get("max_attempts") is not None:
        fields["max_attempts"] = policy["max_attempts"]
    if policy.get("window") is not None:
        fields["window_s"] = parse_duration(policy["window"], field=f"{path}.window")
    if kind == "job" and fields["policy"] == "always":
        raise ConfigError(f"{path}.condition: a job runs to completion, so 'any' would run it "
                          "forever; use on-failure or none")
    try:
        return RestartSpec(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None


def _update(update: Mapping[Any, Any], notes: list[str]) -> UpdateSpec:
    path = "deploy.update_config"
    _check_keys(update, path, _UPDATE, frozenset(), notes)
    fields: dict[str, Any] = {}
    for key in ("parallelism", "failure_action", "max_failure_ratio", "order"):
        if update.get(key) is not None:
            fields[key] = update[key]
    for key in ("delay", "monitor"):
        if update.get(key) is not None:
            fields[f"{key}_s"] = parse_duration(update[key], field=f"{path}.{key}")
    try:
        return UpdateSpec(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None


def _healthcheck(value: object, notes: list[str]) -> HealthSpec | None:
    path = "healthcheck"
    check = _mapping(value, path)
    if not check:
        return None
    _check_keys(check, path, _HEALTH, _HEALTH_KNOWN, notes)
    if check.get("disable") is True:
        return None
    test = check.get("test")
    if test is None:
        notes.append("healthcheck has no test: meshd does not run the image's own HEALTHCHECK, "
                     "so no check was set")
        return None
    if isinstance(test, str):
        command = parse_argv(test, field=f"{path}.test", shell=True)
    elif isinstance(test, list) and test and test[0] == "NONE":
        return None
    elif isinstance(test, list) and len(test) == 2 and test[0] == "CMD-SHELL":
        command = parse_argv(test[1], field=f"{path}.test[1]", shell=True)
    elif isinstance(test, list) and len(test) >= 2 and test[0] == "CMD":
        command = parse_argv(test[1:], field=f"{path}.test")
    else:
        raise ConfigError(f"{path}.test: expected [\"CMD\", ARG...], [\"CMD-SHELL\", "
                          "\"COMMAND\"], [\"NONE\"] or a command string")
    fields: dict[str, Any] = {"kind": "exec", "command": command}
    for key in ("interval", "timeout", "start_period"):
        if check.get(key) is not None:
            fields[f"{key}_s"] = parse_duration(check[key], field=f"{path}.{key}")
    if check.get("retries") is not None:
        fields["retries"] = check["retries"]
    try:
        return HealthSpec(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None


def _labels(service: object, deploy: object, stack: str, notes: list[str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for path, value in (("labels", service), ("deploy.labels", deploy)):
        if value is None:
            continue
        if isinstance(value, list):
            value = dict(_label_item(item, f"{path}[{i}]") for i, item in enumerate(value))
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping or a list of KEY=VALUE")
        for key, item in value.items():
            text = "" if item is None else item if isinstance(item, str) else None
            if text is None or not isinstance(key, str):
                raise ConfigError(f"{path}.{key!s:.60}: expected text, got "
                                  f"{type(item).__name__}; quote it")
            if key in merged and merged[key] != text:
                notes.append(f"{path}.{key:.60} overrides labels.{key:.60}")
            merged[key] = text
    if merged.get(STACK_LABEL, stack) != stack:
        notes.append(f"labels.{STACK_LABEL} is set by meshd to the stack name {stack}")
    merged[STACK_LABEL] = stack
    return merged


def _label_item(item: object, path: str) -> tuple[str, str]:
    if not isinstance(item, str):
        raise ConfigError(f"{path}: expected KEY=VALUE text")
    key, _, value = item.partition("=")
    return key, value
