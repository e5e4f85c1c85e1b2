"""Integration: the Raft group of real ``meshd`` processes.

Voters are chosen automatically (3), other nodes watch a voter (read replicas, no
learners once settled),
writes through any node are forwarded to the leader, and the leader's SIGKILL is
survived: a new leader takes writes and the dead voter is replaced by a member with
no operator action. ``meshctl kv watch`` on a watcher prints the changes written
through another node as they commit. Daemons run on 127.0.0.140-127.0.0.149; every
test kills what it started. Tests wait on conditions, never on a fixed time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Cluster, Daemon, DaemonError, loopback_ips, meshctl

FORM_TIMEOUT_S = 30.0



def raft_status(d: Daemon) -> dict[str, Any]:
    return d.api("raft_status")  # type: ignore[no-any-return]


@pytest.fixture
def four(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, profile="local") as cluster:
        for i, ip in enumerate(loopback_ips(140, 4)):
            cluster.add(f"n{i}", ip)
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        yield cluster


def settled(cluster: Cluster, observer: Daemon, voters: int, learners: int) -> Any:
    def check() -> dict[str, Any] | None:
        st = raft_status(observer)
        ok = st["leader"] and len(st["voters"]) == voters and len(st["learners"]) == learners
        return st if ok else None

    return cluster.wait_until(check, 30, f"{voters} voters and {learners} learners")


def watcher_of(cluster: Cluster, st: dict[str, Any]) -> Daemon:
    """The node that is not a voter, once it watches one."""
    (name,) = [d.name for d in cluster if d.name not in st["voters"]]
    cluster.wait_until(lambda: raft_status(cluster[name])["feed"] == "watch", 30,
                       f"{name} to watch a voter")
    return cluster[name]


def test_voters_watcher_forwarding_and_linearizable_reads(four: Cluster) -> None:
    st = settled(four, four["n0"], voters=3, learners=0)
    learner = watcher_of(four, st)
    put = meshctl(learner, "kv", "put", "app/color", "blue", "--json")
    assert put.returncode == 0, put.stderr   # forwarded to the leader
    index = json.loads(put.stdout)["index"]
    for d in four:
        got = meshctl(d, "kv", "get", "app/color", "--json")
        assert got.returncode == 0, got.stderr
        entry = json.loads(got.stdout)
        assert entry["value"] == "blue"
        assert entry["mod_index"] == index
    conflict = meshctl(learner, "kv", "put", "app/color", "red", "--cas", "1")
    assert conflict.returncode == 1
    assert "mod_index" in conflict.stderr
    assert meshctl(four["n1"], "kv", "get", "app/color").stdout.strip() == "blue"


def test_leader_sigkill_new_leader_takes_writes_and_voter_is_replaced(four: Cluster) -> None:
    st = settled(four, four["n0"], voters=3, learners=0)
    leader = four[st["leader"]]
    spare = watcher_of(four, st)
    leader.kill()
    put = four.wait_until(
        lambda: meshctl(spare, "kv", "put", "after", "failover").returncode == 0, 30,
        "a write to be acknowledged after the leader died")
    assert put
    new = four.wait_until(
        lambda: (s := raft_status(spare))["leader"] not in (None, leader.name)
        and leader.name not in s["voters"] and len(s["voters"]) == 3 and s, 60,
        "the dead voter to be replaced")
    assert spare.name in new["voters"]
    assert meshctl(spare, "kv", "get", "after").stdout.strip() == "failover"


def test_the_voter_count_is_set_cluster_wide_through_raft(four: Cluster) -> None:
    st = settled(four, four["n0"], voters=3, learners=0)
    watcher = watcher_of(four, st)
    shown = meshctl(watcher, "raft", "config", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"raft_voters": None, "mod_index": 0,
                                        "desired_voters": 3}
    bad = meshctl(watcher, "raft", "config", "--voters", "4")
    assert bad.returncode == 1
    assert "one of 1, 3, 5, 7" in bad.stderr
    one = meshctl(watcher, "raft", "config", "--voters", "1", "--cas", "0", "--json")
    assert one.returncode == 0, one.stderr  # forwarded to the leader, read back here
    config = json.loads(one.stdout)
    assert (config["raft_voters"], config["desired_voters"]) == (1, 1)
    # Every node reads the same configuration, and the leader shrinks the group.
    settled(four, four["n0"], voters=1, learners=0)
    for d in four:
        assert raft_status(d)["config"]["raft_voters"] == 1
    stale = meshctl(watcher, "raft", "config", "--voters", "3", "--cas", "0")
    assert stale.returncode == 1
    assert f"at index {config['mod_index']}, not 0" in stale.stderr
    back = meshctl(four["n1"], "raft", "config", "--voters", "3",
                   "--cas", str(config["mod_index"]))
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip().startswith("voters 3 (set at index ")
    settled(four, four["n0"], voters=3, learners=0)


def read_lines(proc: subprocess.Popen[bytes], count: int, timeout_s: float) -> list[str]:
    """The first ``count`` lines ``proc`` prints, read as they come (a deadline,
    not a sleep); fails with its stderr if it exits or stays silent."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    data = b""
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(0.0, min(left, 1.0)))[0]
        chunk = os.read(fd, 65_536) if ready else b""
        data += chunk
        problem = ("exited" if ready and not chunk
                   else f"printed nothing more within {timeout_s:g}s" if left <= 0 else "")
        if problem:
            os.kill(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            raise DaemonError(f"meshctl kv watch printed {data!r} and {problem}; stderr: "
                              f"{err.decode(errors='replace')}")
    return data.decode().splitlines()[:count]


def test_kv_watch_prints_changes_under_a_prefix_as_they_commit(four: Cluster) -> None:
    st = settled(four, four["n0"], voters=3, learners=0)
    watcher = watcher_of(four, st)
    writer = four[st["voters"][0]]

    def write(*args: str) -> int:
        done = meshctl(writer, "kv", *args, "--json")
        assert done.returncode == 0, done.stderr
        return int(json.loads(done.stdout)["index"])

    def watch(*args: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        return subprocess.Popen(
            [sys.executable, "-m", "mesh.node.cli", "--socket", str(watcher.socket_path),
             "kv", "watch", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    start = write("put", "before", "x")
    proc = watch("w/", "--after", str(start), "--json")
    try:
        a = write("put", "w/a", "1")
        write("put", "other", "z")                  # not under the prefix
        b = write("put", "w/b", "2")
        gone = write("del", "w/a")
        events = [json.loads(line) for line in read_lines(proc, 3, 30)]
        assert events == [
            {"index": a, "op": "put", "key": "w/a", "value": "1", "create_index": a,
             "mod_index": a},
            {"index": b, "op": "put", "key": "w/b", "value": "2", "create_index": b,
             "mod_index": b},
            {"index": gone, "op": "del", "key": "w/a", "create_index": 0, "mod_index": gone},
        ]
        os.kill(proc.pid, signal.SIGINT)            # Ctrl-C: a quiet exit, status 0
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert err == b""
        # The node it talks to dies: exit 1, saying where to resume.
        proc = watch("w/", "--after", str(gone))
        c = write("put", "w/c", "3")
        assert read_lines(proc, 1, 30) == [f"put w/c=3 (index {c})"]
        watcher.kill()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1
        assert f"kv watch stopped after index {c} (resume with --after {c})" in err.decode()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
