"""Membership benchmarks: failure detection, false deaths under loss, dissemination
and idle cost. Prints figures; never passes or fails on a time.

Subcommands (each prints human-readable figures, then one JSON object as its LAST
line)::

    python bench/membership.py detect --nodes 10 --rounds 20
    python bench/membership.py loss --nodes 10 --loss 0.1 --duration 300   # root
    python bench/membership.py sim --sizes 10,100,1000
    python bench/membership.py idle --nodes 10 --duration 60

``detect``, ``loss`` and ``idle`` run real ``meshd`` processes on 127.0.0.50 and up
(``--first-ip``), gossip port 17946, with data dirs under a temporary directory
(``--keep`` keeps it and its logs). Every process is killed by PID on the way out.
They run the ``mesh`` package this bench imports (the checkout it lives in), or, with
``--pythonpath DIR``, the one in ``DIR`` (a ``git worktree`` of another commit, for
A/B runs): ``PYTHONPATH=DIR`` plus ``PYTHONSAFEPATH=1``, so that the current directory
cannot shadow it. The figures name the code that ran (file, commit, clean or not) and
whether the cluster was secured (the seed wrote a join token: sealed gossip, mutual
TLS push-pull) or plain (a meshd from before security).

Every subcommand samples the 1-minute load average every 5 s while it runs and
reports it with the figures (the machine is often shared).

``detect``: each round SIGKILLs one random non-seed node and reads, from the
survivors' structured stderr (wall-clock UTC, ms), when the first and the last of
them logged ``member_dead`` for it. The victim is restarted with the same data dir
and the next round starts once everyone sees it alive again.

``loss``: an iptables rule on ``lo`` drops each gossip datagram between the
benchmark's addresses with probability ``--loss`` (a datagram crosses ``lo`` once,
so one rule in INPUT drops it with exactly that probability); the rule is removed
on the way out, whatever happens. Counts false deaths (``member_dead`` while no
node was killed) and suspicions.

``sim``: the deterministic simulator (formed cluster, default config): time for one
metadata update to reach every member, and gossip bytes/s per node while idle.

``idle``: CPU (``/proc/PID/stat`` utime+stime), RSS (``VmRSS``) and gossip bytes/s
(``meshd_gossip_bytes_out_total``) per daemon over a quiet window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemons import (  # noqa: E402
    GOSSIP_PORT,
    Cluster,
    Daemon,
    LogFollower,
    loopback_ips,
    metric,
    wait_for,
)

from mesh.gossip.config import GossipConfig  # noqa: E402
from mesh.gossip.core import MemberChanged  # noqa: E402
from mesh.gossip.messages import Meta  # noqa: E402
from mesh.testing.sim import GossipSimulator  # noqa: E402
from mesh.types import NodeId  # noqa: E402

FORM_TIMEOUT_S = 60.0
DETECT_TIMEOUT_S = 30.0
RULE_COMMENT = "meshd-bench-membership-loss"


# --- small helpers -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): with 20 samples, p99 is the maximum."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """min / median / p99 / max of ``values`` (rounded to ms), and their count."""
    if not values:
        return {"n": 0, "min": None, "median": None, "p99": None, "max": None}
    return {"n": len(values), "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "p99": round(percentile(values, 99), 3), "max": round(max(values), 3)}


def fmt(s: dict[str, Any], unit: str = "s") -> str:
    """``min 1.234s  median ...`` of a :func:`summary`."""
    if not s["n"]:
        return "no samples"
    return "  ".join(f"{k} {s[k]:.3f}{unit}" for k in ("min", "median", "p99", "max")) \
        + f"  (n={s['n']})"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0],
            "kernel": os.uname().release, "loadavg_at_start": [round(x, 2) for x in load]}


class LoadSampler:
    """Samples the 1-minute load average every ``interval_s`` in a daemon thread."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.samples.append(os.getloadavg()[0])

    def figures(self) -> dict[str, float | int | None]:
        """min / mean / max of the samples, and their count."""
        if not self.samples:
            return {"n": 0, "min": None, "mean": None, "max": None}
        return {"n": len(self.samples), "min": round(min(self.samples), 2),
                "mean": round(statistics.fmean(self.samples), 2),
                "max": round(max(self.samples), 2)}


def code_under_test(pythonpath: str | None) -> dict[str, Any]:
    """Which ``mesh`` package the daemons import, and its git commit."""
    where = Path(pythonpath).resolve() if pythonpath else ROOT
    probe = subprocess.run(
        [sys.executable, "-c", "import mesh.node.daemon as d; print(d.__file__)"],
        env=daemon_env(pythonpath), capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SystemExit(f"cannot import mesh.node.daemon the way the daemons would:\n"
                         f"{probe.stderr}")

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(where), *argv], capture_output=True,
                              text=True, check=False).stdout.strip()

    return {"pythonpath": pythonpath, "daemon_module": probe.stdout.strip(),
            "commit": git("rev-parse", "--short", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "mesh"))}


def daemon_env(pythonpath: str | None) -> dict[str, str]:
    """The environment the daemons start with."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(Path(pythonpath).resolve())
        env["PYTHONSAFEPATH"] = "1"  # ``python -m`` would put the cwd first otherwise
    return env


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Run with ``os.environ`` set to ``env`` (children inherit it), then restore it."""
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def secured(cluster: Cluster) -> bool:
    """True if the seed created a join token (sealed gossip, mTLS push-pull)."""
    return cluster["n00"].join_token() is not None


def print_json(result: dict[str, Any]) -> None:
    """The figures as the last line of output."""
    print(json.dumps(result, sort_keys=True), flush=True)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that ``finally`` blocks (killing daemons,
    removing the iptables rule) run when the bench is stopped."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def real_cluster(args: argparse.Namespace) -> Iterator[Cluster]:
    """``--nodes`` daemons started as one cluster, killed (by PID) on the way out."""
    base = Path(tempfile.mkdtemp(prefix="mb-", dir="/tmp"))
    cluster = Cluster(base, profile=args.profile)
    for i, ip in enumerate(loopback_ips(args.first_ip, args.nodes)):
        cluster.add(f"n{i:02d}", ip, labels={"zone": f"z{i % 3}"})
    try:
        with environment(daemon_env(args.pythonpath)):
            t0 = time.monotonic()
            cluster.start(timeout_s=FORM_TIMEOUT_S)
            cluster.wait_formed(FORM_TIMEOUT_S)
            print(f"{args.nodes} daemons ({args.profile} profile, "
                  f"{'secured' if secured(cluster) else 'plain: no join token'}) on "
                  f"{cluster['n00'].ip}-{list(cluster)[-1].ip}:{GOSSIP_PORT} formed in "
                  f"{time.monotonic() - t0:.1f}s; data dirs and logs in {base}", flush=True)
            yield cluster
    finally:
        cluster.close()
        if args.keep:
            print(f"kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


def add_cluster_args(p: argparse.ArgumentParser, nodes: int) -> None:
    p.add_argument("--nodes", type=int, default=nodes)
    p.add_argument("--first-ip", type=int, default=50,
                   help="last octet of the first daemon's 127.0.0.x address (default 50)")
    p.add_argument("--profile", default="lan", choices=["lan", "wan", "local"],
                   help="--gossip-profile of every daemon (default lan, the default config)")
    p.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    p.add_argument("--pythonpath", metavar="DIR", default=None,
                   help="run the daemons from the mesh package in DIR (e.g. a git worktree "
                        "of another commit) instead of this checkout's")


# --- detect ------------------------------------------------------------------------


def cmd_detect(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    firsts: list[float] = []
    alls: list[float] = []
    suspects: list[float] = []
    rounds: list[dict[str, Any]] = []
    false_deaths = 0
    undetected = 0
    with real_cluster(args) as cluster:
        seed = cluster["n00"]
        followers = {d.name: LogFollower(d.log_path) for d in cluster}
        for r in range(1, args.rounds + 1):
            victim = rng.choice([d for d in cluster if d is not seed])
            survivors = [d for d in cluster if d is not victim]
            # A random pause, so kills fall at random phases of the probe cycle.
            time.sleep(rng.uniform(1.0, 3.0))
            for f in followers.values():
                f.skip_to_end()
            t_kill = victim.kill()
            dead_at: dict[str, float] = {}
            suspect_at: dict[str, float] = {}

            def collect(victim: Daemon = victim, survivors: list[Daemon] = survivors,
                        dead_at: dict[str, float] = dead_at,
                        suspect_at: dict[str, float] = suspect_at) -> bool:
                nonlocal false_deaths
                for d in survivors:
                    for ev in followers[d.name].poll():
                        peer = ev.fields.get("peer")
                        if ev.event == "member_dead" and peer == victim.name:
                            dead_at.setdefault(d.name, ev.ts)
                        elif ev.event == "member_dead":
                            false_deaths += 1
                            print(f"  false death: {d.name} declared {peer} dead", flush=True)
                        elif ev.event == "member_suspect" and peer == victim.name:
                            suspect_at.setdefault(d.name, ev.ts)
                return len(dead_at) == len(survivors)

            try:
                wait_for(collect, DETECT_TIMEOUT_S, f"every survivor to declare {victim.name} "
                         "dead", interval_s=0.1)
            except AssertionError:
                undetected += 1
            # Timestamps have ms resolution (truncated), the kill instant is exact.
            first = min(dead_at.values()) - t_kill if dead_at else None
            last = max(dead_at.values()) - t_kill if len(dead_at) == len(survivors) else None
            first_suspect = min(suspect_at.values()) - t_kill if suspect_at else None
            if first is not None:
                firsts.append(first)
            if last is not None:
                alls.append(last)
            if first_suspect is not None:
                suspects.append(first_suspect)
            rounds.append({"round": r, "victim": victim.name,
                           "first_suspect_s": first_suspect and round(first_suspect, 3),
                           "first_dead_s": first and round(first, 3),
                           "all_dead_s": last and round(last, 3),
                           "declared_by": len(dead_at)})
            print(f"round {r:2d}: killed {victim.name}; first suspect "
                  f"{_s(first_suspect)}, first dead {_s(first)}, all {len(survivors)} "
                  f"survivors {_s(last)}", flush=True)
            victim.start(join=[seed.addr], timeout_s=FORM_TIMEOUT_S)
            cluster.wait_formed(FORM_TIMEOUT_S)
        is_secured = secured(cluster)
    result = {"bench": "detect", "nodes": args.nodes, "rounds": args.rounds,
              "profile": args.profile, "seed": args.seed,
              "first_dead_s": summary(firsts), "all_dead_s": summary(alls),
              "first_suspect_s": summary(suspects), "undetected_rounds": undetected,
              "false_deaths": false_deaths, "secured": is_secured, "per_round": rounds}
    print(f"\nSIGKILL -> first survivor logs member_dead: {fmt(result['first_dead_s'])}")
    print(f"SIGKILL -> all survivors logged member_dead: {fmt(result['all_dead_s'])}")
    print(f"SIGKILL -> first member_suspect:             {fmt(result['first_suspect_s'])}")
    print(f"rounds not fully detected within {DETECT_TIMEOUT_S:g}s: {undetected}; "
          f"false deaths: {false_deaths}")
    print("goal: median to all <= 3 s, p99 <= 5 s")
    return result


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


# --- loss ----------------------------------------------------------------------------


def _iptables(action: str, ips: Sequence[str], probability: float) -> list[str]:
    return ["iptables", "-w", action, "INPUT", "-i", "lo", "-p", "udp",
            "--dport", str(GOSSIP_PORT),
            "-m", "iprange", "--src-range", f"{ips[0]}-{ips[-1]}",
            "--dst-range", f"{ips[0]}-{ips[-1]}",
            "-m", "statistic", "--mode", "random", "--probability", f"{probability:.6f}",
            "-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"]


@contextmanager
def packet_loss(ips: Sequence[str], probability: float) -> Iterator[Callable[[], int]]:
    """Drop gossip datagrams among ``ips`` with ``probability``; yields a function
    returning how many the rule dropped so far. The rule is always removed."""
    if shutil.which("iptables") is None:
        raise SystemExit("iptables not found: apt-get install -y iptables (needs root)")
    subprocess.run(_iptables("-I", ips, probability), check=True)
    try:
        def dropped() -> int:
            out = subprocess.run(["iptables", "-w", "-L", "INPUT", "-n", "-v", "-x"],
                                 check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                if RULE_COMMENT in line:
                    return int(line.split()[0])
            return 0

        yield dropped
    finally:
        subprocess.run(_iptables("-D", ips, probability), check=False)
        left = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True,
                              text=True, check=False).stdout
        if RULE_COMMENT in left:
            print(f"WARNING: the loss rule is still installed; remove it with: "
                  f"{' '.join(_iptables('-D', ips, probability))}", file=sys.stderr)


def _counters(cluster: Cluster) -> dict[str, dict[str, float]]:
    names = ["suspicions_total", "refutations_total", "deaths_total", "packets_in_total",
             "packets_out_total", "probes_total", "acks_total", "nacks_total"]
    out = {}
    for d in cluster:
        samples = d.metrics()
        out[d.name] = {n: metric(samples, "meshd_gossip_" + n) for n in names}
    return out


def cmd_loss(args: argparse.Namespace) -> dict[str, Any]:
    with real_cluster(args) as cluster:
        ips = [d.ip for d in cluster]
        followers = {d.name: LogFollower(d.log_path) for d in cluster}
        for f in followers.values():
            f.skip_to_end()
        before = _counters(cluster)
        deaths: list[str] = []
        suspects = 0
        alive_again = 0
        with packet_loss(ips, args.loss) as dropped:
            t0 = time.monotonic()
            print(f"dropping {args.loss:.0%} of gossip datagrams for {args.duration:g}s ...",
                  flush=True)
            next_report = t0 + 30
            while (now := time.monotonic()) < t0 + args.duration:
                for d in cluster:
                    d.check_running()
                    for ev in followers[d.name].poll():
                        if ev.event == "member_dead":
                            deaths.append(f"{d.name} declared {ev.fields.get('peer')} dead")
                            print(f"  FALSE DEATH: {deaths[-1]}", flush=True)
                        elif ev.event == "member_suspect":
                            suspects += 1
                        elif ev.event == "member_alive":
                            alive_again += 1
                if now >= next_report:
                    next_report += 30
                    print(f"  {now - t0:5.0f}s: {suspects} suspicions logged, "
                          f"{len(deaths)} false deaths, {dropped()} datagrams dropped",
                          flush=True)
                time.sleep(0.5)
            n_dropped = dropped()
            after = _counters(cluster)
        # Back to a clean network: everyone must see everyone alive.
        cluster.wait_formed(FORM_TIMEOUT_S)
        is_secured = secured(cluster)
    delta = {k: sum(after[n][k] - before[n][k] for n in after) for k in before["n00"]}
    sent = delta["packets_out_total"]
    result = {"bench": "loss", "nodes": args.nodes, "loss": args.loss,
              "duration_s": args.duration, "profile": args.profile,
              "false_deaths": len(deaths), "false_death_lines": deaths[:50],
              "suspect_lines": suspects, "alive_again_lines": alive_again,
              "suspicions_total": delta["suspicions_total"],
              "refutations_total": delta["refutations_total"],
              "deaths_total": delta["deaths_total"],
              "probes_total": delta["probes_total"], "acks_total": delta["acks_total"],
              "nacks_total": delta["nacks_total"],
              "datagrams_sent": sent, "datagrams_received": delta["packets_in_total"],
              "datagrams_dropped_by_rule": n_dropped,
              "measured_loss": round(n_dropped / sent, 4) if sent else None,
              "secured": is_secured}
    print(f"\n{args.nodes} nodes, {args.loss:.0%} loss on every link for {args.duration:g}s "
          f"(measured: {n_dropped} of {int(sent)} datagrams dropped = "
          f"{result['measured_loss']:.2%})")
    print(f"false deaths: {len(deaths)} (goal 0)")
    print(f"suspicions: {int(delta['suspicions_total'])} started (metrics), "
          f"{suspects} member_suspect lines; refutations: {int(delta['refutations_total'])}")
    print(f"probes: {int(delta['probes_total'])}, acks {int(delta['acks_total'])}, "
          f"nacks {int(delta['nacks_total'])}")
    return result


# --- sim -----------------------------------------------------------------------------


def _sim_meta(i: int, version: int = 0) -> Meta:
    labels = {"zone": f"z{i % 3}", "rack": f"r{i % 17}"}
    if version:
        labels["release"] = f"v{version}"
    return Meta.build(labels, 2000, 8 << 30, "worker", {"gossip": 7946})


def _sim_bytes(sim: GossipSimulator) -> tuple[int, int]:
    """Total (UDP, push-pull) bytes sent by every node so far."""
    udp = stream = 0
    for node in sim.nodes.values():
        stream += node.stream_bytes_out
        udp += sim.bytes_out(node.name) - node.stream_bytes_out
    return udp, stream


def sim_one(n: int, seed: int, updates: int, window_s: float) -> dict[str, Any]:
    """One cluster size: update propagation times and idle bytes/s per node."""
    config = GossipConfig.lan()
    t0 = time.monotonic()
    names = [NodeId(f"n{i:03d}") for i in range(n)]
    index = {name: i for i, name in enumerate(names)}
    sim = GossipSimulator(n, seed=seed, config=config,
                          meta_for=lambda name: _sim_meta(index[name]))
    build_s = time.monotonic() - t0
    rng = random.Random(seed)
    seen: dict[NodeId, float] = {}
    wanted: dict[str, Any] = {}

    def observe(_sim: GossipSimulator, observer: NodeId, out: object) -> None:
        if isinstance(out, MemberChanged) and out.member.node == wanted.get("node") \
                and out.member.meta == wanted.get("meta") and observer not in seen \
                and observer != out.member.node:
            seen[observer] = _sim.now

    sim.observers.append(observe)
    spread: list[float] = []
    missed = 0
    # Updates at t = 5, 10, ...: after the start-up broadcasts have died out and
    # before the first periodic push-pull (27-33 s), so only gossip carries them.
    for u in range(updates):
        sim.run_until(max(sim.now, 5.0 + 5.0 * u))
        target = rng.choice(names)
        meta = _sim_meta(index[target], version=u + 1)
        seen.clear()
        wanted.update(node=target, meta=meta)
        start = sim.now
        sim.update_meta(target, meta)
        took = sim.run_until_true(lambda: len(seen) >= n - 1, timeout_s=20.0, step_s=0.05)
        if took is None:
            missed += 1
        else:
            spread.append(max(seen.values()) - start)
    # Steady state: after every node's first push-pull (scheduled 27-33 s after it
    # started, before it knew the cluster size), measure an idle window.
    warm_s = 1.2 * config.push_pull_interval_s + 4.0
    sim.run_until(max(sim.now, 20.0))
    before_burst = _sim_bytes(sim)
    sim.run_until(max(sim.now, warm_s))
    after_burst = _sim_bytes(sim)
    sim.run_for(window_s)
    end = _sim_bytes(sim)
    udp_bps = (end[0] - after_burst[0]) / n / window_s
    stream_bps = (end[1] - after_burst[1]) / n / window_s
    # Each node starts one push-pull per period and answers one on average: the
    # bytes of one such round, spread over the period, is the long-run average.
    period = config.push_pull_period_s(n)
    round_bytes = (after_burst[1] - before_burst[1]) / n
    amortized_bps = round_bytes / period
    deaths = sim.deaths_of(names)
    return {"nodes": n, "update_to_all_s": summary(spread), "updates_not_everywhere": missed,
            "idle_window_s": window_s,
            "udp_bytes_per_s_per_node": round(udp_bps, 1),
            "push_pull_bytes_per_s_per_node_in_window": round(stream_bps, 1),
            "push_pull_period_s": period,
            "push_pull_bytes_per_node_per_round": round(round_bytes),
            "push_pull_bytes_per_s_per_node_amortized": round(amortized_bps, 1),
            "steady_bytes_per_s_per_node": round(udp_bps + amortized_bps, 1),
            "window_bytes_per_s_per_node": round(udp_bps + stream_bps, 1),
            "false_deaths": len(deaths),
            "wall_s": round(time.monotonic() - t0, 1), "build_wall_s": round(build_s, 1)}


def cmd_sim(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    for n in sizes:
        print(f"simulating {n} nodes ...", flush=True)
        row = sim_one(n, args.seed, args.updates, args.window)
        rows.append(row)
        print(f"  {n:5d} nodes: update reaches all in {fmt(row['update_to_all_s'])}")
        print(f"               idle bytes/s per node: UDP {row['udp_bytes_per_s_per_node']:.0f}"
              f" + push-pull {row['push_pull_bytes_per_s_per_node_amortized']:.0f} amortized"
              f" (one round = {row['push_pull_bytes_per_node_per_round']} B per node every "
              f"{row['push_pull_period_s']:g}s) = {row['steady_bytes_per_s_per_node']:.0f};"
              f" in the {args.window:g}s window: {row['window_bytes_per_s_per_node']:.0f}"
              f"; false deaths {row['false_deaths']}; {row['wall_s']:.0f}s of wall time",
              flush=True)
    steady = [r["steady_bytes_per_s_per_node"] for r in rows]
    flat = max(steady) / min(steady) - 1 if steady and min(steady) > 0 else None
    result = {"bench": "sim", "seed": args.seed, "config": "GossipConfig.lan()",
              "sizes": rows, "steady_bytes_spread": flat and round(flat, 3)}
    print(f"\nsteady bytes/s per node from {sizes[0]} to {sizes[-1]} nodes: "
          f"{min(steady):.0f}-{max(steady):.0f} (spread {flat:.1%}; goal within 20%)")
    print("goal: an update reaches 100% of 1000 members in <= 2 s")
    return result


# --- idle ----------------------------------------------------------------------------


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cmd_idle(args: argparse.Namespace) -> dict[str, Any]:
    tick = os.sysconf("SC_CLK_TCK")
    with real_cluster(args) as cluster:
        print(f"settling for {args.settle:g}s, then measuring {args.duration:g}s ...",
              flush=True)
        time.sleep(args.settle)
        start = {}
        for d in cluster:
            samples = d.metrics()
            start[d.name] = (_cpu_ticks(d.pid),
                             metric(samples, "meshd_gossip_bytes_out_total"),
                             metric(samples, "meshd_gossip_packets_out_total"),
                             metric(samples, "meshd_gossip_push_pulls_total"))
        t0 = time.monotonic()
        time.sleep(args.duration)
        elapsed = time.monotonic() - t0
        rows: list[dict[str, Any]] = []
        for d in cluster:
            d.check_running()
            cpu0, out0, pkt0, pp0 = start[d.name]
            samples = d.metrics()
            rows.append({
                "node": d.name,
                "cpu_percent": round((_cpu_ticks(d.pid) - cpu0) / tick / elapsed * 100, 2),
                "rss_mb": round(_rss_mb(d.pid), 1),
                "udp_bytes_out_per_s": round(
                    (metric(samples, "meshd_gossip_bytes_out_total") - out0) / elapsed, 1),
                "udp_datagrams_out_per_s": round(
                    (metric(samples, "meshd_gossip_packets_out_total") - pkt0) / elapsed, 2),
                "push_pulls": int(metric(samples, "meshd_gossip_push_pulls_total") - pp0),
            })
        is_secured = secured(cluster)
    for r in rows:
        print(f"  {r['node']}: CPU {r['cpu_percent']:.2f}% of a core, RSS {r['rss_mb']:.1f} MB,"
              f" {r['udp_bytes_out_per_s']:.0f} B/s gossip out in "
              f"{r['udp_datagrams_out_per_s']:.2f} datagrams/s, {r['push_pulls']} push-pulls")
    agg = {k: summary([r[k] for r in rows])
           for k in ("cpu_percent", "rss_mb", "udp_bytes_out_per_s",
                     "udp_datagrams_out_per_s")}
    print(f"\nCPU % of one core: {fmt(agg['cpu_percent'], '')}   (goal <= 1)")
    print(f"RSS MB:            {fmt(agg['rss_mb'], '')}   (goal <= 60)")
    print(f"gossip B/s out:    {fmt(agg['udp_bytes_out_per_s'], '')}   (goal <= 1000; UDP "
          "only: push-pull over TCP is not in meshd_gossip_bytes_out_total)")
    print(f"gossip datagrams/s out: {fmt(agg['udp_datagrams_out_per_s'], '')}"
          + ("   (sealed: 33 B of each is the seal)" if is_secured else ""))
    return {"bench": "idle", "nodes": args.nodes, "profile": args.profile,
            "window_s": round(elapsed, 1), "settle_s": args.settle, **agg,
            "secured": is_secured, "per_node": rows}


# --- command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("detect", help="SIGKILL -> member_dead latency on real daemons")
    add_cluster_args(p, 10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="chooses the victims and pauses")
    p = sub.add_parser("loss", help="false deaths under packet loss (root, iptables)")
    add_cluster_args(p, 10)
    p.add_argument("--loss", type=float, default=0.1, help="drop probability per datagram")
    p.add_argument("--duration", type=float, default=300.0, help="seconds")
    p = sub.add_parser("sim", help="dissemination time and bytes/s in the simulator")
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--updates", type=int, default=5, help="metadata updates timed per size")
    p.add_argument("--window", type=float, default=60.0, help="idle window, virtual seconds")
    p = sub.add_parser("idle", help="CPU, RSS and bytes/s of idle daemons")
    add_cluster_args(p, 10)
    p.add_argument("--duration", type=float, default=60.0, help="measured window, seconds")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait after forming")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "detect": cmd_detect, "loss": cmd_loss, "sim": cmd_sim, "idle": cmd_idle}
    start = machine()
    code = code_under_test(args.pythonpath) if "pythonpath" in args else None
    if code is not None:
        print(f"daemons run {code['daemon_module']} (commit {code['commit']}"
              f"{', with uncommitted changes' if code['dirty'] else ''})", flush=True)
    with terminate_as_interrupt(), LoadSampler() as load:
        result = commands[args.command](args)
    during = load.figures()
    print(f"load average (1 min) during the run: min {during['min']}, mean "
          f"{during['mean']}, max {during['max']} ({os.cpu_count()} cpus)")
    result["machine"] = {**start, "loadavg_1m_during": during}
    if code is not None:
        result["code"] = code
    print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
