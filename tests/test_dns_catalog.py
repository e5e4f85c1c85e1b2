"""The DNS catalogue builder (freshness rules, validation, generations) and config."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mesh.dns.catalog import CatalogBuilder, build_catalog, label_key, name_key
from mesh.dns.config import DnsConfig, normalize_zone
from mesh.dns.fakes import endpoint, member, synthetic_catalog
from mesh.errors import ConfigError
from mesh.gossip.messages import Status
from mesh.types import Addr, NodeId


def test_nodes_are_alive_while_alive_or_suspect() -> None:
    cat = build_catalog([member("a", "10.0.0.1"), member("s", "10.0.0.2", Status.SUSPECT),
                         member("d", "10.0.0.3", Status.DEAD),
                         member("l", "10.0.0.4", Status.LEFT)], [], generation=1)
    assert [(n.name, n.alive) for n in cat.nodes] == [("a", True), ("d", False),
                                                      ("l", False), ("s", True)]
    assert sorted(cat.node_index) == [b"a", b"s"]


def test_endpoints_of_dead_left_or_unknown_nodes_are_dropped_at_build() -> None:
    members = [member("a", "10.0.0.1"), member("d", "10.0.0.2", Status.DEAD),
               member("l", "10.0.0.3", Status.LEFT)]
    eps = [endpoint("e1", "web", "a", "10.0.0.1"), endpoint("e2", "web", "d", "10.0.0.2"),
           endpoint("e3", "web", "l", "10.0.0.3"), endpoint("e4", "web", "ghost", "10.0.0.9")]
    cat = build_catalog(members, eps, generation=1)
    assert [e.alloc for e in cat.endpoints] == ["e1"]
    assert cat.skipped == ()  # dropping by liveness is not a problem to report


def test_unready_endpoints_are_kept_but_not_indexed() -> None:
    cat = build_catalog([member("a", "10.0.0.1")],
                        [endpoint("e1", "web", "a", "10.0.0.1", ready=False),
                         endpoint("e2", "db", "a", "10.0.0.1")], generation=1)
    assert [e.alloc for e in cat.endpoints] == ["e2", "e1"]
    assert list(cat.service_index) == [b"db"]
    assert list(cat.alloc_index) == [b"e2"]
    assert sorted(cat.services) == ["db", "web"]


def test_names_that_are_not_dns_labels_are_skipped_with_a_reason() -> None:
    members = [member("ok", "10.0.0.1"), member("OK", "10.0.0.2"),
               member("bad name", "10.0.0.3"), member("dotted.node", "10.0.0.4")]
    eps = [endpoint("e1", "web.v2", "ok", "10.0.0.1"),
           endpoint("e2", "web", "ok", "not-an-ip"),
           endpoint("e3", "web", "ok", "10.0.0.1", 0),
           endpoint("e4", "web", "ok", "10.0.0.1", port_name="h t t p"),
           endpoint("e5", "web", "ok", "10.0.0.1", protocol="sctp"),
           endpoint("e6", "web", "ok", "10.0.0.1", tags=("_x",)),
           endpoint("e.7", "web", "ok", "10.0.0.1"),
           endpoint("e8", "web", "ok", "10.0.0.1"),
           endpoint("e8", "web", "ok", "10.0.0.1", 9090)]
    cat = build_catalog(members, eps, generation=1)
    assert sorted(cat.node_index) == [b"dotted.node", b"ok"]
    reasons = "\n".join(cat.skipped)
    for fragment in ("'ok': differs from 'OK' only in case", "'bad name'", "'web.v2'",
                     "'not-an-ip'", "port 0", "'h t t p'", "'sctp'", "'_x'", "'e.7'",
                     "same allocation id"):
        assert fragment in reasons
    assert [e.alloc for e in cat.service_index[b"web"]] == ["e8", "e8"]


def test_addresses_are_normalised() -> None:
    cat = build_catalog([member("a", "FD00:0:0::1")],
                        [endpoint("e1", "web", "a", "FD00::0001")], generation=1)
    assert cat.nodes[0].ips == ("fd00::1",)
    assert cat.endpoints[0].ip == "fd00::1"
    named = build_catalog([member("h", "host.example")], [], generation=1)
    assert named.nodes[0].ips == ()


def test_input_order_does_not_matter() -> None:
    members = [member(f"n{i}", f"10.0.0.{i}") for i in range(1, 6)]
    eps = [endpoint(f"e{i}", f"s{i % 3}", f"n{i % 5 + 1}", f"10.0.0.{i % 5 + 1}")
           for i in range(20)]
    first = build_catalog(members, eps, generation=1)
    rng = random.Random(4)
    for _ in range(5):
        rng.shuffle(members)
        rng.shuffle(eps)
        again = build_catalog(members, eps + eps[:3], generation=1)  # duplicates too
        assert again == first
        assert again.service_index == first.service_index


def test_builder_moves_the_generation_only_on_change() -> None:
    builder = CatalogBuilder(NodeId("n1"))
    assert builder.current.generation == 0
    members = [member("n1", "10.0.0.1")]
    eps = [endpoint("e1", "web", "n1", "10.0.0.1")]
    first = builder.build(members, eps)
    assert first.generation == 1
    assert first.local_node == "n1"
    bumped = [dataclasses.replace(members[0], incarnation=9, since=5.0)]
    assert builder.build(bumped, eps) is first  # nothing DNS answers changed
    second = builder.build(members, [dataclasses.replace(eps[0], ready=False)])
    assert second.generation == 2
    assert builder.current is second


def test_label_and_name_keys() -> None:
    assert label_key("Web-1_x") == b"web-1_x"
    for bad in ("", "a" * 64, "a.b", "ä", "a b"):
        assert label_key(bad) is None
    assert name_key("Node.Rack1") == b"node.rack1"
    assert name_key("a..b") is None


def test_synthetic_catalog_shape() -> None:
    cat = synthetic_catalog(100, 3, 10)
    assert len(cat.service_index) == 100
    assert len(cat.endpoints) == 300
    assert len(cat.node_index) == 10
    assert cat.local_node == "n0"


# --- config -----------------------------------------------------------------------------


def test_config_defaults_and_presets() -> None:
    lan = DnsConfig.lan()
    assert (lan.zone, lan.ttl_s, lan.bind_port, lan.bind) == ("mesh.", 5, None, None)
    assert (lan.max_udp_payload_bytes, lan.edns_udp_payload_bytes) == (512, 1232)
    local = DnsConfig.local()
    assert local.bind == Addr("127.0.0.1", 0)


@pytest.mark.parametrize(("zone", "normal"), [("mesh", "mesh."), ("MESH.", "mesh."),
                                              (" Corp.Example. ", "corp.example.")])
def test_zone_is_normalised(zone: str, normal: str) -> None:
    assert normalize_zone(zone) == normal
    assert DnsConfig(zone=zone).zone == normal


@pytest.mark.parametrize("changes", [
    {"zone": "."}, {"zone": "a..b"}, {"zone": "a b"}, {"zone": "x" * 64},
    {"ttl_s": -1}, {"negative_ttl_s": 2**31}, {"bind_port": 70000},
    {"max_udp_payload_bytes": 511}, {"edns_udp_payload_bytes": 400},
    {"edns_udp_payload_bytes": 70000}, {"upstream_timeout_s": 0},
    {"max_forwards_in_flight": 0}, {"cache_max_entries": -1},
    {"tcp_idle_timeout_s": 0}, {"tcp_max_connections": 0}, {"hostmaster": "a.b"},
    {"bind_host": ""},
])
def test_invalid_config_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DnsConfig(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("bind", "host", "port"), [
    (None, "127.0.0.5", None), ("127.0.0.2", "127.0.0.2", None),
    ("127.0.0.2:5353", "127.0.0.2", 5353), (":5353", "127.0.0.5", 5353),
    ("127.0.0.2:0", "127.0.0.2", 0), ("::1", "::1", None), ("[::1]:53", "::1", 53),
])
def test_flags_pick_the_bind_address(bind: str | None, host: str, port: int | None) -> None:
    config = DnsConfig.from_flags(bind, "Corp", "127.0.0.53", default_host="127.0.0.5")
    assert config is not None
    assert (config.bind_host, config.bind_port) == (host, port)
    assert (config.zone, config.upstream) == ("corp.", Addr("127.0.0.53", 53))


def test_flags_can_turn_dns_off_or_fail_clearly() -> None:
    assert DnsConfig.from_flags("off") is None
    for bind in ("x:y", "127.0.0.1:70000", "127.0.0.1:", "[::1"):
        with pytest.raises(ConfigError, match="--dns-bind"):
            DnsConfig.from_flags(bind)
    with pytest.raises(ConfigError, match="--dns-upstream"):
        DnsConfig.from_flags(None, "mesh", "127.0.0.1:0")
    with pytest.raises(ConfigError, match="zone"):
        DnsConfig.from_flags(None, "a..b")
