"""Benchmark: UDP queries/s one core answers, and latency, cached and uncached.

A ``DnsServer`` (the real trio adapter and responder) runs in a child process pinned
to one CPU, answering from a synthetic catalogue of 100 services with 3 endpoints
each on 10 nodes. The load generator runs in this process, pinned to another CPU:
plain non-blocking UDP sockets on 127.0.0.1 and a query mix of 40% A, 30% SRV and
30% NXDOMAIN over the 100 services.

For each mode (``cached``: the wire-form answer cache on; ``uncached``: every query
parsed and built with dnslib) it measures:

1. saturation: a closed loop with ``--window`` queries outstanding for
   ``--seconds``: answered queries/s, and the server's CPU time per query (from the
   child's own CPU clock, so it does not depend on how busy the generator or the
   rest of the machine is);
2. half rate: an open loop paced at half the saturation rate: p50/p99 latency from
   send to receive, as a client sees it.

Usage::

    python bench/dns.py                  # both modes, 5 s per phase (~25 s)
    python bench/dns.py --seconds 2 --modes cached
    python bench/dns.py --dnsperf        # also run dnsperf against the server, if installed

Freshness, on real ``meshd`` processes (``tests/daemons.py``) with the process driver,
each node's DNS server on its own address (``--dns-bind IP:0``), 127.0.7.10 and up
(``--first-ip``), gossip profile lan; the service ``web`` runs a Python HTTP server
per replica with an HTTP health check. Every DNS server is asked directly (UDP,
dnslib) every 20 ms::

    python bench/dns.py freshness --nodes 5 --rounds 20
    python bench/dns.py appear --nodes 5 --rounds 20

``freshness``: ``web`` is global (one replica per node). Each round SIGKILLs a random
node's meshd and then its workloads, and measures when each survivor stops answering
``web.service.mesh`` A with the dead node's address, next to when it logged
``member_dead`` for it; then restarts the node and waits for its new replica to be in
every node's answers. ``appear``: ``web`` has one replica per node; each round scales
it up by one and measures, from the new replica's ``workload_health ...
health=healthy`` log line, when each node's SRV answer holds it; then scales back.
Every daemon and every workload is killed by PID on the way out (``--keep`` keeps
the data dirs and logs).

Catalogue maintenance, in process (no sockets)::

    python bench/dns.py catalog --endpoints 300,3000,9000

``catalog``: a replica state with N endpoints (N/3 services of 3 replicas, one port
each, on N/30 nodes, at least 10) and a responder whose cache holds the A, AAAA and
SRV answers of every service and the A answer of every node. For one allocation's
health change and for one member's death it times bringing the catalogue up to
date the way meshd did before (``service_endpoints`` over every allocation, then
``CatalogBuilder.build``; the whole answer cache was dropped) and the way it does
now (``CatalogFeed.refresh``: the changes since the last index, the membership
difference, ``CatalogBuilder.update``), and counts the cached answers that survive.

Each prints figures and, last, one JSON line with every figure and the load average
during the run. Never passes or fails on a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace as dataclasses_replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from daemons import Cluster, Daemon, DaemonError, LogFollower  # noqa: E402
from dnslib import QTYPE, DNSHeader, DNSQuestion, DNSRecord  # noqa: E402
from membership import (  # noqa: E402
    LoadSampler,
    fmt,
    machine,
    print_json,
    summary,
    terminate_as_interrupt,
)

SERVICES = 100
ENDPOINTS_PER_SERVICE = 3
NODES = 10


def _pin(cpu: int) -> int | None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    chosen = cpus[cpu % len(cpus)]
    os.sched_setaffinity(0, {chosen})
    return chosen


# --- the server process --------------------------------------------------------------


def _server_main(conn: Connection, cache: bool, cpu: int) -> None:
    import trio

    from mesh.dns.adapter import DnsServer, bind_dns_sockets
    from mesh.dns.config import DnsConfig
    from mesh.dns.fakes import synthetic_catalog

    _pin(cpu)
    config = DnsConfig.local()
    if not cache:
        config = DnsConfig(bind_host="127.0.0.1", bind_port=0, cache_max_entries=0)

    async def main() -> None:
        catalog = synthetic_catalog(SERVICES, ENDPOINTS_PER_SERVICE, NODES)
        sockets = await bind_dns_sockets(config)
        with sockets:
            server = DnsServer(config, catalog, random.Random(1))
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(server.serve, sockets)
                conn.send(addr.port)
                while True:  # commands: "cpu" -> (cpu seconds, answers), "stop"
                    command = await trio.to_thread.run_sync(conn.recv)
                    if command == "stop":
                        s = server.statistics()
                        conn.send({"udp_in": s.udp_in, "udp_out": s.udp_out,
                                   "cache_hits": s.answers.cache_hits,
                                   "cache_misses": s.answers.cache_misses,
                                   "send_failures": s.send_failures})
                        nursery.cancel_scope.cancel()
                        return
                    s = server.statistics()
                    conn.send((time.process_time(), s.udp_out, s.latency_counts))

    trio.run(main)


# --- the load generator --------------------------------------------------------------


def _queries() -> list[bytes]:
    """The query mix; the id (bytes 0-1) is overwritten per send."""
    return [bytes(DNSRecord(DNSHeader(id=0), q=DNSQuestion(name, getattr(QTYPE, qtype))).pack())
            for name, qtype in _mix()]


def _mix() -> list[tuple[str, str]]:
    """1000 questions: 40% A and 30% SRV of the 100 services, 30% NXDOMAIN."""
    rng = random.Random(7)
    out = []
    for i in range(1000):
        service = f"svc{rng.randrange(SERVICES)}"
        roll = i % 10
        if roll < 4:
            out.append((f"{service}.service.mesh", "A"))
        elif roll < 7:
            out.append((f"{service}.service.mesh", "SRV"))
        else:
            out.append((f"missing{rng.randrange(SERVICES)}.service.mesh", "A"))
    rng.shuffle(out)
    return out


class Load:
    """Closed- or open-loop UDP load with per-query latency, on several sockets."""

    def __init__(self, port: int, sockets: int = 4) -> None:
        self.port = port
        self.queries = _queries()
        self.socks = []
        for _ in range(sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            self.socks.append(s)
        self.poll = select.epoll()
        for s in self.socks:
            self.poll.register(s.fileno(), select.EPOLLIN)
        self.by_fd = {s.fileno(): s for s in self.socks}
        self.sent_at: dict[int, float] = {}
        self.next_id = 0
        self.k = 0

    def send_one(self) -> bool:
        qid = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        if qid in self.sent_at:  # id still outstanding (a loss): count it as lost
            del self.sent_at[qid]
        q = self.queries[self.k % len(self.queries)]
        self.k += 1
        data = qid.to_bytes(2, "big") + q[2:]
        # Stamp before sending: the server may run (and answer) before send() returns.
        started = time.perf_counter()
        try:
            self.socks[qid % len(self.socks)].send(data)
        except BlockingIOError:
            return False
        self.sent_at[qid] = started
        return True

    def drain(self, timeout_s: float, latencies: list[float] | None) -> int:
        got = 0
        for fd, _ in self.poll.poll(timeout_s):
            sock = self.by_fd[fd]
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                started = self.sent_at.pop(int.from_bytes(data[:2], "big"), None)
                if started is None:
                    continue
                got += 1
                if latencies is not None:
                    latencies.append(time.perf_counter() - started)
        return got

    def closed_loop(self, seconds: float, window: int) -> tuple[int, float]:
        """Keep ``window`` queries outstanding; returns (answers, elapsed)."""
        self.sent_at.clear()
        for _ in range(window):
            self.send_one()
        answered = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while (now := time.perf_counter()) < deadline:
            got = self.drain(0.05, None)
            answered += got
            for _ in range(got):
                self.send_one()
            if got == 0 and len(self.sent_at) < window:  # refill after losses
                for _ in range(window - len(self.sent_at)):
                    self.send_one()
        elapsed = now - t0
        while self.sent_at and self.drain(0.2, None):
            pass
        return answered, elapsed

    def open_loop(self, seconds: float, rate: float) -> tuple[list[float], int, int]:
        """Send at ``rate`` queries/s; returns (latencies, sent, answered)."""
        self.sent_at.clear()
        latencies: list[float] = []
        interval = 1.0 / rate
        t0 = time.perf_counter()
        sent = 0
        deadline = t0 + seconds
        while (now := time.perf_counter()) < deadline:
            due = int((now - t0) / interval) + 1
            while sent < due:
                self.send_one()
                sent += 1
            self.drain(0, latencies)
        end = time.perf_counter() + 0.5
        while self.sent_at and time.perf_counter() < end:
            self.drain(0.05, latencies)
        return latencies, sent, len(latencies)


def _bucket_quantile(counts: list[int], q: float) -> float:
    from mesh.dns.metrics import LATENCY_BUCKETS_S

    total = sum(counts)
    seen = 0
    for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
        seen += count
        if total and seen >= q * total:
            return bound
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_mode(mode: str, seconds: float, window: int, dnsperf: bool) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(child, mode == "cached", 0), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        _pin(1)
        load = Load(port)
        load.closed_loop(1.0, window)  # warm up (and fill the cache)
        parent.send("cpu")
        cpu0, out0, _ = parent.recv()
        answered, elapsed = load.closed_loop(seconds, window)
        parent.send("cpu")
        cpu1, out1, hist0 = parent.recv()
        qps = answered / elapsed
        cpu_us = (cpu1 - cpu0) / max(1, out1 - out0) * 1e6
        latencies, sent, got = load.open_loop(seconds, qps / 2)
        parent.send("cpu")
        _, _, hist1 = parent.recv()
        server_hist = [b - a for a, b in zip(hist0, hist1, strict=True)]
        figures = {
            "qps": round(qps),
            "server_cpu_us_per_query": round(cpu_us, 2),
            "qps_per_server_cpu_second": round(1e6 / cpu_us) if cpu_us else 0,
            "half_rate_qps": round(qps / 2),
            "half_rate_p50_ms": round(_pct(latencies, 0.50) * 1e3, 3),
            "half_rate_p99_ms": round(_pct(latencies, 0.99) * 1e3, 3),
            "half_rate_mean_ms": round(statistics.fmean(latencies) * 1e3, 3)
            if latencies else float("nan"),
            "half_rate_lost": sent - got,
            # the server's own time per answer (read to sent), from its histogram:
            # the upper bound of the bucket holding the quantile
            "half_rate_server_p50_ms": _bucket_quantile(server_hist, 0.50) * 1e3,
            "half_rate_server_p99_ms": _bucket_quantile(server_hist, 0.99) * 1e3,
        }
        if dnsperf:
            parent.send("cpu")
            cpu0, out0, _ = parent.recv()
            measured = _dnsperf(port, seconds)
            parent.send("cpu")
            cpu1, out1, _ = parent.recv()
            if measured:
                measured["dnsperf_server_cpu_us_per_query"] = round(
                    (cpu1 - cpu0) / max(1, out1 - out0) * 1e6, 2)
                half = _dnsperf(port, seconds, max(1, int(measured["dnsperf_qps"]) // 2))
                measured.update({k.replace("dnsperf_", "dnsperf_half_rate_"): v
                                 for k, v in half.items()})
            figures.update(measured)
        parent.send("stop")
        figures.update({f"server_{k}": v for k, v in parent.recv().items()})
        return figures
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()


def _dnsperf(port: int, seconds: float, max_qps: int = 1_000_000) -> dict[str, float]:
    """Run dnsperf (4 clients, 200 outstanding, at most ``max_qps``) with the mix.

    Below saturation (``max_qps`` given) it runs verbose, which prints every answer's
    latency as measured by dnsperf, and the percentiles come from those lines."""
    exe = shutil.which("dnsperf")
    if exe is None:
        print("dnsperf not installed (apt-get install dnsperf); skipping it", file=sys.stderr)
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("".join(f"{name} {qtype}\n" for name, qtype in _mix()))
        f.flush()
        verbose = ["-v"] if max_qps < 1_000_000 else []
        done = subprocess.run([exe, "-s", "127.0.0.1", "-p", str(port), "-d", f.name,
                               "-l", str(seconds), "-c", "4", "-Q", str(max_qps), "-q", "200",
                               *verbose],
                              capture_output=True, text=True, check=False)
    figures: dict[str, float] = {}
    latencies: list[float] = []
    for line in done.stdout.splitlines():
        text = line.strip()
        if text.startswith("> "):
            latencies.append(float(text.rsplit(None, 1)[1]))
        elif text.startswith("Queries per second:"):
            figures["dnsperf_qps"] = round(float(text.split(":")[1]))
        elif text.startswith("Average Latency (s):"):
            figures["dnsperf_avg_latency_ms"] = round(
                float(text.split(":")[1].split()[0]) * 1e3, 3)
        elif text.startswith("Latency StdDev (s):"):
            figures["dnsperf_latency_stddev_ms"] = round(float(text.split(":")[1]) * 1e3, 3)
        elif text.startswith("Queries lost:"):
            figures["dnsperf_lost"] = int(text.split(":")[1].split()[0])
    if latencies:
        for name, q in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999)):
            figures[f"dnsperf_{name}_ms"] = round(_pct(latencies, q) * 1e3, 3)
    return figures


def _dnsmasq_yardstick(seconds: float) -> dict[str, float]:
    """Serve the same records with dnsmasq (pinned to the server's CPU) and measure it
    with dnsperf: the issue's yardstick for QPS and CPU per query."""
    exe, perf = shutil.which("dnsmasq"), shutil.which("dnsperf")
    if exe is None or perf is None:
        print("dnsmasq or dnsperf not installed (apt-get install dnsmasq-base dnsperf); "
              "skipping the yardstick", file=sys.stderr)
        return {}
    from mesh.dns.fakes import synthetic_catalog

    catalog = synthetic_catalog(SERVICES, ENDPOINTS_PER_SERVICE, NODES)
    with tempfile.TemporaryDirectory() as tmp:
        hosts = Path(tmp, "hosts")
        conf = Path(tmp, "dnsmasq.conf")
        host_lines, srv_lines = [], []
        for ep in catalog.endpoints:
            host_lines.append(f"{ep.ip} {ep.service}.service.mesh")
            srv_lines.append(f"srv-host={ep.service}.service.mesh,{ep.node}.node.mesh,"
                             f"{ep.port},1,1")
        for node in catalog.nodes:
            host_lines.append(f"{node.ips[0]} {node.name}.node.mesh")
        hosts.write_text("\n".join(sorted(set(host_lines))) + "\n")
        conf.write_text("\n".join(sorted(set(srv_lines))) + "\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen([exe, "-k", f"--port={port}", "--listen-address=127.0.0.1",
                                 "--bind-interfaces", "--no-hosts", f"--addn-hosts={hosts}",
                                 f"--conf-file={conf}", "--no-resolv", "--local=/mesh/",
                                 "--pid-file=", "--user=root", "--cache-size=0"],
                                stderr=subprocess.DEVNULL)
        try:
            cpus = sorted(os.sched_getaffinity(0) | os.sched_getaffinity(proc.pid))
            os.sched_setaffinity(proc.pid, {cpus[0]})
            time.sleep(0.5)  # dnsmasq has no readiness signal; a bench, not a test
            tick = os.sysconf("SC_CLK_TCK")

            def cpu_s() -> float:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / tick

            before = cpu_s()
            figures = _dnsperf(port, seconds)
            used = cpu_s() - before
            half = _dnsperf(port, seconds, max(1, int(figures.get("dnsperf_qps", 2)) // 2))
        finally:
            proc.terminate()
            proc.wait(timeout=5)
    if "dnsperf_qps" not in figures:
        return {}
    queries = figures["dnsperf_qps"] * seconds
    return {"dnsmasq_qps": figures["dnsperf_qps"],
            "dnsmasq_cpu_us_per_query": round(used / max(1.0, queries) * 1e6, 2),
            "dnsmasq_avg_latency_ms": figures.get("dnsperf_avg_latency_ms", float("nan")),
            "dnsmasq_half_rate_qps": half.get("dnsperf_qps", float("nan")),
            "dnsmasq_half_rate_avg_latency_ms": half.get("dnsperf_avg_latency_ms",
                                                         float("nan")),
            "dnsmasq_half_rate_p99_ms": half.get("dnsperf_p99_ms", float("nan"))}


# --- freshness and appear: real meshd clusters running workloads ---------------------

SERVICE = "web"
QNAME = f"{SERVICE}.service.mesh"
CLUSTER_TIMEOUT_S = 120.0
"""Forming the cluster, converging a service, a restarted node's replica healthy again
(a loaded 2-core machine starts Python slowly)."""
ROUND_TIMEOUT_S = 30.0
"""How long one round may wait for every live node's DNS to change."""
DNS_POLL_S = 0.02
"""Pause between two questions to the same DNS server."""
DNS_QUERY_TIMEOUT_S = 0.5
"""A question unanswered this long is counted lost and asked again."""
LINGER_S = 0.5
"""How long DNS is still watched after every node changed its answer, to catch one
that changes it back."""
WORKLOAD_MARK = "http.server --bind 127.0.7."
"""Part of the command line of every workload these benchmarks start: a process is
only killed if its command line has it (a stale PID may have been reused)."""


def _ips(first: int, count: int) -> list[str]:
    """``127.0.7.<first>`` ...: apart from the tests' ``127.0.0.x`` addresses."""
    if first < 1 or first + count - 1 > 254:
        raise SystemExit(f"--first-ip {first} with {count} nodes leaves 127.0.7.1-254")
    return [f"127.0.7.{i}" for i in range(first, first + count)]


def _web_spec(global_mode: bool, replicas: int) -> dict[str, Any]:
    """The ``web`` service: a Python HTTP server per replica, checked over HTTP."""
    spec: dict[str, Any] = {
        "name": SERVICE, "driver": "process",
        "command": ["sh", "-c", f"exec {sys.executable} -m http.server --bind $MESH_HOST $PORT"],
        "ports": [{"name": "http"}], "health": {"http": "/", "interval": "1s"},
    }
    if global_mode:
        spec["mode"] = "global"
    else:
        spec["replicas"] = replicas
    return spec


def _meshctl(d: Daemon, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run([sys.executable, "-m", "mesh.node.cli", "--socket",
                           str(d.socket_path), *argv], capture_output=True, text=True,
                          timeout=CLUSTER_TIMEOUT_S + 30, check=False, env=env)


def _kill_workloads(daemons: Iterable[Daemon]) -> int:
    """SIGKILL the process group of every workload the daemons' data dirs name (they
    outlive meshd); returns how many were killed."""
    killed = 0
    for d in daemons:
        for state in (d.data_dir / "allocs").glob("*/workload.json"):
            try:
                pid = int(json.loads(state.read_text())["pid"])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if WORKLOAD_MARK.encode() in cmdline:
                    os.killpg(pid, signal.SIGKILL)
                    killed += 1
            except (OSError, ValueError, KeyError):
                pass
    return killed


def _dns_server(d: Daemon) -> tuple[str, int]:
    host, port = d.info()["dns"].rsplit(":", 1)
    return host, int(port)


Records = frozenset[Any]


class DnsWatch:
    """Asks every node's DNS server the same question every ``DNS_POLL_S`` over UDP
    (one socket per server, all in parallel) and keeps each answer with the
    wall-clock instant it arrived.

    Answers are sets: A addresses, or SRV ``(target, port)`` pairs; an NXDOMAIN is
    the empty set.
    """

    def __init__(self, servers: Mapping[str, tuple[str, int]], qtype: str) -> None:
        self.qtype = qtype
        self.query = DNSRecord.question(QNAME, qtype)
        self.socks: dict[str, socket.socket] = {}
        for name, addr in servers.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(addr)
            s.setblocking(False)
            self.socks[name] = s
        self.answers: dict[str, list[tuple[float, Records]]] = {n: [] for n in servers}
        self.lost = 0
        self._outstanding: dict[str, tuple[int, float]] = {}
        self._next_id = random.randrange(0x10000)

    def __enter__(self) -> DnsWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.socks.values():
            s.close()

    def _records(self, data: bytes) -> Records:
        reply = DNSRecord.parse(data)
        if self.qtype == "SRV":
            return frozenset((str(r.rdata.target).rstrip(".").lower(), r.rdata.port)
                             for r in reply.rr if r.rtype == QTYPE.SRV)
        return frozenset(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A)

    def _ask(self, now: float) -> None:
        for name, s in self.socks.items():
            pending = self._outstanding.get(name)
            if pending is not None and now - pending[1] < DNS_QUERY_TIMEOUT_S:
                continue
            if pending is not None:
                self.lost += 1
            self._next_id = (self._next_id + 1) & 0xFFFF
            self.query.header.id = self._next_id
            with contextlib.suppress(OSError):  # ECONNREFUSED from an earlier send
                s.send(self.query.pack())
            self._outstanding[name] = (self._next_id, now)

    def _receive(self, until: float) -> None:
        by_fd = {s.fileno(): name for name, s in self.socks.items()}
        while (left := until - time.monotonic()) > 0:
            ready, _, _ = select.select(list(by_fd), [], [], left)
            for fd in ready:
                name = by_fd[fd]
                try:
                    data = self.socks[name].recv(65_535)
                except OSError:
                    continue
                at = time.time()
                pending = self._outstanding.get(name)
                if pending is None or int.from_bytes(data[:2], "big") != pending[0]:
                    continue
                del self._outstanding[name]
                self.answers[name].append((at, self._records(data)))

    def watch(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Ask until ``done()`` (checked after every tick); False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            tick = time.monotonic()
            self._ask(tick)
            self._receive(tick + DNS_POLL_S)
            if done():
                return True
        return False

    def first(self, name: str, test: Callable[[Records], bool], after: float) -> float | None:
        """When ``name`` first answered (at or after ``after``) with records that pass
        ``test``."""
        return next((at for at, recs in self.answers[name] if at >= after and test(recs)),
                    None)

    def all_since(self, name: str, test: Callable[[Records], bool], after: float) -> bool:
        """True if ``name`` answered since ``after`` and every answer since passed."""
        recent = [recs for at, recs in self.answers[name] if at >= after]
        return bool(recent) and all(test(r) for r in recent)


def _wait_dns(cluster: Cluster, daemons: Sequence[Daemon], qtype: str,
              test: Callable[[Records], bool], what: str) -> None:
    """Wait until every daemon's DNS server answers with records that pass ``test``."""
    servers = {d.name: _dns_server(d) for d in daemons}
    with DnsWatch(servers, qtype) as w:
        t0 = time.time()
        if not w.watch(lambda: all(w.first(d.name, test, t0) for d in daemons),
                       CLUSTER_TIMEOUT_S):
            last = {n: sorted(a[-1][1]) if a else None for n, a in w.answers.items()}
            raise DaemonError(f"timed out waiting for {what}; last answers: {last}\n"
                              f"{cluster.describe()}")


@contextmanager
def workload_cluster(args: argparse.Namespace, spec: dict[str, Any]) -> Iterator[Cluster]:
    """``--nodes`` daemons with the process driver and DNS on their own address,
    running ``spec``; every daemon and workload is killed (by PID) on the way out."""
    base = Path(tempfile.mkdtemp(prefix="dnsb-", dir="/tmp"))
    cluster = Cluster(base, profile=args.profile)
    for i, ip in enumerate(_ips(args.first_ip, args.nodes)):
        cluster.add(f"n{i}", ip, extra_args=["--driver", "process", "--dns-bind", f"{ip}:0"])
    try:
        t0 = time.monotonic()
        cluster.start(timeout_s=CLUSTER_TIMEOUT_S)
        cluster.wait_formed(CLUSTER_TIMEOUT_S)
        path = base / "web.json"
        path.write_text(json.dumps(spec))
        done = _meshctl(cluster["n0"], "apply", "-f", str(path),
                        "--timeout", str(CLUSTER_TIMEOUT_S))
        if done.returncode != 0:
            raise DaemonError(f"meshctl apply failed: {done.stderr}\n{cluster.describe()}")
        print(f"{args.nodes} daemons ({args.profile} profile) on {cluster['n0'].ip}-"
              f"{list(cluster)[-1].ip}, service {SERVICE} running, in "
              f"{time.monotonic() - t0:.1f}s; data dirs and logs in {base}", flush=True)
        yield cluster
    finally:
        cluster.close()
        killed = _kill_workloads(cluster)
        print(f"stopped {len(cluster.daemons)} daemons and {killed} workloads", flush=True)
        if args.keep:
            print(f"kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _freshness_round(cluster: Cluster, victim: Daemon,
                     followers: Mapping[str, LogFollower]) -> dict[str, Any]:
    """SIGKILL ``victim`` (meshd, then its workloads) and watch the survivors' DNS and
    logs until each answers without its address and has logged ``member_dead``."""
    survivors = [d for d in cluster if d is not victim]
    servers = {d.name: _dns_server(d) for d in survivors}
    for f in followers.values():
        f.skip_to_end()
    dead_at: dict[str, float] = {}

    def without(recs: Records) -> bool:
        return victim.ip not in recs

    with DnsWatch(servers, "A") as w:
        t_kill = victim.kill()
        _kill_workloads([victim])

        def done() -> bool:
            for name in servers:
                for ev in followers[name].poll():
                    if ev.event == "member_dead" and ev.fields.get("peer") == victim.name:
                        dead_at.setdefault(name, ev.ts)
            return len(dead_at) == len(servers) and all(
                w.first(n, without, t_kill) for n in servers)

        finished = w.watch(done, ROUND_TIMEOUT_S)
        settled = time.time()
        w.watch(lambda: False, LINGER_S)
    drop = {n: w.first(n, without, t_kill) for n in servers}
    dns_s = {n: at - t_kill for n, at in drop.items() if at is not None}
    dead_s = {n: at - t_kill for n, at in dead_at.items()}
    lag = {n: dns_s[n] - dead_s[n] for n in servers if n in dns_s and n in dead_s}
    complete = len(dns_s) == len(servers) and len(dead_s) == len(servers)
    return {
        "victim": victim.name, "finished": finished and complete,
        "last_dns_s": round(max(dns_s.values()), 3) if complete else None,
        "last_dead_s": round(max(dead_s.values()), 3) if complete else None,
        "first_dns_s": round(min(dns_s.values()), 3) if dns_s else None,
        "lags_s": sorted(round(v, 3) for v in lag.values()),
        "dns_s": {n: round(v, 3) for n, v in sorted(dns_s.items())},
        "dead_s": {n: round(v, 3) for n, v in sorted(dead_s.items())},
        # answers with the dead address again after a node had dropped it
        "flaps": sum(not w.all_since(n, without, at) for n, at in drop.items()
                     if at is not None),
        "lost_queries": w.lost, "watched_s": round(settled - t_kill, 3),
    }


def cmd_freshness(args: argparse.Namespace) -> dict[str, Any]:
    """Each round SIGKILLs a node (meshd and its workloads) and watches every live
    node's DNS until none answers ``web.service.mesh`` with the dead node's address;
    then restarts the node and waits for its replica to be in every answer again."""
    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    with workload_cluster(args, _web_spec(True, 0)) as cluster:
        ips = {d.ip for d in cluster}

        def everyone(recs: Records) -> bool:
            return recs == ips

        _wait_dns(cluster, list(cluster), "A", everyone,
                  f"every node to answer {QNAME} with {sorted(ips)}")
        followers = {d.name: LogFollower(d.log_path) for d in cluster}
        for r in range(1, args.rounds + 1):
            victim = rng.choice(list(cluster))
            time.sleep(rng.uniform(0.5, 2.0))  # kills fall at random phases of probing
            row = {"round": r, **_freshness_round(cluster, victim, followers)}
            print(f"round {r:2d}: killed {victim.name}; member_dead on all survivors "
                  f"{_secs(row['last_dead_s'])}, last DNS without it {_secs(row['last_dns_s'])}"
                  f" (first {_secs(row['first_dns_s'])}; each node's DNS after its own "
                  f"member_dead: {row['lags_s']}; flaps {row['flaps']}, lost queries "
                  f"{row['lost_queries']})", flush=True)
            t0 = time.monotonic()
            victim.start(join=[d.addr for d in cluster if d is not victim],
                         timeout_s=CLUSTER_TIMEOUT_S)
            cluster.wait_formed(CLUSTER_TIMEOUT_S)
            _wait_dns(cluster, list(cluster), "A", everyone,
                      f"{victim.name}'s replica to be back in every node's answers")
            row["back_s"] = round(time.monotonic() - t0, 3)
            rounds.append(row)
    done = [r for r in rounds if r["finished"]]
    over = [r for r in rounds
            if not r["finished"] or r["last_dns_s"] > r["last_dead_s"] + 0.5]
    result = {"bench": "dns_freshness", "nodes": args.nodes, "rounds": args.rounds,
              "profile": args.profile, "seed": args.seed,
              "last_dns_s": summary([r["last_dns_s"] for r in done]),
              "last_dead_s": summary([r["last_dead_s"] for r in done]),
              "last_dns_minus_last_dead_s": summary(
                  [r["last_dns_s"] - r["last_dead_s"] for r in done]),
              "dns_after_own_member_dead_s": summary(
                  [lag for r in rounds for lag in r["lags_s"]]),
              "rounds_over_goal": len(over), "flaps": sum(r["flaps"] for r in rounds),
              "per_round": rounds}
    print(f"\nSIGKILL -> every survivor logged member_dead:        {fmt(result['last_dead_s'])}")
    print(f"SIGKILL -> last survivor's DNS without the dead node: {fmt(result['last_dns_s'])}")
    print(f"last DNS drop - last member_dead, per round:          "
          f"{fmt(result['last_dns_minus_last_dead_s'])}")
    print(f"each survivor's DNS drop after its own member_dead:   "
          f"{fmt(result['dns_after_own_member_dead_s'])}")
    print(f"rounds where the last DNS drop came > 0.5 s after the last member_dead (or "
          f"never): {len(over)} of {len(rounds)}; flaps: {result['flaps']}")
    return result


class _NewReplica:
    """Watches for the allocation a scale-up adds: its node and port (from
    ``service_ps``) and when its node logged it healthy."""

    def __init__(self, contact: Daemon, followers: Mapping[str, LogFollower]) -> None:
        self.contact = contact
        self.followers = followers
        self.before = {a["id"] for a in contact.api("service_ps", {"service": SERVICE})}
        for f in followers.values():
            f.skip_to_end()
        self.healthy_at: dict[str, float] = {}
        self.alloc: dict[str, Any] = {}
        self._asked = 0.0

    def want(self) -> tuple[str, int] | None:
        """The SRV ``(target, port)`` of the new replica, once it is known."""
        if not self.alloc:
            return None
        return f"{self.alloc['node']}.node.mesh", int(self.alloc["port"])

    def healthy(self) -> float | None:
        """When its node logged ``workload_health ... health=healthy``, once it has."""
        return self.healthy_at.get(self.alloc["id"]) if self.alloc else None

    def poll(self) -> None:
        for f in self.followers.values():
            for ev in f.poll():
                if ev.event == "workload_health" and ev.fields.get("health") == "healthy":
                    self.healthy_at.setdefault(ev.fields.get("alloc", ""), ev.ts)
        if not self.alloc and time.monotonic() - self._asked > 0.1:
            self._asked = time.monotonic()
            for a in self.contact.api("service_ps", {"service": SERVICE, "stale": True}):
                if a["id"] not in self.before and a["desired"] == "run" and a["ports"]:
                    self.alloc = {"id": a["id"], "node": a["node"], "port": a["ports"]["http"]}


def _appear_round(contact: Daemon, replicas: int, servers: Mapping[str, tuple[str, int]],
                  followers: Mapping[str, LogFollower]) -> dict[str, Any]:
    """Scale up by one through ``contact`` and watch every node's DNS until it answers
    with the new replica."""
    new = _NewReplica(contact, followers)

    def has_new(recs: Records) -> bool:
        return new.want() in recs

    with DnsWatch(servers, "SRV") as w:

        def done() -> bool:
            new.poll()
            return new.healthy() is not None and all(w.first(n, has_new, 0) for n in servers)

        t_scale = time.time()
        contact.api("service_scale", {"name": SERVICE, "replicas": replicas + 1})
        finished = w.watch(done, ROUND_TIMEOUT_S)
    row: dict[str, Any] = {"finished": finished, **new.alloc, "lost_queries": w.lost,
                           "scale_to_healthy_s": None, "last_seen_s": None,
                           "first_seen_s": None}
    t_healthy = new.healthy()
    if finished and t_healthy is not None:
        seen = {n: w.first(n, has_new, 0) for n in servers}
        after = {n: at - t_healthy for n, at in seen.items() if at is not None}
        row.update(scale_to_healthy_s=round(t_healthy - t_scale, 3),
                   last_seen_s=round(max(after.values()), 3),
                   first_seen_s=round(min(after.values()), 3),
                   seen_s={n: round(v, 3) for n, v in sorted(after.items())})
    return row


def cmd_appear(args: argparse.Namespace) -> dict[str, Any]:
    """Each round scales ``web`` up by one and watches every node's DNS until it
    answers with the new replica (SRV: node and port), then scales back."""
    rng = random.Random(args.seed)
    base: int = args.nodes
    rounds: list[dict[str, Any]] = []

    def steady(recs: Records) -> bool:
        return len(recs) == base

    with workload_cluster(args, _web_spec(False, base)) as cluster:
        daemons = list(cluster)
        _wait_dns(cluster, daemons, "SRV", steady,
                  f"every node to answer {QNAME} SRV with {base} endpoints")
        followers = {d.name: LogFollower(d.log_path) for d in cluster}
        servers = {d.name: _dns_server(d) for d in daemons}
        for r in range(1, args.rounds + 1):
            contact = rng.choice(daemons)
            row = {"round": r, **_appear_round(contact, base, servers, followers)}
            rounds.append(row)
            print(f"round {r:2d}: new replica {row.get('id')} on {row.get('node')} healthy "
                  f"{_secs(row['scale_to_healthy_s'])} after the scale; in every node's DNS "
                  f"{_secs(row['last_seen_s'])} after healthy (first node "
                  f"{_secs(row['first_seen_s'])}; lost queries {row['lost_queries']})",
                  flush=True)
            contact.api("service_scale", {"name": SERVICE, "replicas": base})
            _wait_dns(cluster, daemons, "SRV", steady,
                      f"every node to answer {QNAME} SRV with {base} endpoints again")
    done = [r["last_seen_s"] for r in rounds if r["last_seen_s"] is not None]
    over = [r for r in rounds if r["last_seen_s"] is None or r["last_seen_s"] > 1.0]
    result = {"bench": "dns_appear", "nodes": args.nodes, "rounds": args.rounds,
              "profile": args.profile, "seed": args.seed,
              "healthy_to_last_node_s": summary(done),
              "healthy_to_first_node_s": summary(
                  [r["first_seen_s"] for r in rounds if r["first_seen_s"] is not None]),
              "scale_to_healthy_s": summary(
                  [r["scale_to_healthy_s"] for r in rounds
                   if r["scale_to_healthy_s"] is not None]),
              "rounds_over_goal": len(over), "per_round": rounds}
    print(f"\nscale -> new replica logged healthy:                  "
          f"{fmt(result['scale_to_healthy_s'])}")
    print(f"healthy -> first node answers with it:                {fmt(result['healthy_to_first_node_s'])}")
    print(f"healthy -> every node answers with it:                {fmt(result['healthy_to_last_node_s'])}")
    print(f"rounds over 1 s (or never): {len(over)} of {len(rounds)}")
    return result


# --- catalogue maintenance ---------------------------------------------------------


def _catalog_state(endpoints: int) -> tuple[Any, list[Any], list[bytes]]:
    """A replica state with ``endpoints`` ready endpoints, its members and the
    questions that fill the cache (see the module docstring)."""
    from mesh.dns.fakes import member
    from mesh.node.spec import PortSpec, WorkloadSpec
    from mesh.raft.messages import Entry
    from mesh.raft.state import AllocPlan, AllocReport, MeshState, Report, RunOp, ServicePut
    from mesh.types import NodeId, ServiceId

    state = MeshState()

    def apply(cmd: Any) -> None:
        result = state.apply(Entry(1, state.applied_index + 1, cmd.encode()))
        assert result is not None
        assert result.ok, result

    nodes = max(10, endpoints // 30)
    members = [member(f"n{j}", f"10.{j // 250}.{j % 250}.1") for j in range(nodes)]
    ops = []
    for i in range(endpoints // 3):
        name = ServiceId(f"svc{i}")
        apply(ServicePut(name, WorkloadSpec(name=name, command=("srv",), replicas=3,
                                            ports=(PortSpec("http"),), tags=("v1",)).encode()))
        ops += [RunOp(name, slot, NodeId(f"n{(3 * i + slot) % nodes}"), 1) for slot in range(3)]
    for k in range(0, len(ops), 4096):
        apply(AllocPlan(tuple(ops[k:k + 4096])))
    by_node: dict[str, list[Any]] = {}
    for a in state.allocs():
        by_node.setdefault(a.node, []).append(
            Report(a.id, "running", "healthy", (("http", 20000 + len(by_node.get(a.node, ()))),)))
    for node, reports in by_node.items():
        apply(AllocReport(NodeId(node), tuple(reports)))
    questions = [query
                 for i in range(endpoints // 3) for qtype in ("A", "AAAA", "SRV")
                 for query in [_question(f"svc{i}.service.mesh", qtype)]]
    questions += [_question(f"n{j}.node.mesh", "A") for j in range(nodes)]
    return state, members, questions


def _question(name: str, qtype: str) -> bytes:
    return bytes(DNSRecord(DNSHeader(id=1), q=DNSQuestion(name, getattr(QTYPE, qtype))).pack())


def _catalog_round(endpoints: int, repeat: int) -> dict[str, Any]:
    from mesh.dns.answer import Responder
    from mesh.dns.catalog import CatalogBuilder
    from mesh.dns.config import DnsConfig
    from mesh.gossip.messages import Status
    from mesh.node.services import CatalogFeed, service_endpoints
    from mesh.raft.messages import Entry
    from mesh.raft.state import AllocReport, Report

    state, members, questions = _catalog_state(endpoints)
    target = state.allocs()[len(state.allocs()) // 2]
    victim = members[len(members) // 2]
    dead = [dataclasses_replace(m, status=Status.DEAD) if m is victim else m for m in members]

    def flip(i: int) -> None:
        health = "unhealthy" if i % 2 == 0 else "healthy"
        report = Report(target.id, "running", health, target.ports)
        state.apply(Entry(1, state.applied_index + 1,
                          AllocReport(target.node, (report,)).encode()))

    def timed(fn: Callable[..., Any], *args: Any) -> float:
        started = time.perf_counter()
        fn(*args)
        return time.perf_counter() - started

    def full(view: list[Any]) -> Any:
        return builder.build(view, service_endpoints(state, view, cache))

    out: dict[str, Any] = {"endpoints": endpoints, "nodes": len(members),
                           "cached_answers": len(questions)}
    # before: every change recomputed every endpoint and rebuilt the catalogue
    builder = CatalogBuilder(members[0].node)
    cache: dict[Any, Any] = {}
    full(members)
    health_s, death_s = [], []
    for i in range(repeat):
        flip(i)
        health_s.append(timed(full, members))
        death_s.append(timed(full, dead))
        full(members)  # it comes back (not timed)
    out["full_health_ms"] = round(statistics.median(health_s) * 1e3, 3)
    out["full_death_ms"] = round(statistics.median(death_s) * 1e3, 3)
    # now: the changes since the last refresh, applied in place
    feed = CatalogFeed(CatalogBuilder(members[0].node))
    feed.refresh(state, members)
    health_s, death_s = [], []
    for i in range(max(repeat, 20)):
        flip(i)
        health_s.append(timed(feed.refresh, state, members))
        death_s.append(timed(feed.refresh, state, dead))
        feed.refresh(state, members)
    out["incremental_health_ms"] = round(statistics.median(health_s) * 1e3, 3)
    out["incremental_death_ms"] = round(statistics.median(death_s) * 1e3, 3)
    assert feed.rebuilds == 1, "the bench must measure incremental refreshes"
    # cached answers that survive one change of each kind (before, none did)
    for kind in ("health", "death"):
        responder = Responder(DnsConfig(), random.Random(1))
        catalog = feed.refresh(state, members)
        for q in questions:
            responder.respond(q, catalog)
        out[f"cached_before_{kind}"] = responder.statistics().cache_entries
        if kind == "health":
            flip(0)
        responder.set_catalog(feed.refresh(state, members if kind == "health" else dead))
        out[f"kept_after_{kind}"] = responder.statistics().cache_entries
        if kind == "health":
            flip(1)
    return out


def cmd_catalog(args: argparse.Namespace) -> dict[str, Any]:
    """Catalogue maintenance per change, full rebuild vs incremental (module docstring)."""
    rows = []
    print(f"{'endpoints':>9} {'nodes':>5} | {'alloc health change':^27} | "
          f"{'member death':^27} | {'cached answers kept':^27}")
    print(f"{'':>9} {'':>5} | {'full ms':>8} {'incr ms':>8} {'x':>8} | "
          f"{'full ms':>8} {'incr ms':>8} {'x':>8} | {'cached':>8} {'health':>8} {'death':>8}")
    for n in (int(x) for x in args.endpoints.split(",")):
        r = _catalog_round(n, args.repeat)
        rows.append(r)
        print(f"{n:>9} {r['nodes']:>5} | {r['full_health_ms']:>8} "
              f"{r['incremental_health_ms']:>8} "
              f"{r['full_health_ms'] / r['incremental_health_ms']:>7.0f}x | "
              f"{r['full_death_ms']:>8} {r['incremental_death_ms']:>8} "
              f"{r['full_death_ms'] / r['incremental_death_ms']:>7.0f}x | "
              f"{r['cached_before_health']:>8} {r['kept_after_health']:>8} "
              f"{r['kept_after_death']:>8}", flush=True)
    print("full: service_endpoints + CatalogBuilder.build, what every change cost before "
          "(and dropped the whole cache); now only at start, after compaction or a snapshot "
          "restore. incr: CatalogFeed.refresh. Medians; 'cached answers kept' are those "
          "still cached after the change")
    return {"bench": "dns_catalog", "repeat": args.repeat, "rows": rows}


# --- command line ------------------------------------------------------------------


def cmd_qps(args: argparse.Namespace) -> dict[str, Any]:
    """Queries/s and latency of one server core (the module docstring)."""
    results = {}
    print(f"{'mode':<9} {'qps':>8} {'cpu us/q':>9} {'q/cpu-s':>8} {'half-rate':>10} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'lost':>5} {'server p50/p99 ms':>18}")
    for mode in args.modes.split(","):
        r = run_mode(mode, args.seconds, args.window, args.dnsperf)
        results[mode] = r
        print(f"{mode:<9} {r['qps']:>8} {r['server_cpu_us_per_query']:>9} "
              f"{r['qps_per_server_cpu_second']:>8} {r['half_rate_qps']:>10} "
              f"{r['half_rate_p50_ms']:>7} {r['half_rate_p99_ms']:>7} "
              f"{r['half_rate_lost']:>5} "
              f"{'<=' + str(r['half_rate_server_p50_ms']):>9}/<={r['half_rate_server_p99_ms']}")
        if "dnsperf_qps" in r:
            print(f"{'':<9} dnsperf: {r['dnsperf_qps']} qps, "
                  f"{r.get('dnsperf_server_cpu_us_per_query')} server cpu us/q, "
                  f"avg {r.get('dnsperf_avg_latency_ms')} ms, "
                  f"lost {r.get('dnsperf_lost')}; at half rate "
                  f"{r.get('dnsperf_half_rate_qps')} qps: avg "
                  f"{r.get('dnsperf_half_rate_avg_latency_ms')} ms, p50 "
                  f"{r.get('dnsperf_half_rate_p50_ms')} ms, p99 "
                  f"{r.get('dnsperf_half_rate_p99_ms')} ms, p99.9 "
                  f"{r.get('dnsperf_half_rate_p999_ms')} ms")
    if args.yardstick:
        y = _dnsmasq_yardstick(args.seconds)
        if y:
            results["dnsmasq"] = y
            print(f"dnsmasq   dnsperf: {y['dnsmasq_qps']} qps, {y['dnsmasq_cpu_us_per_query']} "
                  f"cpu us/q, avg {y['dnsmasq_avg_latency_ms']} ms; at half rate "
                  f"{y['dnsmasq_half_rate_qps']} qps: avg "
                  f"{y['dnsmasq_half_rate_avg_latency_ms']} ms, p99 "
                  f"{y['dnsmasq_half_rate_p99_ms']} ms")
    return {"bench": "dns", "services": SERVICES, "endpoints": SERVICES * ENDPOINTS_PER_SERVICE,
            "seconds": args.seconds, "window": args.window, "results": results}


def build_parser() -> argparse.ArgumentParser:
    """Options of the default benchmark (queries/s), and the subcommands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--window", type=int, default=64,
                        help="queries outstanding in the closed loop")
    parser.add_argument("--modes", default="cached,uncached")
    parser.add_argument("--dnsperf", action="store_true",
                        help="also measure with dnsperf (Debian package dnsperf)")
    parser.add_argument("--yardstick", action="store_true",
                        help="also measure dnsmasq serving the same records with dnsperf "
                             "(Debian packages dnsmasq-base, dnsperf)")
    parser.set_defaults(func=cmd_qps)
    sub = parser.add_subparsers(dest="command", help="without one: queries/s and latency "
                                "of one server core, with the options above")
    p = sub.add_parser("catalog", help="catalogue update per change: full vs incremental")
    p.set_defaults(func=cmd_catalog)
    p.add_argument("--endpoints", default="300,3000,9000",
                   help="comma-separated catalogue sizes (default 300,3000,9000)")
    p.add_argument("--repeat", type=int, default=7,
                   help="changes timed per size and path (median reported; default 7)")
    for name, func, what in (
            ("freshness", cmd_freshness, "SIGKILL a node -> every live node's DNS drops it"),
            ("appear", cmd_appear, "replica healthy -> every node's DNS answers with it")):
        p = sub.add_parser(name, help=what)
        p.set_defaults(func=func)
        p.add_argument("--nodes", type=int, default=5)
        p.add_argument("--rounds", type=int, default=20)
        p.add_argument("--first-ip", type=int, default=10,
                       help="last octet of the first daemon's 127.0.7.x address (default 10)")
        p.add_argument("--profile", default="lan", choices=["lan", "wan", "local"],
                       help="--gossip-profile of every daemon (default lan, as production)")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = machine()
    with terminate_as_interrupt(), LoadSampler() as load:
        result = args.func(args)
    during = load.figures()
    print(f"load average (1 min) during the run: min {during['min']}, mean {during['mean']}, "
          f"max {during['max']} on {start['cpus']} CPUs", flush=True)
    result["machine"] = {**start, "loadavg_1m_during": during}
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
