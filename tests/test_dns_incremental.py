"""Incremental catalogue maintenance and selective answer-cache invalidation.

The key property: a catalogue kept up to date change by change
(``CatalogBuilder.update``, ``CatalogFeed.refresh``), served by one long-lived
``Responder`` whose cache survives the changes, answers every question with
exactly the bytes a catalogue built from scratch answers it with (same rng state,
so shuffles match too). Plus unit tests for the negative answers that must go
when their name starts to exist, and for what must survive.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from dnslib import QTYPE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from mesh.dns.answer import NOERROR, NXDOMAIN, Responder, answer
from mesh.dns.catalog import Catalog, CatalogBuilder, Endpoint, build_catalog
from mesh.dns.config import DnsConfig
from mesh.dns.fakes import endpoint, member
from mesh.gossip.core import MemberView
from mesh.gossip.messages import Status
from mesh.node.services import CatalogFeed, EndpointIndex, service_endpoints
from mesh.node.spec import PortSpec, WorkloadSpec
from mesh.raft.messages import Entry
from mesh.raft.state import (
    AllocPlan,
    AllocReport,
    Command,
    DropOp,
    KvPut,
    MeshState,
    Report,
    RunOp,
    ServiceDelete,
    ServicePut,
    StopOp,
)
from mesh.types import AllocId, NodeId, ServiceId

CFG = DnsConfig()
LOCAL = NodeId("n0")

# --- questions and the comparison ----------------------------------------------------


def query(name: str, qtype: str = "A", qid: int = 7) -> bytes:
    return bytes(DNSRecord(DNSHeader(id=qid, rd=1),
                           q=DNSQuestion(name, getattr(QTYPE, qtype))).pack())


QUESTIONS = [query(n, t) for n, t in [
    ("mesh", "SOA"), ("mesh", "NS"), ("mesh", "A"), ("foo.mesh", "A"), ("service.mesh", "A"),
    *[(f"{s}.service.mesh", t) for s in ("web", "WEB", "db", "nope") for t in ("A", "AAAA", "SRV")],
    *[(f"v1.{s}.service.mesh", "A") for s in ("web", "db")],
    *[(f"_http._tcp.{s}.service.mesh", "SRV") for s in ("web", "db")],
    ("_grpc._udp.web.service.mesh", "SRV"), ("_tcp.web.service.mesh", "A"),
    ("a1.alloc.mesh", "A"), ("A1.alloc.mesh", "SRV"), ("a2.alloc.mesh", "AAAA"),
    ("a3.alloc.mesh", "SRV"), ("x.a1.alloc.mesh", "A"),
    ("n0.node.mesh", "A"), ("n1.node.mesh", "A"), ("N1.node.mesh", "AAAA"),
    ("n2.node.mesh", "A"), ("a.b.node.mesh", "A"), ("n3.node.mesh", "A"),
]]


def assert_answers_like(responder: Responder, rng: random.Random, catalog: Catalog,
                        reference: Catalog) -> None:
    """Every question gets from ``responder`` (cache and all, answering from
    ``catalog``) the bytes that ``reference`` gives uncached, shuffled alike."""
    responder.set_catalog(catalog)
    for q in QUESTIONS:
        state = rng.getstate()
        got = responder.respond(q, catalog)
        ref_rng = random.Random()
        ref_rng.setstate(state)
        expected = answer(q, reference, CFG, ref_rng)
        assert got == expected, (DNSRecord.parse(q).q, got and DNSRecord.parse(got),
                                 expected and DNSRecord.parse(expected))


def assert_same_catalog(got: Catalog, reference: Catalog) -> None:
    assert got == reference  # generation, nodes, endpoints, local node
    assert got.node_index == reference.node_index
    assert got.service_index == reference.service_index
    assert got.alloc_index == reference.alloc_index
    assert got.skipped == reference.skipped


# --- the catalogue alone: random member and endpoint changes -----------------------

# Valid values come more often than invalid ones, and endpoints often listen on a
# node's address (an SRV target then names the node, so a node change matters).
NODES = ("n0", "n1", "n1", "N1", "n2", "n2", "a.b", "bad name")
HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.2", "fd00::1", "FD00:0::2", "host.example")
IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.2", "10.1.0.5", "fd00::1", "FD00::0001", "not-an-ip")
SERVICES = ("web", "web", "Web", "db", "db", "bad.svc")
ALLOCS = ("a1", "A1", "a2", "a3", "e.7")
STATUSES = (Status.ALIVE, Status.ALIVE, Status.SUSPECT, Status.DEAD, Status.LEFT,
            None)  # None: forgotten

_MEMBER_OP = st.tuples(st.sampled_from(NODES), st.sampled_from(HOSTS),
                       st.sampled_from(STATUSES))
_ENDPOINT = st.tuples(
    st.sampled_from(SERVICES), st.sampled_from(NODES), st.sampled_from(IPS),
    st.sampled_from((80, 8080, 80, 0)), st.sampled_from(("http", "http", "grpc", "", "h t")),
    st.sampled_from(("tcp", "tcp", "udp", "sctp")),
    st.lists(st.sampled_from(("v1", "v2", "v1", "_x")), max_size=2, unique=True),
    st.booleans())
_ALLOC_OP = st.tuples(st.sampled_from(ALLOCS), st.lists(_ENDPOINT, max_size=3))
_STEP = st.tuples(st.lists(_MEMBER_OP, max_size=3), st.lists(_ALLOC_OP, max_size=2))


def _endpoints(alloc: str, raw: Sequence[tuple[str, str, str, int, str, str, list[str], bool]]
               ) -> tuple[Endpoint, ...]:
    return tuple(endpoint(alloc, svc, node, ip, port, port_name=pname, protocol=proto,
                          tags=tuple(tags), ready=ready)
                 for svc, node, ip, port, pname, proto, tags, ready in raw)


@given(st.lists(_MEMBER_OP, max_size=5), st.lists(_ALLOC_OP, max_size=4),
       st.lists(_STEP, min_size=1, max_size=10), st.integers(0, 2**32))
def test_updates_answer_exactly_like_a_fresh_build(
        first_members: list[tuple[str, str, Status | None]],
        first_allocs: list[tuple[str, list[tuple[str, str, str, int, str, str, list[str],
                                                 bool]]]],
        steps: list[tuple[list[tuple[str, str, Status | None]],
                          list[tuple[str, list[tuple[str, str, str, int, str, str, list[str],
                                                     bool]]]]]],
        seed: int) -> None:
    members: dict[str, MemberView] = {}
    allocs: dict[AllocId, tuple[Endpoint, ...]] = {}

    def apply_members(ops: list[tuple[str, str, Status | None]]) -> None:
        for name, host, status in ops:
            if status is None:
                members.pop(name, None)
            else:
                members[name] = member(name, host, status)

    apply_members(first_members)
    for alloc, raw in first_allocs:
        allocs[AllocId(alloc)] = _endpoints(alloc, raw)
    builder = CatalogBuilder(LOCAL)
    rng = random.Random(seed)
    responder = Responder(CFG, rng)
    catalog = builder.build(list(members.values()),
                            [ep for eps in allocs.values() for ep in eps])
    assert_answers_like(responder, rng, catalog, build_catalog(
        members.values(), [ep for eps in allocs.values() for ep in eps],
        generation=catalog.generation, local_node=LOCAL))
    for member_ops, alloc_ops in steps:
        apply_members(member_ops)
        changed: dict[AllocId, tuple[Endpoint, ...]] = {}
        for alloc, raw in alloc_ops:
            changed[AllocId(alloc)] = allocs[AllocId(alloc)] = _endpoints(alloc, raw)
        previous = catalog
        catalog = builder.update(list(members.values()) if member_ops else None, changed)
        reference = build_catalog(members.values(),
                                  [ep for eps in allocs.values() for ep in eps],
                                  generation=catalog.generation, local_node=LOCAL)
        assert_same_catalog(catalog, reference)
        if reference.same_content(previous):
            assert catalog.generation == previous.generation  # it moves only on a change
            assert catalog is previous or catalog.problems != previous.problems
        else:
            assert catalog.generation == previous.generation + 1
        assert_answers_like(responder, rng, catalog, reference)
    stats = responder.statistics()
    assert stats.cache_hits > 0


def test_a_full_build_after_updates_gives_the_same_catalogue() -> None:
    builder = CatalogBuilder(LOCAL)
    members = [member("n0", "10.0.0.1"), member("n1", "10.0.0.2")]
    web = endpoint("a1", "web", "n1", "10.0.0.2")
    builder.build(members, [web])
    updated = builder.update(None, {AllocId("a2"): (endpoint("a2", "db", "n0", "10.0.0.1"),)})
    assert builder.build(members, [web, endpoint("a2", "db", "n0", "10.0.0.1")]) is updated


# --- negative answers that must go, and answers that must stay -----------------------


def _rcode(data: object) -> int:
    assert isinstance(data, bytes)
    return int(DNSRecord.parse(data).header.rcode)


def _addresses(data: object) -> set[str]:
    assert isinstance(data, bytes)
    return {str(rr.rdata) for rr in DNSRecord.parse(data).rr if rr.rtype in (1, 28)}


class Served:
    """A builder and a responder, as the daemon wires them."""

    def __init__(self, members: list[MemberView], endpoints: list[Endpoint]) -> None:
        self.builder = CatalogBuilder(LOCAL)
        self.responder = Responder(CFG, random.Random(1))
        self.responder.set_catalog(self.builder.build(members, endpoints))

    def ask(self, name: str, qtype: str = "A") -> bytes:
        data = self.responder.respond(query(name, qtype), self.builder.current)
        assert isinstance(data, bytes)
        return data

    def update(self, members: list[MemberView] | None = None,
               endpoints: dict[AllocId, tuple[Endpoint, ...]] | None = None) -> Catalog:
        catalog = self.builder.update(members, endpoints)
        self.responder.set_catalog(catalog)
        return catalog


MEMBERS = [member("n0", "10.0.0.1"), member("n1", "10.0.0.2")]
WEB = endpoint("web-0-1", "web", "n1", "10.0.0.2", tags=("v1",))
DB = endpoint("db-0-2", "db", "n0", "10.0.0.1", 5432, port_name="pg")


def test_nxdomain_for_a_service_goes_when_it_gets_a_ready_endpoint() -> None:
    s = Served(MEMBERS, [WEB, DB, dataclasses.replace(
        endpoint("api-0-3", "api", "n1", "10.0.0.2"), ready=False)])
    for name in ("api.service.mesh", "v1.api.service.mesh", "api-0-3.alloc.mesh"):
        assert _rcode(s.ask(name)) == NXDOMAIN
    s.ask("_http._tcp.api.service.mesh", "SRV")
    s.ask("web.service.mesh")
    s.ask("db.service.mesh", "SRV")
    before = s.responder.statistics().cache_entries
    ready = endpoint("api-0-3", "api", "n1", "10.0.0.2", tags=("v1",))
    s.update(endpoints={AllocId("api-0-3"): (ready,)})
    stats = s.responder.statistics()
    # the four api names go; web and db stay cached
    assert (stats.cache_invalidated, stats.cache_entries, stats.cache_flushes) == (
        4, before - 4, 0)
    assert _addresses(s.ask("api.service.mesh")) == {"10.0.0.2"}
    assert _addresses(s.ask("v1.api.service.mesh")) == {"10.0.0.2"}
    assert _addresses(s.ask("api-0-3.alloc.mesh")) == {"10.0.0.2"}
    assert _rcode(s.ask("_http._tcp.api.service.mesh", "SRV")) == NOERROR
    hits = s.responder.statistics().cache_hits
    s.ask("web.service.mesh")
    assert s.responder.statistics().cache_hits == hits + 1


def test_nodata_goes_when_the_name_gets_records_of_that_type() -> None:
    s = Served(MEMBERS, [WEB])
    nodata = s.ask("web.service.mesh", "AAAA")
    assert _rcode(nodata) == NOERROR
    assert not DNSRecord.parse(nodata).rr
    assert _rcode(s.ask("v2.web.service.mesh")) == NXDOMAIN
    assert _rcode(s.ask("_grpc._tcp.web.service.mesh", "SRV")) == NXDOMAIN
    v6 = endpoint("web-1-4", "web", "n0", "fd00::9", 9000, port_name="grpc", tags=("v2",))
    s.update(endpoints={AllocId("web-1-4"): (v6,)})
    assert _addresses(s.ask("web.service.mesh", "AAAA")) == {"fd00::9"}
    assert _addresses(s.ask("v2.web.service.mesh", "AAAA")) == {"fd00::9"}
    srv = DNSRecord.parse(s.ask("_grpc._tcp.web.service.mesh", "SRV"))
    assert [rr.rdata.port for rr in srv.rr] == [9000]


def test_nxdomain_for_a_node_goes_when_it_joins_and_its_answers_when_it_dies() -> None:
    s = Served(MEMBERS, [WEB, DB])
    assert _rcode(s.ask("n2.node.mesh")) == NXDOMAIN
    s.ask("db.service.mesh")
    s.update(members=[*MEMBERS, member("n2", "10.0.0.3")])
    assert _addresses(s.ask("n2.node.mesh")) == {"10.0.0.3"}
    s.ask("web.service.mesh", "SRV")
    s.ask("web-0-1.alloc.mesh", "SRV")
    # n1 dies: its node name, its endpoints' service and allocation go; db stays
    hits = s.responder.statistics().cache_hits
    s.update(members=[MEMBERS[0], member("n1", "10.0.0.2", Status.DEAD),
                      member("n2", "10.0.0.3")])
    assert _rcode(s.ask("n1.node.mesh")) == NXDOMAIN
    assert _rcode(s.ask("web.service.mesh", "SRV")) == NXDOMAIN
    assert _rcode(s.ask("web-0-1.alloc.mesh", "SRV")) == NXDOMAIN
    s.ask("db.service.mesh")
    assert s.responder.statistics().cache_hits == hits + 1


def test_a_nodes_new_address_drops_the_srv_answers_that_name_it() -> None:
    s = Served(MEMBERS, [WEB, DB])
    srv = DNSRecord.parse(s.ask("web.service.mesh", "SRV"))
    assert {str(rr.rdata) for rr in srv.ar} == {"10.0.0.2"}  # glue of n1.node.mesh
    s.ask("db.service.mesh", "SRV")
    # n1 moves; its endpoint still carries the old address until the replica says so
    s.update(members=[MEMBERS[0], member("n1", "10.0.0.7")])
    srv = DNSRecord.parse(s.ask("web.service.mesh", "SRV"))
    # the endpoint's address is no longer its node's: the target is the allocation
    assert [str(rr.rdata.target) for rr in srv.rr] == ["web-0-1.alloc.mesh."]
    assert s.responder.statistics().cache_invalidated == 1


def test_negative_answers_that_stay_carry_the_new_serial() -> None:
    s = Served(MEMBERS, [WEB])
    first = DNSRecord.parse(s.ask("nope.service.mesh"))
    catalog = s.update(endpoints={AllocId("db-0-2"): (DB,)})
    hits = s.responder.statistics().cache_hits
    again = DNSRecord.parse(s.ask("nope.service.mesh"))
    assert s.responder.statistics().cache_hits == hits + 1  # from the cache
    assert first.auth[0].rdata.times[0] + 1 == again.auth[0].rdata.times[0] == \
        catalog.generation
    soa = DNSRecord.parse(s.ask("mesh", "SOA"))
    assert soa.rr[0].rdata.times[0] == catalog.generation


def test_a_change_of_the_local_node_drops_the_whole_cache() -> None:
    s = Served(MEMBERS, [WEB])
    s.ask("nope.service.mesh")
    s.ask("web.service.mesh")
    s.update(members=[member("n0", "10.0.0.9"), MEMBERS[1]])
    stats = s.responder.statistics()
    assert (stats.cache_flushes, stats.cache_entries) == (1, 0)
    ns = DNSRecord.parse(s.ask("mesh", "NS"))
    assert {str(rr.rdata) for rr in ns.ar} == {"10.0.0.9"}


def test_a_catalogue_of_another_builder_drops_the_whole_cache() -> None:
    s = Served(MEMBERS, [WEB])
    s.ask("web.service.mesh")
    other = CatalogBuilder(LOCAL)
    other.build(MEMBERS, [])
    foreign = other.update(endpoints={AllocId("db-0-2"): (DB,)})
    assert foreign.delta is not None
    assert foreign.delta.base == s.builder.current.generation
    s.responder.set_catalog(foreign)
    assert s.responder.statistics().cache_flushes == 1
    assert _rcode(s.responder.respond(query("web.service.mesh"), foreign)) == NXDOMAIN


# --- the feed: replica changes, membership, compaction and snapshot restores ---------

SPECS = {
    "web": [WorkloadSpec(name=ServiceId("web"), command=("srv",), tags=("v1",),
                         ports=(PortSpec("http", host_port=8080),)),
            WorkloadSpec(name=ServiceId("web"), command=("srv", "2"), tags=("v2",),
                         ports=(PortSpec("http", host_port=8081),
                                PortSpec("grpc", host_port=9000, protocol="udp")))],
    "db": [WorkloadSpec(name=ServiceId("db"), command=("db",),
                        ports=(PortSpec("http"),))],
}
FEED_NODES = ("n0", "n1", "n2")


class Log:
    """A leader's state and log, and a follower state fed from it."""

    def __init__(self) -> None:
        self.leader = MeshState()
        self.entries: list[bytes] = []
        self.follower = MeshState(max_events=4)  # small: compaction happens

    def propose(self, cmd: Command) -> None:
        self.entries.append(cmd.encode())
        self.leader.apply(Entry(1, len(self.entries), self.entries[-1]))

    def catch_up(self) -> None:
        while self.follower.applied_index < len(self.entries):
            i = self.follower.applied_index
            self.follower.apply(Entry(1, i + 1, self.entries[i]))

    def restore(self) -> None:
        self.follower.restore(self.leader.snapshot(), self.leader.applied_index)


_FEED_OP = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(sorted(SPECS)), st.integers(0, 1)),
    st.tuples(st.just("delete"), st.sampled_from(sorted(SPECS))),
    st.tuples(st.just("run"), st.sampled_from(sorted(SPECS)), st.integers(0, 2),
              st.sampled_from(FEED_NODES)),
    st.tuples(st.just("report"), st.integers(0, 9),
              st.sampled_from(("running", "starting", "failed")),
              st.sampled_from(("none", "healthy", "unhealthy")), st.integers(0, 2)),
    st.tuples(st.just("stop"), st.integers(0, 9)),
    st.tuples(st.just("drop"), st.integers(0, 9)),
    st.tuples(st.just("member"), st.sampled_from(FEED_NODES),
              st.sampled_from(("10.0.0.1", "10.0.0.2", "10.0.0.3")),
              st.sampled_from(STATUSES)),
    st.tuples(st.just("lag"), st.booleans()),  # the follower lags / catches up
    st.tuples(st.just("restore")),
)


@given(st.lists(_FEED_OP, min_size=1, max_size=25), st.integers(0, 2**32))
def test_the_feed_answers_exactly_like_a_fresh_build(ops: list[tuple[object, ...]],
                                                     seed: int) -> None:
    log = Log()
    members = {n: member(n, f"10.0.0.{i + 1}") for i, n in enumerate(FEED_NODES)}
    feed = CatalogFeed(CatalogBuilder(LOCAL))
    rng = random.Random(seed)
    responder = Responder(CFG, rng)
    lagging = False
    for op in ops:
        kind = op[0]
        allocs = sorted(a.id for a in log.leader.allocs())
        if kind == "put":
            name, version = str(op[1]), int(op[2])  # type: ignore[call-overload]
            spec = SPECS[name][min(version, len(SPECS[name]) - 1)]
            log.propose(ServicePut(ServiceId(name), spec.encode(), restart=bool(version)))
        elif kind == "delete":
            log.propose(ServiceDelete(ServiceId(str(op[1]))))
        elif kind == "run":
            svc = log.leader.service(ServiceId(str(op[1])))
            if svc is not None:
                log.propose(AllocPlan((RunOp(svc.name, int(op[2]),  # type: ignore[call-overload]
                                             NodeId(str(op[3])), svc.generation),)))
        elif kind in ("report", "stop", "drop") and allocs:
            alloc = log.leader.alloc(allocs[int(op[1]) % len(allocs)])  # type: ignore[call-overload]
            assert alloc is not None
            if kind == "report":
                ports = (("http", 7000 + int(op[4])),) if op[4] else ()  # type: ignore[call-overload]
                log.propose(AllocReport(alloc.node, (Report(alloc.id, str(op[2]), str(op[3]),
                                                            ports),)))
            else:
                log.propose(AllocPlan((StopOp(alloc.id) if kind == "stop"
                                       else DropOp(alloc.id),)))
        elif kind == "member":
            name, host, status = str(op[1]), str(op[2]), op[3]
            if status is None:
                members.pop(name, None)
            else:
                assert isinstance(status, Status)
                members[name] = member(name, host, status)
        elif kind == "lag":
            lagging = bool(op[1])
        elif kind == "restore":
            log.restore()
        if not lagging:
            log.catch_up()
        views = list(members.values())
        catalog = feed.refresh(log.follower, views)
        reference = build_catalog(views, service_endpoints(log.follower, views),
                                  generation=catalog.generation, local_node=LOCAL)
        assert_same_catalog(catalog, reference)
        assert_answers_like(responder, rng, catalog, reference)
        responder.set_catalog(catalog)
    assert feed.rebuilds >= 1


def test_the_feed_rebuilds_after_a_snapshot_restore_and_after_compaction() -> None:
    log = Log()
    members = [member(n, f"10.0.0.{i + 1}") for i, n in enumerate(FEED_NODES)]
    feed = CatalogFeed(CatalogBuilder(LOCAL))
    log.propose(ServicePut(ServiceId("web"), SPECS["web"][0].encode()))
    log.catch_up()
    feed.refresh(log.follower, members)
    assert (feed.rebuilds, feed.updates) == (1, 0)
    log.propose(AllocPlan((RunOp(ServiceId("web"), 0, NodeId("n1"), 1),)))
    log.catch_up()
    feed.refresh(log.follower, members)
    assert (feed.rebuilds, feed.updates) == (1, 1)
    # a learner far behind gets the leader's snapshot: the state is replaced whole
    alloc = log.leader.allocs()[0].id
    log.propose(AllocReport(NodeId("n1"), (Report(alloc, "running"),)))
    log.restore()
    catalog = feed.refresh(log.follower, members)
    assert (feed.rebuilds, feed.updates) == (2, 1)
    assert [e.alloc for e in catalog.service_index[b"web"]] == [alloc]
    # more changes than the follower keeps: compacted, rebuilt
    for i in range(6):
        log.propose(AllocReport(NodeId("n1"), (Report(alloc, "running", ports=(
            ("http", 7000 + i),)),)))
    log.catch_up()
    catalog = feed.refresh(log.follower, members)
    assert (feed.rebuilds, feed.updates) == (3, 1)
    assert catalog.service_index[b"web"][0].port == 7005  # the port the node reported


def test_key_value_writes_beyond_the_change_list_do_not_force_a_rebuild() -> None:
    log = Log()  # the follower keeps 4 changes
    members = [member(n, f"10.0.0.{i + 1}") for i, n in enumerate(FEED_NODES)]
    feed = CatalogFeed(CatalogBuilder(LOCAL))
    log.propose(ServicePut(ServiceId("web"), SPECS["web"][0].encode()))
    log.propose(AllocPlan((RunOp(ServiceId("web"), 0, NodeId("n1"), 1),)))
    log.catch_up()
    feed.refresh(log.follower, members)
    alloc = log.leader.allocs()[0].id
    for i in range(10):  # the DNS follower sleeps through key-value writes
        log.propose(KvPut(f"app/{i}", b"v"))
    log.propose(AllocReport(NodeId("n1"), (Report(alloc, "running", ports=(("http", 7001),)),)))
    log.catch_up()
    catalog = feed.refresh(log.follower, members)
    assert (feed.rebuilds, feed.updates) == (1, 1)
    assert catalog.service_index[b"web"][0].port == 7001


def test_the_endpoint_index_reports_only_allocations_whose_endpoints_changed() -> None:
    log = Log()
    members = [member(n, f"10.0.0.{i + 1}") for i, n in enumerate(FEED_NODES)]
    index = EndpointIndex()
    log.propose(ServicePut(ServiceId("web"), SPECS["web"][0].encode()))
    log.propose(AllocPlan((RunOp(ServiceId("web"), 0, NodeId("n1"), 1),
                           RunOp(ServiceId("web"), 1, NodeId("n2"), 1))))
    log.catch_up()
    assert len(index.rebuild(log.follower, members)) == 2
    seen = log.follower.applied_index
    first, second = (a.id for a in log.follower.allocs())
    log.propose(AllocReport(NodeId("n1"), (Report(first, "running"),)))
    log.propose(AllocReport(NodeId("n2"), (Report(second, "starting", message="x"),)))
    log.catch_up()
    changed = index.update(log.follower, log.follower.changes_since(seen), members)
    assert list(changed) == [first]  # the other one is still not ready
    assert changed[first][0].ready
    # n2 moves: its allocation's endpoint follows
    moved = [members[0], members[1], member("n2", "10.0.0.9")]
    changed = index.update(log.follower, [], moved)
    assert [(a, eps[0].ip) for a, eps in changed.items()] == [(second, "10.0.0.9")]
