"""Integration: the trust life cycle of real ``meshd`` processes.

Bootstrap on the first node, token joins (through any member), the CA held by Raft
(every voter issues, also once the first node is gone), restarts without a token,
remote ``meshctl`` over mutual TLS with the admin certificate, token rotation from
any node, gossip key rotation without downtime, and ``meshctl node rm``. Daemons run on
127.0.0.100-127.0.0.129 (see ``tests/daemons.py``); every test kills what it started.
Tests wait on conditions, never on a fixed time.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Cluster, Daemon, loopback_ips, metric

from mesh.node.trust import utc_now
from mesh.tls import bootstrap_first_node
from mesh.types import Addr, NodeId

FORM_TIMEOUT_S = 30.0
"""Bound on a cluster forming (process start-ups dominate on a loaded machine)."""

EXIT_TIMEOUT_S = 20.0
"""Bound on ``meshd`` failing to start and exiting."""


def _cluster(base: Path, first_ip: int, n: int, watchers: tuple[str, ...] = ()) -> Cluster:
    cluster = Cluster(base, profile="local")
    for i, ip in enumerate(loopback_ips(first_ip, n)):
        name = f"n{i}"
        cluster.add(name, ip, labels={"raft": "false"} if name in watchers else None)
    return cluster


def ca_recorded(d: Daemon) -> bool:
    """Whether ``d``'s replica records the CA and the join token (Raft holds them)."""
    ca = d.api("raft_status")["ca"]
    return bool(ca["ca_index"] and ca["token_index"])


def meshctl(*args: str, socket: Daemon | None = None) -> subprocess.CompletedProcess[str]:
    """Run meshctl (locally through ``socket``'s API, or with ``--addr`` in args)."""
    cmd = [sys.executable, "-m", "mesh.node.cli"]
    if socket is not None:
        cmd += ["--socket", str(socket.socket_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60,
                          check=False, env=env)


def meshd_fails(*args: str) -> str:
    """Run ``meshd start ARGS`` expecting exit status 1; return stderr."""
    proc = subprocess.run([sys.executable, "-m", "mesh.node.daemon", "start", *args],
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)
    assert proc.returncode == 1, f"meshd exited {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def trio3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n0 creates the cluster, n1 joins through n0, n2 joins through n1 (which never
    votes, so it never issues, and redirects n2 to an issuer)."""
    with _cluster(tmp_path_factory.mktemp("sec"), 100, 3, watchers=("n1",)) as cluster:
        n0, n1, n2 = cluster["n0"], cluster["n1"], cluster["n2"]
        n0.start()
        n1.token = n2.token = n0.join_token()
        n1.start(join=[n0.addr])
        n2.start(join=[n1.addr])
        cluster.wait_formed(FORM_TIMEOUT_S)
        yield cluster


def test_first_node_creates_private_trust_files(trio3: Cluster) -> None:
    d = trio3["n0"].data_dir
    for secret in ("tls/ca.key", "tls/node.key", "admin/key.pem", "gossip.keys", "join-token"):
        assert stat.S_IMODE((d / secret).stat().st_mode) == 0o600, secret
    # The CA key reaches other nodes through Raft only, never as a file.
    assert not (trio3["n1"].data_dir / "tls" / "ca.key").exists()
    assert "join_command" in trio3["n0"].log_text()


def test_join_through_a_node_without_ca_key_is_redirected(trio3: Cluster) -> None:
    log = trio3["n2"].log_events("join_redirected")
    assert log, trio3["n2"].log_tail()
    assert trio3["n2"].info()["members"]["alive"] == 3
    # The CA holder admitted both joins through its rate limits and counted them.
    metrics = trio3["n0"].metrics()
    assert metric(metrics, "meshd_tls_issuing") == 1
    assert metric(trio3["n1"].metrics(), "meshd_tls_issuing") == 0  # never votes
    assert metric(metrics, "meshd_join_accepted_total") >= 2
    assert metric(metrics, "meshd_join_attempts_total") >= 2


def test_remote_meshctl_over_mutual_tls(trio3: Cluster) -> None:
    admin = str(trio3["n0"].data_dir / "admin")
    ok = meshctl("--addr", trio3["n2"].addr, "--cert-dir", admin, "members", "--json")
    assert ok.returncode == 0, ok.stderr
    assert {m["name"] for m in json.loads(ok.stdout)} == {"n0", "n1", "n2"}
    no_cert = meshctl("--addr", trio3["n2"].addr, "members")
    assert no_cert.returncode == 1
    assert "--cert-dir" in no_cert.stderr
    # Admin credentials of another cluster (another CA) are refused.
    other = trio3.base_dir / "other-cluster"
    bootstrap_first_node(other, NodeId("x"), Addr("127.0.0.1", 1), "other", utc_now)
    foreign = meshctl("--addr", trio3["n2"].addr, "--cert-dir", str(other / "admin"), "info")
    assert foreign.returncode == 1
    assert "did not accept our certificate" in foreign.stderr or "handshake" in foreign.stderr


def test_admin_cert_issues_fresh_credentials_from_any_node(trio3: Cluster,
                                                          tmp_path: Path) -> None:
    n1 = trio3["n1"]  # never votes, so it does not issue: the leader signs
    trio3.wait_until(lambda: ca_recorded(n1), 20, "the CA to be recorded in Raft")
    out = tmp_path / "ops-admin"
    made = meshctl("admin", "cert", "--out", str(out), "--name", "ops", "--json", socket=n1)
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["name"] == "ops"
    assert summary["issuer"] != "n1"
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    ok = meshctl("--addr", trio3["n2"].addr, "--cert-dir", str(out), "members", "--json")
    assert ok.returncode == 0, ok.stderr
    # The key was made by meshctl; the node never saw it.
    assert "PRIVATE KEY" not in n1.log_text()


def test_garbage_and_foreign_datagrams_are_rejected_and_counted(trio3: Cluster) -> None:
    import socket

    target = trio3["n1"]
    before = metric(target.metrics(), "meshd_gossip_rejected_auth_total")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in (b"\x01" + os.urandom(60), os.urandom(200)):
            sock.sendto(payload, (target.ip, target.port))
    trio3.wait_until(
        lambda: metric(target.metrics(), "meshd_gossip_rejected_auth_total") >= before + 1,
        5, "the forged datagrams to be counted")
    trio3.wait_status("n1", "alive", 5)


def test_token_rotation_refuses_the_old_token_and_keeps_members(trio3: Cluster,
                                                                 tmp_path: Path) -> None:
    old = trio3["n0"].join_token()
    n1 = trio3["n1"]
    trio3.wait_until(lambda: ca_recorded(n1), 20, "the CA to be recorded in Raft")
    # n1 never votes and holds no CA key: `token` is answered by the leader, and
    # a rotation is a Raft write, which works from any node.
    shown = meshctl("token", "--json", socket=n1)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["token"] == old
    rotated = meshctl("token", "rotate", "--json", socket=n1)
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)["token"]
    assert new != old
    # It returned once every issuer served the new token (n0 only, so far).
    assert json.loads(rotated.stdout)["issuers"] == {"n0": "serving"}
    # The issuer applies the new token and keeps DIR/join-token current.
    trio3.wait_until(lambda: trio3["n0"].join_token() == new, 10,
                     "n0 to serve the rotated token")
    err = meshd_fails("--data-dir", str(tmp_path / "late"), "--bind", "127.0.0.110:17946",
                      "--name", "late", "--join", trio3["n0"].addr, "--token", old,
                      "--gossip-profile", "local")
    assert "wrong or was rotated" in err
    assert "meshctl token" in err
    trio3.wait_formed(10)


def test_restart_of_a_joined_node_needs_no_token(trio3: Cluster) -> None:
    n1 = trio3["n1"]
    trio3.wait_until(lambda: (n1.data_dir / "peers.json").exists(), 10, "n1's peers.json")
    n1.stop()
    n1.start()  # no --join, no --token: credentials and peers from the data dir
    trio3.wait_formed(FORM_TIMEOUT_S)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    with _cluster(tmp_path, 112, 1) as cluster:
        n0 = cluster["n0"]
        n0.start()
        n0.stop()
        key = n0.data_dir / "tls" / "node.key"
        os.chmod(key, 0o644)
        err = meshd_fails(*n0.command()[4:])
        assert f"chmod 600 {key}" in err


def test_gossip_key_rotation_has_no_downtime(tmp_path: Path) -> None:
    with _cluster(tmp_path, 115, 3) as cluster:
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        n0 = cluster["n0"]
        before = meshctl("keys", "list", "--json", socket=n0)
        old_id = json.loads(before.stdout)["nodes"]["n0"]["result"][0]["id"]
        installed = meshctl("keys", "install", "--json", socket=n0)
        assert installed.returncode == 0, installed.stderr
        new_key = json.loads(installed.stdout)["key"]
        assert meshctl("keys", "use", new_key, socket=cluster["n1"]).returncode == 0
        removed = meshctl("keys", "remove", old_id, "--json", socket=cluster["n2"])
        assert removed.returncode == 0, removed.stderr
        rows = json.loads(removed.stdout)["nodes"]
        assert set(rows) == {"n0", "n1", "n2"}
        for outcome in rows.values():
            assert outcome["ok"]
            assert [k["id"] for k in outcome["result"]] != [old_id]
            assert len(outcome["result"]) == 1
            assert outcome["result"][0]["primary"]
        # Nobody was suspected during the rotation, and gossip still flows.
        for d in cluster:
            assert not d.log_events("member_suspect"), d.log_tail()
        cluster.wait_formed(10)


def test_node_rm_revokes_and_cuts_the_node_off(tmp_path: Path) -> None:
    with _cluster(tmp_path, 120, 3) as cluster:
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        n0, n2 = cluster["n0"], cluster["n2"]
        # As a voter n2 holds Raft links with the others, open when it is removed.
        cluster.wait_until(lambda: "n2" in n0.api("raft_status")["voters"], 60,
                           "n2 to become a voter")
        # n1 did not issue n2's certificate: the serials come from the replicated state
        # (n0, which issued them, commits them there).
        n1 = cluster["n1"]
        removed = cluster.wait_until(
            lambda: (r := meshctl("node", "rm", "n2", "--json", socket=n1)).returncode == 0
            and r or ("is recorded" not in r.stderr and r), 20,
            "n0's certificates to reach the replicated state")
        assert removed.returncode == 0, removed.stderr
        result = json.loads(removed.stdout)
        assert result["serials"]
        assert len(result["deny_indexes"]) == len(result["serials"])
        seen = cluster.wait_status("n2", "dead", 20, observers=[n0, cluster["n1"]])
        assert set(seen) == {"n0", "n1"}
        # Every remaining node applied the replicated deny list to its live deny set.
        for d in (n0, cluster["n1"]):
            cluster.wait_until(
                lambda d=d: json.loads((d.data_dir / "revoked.json").read_text())["serials"]
                == result["serials"], 10, f"{d.name} to apply the deny list")
        # The links already open with it (Raft, at least) were closed at once.
        cluster.wait_until(
            lambda: sum(metric(d.metrics(), "meshd_tls_links_closed_revoked_total")
                        for d in (n0, cluster["n1"])) >= 1, 10,
            "the links open with the removed node to be closed")
        # Its next push-pull attempts (reconnect) are refused at the TLS listener.
        cluster.wait_until(lambda: metric(n0.metrics(), "meshd_tls_links_refused_total") >= 1
                           or metric(cluster["n1"].metrics(),
                                     "meshd_tls_links_refused_total") >= 1,
                           30, "a refused link from the removed node")
        n2.check_running()


def test_every_voter_issues_and_nodes_join_after_the_first_node_is_gone(
        tmp_path: Path) -> None:
    """The CA key is held by Raft: once the voters have it, the node that created
    the cluster is not needed to admit nodes, renew, or rotate the token."""
    with _cluster(tmp_path, 124, 4) as cluster:
        n0, n1, n2, n3 = (cluster[f"n{i}"] for i in range(4))
        cluster.start([n0, n1, n2])
        cluster.wait_formed(FORM_TIMEOUT_S, [n0, n1, n2])

        def issuing(ds: list[Daemon]) -> bool:
            members = ds[0].members()
            return all("join" in members[d.name]["ports"] and d.api("raft_status")["ca"][
                "holds_key"] for d in ds)

        cluster.wait_until(lambda: issuing([n0, n1, n2]), 60,
                           "every voter to hold the CA key and issue")
        for d in (n1, n2):
            assert not (d.data_dir / "tls" / "ca.key").exists()
            assert d.join_token() == n0.join_token()  # each issuer keeps DIR/join-token
        old = n0.join_token()
        n0.kill()
        rotated = cluster.wait_until(
            lambda: (r := meshctl("token", "rotate", "--json", socket=n1)).returncode == 0
            and r, 30, "a new leader to commit the rotated token")
        new = json.loads(rotated.stdout)["token"]
        states = json.loads(rotated.stdout)["issuers"]
        assert {n: states[n] for n in ("n1", "n2")} == {"n1": "serving", "n2": "serving"}
        assert states.get("n0", "unreachable") == "unreachable"  # killed, maybe not yet dead
        cluster.wait_until(lambda: n2.join_token() == new, 10, "n2 to write the new token")
        err = meshd_fails("--data-dir", str(tmp_path / "late"), "--bind", "127.0.0.128:17946",
                          "--name", "late", "--join", n2.addr, "--token", old,
                          "--gossip-profile", "local")
        assert "wrong or was rotated" in err
        n3.token = new
        n3.start(join=[n2.addr])
        cluster.wait_formed(FORM_TIMEOUT_S, [n1, n2, n3])
        assert n3.log_events("credentials_received"), n3.log_tail()
        # With two members left the group had shrunk to one voter; n3 makes three
        # again, and gets the CA key from the Raft log, which n0 never sent it.
        cluster.wait_until(lambda: issuing([n1, n2, n3]), 60,
                           "the three voters left to hold the CA key and issue")
