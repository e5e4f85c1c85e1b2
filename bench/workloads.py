"""Workload benchmarks on real ``meshd`` processes: time to heal, time to run.

    python bench/workloads.py heal --nodes 5 --replicas 10 --rounds 20
    python bench/workloads.py run --nodes 5 --replicas 10 --rounds 10
    (either with --driver docker: the image meshd-test/busybox of scripts/docker-setup)

Issue 6 [workloads] goals: a SIGKILLed node's replicas running and healthy on live
nodes again, median <= 5 s and p99 <= 8 s (process and docker drivers);
``meshctl run --replicas 10`` to all healthy <= 2 s (process), <= 4 s (docker).

Both start ``--nodes`` daemons (gossip profile ``--profile``, default ``lan`` as in
production) on 127.0.6.10 and up (``--first-ip``), gossip port 17946, each with
``--driver`` and ``--dns-bind IP:0``; data dirs and logs under a temporary directory
(``--keep`` keeps it). The service is 10 replicas of a small HTTP server with a
named port ``http`` the node picks:

* process: ``sh -c 'exec python3 -m http.server --bind $MESH_HOST $PORT'`` with an
  http health check of ``/`` (what ``meshctl run --port http --health-http /`` makes);
* docker: ``sh -c 'exec httpd -f -p $MESH_HOST:$PORT'`` in ``meshd-test/busybox`` with
  a tcp health check.

The health check keeps its default interval (2 s) unless ``--health-interval``.
Everything is observed through a node's local API (``service_ls`` / ``service_ps``,
linearizable reads) every 50 ms over its unix socket, not by spawning ``meshctl``,
which costs about a second of Python start-up on this machine.

``heal``: each round SIGKILLs a node that hosts replicas of the service (chosen at
random among those, ``--seed``; it is the Raft leader in about 1 round in
``--nodes``, and the figures say how often), then polls a survivor until every
replica runs and is healthy on a live node. The killed node is restarted with the
same data dir and the next round starts once the cluster is stable again (everyone
alive, a leader with its voters, the service converged, the restarted node's
leftover workloads stopped) plus ``--settle`` seconds.

``run``: each round issues ``service_apply`` through the API of node ``round %
nodes`` and polls until the service has converged (all replicas running, healthy,
current), then removes it and waits until its allocations are gone. Then the same
with ``meshctl run`` (a child process; its time includes Python start-up and
meshctl's own 0.25 s polling): both the instant the API first shows the service
converged and the instant meshctl exits are reported.

Breakdown: the daemons' structured logs (wall clock, ms) give, per round, when the
leader logged ``member_dead`` for the victim, when it logged ``plan_committed``
(a debug line: the daemons run with ``--log-level debug`` unless ``--log-level``
says otherwise), when the nodes logged ``workload_starting`` and
``workload_health health=healthy`` for the new allocations, and when the API showed
it. All are relative to the kill (``heal``) or to the ``service_apply`` call
(``run``).

The 1-minute load average is sampled every 5 s and reported with the figures (the
machine has 2 cores shared with other work). Every daemon, every workload process
(``kill_workloads``) and, with docker, every container labelled with one of the
bench's node names is killed on the way out. ``--pythonpath DIR`` runs the daemons
from another checkout (see ``bench/membership.py``). The last line of output is
one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from daemons import (  # noqa: E402
    ApiUnavailable,
    Cluster,
    Daemon,
    DaemonError,
    LogEvent,
    LogFollower,
)
from membership import (  # noqa: E402
    LoadSampler,
    code_under_test,
    daemon_env,
    environment,
    machine,
    percentile,
    terminate_as_interrupt,
)
from test_integration_workloads import kill_workloads  # noqa: E402

from mesh.errors import MeshError  # noqa: E402
from mesh.node.spec import parse_spec  # noqa: E402

POLL_S = 0.05
"""How often the bench asks a node's API whether the service is there yet."""

FORM_TIMEOUT_S = 90.0
ROUND_TIMEOUT_S = 60.0
SERVICE = "web"
DOCKER_IMAGE = "meshd-test/busybox"
NODE_PREFIX = "wl"
"""Node names (``wl0``...): containers are found by their ``mesh.node`` label."""


# --- figures -------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """median / p90 / p99 / max (nearest rank: p99 of 20 samples is the maximum)."""
    if not values:
        return {"n": 0, "min": None, "median": None, "p90": None, "p99": None, "max": None}
    return {"n": len(values), "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "p90": round(percentile(values, 90), 3), "p99": round(percentile(values, 99), 3),
            "max": round(max(values), 3)}


def fmt(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "no samples"
    return "  ".join(f"{k} {s[k]:.3f}s" for k in ("min", "median", "p90", "p99", "max")) \
        + f"  (n={s['n']})"


def print_breakdown(rows: list[dict[str, float | None]], keys: Iterable[str]) -> dict[str, Any]:
    """Median / p90 / max of each breakdown column over the rounds that have it."""
    out = {}
    for key in keys:
        vals = [r[key] for r in rows if r.get(key) is not None]
        s = stats([v for v in vals if v is not None])
        out[key] = s
        print(f"  {key:<24} {fmt(s)}", flush=True)
    return out


# --- the cluster -----------------------------------------------------------------------


def bench_ips(first: int, count: int) -> list[str]:
    """``127.0.6.<first>`` ...: away from the 127.0.0.x the tests use."""
    assert first > 1, first
    assert first + count - 1 < 255, (first, count)
    return [f"127.0.6.{i}" for i in range(first, first + count)]


def raft_status(d: Daemon) -> dict[str, Any]:
    return d.api("raft_status")  # type: ignore[no-any-return]


def raft_complete(d: Daemon, cluster: Cluster) -> bool:
    """``d`` knows a leader and ``min(3, nodes)`` voters, and every other node keeps
    a replica (a learner, or a watcher fed by a voter's watch stream: a node without
    one would learn of its allocations late)."""
    st = raft_status(d)
    names = {x.name for x in cluster}
    if not st["leader"] or len(st["voters"]) != min(3, len(names)):
        return False
    others = names - set(st["voters"]) - set(st["learners"])
    return all(watching(cluster[n]) for n in others)


def watching(d: Daemon) -> bool:
    """``d`` is fed by a voter's watch stream."""
    st = raft_status(d)
    return st.get("feed") == "watch" and bool((st.get("watch") or {}).get("source"))


def remove_containers(names: Iterable[str]) -> None:
    """``docker rm -f`` every container labelled ``mesh.node=<name>`` (ours only)."""
    for name in names:
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", "label=mesh.managed=true",
                              "--filter", f"label=mesh.node={name}"],
                             capture_output=True, text=True, check=False).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)


@contextlib.contextmanager
def workload_cluster(args: argparse.Namespace) -> Iterator[Cluster]:
    """``--nodes`` daemons, formed, with a leader; everything they ran is killed on
    the way out."""
    base = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    cluster = Cluster(base, profile=args.profile)
    for i, ip in enumerate(bench_ips(args.first_ip, args.nodes)):
        cluster.add(f"{NODE_PREFIX}{i}", ip,
                    extra_args=["--driver", args.driver, "--dns-bind", f"{ip}:0",
                                "--log-level", args.log_level])
    try:
        t0 = time.monotonic()
        cluster.start(timeout_s=FORM_TIMEOUT_S)
        cluster.wait_formed(FORM_TIMEOUT_S)
        first = next(iter(cluster))
        cluster.wait_until(lambda: raft_complete(first, cluster), FORM_TIMEOUT_S,
                           "a leader, its voters, every other node a replica")
        print(f"{args.nodes} daemons ({args.profile} profile, driver {args.driver}) on "
              f"{first.ip}-{list(cluster)[-1].ip} formed in {time.monotonic() - t0:.1f}s; "
              f"data dirs and logs in {base}", flush=True)
        yield cluster
    finally:
        cluster.close()
        kill_workloads(cluster)
        if args.driver == "docker":
            remove_containers(d.name for d in cluster)
        if args.keep:
            print(f"kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


def service_doc(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The user form of the benchmarked service."""
    if args.driver == "docker":
        doc: dict[str, Any] = {"image": DOCKER_IMAGE, "health": {"tcp": ""},
                               "command": ["sh", "-c", "exec httpd -f -p $MESH_HOST:$PORT"]}
    else:
        doc = {"health": {"http": "/"}, "command": [
            "sh", "-c", f"exec {sys.executable} -m http.server --bind $MESH_HOST $PORT"]}
    if args.health_interval:
        doc["health"]["interval"] = args.health_interval
    return {"name": name, "driver": args.driver, "replicas": args.replicas,
            "ports": [{"name": "http"}], **doc}


def meshctl_argv(args: argparse.Namespace, d: Daemon, name: str) -> list[str]:
    """``meshctl run`` for the same service."""
    argv = [sys.executable, "-m", "mesh.node.cli", "--socket", str(d.socket_path), "run",
            "--driver", args.driver, "--name", name, "--replicas", str(args.replicas),
            "--port", "http"]
    if args.health_interval:
        argv += ["--health-interval", args.health_interval]
    if args.driver == "docker":
        return argv + ["--health-tcp", DOCKER_IMAGE, "sh", "-c",
                       "exec httpd -f -p $MESH_HOST:$PORT"]
    return argv + ["--health-http", "/", "--", "sh", "-c",
                   f"exec {sys.executable} -m http.server --bind $MESH_HOST $PORT"]


def apply(d: Daemon, args: argparse.Namespace, name: str) -> None:
    spec = parse_spec(service_doc(args, name), source="bench").to_dict()
    d.api("service_apply", {"specs": [spec]})


def live_allocs(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [a for a in d.api("service_ps", {"service": name}) if a["desired"] == "run"]


def poll(check: Any, timeout_s: float) -> Any:
    """``check()`` every :data:`POLL_S` until truthy (API errors count as "not yet");
    ``None`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except (MeshError, ApiUnavailable, OSError):
            result = None
        if result:
            return result
        time.sleep(POLL_S)
    return None


def converged(d: Daemon, name: str, replicas: int) -> bool:
    rows = [r for r in d.api("service_ls") if r["name"] == name]
    return bool(rows) and rows[0]["converged"] and rows[0]["healthy"] == replicas


def wait_gone(cluster: Cluster, d: Daemon, name: str) -> None:
    cluster.wait_until(lambda: not any(a["service"] == name for a in d.api("service_ps")),
                       ROUND_TIMEOUT_S, f"every allocation of {name} gone")


# --- log breakdown ---------------------------------------------------------------------


class Logs:
    """The events every daemon logged since :meth:`mark`."""

    def __init__(self, cluster: Cluster) -> None:
        self._followers = {d.name: LogFollower(d.log_path) for d in cluster}
        self.events: list[tuple[str, LogEvent]] = []

    def mark(self) -> None:
        for f in self._followers.values():
            f.skip_to_end()
        self.events = []

    def read(self) -> None:
        for name, f in self._followers.items():
            self.events.extend((name, e) for e in f.poll())
        self.events.sort(key=lambda ne: ne[1].ts)

    def first(self, event: str, since: float, node: str | None = None,
              **fields: str) -> LogEvent | None:
        for name, e in self.events:
            if (e.event == event and e.ts >= since and (node is None or name == node)
                    and all(e.fields.get(k) == v for k, v in fields.items())):
                return e
        return None

    def per_alloc(self, event: str, since: float, allocs: set[str],
                  **fields: str) -> dict[str, float]:
        """The first ``event`` of each allocation in ``allocs``: ``{alloc: ts}``."""
        out: dict[str, float] = {}
        for _, e in self.events:
            alloc = e.fields.get("alloc")
            if (e.event == event and e.ts >= since and alloc in allocs and alloc not in out
                    and all(e.fields.get(k) == v for k, v in fields.items())):
                out[alloc] = e.ts
        return out


def rel(ts: float | None, t0: float) -> float | None:
    return None if ts is None else round(ts - t0, 3)


def start_breakdown(logs: Logs, t0: float, new: set[str]) -> dict[str, float | None]:
    """When the new allocations were started and became healthy, relative to ``t0``;
    ``health_max``: the longest workload_starting -> healthy of one allocation."""
    starting = logs.per_alloc("workload_starting", t0 - 0.001, new)
    healthy = logs.per_alloc("workload_health", t0 - 0.001, new, health="healthy")
    per = [healthy[a] - starting[a] for a in new if a in starting and a in healthy]
    return {
        "start_first": rel(min(starting.values()), t0) if starting else None,
        "start_last": rel(max(starting.values()), t0) if len(starting) == len(new) else None,
        "healthy_first": rel(min(healthy.values()), t0) if healthy else None,
        "healthy_last": rel(max(healthy.values()), t0) if len(healthy) == len(new) else None,
        "start_to_healthy_max": round(max(per), 3) if per else None,
        "start_to_healthy_median": round(statistics.median(per), 3) if per else None,
    }


# --- heal ------------------------------------------------------------------------------


def stable(cluster: Cluster, args: argparse.Namespace, leftovers: Daemon, old: set[str]
           ) -> None:
    """Everyone alive, a leader with its voters and replicas, the service converged
    on live nodes with nothing stopping, and ``leftovers`` has removed its old workloads."""
    cluster.wait_formed(FORM_TIMEOUT_S)
    obs = next(d for d in cluster if d is not leftovers)

    def ok() -> bool:
        if not raft_complete(obs, cluster):
            return False
        allocs = obs.api("service_ps", {"service": SERVICE})
        if len(allocs) != args.replicas or any(a["desired"] != "run" for a in allocs):
            return False
        if not converged(obs, SERVICE, args.replicas):
            return False
        removed = {e.fields.get("alloc") for e in leftovers.log_events("workload_removed")}
        return old <= removed

    cluster.wait_until(ok, ROUND_TIMEOUT_S * 2, "the cluster to settle after the restart")


def heal(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    with workload_cluster(args) as cluster:
        entry = cluster[f"{NODE_PREFIX}0"]
        t0 = time.time()
        apply(entry, args, SERVICE)
        cluster.wait_until(lambda: converged(entry, SERVICE, args.replicas), ROUND_TIMEOUT_S,
                           f"{SERVICE}: {args.replicas} healthy")
        print(f"service {SERVICE}: {args.replicas} replicas healthy "
              f"{time.time() - t0:.2f}s after service_apply", flush=True)
        logs = Logs(cluster)
        for r in range(args.rounds):
            obs0 = next(d for d in cluster if d.running())
            before = live_allocs(obs0, SERVICE)
            hosts = sorted({a["node"] for a in before})
            victim = cluster[rng.choice(hosts)]
            leader = raft_status(obs0)["leader"]
            on_victim = {a["id"] for a in before if a["node"] == victim.name}
            survivors = [d for d in cluster if d is not victim]
            obs = rng.choice(survivors)
            logs.mark()
            killed_at = victim.kill()

            def healed(obs: Daemon = obs, victim: Daemon = victim) -> list[dict[str, Any]]:
                allocs = live_allocs(obs, SERVICE)
                ok = (len(allocs) == args.replicas
                      and all(a["node"] != victim.name and a["state"] == "running"
                              and a["healthy"] for a in allocs))
                return allocs if ok else []

            after = poll(healed, ROUND_TIMEOUT_S)
            healed_at = time.time()
            row: dict[str, Any] = {"round": r + 1, "victim": victim.name,
                                   "victim_was_leader": victim.name == leader,
                                   "moved": len(on_victim)}
            if after is None:
                row["heal_s"] = None
                print(f"round {r + 1}: {victim.name} killed; NOT healed within "
                      f"{ROUND_TIMEOUT_S:g}s", flush=True)
            else:
                row["heal_s"] = round(healed_at - killed_at, 3)
                time.sleep(0.3)  # let the last lines reach the log files
                logs.read()
                new = {a["id"] for a in after} - {a["id"] for a in before}
                row.update(heal_breakdown(logs, killed_at, victim.name, new))
                print(f"round {r + 1}: {victim.name} killed ({len(on_victim)} replicas"
                      f"{', Raft leader' if row['victim_was_leader'] else ''}); healed after "
                      f"{row['heal_s']:.3f}s  [dead on leader {row['dead_on_leader']}, plan "
                      f"{row['plan_committed']}, starting {row['start_first']}-"
                      f"{row['start_last']}, healthy {row['healthy_first']}-"
                      f"{row['healthy_last']}; leader {row['planner']}]", flush=True)
            rounds.append(row)
            victim.start(timeout_s=FORM_TIMEOUT_S)
            stable(cluster, args, victim, on_victim)
            time.sleep(args.settle)
    times = [r["heal_s"] for r in rounds if r["heal_s"] is not None]
    s = stats(times)
    print(f"time to heal ({args.driver} driver): {fmt(s)}; not healed: "
          f"{sum(1 for r in rounds if r['heal_s'] is None)}; victim was the leader in "
          f"{sum(1 for r in rounds if r['victim_was_leader'])} of {len(rounds)} rounds",
          flush=True)
    leader_rounds = [r["heal_s"] for r in rounds
                     if r["victim_was_leader"] and r["heal_s"] is not None]
    follower_rounds = [r["heal_s"] for r in rounds
                       if not r["victim_was_leader"] and r["heal_s"] is not None]
    print(f"  victim was leader:      {fmt(stats(leader_rounds))}", flush=True)
    print(f"  victim was not leader:  {fmt(stats(follower_rounds))}", flush=True)
    print("breakdown (seconds after the kill):", flush=True)
    breakdown = print_breakdown(rounds, HEAL_KEYS)
    return {"bench": "workloads_heal", "driver": args.driver, "nodes": args.nodes,
            "replicas": args.replicas, "profile": args.profile, "heal": s,
            "heal_victim_leader": stats(leader_rounds),
            "heal_victim_follower": stats(follower_rounds),
            "breakdown": breakdown, "rounds": rounds}


HEAL_KEYS = ("suspect_first", "dead_first", "dead_on_leader", "leader_elected",
             "plan_committed", "start_first", "start_last", "healthy_first", "healthy_last",
             "start_to_healthy_median", "start_to_healthy_max", "heal_s")


def heal_breakdown(logs: Logs, t0: float, victim: str, new: set[str]
                   ) -> dict[str, float | str | None]:
    """Per-round times (relative to the kill) from the survivors' logs."""
    since = t0 - 0.001
    plan = logs.first("plan_committed", since)
    planner = None
    if plan is not None:
        planner = next(n for n, e in logs.events if e is plan)
    elected = logs.first("raft_become_leader", since)
    suspect = logs.first("member_suspect", since, peer=victim)
    dead = logs.first("member_dead", since, peer=victim)
    dead_leader = logs.first("member_dead", since, planner, peer=victim) if planner else None
    return {"planner": planner,
            "suspect_first": rel(suspect.ts if suspect else None, t0),
            "dead_first": rel(dead.ts if dead else None, t0),
            "dead_on_leader": rel(dead_leader.ts if dead_leader else None, t0),
            "leader_elected": rel(elected.ts if elected else None, t0),
            "plan_committed": rel(plan.ts if plan else None, t0),
            **start_breakdown(logs, t0, new)}


# --- run -------------------------------------------------------------------------------


RUN_KEYS = ("committed", "plan_committed", "start_first", "start_last", "healthy_first",
            "healthy_last", "start_to_healthy_median", "start_to_healthy_max", "converged")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    api_rows: list[dict[str, Any]] = []
    cli_rows: list[dict[str, Any]] = []
    env = {k: v for k, v in daemon_env(args.pythonpath).items() if not k.startswith("MESH_")}
    with workload_cluster(args) as cluster:
        logs = Logs(cluster)
        nodes = list(cluster)
        leader = raft_status(nodes[0])["leader"]
        for r in range(args.rounds):
            d = nodes[r % len(nodes)]
            # through the API
            name = f"api{r}"
            logs.mark()
            t0 = time.time()
            apply(d, args, name)
            committed = time.time()
            ok = poll(lambda d=d, name=name: converged(d, name, args.replicas), ROUND_TIMEOUT_S)
            done = time.time()
            row: dict[str, Any] = {"round": r + 1, "via": d.name, "via_leader": d.name == leader,
                                   "converged": round(done - t0, 3) if ok else None,
                                   "committed": round(committed - t0, 3)}
            time.sleep(0.3)
            logs.read()
            new = {a["id"] for a in live_allocs(d, name)}
            plan = logs.first("plan_committed", t0 - 0.001)
            row["plan_committed"] = rel(plan.ts if plan else None, t0)
            row.update(start_breakdown(logs, t0, new))
            api_rows.append(row)
            print(f"round {r + 1} api via {d.name}: all {args.replicas} healthy after "
                  f"{row['converged']}s  [committed {row['committed']}, plan "
                  f"{row['plan_committed']}, starting {row['start_first']}-"
                  f"{row['start_last']}, healthy {row['healthy_first']}-"
                  f"{row['healthy_last']}]", flush=True)
            d.api("service_rm", {"name": name})
            wait_gone(cluster, d, name)
            # through meshctl
            name = f"cli{r}"
            logs.mark()
            t0 = time.time()
            proc = subprocess.Popen(meshctl_argv(args, d, name), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, text=True)
            ok = poll(lambda d=d, name=name: converged(d, name, args.replicas), ROUND_TIMEOUT_S)
            seen = time.time()
            out, err = proc.communicate(timeout=ROUND_TIMEOUT_S)
            exited = time.time()
            if proc.returncode != 0:
                raise SystemExit(f"meshctl run failed ({proc.returncode}):\n{out}\n{err}")
            time.sleep(0.3)
            logs.read()
            new = {a["id"] for a in live_allocs(d, name)}
            plan = logs.first("plan_committed", t0 - 0.001)
            crow: dict[str, Any] = {"round": r + 1, "via": d.name,
                                    "converged": round(seen - t0, 3) if ok else None,
                                    "meshctl_exit": round(exited - t0, 3),
                                    "plan_committed": rel(plan.ts if plan else None, t0)}
            crow.update(start_breakdown(logs, t0, new))
            cli_rows.append(crow)
            print(f"round {r + 1} meshctl via {d.name}: API shows all healthy after "
                  f"{crow['converged']}s, meshctl exits after {crow['meshctl_exit']}s  [plan "
                  f"{crow['plan_committed']}, starting {crow['start_first']}-"
                  f"{crow['start_last']}, healthy {crow['healthy_first']}-"
                  f"{crow['healthy_last']}]", flush=True)
            d.api("service_rm", {"name": name})
            wait_gone(cluster, d, name)
    api_s = stats([r["converged"] for r in api_rows if r["converged"] is not None])
    cli_seen = stats([r["converged"] for r in cli_rows if r["converged"] is not None])
    cli_exit = stats([r["meshctl_exit"] for r in cli_rows])
    print(f"service_apply -> {args.replicas} healthy ({args.driver}): {fmt(api_s)}", flush=True)
    print(f"meshctl run spawned -> API shows all healthy: {fmt(cli_seen)}", flush=True)
    print(f"meshctl run spawned -> meshctl exits:        {fmt(cli_exit)}", flush=True)
    print("breakdown, service_apply rounds (seconds after the call):", flush=True)
    api_b = print_breakdown(api_rows, RUN_KEYS)
    print("breakdown, meshctl rounds (seconds after spawning meshctl):", flush=True)
    cli_b = print_breakdown(cli_rows, (*RUN_KEYS, "meshctl_exit"))
    return {"bench": "workloads_run", "driver": args.driver, "nodes": args.nodes,
            "replicas": args.replicas, "profile": args.profile, "api": api_s,
            "meshctl_converged": cli_seen, "meshctl_exit": cli_exit,
            "api_breakdown": api_b, "meshctl_breakdown": cli_b,
            "api_rounds": api_rows, "meshctl_rounds": cli_rows}


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, rounds in (("heal", 20), ("run", 10)):
        p = sub.add_parser(name)
        p.add_argument("--nodes", type=int, default=5)
        p.add_argument("--replicas", type=int, default=10)
        p.add_argument("--rounds", type=int, default=rounds)
        p.add_argument("--driver", choices=["process", "docker"], default="process")
        p.add_argument("--profile", default="lan", help="gossip profile (default lan)")
        p.add_argument("--health-interval", default=None,
                       help="health check interval, e.g. 0.5s (default: the spec's, 2s)")
        p.add_argument("--log-level", default="debug",
                       help="daemons' log level (debug: plan_committed is logged)")
        p.add_argument("--first-ip", type=int, default=10, help="127.0.6.<first-ip> and up")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--settle", type=float, default=3.0,
                       help="heal: seconds of quiet after the cluster is stable again")
        p.add_argument("--pythonpath", default=None,
                       help="run the daemons from the mesh package in DIR")
        p.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = parser.parse_args()
    info = {"machine": machine(), "code": code_under_test(args.pythonpath)}
    print(f"machine: {info['machine']}; code: {info['code']}", flush=True)
    with terminate_as_interrupt(), environment(daemon_env(args.pythonpath)), \
            LoadSampler() as load:
        try:
            result = heal(args) if args.command == "heal" else run_bench(args)
        except DaemonError as exc:
            raise SystemExit(f"bench failed: {exc}") from None
    result.update(info, loadavg_1m=load.figures(), seed=args.seed,
                  health_interval=args.health_interval, argv=sys.argv[1:])
    print(f"load average (1 min) during the run: {result['loadavg_1m']}", flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
