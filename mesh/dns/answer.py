"""DNS answers for the cluster zone, sans I/O.

Theory of operation
-------------------
The server is authoritative for one zone (``mesh.`` by default) and answers every
query from a :class:`~mesh.dns.catalog.Catalog` snapshot. Names (RFC 2782 for SRV):

========================================  =========================================
``<zone>``                                 SOA, NS (the answering node)
``<service>.service.<zone>``               A/AAAA of ready endpoints, shuffled; SRV
``<tag>.<service>.service.<zone>``         the same, endpoints carrying ``tag``
``_<port>._<proto>.<service>.service...``  the same, endpoints with that port name
``<node>.node.<zone>``                     A/AAAA of an alive node
``<alloc>.alloc.<zone>``                   A/AAAA/SRV of one ready endpoint
========================================  =========================================

A name *exists* when it owns at least one record of any type. A query for an
existing name and a type it lacks gets NODATA (NOERROR, empty answer), for a name
that does not exist NXDOMAIN (RFC 8020: nothing below it exists either); both carry
the SOA in the authority section with the negative TTL (RFC 2308 §3, §5). The
structural names ``service.<zone>``, ``node.<zone>``, ``alloc.<zone>`` and
``_<proto>.<service>.service.<zone>`` are empty non-terminals: NODATA.

An SRV target is ``<node>.node.<zone>`` when the endpoint listens on one of its
node's addresses, else ``<alloc>.alloc.<zone>`` (a container address), so that the
target always resolves to the address the port belongs to; the target's A/AAAA
records go in the additional section when they fit.

Wire rules: no answer to a response (QR=1) or to fewer than 12 bytes; FORMERR when a
header parses but the rest is malformed (no question echoed); NOTIMP for an opcode
other than QUERY; BADVERS for an EDNS version other than 0 (RFC 6891 §6.1.3);
REFUSED outside the zone (or :class:`Forward` when an upstream is configured, or no
answer when ``refuse_outside_zone`` is off) and for zone transfers. The question's
case is echoed byte for byte (RFC 4343; resolvers using 0x20 randomisation check it).
EDNS (RFC 6891): the answer carries an OPT record advertising
``edns_udp_payload_bytes`` and the query's DO bit, and a UDP answer is sized to
``max(512, min(client's size, ours))``. An answer that does not fit has the TC bit
and as many whole answer records as fit (RFC 2181 §9), and the client retries over
TCP, where the limit is 65535; additional records are simply left out when they do
not fit (no TC for those).

The hot path
------------
A cache miss parses with ``dnslib.DNSRecord.parse``, builds records with dnslib and
packs each one (``RR.pack``) into a buffer holding only the header and the
lower-cased question, so that every record chunk of a :class:`_Template` compresses
its names against the question (offset 12) and nothing else: chunks can then be
shuffled, dropped and reassembled without repacking. The template is cached under the question's wire bytes, lower-cased, plus
type, class, the size limit and the DO bit. A hit scans the query's header and
question with ``struct`` (a strict subset of valid queries; anything else takes the
slow path), and assembles the answer from the template, patching in the query id,
the RD bit and the question bytes exactly as the client sent them.

A cached answer outlives a catalogue change unless the change names its entry
(:func:`subject_of`: the service, allocation or node the name is about; see
:class:`~mesh.dns.catalog.CatalogDelta`). The SOA record, whose serial is the
generation, is the only part of an answer that every change touches: templates
record where its serial sits and write the current one into each answer.

Nothing here does I/O, reads a clock or uses the module-level ``random``: the
answer is a function of the query, the catalogue, the configuration and the
injected ``rng`` (only used to shuffle).
"""

from __future__ import annotations

import functools
import ipaddress
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from dnslib import AAAA, NS, RR, SOA, SRV, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib.buffer import BufferError as DnslibBufferError
from dnslib.dns import DNSError
from dnslib.label import DNSBuffer, DNSLabelError

from mesh.dns.catalog import Catalog, Endpoint, NodeRecord
from mesh.dns.config import DnsConfig

# Record types, classes and response codes (RFC 1035, 3596, 2782, 6891).
TYPE_A: Final = 1
TYPE_NS: Final = 2
TYPE_SOA: Final = 6
TYPE_AAAA: Final = 28
TYPE_SRV: Final = 33
TYPE_OPT: Final = 41
TYPE_IXFR: Final = 251
TYPE_AXFR: Final = 252
TYPE_ANY: Final = 255
CLASS_IN: Final = 1
CLASS_ANY: Final = 255

NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
BADVERS: Final = 16

RCODE_NAMES: Final = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL",
                      NXDOMAIN: "NXDOMAIN", NOTIMP: "NOTIMP", REFUSED: "REFUSED",
                      BADVERS: "BADVERS"}
"""Names of the response codes this server sends, for statistics."""

QTYPE_NAMES: Final = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX",
                      16: "TXT", 28: "AAAA", 33: "SRV", 64: "SVCB", 65: "HTTPS",
                      255: "ANY"}
"""Query types counted by name; every other type is counted as ``other``."""

TCP_LIMIT_BYTES: Final = 65_535
"""Largest DNS message over TCP (the 2-byte length prefix)."""

MAX_QUERY_BYTES: Final = 4096
"""Longest query parsed; a real query is under 600 bytes even with EDNS padding, and
a bound keeps a hostile 64 KiB TCP message from costing much."""

MAX_ADDITIONAL_IN_QUERY: Final = 4
"""Additional records accepted in a query (an OPT, perhaps a TSIG we ignore)."""

_HEADER = struct.Struct(">HHHHHH")
_COUNTS = struct.Struct(">HHHH")
_OPT_TAIL = struct.Struct(">HHBBHH")  # type, udp size, ext rcode, version, flags, rdlength
_QR: Final = 0x8000
_AA: Final = 0x0400
_TC: Final = 0x0200
_RD: Final = 0x0100
_RA: Final = 0x0080
_DO: Final = 0x8000
_ENTS: Final = frozenset((b"service", b"node", b"alloc"))
_NOTIMP_TYPES: Final = frozenset((249, 250, 253, 254))  # TKEY, TSIG, MAILB, MAILA


@dataclass(frozen=True, slots=True)
class Forward:
    """The question is outside the zone and an upstream is configured: send ``query``
    to the upstream unchanged and relay its answer; if it fails or times out, send
    ``servfail`` instead."""

    query: bytes
    servfail: bytes


Outcome = bytes | Forward | None
"""What :meth:`Responder.respond` returns: answer bytes, a forward, or no answer."""


@dataclass(frozen=True, slots=True)
class AnswerStatistics:
    """Counters since start (``Responder.statistics()``).

    Attributes:
        queries: packets handed to :meth:`Responder.respond`.
        queries_by_type: ``(type name, count)`` of queries whose question parsed.
        responses_by_rcode: ``(rcode name, count)`` of answers sent (forwards are
            counted when they are decided, under ``forwarded``).
        dropped: packets that got no answer (responses, runts, silent refusals).
        forwarded: queries handed to the upstream.
        truncated: answers sent with the TC bit.
        cache_hits: answers assembled from a cached template.
        cache_misses: answers built from the catalogue.
        cache_entries: templates held now.
        cache_evictions: templates evicted because the cache was full.
        cache_flushes: times the cache was dropped whole for a new catalogue.
        cache_invalidated: templates dropped because a new catalogue changed
            their name (see :class:`~mesh.dns.catalog.CatalogDelta`).
        cache_kept: templates that outlived a catalogue change, summed over the
            changes.
        generation: the generation of the catalogue last answered from.
    """

    queries: int
    queries_by_type: tuple[tuple[str, int], ...]
    responses_by_rcode: tuple[tuple[str, int], ...]
    dropped: int
    forwarded: int
    truncated: int
    cache_hits: int
    cache_misses: int
    cache_entries: int
    cache_evictions: int
    cache_flushes: int
    cache_invalidated: int
    cache_kept: int
    generation: int


# --- templates ----------------------------------------------------------------------


class _Template:
    """One answer in wire form, minus the parts each query supplies (id, RD, question).

    Every chunk is one packed record whose compression pointers point only into the
    question, so chunks can be reordered and dropped freely.
    """

    __slots__ = ("rcode", "forward", "_flags", "_answers", "_shuffle", "_authority",
                 "_additional", "_opt", "_budget", "_fixed", "_all_fit_tail", "_mid", "_soa",
                 "_serial_at", "_split")

    def __init__(self, *, rcode: int, flags: int, answers: Sequence[bytes], shuffle: bool,
                 authority: Sequence[bytes], additional: Sequence[bytes], opt: bytes,
                 limit: int, question_bytes: int, forward: bool = False,
                 soa: bytes | None = None) -> None:
        self.rcode = rcode
        self.forward = forward
        self._flags = flags
        self._answers = tuple(answers)
        self._shuffle = shuffle and len(self._answers) > 1
        self._authority = tuple(authority)
        self._additional = tuple(additional)
        self._opt = opt
        self._budget = limit - 12 - question_bytes - len(opt)
        self._fixed: tuple[bytes, bytes, bytes, bool] | None = None
        self._all_fit_tail: bytes | None = None
        self._mid = b""
        self._soa = soa
        self._serial_at = -1
        self._split: tuple[bytes, bytes] | None = None
        if not self._shuffle:
            self._fixed = self._layout(self._answers)
            at = self._serial_at
            if at >= 0:
                body = self._fixed[2]
                self._split = (body[:at], body[at + 4:])
        else:
            assert soa is None, "a shuffled answer never holds the SOA"
            size = sum(map(len, self._answers)) + sum(map(len, self._authority)) \
                + sum(map(len, self._additional))
            if size <= self._budget:
                # The common case: everything fits in any order, so a hit only
                # shuffles and joins.
                self._all_fit_tail = b"".join(self._authority + self._additional) + opt
                self._mid = _COUNTS.pack(1, len(self._answers), len(self._authority),
                                         len(self._additional) + (1 if opt else 0))

    def _layout(self, answers: Sequence[bytes]) -> tuple[bytes, bytes, bytes, bool]:
        """Fit ``answers`` (in this order), authority and additional records into the
        budget. Returns the flag bytes, the counts, the records and whether the TC
        bit is set."""
        budget = self._budget
        used = 0
        an: list[bytes] = []
        truncated = False
        for chunk in answers:
            if used + len(chunk) > budget:
                truncated = True
                break
            an.append(chunk)
            used += len(chunk)
        ns: tuple[bytes, ...] = ()
        ar: list[bytes] = []
        if not truncated:
            auth_size = sum(map(len, self._authority))
            if used + auth_size <= budget:
                ns = self._authority
                used += auth_size
            else:
                truncated = True
        if not truncated:
            for chunk in self._additional:  # optional: leave out what does not fit
                if used + len(chunk) <= budget:
                    ar.append(chunk)
                    used += len(chunk)
        flags = self._flags | (_TC if truncated else 0)
        counts = _COUNTS.pack(1, len(an), len(ns), len(ar) + (1 if self._opt else 0))
        offset = 0
        for chunk in (*an, *ns):
            offset += len(chunk)
            if chunk is self._soa:
                # The SOA's rdata ends with serial, refresh, retry, expire, minimum.
                self._serial_at = offset - 20
        body = b"".join(an) + b"".join(ns) + b"".join(ar) + self._opt
        return flags.to_bytes(2, "big"), counts, body, truncated

    def render(self, query: bytes, question: bytes, rng: random.Random,
               serial: bytes) -> tuple[bytes, bool]:
        """The answer to ``query`` and whether it is truncated.

        Args:
            query: the query; its id and RD bit are copied.
            question: the question section to echo, exactly as the client wrote it
                (uncompressed, as long as the one the template was built for).
            rng: shuffles the answer records when the template says so.
            serial: the SOA serial (4 bytes, the catalogue generation) written into
                the SOA record, if the answer holds one: a cached answer outlives
                the catalogue it was built from when its names did not change.
        """
        rd = query[2] & 0x01
        if self._fixed is not None:
            flags, counts, body, truncated = self._fixed
            if self._split is not None:
                head, tail = self._split
                return (query[:2] + bytes((flags[0] | rd, flags[1])) + counts + question
                        + head + serial + tail), truncated
            return (query[:2] + bytes((flags[0] | rd, flags[1])) + counts + question
                    + body), truncated
        answers = list(self._answers)
        rng.shuffle(answers)
        if self._all_fit_tail is not None:
            flags_hi = (self._flags >> 8) | rd
            return (query[:2] + bytes((flags_hi, self._flags & 0xFF)) + self._mid
                    + question + b"".join(answers) + self._all_fit_tail), False
        flags, counts, body, truncated = self._layout(answers)
        return (query[:2] + bytes((flags[0] | rd, flags[1])) + counts + question
                + body), truncated


# --- query scanning -----------------------------------------------------------------


def _scan(query: bytes, tcp: bool, udp_bytes: int,
          edns_bytes: int) -> tuple[bytes, int, int] | None:
    """Fast-path parse of a plain query: one question, no compression, at most an OPT
    record with version 0 and nothing after it.

    Returns:
        ``(cache key, end of question, qtype)``, or ``None`` if the query is not of
        that simple shape (the slow path then handles it, whatever it is).
    """
    n = len(query)
    if n < 17 or n > MAX_QUERY_BYTES:
        return None
    _id, flags, qd, an, ns, ar = _HEADER.unpack_from(query)
    if flags & 0xF800 or qd != 1 or an or ns or ar > 1:  # a response, an opcode, sections
        return None
    i = 12
    while True:
        length = query[i]
        if length == 0:
            break
        if length > 63:  # a pointer or a reserved label type
            return None
        i += length + 1
        if i >= n:
            return None
    name_end = i + 1
    qend = name_end + 4
    if qend > n or name_end - 12 > 255:
        return None
    qtype = (query[name_end] << 8) | query[name_end + 1]
    if ar == 0:
        if qend != n:
            return None
        limit = TCP_LIMIT_BYTES if tcp else udp_bytes
        tail = b"\x00\x00"
    else:
        if n < qend + 11 or query[qend] != 0:
            return None
        rtype, size, _ext, version, eflags, rdlength = _OPT_TAIL.unpack_from(query, qend + 1)
        if rtype != TYPE_OPT or version != 0 or qend + 11 + rdlength != n:
            return None
        limit = TCP_LIMIT_BYTES if tcp else max(udp_bytes, min(size, edns_bytes))
        tail = b"\x02\x01" if eflags & _DO else b"\x01\x00"
    key = query[12:name_end].lower() + query[name_end:qend] + limit.to_bytes(2, "big") + tail
    return key, qend, qtype


def _limit(tcp: bool, edns: RR | None, config: DnsConfig) -> int:
    if tcp:
        return TCP_LIMIT_BYTES
    if edns is None:
        return config.max_udp_payload_bytes
    return max(config.max_udp_payload_bytes, min(int(edns.rclass),
                                                config.edns_udp_payload_bytes))


def _opt_record(config: DnsConfig, do_bit: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT pseudo-record: root owner, our payload size, version 0, DO echoed."""
    return b"\x00" + _OPT_TAIL.pack(TYPE_OPT, config.edns_udp_payload_bytes, ext_rcode, 0,
                                    _DO if do_bit else 0, 0)


# --- name resolution ----------------------------------------------------------------


@dataclass(slots=True)
class _Name:
    """What one name owns: whether it exists and its records' data."""

    exists: bool
    endpoints: tuple[Endpoint, ...] = ()
    node: NodeRecord | None = None
    apex: bool = False


def _lookup(rel: tuple[bytes, ...], catalog: Catalog) -> _Name:
    """Resolve a name given as its lower-case labels below the zone apex."""
    if not rel:
        return _Name(exists=True, apex=True)
    if any(b"." in label for label in rel):
        return _Name(exists=False)
    kind = rel[-1]
    if len(rel) == 1:
        return _Name(exists=kind in _ENTS)  # service.<zone> etc.: empty non-terminals
    if kind == b"node":
        node = catalog.node_index.get(b".".join(rel[:-1]))
        return _Name(exists=node is not None, node=node)
    if kind == b"alloc":
        ep = catalog.alloc_index.get(rel[0]) if len(rel) == 2 else None
        return _Name(exists=ep is not None, endpoints=(ep,) if ep else ())
    if kind != b"service":
        return _Name(exists=False)
    eps = catalog.service_index.get(rel[-2], ())
    if len(rel) == 2:
        return _Name(exists=bool(eps), endpoints=eps)
    first = rel[0]
    if len(rel) == 3:
        if first.startswith(b"_"):  # _<proto>.<service>: the parent of _<port>._<proto>
            proto = first[1:].decode("ascii", "replace")
            return _Name(exists=any(e.protocol == proto and e.port_name for e in eps))
        picked = tuple(e for e in eps if any(t.lower().encode("ascii") == first
                                             for t in e.tags))
        return _Name(exists=bool(picked), endpoints=picked)
    if len(rel) == 4 and first.startswith(b"_") and rel[1].startswith(b"_"):
        port_name = first[1:]
        proto = rel[1][1:].decode("ascii", "replace")
        picked = tuple(e for e in eps if e.protocol == proto
                       and e.port_name.lower().encode("ascii") == port_name)
        return _Name(exists=bool(picked), endpoints=picked)
    return _Name(exists=False)


Subject = tuple[int, bytes]
"""The catalogue entry an in-zone answer depends on: ``(SUBJECT_NODE, b"n1")``,
``(SUBJECT_SERVICE, b"web")`` or ``(SUBJECT_ALLOC, b"web-0-1")``."""

SUBJECT_NODE: Final = 0
SUBJECT_SERVICE: Final = 1
SUBJECT_ALLOC: Final = 2


def subject_of(rel: tuple[bytes, ...]) -> Subject | None:
    """Which entry of the catalogue decides the answers for a name (its lower-case
    labels below the apex), as :func:`_lookup` reads it: the node of
    ``<node>.node``, the allocation of ``<alloc>.alloc``, the service of every name
    below ``<service>.service`` (SRV answers also name the nodes of the endpoints,
    which :class:`~mesh.dns.catalog.CatalogDelta` accounts for). ``None``: the
    answer depends on no entry (the apex, whose SOA and NS name only the local
    node, the structural names and names that cannot exist)."""
    if len(rel) < 2 or any(b"." in label for label in rel):
        return None
    kind = rel[-1]
    if kind == b"node":
        return (SUBJECT_NODE, b".".join(rel[:-1]))
    if kind == b"alloc":
        return (SUBJECT_ALLOC, rel[0]) if len(rel) == 2 else None
    if kind == b"service" and len(rel) <= 4:
        return (SUBJECT_SERVICE, rel[-2])
    return None


def _serial(catalog: Catalog) -> bytes:
    """The SOA serial of answers from ``catalog``: its generation (RFC 1982 wraps)."""
    return (catalog.generation & 0xFFFFFFFF).to_bytes(4, "big")


# --- building -----------------------------------------------------------------------


def _ip_record(owner: DNSLabel, ip: str, ttl: int) -> RR:
    # Catalogue addresses are canonical IP literals: a colon means IPv6.
    if ":" in ip:
        return RR(owner, TYPE_AAAA, CLASS_IN, ttl, AAAA(_packed(ip)))
    return RR(owner, TYPE_A, CLASS_IN, ttl, A(_packed(ip)))


@functools.lru_cache(maxsize=4096)
def _packed(ip: str) -> tuple[int, ...]:
    """The bytes of a canonical address literal (memoised: a node's endpoints share
    its address)."""
    return tuple(ipaddress.ip_address(ip).packed)


def _family(ip: str) -> int:
    return TYPE_AAAA if ":" in ip else TYPE_A


class _Builder:
    """Builds the template for one parsed question against one catalogue."""

    def __init__(self, config: DnsConfig, catalog: Catalog, question: DNSQuestion,
                 edns: RR | None, tcp: bool) -> None:
        self.config = config
        self.catalog = catalog
        # Built for the lower-case question: records then compress against it, and
        # the client's own spelling is patched in when the answer is rendered.
        self.owner = DNSLabel(tuple(label.lower() for label in question.qname.label))
        self.question = DNSQuestion(self.owner, question.qtype, question.qclass)
        self.edns = edns
        self.limit = _limit(tcp, edns, config)
        self.opt = _opt_record(config, bool(edns.edns_do)) if edns is not None else b""
        self.zone = tuple(config.zone.rstrip(".").encode("ascii").split(b"."))
        self.zone_label = DNSLabel(self.zone)
        prefix = DNSBuffer()
        DNSHeader(id=0, bitmap=0).pack(prefix)
        self.question.pack(prefix)
        self._prefix = bytes(prefix.data)
        self._prefix_names = dict(prefix.names)
        self._prefix_bytes = len(self._prefix)
        self._soa_chunk: bytes | None = None

    def chunk(self, rr: RR) -> bytes:
        """One record packed as it will sit after the question: the buffer starts
        as the header and question, with only the question's names known for
        compression, so pointers can only point into the question."""
        buf = DNSBuffer(self._prefix)
        buf.offset = self._prefix_bytes
        buf.names = dict(self._prefix_names)
        rr.pack(buf)
        return bytes(buf.data[self._prefix_bytes:])

    def template(self, rcode: int, answers: Sequence[bytes] = (), *, shuffle: bool = False,
                 authority: Sequence[bytes] = (), additional: Sequence[bytes] = (),
                 authoritative: bool = True, forward: bool = False) -> _Template:
        flags = _QR | rcode | (_AA if authoritative else 0) \
            | (_RA if self.config.upstream is not None else 0)
        return _Template(rcode=rcode, flags=flags, answers=answers, shuffle=shuffle,
                         authority=authority, additional=additional, opt=self.opt,
                         limit=self.limit, question_bytes=self._prefix_bytes - 12,
                         forward=forward, soa=self._soa_chunk)

    # names of the zone

    def node_name(self, node: NodeRecord) -> DNSLabel:
        return DNSLabel(tuple(node.name.lower().encode("ascii").split(b"."))
                        + (b"node",) + self.zone)

    def alloc_name(self, ep: Endpoint) -> DNSLabel:
        return DNSLabel((ep.alloc.lower().encode("ascii"), b"alloc") + self.zone)

    def local_node(self) -> NodeRecord | None:
        name = self.catalog.local_node
        if name is None:
            return None
        node = self.catalog.node_index.get(name.lower().encode("ascii", "replace"))
        return node if node is not None and node.name == name else None

    def soa_chunk(self, ttl: int) -> bytes:
        """The zone's SOA record, packed; the template patches its serial."""
        assert self._soa_chunk is None, "one SOA per answer"
        self._soa_chunk = self.chunk(self.soa(ttl))
        return self._soa_chunk

    def soa(self, ttl: int) -> RR:
        local = self.local_node()
        mname = self.node_name(local) if local is not None \
            else DNSLabel((b"ns",) + self.zone)
        rname = DNSLabel((self.config.hostmaster.encode("ascii"),) + self.zone)
        c = self.config
        times = (self.catalog.generation & 0xFFFFFFFF, c.soa_refresh_s, c.soa_retry_s,
                 c.soa_expire_s, c.negative_ttl_s)
        return RR(self.zone_label, TYPE_SOA, CLASS_IN, ttl, SOA(mname, rname, times))

    def negative(self, rcode: int) -> _Template:
        # RFC 2308 §5: the SOA's TTL in a negative answer is min(its TTL, minimum).
        ttl = min(self.config.ttl_s, self.config.negative_ttl_s)
        return self.template(rcode, authority=[self.soa_chunk(ttl)])

    # answers

    def build(self, rel: tuple[bytes, ...], qtype: int) -> _Template:
        name = _lookup(rel, self.catalog)
        if not name.exists:
            return self.negative(NXDOMAIN)
        owner = self.owner
        ttl = self.config.ttl_s
        answers: list[bytes] = []
        additional: list[bytes] = []
        shuffle = qtype in (TYPE_A, TYPE_AAAA, TYPE_SRV)
        if name.apex:
            if qtype in (TYPE_SOA, TYPE_ANY):
                answers.append(self.soa_chunk(ttl))
            if qtype in (TYPE_NS, TYPE_ANY):
                answers.extend(self._ns(owner, ttl, additional))
        elif name.node is not None:
            for ip in name.node.ips:
                if qtype in (_family(ip), TYPE_ANY):
                    answers.append(self.chunk(_ip_record(owner, ip, ttl)))
        elif name.endpoints:
            if qtype in (TYPE_A, TYPE_AAAA, TYPE_ANY):
                for ip in sorted({e.ip for e in name.endpoints}):
                    if qtype in (_family(ip), TYPE_ANY):
                        answers.append(self.chunk(_ip_record(owner, ip, ttl)))
            if qtype in (TYPE_SRV, TYPE_ANY):
                answers.extend(self._srv(owner, name.endpoints, ttl, additional))
        if not answers:
            return self.negative(NOERROR)  # NODATA
        return self.template(NOERROR, answers, shuffle=shuffle and qtype != TYPE_ANY,
                             additional=additional)

    def _ns(self, owner: DNSLabel, ttl: int, additional: list[bytes]) -> list[bytes]:
        local = self.local_node()
        if local is None:
            return [self.chunk(RR(owner, TYPE_NS, CLASS_IN, ttl,
                                  NS(DNSLabel((b"ns",) + self.zone))))]
        target = self.node_name(local)
        additional.extend(self.chunk(_ip_record(target, ip, ttl)) for ip in local.ips)
        return [self.chunk(RR(owner, TYPE_NS, CLASS_IN, ttl, NS(target)))]

    def _srv(self, owner: DNSLabel, endpoints: Sequence[Endpoint], ttl: int,
             additional: list[bytes]) -> list[bytes]:
        records: dict[tuple[int, str], bytes] = {}
        glue: dict[str, list[bytes]] = {}
        for ep in endpoints:
            node = self.catalog.node_index.get(ep.node.lower().encode("ascii", "replace"))
            if node is not None and node.name == ep.node and ep.ip in node.ips:
                target, ips = self.node_name(node), node.ips
            else:
                target, ips = self.alloc_name(ep), (ep.ip,)
            if len(target) > 253:  # too long with this zone: no SRV for this endpoint
                continue
            text = str(target)
            if (ep.port, text) in records:
                continue
            # Equal priority and weight: clients pick uniformly (RFC 2782).
            records[(ep.port, text)] = self.chunk(
                RR(owner, TYPE_SRV, CLASS_IN, ttl, SRV(1, 1, ep.port, target)))
            if text not in glue:
                glue[text] = [self.chunk(_ip_record(target, ip, ttl)) for ip in ips]
        for text in sorted(glue):
            additional.extend(glue[text])
        return [records[k] for k in sorted(records)]


# --- the whole answer ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Error:
    """A final, uncached answer (FORMERR, NOTIMP, BADVERS) and its response code."""

    rcode: int
    data: bytes


def _error(query: bytes, rcode: int, question: DNSQuestion | None = None,
           opt: bytes = b"") -> _Error:
    """An error answer with the query's id, opcode and RD bit; it echoes ``question``
    when given (only when the question parsed and is sound) and carries ``opt``."""
    qid, flags = struct.unpack_from(">HH", query)
    out_flags = _QR | (flags & (0x7800 | _RD)) | (rcode & 0xF)
    arcount = 1 if opt else 0
    if question is None:
        return _Error(rcode, _HEADER.pack(qid, out_flags, 0, 0, 0, arcount) + opt)
    return _Error(rcode, _HEADER.pack(qid, out_flags, 1, 0, 0, arcount)
                  + _pack_question(question) + opt)


def _pack_question(question: DNSQuestion) -> bytes:
    """The question section as dnslib packs it at offset 12 (never compressed)."""
    return bytes(DNSRecord(DNSHeader(id=0, bitmap=0), questions=[question]).pack()[12:])


def _servfail(query: bytes, question: bytes) -> bytes:
    """SERVFAIL for a forwarded query: the query's id, RD bit and question."""
    qid, flags = struct.unpack_from(">HH", query)
    return _HEADER.pack(qid, _QR | _RA | (flags & _RD) | SERVFAIL, 1, 0, 0, 0) + question


def _name_ok(labels: tuple[bytes, ...]) -> bool:
    return all(0 < len(label) <= 63 for label in labels) \
        and sum(len(label) + 1 for label in labels) + 1 <= 255


_PARSE_ERRORS = (DNSError, DNSLabelError, DnslibBufferError, ValueError, TypeError,
                 IndexError, KeyError, struct.error, RecursionError, OverflowError)
"""What dnslib raises on malformed input: its own errors, and what leaks through
from the struct, codec and range checks it calls. Anything else is a bug."""


@dataclass(frozen=True, slots=True)
class _Built:
    """The slow path's decision: the query type (-1 if no sound question), and a
    template (cacheable), a final error, or ``None`` (no answer); plus the question
    bytes to echo with a template and the catalogue entry its answer depends on."""

    qtype: int
    outcome: _Template | _Error | None
    question: bytes = b""
    subject: Subject | None = None


def _build(query: bytes, catalog: Catalog, config: DnsConfig, tcp: bool,
           forward: bool, qend: int = 0) -> _Built:
    """Parse ``query`` in full with dnslib and decide its answer (the slow path).

    ``qend`` is where the question ends when :func:`_scan` found it uncompressed
    (its bytes are then echoed as they are), else 0."""
    if len(query) < 12:
        return _Built(-1, None)
    flags = (query[2] << 8) | query[3]
    if flags & _QR:
        return _Built(-1, None)  # never answer an answer: reflection loops start so
    qd, an, ns, ar = struct.unpack_from(">HHHH", query, 4)
    opcode = (flags >> 11) & 0xF
    if len(query) > MAX_QUERY_BYTES or (opcode == 0 and (qd != 1 or an or ns
                                                          or ar > MAX_ADDITIONAL_IN_QUERY)):
        return _Built(-1, _error(query, FORMERR))
    try:
        record = DNSRecord.parse(query)
    except _PARSE_ERRORS:
        return _Built(-1, _error(query, NOTIMP if opcode else FORMERR))
    question = record.questions[0] if len(record.questions) == 1 else None
    if question is not None and not _name_ok(question.qname.label):
        return _Built(-1, _error(query, FORMERR))
    if opcode != 0:
        return _Built(-1, _error(query, NOTIMP, question))
    assert question is not None  # qd == 1 was checked before parsing
    qtype = question.qtype
    opts = [rr for rr in record.ar if rr.rtype == TYPE_OPT]
    if len(opts) > 1 or (opts and opts[0].rname.label != ()):
        return _Built(qtype, _error(query, FORMERR))
    edns = opts[0] if opts else None
    if edns is not None and edns.edns_ver != 0:
        # RFC 6891 §6.1.3: BADVERS is 16; its upper 8 bits travel in the OPT record.
        return _Built(qtype, _error(query, BADVERS, question,
                                    _opt_record(config, bool(edns.edns_do), BADVERS >> 4)))
    builder = _Builder(config, catalog, question, edns, tcp)
    echo = query[12:qend] if qend else _pack_question(question)
    labels = tuple(label.lower() for label in question.qname.label)
    zone = builder.zone
    if len(labels) < len(zone) or labels[len(labels) - len(zone):] != zone:
        if forward and config.upstream is not None:
            return _Built(qtype, builder.template(SERVFAIL, forward=True), echo)
        if not config.refuse_outside_zone:
            return _Built(qtype, None)
        return _Built(qtype, builder.template(REFUSED, authoritative=False), echo)
    if qtype == TYPE_OPT:
        template = builder.template(FORMERR)  # OPT is not a question (RFC 6891 §6.1.1)
    elif qtype in (TYPE_AXFR, TYPE_IXFR):
        template = builder.template(REFUSED)  # no transfers: each node has its own view
    elif qtype in _NOTIMP_TYPES:
        template = builder.template(NOTIMP)
    elif question.qclass not in (CLASS_IN, CLASS_ANY):
        template = builder.template(REFUSED, authoritative=False)
    else:
        template = builder.build(labels[:len(labels) - len(zone)], qtype)
    return _Built(qtype, template, echo, subject_of(labels[:len(labels) - len(zone)]))


def answer(query: bytes, catalog: Catalog, config: DnsConfig, rng: random.Random, *,
           tcp: bool = False) -> bytes | None:
    """Answer one DNS message from ``catalog``, without cache or forwarding.

    Names outside the zone get REFUSED (or no answer, see
    :attr:`~mesh.dns.config.DnsConfig.refuse_outside_zone`) even when an upstream is
    configured: forwarding is decided by :class:`Responder`, which the server uses.

    Args:
        query: the message as received (untrusted, any bytes).
        catalog: the snapshot to answer from.
        config: zone, TTLs and sizes.
        rng: shuffles address and SRV records.
        tcp: the message came over TCP (limit 65535 bytes instead of the UDP limit).

    Returns:
        The answer's wire bytes, or ``None`` when the message gets no answer.
    """
    query = bytes(query)
    built = _build(query, catalog, config, tcp, forward=False)
    outcome = built.outcome
    if outcome is None or isinstance(outcome, _Error):
        return outcome.data if outcome is not None else None
    return outcome.render(query, built.question, rng, _serial(catalog))[0]


class Responder:
    """Answers queries with a wire-form answer cache, forwarding and statistics.

    The synchronous core that the DNS adapter drives: one :meth:`respond` per
    received message. Given the same config, rng state, catalogues and queries it
    returns the same bytes.

    The cache outlives a catalogue change: when the new catalogue carries a
    :class:`~mesh.dns.catalog.CatalogDelta` against the one answered from so far,
    only the cached answers whose names depend on a changed service, allocation or
    node are dropped (negative answers included: a name that starts to exist is
    named by the delta), and the SOA serial of the answers kept is patched to the
    new generation when they are sent. Without a delta, the cache is dropped.
    """

    def __init__(self, config: DnsConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._cache: dict[bytes, _Template] = {}
        self._subjects: dict[Subject, set[bytes]] = {}
        """Cache keys by the catalogue entry their answer depends on."""
        self._subject_of: dict[bytes, Subject] = {}
        self._catalog: Catalog | None = None
        self._serial = b"\0\0\0\0"
        self._udp_bytes = config.max_udp_payload_bytes
        self._edns_bytes = config.edns_udp_payload_bytes
        self._max_entries = config.cache_max_entries
        self._queries = 0
        self._by_type: dict[int, int] = {}
        self._by_rcode: dict[int, int] = {}
        self._dropped = 0
        self._forwarded = 0
        self._truncated = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._flushes = 0
        self._invalidations = 0
        self._kept = 0

    @property
    def config(self) -> DnsConfig:
        """The configuration answers follow."""
        return self._config

    def set_catalog(self, catalog: Catalog) -> None:
        """Answer from ``catalog`` from now on, dropping the cached answers it
        changes (all of them unless it carries a delta against the current one).
        Call it for every catalogue in turn so that no delta is missed."""
        if catalog is not self._catalog:
            self._swap(catalog)

    def respond(self, query: bytes, catalog: Catalog, *, tcp: bool = False) -> Outcome:
        """Answer one message.

        Args:
            query: the message as received (untrusted; any bytes).
            catalog: the snapshot to answer from; another one than the current is
                installed first, as by :meth:`set_catalog`.
            tcp: the message came over TCP.

        Returns:
            The answer bytes; a :class:`Forward` for the adapter to perform; or
            ``None`` when the message gets no answer. It raises on no input.
        """
        if catalog is not self._catalog:
            self._swap(catalog)
        if type(query) is not bytes:
            query = bytes(query)  # a bytearray or memoryview: keys must be hashable
        self._queries += 1
        scanned = _scan(query, tcp, self._udp_bytes, self._edns_bytes)
        if scanned is not None and self._max_entries:
            key, qend, qtype = scanned
            template = self._cache.get(key)
            if template is not None:
                self._hits += 1
                self._by_type[qtype] = self._by_type.get(qtype, 0) + 1
                return self._finish(template, query, query[12:qend])
        self._misses += 1
        built = _build(query, catalog, self._config, tcp, forward=True,
                       qend=scanned[1] if scanned is not None else 0)
        if built.qtype >= 0:
            self._by_type[built.qtype] = self._by_type.get(built.qtype, 0) + 1
        outcome = built.outcome
        if outcome is None:
            self._dropped += 1
            return None
        if isinstance(outcome, _Error):
            self._by_rcode[outcome.rcode] = self._by_rcode.get(outcome.rcode, 0) + 1
            return outcome.data
        if scanned is not None and self._max_entries:
            self._store(scanned[0], outcome, built.subject)
        return self._finish(outcome, query, built.question)

    def _store(self, key: bytes, template: _Template, subject: Subject | None) -> None:
        if len(self._cache) >= self._max_entries:
            oldest = next(iter(self._cache))  # insertion order
            del self._cache[oldest]
            self._unindex(oldest)
            self._evictions += 1
        self._cache[key] = template
        if subject is not None:
            self._subject_of[key] = subject
            self._subjects.setdefault(subject, set()).add(key)

    def _unindex(self, key: bytes) -> None:
        subject = self._subject_of.pop(key, None)
        if subject is not None:
            keys = self._subjects[subject]
            keys.discard(key)
            if not keys:
                del self._subjects[subject]

    def _finish(self, template: _Template, query: bytes, question: bytes) -> Outcome:
        if template.forward:
            self._forwarded += 1
            return Forward(query, _servfail(query, question))
        data, truncated = template.render(query, question, self._rng, self._serial)
        if truncated:
            self._truncated += 1
        self._by_rcode[template.rcode] = self._by_rcode.get(template.rcode, 0) + 1
        return data

    def _swap(self, catalog: Catalog) -> None:
        old = self._catalog
        self._catalog = catalog
        self._serial = _serial(catalog)
        if old is None or not self._cache:
            return
        if old.generation == catalog.generation and old.same_content(catalog):
            return
        delta = catalog.delta
        if delta is None or delta.base != old.generation or catalog.lineage is None \
                or catalog.lineage is not old.lineage:
            self._cache.clear()
            self._subjects.clear()
            self._subject_of.clear()
            self._flushes += 1
            return
        before = len(self._cache)
        for kind, keys in ((SUBJECT_NODE, delta.nodes), (SUBJECT_SERVICE, delta.services),
                           (SUBJECT_ALLOC, delta.allocs)):
            for name in keys:
                for key in self._subjects.pop((kind, name), ()):
                    del self._cache[key]
                    del self._subject_of[key]
        self._invalidations += before - len(self._cache)
        self._kept += len(self._cache)

    def statistics(self) -> AnswerStatistics:
        """Counters for metrics."""
        by_type: dict[str, int] = {}
        for qtype, count in self._by_type.items():
            name = QTYPE_NAMES.get(qtype, "other")
            by_type[name] = by_type.get(name, 0) + count
        return AnswerStatistics(
            queries=self._queries,
            queries_by_type=tuple(sorted(by_type.items())),
            responses_by_rcode=tuple(sorted((RCODE_NAMES.get(r, str(r)), c)
                                            for r, c in self._by_rcode.items())),
            dropped=self._dropped,
            forwarded=self._forwarded,
            truncated=self._truncated,
            cache_hits=self._hits,
            cache_misses=self._misses,
            cache_entries=len(self._cache),
            cache_evictions=self._evictions,
            cache_flushes=self._flushes,
            cache_invalidated=self._invalidations,
            cache_kept=self._kept,
            generation=self._catalog.generation if self._catalog is not None else 0,
        )
