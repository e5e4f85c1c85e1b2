"""Properties of the DNS answer logic over generated catalogues and queries.

* any question gets a well-formed answer: id, QR, question echoed byte for byte
  (so case too), within the size limit, SOA with every negative answer;
* answers only hold addresses of ready endpoints on live nodes (and of live nodes),
  and a service's addresses are exactly those of its ready endpoints on live nodes;
* an answer without TC is complete: it holds what the TCP answer holds;
* the cached path answers what the uncached path answers;
* any bytes at all, and any mutation of a valid query, get an answer or none, never
  an exception.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dnslib import EDNS0, QTYPE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from mesh.dns.answer import FORMERR, NOERROR, NXDOMAIN, Forward, Responder, answer
from mesh.dns.catalog import Catalog, Endpoint, build_catalog
from mesh.dns.config import DnsConfig
from mesh.dns.fakes import endpoint, member
from mesh.gossip.messages import Status
from mesh.types import Addr, NodeId

CFG = DnsConfig()
SERVICES = ("web", "db", "api")
TAGS = ("v1", "v2", "canary")
PORT_NAMES = ("http", "grpc", "")


@dataclass(frozen=True)
class World:
    """A catalogue and the addresses answers may and may not contain."""

    catalog: Catalog
    allowed: frozenset[str]
    forbidden: frozenset[str]


_STATUSES = st.lists(st.sampled_from(list(Status)), min_size=6, max_size=6)
_ENDPOINT = st.tuples(
    st.integers(0, 5),  # node
    st.sampled_from(("node", "v4", "v6")),  # address kind
    st.sampled_from(SERVICES),
    st.sampled_from((80, 8080, 53)),
    st.sampled_from(PORT_NAMES),
    st.sampled_from(("tcp", "udp")),
    st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
    st.booleans(),  # ready
)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n = draw(st.integers(1, 6))
    statuses = draw(_STATUSES)
    members = [member(f"n{i}", f"10.0.0.{i + 1}", statuses[i]) for i in range(n)]
    alive = {m.node for m in members if m.status <= Status.SUSPECT}
    eps: list[Endpoint] = []
    for k, (node, kind, service, port, port_name, protocol, tags, ready) in enumerate(
            draw(st.lists(_ENDPOINT, max_size=14))):
        node %= n
        ip = {"node": f"10.0.0.{node + 1}", "v4": f"10.1.0.{k + 1}", "v6": f"fd01::{k + 1:x}"}
        eps.append(endpoint(f"a{k}", service, f"n{node}", ip[kind], port, port_name=port_name,
                            protocol=protocol, tags=tuple(tags), ready=ready))
    catalog = build_catalog(members, eps, generation=draw(st.integers(0, 2**40)),
                            local_node=NodeId("n0"))
    allowed = {f"10.0.0.{i + 1}" for i, m in enumerate(members) if m.node in alive}
    allowed |= {e.ip for e in eps if e.ready and e.node in alive}
    every = {f"10.0.0.{i + 1}" for i in range(n)} | {e.ip for e in eps}
    return World(catalog, frozenset(allowed), frozenset(every - allowed))


def _mixed_case(label: str, mask: int) -> bytes:
    return "".join(c.upper() if mask >> (i % 60) & 1 else c
                   for i, c in enumerate(label)).encode()


_FORMS = st.sampled_from(("service", "tag", "rfc2782", "proto", "node", "alloc", "apex",
                          "ent", "random", "outside"))
_RANDOM_LABELS = st.lists(st.text("abcxyz-_0", min_size=1, max_size=8), max_size=4)


@st.composite
def names(draw: st.DrawFn) -> tuple[bytes, ...]:
    service = draw(st.sampled_from(SERVICES + ("nope",)))
    form = draw(_FORMS)
    pick = draw(st.integers(0, 2**16))
    labels: tuple[str, ...] = {
        "service": (service, "service"),
        "tag": ((TAGS + ("v9",))[pick % 4], service, "service"),
        "rfc2782": ("_" + (PORT_NAMES[pick % 3] or "x"), ("_tcp", "_udp")[pick >> 2 & 1],
                    service, "service"),
        "proto": ("_tcp", service, "service"),
        "node": (f"n{pick % 8}", "node"),
        "alloc": (f"a{pick % 16}", "alloc"),
        "apex": (),
        "ent": (("service", "node", "alloc")[pick % 3],),
        "random": tuple(draw(_RANDOM_LABELS)) if form == "random" else (),
        "outside": (),
    }[form]
    zone = ("example", "com") if form == "outside" else ("mesh",)
    mask = draw(st.integers(0, 2**60))
    return tuple(_mixed_case(label, mask >> i) for i, label in enumerate(labels + zone))


QTYPES = ("A", "AAAA", "SRV", "ANY", "SOA", "NS", "TXT", "MX", "PTR", "CNAME", "OPT",
          "AXFR", "HTTPS")


_QTYPE = st.one_of(st.sampled_from([getattr(QTYPE, t) for t in QTYPES]),
                   st.integers(0, 65535))
_QCLASS = st.sampled_from((1, 1, 1, 3, 255, 254))


@dataclass(frozen=True)
class Query:
    data: bytes
    limit: int


@st.composite
def queries(draw: st.DrawFn) -> Query:
    labels = draw(names())
    qtype = draw(_QTYPE)
    qclass = draw(_QCLASS)
    record = DNSRecord(DNSHeader(id=draw(st.integers(0, 65535)), rd=int(draw(st.booleans()))),
                       q=DNSQuestion(DNSLabel(labels), qtype, qclass))
    limit = CFG.max_udp_payload_bytes
    if draw(st.booleans()):
        size = draw(st.integers(0, 65535))
        record.add_ar(EDNS0(udp_len=size, flags="do" if draw(st.booleans()) else ""))
        limit = max(limit, min(size, CFG.edns_udp_payload_bytes))
    return Query(bytes(record.pack()), limit)


def _ips(r: DNSRecord) -> set[str]:
    return {str(rr.rdata) for rr in r.rr + r.ar if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


def _answer_set(r: DNSRecord) -> set[str]:
    return {repr(rr) for rr in r.rr}


@given(worlds(), queries(), st.integers(0, 2**32))
def test_any_question_gets_a_well_formed_answer(world: World, q: Query, seed: int) -> None:
    out = answer(q.data, world.catalog, CFG, random.Random(seed))
    assert out is not None  # refusing outside the zone: every query is answered
    r = DNSRecord.parse(out)
    assert r.header.id == q.data[0] << 8 | q.data[1]
    assert r.header.qr == 1
    assert r.header.rd == (q.data[2] & 1)
    question_end = 12 + len(DNSRecord(DNSHeader(id=0), q=r.q).pack()) - 12
    if r.header.rcode != FORMERR:
        assert out[12:question_end] == q.data[12:question_end]  # the case, too
    assert len(out) <= q.limit
    assert not _ips(r) & world.forbidden
    assert _ips(r) <= world.allowed
    if r.header.rcode in (NXDOMAIN,) or (r.header.rcode == NOERROR and not r.rr
                                         and not r.header.tc):
        assert [rr.rtype for rr in r.auth] == [QTYPE.SOA]
    full = answer(q.data, world.catalog, CFG, random.Random(seed), tcp=True)
    assert full is not None
    whole = DNSRecord.parse(full)
    assert whole.header.tc == 0
    assert _answer_set(r) <= _answer_set(whole)
    if not r.header.tc:
        assert _answer_set(r) == _answer_set(whole)


@given(worlds(), st.lists(queries(), min_size=1, max_size=6), st.booleans())
def test_cached_answers_match_fresh_ones(world: World, qs: list[Query], tcp: bool) -> None:
    responder = Responder(CFG, random.Random(0))
    for q in qs + qs:  # the second round hits the cache
        got = responder.respond(q.data, world.catalog, tcp=tcp)
        fresh = answer(q.data, world.catalog, CFG, random.Random(1), tcp=tcp)
        assert isinstance(got, bytes)
        assert fresh is not None
        a, b = DNSRecord.parse(got), DNSRecord.parse(fresh)
        assert (a.header.bitmap, a.header.a, a.header.auth, a.header.ar) == \
            (b.header.bitmap, b.header.a, b.header.auth, b.header.ar)
        assert got[12:] != b""
        assert len(got) == len(fresh)
        if not a.header.tc:
            assert _answer_set(a) == _answer_set(b)
            assert sorted(map(repr, a.ar)) == sorted(map(repr, b.ar))
    stats = responder.statistics()
    assert stats.cache_hits + stats.cache_misses == stats.queries == 2 * len(qs)


def _probe(catalog: Catalog, name: str, qtype: str) -> DNSRecord:
    out = answer(bytes(DNSRecord.question(name, qtype).pack()), catalog, CFG,
                 random.Random(0), tcp=True)
    assert out is not None
    return DNSRecord.parse(out)


@given(worlds())
def test_answers_are_exactly_the_ready_endpoints_of_live_nodes(world: World) -> None:
    live = {n.name for n in world.catalog.nodes if n.alive}
    eps = [e for e in world.catalog.endpoints if e.ready and e.node in live]
    for service in SERVICES:
        expected = {e.ip for e in eps if e.service == service}
        names = [f"{service}.service.mesh"] + [f"{t}.{service}.service.mesh" for t in TAGS] \
            + [f"_{p}._{proto}.{service}.service.mesh" for p in PORT_NAMES if p
               for proto in ("tcp", "udp")]
        for name in names:  # ANY holds the A, AAAA and SRV records, and SRV glue
            assert not _ips(_probe(world.catalog, name, "ANY")) & world.forbidden
        a, aaaa = (_probe(world.catalog, names[0], t) for t in ("A", "AAAA"))
        assert _ips(a) | _ips(aaaa) == expected
        assert a.header.rcode == (NOERROR if expected else NXDOMAIN)
    for i in range(len(world.catalog.nodes) + 1):
        r = _probe(world.catalog, f"n{i}.node.mesh", "A")
        assert r.header.rcode == (NOERROR if f"n{i}" in live else NXDOMAIN)
    for e in world.catalog.endpoints:
        r = _probe(world.catalog, f"{e.alloc}.alloc.mesh", "ANY")
        assert not _ips(r) & world.forbidden
        assert (r.header.rcode == NOERROR) == any(x.alloc == e.alloc for x in eps)


def _check_outcome(data: bytes, out: bytes | Forward | None) -> None:
    if isinstance(out, Forward):
        out = out.servfail
    if out is None:
        return
    r = DNSRecord.parse(out)
    assert r.header.qr == 1
    assert out[:2] == data[:2]


FORWARDING = DnsConfig(upstream=Addr("127.0.0.1", 53))


@given(st.binary(max_size=700), worlds())
def test_random_bytes_never_raise(data: bytes, world: World) -> None:
    for config in (CFG, FORWARDING):
        responder = Responder(config, random.Random(0))
        for tcp in (False, True):
            _check_outcome(data, responder.respond(data, world.catalog, tcp=tcp))
        _check_outcome(data, answer(data, world.catalog, config, random.Random(0)))
    if len(data) >= 3 and data[2] & 0x80:
        assert answer(data, world.catalog, CFG, random.Random(0)) is None


@given(queries(), st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
       st.integers(0, 600), worlds())
def test_mutated_queries_never_raise(q: Query, edits: list[tuple[int, int]], cut: int,
                                     world: World) -> None:
    data = bytearray(q.data)
    for pos, value in edits:
        if data:
            data[pos % len(data)] = value
    data = data[:max(cut, 12)]
    responder = Responder(FORWARDING, random.Random(0))
    for _ in range(2):
        _check_outcome(bytes(data), responder.respond(bytes(data), world.catalog))
    _check_outcome(bytes(data), answer(bytes(data), world.catalog, CFG, random.Random(0)))
