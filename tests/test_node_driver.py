"""The process driver against real short-lived processes, open_driver, and FakeDriver.

Process tests poll ``list()`` with a deadline (real processes); every process a test
starts is recorded in a state directory, and the ``state_dir`` fixture kills and
reaps whatever is still alive there, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import trio

from mesh.errors import DriverError
from mesh.node.driver import (
    EXEC_OUTPUT_MAX_BYTES,
    Driver,
    PortRequest,
    ProcessDriver,
    RunSpec,
    Workload,
    open_driver,
    port_env_name,
)
from mesh.testing.fakes import FakeDriver
from mesh.types import AllocId, NodeId, ServiceId

NODE = NodeId("n1")
HOST = "127.0.0.1"
PY = sys.executable
DEADLINE_S = 20.0


def wall_clock() -> float:
    return time.time()


def spec(alloc: str, *command: str, ports: tuple[PortRequest, ...] = (),
         env: Mapping[str, str] | None = None, version: int = 1) -> RunSpec:
    return RunSpec(alloc=AllocId(alloc), service=ServiceId("web"), version=version,
                   image="", command=command, entrypoint=(), env=env or {}, ports=ports,
                   cpu_limit_millis=0, memory_limit_bytes=0, labels={}, stop_grace_s=1.0)


def python(alloc: str, code: str, **kwargs: object) -> RunSpec:
    return spec(alloc, PY, "-u", "-c", code, **kwargs)  # type: ignore[arg-type]


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _parent(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(text[text.rindex(")") + 2:].split()[1])


def _reap(pid: int) -> None:
    assert os.waitpid(pid, os.WNOHANG)[0] == pid


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """The driver's directory; at teardown every recorded process group still alive
    is killed and every child of this test process reaped."""
    directory = tmp_path / "workloads"
    yield directory
    pids = []
    for path in directory.glob("*/workload.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            record = json.loads(path.read_bytes())
            pid, ticks = int(record["pid"]), int(record["start_ticks"])
            stat = _stat(pid)
            # Only our own children: state files in tests may name any pid.
            if stat is not None and stat[1] == ticks and _parent(pid) == os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                pids.append(pid)
    for pid in pids:
        # SIGKILLed children of ours: reaping them blocks only until the kernel is done
        with contextlib.suppress(ChildProcessError):  # not ours (adopted), or reaped
            os.waitpid(pid, 0)


@pytest.fixture
async def driver(state_dir: Path, nursery: trio.Nursery) -> ProcessDriver:
    d = ProcessDriver(state_dir, NODE, HOST, wall_clock, poll_interval_s=0.05)
    await nursery.start(d.serve)
    return d


async def wait_state(driver: Driver, alloc: str, state: str) -> Workload:
    with trio.fail_after(DEADLINE_S):
        while True:
            for w in await driver.list():
                if w.alloc == alloc and w.state == state:
                    return w
            await trio.sleep(0.02)


async def read_logs(driver: Driver, alloc: str, tail: int = 100) -> bytes:
    chunks = []
    async with contextlib.aclosing(driver.logs(AllocId(alloc), tail=tail)) as it:
        async for chunk in it:
            chunks.append(chunk)
    return b"".join(chunks)


async def wait_output(driver: Driver, alloc: str, needle: bytes) -> bytes:
    with trio.fail_after(DEADLINE_S):
        while True:
            if needle in (data := await read_logs(driver, alloc, tail=1000)):
                return data
            await trio.sleep(0.02)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (about real processes) until it holds, within the deadline."""
    with trio.fail_after(DEADLINE_S):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


# -- start, environment, ports -------------------------------------------------


async def test_start_hands_in_env_and_ports(driver: ProcessDriver) -> None:
    static = free_port()
    ports = (PortRequest("http", 80, static, "tcp"), PortRequest("admin-ui", 81, 0, "tcp"),
             PortRequest("dns", 53, 0, "udp"))
    code = ("import os, json; print(json.dumps({k: v for k, v in os.environ.items()}))")
    w = await driver.start(python("a1", code, ports=ports, env={"FOO": "bar"}))
    assert w.state == "running"
    assert w.ports["http"] == static
    assert w.ports["admin-ui"] not in (0, static)
    assert w.ports["dns"] > 0
    assert w.ref == str(int(w.ref))
    done = await wait_state(driver, "a1", "exited")
    assert (done.exit_code, done.message) == (0, "exited with status 0")
    env = json.loads(await read_logs(driver, "a1"))
    assert env["FOO"] == "bar"
    assert env["PORT"] == str(static)
    assert env["MESH_PORT_HTTP"] == str(static)
    assert env["MESH_PORT_ADMIN_UI"] == str(w.ports["admin-ui"])
    assert env["MESH_PORT_DNS"] == str(w.ports["dns"])
    assert (env["MESH_ALLOC"], env["MESH_SERVICE"], env["MESH_NODE"], env["MESH_HOST"]) == (
        "a1", "web", "n1", HOST)
    assert env["PATH"] == os.environ["PATH"]
    # Only the small safe base of meshd's environment is inherited.
    assert "PYTEST_CURRENT_TEST" not in env


def test_port_env_name() -> None:
    assert port_env_name("admin-ui") == "MESH_PORT_ADMIN_UI"


async def test_workload_runs_in_its_own_session_with_stdin_devnull(
        driver: ProcessDriver) -> None:
    w = await driver.start(spec("a1", "sleep", "30"))
    pid = int(w.ref)
    assert os.getsid(pid) == pid
    assert os.getpgid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    assert os.readlink(f"/proc/{pid}/fd/1").endswith("/a1/output.log")
    await driver.stop(AllocId("a1"), 5.0)


async def test_exit_code_and_wait_changed(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sh", "-c", "read x; exit 3"))
    with trio.fail_after(DEADLINE_S):
        await driver.wait_changed()  # the start
        # The exit (stdin is /dev/null: read ends at once) wakes a waiter in turn.
        while (await driver.list())[0].state == "running":
            await driver.wait_changed()
    [w] = await driver.list()
    assert (w.state, w.exit_code, w.message) == ("exited", 3, "exited with status 3")
    assert w.finished_at is not None
    assert w.finished_at >= w.started_at


async def test_port_in_use_is_refused(driver: ProcessDriver) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DriverError) as info:
            await driver.start(spec("a1", "true", ports=(PortRequest("http", 80, port, "tcp"),)))
    assert str(info.value) == (f"port {port}/tcp is already in use on node n1; pick another "
                               "host port or let meshd pick one (host_port 0)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        with pytest.raises(DriverError, match=f"port {port}/udp is already in use"):
            await driver.start(spec("a1", "true", ports=(PortRequest("dns", 53, port, "udp"),)))
    assert await driver.list() == []


@pytest.mark.parametrize(("ports", "problem"), [
    ((PortRequest("http", 80, 0, "sctp"),), "protocol 'sctp'"),
    ((PortRequest("http", 80, 0, "tcp"), PortRequest("http", 81, 0, "tcp")), "listed twice"),
    ((PortRequest("", 80, 0, "tcp"),), "has no name"),
    ((PortRequest("http", 80, 70000, "tcp"),), "host port 70000"),
])
async def test_bad_port_requests(driver: ProcessDriver, ports: tuple[PortRequest, ...],
                                 problem: str) -> None:
    with pytest.raises(DriverError, match=problem):
        await driver.start(spec("a1", "true", ports=ports))


async def test_command_errors(driver: ProcessDriver, tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="command 'no-such-command-xyz' of web was not found "
                                          "on node n1"):
        await driver.start(spec("a1", "no-such-command-xyz"))
    with pytest.raises(DriverError, match="was not found"):
        await driver.start(spec("a1", str(tmp_path / "missing")))
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(DriverError, match=f"command '{script}' of web is not executable"):
        await driver.start(spec("a1", str(script)))
    with pytest.raises(DriverError, match="has no command"):
        await driver.start(spec("a1"))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01\x02 not a program")
    garbage.chmod(0o755)
    with pytest.raises(DriverError, match="cannot run .*garbage"):
        await driver.start(spec("a1", str(garbage)))
    assert await driver.list() == []


async def test_start_refuses_running_and_replaces_exited(driver: ProcessDriver) -> None:
    first = await driver.start(spec("a1", "sh", "-c", "echo one; sleep 30"))
    with pytest.raises(DriverError, match="already running on node n1"):
        await driver.start(spec("a1", "true"))
    await wait_output(driver, "a1", b"one")
    await driver.stop(AllocId("a1"), 5.0)
    second = await driver.start(spec("a1", "sh", "-c", "echo two", version=2))
    assert second.ref != first.ref
    done = await wait_state(driver, "a1", "exited")
    assert (done.version, done.exit_code) == (2, 0)
    assert await read_logs(driver, "a1") == b"one\ntwo\n"


# -- stop --------------------------------------------------------------------


async def test_stop_sends_sigterm_to_the_group(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sh", "-c", "sleep 60 & echo child=$!; wait"))
    child = int((await wait_output(driver, "a1", b"child=")).split(b"=")[1])
    await driver.stop(AllocId("a1"), 10.0)
    [w] = await driver.list()
    assert (w.state, w.exit_code, w.message) == ("exited", 143, "killed by signal SIGTERM")
    await eventually(lambda: not _alive(child))
    await driver.stop(AllocId("a1"), 10.0)  # idempotent
    await driver.stop(AllocId("unknown"), 10.0)


async def test_a_command_the_shell_cannot_find_says_so(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sh", "-c", "exec /nonexistent/meshd-test-command"))
    w = await wait_state(driver, "a1", "exited")
    assert (w.exit_code, w.message) == (
        127, "exited with status 127 (command not found: see meshctl logs)")


async def test_stop_kills_after_grace_when_sigterm_is_trapped(driver: ProcessDriver) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    await driver.start(python("a1", code))
    await wait_output(driver, "a1", b"ready")
    await driver.stop(AllocId("a1"), 0.2)
    [w] = await driver.list()
    assert (w.state, w.exit_code, w.message) == ("exited", 137, "killed by signal SIGKILL")


async def test_leftovers_of_the_group_die_with_the_main_process(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sh", "-c", "sleep 60 & echo child=$!"))
    done = await wait_state(driver, "a1", "exited")
    assert done.exit_code == 0
    child = int((await read_logs(driver, "a1")).split(b"=")[1])
    await eventually(lambda: not _alive(child))


# -- adoption ------------------------------------------------------------------


async def test_a_new_driver_adopts_running_and_exited_workloads(state_dir: Path) -> None:
    ports = (PortRequest("http", 80, 0, "tcp"),)
    first = ProcessDriver(state_dir, NODE, HOST, lambda: 1000.0, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        running = await first.start(spec("a1", "sleep", "60", ports=ports, env={"X": "1"}))
        await first.start(spec("a2", "sh", "-c", "exit 5"))
        await wait_state(first, "a2", "exited")
        nursery.cancel_scope.cancel()  # meshd goes away; the workloads stay

    second = ProcessDriver(state_dir, NODE, HOST, lambda: 2000.0, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        adopted, exited = await second.list()
        assert adopted == running  # same pid, ports, start time: not restarted
        assert (exited.alloc, exited.exit_code, exited.message) == (
            "a2", 5, "exited with status 5")
        assert await second.exec(AllocId("a1"), ["sh", "-c", "echo $X $PORT"], 10.0) == (
            0, f"1 {running.ports['http']}\n".encode())
        await second.stop(AllocId("a1"), 10.0)
        [gone, _] = await second.list()
        assert (gone.state, gone.exit_code, gone.message, gone.finished_at) == (
            "exited", None, "exited while meshd was not its parent", 2000.0)
        _reap(int(running.ref))  # still this test's child; no state file left to find it
        await second.remove(AllocId("a1"))
        await second.remove(AllocId("a2"))
        assert await second.list() == []
        nursery.cancel_scope.cancel()


async def test_adopted_process_that_exits_is_noticed(state_dir: Path) -> None:
    first = ProcessDriver(state_dir, NODE, HOST, wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        w = await first.start(spec("a1", "sleep", "60"))
        nursery.cancel_scope.cancel()
    second = ProcessDriver(state_dir, NODE, HOST, wall_clock, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        assert [x.state for x in await second.list()] == ["running"]
        os.killpg(int(w.ref), signal.SIGKILL)  # dies behind meshd's back
        with trio.fail_after(DEADLINE_S):
            await second.wait_changed()  # noticed by the serve loop, not by list()
        [gone] = await second.list()
        assert (gone.state, gone.exit_code) == ("exited", None)
        nursery.cancel_scope.cancel()


async def test_reused_pid_is_not_taken_for_the_workload(state_dir: Path) -> None:
    # A state file naming this test process, with another start time: the pid was
    # reused. The workload counts as exited and stop must not signal us.
    me = os.getpid()
    stat = _stat(me)
    assert stat is not None
    record = {"format": 1, "alloc": "a1", "service": "web", "version": 1, "pid": me,
              "start_ticks": stat[1] + 1, "ports": {}, "env": {}, "started_at": 1.0,
              "exit_code": None, "finished_at": None, "message": ""}
    (state_dir / "a1").mkdir(parents=True)
    (state_dir / "a1" / "workload.json").write_text(json.dumps(record))
    d = ProcessDriver(state_dir, NODE, HOST, lambda: 5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.serve)
        [w] = await d.list()
        assert (w.state, w.exit_code, w.ref, w.finished_at) == ("exited", None, str(me), 5.0)
        await d.stop(AllocId("a1"), 0.1)
        nursery.cancel_scope.cancel()
    assert json.loads((state_dir / "a1" / "workload.json").read_text())["finished_at"] == 5.0


async def test_corrupt_and_foreign_state_files_are_skipped(state_dir: Path) -> None:
    good = {"format": 1, "alloc": "ok", "service": "web", "version": 1, "pid": 999_999_999,
            "start_ticks": 1, "ports": {"http": 80}, "env": {}, "started_at": 1.0,
            "exit_code": 0, "finished_at": 2.0, "message": "exited with status 0"}
    files = {
        "ok": json.dumps(good),
        "garbage": "{not json",
        "binary": b"\xff\xfe".decode("latin-1"),
        "list": "[1, 2]",
        "future": json.dumps({**good, "alloc": "future", "format": 99}),
        "other": json.dumps(good),  # names allocation "ok"
        "badpid": json.dumps({**good, "alloc": "badpid", "pid": "999999999"}),
        "init": json.dumps({**good, "alloc": "init", "pid": 1}),
        "badports": json.dumps({**good, "alloc": "badports", "ports": {"http": "80"}}),
        "boolver": json.dumps({**good, "alloc": "boolver", "version": True}),
    }
    for name, text in files.items():
        (state_dir / name).mkdir(parents=True)
        (state_dir / name / "workload.json").write_text(text)
    d = ProcessDriver(state_dir, NODE, HOST, wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.serve)
        [w] = await d.list()
        assert (w.alloc, w.state, w.exit_code, w.ports) == ("ok", "exited", 0, {"http": 80})
        nursery.cancel_scope.cancel()


# -- remove, logs ------------------------------------------------------------


async def test_remove_forgets_but_keeps_logs(driver: ProcessDriver, state_dir: Path) -> None:
    await driver.start(spec("a1", "sh", "-c", "echo hello; sleep 30"))
    await wait_output(driver, "a1", b"hello")
    with pytest.raises(DriverError, match="still running on node n1; stop it"):
        await driver.remove(AllocId("a1"))
    await driver.stop(AllocId("a1"), 5.0)
    await driver.remove(AllocId("a1"))
    await driver.remove(AllocId("a1"))  # idempotent
    assert await driver.list() == []
    assert not (state_dir / "a1" / "workload.json").exists()
    assert await read_logs(driver, "a1") == b"hello\n"
    with pytest.raises(DriverError, match="no logs of allocation nope on node n1"):
        await read_logs(driver, "nope")


async def test_old_log_dirs_are_pruned(state_dir: Path, nursery: trio.Nursery) -> None:
    d = ProcessDriver(state_dir, NODE, HOST, wall_clock, retained_log_dirs=2)
    await nursery.start(d.serve)
    for i in range(4):
        await d.start(spec(f"a{i}", "true"))
        await wait_state(d, f"a{i}", "exited")
        await d.remove(AllocId(f"a{i}"))
    assert _names(state_dir) == ["a2", "a3"]


async def test_logs_tail(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done"))
    await wait_state(driver, "a1", "exited")
    assert await read_logs(driver, "a1", tail=2) == b"line4\nline5\n"
    assert await read_logs(driver, "a1", tail=100) == b"".join(
        b"line%d\n" % i for i in range(1, 6))
    assert await read_logs(driver, "a1", tail=0) == b""


async def test_logs_follow_until_exit(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sh", "-c", "echo first; sleep 0.3; "
                                              "echo second; sleep 0.3; echo third"))
    chunks = []
    with trio.fail_after(DEADLINE_S):
        async with contextlib.aclosing(driver.logs(AllocId("a1"), follow=True)) as it:
            async for chunk in it:
                chunks.append(chunk)
    assert b"".join(chunks) == b"first\nsecond\nthird\n"
    assert len(chunks) >= 2  # followed, not read once at the end


async def test_logs_rotate(state_dir: Path, nursery: trio.Nursery) -> None:
    d = ProcessDriver(state_dir, NODE, HOST, wall_clock, log_max_bytes=1000,
                      poll_interval_s=0.02)
    await nursery.start(d.serve)
    rotated = state_dir / "a1" / "output.log.1"
    # One write of 4,500 bytes (rotation sees all or nothing of it), then one line
    # once the log was rotated.
    code = ("import os, sys, time\n"
            "sys.stdout.write(''.join('line%04d\\n' % i for i in range(500)))\n"
            "sys.stdout.flush()\n"
            "while not os.path.exists(os.environ['ROTATED']): time.sleep(0.01)\n"
            "print('after', flush=True)\n"
            "time.sleep(60)")
    await d.start(python("a1", code, env={"ROTATED": str(rotated)}))
    current = state_dir / "a1" / "output.log"
    await eventually(lambda: current.read_bytes() == b"after\n")
    assert len(rotated.read_bytes()) == 1000
    assert rotated.read_bytes().endswith(b"line0498\nline0499\n")
    assert await read_logs(d, "a1", tail=3) == b"line0498\nline0499\nafter\n"
    await d.stop(AllocId("a1"), 5.0)


# -- exec ----------------------------------------------------------------------


async def test_exec(driver: ProcessDriver) -> None:
    await driver.start(spec("a1", "sleep", "30", env={"GREETING": "hi"}))
    a1 = AllocId("a1")
    assert await driver.exec(a1, ["sh", "-c", "echo $GREETING $MESH_ALLOC; exit 2"], 10.0) == (
        2, b"hi a1\n")
    assert await driver.exec(a1, ["sh", "-c", "echo err >&2"], 10.0) == (0, b"err\n")
    assert await driver.exec(a1, ["sleep", "30"], 0.2) == (124, b"timed out")
    code, out = await driver.exec(a1, ["no-such-command-xyz"], 10.0)
    assert code == 127
    assert b"no-such-command-xyz" in out
    code, out = await driver.exec(a1, [PY, "-c", "print('x' * 200000)"], 10.0)
    assert (code, len(out)) == (0, EXEC_OUTPUT_MAX_BYTES)
    with pytest.raises(DriverError, match="not running"):
        await driver.exec(AllocId("nope"), ["true"], 1.0)
    await driver.stop(a1, 5.0)
    with pytest.raises(DriverError, match="allocation a1 is not running on node n1"):
        await driver.exec(a1, ["true"], 1.0)


# -- open_driver -------------------------------------------------------------


async def test_open_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    common = {"state_dir": tmp_path / "w", "node": NODE, "host": HOST,
              "wall_clock": wall_clock}
    assert isinstance(await open_driver("process", **common), ProcessDriver)  # type: ignore[arg-type]
    assert isinstance(await open_driver("auto", **common), ProcessDriver)  # type: ignore[arg-type]
    with pytest.raises(DriverError, match="no Docker engine answers at unix://.*--driver process"):
        await open_driver("docker", **common)  # type: ignore[arg-type]
    with pytest.raises(DriverError, match="unknown driver 'podman'; use --driver auto"):
        await open_driver("podman", **common)  # type: ignore[arg-type]


# -- FakeDriver ----------------------------------------------------------------


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeDriver:
    d = FakeDriver(NODE, wall_clock=lambda: 1000.0 + trio.current_time(), sleep=trio.sleep)
    checked: Driver = d  # the fake keeps the Driver contract (mypy checks this line)
    await nursery.start(checked.serve)
    return d


async def test_fake_start_latency_and_history(fake: FakeDriver,
                                              autojump_clock: trio.testing.MockClock) -> None:
    fake.start_latency_s = 0.5
    t0 = trio.current_time()
    w = await fake.start(spec("a1", "x", ports=(PortRequest("http", 80, 0, "tcp"),
                                                PortRequest("x", 81, 9000, "tcp"))))
    assert trio.current_time() == t0 + 0.5
    assert (w.state, w.ports, w.started_at, w.ref) == (
        "running", {"http": 20000, "x": 9000}, 1000.0 + t0 + 0.5, "fake-1")
    assert [r.alloc for r in fake.started] == ["a1"]
    with pytest.raises(DriverError, match="port 9000/tcp is already in use on node n1"):
        await fake.start(spec("a2", "x", ports=(PortRequest("x", 81, 9000, "tcp"),)))
    with pytest.raises(DriverError, match="already running"):
        await fake.start(spec("a1", "x"))


async def test_fake_controls(fake: FakeDriver, autojump_clock: trio.testing.MockClock) -> None:
    fake.fail_next_start("image nope is not present on node n1")
    with pytest.raises(DriverError, match="image nope"):
        await fake.start(spec("a1", "x"))
    await fake.start(spec("a1", "x"))
    await fake.start(spec("a2", "x"))
    await fake.wait_changed()
    fake.exit(AllocId("a1"), 1)
    with trio.fail_after(1):
        await fake.wait_changed()
    a1, a2 = await fake.list()
    assert (a1.state, a1.exit_code, a1.message) == ("exited", 1, "exited with status 1")
    fake.trap_sigterm(AllocId("a2"))
    t0 = trio.current_time()
    await fake.stop(AllocId("a2"), 3.0)
    assert trio.current_time() == t0 + 3.0
    [_, a2] = await fake.list()
    assert (a2.exit_code, a2.message) == (137, "killed by signal SIGKILL")
    assert fake.stopped == ("a2",)
    await fake.remove(AllocId("a1"))
    assert [w.alloc for w in await fake.list()] == ["a2"]
    assert fake.removed == ("a1",)


async def test_fake_exec_logs_and_adopt(fake: FakeDriver,
                                        autojump_clock: trio.testing.MockClock) -> None:
    await fake.start(spec("a1", "x"))
    a1 = AllocId("a1")
    assert await fake.exec(a1, ["check"], 1.0) == (0, b"")
    fake.set_exec_result(a1, 1, b"down", delay_s=0.25)
    t0 = trio.current_time()
    assert await fake.exec(a1, ["check"], 1.0) == (1, b"down")
    assert trio.current_time() == t0 + 0.25
    fake.set_exec_result(a1, 0, delay_s=5.0)
    assert await fake.exec(a1, ["check"], 1.0) == (124, b"timed out")
    assert [c.timeout_s for c in fake.exec_calls] == [1.0, 1.0, 1.0]

    fake.write_output(a1, b"one\ntwo\n")
    assert await read_logs(fake, "a1", tail=1) == b"two\n"
    got = []

    async def follow() -> None:
        async with contextlib.aclosing(fake.logs(a1, tail=5, follow=True)) as it:
            async for chunk in it:
                got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        fake.write_output(a1, b"three\n")
        await trio.testing.wait_all_tasks_blocked()
        await fake.stop(a1, 1.0)
    assert got == [b"one\ntwo\n", b"three\n"]

    other = Workload(alloc=AllocId("b1"), service=ServiceId("web"), version=3,
                     state="running", exit_code=None, ports={}, started_at=1.0,
                     finished_at=None, ref="c0ffee")
    fake.adopt(other)
    assert other in await fake.list()
