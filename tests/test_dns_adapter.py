"""The DNS server over real UDP and TCP sockets on 127.0.0.1 (ephemeral ports).

Clients are dnslib-encoded messages on trio sockets, and ``dig`` when it is
installed (Debian: bind9-dnsutils; those tests are skipped without it). Timeouts
(upstream, idle TCP) run on trio's autojump clock and assert exact virtual times.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from dnslib import QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from mesh.dns.adapter import DnsServer, bind_dns_sockets, describe_bind_error
from mesh.dns.answer import NOERROR, NXDOMAIN, SERVFAIL
from mesh.dns.catalog import Catalog, CatalogBuilder, Endpoint, build_catalog
from mesh.dns.config import DnsConfig, container_resolvers
from mesh.dns.fakes import endpoint, member
from mesh.dns.metrics import dns_metrics
from mesh.errors import StartupError
from mesh.gossip.adapter import GossipAdapter, MemoryNetwork
from mesh.gossip.config import GossipConfig
from mesh.gossip.core import MemberChanged, Membership
from mesh.gossip.messages import Meta, Status
from mesh.node.metrics import render
from mesh.types import Addr, NodeId

LOCAL = DnsConfig.local()
MEMBERS = [member(f"n{i}", f"10.0.{i // 200}.{i % 200 + 1}") for i in range(300)]
CATALOG = build_catalog(
    MEMBERS,
    [endpoint(f"e{i}", "big", m.node, m.addr.host, 7000) for i, m in enumerate(MEMBERS)]
    + [endpoint("w1", "web", "n1", "10.0.0.2", 8080, tags=("v1",)),
       endpoint("w2", "web", "n2", "10.0.0.3", 8080)],
    generation=1, local_node=NodeId("n0"))
DIG = shutil.which("dig")
needs_dig = pytest.mark.skipif(DIG is None, reason="dig not installed (bind9-dnsutils)")


@asynccontextmanager
async def dns_server(config: DnsConfig = LOCAL,
                     catalog: Catalog = CATALOG) -> AsyncIterator[tuple[DnsServer, Addr]]:
    sockets = await bind_dns_sockets(config)
    with sockets:
        server = DnsServer(config, catalog, random.Random(1))
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(server.serve, sockets)
            yield server, addr
            nursery.cancel_scope.cancel()


def query(name: str, qtype: str = "A", qid: int = 1) -> bytes:
    return bytes(DNSRecord(DNSHeader(id=qid), q=DNSQuestion(name, getattr(QTYPE, qtype)))
                 .pack())


async def udp_ask(addr: Addr, data: bytes) -> bytes:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect((addr.host, addr.port))
        await sock.send(data)
        with trio.fail_after(10):  # a bound, not a synchronisation: replies are immediate
            return await sock.recv(65535)


async def read_frame(stream: trio.abc.Stream, buf: bytearray) -> bytes:
    while len(buf) < 2 or len(buf) < 2 + (buf[0] << 8 | buf[1]):
        chunk = await stream.receive_some(65535)
        assert chunk, "the server closed the connection"
        buf += chunk
    n = buf[0] << 8 | buf[1]
    frame = bytes(buf[2:2 + n])
    del buf[:2 + n]
    return frame


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def ips(data: bytes) -> set[str]:
    return {str(rr.rdata) for rr in DNSRecord.parse(data).rr if rr.rtype == QTYPE.A}


async def test_udp_and_tcp_answer_queries() -> None:
    async with dns_server() as (server, addr):
        assert addr.host == "127.0.0.1"
        assert addr.port > 0
        assert ips(await udp_ask(addr, query("web.service.mesh"))) == {"10.0.0.2", "10.0.0.3"}
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            await stream.send_all(frame(query("v1.web.service.mesh", qid=9)))
            got = DNSRecord.parse(await read_frame(stream, bytearray()))
            assert got.header.id == 9
            assert {str(rr.rdata) for rr in got.rr} == {"10.0.0.2"}
        stats = server.statistics()
        assert (stats.udp_in, stats.udp_out, stats.tcp_connections, stats.tcp_queries) == \
            (1, 1, 1, 1)
        assert sum(stats.latency_counts) == 2


async def test_tcp_serves_pipelined_and_split_queries_in_order() -> None:
    async with dns_server() as (_server, addr):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            names = ["web.service.mesh", "nope.service.mesh", "n5.node.mesh"]
            await stream.send_all(b"".join(frame(query(n, qid=i)) for i, n in enumerate(names)))
            buf = bytearray()
            answers = [DNSRecord.parse(await read_frame(stream, buf)) for _ in names]
            assert [a.header.id for a in answers] == [0, 1, 2]
            assert [a.header.rcode for a in answers] == [NOERROR, NXDOMAIN, NOERROR]
            split = frame(query("web.service.mesh", qid=77))
            for i in range(len(split)):  # one byte at a time
                await stream.send_all(split[i:i + 1])
            assert DNSRecord.parse(await read_frame(stream, buf)).header.id == 77


async def test_truncated_udp_answer_is_complete_over_tcp() -> None:
    async with dns_server() as (server, addr):
        short = DNSRecord.parse(await udp_ask(addr, query("big.service.mesh", "SRV")))
        assert short.header.tc == 1
        assert 0 < len(short.rr) < 300
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            await stream.send_all(frame(query("big.service.mesh", "SRV")))
            full = DNSRecord.parse(await read_frame(stream, bytearray()))
        assert full.header.tc == 0
        assert len(full.rr) == 300
        assert server.statistics().answers.truncated == 1


async def test_a_new_catalog_is_answered_from_the_next_query() -> None:
    async with dns_server() as (server, addr):
        assert ips(await udp_ask(addr, query("web.service.mesh"))) == {"10.0.0.2", "10.0.0.3"}
        dead = [m if m.node != "n2" else member("n2", m.addr.host, Status.DEAD)
                for m in MEMBERS]
        server.set_catalog(build_catalog(dead, CATALOG.endpoints, generation=2))
        assert server.catalog.generation == 2
        assert ips(await udp_ask(addr, query("web.service.mesh"))) == {"10.0.0.2"}


async def test_garbage_does_not_stop_the_server() -> None:
    rng = random.Random(11)
    async with dns_server() as (server, addr):
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(300):
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
                await sock.sendto(data, (addr.host, addr.port))
        for garbage in (b"\xff\xff" + b"x" * 100, b"\x00\x05abcde\x00", b"\x00"):
            stream = await trio.open_tcp_stream(addr.host, addr.port)
            async with stream:
                await stream.send_all(garbage)  # cut short, or an unparseable message
        assert ips(await udp_ask(addr, query("web.service.mesh"))) == {"10.0.0.2", "10.0.0.3"}
        stats = server.statistics()
        assert stats.internal_errors == 0
        assert stats.udp_in == 301


@asynccontextmanager
async def fake_upstream(answer_udp: bool = True, truncate_udp: bool = False
                        ) -> AsyncIterator[Addr]:
    """A resolver on 127.0.0.1 that answers A 127.0.0.9 (UDP and TCP), truncates its UDP
    answers when asked, or never answers UDP at all."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", port))

    def reply(data: bytes, tc: bool) -> bytes:
        q = DNSRecord.parse(data)
        r = q.reply()
        r.header.tc = int(tc)
        if not tc:
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("127.0.0.9"), ttl=30))
        return bytes(r.pack())

    async def serve_udp() -> None:
        while True:
            data, src = await udp.recvfrom(65535)
            if answer_udp:
                await udp.sendto(reply(data, truncate_udp), src)

    async def serve_tcp(stream: trio.SocketStream) -> None:
        async with stream:
            data = await read_frame(stream, bytearray())
            await stream.send_all(frame(reply(data, False)))

    with udp:
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve_udp)
            nursery.start_soon(trio.serve_listeners, serve_tcp, [listener])
            yield Addr("127.0.0.1", port)
            nursery.cancel_scope.cancel()


async def test_names_outside_the_zone_are_forwarded_to_the_upstream() -> None:
    async with fake_upstream() as upstream, \
            dns_server(dataclasses.replace(LOCAL, upstream=upstream)) as (server, addr):
        got = DNSRecord.parse(await udp_ask(addr, query("Example.COM", qid=321)))
        assert got.header.id == 321
        assert got.header.rcode == NOERROR
        assert [str(rr.rdata) for rr in got.rr] == ["127.0.0.9"]
        assert server.statistics().answers.forwarded == 1


async def test_tcp_clients_get_the_upstream_tcp_answer_when_udp_truncates() -> None:
    async with fake_upstream(truncate_udp=True) as upstream, \
            dns_server(dataclasses.replace(LOCAL, upstream=upstream)) as (_server, addr):
        assert DNSRecord.parse(await udp_ask(addr, query("example.com"))).header.tc == 1
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            await stream.send_all(frame(query("example.com")))
            got = DNSRecord.parse(await read_frame(stream, bytearray()))
        assert got.header.tc == 0
        assert [str(rr.rdata) for rr in got.rr] == ["127.0.0.9"]


async def test_a_silent_upstream_gets_servfail_after_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    config = dataclasses.replace(LOCAL, upstream_timeout_s=1.5, max_forwards_in_flight=1)
    async with fake_upstream(answer_udp=False) as upstream, \
            dns_server(dataclasses.replace(config, upstream=upstream)) as (server, addr):
        t0 = trio.current_time()
        results: dict[int, tuple[float, int]] = {}

        async def ask(qid: int) -> None:
            data = await udp_ask(addr, query("example.com", qid=qid))
            results[qid] = (trio.current_time() - t0, DNSRecord.parse(data).header.rcode)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, 2)  # over max_forwards_in_flight: SERVFAIL at once
        assert results == {1: (1.5, SERVFAIL), 2: (0.0, SERVFAIL)}
        assert server.statistics().forward_failures == 2


async def test_idle_tcp_connections_are_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with dns_server() as (_server, addr):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            t0 = trio.current_time()
            await stream.send_all(b"\x00")  # half a length prefix, then nothing
            assert await stream.receive_some(100) == b""
            assert trio.current_time() - t0 == LOCAL.tcp_idle_timeout_s


async def test_tcp_connections_beyond_the_limit_are_closed() -> None:
    config = dataclasses.replace(LOCAL, tcp_max_connections=1)
    async with dns_server(config) as (server, addr):
        first = await trio.open_tcp_stream(addr.host, addr.port)
        async with first:
            await first.send_all(frame(query("web.service.mesh")))
            await read_frame(first, bytearray())  # the first is being served
            second = await trio.open_tcp_stream(addr.host, addr.port)
            async with second:
                with trio.fail_after(10):
                    assert await second.receive_some(100) == b""
            assert server.statistics().tcp_refused == 1


async def test_bind_falls_back_to_the_next_port_and_says_what_to_do() -> None:
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = taken.socket.getsockname()[1]
    async with taken:
        auto = dataclasses.replace(LOCAL, bind_port=None)
        sockets = await bind_dns_sockets(auto, auto_ports=(port, 0))
        with sockets:
            assert sockets.addr.port not in (port, 0)
        with pytest.raises(StartupError, match=r"port in use.*--dns-bind"):
            await bind_dns_sockets(dataclasses.replace(LOCAL, bind_port=port))
        with pytest.raises(StartupError, match="--dns-bind"):
            await bind_dns_sockets(auto, auto_ports=(port, port))
    unavailable = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
    assert "not on this host" in describe_bind_error(Addr("10.9.9.9", 53), unavailable)
    denied = OSError(errno.EACCES, "Permission denied")
    assert "CAP_NET_BIND_SERVICE" in describe_bind_error(Addr("0.0.0.0", 53), denied)


async def test_metrics_render_counters_and_the_latency_histogram() -> None:
    async with dns_server() as (server, addr):
        await udp_ask(addr, query("web.service.mesh"))
        await udp_ask(addr, query("web.service.mesh"))
        await udp_ask(addr, query("nope.service.mesh", "SRV"))
        stats = server.statistics()
    text = render(dns_metrics(stats), {"node": "n0"})
    for line in ('meshd_dns_queries_total{node="n0",qtype="A"} 2',
                 'meshd_dns_queries_total{node="n0",qtype="SRV"} 1',
                 'meshd_dns_responses_total{node="n0",rcode="NXDOMAIN"} 1',
                 'meshd_dns_cache_hits_total{node="n0"} 1',
                 'meshd_dns_latency_seconds_bucket{node="n0",le="+Inf"} 3',
                 'meshd_dns_latency_seconds_count{node="n0"} 3'):
        assert line in text
    assert 0 < stats.latency_quantile_s(0.99) < float("inf")


async def feed_dns(adapter: GossipAdapter, builder: CatalogBuilder, server: DnsServer,
                   endpoints: list[Endpoint]) -> None:
    """What the daemon runs: rebuild the snapshot on every membership change."""
    while True:  # a subscriber that falls behind is closed: resubscribe and re-read
        events = adapter.subscribe()
        async with events:
            server.set_catalog(builder.build(adapter.core.members(), endpoints))
            async for _ in events:
                server.set_catalog(builder.build(adapter.core.members(), endpoints))


async def test_a_dead_nodes_endpoints_vanish_when_swim_declares_it_dead(
        autojump_clock: trio.testing.MockClock) -> None:
    gossip = GossipConfig.lan()
    endpoints = [endpoint("b1", "web", "b", "10.0.0.2", 80),
                 endpoint("d1", "web", "d", "10.0.0.3", 80)]
    async with trio.open_nursery() as nursery:
        net = MemoryNetwork(nursery)
        adapters: dict[str, GossipAdapter] = {}
        scopes: dict[str, trio.CancelScope] = {}
        for i, name in enumerate("abd"):
            addr = Addr(f"10.0.0.{i + 1}", 7946)
            ep = net.endpoint(addr)
            core = Membership(gossip, NodeId(name), addr, Meta(), random.Random(i),
                              trio.current_time())
            adapters[name] = GossipAdapter(core, ep, ep)
            ep.stream_handler = adapters[name].serve_push_pull
            scopes[name] = trio.CancelScope()

            async def run(adapter: GossipAdapter = adapters[name],
                          scope: trio.CancelScope = scopes[name],
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
                with scope:
                    await adapter.run(task_status=task_status)

            await nursery.start(run)
        seed = Addr("10.0.0.1", 7946)
        await adapters["b"].join([seed])
        await adapters["d"].join([seed])
        a = adapters["a"]
        builder = CatalogBuilder(NodeId("a"))
        async with dns_server(catalog=builder.current) as (server, dns_addr):
            nursery.start_soon(feed_dns, a, builder, server, endpoints)
            events = a.subscribe()
            while {m.node for m in a.core.members() if m.status == Status.ALIVE} != set("abd"):
                await events.receive()
            await trio.testing.wait_all_tasks_blocked()
            assert ips(await udp_ask(dns_addr, query("web.service.mesh"))) == \
                {"10.0.0.2", "10.0.0.3"}
            scopes["d"].cancel()  # d crashes
            net.cut(Addr("10.0.0.3", 7946))
            crashed = trio.current_time()
            while True:
                ev = await events.receive()
                if isinstance(ev, MemberChanged) and ev.member.node == "d" \
                        and ev.member.status == Status.DEAD:
                    break
            declared = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()  # the feeder has run
            assert trio.current_time() == declared  # no time passed: fresh at once
            assert ips(await udp_ask(dns_addr, query("web.service.mesh"))) == {"10.0.0.2"}
            assert DNSRecord.parse(await udp_ask(dns_addr, query("d.node.mesh"))).header.rcode \
                == NXDOMAIN
            assert declared - crashed > 1.0
            assert declared - crashed < 10.0
        nursery.cancel_scope.cancel()


# --- dig ---------------------------------------------------------------------------------


async def dig(addr: Addr, *args: str) -> str:
    assert DIG is not None
    done = await trio.run_process([DIG, "-p", str(addr.port), f"@{addr.host}", "+time=5",
                                   "+tries=1", *args], capture_stdout=True)
    return done.stdout.decode()


@needs_dig
async def test_dig_udp_tcp_srv_and_case() -> None:
    async with dns_server() as (_server, addr):
        short = (await dig(addr, "+short", "web.service.mesh")).split()
        assert sorted(short) == ["10.0.0.2", "10.0.0.3"]
        srv = await dig(addr, "+tcp", "+short", "_http._tcp.web.service.mesh", "SRV")
        assert sorted(srv.splitlines()) == ["1 1 8080 n1.node.mesh.", "1 1 8080 n2.node.mesh."]
        upper = await dig(addr, "WEB.SERVICE.MESH")
        assert ";WEB.SERVICE.MESH.\t\tIN\tA" in upper
        assert "status: NOERROR" in upper
        assert "flags: qr aa rd;" in upper


@needs_dig
async def test_dig_nxdomain_nodata_and_edns() -> None:
    async with dns_server() as (_server, addr):
        nx = await dig(addr, "nope.service.mesh")
        assert "status: NXDOMAIN" in nx
        assert "AUTHORITY: 1" in nx
        assert "SOA\tn0.node.mesh. hostmaster.mesh. 1 " in nx
        assert "EDNS: version: 0, flags:; udp: 1232" in nx
        nodata = await dig(addr, "web.service.mesh", "TXT")
        assert "status: NOERROR" in nodata
        assert "ANSWER: 0, AUTHORITY: 1" in nodata
        refused = await dig(addr, "example.com")
        assert "status: REFUSED" in refused


@needs_dig
async def test_dig_falls_back_to_tcp_on_truncation() -> None:
    async with dns_server() as (server, addr):
        out = await dig(addr, "+noedns", "big.service.mesh")
        assert "Truncated, retrying in TCP mode" in out
        assert "ANSWER: 300," in out
        ignored = await dig(addr, "+bufsize=1232", "+ignore", "big.service.mesh")
        assert " tc " in ignored.split("flags:")[1].split(";")[0] + " "
        stats = server.statistics()
        assert stats.tcp_queries == 1
        assert stats.answers.truncated == 2


def test_containers_get_this_nodes_dns_first_then_the_hosts_resolvers() -> None:
    host_conf = ("# generated\nsearch example.org\nnameserver 10.0.0.2\n"
                 "nameserver 10.0.0.3\nnameserver 10.0.0.4\noptions ndots:2\n")
    assert container_resolvers(Addr("127.0.0.5", 53), "127.0.0.5", host_conf) == [
        "127.0.0.5", "10.0.0.2", "10.0.0.3"]  # at most three are used
    # A wildcard bind: containers get the node's advertised address.
    assert container_resolvers(Addr("0.0.0.0", 53), "192.0.2.7", "nameserver 192.0.2.7\n") == [
        "192.0.2.7"]
    # Not on port 53: a resolv.conf cannot say another port; Docker's default stays.
    assert container_resolvers(Addr("127.0.0.5", 8600), "127.0.0.5", host_conf) == []
