"""Unit tests of the placement model: constraint parsing, units, validation."""

from __future__ import annotations

import re

import pytest

from mesh.errors import ConfigError
from mesh.placement import (
    Constraint,
    Mode,
    NodeInfo,
    Op,
    PlacementConfig,
    Resources,
    ServiceSpec,
    format_cpu,
    format_memory,
    matches,
    parse_constraint,
    parse_constraints,
    parse_cpu,
    parse_memory,
)
from mesh.types import NodeId, ServiceId

# -- constraint parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "op", "values", "shown"),
    [
        ("zone==a", "node.labels.zone", Op.EQ, ("a",), "zone==a"),
        ("node.labels.zone==a", "node.labels.zone", Op.EQ, ("a",), "zone==a"),
        ("  zone == a  ", "node.labels.zone", Op.EQ, ("a",), "zone==a"),
        ("zone!=b", "node.labels.zone", Op.NE, ("b",), "zone!=b"),
        ("node.id==n1", "node.id", Op.EQ, ("n1",), "node.id==n1"),
        ("node.hostname != web-1", "node.hostname", Op.NE, ("web-1",), "node.hostname!=web-1"),
        ("node.platform.os==linux", "node.platform.os", Op.EQ, ("linux",), "node.platform.os==linux"),
        ("zone=='a b'", "node.labels.zone", Op.EQ, ("a b",), "zone==a b"),
        ('zone=="a"', "node.labels.zone", Op.EQ, ("a",), "zone==a"),
        ("zone in (b, a)", "node.labels.zone", Op.IN, ("a", "b"), "zone in (a, b)"),
        ("zone in [a,b,a]", "node.labels.zone", Op.IN, ("a", "b"), "zone in (a, b)"),
        ("zone in a,b", "node.labels.zone", Op.IN, ("a", "b"), "zone in (a, b)"),
        ("zone in(a)", "node.labels.zone", Op.IN, ("a",), "zone in (a)"),
        ("zone NOT IN (c)", "node.labels.zone", Op.NOT_IN, ("c",), "zone not in (c)"),
        ("zone not  in (c, 'd')", "node.labels.zone", Op.NOT_IN, ("c", "d"), "zone not in (c, d)"),
        ("gpu exists", "node.labels.gpu", Op.EXISTS, (), "gpu exists"),
        ("node.labels.gpu not exists", "node.labels.gpu", Op.NOT_EXISTS, (), "gpu not exists"),
        ("node.labels.node.x==1", "node.labels.node.x", Op.EQ, ("1",), "node.labels.node.x==1"),
        ("topology.k8s.io/zone==a", "node.labels.topology.k8s.io/zone", Op.EQ, ("a",),
         "topology.k8s.io/zone==a"),
    ],
)
def test_parse_constraint_accepts(
    text: str, key: str, op: Op, values: tuple[str, ...], shown: str
) -> None:
    c = parse_constraint(text)
    assert (c.key, c.op, c.values) == (key, op, values)
    assert str(c) == shown
    assert parse_constraint(str(c)) == c  # what we print parses back to the same thing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty constraint; expected KEY==VALUE"),
        ("   ", "empty constraint"),
        ("zone", "has no operator; expected KEY==VALUE, KEY!=VALUE, KEY in (A, B)"),
        ("zone=a", "uses '='; write zone==a"),
        ("zone<>a", "uses '<>'; write zone!=a"),
        ("zone>=3", "uses '>=', which placement does not support"),
        ("zone==", "has an empty value"),
        ("==a", "constraint key is empty"),
        ("zone a==b", "has characters a key cannot contain"),
        ("zone==a==b", "has more than one operator"),
        ("zone in ()", "has an empty list"),
        ("zone in (a", "list opened with '(' is not closed"),
        ("zone in (a,,b)", "has an empty value"),
        ("zone==\"a", "has an unbalanced quote"),
        ("engine.labels.zone==a", "engine labels are not supported; use node.labels.zone"),
        ("node.labels.==a", "names nothing"),
        ("node==a", "names nothing"),
    ],
)
def test_parse_constraint_rejects_with_a_helpful_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_constraint(text)
    if text.strip():
        assert repr(text.strip()) in str(info.value) or "key" in str(info.value)


def test_parse_constraints_rejects_a_bare_string() -> None:
    with pytest.raises(ConfigError, match="expected a list of constraints"):
        parse_constraints("zone==a")  # type: ignore[arg-type]
    assert parse_constraints(["zone==a", "gpu exists"]) == (
        Constraint("node.labels.zone", Op.EQ, ("a",)),
        Constraint("node.labels.gpu", Op.EXISTS),
    )


@pytest.mark.parametrize(
    ("op", "values"),
    [(Op.EQ, ()), (Op.EQ, ("a", "b")), (Op.IN, ()), (Op.EXISTS, ("a",)), (Op.NE, ("",))],
)
def test_constraint_checks_arity(op: Op, values: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        Constraint("node.labels.zone", op, values)


def test_constraint_rejects_non_canonical_keys() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        Constraint("zone", Op.EXISTS)


def _node(**labels: str) -> NodeInfo:
    return NodeInfo(NodeId("n1"), labels=labels, attributes={"platform.os": "linux"})


@pytest.mark.parametrize(
    ("text", "with_zone_a", "without_zone"),
    [
        ("zone==a", True, False),
        ("zone!=a", False, True),
        ("zone!=b", True, True),
        ("zone in (a, b)", True, False),
        ("zone not in (a, b)", False, True),
        ("zone not in (b)", True, True),
        ("zone exists", True, False),
        ("zone not exists", False, True),
        ("node.id==n1", True, True),
        ("node.platform.os==linux", True, True),
        ("node.platform.arch exists", False, False),
    ],
)
def test_matches_treats_a_missing_key_like_swarm(
    text: str, with_zone_a: bool, without_zone: bool
) -> None:
    c = parse_constraint(text)
    assert matches(c, _node(zone="a")) is with_zone_a
    assert matches(c, _node()) is without_zone


# -- units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "millis"),
    [("500m", 500), ("0.5", 500), (".25", 250), ("2", 2000), (2, 2000), (1.5, 1500), ("0", 0),
     ("1.234", 1234), ("0.0005", None), ("-1", None), ("1e3", None), ("", None), ("1.5m", None)],
)
def test_parse_cpu(text: str | int | float, millis: int | None) -> None:
    if millis is None:
        with pytest.raises(ConfigError, match="cpu"):
            parse_cpu(text)
    else:
        assert parse_cpu(text) == millis


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 * 2**20), ("512m", 512 * 2**20), ("256Mi", 256 * 2**20), ("1.5G", 3 * 2**29),
     ("64KiB", 64 * 1024), ("1024", 1024), (4096, 4096), ("2 GB", 2 * 2**30), ("1T", 2**40),
     ("0.5b", None), ("-1G", None), ("1X", None), ("", None), (-5, None)],
)
def test_parse_memory(text: str | int, size: int | None) -> None:
    if size is None:
        with pytest.raises(ConfigError, match="memory"):
            parse_memory(text)
    else:
        assert parse_memory(text) == size


@pytest.mark.parametrize(
    ("millis", "text"), [(500, "500m"), (2000, "2"), (1500, "1.5"), (0, "0"), (1, "1m")]
)
def test_format_cpu(millis: int, text: str) -> None:
    assert format_cpu(millis) == text
    assert parse_cpu(text) == millis


@pytest.mark.parametrize(
    ("size", "text"),
    [(512 * 2**20, "512M"), (256 * 2**20, "256M"), (3 * 2**29, "1.5G"), (2**30, "1G"),
     (100, "100B"), (0, "0B"), (2048, "2K")],
)
def test_format_memory(size: int, text: str) -> None:
    assert format_memory(size) == text


def test_resources_parse_and_validate() -> None:
    assert Resources.parse("250m", "1G") == Resources(250, 2**30)
    assert str(Resources(500, 2**29)) == "cpu 500m, memory 512M"
    with pytest.raises(ConfigError, match="non-negative"):
        Resources(-1, 0)
    with pytest.raises(ConfigError, match="non-negative"):
        Resources(True, 0)


# -- specs, nodes, config -------------------------------------------------------------

S = ServiceId


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": -1}, "replicas must be 0-"),
        ({"replicas": 1 << 24}, "replicas must be 0-"),
        ({"replicas": 1.0}, "replicas must be an integer"),
        ({"ports": (0,)}, "out of range"),
        ({"ports": (80, 80)}, "list a port twice"),
        ({"max_per_node": 0}, "max_per_node must be at least 1"),
        ({"spread_over": "a b"}, "is not a label key"),
        ({"affinity": (S("web"),)}, "affinity to itself"),
        ({"anti_affinity": (S("web"),)}, "use max_per_node=1"),
        ({"affinity": (S("db"),), "anti_affinity": (S("db"),)}, "both affinity and anti_affinity"),
        ({"constraints": ("zone==a",)}, "parse text with mesh.placement.parse_constraints"),
    ],
)
def test_service_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        ServiceSpec(S("web"), **kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith("service web")


def test_service_spec_normalizes() -> None:
    spec = ServiceSpec(
        S("web"), ports=(443, 80), spread_over="node.labels.zone",
        affinity=(S("b"), S("a"), S("b")), mode=Mode.GLOBAL,
    )
    assert spec.ports == (80, 443)
    assert spec.spread_over == "zone"
    assert spec.affinity == (S("a"), S("b"))
    assert spec.is_global


def test_node_info_is_immutable_and_validated() -> None:
    labels = {"zone": "a"}
    node = NodeInfo(NodeId("n1"), labels=labels)
    labels["zone"] = "b"
    assert node.labels["zone"] == "a"  # a copy, not the caller's dict
    with pytest.raises(TypeError):
        node.labels["zone"] = "c"  # type: ignore[index]
    with pytest.raises(ConfigError, match="node id"):
        NodeInfo(NodeId(""))
    with pytest.raises(ConfigError, match="labels of node n1"):
        NodeInfo(NodeId("n1"), labels={"zone": 3})  # type: ignore[dict-item]
    assert node == NodeInfo(NodeId("n1"), labels={"zone": "a"})


@pytest.mark.parametrize(
    "kwargs",
    [{"load_bound_eps": -0.1}, {"vnodes_per_node": 0}, {"walk_steps": 0}, {"hash_key": b""},
     {"hash_key": b"x" * 65}, {"explain_max_nodes": -1}],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PlacementConfig(**kwargs)  # type: ignore[arg-type]


def test_config_named_constructors() -> None:
    assert PlacementConfig.default() == PlacementConfig()
    assert PlacementConfig.local().vnodes_per_node < PlacementConfig().vnodes_per_node
    assert PlacementConfig().eps.denominator == 4
