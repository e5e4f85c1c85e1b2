"""The docker driver keeps the output of the containers it removes.

The helpers both drivers share (:func:`save_output`, :func:`prune_log_dirs`) and the
fallback of :meth:`DockerDriver.logs` to the kept output are tested without an
engine; the rest runs against a real engine and the busybox test image and skips
without them (``scripts/docker-setup`` provides both; see ``dockerenv.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import pytest
import trio
from dockerenv import IMAGE, docker_client, docker_node

from mesh.errors import DriverError
from mesh.node.driver import (
    OUTPUT_LOG,
    STATE_FILE,
    DockerDriver,
    RunSpec,
    container_name,
    prune_log_dirs,
    save_output,
)
from mesh.types import AllocId, NodeId, ServiceId

__all__ = ["docker_client", "docker_node"]  # fixtures used by name below

HOST = "127.0.0.1"
NODE = NodeId("n1")
DEADLINE_S = 20.0


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- without an engine -----------------------------------------------------------


def test_save_output_appends_and_keeps_the_newest_bytes(tmp_path: Path) -> None:
    directory = tmp_path / "a1"
    save_output(directory, b"one\ntwo\n", 16)  # creates the directory
    save_output(directory, b"three\n", 16)
    assert (directory / OUTPUT_LOG).read_bytes() == b"one\ntwo\nthree\n"
    save_output(directory, b"four\n", 16)
    assert (directory / OUTPUT_LOG).read_bytes() == b"\ntwo\nthree\nfour\n"  # 16 bytes
    save_output(directory, b"x" * 20 + b"five\n", 16)  # longer than the limit alone
    assert (directory / OUTPUT_LOG).read_bytes() == (b"x" * 20 + b"five\n")[-16:]
    save_output(directory, b"", 16)
    assert (directory / OUTPUT_LOG).read_bytes() == (b"x" * 20 + b"five\n")[-16:]
    assert _names(directory) == [OUTPUT_LOG]  # no .tmp left


def test_save_output_raises_when_it_cannot_write(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(OSError, match="exists|Not a directory"):
        save_output(not_a_dir, b"line\n", 16)
    with pytest.raises(OSError, match="Not a directory"):
        save_output(not_a_dir / "a1", b"line\n", 16)


def _dir_at(state_dir: Path, name: str, mtime: float) -> Path:
    d = state_dir / name
    d.mkdir()
    (d / OUTPUT_LOG).write_bytes(name.encode())
    os.utime(d, (mtime, mtime))
    return d


def test_prune_log_dirs_keeps_the_newest_and_every_workload(tmp_path: Path) -> None:
    for name, mtime in [("older", 100), ("old", 200), ("new", 300), ("newer", 400)]:
        _dir_at(tmp_path, name, mtime)
    _dir_at(tmp_path, "tie-a", 250)
    _dir_at(tmp_path, "tie-b", 250)
    (_dir_at(tmp_path, "process", 1) / STATE_FILE).write_bytes(b"{}")  # a workload's
    _dir_at(tmp_path, "running", 2)  # named in in_use
    (tmp_path / "stray-file").write_bytes(b"")
    prune_log_dirs(tmp_path, 3, NODE, in_use={"running"})
    assert _names(tmp_path) == ["new", "newer", "process", "running", "stray-file", "tie-b"]
    prune_log_dirs(tmp_path, 0, NODE)
    assert _names(tmp_path) == ["process", "stray-file"]


def test_prune_log_dirs_of_a_missing_directory_does_nothing(tmp_path: Path) -> None:
    prune_log_dirs(tmp_path / "missing", 0, NODE)
    assert not (tmp_path / "missing").exists()


class _NoContainers:
    """The part of a docker client that ``DockerDriver.logs`` uses, for an engine
    that has no container."""

    def __init__(self) -> None:
        self.containers = self
        self.asked: list[str] = []

    def get(self, name: str) -> Any:
        self.asked.append(name)
        raise docker.errors.NotFound(f"No such container: {name}")


async def _logs(driver: DockerDriver, alloc: str, tail: int = 100,
                follow: bool = False) -> bytes:
    async with contextlib.aclosing(driver.logs(AllocId(alloc), tail=tail,
                                                follow=follow)) as it:
        return b"".join([chunk async for chunk in it])


async def test_logs_fall_back_to_the_kept_output(tmp_path: Path) -> None:
    client = _NoContainers()
    driver = DockerDriver(client, NODE, HOST, time.time, state_dir=tmp_path)
    save_output(tmp_path / "a1", b"".join(b"line%d\n" % i for i in range(1, 6)), 1024)
    assert await _logs(driver, "a1", tail=2) == b"line4\nline5\n"
    assert await _logs(driver, "a1", tail=2, follow=True) == b"line4\nline5\n"
    assert await _logs(driver, "a1", tail=0) == b""
    assert client.asked == [container_name(AllocId("a1"))] * 3
    with pytest.raises(DriverError, match="no logs of allocation a2 on node n1; it never"):
        await _logs(driver, "a2")
    without = DockerDriver(client, NODE, HOST, time.time)
    with pytest.raises(DriverError, match="no logs of allocation a1 on node n1"):
        await _logs(without, "a1")


# -- against a real engine -----------------------------------------------------


def _run(node: NodeId, name: str, script: str) -> RunSpec:
    return RunSpec(alloc=AllocId(f"{node}-{name}"), service=ServiceId("web"), version=1,
                   image=IMAGE, command=("sh", "-c", script), entrypoint=(), env={},
                   ports=(), cpu_limit_millis=0, memory_limit_bytes=0, labels={},
                   stop_grace_s=1.0)


async def _exited(driver: DockerDriver, alloc: AllocId) -> None:
    """Wait (woken by engine events) until the container of ``alloc`` has exited."""
    with trio.fail_after(DEADLINE_S):
        while not any(w.alloc == alloc and w.state == "exited"
                      for w in await driver.list()):
            await driver.wait_changed()


async def _ran(driver: DockerDriver, node: NodeId, name: str, script: str) -> AllocId:
    run = _run(node, name, script)
    await driver.start(run)
    await _exited(driver, run.alloc)
    return run.alloc


def _gone(client: docker.DockerClient, alloc: AllocId) -> bool:
    try:
        client.containers.get(container_name(alloc))
    except docker.errors.NotFound:
        return True
    return False


LINES = "for i in 1 2 3 4 5; do echo out$i; done; echo err >&2"


async def test_logs_answer_after_remove(docker_client: docker.DockerClient,
                                        docker_node: NodeId, tmp_path: Path,
                                        nursery: trio.Nursery) -> None:
    driver = DockerDriver(docker_client, docker_node, HOST, time.time, state_dir=tmp_path)
    await nursery.start(driver.serve)
    alloc = await _ran(driver, docker_node, "a1", LINES)
    before = await _logs(driver, alloc)
    await driver.remove(alloc)
    assert _gone(docker_client, alloc)
    assert await driver.list() == []
    # The engine orders stdout and stderr by the time it read them: either may be first.
    assert sorted(before.splitlines()) == [b"err", b"out1", b"out2", b"out3", b"out4",
                                           b"out5"]
    assert before.endswith(b"\n")
    lines = before.splitlines(keepends=True)
    assert await _logs(driver, alloc) == before
    assert await _logs(driver, alloc, tail=2) == b"".join(lines[-2:])
    assert await _logs(driver, alloc, tail=1, follow=True) == lines[-1]
    await driver.remove(alloc)  # idempotent, and keeps what was kept
    assert await _logs(driver, alloc, tail=1) == lines[-1]


async def test_a_replaced_container_keeps_its_output(docker_client: docker.DockerClient,
                                                     docker_node: NodeId, tmp_path: Path,
                                                     nursery: trio.Nursery) -> None:
    driver = DockerDriver(docker_client, docker_node, HOST, time.time, state_dir=tmp_path)
    await nursery.start(driver.serve)
    run = _run(docker_node, "a1", "echo first run")
    await driver.start(run)
    await _exited(driver, run.alloc)
    second = _run(docker_node, "a1", "echo second run")
    await driver.start(second)  # replaces the exited container of the same alloc
    await _exited(driver, run.alloc)
    # The earlier container's output first, as one log file would give it...
    assert await _logs(driver, run.alloc) == b"first run\nsecond run\n"
    assert await _logs(driver, run.alloc, tail=1) == b"second run\n"
    assert await _logs(driver, run.alloc, follow=True) == b"first run\nsecond run\n"
    await driver.remove(run.alloc)
    assert await _logs(driver, run.alloc) == b"first run\nsecond run\n"


async def test_kept_output_is_bounded_and_pruned(docker_client: docker.DockerClient,
                                                 docker_node: NodeId, tmp_path: Path,
                                                 nursery: trio.Nursery) -> None:
    driver = DockerDriver(docker_client, docker_node, HOST, time.time, state_dir=tmp_path,
                          retained_log_dirs=2, retained_log_max_bytes=64)
    await nursery.start(driver.serve)
    allocs = []
    for i in range(3):
        alloc = await _ran(driver, docker_node, f"a{i}",
                           "i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo line$i; done")
        await driver.remove(alloc)
        allocs.append(alloc)
    assert _names(tmp_path) == sorted(allocs[1:])
    kept = (tmp_path / allocs[2] / OUTPUT_LOG).read_bytes()
    assert kept == b"".join(b"line%d\n" % i for i in range(1, 101))[-64:]
    assert await _logs(driver, allocs[2], tail=2) == b"line99\nline100\n"
    with pytest.raises(DriverError, match=f"no logs of allocation {allocs[0]}"):
        await _logs(driver, allocs[0])


def _unsaved(caplog: pytest.LogCaptureFixture, alloc: AllocId) -> list[str]:
    """The ``output_unsaved`` warnings about ``alloc``."""
    return [m for r in caplog.records if r.levelno == logging.WARNING
            and (m := r.getMessage()).startswith("output_unsaved ") and f" alloc={alloc} " in m]


async def test_a_failed_save_does_not_block_the_removal(
        docker_client: docker.DockerClient, docker_node: NodeId, tmp_path: Path,
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "file"
    state_dir.write_bytes(b"")  # as root, a file is what cannot be written into
    driver = DockerDriver(docker_client, docker_node, HOST, time.time, state_dir=state_dir)
    await nursery.start(driver.serve)
    alloc = await _ran(driver, docker_node, "a1", LINES)
    with caplog.at_level(logging.WARNING, logger="mesh.node.driver"):
        await driver.remove(alloc)
    assert _gone(docker_client, alloc)
    assert await driver.list() == []
    [warning] = _unsaved(caplog, alloc)
    assert f"node={docker_node} alloc={alloc} reason=" in warning
    with pytest.raises(DriverError, match=f"no logs of allocation {alloc}"):
        await _logs(driver, alloc)


async def test_an_unreadable_output_does_not_block_the_removal(
        docker_client: docker.DockerClient, docker_node: NodeId, tmp_path: Path,
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    driver = DockerDriver(docker_client, docker_node, HOST, time.time, state_dir=tmp_path)
    await nursery.start(driver.serve)
    alloc = AllocId(f"{docker_node}-a1")
    # The engine cannot read back the output of the "none" logging driver.
    container = docker_client.containers.run(
        IMAGE, ["echo", "hi"], name=container_name(alloc), detach=True,
        labels={"mesh.node": docker_node}, log_config=docker.types.LogConfig(type="none"))
    status = await trio.to_thread.run_sync(lambda: container.wait(timeout=DEADLINE_S))
    assert status["StatusCode"] == 0
    with caplog.at_level(logging.WARNING, logger="mesh.node.driver"):
        await driver.remove(alloc)
    assert _gone(docker_client, alloc)
    [warning] = _unsaved(caplog, alloc)
    assert f"node={docker_node} alloc={alloc} container={container.short_id} " in warning
    assert _names(tmp_path) == []
