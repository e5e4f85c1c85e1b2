"""Integration: real ``meshd`` processes on 127.0.0.x form a cluster, detect deaths,
see graceful leaves, rejoin after a restart, and survive bad input.

Every daemon runs as ``python -m mesh.node.daemon start`` on its own loopback address
(127.0.0.10-127.0.0.32 here) with its own data dir under pytest's tmp dir; each test
kills what it started, by PID, in its fixture's teardown (:class:`daemons.Cluster`).
Tests wait for conditions read through the local API, never for a fixed time; the
timeouts are generous bounds for a loaded machine, not performance goals (``bench/``
measures those).

Most tests use ``--gossip-profile local`` for speed; the SIGKILL test runs the default
(``lan``) profile that operators get.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import GOSSIP_PORT, Cluster, Daemon, loopback_ips, metric, wait_for

FORM_TIMEOUT_S = 30.0
"""Bound on a cluster forming (process start-ups dominate on a loaded machine)."""

DETECT_TIMEOUT_S = 20.0
"""Bound on every survivor seeing a killed node dead (``lan``: about 2-3 s)."""

EXIT_TIMEOUT_S = 20.0
"""Bound on ``meshd`` failing to start and exiting."""

MEMBER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "address": str, "status": str, "incarnation": int, "labels": dict,
    "age": (int, float)}


def _cluster(base: Path, first_ip: int, n: int, profile: str = "local") -> Cluster:
    cluster = Cluster(base, profile=profile)
    for i, ip in enumerate(loopback_ips(first_ip, n)):
        cluster.add(f"n{i}", ip, labels={"zone": f"z{i % 2}", "idx": str(i)})
    return cluster


@pytest.fixture(scope="module")
def formed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Five nodes (local profile) that every read-only test shares."""
    with _cluster(tmp_path_factory.mktemp("formed"), 10, 5) as cluster:
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        yield cluster


def _run_meshctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.node.cli", "--socket",
                           str(d.socket_path), *args],
                          capture_output=True, text=True, timeout=30, check=False)


def _run_meshd_expecting_failure(tmp_path: Path, *args: str) -> list[str]:
    """Run ``meshd start ARGS``; assert it exits with status 1; return its stderr lines."""
    proc = subprocess.run([sys.executable, "-m", "mesh.node.daemon", "start", *args],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, f"meshd exited {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines


# --- a formed cluster ---------------------------------------------------------------


def test_cluster_forms_and_members_json_has_the_contract_fields(formed: Cluster) -> None:
    names = {d.name for d in formed}
    # Every node lists every node alive (read through the API, as meshctl does).
    for observer, view in formed.views().items():
        assert set(view) == names, observer
        assert {m["status"] for m in view.values()} == {"alive"}, (observer, view)
    # The meshctl command itself (one node is enough: each start-up costs a second).
    proc = _run_meshctl(formed["n1"], "members", "--json")
    assert proc.returncode == 0, proc.stderr
    members = json.loads(proc.stdout)
    assert {m["name"] for m in members} == names
    for m in members:
        for key, kind in MEMBER_FIELDS.items():
            assert isinstance(m.get(key), kind), f"field {key} of {m}"
        assert m["status"] == "alive", m
        assert m["address"] == formed[m["name"]].addr
        assert m["age"] >= 0
    table = _run_meshctl(formed["n0"], "members")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[:6] == ["NAME", "ADDRESS", "STATUS", "INCARNATION", "LABELS",
                                        "AGE"]


def test_labels_propagate_to_every_member(formed: Cluster) -> None:
    for observer, view in formed.views().items():
        for d in formed:
            assert view[d.name]["labels"] == d.labels, f"{observer} sees {view[d.name]}"


def test_metrics_endpoint_serves_gossip_counters(formed: Cluster) -> None:
    d = formed["n1"]
    text = d.metrics_text()
    assert "meshd_gossip_probes_total" in text
    assert "meshd_gossip_members" in text
    samples = formed["n1"].metrics()
    assert metric(samples, "meshd_gossip_members", status="alive") == len(formed.daemons)
    assert metric(samples, "meshd_gossip_probes_total") > 0


def test_api_socket_is_owner_only(formed: Cluster) -> None:
    for d in formed:
        mode = os.stat(d.socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, f"{d.socket_path} has mode {oct(mode)}"


def _garbage(rng: random.Random) -> list[bytes]:
    """Datagrams that must all be rejected: empty, random, a gossip header with a
    broken body, a foreign protocol version, truncated and oversized."""
    out = [b"", b"\x01", b"\x01\x00", b"\x01\x00\x01", b"\x09\x00\x01\x90",
           b"\x01\x00\x00\x90", b"\x01\x00\x01\xdc\xff\xff", b"\x01\x00\x01" + b"\x91" * 200,
           bytes(60_000)]
    out += [rng.randbytes(rng.randrange(1, 1400)) for _ in range(20)]
    out += [b"\x01\x00\x01" + rng.randbytes(rng.randrange(1, 500)) for _ in range(20)]
    return out


def test_garbage_datagrams_are_dropped_and_counted(formed: Cluster) -> None:
    target = formed["n2"]
    before = metric(target.metrics(), "meshd_gossip_packets_malformed_total")
    datagrams = _garbage(random.Random(7))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.29", 0))
        for data in datagrams:
            sock.sendto(data, (target.ip, target.port))

    def counted() -> float:
        target.check_running()
        now = metric(target.metrics(), "meshd_gossip_packets_malformed_total")
        return now if now >= before + len(datagrams) else 0.0

    wait_for(counted, 10, f"{len(datagrams)} more malformed datagrams counted by n2")
    assert target.info()["name"] == "n2"
    formed.wait_status("n2", "alive", 10)


def _send_tcp_garbage(d: Daemon, rng: random.Random) -> int:
    """Open several connections to the gossip TCP port and send bad frames; return
    how many carried a complete (but malformed) frame."""
    complete = [
        b"\x00\x00\x00\x04\x01\x00\x02\xc1",               # reserved msgpack byte
        b"\x00\x00\x00\x04\x09\x00\x02\x90",               # foreign major version
        b"\x00\x00\x00\x04\x01\x00\x03\x90",               # a reply nobody asked for
    ]
    body = rng.randbytes(300)
    complete.append(len(body).to_bytes(4, "big") + body)   # random envelope
    incomplete = [b"\xff\xff\xff\xff" + rng.randbytes(100),  # oversized frame
                  rng.randbytes(3)]                         # closed before a prefix
    for data in complete + incomplete:
        with socket.create_connection((d.ip, d.port), timeout=5) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            # The daemon closes the connection without answering.
            assert sock.recv(100) == b""
    return len(complete)


def test_garbage_tcp_streams_do_not_hurt_the_node(formed: Cluster) -> None:
    target = formed["n3"]
    _send_tcp_garbage(target, random.Random(11))
    target.check_running()
    assert target.info()["name"] == "n3"
    formed.wait_status("n3", "alive", 10)


def test_garbage_on_the_tls_port_is_counted(formed: Cluster) -> None:
    target = formed["n4"]
    name = "meshd_tls_handshake_failures_total"
    before = metric(target.metrics(), name)
    complete = _send_tcp_garbage(target, random.Random(13))
    formed.wait_until(lambda: metric(target.metrics(), name) >= before + complete, 5,
                      f"{name} to count the garbage connections")


# --- failures and departures ----------------------------------------------------------


def test_sigkilled_node_is_declared_dead_by_all_with_the_default_profile(
        tmp_path: Path) -> None:
    with _cluster(tmp_path, 15, 4, profile="lan") as cluster:
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        victim = cluster["n2"]
        victim.kill()
        seen = cluster.wait_status("n2", "dead", DETECT_TIMEOUT_S)
        assert set(seen) == {"n0", "n1", "n3"}
        # The others stay alive for each other.
        cluster.wait_formed(10)


def test_sigterm_leaves_gracefully_and_exits_0(tmp_path: Path) -> None:
    with _cluster(tmp_path, 19, 3) as cluster:
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        leaver = cluster["n1"]
        leaver.signal(signal.SIGTERM)
        assert leaver.wait_exit(10) == 0, leaver.log_tail()
        seen = cluster.wait_status("n1", "left", 10)
        assert set(seen) == {"n0", "n2"}
        assert not leaver.socket_path.exists(), "the API socket file was left behind"


def _peers_file(d: Daemon) -> set[str]:
    return set(json.loads((d.data_dir / "peers.json").read_text())["peers"])


def test_restarted_node_rejoins_from_peers_json_with_a_higher_incarnation(
        tmp_path: Path) -> None:
    with _cluster(tmp_path, 22, 3) as cluster:
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        # The seed: it saw the others join, so it wrote peers.json.
        node = cluster["n0"]
        others = {cluster["n1"].addr, cluster["n2"].addr}
        cluster.wait_until(lambda: _peers_file(node) == others, 10,
                           "n0 to write both peers to peers.json")
        node.kill()
        dead = cluster.wait_status("n0", "dead", DETECT_TIMEOUT_S)
        old = max(m["incarnation"] for m in dead.values())
        # Same data dir and address, no --join, and a changed label, which must
        # spread by gossip with the new incarnation.
        node.labels["zone"] = "moved"
        node.start()
        cluster.wait_status("n0", "alive", DETECT_TIMEOUT_S,
                            where=lambda m: m["incarnation"] > old
                            and m["labels"].get("zone") == "moved")
        cluster.wait_formed(10)
        assert node.info()["incarnation"] > old


def test_last_joiner_remembers_its_peers(tmp_path: Path) -> None:
    with _cluster(tmp_path, 30, 3) as cluster:
        cluster.start([cluster["n0"], cluster["n1"]])
        cluster.wait_formed(FORM_TIMEOUT_S)
        cluster["n2"].start(join=[cluster["n0"].addr])
        cluster.wait_formed(FORM_TIMEOUT_S)
        others = {cluster["n0"].addr, cluster["n1"].addr}
        # peers.json is written 1 s after a change (PEERS_WRITE_DELAY_S).
        cluster.wait_until(lambda: _peers_file(cluster["n2"]) == others, 5,
                           "n2 to write both peers to peers.json")


# --- start-up errors ------------------------------------------------------------------


def test_port_in_use_exits_1_with_one_clear_line(formed: Cluster, tmp_path: Path) -> None:
    busy = formed["n0"]
    lines = _run_meshd_expecting_failure(tmp_path, "--data-dir", str(tmp_path / "d"),
                                         "--bind", busy.addr, "--name", "intruder")
    assert len([line for line in lines if "in use" in line]) == 1, lines
    busy.check_running()


WELL_FORMED_TOKEN = "MESH1-" + "ab" * 32 + "-" + "a" * 52


def test_unreachable_join_exits_1(tmp_path: Path) -> None:
    lines = _run_meshd_expecting_failure(
        tmp_path, "--data-dir", str(tmp_path / "d"), "--bind", f"127.0.0.25:{GOSSIP_PORT}",
        "--name", "lonely", "--join", f"127.0.0.26:{GOSSIP_PORT}", "--gossip-profile", "local",
        "--token", WELL_FORMED_TOKEN)
    assert len([line for line in lines if "cannot reach 127.0.0.26" in line]) == 1, lines


def test_join_without_token_exits_1_saying_where_to_get_one(tmp_path: Path) -> None:
    lines = _run_meshd_expecting_failure(
        tmp_path, "--data-dir", str(tmp_path / "d"), "--bind", f"127.0.0.28:{GOSSIP_PORT}",
        "--name", "tokenless", "--join", f"127.0.0.26:{GOSSIP_PORT}")
    assert len([line for line in lines if "meshctl token" in line]) == 1, lines


def test_unwritable_data_dir_exits_1(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes through any mode bits: make the path unusable instead.
        (tmp_path / "file").write_text("not a directory")
        data_dir = tmp_path / "file" / "d"
    else:
        data_dir = tmp_path / "ro"
        data_dir.mkdir(mode=0o500)
    lines = _run_meshd_expecting_failure(tmp_path, "--data-dir", str(data_dir),
                                         "--bind", f"127.0.0.27:{GOSSIP_PORT}", "--name", "ro")
    assert len([line for line in lines if "not writable" in line]) == 1, lines
