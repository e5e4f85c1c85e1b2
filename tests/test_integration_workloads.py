"""Integration: workloads on real ``meshd`` processes with the process driver.

``meshctl run`` from any node places, starts and health-checks replicas, DNS answers
for them on every node, scaling and draining move them, a SIGKILLed node's replicas
come back elsewhere, a restarted meshd adopts what it ran, and a failing update is
rolled back. Daemons run on 127.0.0.150-127.0.0.159 and every test kills what it
started (workloads included). Tests wait on conditions, never on a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Cluster, Daemon, loopback_ips, meshctl
from dnslib import QTYPE, DNSRecord

FORM_TIMEOUT_S = 30.0



def run_web(d: Daemon, *extra: str) -> subprocess.CompletedProcess[str]:
    # the command goes through sh so that $PORT and $MESH_HOST are expanded
    cmd = ["run", "--driver", "process", "--name", "web", *extra, "--port", "http",
           "--health-http", "/", "--", "sh", "-c",
           f"exec {sys.executable} -m http.server --bind $MESH_HOST $PORT"]
    return meshctl(d, *cmd)


def service(d: Daemon, name: str, *, stale: bool = False) -> dict[str, Any]:
    rows = [r for r in d.api("service_ls", {"stale": stale}) if r["name"] == name]
    assert rows, f"no service {name}"
    return rows[0]  # type: ignore[no-any-return]


def allocs(d: Daemon, name: str, *, stale: bool = False) -> list[dict[str, Any]]:
    return [a for a in d.api("service_ps", {"service": name, "stale": stale})
            if a["desired"] == "run"]


def dns_addrs(d: Daemon, qname: str) -> set[str]:
    host, port = d.info()["dns"].rsplit(":", 1)
    reply = DNSRecord.parse(DNSRecord.question(qname, "A").send(host, int(port), timeout=2))
    return {str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A}


def kill_workloads(cluster: Cluster) -> None:
    """Stop every workload process the daemons left behind (they outlive meshd)."""
    for d in cluster:
        for state in (d.data_dir / "allocs").glob("*/workload.json"):
            try:
                pid = json.loads(state.read_text())["pid"]
                os.killpg(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


@pytest.fixture
def four(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, profile="local") as cluster:
        for i, ip in enumerate(loopback_ips(150, 4)):
            cluster.add(f"n{i}", ip, extra_args=["--driver", "process", "--dns-bind",
                                                 f"{ip}:0"])
        try:
            cluster.start()
            cluster.wait_formed(FORM_TIMEOUT_S)
            yield cluster
        finally:
            cluster.close()
            kill_workloads(cluster)


def test_run_dns_scale_drain_and_heal_after_sigkill(four: Cluster) -> None:
    n0, n3 = four["n0"], four["n3"]
    done = run_web(n3, "--replicas", "3")   # from a node that is not the leader, likely
    assert done.returncode == 0, done.stderr
    assert "web: 3/3 healthy" in done.stdout
    placed = allocs(n0, "web")
    assert len(placed) == 3
    assert all(a["state"] == "running" and a["healthy"] for a in placed)
    assert len({a["node"] for a in placed}) == 3          # spread: one per node
    # every node answers DNS with the three replicas' addresses
    expected = {a["address"] for a in placed}
    for d in four:
        four.wait_until(lambda d=d: dns_addrs(d, "web.service.mesh") == expected, 10,
                        f"{d.name} to answer web.service.mesh")

    scaled = meshctl(n0, "scale", "web=5")
    assert scaled.returncode == 0, scaled.stderr
    assert service(n0, "web")["healthy"] == 5

    victim = four[placed[0]["node"]]
    survivors = [d for d in four if d is not victim]
    victim.kill()

    def healed() -> bool:
        row = service(survivors[0], "web")
        live = allocs(survivors[0], "web")
        return (row["healthy"] == 5 and len(live) == 5
                and all(a["node"] != victim.name for a in live))

    four.wait_until(healed, 30, "web back to 5 healthy replicas on live nodes")
    for d in survivors:
        four.wait_until(lambda d=d: victim.ip not in dns_addrs(d, "web.service.mesh"), 10,
                        f"{d.name} to stop answering with the dead node")
    out = meshctl(survivors[0], "events", "--json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    seen = {(e["kind"], e["subject"], e["action"]) for e in events}
    assert ("member", victim.name, "dead") in seen
    assert ("service", "web", "created") in seen
    assert sum(e["kind"] == "alloc" and e["action"] == "placed" for e in events) >= 6

    # drain: the node's replicas move away, and it takes work again when activated
    drained = survivors[0]
    out = meshctl(n3 if n3 is not victim else survivors[1], "node", "drain", drained.name)
    assert out.returncode == 0, out.stderr
    four.wait_until(lambda: all(a["node"] != drained.name for a in allocs(survivors[1], "web"))
                    and service(survivors[1], "web")["healthy"] == 5, 30,
                    f"replicas to leave {drained.name}")
    nodes = {r["name"]: r for r in survivors[1].api("nodes")}
    assert nodes[drained.name]["availability"] == "drain"
    assert meshctl(survivors[1], "node", "activate", drained.name).returncode == 0

    removed = meshctl(survivors[1], "rm", "web")
    assert removed.returncode == 0, removed.stderr
    assert survivors[1].api("service_ps") == []


def test_unplaceable_service_says_why(four: Cluster) -> None:
    out = run_web(four["n1"], "--constraint", "node.labels.zone==mars", "--timeout", "3")
    assert out.returncode == 1
    assert "constraint" in out.stderr
    row = service(four["n0"], "web")
    assert row["healthy"] == 0
    assert "zone" in row["pending"]


def test_failed_update_is_rolled_back(four: Cluster) -> None:
    n1 = four["n1"]
    spec = {
        "name": "api", "driver": "process", "replicas": 2,
        "command": ["sh", "-c", f"exec {sys.executable} -m http.server --bind $MESH_HOST $PORT"],
        "ports": [{"name": "http"}], "health": {"http": "/", "interval": "1s"},
        "update": {"failure_action": "rollback"},
    }
    path = n1.data_dir.parent / "api.json"
    path.write_text(json.dumps(spec))
    first = meshctl(n1, "apply", "-f", str(path))
    assert first.returncode == 0, first.stderr
    again = meshctl(n1, "apply", "-f", str(path))   # idempotent
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    generation = service(n1, "api")["generation"]

    bad = meshctl(n1, "update", "api", "--command", "sh -c 'exit 3'", "--timeout", "60")
    assert bad.returncode == 1
    assert "rolled_back" in bad.stderr or "rollback" in bad.stderr

    def rolled_back() -> bool:
        row = service(n1, "api")
        return row["rollout"] == "rolled_back" and row["healthy"] == 2 and row["converged"]

    four.wait_until(rolled_back, 60, "api rolled back to its previous spec, 2 healthy")
    row = service(n1, "api")
    assert row["generation"] == generation + 2  # the failed one, then the rollback
    assert "http.server" in " ".join(row["command"])


def test_restarted_meshd_adopts_its_workloads(tmp_path: Path) -> None:
    with Cluster(tmp_path, profile="local") as cluster:
        (ip,) = loopback_ips(158, 1)
        solo = cluster.add("solo", ip, extra_args=["--driver", "process", "--dns-bind",
                                                   f"{ip}:0"])
        try:
            cluster.start()
            out = run_web(solo, "--replicas", "2")
            assert out.returncode == 0, out.stderr
            before = {a["id"]: a["ports"] for a in allocs(solo, "web")}
            pids = {p.parent.name: json.loads(p.read_text())["pid"]
                    for p in (solo.data_dir / "allocs").glob("*/workload.json")}
            assert len(pids) == 2
            solo.kill()
            for pid in pids.values():
                os.kill(pid, 0)   # the workloads outlive meshd
            solo.start()
            # a stale read: the restarted voter may not have re-elected itself yet
            cluster.wait_until(lambda: service(solo, "web", stale=True)["healthy"] == 2, 30,
                               "web healthy again after the restart")
            after = {a["id"]: a["ports"] for a in allocs(solo, "web", stale=True)}
            assert after == before                  # same allocations, same ports
            assert all(a["restarts"] == 0 for a in allocs(solo, "web", stale=True))
            now = {p.parent.name: json.loads(p.read_text())["pid"]
                   for p in (solo.data_dir / "allocs").glob("*/workload.json")}
            assert now == pids                      # adopted, not restarted
        finally:
            cluster.close()
            kill_workloads(cluster)


def test_a_job_runs_to_completion_and_a_crash_loop_backs_off(four: Cluster) -> None:
    n2 = four["n2"]
    job = meshctl(n2, "run", "--driver", "process", "--job", "--name", "once",
                  "--replicas", "2", "--", "sh", "-c", "echo hello from $MESH_ALLOC")
    assert job.returncode == 0, job.stderr
    assert "once: 2/2 complete" in job.stdout
    assert {a["state"] for a in allocs(n2, "once")} == {"complete"}
    out = meshctl(n2, "logs", "once")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("hello from once-") == 2
    follow = subprocess.Popen(
        [sys.executable, "-m", "mesh.node.cli", "--socket", str(n2.socket_path), "logs", "-f",
         "once"], stdout=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MESH_")})
    try:
        assert follow.stdout is not None
        first = [follow.stdout.readline() for _ in range(2)]
        assert all("hello from once-" in line for line in first)
    finally:
        follow.kill()
        follow.communicate()

    # a command that exits at once: restarts back off instead of burning the node
    bad = meshctl(n2, "run", "--driver", "process", "--name", "crashy", "--timeout", "4",
                  "--", "sh", "-c", "exit 7")
    assert bad.returncode == 1
    assert "exited with status 7" in bad.stderr
    (crashy,) = allocs(n2, "crashy")
    assert crashy["state"] in ("exited", "starting", "running")
    assert crashy["restarts"] <= 4      # 0.5 + 1 + 2 s of backoff fit in 4 s, no more
