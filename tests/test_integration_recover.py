"""Integration: `meshctl raft recover` after a majority of voters is lost for good.

Three real daemons on 127.0.0.160-162: two voters are SIGKILLed, the survivor has no
leader; stopped, it is recovered from its own data and serves reads and writes
alone, with every write it had."""

from __future__ import annotations

from pathlib import Path

from daemons import Cluster, loopback_ips, meshctl


def test_recover_a_survivor_after_losing_two_of_three_voters(tmp_path: Path) -> None:
    with Cluster(tmp_path, profile="local") as cluster:
        for i, ip in enumerate(loopback_ips(160, 3)):
            cluster.add(f"r{i}", ip, extra_args=["--driver", "process", "--dns-bind", "off"])
        cluster.start()
        cluster.wait_formed(30)
        first = cluster["r0"]
        cluster.wait_until(lambda: len(first.api("raft_status")["voters"]) == 3, 30,
                           "three voters")
        assert meshctl(first, "kv", "put", "before", "kept").returncode == 0
        survivor = cluster["r2"]
        cluster.wait_until(lambda: meshctl(survivor, "kv", "get", "before", "--stale")
                           .stdout.strip() == "kept", 10, "the write on r2")
        for name in ("r0", "r1"):
            cluster[name].kill()
        cluster.wait_until(lambda: survivor.api("raft_status")["leader"] is None, 30,
                           "r2 to see no leader")
        assert meshctl(survivor, "kv", "put", "x", "y").returncode == 1  # no quorum

        survivor.kill()
        dry = meshctl(survivor, "raft", "recover", "--data-dir", str(survivor.data_dir))
        assert dry.returncode == 1
        assert "would recover r2" in dry.stdout
        assert "re-run with --yes" in dry.stdout
        done = meshctl(survivor, "raft", "recover", "--data-dir", str(survivor.data_dir),
                       "--yes")
        assert done.returncode == 0, done.stderr
        assert "removed from the group: r0, r1" in done.stdout

        survivor.start()
        st = cluster.wait_until(lambda: (s := survivor.api("raft_status"))["leader"] == "r2"
                                and s, 30, "r2 to lead alone")
        assert st["voters"] == ["r2"]
        assert meshctl(survivor, "kv", "get", "before").stdout.strip() == "kept"
        put = meshctl(survivor, "kv", "put", "after", "recovery")
        assert put.returncode == 0, put.stderr
