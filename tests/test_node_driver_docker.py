"""The docker driver against a real engine and the busybox test image.

Skips (saying why) without an engine or image; ``scripts/docker-setup`` provides
both. Containers use host networking and bind 127.0.0.1; tests poll ``list()`` with
a deadline. Allocation ids carry the test's unique node name, since container names
are global on the engine.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import docker
import pytest
import trio
from dockerenv import IMAGE, docker_client, docker_node, http_get, open_client

from mesh.errors import DriverError
from mesh.node.driver import (
    DockerDriver,
    PortRequest,
    RunSpec,
    Workload,
    container_name,
    open_driver,
)
from mesh.types import AllocId, NodeId, ServiceId

__all__ = ["docker_client", "docker_node"]  # fixtures used by name below

HOST = "127.0.0.1"
DEADLINE_S = 20.0
HTTPD = "echo hello-$MESH_ALLOC > /tmp/index.html; exec httpd -f -p 127.0.0.1:$PORT -h /tmp"


def run_spec(node: NodeId, name: str, *command: str, image: str = IMAGE,
             ports: tuple[PortRequest, ...] = (), cpu_limit_millis: int = 0,
             memory_limit_bytes: int = 0) -> RunSpec:
    return RunSpec(alloc=AllocId(f"{node}-{name}"), service=ServiceId("web"), version=2,
                   image=image, command=command, entrypoint=(), env={"GREETING": "hi"},
                   ports=ports, cpu_limit_millis=cpu_limit_millis,
                   memory_limit_bytes=memory_limit_bytes, labels={"team": "blue"},
                   stop_grace_s=1.0)


@pytest.fixture
async def driver(docker_client: docker.DockerClient, docker_node: NodeId,
                 nursery: trio.Nursery) -> DockerDriver:
    d = DockerDriver(docker_client, docker_node, HOST, time.time)
    await nursery.start(d.serve)
    return d


async def wait_state(driver: DockerDriver, alloc: AllocId, state: str) -> Workload:
    with trio.fail_after(DEADLINE_S):
        while True:
            for w in await driver.list():
                if w.alloc == alloc and w.state == state:
                    return w
            await trio.sleep(0.05)


async def get_when_up(port: int) -> bytes:
    with trio.fail_after(DEADLINE_S):
        while True:
            with contextlib.suppress(OSError):
                return await http_get(HOST, port)
            await trio.sleep(0.05)


async def test_httpd_with_host_networking_labels_and_limits(
        driver: DockerDriver, docker_client: docker.DockerClient, docker_node: NodeId) -> None:
    run = run_spec(docker_node, "a1", "sh", "-c", HTTPD,
                   ports=(PortRequest("http", 80, 0, "tcp"),),
                   cpu_limit_millis=500, memory_limit_bytes=64 * 1024 * 1024)
    w = await driver.start(run)
    assert (w.alloc, w.service, w.version, w.state, w.exit_code) == (
        run.alloc, "web", 2, "running", None)
    port = w.ports["http"]
    assert port > 0
    assert await get_when_up(port) == f"hello-{run.alloc}\n".encode()

    attrs = docker_client.api.inspect_container(w.ref)
    assert attrs["Name"] == "/" + container_name(run.alloc)
    labels = attrs["Config"]["Labels"]
    assert {k: labels[k] for k in ("mesh.managed", "mesh.alloc", "mesh.service",
                                   "mesh.version", "mesh.node", "team")} == {
        "mesh.managed": "true", "mesh.alloc": run.alloc, "mesh.service": "web",
        "mesh.version": "2", "mesh.node": docker_node, "team": "blue"}
    host_config = attrs["HostConfig"]
    assert (host_config["NanoCpus"], host_config["Memory"]) == (500_000_000, 64 * 1024 * 1024)
    assert host_config["RestartPolicy"]["Name"] == "no"
    assert host_config["NetworkMode"] == "host"
    assert host_config["Init"] is True
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert (env["PORT"], env["MESH_PORT_HTTP"], env["MESH_NODE"], env["GREETING"]) == (
        str(port), str(port), docker_node, "hi")
    assert await driver.list() == [w]


async def test_containers_resolve_with_the_nodes_dns_first(
        docker_client: docker.DockerClient, docker_node: NodeId, nursery: trio.Nursery) -> None:
    d = DockerDriver(docker_client, docker_node, HOST, time.time,
                     dns_servers=["127.0.0.77", "127.0.0.1"])
    await nursery.start(d.serve)
    run = run_spec(docker_node, "dns", "cat", "/etc/resolv.conf")
    await d.start(run)
    await wait_state(d, run.alloc, "exited")
    chunks = [chunk async for chunk in d.logs(run.alloc, tail=20, follow=False)]
    servers = [line.split()[1] for line in b"".join(chunks).decode().splitlines()
               if line.startswith("nameserver")]
    assert servers == ["127.0.0.77", "127.0.0.1"]  # host networking too
    await d.remove(run.alloc)


async def test_exit_code_reaches_wait_changed(driver: DockerDriver,
                                              docker_node: NodeId) -> None:
    run = run_spec(docker_node, "a1", "sh", "-c", "sleep 0.2; exit 3")
    await driver.start(run)
    with trio.fail_after(DEADLINE_S):
        while (await driver.list())[0].state == "running":
            await driver.wait_changed()  # woken by the engine's "die" event
    [w] = await driver.list()
    assert (w.state, w.exit_code, w.message) == ("exited", 3, "exited with status 3")
    assert w.finished_at is not None


async def test_stop_then_remove(driver: DockerDriver, docker_client: docker.DockerClient,
                                docker_node: NodeId) -> None:
    # A shell that ignores SIGTERM: docker stop kills it after the grace.
    run = run_spec(docker_node, "a1", "sh", "-c", "trap '' TERM; sleep 60")
    await driver.start(run)
    with pytest.raises(DriverError, match="already running"):
        await driver.start(run)
    with pytest.raises(DriverError, match="still running .* stop it before removing it"):
        await driver.remove(run.alloc)
    await driver.stop(run.alloc, 0.5)
    [w] = await driver.list()
    assert (w.state, w.exit_code, w.message) == ("exited", 137, "killed by signal SIGKILL")
    await driver.stop(run.alloc, 0.5)  # idempotent
    await driver.remove(run.alloc)
    await driver.remove(run.alloc)
    assert await driver.list() == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container_name(run.alloc))


async def test_an_init_is_pid_1_and_passes_sigterm_on(
        driver: DockerDriver, docker_client: docker.DockerClient, docker_node: NodeId) -> None:
    # Without Docker's init, busybox sleep would be PID 1, which the kernel spares
    # the SIGTERM it has no handler for: docker stop would kill it after the grace.
    run = run_spec(docker_node, "a1", "sleep", "600")
    w = await driver.start(run)
    assert docker_client.api.inspect_container(w.ref)["HostConfig"]["Init"] is True
    assert await driver.exec(run.alloc, ["cat", "/proc/1/comm"], 10.0) == (0, b"docker-init\n")
    await driver.stop(run.alloc, DEADLINE_S)
    [w] = await driver.list()
    assert (w.state, w.exit_code, w.message) == ("exited", 143, "killed by signal SIGTERM")


async def test_a_new_driver_adopts_running_containers(driver: DockerDriver,
                                                      docker_node: NodeId) -> None:
    run = run_spec(docker_node, "a1", "sh", "-c", HTTPD,
                   ports=(PortRequest("http", 80, 0, "tcp"),))
    started = await driver.start(run)
    client = open_client()
    try:
        second = DockerDriver(client, docker_node, HOST, time.time)
        assert await second.list() == [started]  # same container, not restarted
        assert await get_when_up(started.ports["http"]) == f"hello-{run.alloc}\n".encode()
        other = DockerDriver(client, NodeId(f"{docker_node}-other"), HOST, time.time)
        assert await other.list() == []
    finally:
        client.close()


async def test_missing_image_and_bad_command(driver: DockerDriver,
                                             docker_node: NodeId) -> None:
    missing = run_spec(docker_node, "a1", "true", image="meshd-test/absent:1")
    with pytest.raises(DriverError) as info:
        await driver.start(missing)
    assert str(info.value) == (
        f"image meshd-test/absent:1 is not present on node {docker_node}; load it "
        "(docker load / docker import) or start meshd with --docker-pull")
    # The container's init starts, fails to exec the command and exits 127 (a
    # command not found), saying so in the output.
    bad = run_spec(docker_node, "a2", "no-such-command-xyz")
    await driver.start(bad)
    w = await wait_state(driver, bad.alloc, "exited")
    assert (w.exit_code, w.message) == (
        127, "exited with status 127 (command not found: see meshctl logs)")
    assert b"exec no-such-command-xyz failed: No such file or directory" in await _logs(
        driver, bad.alloc, 10)
    await driver.remove(bad.alloc)
    assert await driver.list() == []


async def test_static_port_in_use(driver: DockerDriver, docker_node: NodeId) -> None:
    with trio.socket.socket() as taken:
        await taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DriverError, match=f"port {port}/tcp is already in use on node"):
            await driver.start(run_spec(docker_node, "a1", "true",
                                        ports=(PortRequest("http", 80, port, "tcp"),)))


async def test_exec_and_logs(driver: DockerDriver, docker_node: NodeId) -> None:
    run = run_spec(docker_node, "a1", "sh", "-c",
                   "for i in 1 2 3; do echo line$i; done; sleep 0.5; echo late; sleep 60")
    await driver.start(run)
    assert await driver.exec(run.alloc, ["sh", "-c", "echo $GREETING >&2; exit 2"], 10.0) == (
        2, b"hi\n")
    assert await driver.exec(run.alloc, ["sleep", "3"], 0.3) == (124, b"timed out")
    code, _ = await driver.exec(run.alloc, ["no-such-command-xyz"], 10.0)
    assert code != 0
    with trio.fail_after(DEADLINE_S):
        while True:
            if b"late" in await _logs(driver, run.alloc, 100):
                break
            await trio.sleep(0.05)
    assert await _logs(driver, run.alloc, 2) == b"line3\nlate\n"
    chunks = []
    with trio.move_on_after(1.0):  # follow ends with the container; this one lives on
        async with contextlib.aclosing(driver.logs(run.alloc, tail=1, follow=True)) as it:
            async for chunk in it:
                chunks.append(chunk)
    assert b"".join(chunks) == b"late\n"
    with pytest.raises(DriverError, match="no logs of allocation nope"):
        await _logs(driver, AllocId("nope"), 1)


async def _logs(driver: DockerDriver, alloc: AllocId, tail: int) -> bytes:
    async with contextlib.aclosing(driver.logs(alloc, tail=tail)) as it:
        return b"".join([chunk async for chunk in it])


async def test_open_driver_picks_docker(docker_client: docker.DockerClient,
                                        tmp_path: Path) -> None:
    d = await open_driver("auto", state_dir=tmp_path, node=NodeId("n1"), host=HOST,
                          wall_clock=time.time)
    assert isinstance(d, DockerDriver)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.serve)  # owns its client: closed when serve ends
        assert isinstance(await d.list(), list)
        nursery.cancel_scope.cancel()

