"""Placement benchmark: throughput, balance, node-loss re-placement, node arrival.

Prints figures, never passes or fails. The last line of output is one JSON object;
its keys ``replicas``, ``nodes``, ``seconds``, ``placements_per_s``,
``max_over_mean``, ``moved_on_node_loss`` and ``replicas_on_lost_node`` are a
contract (docs/benchmarks.md quotes them).

Usage::

    python bench/placement.py            # 10,000 services x 100 replicas on 5,000 nodes
    python bench/placement.py --quick    # 1,000 x 100 on 1,000 nodes (under a minute)
    python bench/placement.py --profile  # also print the top of a cProfile of place()

The workload is a seeded mix meant to look like a real cluster: five zones, three
node sizes, a few GPU and Windows nodes; services with no constraint (60%), a zone
pin, an OS constraint, a disk-type ``in`` list or ``gpu exists``; a fifth spread over
``zone``; some binpack, host ports, affinity (with the target's constraints, as a
sidecar would) and anti-affinity; cpu 50m-500m and memory 128M-1G per replica
(about half the cluster's cpu in use).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.placement import (  # noqa: E402
    NodeInfo,
    NodeState,
    Resources,
    Scheduler,
    ServiceSpec,
    Strategy,
    parse_constraints,
    place,
)
from mesh.types import NodeId, ServiceId  # noqa: E402

GIB = 1024**3
MIB = 1024**2
ZONES = ("z1", "z2", "z3", "z4", "z5")


def make_nodes(count: int, rng: random.Random) -> list[NodeInfo]:
    """Nodes in five zones, three sizes; 5% with a GPU, 3% Windows."""
    sizes = ((64_000, 256 * GIB), (96_000, 384 * GIB), (128_000, 512 * GIB))
    nodes = []
    for i in range(count):
        cpu, mem = sizes[rng.choices((0, 1, 2), weights=(5, 3, 2))[0]]
        labels = {"zone": ZONES[i % len(ZONES)], "disk": rng.choice(("ssd", "hdd", "nvme"))}
        if rng.random() < 0.05:
            labels["gpu"] = "a100"
        os_name = "windows" if rng.random() < 0.03 else "linux"
        nodes.append(
            NodeInfo(
                NodeId(f"node-{i:05d}"),
                labels=labels,
                attributes={"platform.os": os_name, "hostname": f"host{i}"},
                capacity=Resources(cpu, mem),
            )
        )
    return nodes


def make_specs(count: int, replicas: int, rng: random.Random) -> list[ServiceSpec]:
    """A seeded mix of constraints, spread, strategies, ports and (anti-)affinity."""
    specs = []
    for s in range(count):
        sid = ServiceId(f"svc-{s:05d}")
        roll = rng.random()
        if roll < 0.60:
            texts: list[str] = []
        elif roll < 0.75:
            texts = [f"node.labels.zone=={rng.choice(ZONES)}"]
        elif roll < 0.88:
            texts = ["node.platform.os==linux"]
        elif roll < 0.98:
            texts = ["disk in (ssd, nvme)"]
        else:
            texts = ["gpu exists"]
        spread = "zone" if rng.random() < 0.20 and not any("zone" in t for t in texts) else None
        strategy = Strategy.BINPACK if rng.random() < 0.05 else Strategy.SPREAD
        ports = (8000 + s % 500,) if rng.random() < 0.03 else ()
        affinity: tuple[ServiceId, ...] = ()
        anti: tuple[ServiceId, ...] = ()
        extra = rng.random()
        if s and extra < 0.01:
            # a sidecar-like service: the constraints and strategy of the one it
            # sticks to
            affinity = (ServiceId(f"svc-{s - 1:05d}"),)
            texts = [str(c) for c in specs[-1].constraints]
            strategy = specs[-1].strategy
            ports = ()
            spread = None
        elif s and extra < 0.02:
            anti = (ServiceId(f"svc-{s - 1:05d}"),)
        specs.append(
            ServiceSpec(
                sid,
                replicas=replicas,
                strategy=strategy,
                constraints=parse_constraints(texts),
                resources=Resources(
                    rng.choice((50, 100, 100, 250, 500)),
                    rng.choice((128, 256, 256, 512, 1024)) * MIB,
                ),
                ports=ports,
                spread_over=spread,
                affinity=affinity,
                anti_affinity=anti,
            )
        )
    return specs


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 services on 1,000 nodes")
    parser.add_argument("--services", type=int, default=None)
    parser.add_argument("--replicas", type=int, default=100, help="replicas per service")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the initial placement")
    parser.add_argument("--no-rebalance", action="store_true", help="skip the rebalance figure")
    parser.add_argument("--verify", action="store_true",
                        help="also check the incremental plan against place() from scratch")
    args = parser.parse_args()
    services = args.services or (1_000 if args.quick else 10_000)
    node_count = args.nodes or (1_000 if args.quick else 5_000)
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    nodes = make_nodes(node_count, rng)
    specs = make_specs(services, args.replicas, rng)
    build_s = time.perf_counter() - t0
    replicas = services * args.replicas
    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} (2 cores shared)")
    print(f"workload: {services} services x {args.replicas} = {replicas} replicas, "
          f"{node_count} nodes (built in {build_s:.2f} s)")

    profiler = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    scheduler = Scheduler(specs, nodes)
    if profiler is not None:
        profiler.disable()
    place_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = scheduler.plan
    snapshot_s = time.perf_counter() - t0
    placed = plan.placed_count
    print(f"place: {place_s:.2f} s, {placed / place_s:,.0f} placements/s; "
          f"placed {placed}, unplaced {plan.unplaced_count}; plan snapshot {snapshot_s * 1e3:.0f} ms")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(18)
        print(out.getvalue())
    for entry in list(plan.unplaced.values())[:3]:
        print("  unplaced:", entry.text)

    load = plan.load()
    spread_ids = {s.id for s in specs if s.strategy is Strategy.SPREAD}
    spread_load = dict.fromkeys((n.id for n in nodes), 0)
    for sid, slots in plan.assignments.items():
        if sid in spread_ids:
            for node in slots:
                if node is not None:
                    spread_load[node] += 1
    counts = list(spread_load.values())
    mean = sum(counts) / len(counts)
    max_over_mean = max(counts) / mean if mean else 0.0
    totals = [load.get(n.id, 0) for n in nodes]
    print(f"balance (spread replicas): mean {mean:.1f}/node, max {max(counts)}, min {min(counts)}, "
          f"max/mean {max_over_mean:.3f}; all replicas incl. binpack: max {max(totals)}, "
          f"mean {sum(totals) / len(totals):.1f}, cap {plan.load_cap}")
    over_cap = sum(1 for c in counts if c > plan.load_cap)
    print(f"nodes above the load cap: {over_cap}")
    print(f"peak memory after placement: {peak_rss_mib():.0f} MiB")

    # one node dies: only its replicas may move
    lost = nodes[len(nodes) // 2]
    on_lost = load.get(lost.id, 0)
    t0 = time.perf_counter()
    changes = scheduler.update(nodes=[NodeInfo(lost.id, lost.labels, lost.attributes,
                                               lost.capacity, state=NodeState.DEAD)])
    loss_s = time.perf_counter() - t0
    moved = [c for c in changes if c.old is not None]
    foreign = [c for c in changes if c.old != lost.id]
    t0 = time.perf_counter()
    after = scheduler.plan
    loss_snapshot_s = time.perf_counter() - t0
    print(f"node loss: {loss_s * 1e3:.1f} ms to re-place; {len(moved)} replicas changed node, "
          f"{on_lost} were on {lost.id}, {len(foreign)} changes elsewhere, "
          f"{sum(1 for c in moved if c.new is None)} left unplaced; "
          f"plan snapshot {loss_snapshot_s * 1e3:.0f} ms")
    verified = None
    if args.verify:
        t0 = time.perf_counter()
        scratch = place(specs, [*nodes[: len(nodes) // 2], NodeInfo(lost.id, lost.labels,
                        lost.attributes, lost.capacity, state=NodeState.DEAD),
                        *nodes[len(nodes) // 2 + 1:]], plan.assignments)
        verified = scratch == after
        print(f"verify: place() from scratch equals the incremental plan: {verified} "
              f"({time.perf_counter() - t0:.1f} s)")

    # the node comes back, then a new node joins: nothing moves without a rebalance
    t0 = time.perf_counter()
    back = scheduler.update(nodes=[lost])
    joined = NodeInfo(NodeId("node-new"), labels={"zone": "z1", "disk": "ssd"},
                      attributes={"platform.os": "linux"}, capacity=Resources(96_000, 384 * GIB))
    arrive = scheduler.update(nodes=[joined])
    arrive_s = time.perf_counter() - t0
    moved_on_arrival = sum(1 for c in back + arrive if c.old is not None)
    print(f"node return + arrival: {arrive_s * 1e3:.1f} ms, {moved_on_arrival} replicas moved")
    rebalance_moved = None
    rebalance_s = None
    if not args.no_rebalance:
        t0 = time.perf_counter()
        rebalanced = scheduler.rebalance()
        rebalance_s = time.perf_counter() - t0
        rebalance_moved = sum(1 for c in rebalanced if c.old is not None and c.new is not None)
        print(f"rebalance: {rebalance_s:.2f} s, {rebalance_moved} replicas moved "
              f"({rebalance_moved / max(placed, 1):.3%}; 1/N = {1 / (node_count + 1):.3%}), "
              f"{sum(1 for c in rebalanced if c.new == joined.id)} onto the new node")
    peak = peak_rss_mib()
    print(f"peak memory: {peak:.0f} MiB")
    print(json.dumps({
        "replicas": replicas,
        "nodes": node_count,
        "services": services,
        "seconds": round(place_s, 3),
        "placements_per_s": round(placed / place_s),
        "placed": placed,
        "unplaced": plan.unplaced_count,
        "max_over_mean": round(max_over_mean, 4),
        "load_cap": plan.load_cap,
        "moved_on_node_loss": len(moved),
        "replicas_on_lost_node": on_lost,
        "changes_elsewhere_on_node_loss": len(foreign),
        "node_loss_ms": round(loss_s * 1e3, 2),
        "moved_on_node_arrival": moved_on_arrival,
        "rebalance_moved": rebalance_moved,
        "rebalance_seconds": None if rebalance_s is None else round(rebalance_s, 2),
        "verified_against_scratch": verified,
        "peak_rss_mib": round(peak),
        "load_average": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
