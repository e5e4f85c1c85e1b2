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

Prints a table and, last, one JSON line with every figure. Never passes or fails on
a time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnslib import QTYPE, DNSHeader, DNSQuestion, DNSRecord  # noqa: E402

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
    """Run dnsperf (4 clients, 200 outstanding, at most ``max_qps``) with the mix."""
    exe = shutil.which("dnsperf")
    if exe is None:
        print("dnsperf not installed (apt-get install dnsperf); skipping it", file=sys.stderr)
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("".join(f"{name} {qtype}\n" for name, qtype in _mix()))
        f.flush()
        done = subprocess.run([exe, "-s", "127.0.0.1", "-p", str(port), "-d", f.name,
                               "-l", str(seconds), "-c", "4", "-Q", str(max_qps), "-q", "200"],
                              capture_output=True, text=True, check=False)
    figures: dict[str, float] = {}
    for line in done.stdout.splitlines():
        text = line.strip()
        if text.startswith("Queries per second:"):
            figures["dnsperf_qps"] = round(float(text.split(":")[1]))
        elif text.startswith("Average Latency (s):"):
            figures["dnsperf_avg_latency_ms"] = round(
                float(text.split(":")[1].split()[0]) * 1e3, 3)
        elif text.startswith("Latency StdDev (s):"):
            figures["dnsperf_latency_stddev_ms"] = round(float(text.split(":")[1]) * 1e3, 3)
        elif text.startswith("Queries lost:"):
            figures["dnsperf_lost"] = int(text.split(":")[1].split()[0])
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
                                                         float("nan"))}


def main() -> None:
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
    args = parser.parse_args()
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
                  f"{r.get('dnsperf_half_rate_avg_latency_ms')} ms, stddev "
                  f"{r.get('dnsperf_half_rate_latency_stddev_ms')} ms")
    if args.yardstick:
        y = _dnsmasq_yardstick(args.seconds)
        if y:
            results["dnsmasq"] = y
            print(f"dnsmasq   dnsperf: {y['dnsmasq_qps']} qps, {y['dnsmasq_cpu_us_per_query']} "
                  f"cpu us/q, avg {y['dnsmasq_avg_latency_ms']} ms; at half rate "
                  f"{y['dnsmasq_half_rate_qps']} qps: avg "
                  f"{y['dnsmasq_half_rate_avg_latency_ms']} ms")
    print(json.dumps({"bench": "dns", "services": SERVICES,
                      "endpoints": SERVICES * ENDPOINTS_PER_SERVICE, "seconds": args.seconds,
                      "window": args.window, "results": results}))


if __name__ == "__main__":
    main()
