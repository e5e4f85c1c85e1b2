"""``scripts/quickstart``: a second run starts a new cluster, and the script stops
only the processes it started.

Each test runs a copy of the script in a temporary directory, so its ``cluster/``
state lives there (the script keeps it next to its ``scripts/`` directory). The
cluster test binds what the quickstart always binds (127.0.0.2-4, gossip 7946, DNS,
metrics 9946); it skips when another quickstart cluster holds those.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_DEADLINE_S = 180.0
"""Bound on one run of the script (about 7 s on an idle host)."""


def process_state(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in ticks)`` of ``pid``, or ``None`` if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else (fields[0], int(fields[19]))


class Quickstart:
    """A copy of ``scripts/quickstart`` under ``base``; its cluster state is in
    ``base/cluster``."""

    def __init__(self, base: Path) -> None:
        (base / "scripts").mkdir(parents=True)
        shutil.copy2(ROOT / "scripts" / "quickstart", base / "scripts" / "quickstart")
        self.base = base
        self.cluster = base / "cluster"
        self.started: dict[int, int] = {}
        """Every meshd and workload pid a start run left, with its start time."""

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
        env.pop("MESH_SOCKET", None)
        result = subprocess.run([str(self.base / "scripts" / "quickstart"), *args],
                                capture_output=True, text=True, env=env,
                                timeout=RUN_DEADLINE_S, check=False)
        if not args:
            for pid in [*self.meshd_pids(), *self.workload_pids()]:
                state = process_state(pid)
                if state is not None:
                    self.started[pid] = state[1]
        return result

    def meshd_pids(self) -> list[int]:
        return [int(p.read_text()) for p in sorted(self.cluster.glob("n[123].pid"))]

    def workload_pids(self) -> list[int]:
        return [json.loads(p.read_text())["pid"]
                for p in sorted(self.cluster.glob("n[123]/allocs/*/workload.json"))]

    def still_running(self) -> list[int]:
        """The pids a run started that still run (same pid, same start time)."""
        return [pid for pid, ticks in self.started.items()
                if (state := process_state(pid)) is not None and state[1] == ticks]

    def meshctl(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "mesh.node.cli", "--socket",
             str(self.cluster / "n1" / "meshd.sock"), *args],
            capture_output=True, text=True, check=True, timeout=RUN_DEADLINE_S,
            env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout


@pytest.fixture
def quickstart(tmp_path: Path) -> Iterator[Quickstart]:
    """The script, stopped after the test; anything it left running is killed by pid."""
    qs = Quickstart(tmp_path / "repo")
    try:
        yield qs
    finally:
        if qs.cluster.exists():
            qs.run("stop")
        for pid in qs.still_running():
            os.kill(pid, signal.SIGKILL)
        assert qs.still_running() == []


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts (each in its own session); all killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def sleeper(procs: list[subprocess.Popen[bytes]], *argv: str) -> subprocess.Popen[bytes]:
    """A process that sleeps, with ``argv`` appended to its command line."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *argv],
                            start_new_session=True)
    procs.append(proc)
    return proc


def write_workload(cluster: Path, node: str, alloc: str, pid: int, start_ticks: int) -> None:
    state = cluster / node / "allocs" / alloc / "workload.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"alloc": alloc, "pid": pid, "start_ticks": start_ticks}))


def ticks(proc: subprocess.Popen[bytes]) -> int:
    state = process_state(proc.pid)
    assert state is not None
    return state[1]


def test_stop_kills_only_what_it_started(
        quickstart: Quickstart, sleepers: list[subprocess.Popen[bytes]]) -> None:
    cluster = quickstart.cluster
    cluster.mkdir()
    # pid files whose pids now belong to other processes: one unrelated, one the
    # meshd of a cluster elsewhere
    stranger = sleeper(sleepers)
    other_meshd = sleeper(sleepers, "-m", "mesh.node.daemon", "start", "--data-dir",
                          f"{cluster}/n1-elsewhere")
    (cluster / "n1.pid").write_text(f"{stranger.pid}\n")
    (cluster / "n2.pid").write_text(f"{other_meshd.pid}\n")
    # n3's meshd, as the script starts it
    ours = sleeper(sleepers, "-m", "mesh.node.daemon", "start", "--data-dir",
                   f"{cluster}/n3", "--name", "n3")
    (cluster / "n3.pid").write_text(f"{ours.pid}\n")
    # workloads: one whose pid was reused (another start time), one still running
    reused = sleeper(sleepers)
    workload = sleeper(sleepers)
    write_workload(cluster, "n1", "web-0-1", reused.pid, ticks(reused) + 1)
    write_workload(cluster, "n2", "web-1-2", workload.pid, ticks(workload))

    result = quickstart.run("stop")

    assert (result.returncode, result.stdout, result.stderr) == (0, "cluster stopped\n", "")
    assert [p.poll() for p in (stranger, other_meshd, reused)] == [None, None, None]
    assert ours.wait(timeout=RUN_DEADLINE_S) == -signal.SIGTERM
    assert workload.wait(timeout=RUN_DEADLINE_S) == -signal.SIGTERM
    assert sorted(p.name for p in cluster.glob("*.pid")) == []


def quickstart_ports_free() -> bool:
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                try:
                    sock.bind((ip, 7946))
                except OSError:
                    return False
    return True


@pytest.mark.slow
def test_second_run_starts_a_new_cluster(quickstart: Quickstart) -> None:
    if not quickstart_ports_free():
        pytest.skip("another quickstart cluster holds 127.0.0.2-4:7946")
    first = quickstart.run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "created web (version 1)" in first.stdout
    first_token = (quickstart.cluster / "n1" / "join-token").read_text()
    first_pids = quickstart.still_running()
    assert len(first_pids) == 6                 # 3 meshd, 3 workloads

    second = quickstart.run()

    assert second.returncode == 0, second.stdout + second.stderr
    assert set(first_pids).isdisjoint(quickstart.still_running())
    assert "created web (version 1)" in second.stdout    # not "web unchanged"
    assert (quickstart.cluster / "n1" / "join-token").read_text() != first_token
    members = json.loads(quickstart.meshctl("members", "--json"))
    assert sorted((m["name"], m["status"]) for m in members) == [
        ("n1", "alive"), ("n2", "alive"), ("n3", "alive")]
    allocs = json.loads(quickstart.meshctl("ps", "web", "--json"))
    assert sorted(a["node"] for a in allocs) == ["n1", "n2", "n3"]
    assert {(a["generation"], a["state"]) for a in allocs} == {(1, "running")}
