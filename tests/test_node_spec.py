"""Workload specs: the user form's spellings, validation messages, the stored form's
round trips, placement mapping, files, diffs, and hostile input."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, RemoteProtocolError
from mesh.node.spec import (
    MAX_SPEC_BYTES,
    HealthSpec,
    PortSpec,
    RestartSpec,
    UpdateSpec,
    WorkloadSpec,
    load_specs,
    needs_restart,
    parse_duration,
    parse_ports,
    parse_spec,
    port_env_name,
    read_documents,
    spec_diff,
)
from mesh.placement import Constraint, Mode, Op, Resources
from mesh.types import ServiceId


def spec(**fields: Any) -> WorkloadSpec:
    """parse_spec of a small docker service plus ``fields``."""
    return parse_spec({"name": "web", "image": "nginx:1", **fields})


def error_of(doc: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_spec(doc)
    return str(info.value)


# -- spellings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "millis"), [("0.5", 500), ("500m", 500), (1, 1000), (0.25, 250), ("2", 2000)]
)
def test_cpu_spellings(cpu: object, millis: int) -> None:
    assert spec(cpu=cpu).cpu_millis == millis
    assert spec(resources={"cpu": cpu}).cpu_millis == millis


@pytest.mark.parametrize(
    ("memory", "size"),
    [("512M", 512 << 20), ("1Gi", 1 << 30), ("1.5G", 3 << 29), (4096, 4096), ("64KiB", 64 << 10)],
)
def test_memory_spellings(memory: object, size: int) -> None:
    assert spec(memory=memory).memory_bytes == size
    assert spec(resources={"requests": {"memory": memory}}).memory_bytes == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("1m30s", 90.0), ("250ms", 0.25), ("1h", 3600.0), (3, 3.0), (0.5, 0.5),
     ("2.5", 2.5), ("1h2m3s", 3723.0), ("1500us", 0.0015)],
)
def test_duration_spellings(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "s", "-1s", "", "1m 30s", "5s5", True, [], "9999h"])
def test_bad_durations_name_the_field(text: object) -> None:
    with pytest.raises(ConfigError, match=r"^health\.interval: "):
        parse_duration(text, field="health.interval")


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("80", [PortSpec("p80", 80, 0)]),
        (80, [PortSpec("p80", 80, 0)]),
        ("8080:80", [PortSpec("p80", 80, 8080)]),
        ("8080:80/udp", [PortSpec("p80", 80, 8080, "udp")]),
        ("http", [PortSpec("http")]),
        ("8000-8001", [PortSpec("p8000", 8000), PortSpec("p8001", 8001)]),
        ("http=8080:80", [PortSpec("http", 80, 8080)]),
        ("9000-9001:8000-8001", [PortSpec("p8000", 8000, 9000), PortSpec("p8001", 8001, 9001)]),
        ({"name": "api", "target": 80, "published": "8080"}, [PortSpec("api", 80, 8080)]),
        ({"container_port": 53, "host_port": 53, "protocol": "udp"},
         [PortSpec("p53", 53, 53, "udp")]),
        ({"host_port": 8080}, [PortSpec("p8080", 0, 8080)]),
    ],
)
def test_port_spellings(item: object, expected: list[PortSpec]) -> None:
    assert list(parse_ports([item])) == expected


def test_default_port_names_never_clash() -> None:
    ports = parse_ports(["53:53/udp", "53:53", {"name": "p53-tcp", "host_port": 54}, {},
                         {"name": "p53-4", "host_port": 55}, "53/udp"])
    assert [p.name for p in ports] == ["p53", "p53-1", "p53-tcp", "p3", "p53-4", "p53-udp"]


@pytest.mark.parametrize(
    "item", ["127.0.0.1:80:80", "80/sctp", "a:b", "9000-9001:80", "0-5", "http=8000-8001",
             True, 70000, {"target": "x"}, {"bogus": 1}, "Bad_Name=80"],
)
def test_bad_ports_name_their_index(item: object) -> None:
    with pytest.raises(ConfigError, match=r"^ports\[1\]"):
        parse_ports(["80", item])


def test_env_as_mapping_or_list() -> None:
    as_map = spec(env={"B": "2", "A": 1, "FLAG": True})
    as_list = spec(environment=["FLAG=true", "B=2", "A=1"])
    assert as_map.env == as_list.env == (("A", "1"), ("B", "2"), ("FLAG", "true"))


def test_command_as_text_is_split_like_a_shell() -> None:
    assert spec(command="nginx -g 'daemon off;'").command == ("nginx", "-g", "daemon off;")
    assert spec(command=["sleep", 10]).command == ("sleep", "10")
    assert spec(entrypoint="/bin/sh -c").entrypoint == ("/bin/sh", "-c")


def test_constraints_are_stored_canonically() -> None:
    assert spec(constraints=["node.labels.zone == a", "rack in [b, a]"]).constraints == (
        "zone==a", "rack in (a, b)")


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ({"http": "/healthz", "port": "web"}, HealthSpec("http", path="/healthz", port="web")),
        ({"http": True}, HealthSpec("http")),
        ({"tcp": "web"}, HealthSpec("tcp", port="web")),
        ({"tcp": True, "readiness_only": True}, HealthSpec("tcp", readiness_only=True)),
        ({"cmd": ["pg_isready", "-q"]}, HealthSpec("exec", command=("pg_isready", "-q"))),
        ({"cmd": "curl -f localhost || exit 1"},
         HealthSpec("exec", command=("sh", "-c", "curl -f localhost || exit 1"))),
        ({"http": "/", "interval": "5s", "timeout": "500ms", "retries": 2, "start_period": "1m"},
         HealthSpec("http", interval_s=5.0, timeout_s=0.5, retries=2, start_period_s=60.0)),
        ({"kind": "tcp", "port": "web", "interval_s": 3}, HealthSpec("tcp", port="web",
                                                                     interval_s=3.0)),
    ],
)
def test_health_spellings(health: dict[str, Any], expected: HealthSpec) -> None:
    assert spec(ports=["web=8080:80"], health=health).health == expected


@pytest.mark.parametrize(
    ("restart", "expected"),
    [
        ("always", RestartSpec()),
        ("on-failure", RestartSpec("on-failure")),
        ("never", RestartSpec("never")),
        (False, RestartSpec("never")),  # YAML's unquoted `no`
        ("no", RestartSpec("never")),
        ("any", RestartSpec("always")),
        ({"condition": "on-failure", "max_attempts": 5, "delay": "2s", "max_delay": "1m",
          "window": "2m"}, RestartSpec("on-failure", 5, 2.0, 60.0, 120.0)),
        ({"delay": 1}, RestartSpec(delay_s=1.0)),
    ],
)
def test_restart_spellings(restart: object, expected: RestartSpec) -> None:
    assert spec(restart=restart).restart == expected


def test_update_spelling() -> None:
    got = spec(update={"parallelism": 0, "delay": "10s", "failure_action": "rollback",
                       "monitor": "30s", "max_failure_ratio": 0.2, "order": "start-first"})
    assert got.update == UpdateSpec(0, 10.0, "rollback", 30.0, 0.2, "start-first")


def test_resources_with_limits() -> None:
    got = spec(resources={"cpu": "250m", "memory": "256M",
                          "limits": {"cpu": 1, "memory": "1G"}})
    assert (got.cpu_millis, got.memory_bytes) == (250, 256 << 20)
    assert (got.cpu_limit_millis, got.memory_limit_bytes) == (1000, 1 << 30)


def test_labels_tags_and_lists_are_sorted() -> None:
    got = spec(labels=["b=2", "a"], tags=["v2", "blue", "v2"], affinity="db",
               anti_affinity=["z", "y"])
    assert got.labels == (("a", ""), ("b", "2"))
    assert got.tags == ("blue", "v2")
    assert got.affinity == ("db",)
    assert got.anti_affinity == ("y", "z")


def test_process_service_with_a_picked_port() -> None:
    got = parse_spec({"name": "api", "driver": "process", "ports": ["http"],
                      "command": "python3 -m http.server", "health": {"http": "/"}})
    assert got.ports == (PortSpec("http"),)
    assert port_env_name("http-alt") == "MESH_PORT_HTTP_ALT"


def test_job_defaults_restart_to_on_failure() -> None:
    job = parse_spec({"name": "backup", "kind": "job", "image": "busybox"})
    assert job.restart.policy == "on-failure"
    direct = WorkloadSpec(ServiceId("backup"), kind="job", image="busybox")
    assert direct.restart == RestartSpec("on-failure")


def test_global_mode() -> None:
    got = spec(mode="global")
    assert got.placement().mode is Mode.GLOBAL
    with pytest.raises(ConfigError, match="service web: replicas: a global workload"):
        got.with_replicas(3)


# -- validation messages -----------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"image": "x"}, "service: name: is missing"),
        ({"name": "Web", "image": "x"}, "service name 'Web' is not a DNS label"),
        ({"name": "-web", "image": "x"}, "service name '-web' is not a DNS label"),
        ({"name": "web"}, "service web: image: give an image (docker) or a command (process)"),
        ({"name": "web", "driver": "docker", "command": "x"},
         "service web: image: the docker driver needs an image"),
        ({"name": "web", "driver": "process", "image": "x"},
         "service web: command: the process driver needs a command"),
        ({"name": "web", "driver": "process", "command": "x", "entrypoint": "y"},
         "service web: entrypoint: only the docker driver has an entrypoint"),
        ({"name": "web", "driver": "process", "command": "x", "ports": ["80"]},
         "service web: ports[0].container_port: the process driver runs on the node's network"),
        ({"name": "web", "driver": "podman", "image": "x"}, "service web: driver: 'podman' is not"),
        ({"name": "web", "image": "x", "kind": "cron"}, "kind: 'cron' is not one of"),
        ({"name": "web", "image": "x", "ports": ["80", {"host_port": 70000}]},
         "service web: ports[1].host_port: 70000 is out of range 0-65535"),
        ({"name": "web", "image": "x", "ports": ["8080:80", "8080:81"]},
         "service web: ports[1].host_port: 8080/tcp is already published by ports[0]"),
        ({"name": "web", "image": "x", "ports": ["a-b=80", "a_b=81"]},
         "service web: ports[1].name: 'a_b' clashes with ports[0]"),
        ({"name": "web", "image": "x", "replicas": -1}, "service web: replicas: -1 is out of range"),
        ({"name": "web", "image": "x", "replicas": "3"},
         "service web: replicas: expected a whole number, got '3'"),
        ({"name": "web", "image": "x", "mode": "global", "replicas": 2},
         "service web: replicas: a global workload runs one replica"),
        ({"name": "web", "image": "x", "kind": "job", "mode": "global"},
         "job web: mode: a job cannot be global"),
        ({"name": "web", "image": "x", "kind": "job", "restart": "always"},
         "job web: restart.policy: a job runs to completion"),
        ({"name": "web", "image": "x", "health": {"http": "/"}},
         "service web: health: an http check needs a port"),
        ({"name": "web", "image": "x", "ports": ["80"], "health": {"tcp": "db"}},
         "service web: health.port: 'db' names no port; the ports are p80"),
        ({"name": "web", "image": "x", "health": {"cmd": []}},
         "service web: health.command: an exec check needs a command"),
        ({"name": "web", "image": "x", "health": {"http": "/", "cmd": "true"}},
         "service web: health: give exactly one of"),
        ({"name": "web", "image": "x", "health": {"http": "nope"}},
         "service web: health.path: 'nope' must begin with '/'"),
        ({"name": "web", "image": "x", "health": {"cmd": "x", "interval": 0}},
         "service web: health.interval_s: 0.0 must be more than 0 seconds"),
        ({"name": "web", "image": "x", "health": {"cmd": "x", "retries": 0}},
         "service web: health.retries: 0 is out of range 1-1000"),
        ({"name": "web", "image": "x", "restart": "sometimes"},
         "service web: restart.policy: 'sometimes' is not one of"),
        ({"name": "web", "image": "x", "restart": {"delay": "1m", "max_delay": "1s"}},
         "service web: restart.max_delay_s: 1s is less than delay_s 1m"),
        ({"name": "web", "image": "x", "update": {"parallelism": -1}},
         "service web: update.parallelism: -1 is out of range"),
        ({"name": "web", "image": "x", "update": {"order": "random"}},
         "service web: update.order: 'random' is not one of"),
        ({"name": "web", "image": "x", "update": {"max_failure_ratio": 2}},
         "service web: update.max_failure_ratio: 2 is not a fraction"),
        ({"name": "web", "image": "x", "cpu": "1", "resources": {"limits": {"cpu": "500m"}}},
         "service web: cpu_limit_millis: the limit 500m is less than the reservation 1"),
        ({"name": "web", "image": "x", "memory": "1G", "resources": {"memory": "1G"}},
         "service web: resources.memory: is given twice (also as memory)"),
        ({"name": "web", "image": "x", "cpu": "lots"}, "service web: cpu: "),
        ({"name": "web", "image": "x", "memory": 1.5}, "service web: memory: 1.5 is not a whole"),
        ({"name": "web", "image": "x", "constraints": ["zone = a"]},
         "service web: constraints[0]: constraint 'zone = a' uses '='; write zone==a"),
        ({"name": "web", "image": "x", "constraints": "zone==a"},
         "service web: constraints: expected a list"),
        ({"name": "web", "image": "x", "affinity": ["web"]},
         "service web: a service cannot have affinity to itself"),
        ({"name": "web", "image": "x", "max_per_node": 0}, "service web: max_per_node: 0 is out"),
        ({"name": "web", "image": "x", "env": ["A"]}, "service web: env[0]: 'A' has no '='"),
        ({"name": "web", "image": "x", "env": {"A": None}},
         "service web: env.A: expected text or a number"),
        ({"name": "web", "image": "x", "env": {"A": "1"}, "environment": {"B": "2"}},
         "service web: 'env' and 'environment' give the same field"),
        ({"name": "web", "image": "x", "tags": ["Blue"]}, "service web: tags[0]: 'Blue' is not"),
        ({"name": "web", "image": "bad image"}, "service web: image: the image 'bad image'"),
        ({"name": "web", "image": "x", "command": "echo 'unbalanced"},
         "service web: command: \"echo 'unbalanced\" cannot be split"),
        ({"name": "web", "image": "x", "command": ["echo", None]},
         "service web: command[1]: expected text"),
        ({"name": "web", "image": "x", "stop_grace": "2h"},
         "service web: stop_grace_s: 2h is longer than the limit 1h"),
        ({"name": "web", "image": "x", "stop_after_disconnect": 0},
         "service web: stop_after_disconnect_s: 0.0 must be more than 0 seconds"),
        ({"name": "web", "image": "x", "labels": {"": "x"}}, "service web: labels key: a label key is empty"),
        ({"name": "web", "image": "x", "ports": "80"}, "service web: ports: expected a list"),
        ("web", "service: expected a mapping, got 'web'"),
    ],
)
def test_every_error_names_its_field(doc: Any, message: str) -> None:
    assert message in error_of(doc)


def test_unknown_keys_suggest_the_closest_known_one() -> None:
    assert error_of({"name": "web", "image": "x", "replcas": 3}) == (
        "service web: unknown key 'replcas'; did you mean 'replicas'?")
    assert "health: unknown key 'intervall'; did you mean 'interval'?" in error_of(
        {"name": "web", "image": "x", "health": {"cmd": "x", "intervall": 3}})
    assert "ports[0]: unknown key 'publshed'; did you mean 'published'?" in error_of(
        {"name": "web", "image": "x", "ports": [{"publshed": 80}]})
    far = error_of({"name": "web", "image": "x", "zzz": 1})
    assert "unknown key 'zzz' (known keys: affinity, anti_affinity," in far


def test_a_compose_service_is_recognised() -> None:
    message = error_of({"name": "web", "image": "x", "deploy": {"replicas": 2}})
    assert "unknown key 'deploy'" in message
    assert "meshctl stack deploy -c FILE NAME" in message


def test_source_prefixes_the_message() -> None:
    with pytest.raises(ConfigError, match=r"^web\.yaml: service web: replicas: "):
        parse_spec({"name": "web", "image": "x", "replicas": -2}, source="web.yaml")


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match="^host_port: 70000 is out of range"):
        PortSpec("web", host_port=70000)
    with pytest.raises(ConfigError, match="^service web: health: a tcp check needs a port"):
        WorkloadSpec(ServiceId("web"), image="x", health=HealthSpec("tcp"))
    with pytest.raises(ConfigError, match="^service web: ports\\[0\\]: expected a PortSpec"):
        WorkloadSpec(ServiceId("web"), image="x", ports=(80,))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^service web: env.A: is given twice"):
        WorkloadSpec(ServiceId("web"), image="x", env=(("A", "1"), ("A", "2")))
    with pytest.raises(ConfigError, match="^service web: cpu_millis: expected a whole number"):
        WorkloadSpec(ServiceId("web"), image="x", cpu_millis=0.5)  # type: ignore[arg-type]


def test_total_size_is_bounded() -> None:
    env = {f"V{i}": "x" * 16000 for i in range(8)}
    assert "the spec is" in error_of({"name": "web", "image": "x", "env": env})
    assert f"the limit is {MAX_SPEC_BYTES}" in error_of({"name": "web", "image": "x", "env": env})


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [("ports", [str(p) for p in range(1, 70)], "limit is 64"),
     ("tags", [f"t{i}" for i in range(40)], "limit is 32"),
     ("command", ["x"] * 300, "limit is 256"),
     ("image", "x" * 2000, "the limit is 1024")],
)
def test_counts_and_lengths_are_bounded(field: str, value: object, limit: str) -> None:
    message = error_of({"name": "web", "image": "x", field: value})
    assert message.startswith(f"service web: {field}")
    assert limit in message


# -- stored form -------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,6}[a-z0-9])?", fullmatch=True)
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                max_size=12)
_TOKEN = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,15}", fullmatch=True)
_SECONDS = st.floats(0, 3600, allow_nan=False)
_CONSTRAINTS = ["zone==a", "node.id!=n1", "rack in (a, b)", "gpu exists", "ssd not exists",
                "node.platform.os==linux", "node.labels.zone == b", "tier not in [x]"]


@st.composite
def workload_specs(draw: st.DrawFn) -> WorkloadSpec:
    """Valid specs over every field."""
    name = draw(_LABEL)
    kind = draw(st.sampled_from(["service", "job"]))
    driver = draw(st.sampled_from(["", "docker", "process"]))
    image = draw(_TOKEN) if driver == "docker" else draw(st.sampled_from(["", "busybox"]))
    needs_command = driver == "process" or not image
    command = draw(st.lists(_TEXT, min_size=1 if needs_command else 0, max_size=3))
    entrypoint = () if driver == "process" else draw(st.lists(_TEXT, max_size=2))
    raw_ports = draw(st.lists(
        st.tuples(_LABEL, st.integers(0, 65535), st.integers(0, 65535),
                  st.sampled_from(["tcp", "udp"])),
        max_size=4, unique_by=(lambda p: port_env_name(p[0]), lambda p: (p[2] or -1, p[3]))))
    ports = tuple(PortSpec(n, 0 if driver == "process" else c, h, pr) for n, c, h, pr in raw_ports)
    mode = "replicated" if kind == "job" else draw(st.sampled_from(["replicated", "global"]))
    others = draw(st.lists(_LABEL.filter(lambda s: s != name), max_size=4, unique=True))
    split = draw(st.integers(0, len(others)))
    health_kinds = ["exec"] + (["http", "tcp"] if ports else [])
    health_kind = draw(st.sampled_from(health_kinds))
    health = draw(st.none() | st.builds(
        HealthSpec,
        kind=st.just(health_kind),
        path=st.just("/") if health_kind != "http" else st.from_regex(r"/[a-z0-9/]{0,8}",
                                                                      fullmatch=True),
        port=st.just("") if health_kind == "exec" else st.sampled_from(
            [""] + [p.name for p in ports]),
        command=st.lists(_TEXT, min_size=1, max_size=2) if health_kind == "exec" else st.just(()),
        interval_s=st.floats(0.001, 600), timeout_s=st.floats(0.001, 600),
        retries=st.integers(1, 10), start_period_s=_SECONDS, readiness_only=st.booleans()))
    policies = ["on-failure", "never"] if kind == "job" else ["always", "on-failure", "never"]
    delay = draw(_SECONDS)
    restart = RestartSpec(draw(st.sampled_from(policies)), draw(st.integers(0, 10)), delay,
                          draw(st.floats(delay, 86400)), draw(_SECONDS))
    cpu, memory = draw(st.integers(0, 64000)), draw(st.integers(0, 1 << 40))
    return WorkloadSpec(
        name=ServiceId(name),
        kind=kind,
        driver=driver,
        image=image,
        command=tuple(command),
        entrypoint=tuple(entrypoint),
        env=tuple(draw(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True),
                                       _TEXT, max_size=4)).items()),
        ports=ports,
        mode=mode,
        replicas=1 if mode == "global" else draw(st.integers(0, 100)),
        constraints=tuple(draw(st.lists(st.sampled_from(_CONSTRAINTS), max_size=3))),
        spread_over=draw(st.none() | _LABEL),
        max_per_node=draw(st.none() | st.integers(1, 5)),
        affinity=tuple(ServiceId(s) for s in others[:split]),
        anti_affinity=tuple(ServiceId(s) for s in others[split:]),
        cpu_millis=cpu,
        memory_bytes=memory,
        cpu_limit_millis=draw(st.sampled_from([0, cpu, cpu + 500])),
        memory_limit_bytes=draw(st.sampled_from([0, memory, memory * 2])),
        health=health,
        restart=restart,
        update=UpdateSpec(draw(st.integers(0, 10)), draw(_SECONDS),
                          draw(st.sampled_from(["pause", "rollback", "continue"])), draw(_SECONDS),
                          draw(st.floats(0, 1)), draw(st.sampled_from(["stop-first",
                                                                       "start-first"]))),
        labels=tuple(draw(st.dictionaries(_TOKEN.filter(lambda s: "=" not in s), _TEXT,
                                          max_size=3)).items()),
        tags=tuple(draw(st.lists(_LABEL, max_size=3))),
        stop_grace_s=draw(_SECONDS),
        stop_after_disconnect_s=draw(st.none() | st.floats(0.001, 3600)),
    )


@given(workload_specs())
def test_dict_round_trip(s: WorkloadSpec) -> None:
    assert WorkloadSpec.from_dict(s.to_dict()) == s


@given(workload_specs())
def test_dict_survives_json(s: WorkloadSpec) -> None:
    assert WorkloadSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@given(workload_specs())
def test_bytes_round_trip_and_determinism(s: WorkloadSpec) -> None:
    data = s.encode()
    assert WorkloadSpec.decode(data) == s
    assert WorkloadSpec.decode(data).encode() == data


@given(workload_specs())
def test_the_user_form_accepts_the_stored_form(s: WorkloadSpec) -> None:
    assert parse_spec(s.to_dict()) == s


@given(workload_specs(), st.randoms())
def test_equal_specs_encode_equal(s: WorkloadSpec, rng: Any) -> None:
    env = list(s.env)
    rng.shuffle(env)
    labels = list(s.labels)
    rng.shuffle(labels)
    same = dataclasses.replace(s, env=tuple(env), labels=tuple(labels),
                               tags=tuple(reversed(s.tags)))
    assert same == s
    assert same.encode() == s.encode()


def test_to_dict_is_plain_and_complete() -> None:
    got = spec(env={"A": "1"}, ports=["8080:80"], health={"http": "/"}).to_dict()
    assert list(got) == [f.name for f in dataclasses.fields(WorkloadSpec)]
    assert got["env"] == {"A": "1"}
    assert got["ports"] == [{"name": "p80", "container_port": 80, "host_port": 8080,
                             "protocol": "tcp"}]
    assert got["health"]["kind"] == "http"
    assert json.loads(json.dumps(got)) == got


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "web", "image": "x", "replicas": 2, "colour": "red"},
         "service web: unknown key 'colour'"),
        ({"name": "web", "image": "x", "ports": [{"name": "a", "hostport": 1}]},
         "service web: ports[0]: unknown key 'hostport'; did you mean 'host_port'?"),
        ({"name": "web", "image": "x", "ports": [{"name": "a", "host_port": -1}]},
         "service web: ports[0].host_port: -1 is out of range"),
        ({"name": "web", "image": "x", "env": ["A=1"]}, "service web: env: expected a mapping"),
        ({"name": "web", "image": "x", "health": {"kind": "exec"}},
         "service web: health.command: an exec check needs a command"),
        ({"name": "web", "image": "x", "restart": "always"},
         "service web: restart: expected a mapping"),
        ({"name": "web", "image": "x", "command": "ls"}, "service web: command: expected a list"),
    ],
)
def test_from_dict_is_strict(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkloadSpec.from_dict(data)
    assert message in str(info.value)


def test_from_dict_fills_missing_fields_with_defaults() -> None:
    assert WorkloadSpec.from_dict({"name": "web", "image": "x"}) == WorkloadSpec(
        ServiceId("web"), image="x")


def _jsonish(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | integers | st.floats() | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )


_JSONISH = _jsonish(st.integers())
_MSGPACKABLE = _jsonish(st.integers(-(2**63), 2**64 - 1))
_KEYS = st.sampled_from([f.name for f in dataclasses.fields(WorkloadSpec)] + [
    "environment", "cpu", "memory", "resources", "spread", "stop_grace"])


@given(st.dictionaries(_KEYS, _JSONISH, max_size=8))
def test_from_dict_and_parse_spec_raise_only_config_errors(data: dict[str, Any]) -> None:
    for read in (WorkloadSpec.from_dict, parse_spec):
        try:
            read(data)
        except ConfigError:
            pass


@given(st.binary(max_size=256))
def test_decode_random_bytes_raises_only_remote_protocol_error(data: bytes) -> None:
    try:
        WorkloadSpec.decode(data)
    except RemoteProtocolError:
        pass


@given(st.dictionaries(_KEYS, _MSGPACKABLE, max_size=8))
def test_decode_random_msgpack_raises_only_remote_protocol_error(body: dict[str, Any]) -> None:
    try:
        WorkloadSpec.decode(msgpack.packb(body))
    except RemoteProtocolError:
        pass


def test_decode_refuses_oversized_input_before_parsing() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds limit"):
        WorkloadSpec.decode(b"\x80" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="a spec is a mapping"):
        WorkloadSpec.decode(msgpack.packb([1, 2]))
    with pytest.raises(RemoteProtocolError, match="invalid spec: service web: replicas"):
        WorkloadSpec.decode(msgpack.packb({"name": "web", "image": "x", "replicas": -1}))


# -- placement ---------------------------------------------------------------------


def test_placement_maps_every_scheduling_field() -> None:
    got = spec(replicas=4, constraints=["zone==a"], cpu="500m", memory="1G",
               ports=["8080:80", "53:53/udp", "53:53", "http"], max_per_node=2,
               spread="node.labels.rack", affinity=["db"], anti_affinity=["cache"]).placement()
    assert got.id == "web"
    assert got.replicas == 4
    assert got.mode is Mode.REPLICATED
    assert got.constraints == (Constraint("node.labels.zone", Op.EQ, ("a",)),)
    assert got.resources == Resources(500, 1 << 30)
    assert got.ports == (53, 8080)
    assert got.max_per_node == 2
    assert got.spread_over == "rack"
    assert got.affinity == ("db",)
    assert got.anti_affinity == ("cache",)


def test_with_replicas_and_port_names() -> None:
    web = spec(ports=["http=8080:80", "9090"])
    assert web.with_replicas(7).replicas == 7
    assert web.with_replicas(7).placement().replicas == 7
    assert web.port_names() == ("http", "p9090")
    with pytest.raises(ConfigError, match="replicas"):
        web.with_replicas(-1)


# -- files -------------------------------------------------------------------------

MULTI = """\
name: web
image: nginx:1
replicas: 2
---
services:
  - name: api
    driver: process
    command: [python3, -m, http.server]
  - name: worker
    kind: job
    image: busybox
---
services:
  cache:
    image: redis:7
    ports: ["6379"]
---
- name: one
  image: x
- {name: two, image: x}
"""


def test_load_specs_reads_every_document_shape() -> None:
    names = [s.name for s in load_specs(MULTI, source="app.yaml")]
    assert names == ["web", "api", "worker", "cache", "one", "two"]


def test_load_specs_reads_json() -> None:
    text = json.dumps({"services": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]})
    assert [s.name for s in load_specs(text)] == ["a", "b"]
    assert load_specs('{"name": "a", "image": "x"}') == [spec(name="a", image="x")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MULTI.replace("name: two", "name: one"), "app.yaml:20: service one is already defined "
                                                  "on line 18"),
        (MULTI.replace("replicas: 2", "replicas: -2"), "app.yaml:1: service web: replicas: -2"),
        (MULTI.replace("    image: busybox", "    image: busybox\n    restart: always"),
         "app.yaml:9: job worker: restart.policy:"),
        (MULTI.replace('ports: ["6379"]', 'ports: ["99999"]'), "app.yaml:14: service cache: "
                                                               "ports[0]:"),
        ("name: web\nimage: [x\n", "app.yaml:3:1: invalid YAML:"),
        ("name: web\n  image: x\n", "app.yaml:2:8: invalid YAML: mapping values are not allowed"),
        ('{"name": "web",\n "image": }', "app.yaml:2:11: invalid JSON: Expecting value"),
        ("services: {a: {image: x}}\nversion: 2\n", "app.yaml:1: a file with 'services' holds "
                                                    "nothing else"),
        ("services: {a: {name: b, image: x}}\n", "service 'a': name 'b' differs from its key"),
        ("services: 3\n", "app.yaml:1: services: expected a list or a mapping"),
        ("just text\n", "app.yaml:1: expected a spec (a mapping) or a list of specs"),
        ("name: web\nimage: !!python/object:os.system x\n", "app.yaml:2:8: invalid YAML:"),
        ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n"
         "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e]\n",
         "app.yaml: holds more than 200000 values once YAML aliases are expanded"),
        ("[" * 5000 + "]" * 5000, "app.yaml: nested too deeply"),
        ("x: " + "9" * 5000 + "\n", "app.yaml: cannot read a value"),
    ],
)
def test_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_specs(text, source="app.yaml")
    assert message in str(info.value)


def test_empty_documents_are_skipped_and_lines_are_found() -> None:
    docs = read_documents("---\n---\nservices:\n  web:\n    image: x\n", source="f")
    assert len(docs) == 1
    assert docs[0].line_of("services", "web") == 4
    assert docs[0].line_of("services", "web", "image") == 5
    assert docs[0].line_of("services", "nope") == 3
    assert load_specs("") == []


# -- comparing ---------------------------------------------------------------------


def test_spec_diff_lines() -> None:
    old = spec(replicas=3, env={"TOKEN": "a", "OLD": "x"}, ports=["8080:80"],
               restart={"delay": "1s"})
    new = dataclasses.replace(old, image="nginx:2", replicas=5, env=(("NEW", "1"), ("TOKEN", "b")),
                              cpu_millis=500, restart=RestartSpec(delay_s=2.0),
                              health=HealthSpec("tcp"))
    assert spec_diff(old, new) == [
        "image: nginx:1 -> nginx:2",
        "env.OLD: removed",
        "env.TOKEN: changed",
        "replicas: 3 -> 5",
        "cpu: none -> 500m",
        "health: none -> tcp connect to port (first) every 2s, timeout 1s, 3 retries (liveness)",
        "restart.delay: 1s -> 2s",
        "env.NEW: added",
    ]
    assert spec_diff(old, old) == []


def test_scaling_and_policies_do_not_need_a_restart() -> None:
    old = spec(ports=["8080:80"], env={"A": "1"})
    quiet = dataclasses.replace(
        old, replicas=9, update=UpdateSpec(parallelism=3), labels=(("team", "x"),), tags=("v2",),
        constraints=("zone==b",), cpu_millis=100, health=HealthSpec("tcp"),
        restart=RestartSpec("never"), stop_grace_s=3.0)
    assert not needs_restart(old, quiet)
    for change in ({"image": "nginx:2"}, {"env": (("A", "2"),)}, {"command": ("x",)},
                   {"ports": (PortSpec("p80", 80, 8081),)}, {"memory_limit_bytes": 1 << 30}):
        assert needs_restart(old, dataclasses.replace(old, **change)), change


def test_the_annotated_example_in_the_user_guide_is_valid() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "specs.md").read_text()
    match = re.search(r"```yaml\n(.*?)```", guide, re.DOTALL)
    assert match is not None
    [web] = load_specs(match[1], source="docs/specs.md")
    assert web.name == "web"
    assert web.health == HealthSpec("http", path="/healthz", port="admin", interval_s=5.0,
                                    start_period_s=10.0)
    assert web.stop_after_disconnect_s == 30.0
