"""Compose import: what ``docker stack deploy`` reads becomes specs; everything else
becomes a warning, and what cannot be honoured safely is an error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.node.compose import STACK_LABEL, from_compose
from mesh.node.spec import HealthSpec, PortSpec, RestartSpec, UpdateSpec, WorkloadSpec
from mesh.types import ServiceId

EXAMPLE = """\
version: "3.8"
x-common: &common
  labels: {team: shop}
services:
  web:
    <<: *common
    image: nginx:1.25
    command: nginx -g 'daemon off;'
    environment:
      - MODE=prod
      - FROM_SHELL
      - PRICE=$$5
    ports:
      - "8080:80"
      - target: 443
        published: 8443
        protocol: tcp
        mode: host
    volumes: [data:/data]
    networks: [front]
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost/"]
      interval: 10s
      timeout: 5s
      retries: 5
      start_period: 30s
    stop_grace_period: 1m
    deploy:
      replicas: 3
      placement:
        constraints: ["node.labels.zone == a", "node.hostname != old"]
        preferences: [{spread: node.labels.rack}]
        max_replicas_per_node: 2
      resources:
        limits: {cpus: "1.5", memory: 1G}
        reservations: {cpus: "0.25", memory: 256M}
      restart_policy: {condition: on-failure, delay: 5s, max_attempts: 3, window: 2m}
      update_config: {parallelism: 2, delay: 10s, failure_action: rollback, monitor: 20s,
                      max_failure_ratio: 0.1, order: start-first}
      labels: {tier: frontend}
  db:
    image: postgres:16
    environment: {POSTGRES_PASSWORD: "${PGPASS}", PGPORT: 5432}
    healthcheck: {test: "pg_isready -U postgres"}
    deploy: {mode: global}
    restart: always
    replcas: 3
  migrate:
    image: shop/migrate:7
    entrypoint: ["/migrate"]
    command: [up]
    deploy:
      mode: replicated-job
networks: {front: {}}
volumes: {data: {}}
"""


@pytest.fixture(scope="module")
def example() -> tuple[list[WorkloadSpec], list[str]]:
    return from_compose(EXAMPLE, "Shop")


def test_every_supported_field_is_translated(
    example: tuple[list[WorkloadSpec], list[str]],
) -> None:
    web = example[0][0]
    assert web == WorkloadSpec(
        name=ServiceId("shop_web"),
        driver="docker",
        image="nginx:1.25",
        command=("nginx", "-g", "daemon off;"),
        env=(("MODE", "prod"), ("PRICE", "$5")),
        ports=(PortSpec("p80", 80, 8080), PortSpec("p443", 443, 8443)),
        replicas=3,
        constraints=("zone==a", "node.hostname!=old"),
        spread_over="rack",
        max_per_node=2,
        cpu_millis=250,
        memory_bytes=256 << 20,
        cpu_limit_millis=1500,
        memory_limit_bytes=1 << 30,
        health=HealthSpec("exec", command=("curl", "-f", "http://localhost/"), interval_s=10.0,
                          timeout_s=5.0, retries=5, start_period_s=30.0),
        restart=RestartSpec("on-failure", 3, 5.0, 30.0, 120.0),
        update=UpdateSpec(2, 10.0, "rollback", 20.0, 0.1, "start-first"),
        labels=((STACK_LABEL, "shop"), ("team", "shop"), ("tier", "frontend")),
        stop_grace_s=60.0,
    )


def test_global_services_shell_checks_and_jobs(
    example: tuple[list[WorkloadSpec], list[str]],
) -> None:
    _, db, migrate = example[0]
    assert db.name == "shop_db"
    assert db.mode == "global"
    assert db.env == (("PGPORT", "5432"), ("POSTGRES_PASSWORD", "${PGPASS}"))
    assert db.health == HealthSpec("exec", command=("sh", "-c", "pg_isready -U postgres"))
    assert migrate.kind == "job"
    assert migrate.restart.policy == "on-failure"
    assert (migrate.entrypoint, migrate.command) == (("/migrate",), ("up",))


def test_everything_ignored_is_named(example: tuple[list[WorkloadSpec], list[str]]) -> None:
    warnings = example[1]
    assert warnings == [
        "top-level networks is not supported by meshd and was ignored",
        "top-level volumes is not supported by meshd and was ignored",
        "service web: volumes is not supported by meshd and was ignored",
        "service web: networks is not supported by meshd and was ignored",
        "service web: environment.FROM_SHELL has no value (Compose copies it from the shell); "
        "it was left out",
        "service web: published ports are bound only on the nodes running a replica (Swarm's "
        "mode: host); meshd has no ingress routing mesh, find replicas through DNS",
        "service db: restart is ignored by docker stack deploy and by meshd; use "
        "deploy.restart_policy",
        "service db: replcas is not a Compose key meshd knows (did you mean deploy.replicas?) "
        "and was ignored",
        "service db: variable substitution is not performed by meshd; ${PGPASS} kept as "
        "written (substitute first, e.g. with `docker compose config`)",
    ]


@pytest.mark.parametrize(
    ("service", "warning"),
    [
        ("deploy: {rollback_config: {parallelism: 1}}", "deploy.rollback_config is not supported"),
        ("deploy: {endpoint_mode: vip}", "deploy.endpoint_mode is not supported"),
        ("deploy: {resources: {limits: {pids: 10}}}",
         "deploy.resources.limits.pids is not supported by meshd and was ignored"),
        ("deploy: {placement: {preferences: [{spread: node.labels.a}, {spread: node.labels.b}]}}",
         "deploy.placement.preferences[1] is not supported"),
        ("deploy: {placement: {constraints: [node.role == manager]}}",
         "meshd has no manager nodes; node.role matches the --role"),
        ("deploy: {placement: {constrains: []}}",
         "deploy.placement.constrains is not a Compose key meshd knows (did you mean "
         "deploy.placement.constraints?)"),
        ("healthcheck: {interval: 5s}", "healthcheck has no test"),
        ("healthcheck: {test: [CMD, 'true'], start_interval: 1s}",
         "healthcheck.start_interval is not supported"),
        ("ports: [{target: 80, published: 8080, app_protocol: http}]",
         "ports[0].app_protocol is not supported"),
        ("build: .", "build is not supported by meshd (it does not build images)"),
        ("env_file: .env", "env_file is not supported by meshd"),
        ("labels: {a: x}\n    deploy: {labels: {a: y}}", "deploy.labels.a overrides labels.a"),
        (f"labels: {{{STACK_LABEL}: other}}", f"labels.{STACK_LABEL} is set by meshd"),
        ("command: sh -c 'echo $$HOME $USER'", "$USER kept as written"),
    ],
)
def test_warnings_name_the_field(service: str, warning: str) -> None:
    text = f"services:\n  web:\n    image: x\n    {service}\n"
    specs, warnings = from_compose(text, "s")
    assert len(specs) == 1
    assert any(w.startswith("service web: ") and warning in w for w in warnings), warnings


def test_unescaped_dollars_and_no_warning_for_a_plain_file() -> None:
    specs, warnings = from_compose(
        "services:\n  web:\n    image: x\n    command: sh -c 'exec serve $$PORT'\n", "s")
    assert specs[0].command == ("sh", "-c", "exec serve $PORT")
    assert warnings == []


@pytest.mark.parametrize(
    ("test", "health"),
    [
        ('["CMD-SHELL", "curl -f localhost || exit 1"]',
         HealthSpec("exec", command=("sh", "-c", "curl -f localhost || exit 1"))),
        ('["NONE"]', None),
        ('["CMD", "true"]\n      disable: true', None),
    ],
)
def test_healthcheck_forms(test: str, health: HealthSpec | None) -> None:
    text = f"services:\n  web:\n    image: x\n    healthcheck:\n      test: {test}\n"
    assert from_compose(text, "s")[0][0].health == health


@pytest.mark.parametrize(
    ("condition", "policy"), [("none", "never"), ("on-failure", "on-failure"), ("any", "always")]
)
def test_restart_conditions(condition: str, policy: str) -> None:
    text = ("services:\n  web:\n    image: x\n    deploy:\n      restart_policy:\n"
            f"        condition: {condition}\n        delay: 2m\n")
    restart = from_compose(text, "s")[0][0].restart
    assert restart == RestartSpec(policy, delay_s=120.0, max_delay_s=120.0)


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ("build: .", "compose.yml:2: service web: image: is missing; meshd does not build"),
        ("image: x\n    ports: ['127.0.0.1:5432:5432']",
         "service web: ports[0]: binds the host address 127.0.0.1, which meshd cannot do"),
        ("image: x\n    ports: [{target: 80, published: 80, host_ip: '::1'}]",
         "service web: ports[0].host_ip: binds the host address ::1"),
        ("image: x\n    ports: ['[::1]:80:80']", "ports[0]: binds the host address ::1"),
        ("image: x\n    deploy: {mode: global, replicas: 2}",
         "service web: deploy.replicas: a global service runs one replica on each node"),
        ("image: x\n    deploy: {mode: global-job}", "service web: deploy.mode: global-job is not"),
        ("image: x\n    deploy: {mode: sometimes}", "service web: deploy.mode: 'sometimes' is not"),
        ("image: x\n    deploy: {placement: {constraints: ['engine.labels.os == linux']}}",
         "service web: deploy.placement.constraints[0]: constraint 'engine.labels.os == linux': "
         "constraint key 'engine.labels.os': engine labels are not supported"),
        ("image: x\n    deploy: {resources: {limits: {cpus: lots}}}",
         "service web: deploy.resources.limits.cpus: "),
        ("image: x\n    deploy: {resources: {limits: {memory: 1M}, reservations: {memory: 1G}}}",
         "service web: memory_limit_bytes: the limit 1M is less than the reservation 1G"),
        ("image: x\n    deploy: {restart_policy: {condition: sometimes}}",
         "service web: deploy.restart_policy.condition: 'sometimes' is not none"),
        ("image: x\n    deploy: {mode: replicated-job, restart_policy: {condition: any}}",
         "service web: deploy.restart_policy.condition: a job runs to completion"),
        ("image: x\n    deploy: {update_config: {failure_action: explode}}",
         "service web: deploy.update_config.failure_action: 'explode' is not one of"),
        ("image: x\n    deploy: {update_config: {delay: soon}}",
         "service web: deploy.update_config.delay: 'soon' is not a duration"),
        ("image: x\n    deploy: {replicas: many}", "service web: replicas: expected a whole number"),
        ("image: x\n    healthcheck: {test: [curl, x]}", "service web: healthcheck.test: expected"),
        ("image: x\n    healthcheck: {test: [CMD, x], retries: 0}",
         "service web: healthcheck.retries: 0 is out of range"),
        ("image: x\n    healthcheck: {test: [CMD, x], interval: -1}",
         "service web: healthcheck.interval: -1 must be 0 or more seconds"),
        ("image: x\n    labels: {a: [1]}", "service web: labels.a: expected text"),
        ("image: x\n    environment: [A=1, 3]", "service web: environment[1]: expected text"),
        ("image: x\n    deploy: []", "service web: deploy: expected a mapping"),
        ("image: 'two words'", "service web: image: the image 'two words'"),
    ],
)
def test_errors_name_the_line_service_and_field(service: str, message: str) -> None:
    text = f"services:\n  web:\n    {service}\n"
    with pytest.raises(ConfigError) as info:
        from_compose(text, "s", source="compose.yml")
    assert message in str(info.value)
    assert str(info.value).startswith("compose.yml:2: service web: ")


@pytest.mark.parametrize(
    ("text", "stack", "message"),
    [
        ("services:\n  web: {image: x}\n", "bad stack!", "stack name 'bad stack!' is not a DNS"),
        ("services:\n  Web.App: {image: x}\n", "s", "workload name 's_web.app'"),
        ("services:\n  " + "w" * 70 + ": {image: x}\n", "s", "is not a DNS label"),
        ("services: {}\n", "s", "services: expected a mapping of service names"),
        ("version: '3'\n", "s", "services: expected a mapping of service names"),
        ("- a\n", "s", "expected a Compose file"),
        ("services: {a: {image: x}}\n---\nservices: {}\n", "s", "holds one YAML document"),
        ("services:\n  web: [x]\n", "s", "service web: expected a mapping"),
        ("services:\n  web:\n    image: x\n   bad\n", "s", "invalid YAML"),
    ],
)
def test_file_level_errors(text: str, stack: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_compose(text, stack)
    assert message in str(info.value)


def test_top_level_keys_other_than_services_are_named() -> None:
    text = "name: app\nsecrets: {}\nconfigs: {}\nwhatever: 1\nx-ext: 1\nservices: {a: {image: x}}\n"
    warnings = from_compose(text, "s")[1]
    assert warnings == [
        "name is ignored: the stack is named s on the command line",
        "top-level secrets is not supported by meshd and was ignored",
        "top-level configs is not supported by meshd and was ignored",
        "top-level whatever is not a Compose key meshd knows and was ignored",
    ]


def test_service_names_are_stack_prefixed_and_lower_cased() -> None:
    specs, _ = from_compose("services:\n  API-v2: {image: x}\n  worker: {image: y}\n", "Prod")
    assert [s.name for s in specs] == ["prod_api-v2", "prod_worker"]
    assert all(dict(s.labels)[STACK_LABEL] == "prod" for s in specs)
    assert all(s.driver == "docker" for s in specs)


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["image", "deploy", "ports", "healthcheck", "test",
                                       "environment", "labels", "replicas", "mode",
                                       "placement", "resources", "limits", "cpus", "x"]),
                      children, max_size=4),
    max_leaves=16,
)


@given(st.dictionaries(st.sampled_from(["web", "db"]), _ANY, max_size=2))
def test_hostile_compose_raises_only_config_errors(services: dict[str, object]) -> None:
    try:
        from_compose(json.dumps({"services": services}), "s")
    except ConfigError:
        pass
