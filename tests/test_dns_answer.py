"""The DNS answer logic, one name form and one response code at a time.

Every query goes through three paths that must agree: the pure ``answer()``, a cold
``Responder`` (cache miss) and the same responder again (cache hit); ``ask`` checks
that and returns the parsed answer.
"""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest
from dnslib import EDNS0, QTYPE, RR, DNSHeader, DNSQuestion, DNSRecord

from mesh.dns.answer import (
    BADVERS,
    FORMERR,
    MAX_QUERY_BYTES,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    Forward,
    Responder,
    answer,
)
from mesh.dns.catalog import Catalog, CatalogBuilder, build_catalog
from mesh.dns.config import DnsConfig
from mesh.dns.fakes import endpoint, member
from mesh.gossip.messages import Status
from mesh.types import Addr, NodeId

CFG = DnsConfig()
MEMBERS = [
    member("n1", "10.0.0.1"),
    member("n2", "10.0.0.2"),
    member("n3", "10.0.0.3", Status.SUSPECT),
    member("n4", "10.0.0.4", Status.DEAD),
    member("n5", "10.0.0.5", Status.LEFT),
    member("n6", "fd00::6"),
]
ENDPOINTS = [
    endpoint("a1", "web", "n1", "10.0.0.1", 8080, tags=("v1",)),
    endpoint("a2", "web", "n2", "172.17.0.2", 80, tags=("v2",)),  # a container address
    endpoint("a3", "web", "n3", "10.0.0.3", 8080),  # suspect node: still answered
    endpoint("a4", "web", "n4", "10.0.0.4", 8080),  # dead node: never answered
    endpoint("a5", "web", "n1", "10.0.0.1", 9090, ready=False),
    endpoint("a6", "web", "n6", "fd00::6", 8080),
    endpoint("d1", "db", "n2", "10.0.0.2", 5432, port_name="pg"),
    endpoint("u1", "resolver", "n1", "10.0.0.1", 53, port_name="dns", protocol="udp"),
    endpoint("g1", "gone", "n4", "10.0.0.4", 80),
    endpoint("c1", "cold", "n1", "10.0.0.1", 80, ready=False),
]
CAT = build_catalog(MEMBERS, ENDPOINTS, generation=42, local_node=NodeId("n1"))


def query(name: str, qtype: str = "A", *, edns: int | None = None, do: bool = False,
          rd: bool = True, qid: int = 4242, qclass: str = "IN") -> bytes:
    q = DNSRecord(DNSHeader(id=qid, rd=int(rd)),
                  q=DNSQuestion(name, getattr(QTYPE, qtype), {"IN": 1, "CH": 3,
                                                              "ANY": 255}[qclass]))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return bytes(q.pack())


def _sections(r: DNSRecord) -> tuple[list[str], list[str], list[str]]:
    return (sorted(map(repr, r.rr)), sorted(map(repr, r.auth)), sorted(map(repr, r.ar)))


def ask_raw(data: bytes, *, catalog: Catalog = CAT, config: DnsConfig = CFG,
            tcp: bool = False) -> bytes:
    """The answer bytes, after checking the three paths agree."""
    pure = answer(data, catalog, config, random.Random(1), tcp=tcp)
    responder = Responder(config, random.Random(2))
    cold = responder.respond(data, catalog, tcp=tcp)
    warm = responder.respond(data, catalog, tcp=tcp)
    assert isinstance(pure, bytes)
    assert isinstance(cold, bytes)
    assert isinstance(warm, bytes)
    parsed = [DNSRecord.parse(x) for x in (pure, cold, warm)]
    for p in parsed[1:]:
        assert p.header.bitmap == parsed[0].header.bitmap
        assert p.header.id == parsed[0].header.id
        assert (p.header.a, p.header.auth, p.header.ar) == \
            (parsed[0].header.a, parsed[0].header.auth, parsed[0].header.ar)
        if not p.header.tc:
            assert _sections(p) == _sections(parsed[0])
        assert p.pack()[12:] != b""
        assert len(p.pack()) == len(parsed[0].pack())
    return warm


def ask(name: str, qtype: str = "A", *, catalog: Catalog = CAT, config: DnsConfig = CFG,
        tcp: bool = False, **kw: int | bool | str | None) -> DNSRecord:
    data = query(name, qtype, **kw)  # type: ignore[arg-type]
    return DNSRecord.parse(ask_raw(data, catalog=catalog, config=config, tcp=tcp))


def addrs(r: DNSRecord, section: str = "rr") -> set[str]:
    return {str(rr.rdata) for rr in getattr(r, section) if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


def srvs(r: DNSRecord) -> set[tuple[int, str]]:
    return {(rr.rdata.port, str(rr.rdata.target)) for rr in r.rr if rr.rtype == QTYPE.SRV}


def assert_negative(r: DNSRecord, rcode: int) -> None:
    assert r.header.rcode == rcode
    assert r.header.aa == 1
    assert r.rr == []
    assert len(r.auth) == 1
    assert r.auth[0].rtype == QTYPE.SOA
    assert str(r.auth[0].rname) == "mesh."
    assert r.auth[0].ttl == CFG.negative_ttl_s  # RFC 2308: min(SOA TTL, minimum)


# --- names ----------------------------------------------------------------------------


def test_service_a_and_aaaa_answer_ready_endpoints_of_live_nodes_only() -> None:
    r = ask("web.service.mesh")
    assert r.header.rcode == NOERROR
    assert r.header.aa == 1
    assert r.header.qr == 1
    assert addrs(r) == {"10.0.0.1", "172.17.0.2", "10.0.0.3"}  # not dead a4, unready a5
    assert {rr.ttl for rr in r.rr} == {CFG.ttl_s}
    assert addrs(ask("web.service.mesh", "AAAA")) == {"fd00::6"}


def test_service_srv_targets_nodes_or_allocs_with_glue() -> None:
    r = ask("web.service.mesh", "SRV", edns=1232)
    assert srvs(r) == {(8080, "n1.node.mesh."), (80, "a2.alloc.mesh."),
                       (8080, "n3.node.mesh."), (8080, "n6.node.mesh.")}
    assert {(rr.rdata.priority, rr.rdata.weight) for rr in r.rr} == {(1, 1)}
    glue = {(str(rr.rname), str(rr.rdata)) for rr in r.ar if rr.rtype != QTYPE.OPT}
    assert glue == {("n1.node.mesh.", "10.0.0.1"), ("a2.alloc.mesh.", "172.17.0.2"),
                    ("n3.node.mesh.", "10.0.0.3"), ("n6.node.mesh.", "fd00::6")}


def test_rfc2782_names_select_by_port_name_and_protocol() -> None:
    assert srvs(ask("_http._tcp.web.service.mesh", "SRV")) == \
        srvs(ask("web.service.mesh", "SRV"))
    assert srvs(ask("_pg._tcp.db.service.mesh", "SRV")) == {(5432, "n2.node.mesh.")}
    assert srvs(ask("_dns._udp.resolver.service.mesh", "SRV")) == {(53, "n1.node.mesh.")}
    assert addrs(ask("_pg._tcp.db.service.mesh")) == {"10.0.0.2"}
    assert_negative(ask("_http._udp.web.service.mesh", "SRV"), NXDOMAIN)
    assert_negative(ask("_dns._tcp.resolver.service.mesh", "SRV"), NXDOMAIN)
    assert_negative(ask("_tcp.web.service.mesh", "SRV"), NOERROR)  # empty non-terminal


def test_tag_names_select_tagged_endpoints() -> None:
    assert addrs(ask("v1.web.service.mesh")) == {"10.0.0.1"}
    assert srvs(ask("v2.web.service.mesh", "SRV")) == {(80, "a2.alloc.mesh.")}
    assert_negative(ask("v9.web.service.mesh"), NXDOMAIN)


def test_node_names_answer_alive_and_suspect_nodes() -> None:
    assert addrs(ask("n1.node.mesh")) == {"10.0.0.1"}
    assert addrs(ask("n3.node.mesh")) == {"10.0.0.3"}  # suspect is not dead
    assert addrs(ask("n6.node.mesh", "AAAA")) == {"fd00::6"}
    assert_negative(ask("n6.node.mesh", "A"), NOERROR)  # exists, no IPv4: NODATA
    assert_negative(ask("n6.node.mesh", "SRV"), NOERROR)
    assert_negative(ask("n4.node.mesh"), NXDOMAIN)  # dead
    assert_negative(ask("n5.node.mesh"), NXDOMAIN)  # left
    assert_negative(ask("n9.node.mesh"), NXDOMAIN)  # unknown


def test_alloc_names_answer_one_ready_endpoint() -> None:
    assert addrs(ask("a1.alloc.mesh")) == {"10.0.0.1"}
    assert srvs(ask("a2.alloc.mesh", "SRV")) == {(80, "a2.alloc.mesh.")}
    assert_negative(ask("a2.alloc.mesh", "AAAA"), NOERROR)
    assert_negative(ask("a5.alloc.mesh"), NXDOMAIN)  # not ready
    assert_negative(ask("a4.alloc.mesh"), NXDOMAIN)  # on a dead node


def test_apex_soa_and_ns_name_the_answering_node() -> None:
    r = ask("mesh", "SOA")
    soa = r.rr[0].rdata
    assert (str(soa.mname), str(soa.rname)) == ("n1.node.mesh.", "hostmaster.mesh.")
    assert soa.times == (42, CFG.soa_refresh_s, CFG.soa_retry_s, CFG.soa_expire_s,
                         CFG.negative_ttl_s)
    ns = ask("mesh", "NS", edns=1232)
    assert [str(rr.rdata) for rr in ns.rr] == ["n1.node.mesh."]
    assert addrs(ns, "ar") == {"10.0.0.1"}
    assert_negative(ask("mesh", "A"), NOERROR)
    anonymous = build_catalog(MEMBERS, [], generation=1)
    assert str(ask("mesh", "NS", catalog=anonymous).rr[0].rdata) == "ns.mesh."


def test_nxdomain_and_nodata_carry_the_soa() -> None:
    assert_negative(ask("nope.service.mesh"), NXDOMAIN)
    assert_negative(ask("gone.service.mesh"), NXDOMAIN)  # only on a dead node
    assert_negative(ask("cold.service.mesh"), NXDOMAIN)  # only unready endpoints
    assert_negative(ask("x.y.z.service.mesh"), NXDOMAIN)
    assert_negative(ask("thing.widget.mesh"), NXDOMAIN)
    assert_negative(ask("web.service.mesh", "TXT"), NOERROR)
    assert_negative(ask("web.service.mesh", "MX"), NOERROR)
    for structural in ("service.mesh", "node.mesh", "alloc.mesh"):
        assert_negative(ask(structural), NOERROR)


def test_any_returns_every_record_of_the_name() -> None:
    r = ask("web.service.mesh", "ANY", tcp=True)
    types = sorted(QTYPE[rr.rtype] for rr in r.rr)
    assert types == ["A"] * 3 + ["AAAA"] + ["SRV"] * 4


def test_custom_zone_and_ttls() -> None:
    config = DnsConfig(zone="Cluster.Example", ttl_s=0, negative_ttl_s=0)
    assert config.zone == "cluster.example."
    r = ask("web.service.cluster.example", config=config)
    assert addrs(r) == {"10.0.0.1", "172.17.0.2", "10.0.0.3"}
    assert r.rr[0].ttl == 0
    neg = ask("nope.service.cluster.example", config=config)
    assert neg.header.rcode == NXDOMAIN
    assert neg.auth[0].ttl == 0
    assert ask("web.service.mesh", config=config).header.rcode == REFUSED


# --- case -----------------------------------------------------------------------------


def test_question_case_is_echoed_byte_for_byte() -> None:
    data = query("WeB.SeRvIcE.MeSh", "SRV")
    out = ask_raw(data)
    end = 12 + len("WeB.SeRvIcE.MeSh") + 2 + 4
    assert out[12:end] == data[12:end]
    r = DNSRecord.parse(out)
    assert {str(rr.rname) for rr in r.rr} == {"WeB.SeRvIcE.MeSh."}
    # a cached answer built for one spelling serves another, echoing each
    responder = Responder(CFG, random.Random(0))
    for spelling in ("web.service.mesh", "WEB.service.MESH", "wEb.SERVICE.mesh"):
        q = query(spelling)
        got = responder.respond(q, CAT)
        assert isinstance(got, bytes)
        assert got[12:12 + len(spelling) + 2] == q[12:12 + len(spelling) + 2]
    assert responder.statistics().cache_hits == 2


# --- response codes -------------------------------------------------------------------


def test_outside_the_zone_is_refused_not_authoritative() -> None:
    r = ask("example.com")
    assert r.header.rcode == REFUSED
    assert r.header.aa == 0
    assert r.rr == []
    assert r.q.qname == "example.com."
    assert ask("mesh.example.com").header.rcode == REFUSED
    assert ask(".", "NS").header.rcode == REFUSED


def test_outside_the_zone_can_be_silent() -> None:
    config = DnsConfig(refuse_outside_zone=False)
    assert answer(query("example.com"), CAT, config, random.Random(0)) is None
    responder = Responder(config, random.Random(0))
    assert responder.respond(query("example.com"), CAT) is None
    assert responder.statistics().dropped == 1


def test_outside_the_zone_is_forwarded_when_an_upstream_is_set() -> None:
    config = DnsConfig(upstream=Addr("127.0.0.1", 5353))
    responder = Responder(config, random.Random(0))
    q = query("Example.COM", qid=777)
    for _ in range(2):  # the decision is cached too
        out = responder.respond(q, CAT)
        assert isinstance(out, Forward)
        assert out.query == q
        fail = DNSRecord.parse(out.servfail)
        assert fail.header.id == 777
        assert fail.header.rcode == SERVFAIL
        assert fail.header.ra
        assert out.servfail[12:] == q[12:]  # the question, as asked
    assert responder.statistics().forwarded == 2
    # in-zone answers advertise recursion, and the pure function never forwards
    assert ask("web.service.mesh", config=config).header.ra == 1
    pure = answer(q, CAT, config, random.Random(0))
    assert pure is not None
    assert DNSRecord.parse(pure).header.rcode == REFUSED


def _raw(qid: int = 99, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
         ar: int = 0, body: bytes = b"") -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar) + body


QUESTION = b"\x03web\x07service\x04mesh\x00\x00\x01\x00\x01"


@pytest.mark.parametrize("data", [
    _raw(qd=0),
    _raw(qd=2, body=QUESTION + QUESTION),
    _raw(body=b""),  # header only, a question promised
    _raw(body=QUESTION[:7]),  # cut inside a label
    _raw(body=QUESTION[:-2]),  # cut inside the class
    _raw(an=1, body=QUESTION),
    _raw(ns=1, body=QUESTION),
    _raw(body=b"\x40" + b"a" * 64 + b"\x04mesh\x00\x00\x01\x00\x01"),  # label of 64
    _raw(body=(b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01"),  # name of 257 bytes
    _raw(body=b"\xc0\x0c\x00\x01\x00\x01"),  # a pointer to itself
    _raw(ar=2, body=QUESTION + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2),
    _raw(ar=1, body=QUESTION + b"\x03abc\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"),
    _raw(body=QUESTION + b"\x00" * MAX_QUERY_BYTES),
], ids=["no-question", "two-questions", "header-only", "cut-label", "cut-class",
        "answer-section", "authority-section", "label-64", "name-257", "pointer-loop",
        "two-opts", "opt-not-at-root", "oversized"])
def test_malformed_queries_get_formerr_without_a_question(data: bytes) -> None:
    for out in (answer(data, CAT, CFG, random.Random(0)),
                Responder(CFG, random.Random(0)).respond(data, CAT)):
        assert isinstance(out, bytes)
        r = DNSRecord.parse(out)
        assert r.header.rcode == FORMERR
        assert r.header.qr == 1
        assert r.header.id == 99
        assert r.header.rd == 1
        assert r.questions == []


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 15])
def test_other_opcodes_get_notimp(opcode: int) -> None:
    data = _raw(flags=opcode << 11, body=QUESTION)
    out = Responder(CFG, random.Random(0)).respond(data, CAT)
    assert isinstance(out, bytes)
    r = DNSRecord.parse(out)
    assert (r.header.rcode, r.header.opcode, r.header.qr) == (NOTIMP, opcode, 1)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x12" * 11,
                                  _raw(flags=0x8000, body=QUESTION),
                                  _raw(flags=0x8400 | 3, body=QUESTION)],
                         ids=["empty", "one-byte", "eleven-bytes", "response", "nxdomain-reply"])
def test_responses_and_runts_get_no_answer(data: bytes) -> None:
    assert answer(data, CAT, CFG, random.Random(0)) is None
    responder = Responder(CFG, random.Random(0))
    assert responder.respond(data, CAT) is None
    assert responder.statistics().dropped == 1


def test_special_query_types_and_classes() -> None:
    assert ask("mesh", "AXFR", tcp=True).header.rcode == REFUSED
    assert ask("mesh", "IXFR").header.rcode == REFUSED
    assert ask("web.service.mesh", "OPT").header.rcode == FORMERR
    assert ask("web.service.mesh", "TSIG").header.rcode == NOTIMP
    chaos = ask("web.service.mesh", qclass="CH")
    assert chaos.header.rcode == REFUSED
    assert chaos.header.aa == 0
    assert addrs(ask("web.service.mesh", qclass="ANY")) == {"10.0.0.1", "172.17.0.2",
                                                           "10.0.0.3"}


def test_rd_bit_and_id_are_copied_from_each_query() -> None:
    responder = Responder(CFG, random.Random(0))
    for qid, rd in ((1, True), (2, False), (65535, True), (0, False)):
        out = responder.respond(query("web.service.mesh", qid=qid, rd=rd), CAT)
        assert isinstance(out, bytes)
        header = DNSRecord.parse(out).header
        assert (header.id, header.rd, header.aa, header.qr) == (qid, int(rd), 1, 1)
    assert responder.statistics().cache_hits == 3


# --- EDNS -----------------------------------------------------------------------------


def _opt(r: DNSRecord) -> RR | None:
    opts = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
    assert len(opts) <= 1
    return opts[0] if opts else None


def test_edns_is_advertised_and_do_bit_echoed_only_when_asked() -> None:
    assert _opt(ask("web.service.mesh")) is None
    opt = _opt(ask("web.service.mesh", edns=4096))
    assert opt is not None
    assert opt.edns_len == CFG.edns_udp_payload_bytes
    assert (opt.edns_ver, opt.edns_do) == (0, 0)
    opt = _opt(ask("web.service.mesh", edns=512, do=True))
    assert opt is not None
    assert opt.edns_do == 1
    assert _opt(ask("nope.service.mesh", edns=1400)) is not None


def test_edns_version_other_than_zero_gets_badvers() -> None:
    q = DNSRecord.question("web.service.mesh")
    q.header.id = 5
    q.add_ar(EDNS0(udp_len=1232, version=1))
    out = answer(bytes(q.pack()), CAT, CFG, random.Random(0))
    assert out is not None
    r = DNSRecord.parse(out)
    opt = _opt(r)
    assert r.header.rcode == 0
    assert opt is not None
    assert opt.edns_rcode == BADVERS >> 4
    assert r.rr == []
    assert r.header.id == 5
    responder = Responder(CFG, random.Random(0))
    responder.respond(bytes(q.pack()), CAT)
    assert dict(responder.statistics().responses_by_rcode) == {"BADVERS": 1}


# --- truncation -------------------------------------------------------------------------


BIG_MEMBERS = [member(f"b{i}", f"10.1.{i // 200}.{i % 200 + 1}") for i in range(300)]
BIG = build_catalog(
    BIG_MEMBERS,
    [endpoint(f"e{i}", "big", m.node, m.addr.host, 7000) for i, m in enumerate(BIG_MEMBERS)]
    + [endpoint(f"m{i}", "mid", m.node, m.addr.host, 7000) for i, m in
       enumerate(BIG_MEMBERS[:14])],
    generation=1, local_node=NodeId("b0"))


@pytest.mark.parametrize(("edns", "limit"), [(None, 512), (512, 512), (1232, 1232),
                                             (4096, 1232), (800, 800), (100, 512)])
def test_udp_answers_that_do_not_fit_are_truncated_to_the_limit(
        edns: int | None, limit: int) -> None:
    out = ask_raw(query("big.service.mesh", edns=edns), catalog=BIG)
    r = DNSRecord.parse(out)
    assert r.header.tc == 1
    assert r.header.rcode == NOERROR
    assert len(out) <= limit
    assert len(out) > limit - 16  # as many whole A records as fit
    assert len(r.rr) == r.header.a
    assert 0 < len(r.rr) < 300
    assert (_opt(r) is not None) == (edns is not None)  # the OPT survives truncation


def test_tcp_gets_the_whole_answer() -> None:
    for qtype, n in (("A", 300), ("SRV", 300)):
        r = ask("big.service.mesh", qtype, catalog=BIG, tcp=True)
        assert r.header.tc == 0
        assert len(r.rr) == n
    srv = ask("big.service.mesh", "SRV", catalog=BIG, tcp=True)
    assert len(addrs(srv, "ar")) == 300


def test_additional_records_are_left_out_without_truncating() -> None:
    r = ask("mid.service.mesh", "SRV", catalog=BIG)  # 14 SRVs fit in 512, their glue not
    assert r.header.tc == 0
    assert len(r.rr) == 14
    assert 0 < len(r.ar) < 14


def test_truncated_answers_draw_from_every_endpoint() -> None:
    responder = Responder(CFG, random.Random(3))
    seen: set[str] = set()
    for _ in range(60):
        out = responder.respond(query("big.service.mesh"), BIG)
        assert isinstance(out, bytes)
        seen |= addrs(DNSRecord.parse(out))
    assert len(seen) > 250  # each answer is a random subset, not the same first ones


# --- shuffling and the cache -------------------------------------------------------------


def test_address_answers_are_shuffled_by_the_injected_rng() -> None:
    def orders(seed: int) -> list[list[str]]:
        responder = Responder(CFG, random.Random(seed))
        out = []
        for _ in range(20):
            data = responder.respond(query("mid.service.mesh"), BIG)
            assert isinstance(data, bytes)
            out.append([str(rr.rdata) for rr in DNSRecord.parse(data).rr])
        return out

    first = orders(7)
    assert orders(7) == first  # deterministic for a seed
    assert len({tuple(o) for o in first}) > 10
    assert all(sorted(o) == sorted(first[0]) for o in first)


def test_a_new_generation_drops_the_changed_answers_at_once() -> None:
    builder = CatalogBuilder(NodeId("n1"))
    responder = Responder(CFG, random.Random(0))
    cat1 = builder.build(MEMBERS, ENDPOINTS)
    before = responder.respond(query("web.service.mesh"), cat1)
    assert isinstance(before, bytes)
    assert "10.0.0.3" in addrs(DNSRecord.parse(before))
    # n3 is declared dead: its endpoint must vanish from the very next answer
    dead = [member("n3", "10.0.0.3", Status.DEAD) if m.node == "n3" else m for m in MEMBERS]
    cat2 = builder.build(dead, ENDPOINTS)
    assert cat2.generation == cat1.generation + 1
    after = responder.respond(query("web.service.mesh"), cat2)
    assert isinstance(after, bytes)
    assert addrs(DNSRecord.parse(after)) == {"10.0.0.1", "172.17.0.2"}
    stats = responder.statistics()
    assert (stats.cache_flushes, stats.cache_invalidated, stats.cache_hits,
            stats.generation) == (0, 1, 0, 2)
    # unchanged content: the same snapshot object, the cache stays warm
    assert builder.build(dead, list(reversed(ENDPOINTS))) is cat2
    responder.respond(query("web.service.mesh"), cat2)
    assert responder.statistics().cache_hits == 1


def test_cache_is_bounded_and_can_be_disabled() -> None:
    responder = Responder(dataclasses.replace(CFG, cache_max_entries=3), random.Random(0))
    for i in range(10):
        responder.respond(query(f"s{i}.service.mesh"), CAT)
    stats = responder.statistics()
    assert (stats.cache_entries, stats.cache_evictions) == (3, 7)
    off = Responder(dataclasses.replace(CFG, cache_max_entries=0), random.Random(0))
    for _ in range(3):
        off.respond(query("web.service.mesh"), CAT)
    assert (off.statistics().cache_hits, off.statistics().cache_entries) == (0, 0)


def test_statistics_count_types_and_rcodes() -> None:
    responder = Responder(CFG, random.Random(0))
    for name, qtype in (("web.service.mesh", "A"), ("web.service.mesh", "A"),
                        ("web.service.mesh", "SRV"), ("nope.service.mesh", "AAAA"),
                        ("example.org", "A"), ("web.service.mesh", "NAPTR")):
        responder.respond(query(name, qtype), CAT)
    responder.respond(_raw(qd=0), CAT)
    stats = responder.statistics()
    assert dict(stats.queries_by_type) == {"A": 3, "SRV": 1, "AAAA": 1, "other": 1}
    assert dict(stats.responses_by_rcode) == {"NOERROR": 4, "NXDOMAIN": 1, "REFUSED": 1,
                                              "FORMERR": 1}
    assert (stats.queries, stats.cache_hits, stats.cache_misses) == (7, 1, 6)
