"""Integration: nodes that are not voters keep their replica through the watch stream.

Five real daemons on 127.0.0.170-174: three voters, two watchers and no learners once
settled; writes through any node reach the watchers' replicas; a linearizable read on
a watcher sees a write acknowledged just before; the voter a watcher follows is
SIGKILLed and the watcher resumes from another voter; the dead voter is replaced by a
former watcher, which then works as a voter. Tests wait on conditions, never on a
fixed time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import Cluster, Daemon, loopback_ips, meshctl

FORM_TIMEOUT_S = 30.0



def status(d: Daemon) -> dict[str, Any]:
    return d.api("raft_status")  # type: ignore[no-any-return]


def stale_get(d: Daemon, key: str) -> str | None:
    try:
        return str(d.api("kv_get", {"key": key, "stale": True})["value"].decode())
    except Exception:  # noqa: BLE001 - not there yet (an ApiError), polled again
        return None


def has(d: Daemon, key: str, value: str) -> bool:
    return stale_get(d, key) == value


@pytest.fixture
def five(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, profile="local") as cluster:
        for i, ip in enumerate(loopback_ips(170, 5)):
            cluster.add(f"w{i}", ip, extra_args=["--driver", "process", "--dns-bind", "off"])
        cluster.start()
        cluster.wait_formed(FORM_TIMEOUT_S)
        yield cluster


def settled(cluster: Cluster) -> tuple[dict[str, Any], list[Daemon]]:
    """Wait for 3 voters, no learners and every other node watching; returns the
    leader's status and the watchers."""
    def check() -> tuple[dict[str, Any], list[Daemon]] | None:
        sts = {d.name: status(d) for d in cluster.running()}
        leaders = [s for s in sts.values() if s["role"] == "leader"]
        if len(leaders) != 1:
            return None
        lead = leaders[0]
        if len(lead["voters"]) != 3 or lead["learners"]:
            return None
        watchers = [cluster[n] for n, s in sts.items() if n not in lead["voters"]]
        # Followers serve watchers first: a watcher that chose before it knew the
        # leader moves to a follower at its next request.
        if not all(sts[w.name]["membership"] == "watcher" and sts[w.name]["feed"] == "watch"
                   and sts[w.name]["watch"]["source"] in lead["voters"]
                   and sts[w.name]["watch"]["source"] != lead["id"]
                   and sts[w.name]["leader"] == lead["id"] for w in watchers):
            return None
        return lead, watchers

    return cluster.wait_until(check, 60, "3 voters, 0 learners and 2 watchers")


def test_watchers_replicate_and_read_linearizably(five: Cluster) -> None:
    lead, watchers = settled(five)
    assert len(watchers) == 2
    assert lead["peers"].keys() == set(lead["voters"]) - {lead["id"]}  # no replication to watchers
    a, b = watchers
    put = meshctl(a, "kv", "put", "color", "blue", "--json")
    assert put.returncode == 0, put.stderr        # forwarded to the leader
    assert five.wait_until(lambda: stale_get(b, "color") == "blue", 10,
                           "the write on the other watcher (--stale)")
    text = meshctl(b, "raft", "status")
    assert text.returncode == 0, text.stderr
    assert "watcher of" in text.stdout
    voters_text = meshctl(five[lead["voters"][0]], "raft", "status", "--json")
    assert "watchers" in json.loads(voters_text.stdout)
    for i in range(5):
        value = f"v{i}"
        assert meshctl(five[lead["id"]], "kv", "put", "seq", value).returncode == 0
        got = meshctl(a, "kv", "get", "seq")       # linearizable: no --stale
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == value


def test_watcher_survives_its_voter_and_a_watcher_becomes_a_voter(five: Cluster) -> None:
    lead, watchers = settled(five)
    watcher = watchers[0]
    source = status(watcher)["watch"]["source"]
    assert source != lead["id"]                    # followers serve watchers first
    five[source].kill()
    assert meshctl(five[lead["id"]], "kv", "put", "after", "kill").returncode == 0
    assert five.wait_until(lambda: stale_get(watcher, "after") == "kill", 20,
                           "the watcher to resume from another voter")
    moved = status(watcher)["watch"]["source"]
    assert moved not in (None, source)

    def replaced() -> dict[str, Any] | None:
        st = status(five[lead["id"]])
        ok = (source not in st["voters"] and len(st["voters"]) == 3 and not st["learners"]
              and any(w.name in st["voters"] for w in watchers))
        return st if ok else None

    st = five.wait_until(replaced, 90, "the dead voter to be replaced by a watcher")
    promoted = next(five[n] for n in st["voters"] if n in {w.name for w in watchers})
    five.wait_until(lambda: status(promoted)["membership"] == "voter"
                    and status(promoted)["feed"] == "raft", 20, "the new voter fed by Raft")
    assert stale_get(promoted, "after") == "kill"  # what it watched is still there
    put = meshctl(promoted, "kv", "put", "from", "new-voter")
    assert put.returncode == 0, put.stderr
    for d in five.running():
        assert five.wait_until(functools.partial(has, d, "from", "new-voter"), 10,
                               f"the write on {d.name}")
    # The removed voter comes back believing it still votes (nobody tells a removed
    # node): it watches a voter and reads linearizably through it, and its status
    # says what the group says of it.
    removed = five[source]
    removed.start()
    five.wait_until(lambda: status(removed)["feed"] == "watch"
                    and status(removed)["watch"]["source"] is not None
                    and status(removed)["membership"] == "watcher", 30,
                    "the removed voter to watch a voter")
    # It learnt its removal from the group's view: no more elections it cannot win.
    five.wait_until(lambda: removed.log_events("raft_campaigns_held"), 10,
                    "the removed voter to hold its campaigns")
    assert meshctl(five[lead["id"]], "kv", "put", "back", "again").returncode == 0
    got = meshctl(removed, "kv", "get", "back")   # linearizable: no --stale
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "again"
