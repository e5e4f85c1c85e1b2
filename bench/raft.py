"""Raft benchmarks on real ``meshd`` processes (loopback, default ``lan`` profile).

    python bench/raft.py failover --rounds 20   # SIGKILL the leader, time until a
                                                # write is acknowledged again
    python bench/raft.py replace --rounds 5     # SIGKILL a voter, time until a new
                                                # voter is promoted in its place

Each prints one line per round, then min/median/p99, and as its last line one JSON
object. Writes are issued through a surviving node's local API every 10 ms (each a
fresh request; the write is forwarded to whichever node leads). Issue [raft] goals:
failover median <= 1.0 s and p99 <= 2 s; voter replacement <= 10 s.

Daemons run on 127.0.0.150-127.0.0.159, gossip port 17946 (``tests/daemons.py``),
and are killed by PID on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemons import ApiUnavailable, Cluster, Daemon, loopback_ips, wait_for  # noqa: E402

from mesh.errors import MeshError  # noqa: E402

WRITE_POLL_S = 0.01


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summary(name: str, values: list[float]) -> dict[str, float]:
    return {f"{name}_min_s": round(min(values), 3),
            f"{name}_median_s": round(statistics.median(values), 3),
            f"{name}_p99_s": round(percentile(values, 0.99), 3)}


def status(d: Daemon) -> dict[str, Any]:
    return d.api("raft_status")  # type: ignore[no-any-return]


def wait_group(cluster: Cluster, observer: Daemon, voters: int, timeout_s: float = 60
               ) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        st = status(observer)
        return st if st["leader"] and len(st["voters"]) == voters else None

    return wait_for(ok, timeout_s, f"{voters} voters with a leader")


def write_until_acked(d: Daemon, round_no: int, timeout_s: float = 30) -> float:
    """Issue writes through ``d`` until one is acknowledged; return when (wall clock)."""
    deadline = time.monotonic() + timeout_s
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            d.api("kv_put", {"key": f"bench/{round_no}", "value": str(i),
                             "request_id": os.urandom(16)})
            return time.time()
        except (MeshError, ApiUnavailable, OSError):
            time.sleep(WRITE_POLL_S)
    raise SystemExit(f"round {round_no}: no write acknowledged within {timeout_s}s")


def failover(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    with Cluster(base, profile="lan") as cluster:
        for i, ip in enumerate(loopback_ips(150, args.nodes)):
            cluster.add(f"n{i}", ip)
        cluster.start()
        cluster.wait_formed(60)
        times = []
        for r in range(args.rounds):
            observer = cluster["n1"] if cluster["n1"].running() else cluster["n0"]
            st = wait_group(cluster, observer, 3)
            leader = cluster[st["leader"]]
            via = next(d for d in cluster if d.running() and d is not leader)
            write_until_acked(via, -1 - r)  # the group is healthy before the kill
            killed_at = leader.kill()
            acked_at = write_until_acked(via, r)
            times.append(acked_at - killed_at)
            print(f"round {r + 1}: leader {leader.name} killed; write acknowledged again "
                  f"after {times[-1]:.3f} s", flush=True)
            leader.start()  # same data dir: it rejoins and catches up
            cluster.wait_formed(60)
        return {"bench": "raft_failover", "nodes": args.nodes, "rounds": args.rounds,
                **summary("failover", times)}


def replace(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    with Cluster(base, profile="lan") as cluster:
        for i, ip in enumerate(loopback_ips(150, args.nodes)):
            cluster.add(f"n{i}", ip)
        cluster.start()
        cluster.wait_formed(60)
        times = []
        for r in range(args.rounds):
            st = wait_group(cluster, next(d for d in cluster if d.running()), 3)
            victim = cluster[next(v for v in st["voters"] if v != st["leader"])]
            observer = cluster[st["leader"]]
            killed_at = victim.kill()

            def replaced(observer: Daemon = observer, victim: Daemon = victim) -> bool:
                s = status(observer)
                return victim.name not in s["voters"] and len(s["voters"]) == 3

            wait_for(replaced, 60, f"a voter to replace {victim.name}", interval_s=0.05)
            times.append(time.time() - killed_at)
            print(f"round {r + 1}: voter {victim.name} killed; replaced after "
                  f"{times[-1]:.3f} s", flush=True)
            victim.start()
            cluster.wait_formed(60)
            # Let the restarted node become a stable candidate again (autopilot 10 s).
            time.sleep(11)
        return {"bench": "raft_voter_replacement", "nodes": args.nodes, "rounds": args.rounds,
                **summary("replace", times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("failover")
    f.add_argument("--rounds", type=int, default=20)
    f.add_argument("--nodes", type=int, default=3)
    r = sub.add_parser("replace")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raftb", dir="/tmp") as tmp:
        result = (failover if args.command == "failover" else replace)(args, Path(tmp))
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
