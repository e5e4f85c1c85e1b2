"""CPU and memory limits of the process driver: the pure cgroup computations
(:mod:`mesh.node.cgroups`), then real cgroups on this host.

The real tests need root and writable cgroup hierarchies with the memory and cpu
controllers; they skip, saying why, where there are none. Each uses a node name of
its own (``meshd-<node>`` parents are shared by the whole host on a hierarchy whose
root cgroup holds meshd), and the ``cgroup_node`` fixture kills, by pid, whatever
still runs in that node's cgroups and removes them, even when the test fails.
Processes are recorded in the driver's state directory, which the ``state_dir``
fixture of ``test_node_driver`` cleans up as it does there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_node_driver import (  # noqa: F401 (state_dir is a fixture)
    DEADLINE_S,
    HOST,
    _alive,
    eventually,
    python,
    read_logs,
    spec,
    state_dir,
    wait_output,
    wait_state,
    wall_clock,
)

from mesh.errors import DriverError
from mesh.node.cgroups import (
    CPU,
    MEMORY,
    AllocCgroup,
    CgroupMount,
    Hierarchy,
    Unavailable,
    Write,
    check_limits,
    cpu_quota,
    format_bytes,
    limit_writes,
    locate,
    oom_exit_message,
    oom_kills,
    parse_alloc_cgroups,
    parse_mountinfo,
    parse_proc_cgroup,
    v2_base,
)
from mesh.node.driver import ProcessDriver, RunSpec, spawn_in_cgroups
from mesh.types import AllocId, NodeId

MiB = 1024 * 1024

# -- parsing what /proc says ---------------------------------------------------

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_OWN = """\
9:name=systemd:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""


def test_parse_mountinfo_keeps_cgroup_mounts() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.mount_point for m in mounts] == [
        "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
    assert mounts[0] == CgroupMount("/sys/fs/cgroup/cpu", "/", 1, frozenset({"cpu"}), False)
    assert "memory" in mounts[2].controllers
    assert "name=systemd" not in mounts[3].controllers
    assert mounts[4] == CgroupMount("/sys/fs/cgroup/unified", "/", 2, frozenset(), False)


def test_parse_mountinfo_escapes_optional_fields_and_read_only() -> None:
    text = ("50 1 0:40 /docker/x /mnt/my\\040cgroups ro,nosuid shared:9 master:2 - cgroup "
            "cgroup rw,cpu,cpuacct\n"
            "51 1 0:41 / /sys/fs/cgroup rw - cgroup2 cgroup2 ro,nsdelegate\n"
            "garbage line\n"
            "52 1 0:42 / /mnt - ext4 /dev/sda rw\n")
    cpu, unified = parse_mountinfo(text)
    assert (cpu.mount_point, cpu.root, cpu.read_only) == ("/mnt/my cgroups", "/docker/x", True)
    assert {"cpu", "cpuacct"} <= cpu.controllers
    assert (unified.version, unified.read_only) == (2, True)


def test_parse_proc_cgroup() -> None:
    assert parse_proc_cgroup("4:memory:/a\n1:cpu,cpuacct:/b/c\n0::/d\nbad\n3:pids:\n") == {
        "memory": "/a", "cpu": "/b/c", "cpuacct": "/b/c", "": "/d"}


# -- where the cgroups go --------------------------------------------------------


def test_locate_on_a_hybrid_host_uses_v1_in_meshds_own_cgroup() -> None:
    found = locate(parse_mountinfo(HYBRID_MOUNTINFO), parse_proc_cgroup(HYBRID_OWN), [])
    memory, cpu = found[MEMORY], found[CPU]
    assert isinstance(memory, Hierarchy)
    assert isinstance(cpu, Hierarchy)
    assert (memory.version, memory.base) == (1, "/sys/fs/cgroup/memory/process_api/abc")
    assert memory.alloc_dir(NodeId("n1"), AllocId("web-0-3")) == \
        "/sys/fs/cgroup/memory/process_api/abc/meshd-n1/web-0-3"
    assert cpu.parent(NodeId("n1")) == "/sys/fs/cgroup/cpu/meshd-n1"


def test_locate_v2_puts_the_parent_beside_meshds_cgroup() -> None:
    mounts = parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    own = parse_proc_cgroup("0::/system.slice/meshd.service\n")
    assert v2_base(mounts, own) == "/sys/fs/cgroup/system.slice"
    found = locate(mounts, own, ["cpuset", "cpu", "io", "memory", "pids"])
    memory = found[MEMORY]
    assert isinstance(memory, Hierarchy)
    assert memory.version == 2
    # "no internal processes": meshd.service holds meshd, so not under it.
    assert memory.alloc_dir(NodeId("n1"), AllocId("a1")) == \
        "/sys/fs/cgroup/system.slice/meshd-n1/a1"
    assert found[CPU] == dataclasses.replace(memory, controller=CPU)


def test_locate_v2_in_the_root_cgroup_nests_under_the_root() -> None:
    mounts = parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    own = parse_proc_cgroup("0::/\n")
    assert v2_base(mounts, own) == "/sys/fs/cgroup"
    memory = locate(mounts, own, ["memory", "cpu"])[MEMORY]
    assert isinstance(memory, Hierarchy)
    assert memory.parent(NodeId("n1")) == "/sys/fs/cgroup/meshd-n1"


def test_locate_v2_at_the_top_of_a_namespaced_hierarchy_stays_inside() -> None:
    # A mount showing a subtree (a cgroup namespace's view): nothing above is visible.
    mounts = parse_mountinfo("30 1 0:26 /c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert v2_base(mounts, parse_proc_cgroup("0::/c1\n")) == "/sys/fs/cgroup"
    assert v2_base(mounts, parse_proc_cgroup("0::/c1/app\n")) == "/sys/fs/cgroup"
    assert v2_base(mounts, parse_proc_cgroup("0::/c1/a/b\n")) == "/sys/fs/cgroup/a"


def test_locate_honours_the_root_of_a_bind_mounted_subtree() -> None:
    mounts = parse_mountinfo("30 1 0:26 /docker/c1 /sys/fs/cgroup/memory rw - cgroup cgroup "
                             "rw,memory\n")
    memory = locate(mounts, parse_proc_cgroup("4:memory:/docker/c1/app\n"), None)[MEMORY]
    assert isinstance(memory, Hierarchy)
    assert memory.base == "/sys/fs/cgroup/memory/app"
    outside = locate(mounts, parse_proc_cgroup("4:memory:/other\n"), None)[MEMORY]
    assert outside == Unavailable(MEMORY, "meshd's memory cgroup /other is outside every "
                                  "mount of its hierarchy (/sys/fs/cgroup/memory shows "
                                  "/docker/c1)")


@pytest.mark.parametrize(("mountinfo", "own", "listed", "reason"), [
    ("", "0::/\n", None,
     "no cgroup file system offers the memory controller (no cgroup v1 memory hierarchy "
     "and no cgroup2 mount showing meshd's cgroup)"),
    ("35 31 0:32 / /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n", "4:memory:/\n",
     None, "/sys/fs/cgroup/memory is mounted read-only"),
    ("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "0::/\n", None,
     "/proc/self/cgroup names no memory cgroup for meshd"),
    ("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/a/b\n", ["cpu", "io"],
     "the memory controller is not available in /sys/fs/cgroup/a (its cgroup.controllers "
     "lists cpu io)"),
    ("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/\n", None,
     "cannot read /sys/fs/cgroup/cgroup.controllers"),
    ("41 31 0:38 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n", "0::/\n", ["memory"],
     "/sys/fs/cgroup is mounted read-only"),
])
def test_locate_says_why_a_controller_is_unavailable(mountinfo: str, own: str,
                                                      listed: list[str] | None,
                                                      reason: str) -> None:
    found = locate(parse_mountinfo(mountinfo), parse_proc_cgroup(own), listed)
    assert found[MEMORY] == Unavailable(MEMORY, reason)


def test_locate_uses_each_controller_where_it_is() -> None:
    # memory on v1, cpu only on the v2 hierarchy
    mounts = parse_mountinfo(
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    found = locate(mounts, parse_proc_cgroup("4:memory:/\n0::/\n"), ["cpu"])
    memory, cpu = found[MEMORY], found[CPU]
    assert isinstance(memory, Hierarchy)
    assert isinstance(cpu, Hierarchy)
    assert (memory.version, cpu.version) == (1, 2)
    assert cpu.base == "/sys/fs/cgroup/unified"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_a_name_that_is_no_directory_name_is_refused(name: str) -> None:
    memory = Hierarchy(MEMORY, 1, "/sys/fs/cgroup/memory", "/", "/")
    with pytest.raises(DriverError, match="cannot name a cgroup directory"):
        memory.alloc_dir(NodeId("n1"), AllocId(name))
    with pytest.raises(DriverError, match="cannot name a cgroup directory"):
        memory.parent(NodeId(name))


# -- limits ----------------------------------------------------------------------


@pytest.mark.parametrize(("millis", "quota"), [
    (1, (1_000, 1_000_000)), (5, (5_000, 1_000_000)), (9, (9_000, 1_000_000)),
    (10, (1_000, 100_000)), (200, (20_000, 100_000)), (1000, (100_000, 100_000)),
    (2500, (250_000, 100_000)),
])
def test_cpu_quota(millis: int, quota: tuple[int, int]) -> None:
    assert cpu_quota(millis) == quota
    us, period = quota
    assert us * 1000 == millis * period  # exact
    assert us >= 1_000  # the kernel's minimum


@pytest.mark.parametrize(("cpu", "memory", "problem"), [
    (-1, 0, "cpu limit -1 millicores; give a positive limit"),
    (0, -5, "memory limit -5 bytes; give a positive limit"),
    (0, 1, "memory limit 1 byte, below the smallest accepted \\(6 MiB\\)"),
    (0, 5 * MiB, "memory limit 5 MiB, below"),
    (0, 1 << 63, "memory limit 9223372036854775808 bytes, more than the kernel takes"),
    (10**12, 0, "cpu limit 1000000000000 millicores, more than the kernel can express"),
])
def test_check_limits_refuses_what_cannot_be_enforced(cpu: int, memory: int,
                                                       problem: str) -> None:
    with pytest.raises(DriverError, match=f"^allocation a1 has {problem}"):
        check_limits(cpu, memory, "allocation a1")


def test_check_limits_accepts_zero_and_reasonable_limits() -> None:
    check_limits(0, 0, "a1")
    check_limits(1, 6 * MiB, "a1")
    check_limits(1_000_000, 1 << 50, "a1")


def test_limit_writes() -> None:
    assert limit_writes(MEMORY, 1, 64 * MiB) == (
        Write("memory.memsw.limit_in_bytes", "-1", optional=True),
        Write("memory.limit_in_bytes", "67108864"),
        Write("memory.memsw.limit_in_bytes", "67108864", optional=True))
    assert limit_writes(MEMORY, 2, 64 * MiB) == (
        Write("memory.max", "67108864"), Write("memory.swap.max", "0", optional=True))
    assert limit_writes(CPU, 1, 200) == (
        Write("cpu.cfs_quota_us", "-1"), Write("cpu.cfs_period_us", "100000"),
        Write("cpu.cfs_quota_us", "20000"))
    assert limit_writes(CPU, 2, 5) == (Write("cpu.max", "5000 1000000"),)


# -- out of memory -----------------------------------------------------------------


def test_oom_kills() -> None:
    assert oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") == 3
    assert oom_kills("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n") == 1
    assert oom_kills("oom_kill_disable 0\nunder_oom 0\n") is None


@pytest.mark.parametrize(("size", "text"), [
    (64 * MiB, "64 MiB"), (1536 * MiB, "1.5 GiB"), (1 << 30, "1 GiB"), (6 * MiB + 1, "6.0 MiB"),
    (2048, "2 KiB"), (100, "100 bytes"), (1, "1 byte"), (3 << 40, "3 TiB"),
])
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_oom_exit_message() -> None:
    assert oom_exit_message("exited with status 1", 1, 0, 64 * MiB) == "exited with status 1"
    assert oom_exit_message("killed by signal SIGKILL", 137, 1, 64 * MiB) == \
        "killed: out of memory (limit 64 MiB)"
    assert oom_exit_message("exited with status 1", 1, 2, 64 * MiB) == (
        "exited with status 1; out of memory: the kernel killed 2 processes (limit 64 MiB)")
    assert oom_exit_message("exited while meshd was not its parent", None, 1, 1 << 30) == (
        "exited while meshd was not its parent; out of memory: the kernel killed 1 process "
        "(limit 1 GiB)")


# -- recorded cgroups ---------------------------------------------------------------

MOUNTS = ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu")


def test_parse_alloc_cgroups_round_trips() -> None:
    cgroups = (AllocCgroup(MEMORY, 1, "/sys/fs/cgroup/memory/x/meshd-n1/a1"),
               AllocCgroup(CPU, 1, "/sys/fs/cgroup/cpu/meshd-n1/a1"))
    data = [c.to_json() for c in cgroups]
    assert parse_alloc_cgroups(data, NodeId("n1"), AllocId("a1"), MOUNTS) == cgroups
    assert parse_alloc_cgroups([], NodeId("n1"), AllocId("a1"), MOUNTS) == ()


@pytest.mark.parametrize("data", [
    {"controller": "memory"},
    ["/sys/fs/cgroup/memory/meshd-n1/a1"],
    [{"controller": "pids", "version": 1, "path": "/sys/fs/cgroup/memory/meshd-n1/a1"}],
    [{"controller": "memory", "version": True, "path": "/sys/fs/cgroup/memory/meshd-n1/a1"}],
    [{"controller": "memory", "version": 1, "path": "/sys/fs/cgroup/memory/meshd-n2/a1"}],
    [{"controller": "memory", "version": 1, "path": "/sys/fs/cgroup/memory/meshd-n1/a2"}],
    [{"controller": "memory", "version": 1, "path": "/etc/meshd-n1/a1"}],
    [{"controller": "memory", "version": 1,
      "path": "/sys/fs/cgroup/memory/../../../etc/meshd-n1/a1"}],
])
def test_parse_alloc_cgroups_refuses_foreign_paths(data: object) -> None:
    with pytest.raises(ValueError, match="cgroup"):
        parse_alloc_cgroups(data, NodeId("n1"), AllocId("a1"), MOUNTS)


# -- real cgroups on this host --------------------------------------------------------


def _host_hierarchies() -> dict[str, Hierarchy] | str:
    """This host's memory and cpu hierarchies, or why the real tests cannot run."""
    if os.geteuid() != 0:
        return "making cgroups needs root"
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    base = v2_base(mounts, own)
    listed = None
    if base is not None:
        with contextlib.suppress(OSError):
            listed = Path(base, "cgroup.controllers").read_text().split()
    found: dict[str, Hierarchy] = {}
    for controller, where in locate(mounts, own, listed).items():
        if isinstance(where, Unavailable):
            return f"no usable {controller} cgroup: {where.reason}"
        if not os.access(where.base, os.W_OK):
            return f"{where.base} is not writable"
        found[controller] = where
    return found


HOST_HIERARCHIES = _host_hierarchies()
needs_cgroups = pytest.mark.skipif(isinstance(HOST_HIERARCHIES, str),
                                   reason=str(HOST_HIERARCHIES))


def _hierarchies() -> dict[str, Hierarchy]:
    assert not isinstance(HOST_HIERARCHIES, str)
    return HOST_HIERARCHIES


def _pids(directory: Path) -> set[int]:
    try:
        return {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def _has_parents(node: NodeId) -> bool:
    """Whether a ``meshd-<node>`` directory exists in any hierarchy."""
    return any(os.path.exists(h.parent(node)) for h in _hierarchies().values())


_NODE_NUMBERS = itertools.count()


@pytest.fixture
def cgroup_node() -> Iterator[NodeId]:
    """A node name of this test's own; at teardown every process left in its
    cgroups is killed by pid and the cgroups and their parents are removed."""
    node = NodeId(f"limits-{os.getpid()}-{next(_NODE_NUMBERS)}")
    yield node
    if isinstance(HOST_HIERARCHIES, str):
        return
    parents = {Path(h.parent(node)) for h in HOST_HIERARCHIES.values()}
    for parent in parents:
        if not parent.is_dir():
            continue
        for directory in [d for d in parent.iterdir() if d.is_dir()]:
            deadline = time.monotonic() + DEADLINE_S
            while True:
                for pid in _pids(directory) - {os.getpid()}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    directory.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        parent.rmdir()


@pytest.fixture
async def limited(state_dir: Path, cgroup_node: NodeId,  # noqa: F811 (fixture)
                  nursery: trio.Nursery) -> ProcessDriver:
    d = ProcessDriver(state_dir, cgroup_node, HOST, wall_clock, poll_interval_s=0.05)
    await nursery.start(d.serve)
    return d


def limits(run: RunSpec, *, cpu_millis: int = 0, memory_bytes: int = 0) -> RunSpec:
    return dataclasses.replace(run, cpu_limit_millis=cpu_millis, memory_limit_bytes=memory_bytes)


def _cpu_seconds(directory: Path) -> float:
    """CPU time used by the processes of a cpu cgroup: its own counter where the
    hierarchy has one (v2 ``usage_usec``, a co-mounted ``cpuacct.usage``), else the
    sum over its members' ``/proc/<pid>/stat``."""
    stat = dict(line.split() for line in (directory / "cpu.stat").read_text().splitlines())
    if "usage_usec" in stat:
        return int(stat["usage_usec"]) / 1e6
    if (directory / "cpuacct.usage").exists():
        return int((directory / "cpuacct.usage").read_text()) / 1e9
    ticks = 0
    for pid in _pids(directory):
        with contextlib.suppress(FileNotFoundError):
            text = Path(f"/proc/{pid}/stat").read_text()
            fields = text[text.rindex(")") + 2:].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@needs_cgroups
async def test_a_workload_over_its_memory_limit_is_killed_and_says_so(
        limited: ProcessDriver, cgroup_node: NodeId) -> None:
    code = "b = bytearray(200 * 2**20); import time; time.sleep(5)"
    await limited.start(limits(python("a1", code), memory_bytes=64 * MiB))
    cgroups = limited.cgroups(AllocId("a1"))
    assert set(cgroups) == {MEMORY}  # no cpu limit, no cpu cgroup
    memory = cgroups[MEMORY]
    assert memory == Path(_hierarchies()[MEMORY].alloc_dir(cgroup_node, AllocId("a1")))
    assert int((memory / "memory.limit_in_bytes").read_text()
               if (memory / "memory.limit_in_bytes").exists()
               else (memory / "memory.max").read_text()) == 64 * MiB
    done = await wait_state(limited, "a1", "exited")
    assert (done.exit_code, done.message) == (137, "killed: out of memory (limit 64 MiB)")

    await limited.remove(AllocId("a1"))
    assert not memory.exists()
    assert not memory.parent.exists()  # meshd-<node> goes with its last allocation
    assert limited.cgroups(AllocId("a1")) == {}


@needs_cgroups
async def test_a_restarted_workload_does_not_inherit_an_earlier_oom(
        limited: ProcessDriver) -> None:
    await limited.start(limits(python("a1", "b = bytearray(200 * 2**20)"),
                               memory_bytes=64 * MiB))
    assert (await wait_state(limited, "a1", "exited")).exit_code == 137
    # Replaced without a removal in between: the old cgroup is emptied and made anew.
    await limited.start(limits(python("a1", "b = bytearray(8 * 2**20)"),
                               memory_bytes=64 * MiB))
    done = await wait_state(limited, "a1", "exited")
    assert (done.exit_code, done.message) == (0, "exited with status 0")


@needs_cgroups
async def test_a_cpu_limit_throttles_a_busy_loop(limited: ProcessDriver) -> None:
    started = time.monotonic()
    await limited.start(limits(python("a1", "while True: pass"), cpu_millis=200))
    cpu = limited.cgroups(AllocId("a1"))[CPU]
    assert set(limited.cgroups(AllocId("a1"))) == {CPU}

    def periods() -> dict[str, int]:
        return {k: int(v) for k, v in
                (line.split() for line in (cpu / "cpu.stat").read_text().splitlines())}

    # About 2 s of 100 ms periods in which it wanted to run.
    await eventually(lambda: periods()["nr_periods"] >= 20)
    used, elapsed = _cpu_seconds(cpu), time.monotonic() - started
    stat = periods()
    await limited.stop(AllocId("a1"), 0.0)
    assert stat["nr_throttled"] > 0
    # 200m is 0.2 CPU-seconds per second; a loaded host only gives it less.
    assert 0 < used <= 0.3 * elapsed, (used, elapsed)


@needs_cgroups
async def test_the_workload_is_in_its_cgroups_from_its_first_instruction(
        limited: ProcessDriver, cgroup_node: NodeId) -> None:
    # cat reads its own cgroups as it starts: a move after the spawn would be late.
    await limited.start(limits(spec("a1", "cat", "/proc/self/cgroup"), cpu_millis=500,
                               memory_bytes=64 * MiB))
    cgroups = limited.cgroups(AllocId("a1"))
    await wait_state(limited, "a1", "exited")
    seen = parse_proc_cgroup((await read_logs(limited, "a1")).decode())
    for controller in (MEMORY, CPU):
        hierarchy = _hierarchies()[controller]
        key = controller if hierarchy.version == 1 else ""
        assert hierarchy.directory(seen[key]) == str(cgroups[controller])
    # No thread of meshd (the one that spawned went back) is left in them.
    threads = {int(t) for t in os.listdir("/proc/self/task")}
    for directory in cgroups.values():
        tasks = directory / ("tasks" if (directory / "tasks").exists() else "cgroup.threads")
        assert not threads & {int(t) for t in tasks.read_text().split()}


@needs_cgroups
async def test_an_exec_check_runs_in_the_workloads_cgroups(limited: ProcessDriver) -> None:
    # As `docker exec` does: the check's CPU and memory count against the workload.
    w = await limited.start(limits(spec("a1", "sleep", "30"), cpu_millis=500,
                                   memory_bytes=64 * MiB))
    cgroups = limited.cgroups(AllocId("a1"))
    code, out = await limited.exec(AllocId("a1"), ["cat", "/proc/self/cgroup"], 10.0)
    assert code == 0
    seen = parse_proc_cgroup(out.decode())
    for controller in (MEMORY, CPU):
        hierarchy = _hierarchies()[controller]
        key = controller if hierarchy.version == 1 else ""
        assert hierarchy.directory(seen[key]) == str(cgroups[controller])
    # A check killed by its timeout leaves nothing behind in them.
    assert await limited.exec(AllocId("a1"), ["sh", "-c", "sleep 30 & sleep 30"],
                              0.3) == (124, b"timed out")
    await eventually(lambda: all(_pids(d) == {int(w.ref)} for d in cgroups.values()))
    await limited.stop(AllocId("a1"), 5.0)


@needs_cgroups
async def test_children_share_the_cgroups_and_die_with_the_main_process(
        limited: ProcessDriver) -> None:
    # The child leaves the process group (setsid): only the cgroup still holds it.
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid(); print(f'child={os.getpid()}', flush=True)\n"
            "time.sleep(60)\n")
    w = await limited.start(limits(python("a1", code), cpu_millis=500, memory_bytes=64 * MiB))
    child = int((await wait_output(limited, "a1", b"child=")).split(b"=")[1])
    assert os.getsid(child) == child
    cgroups = limited.cgroups(AllocId("a1"))
    assert set(cgroups) == {MEMORY, CPU}
    await eventually(lambda: all(_pids(d) == {int(w.ref), child} for d in cgroups.values()))
    await limited.stop(AllocId("a1"), 5.0)
    await eventually(lambda: not _alive(child))


@needs_cgroups
async def test_an_adopted_workload_keeps_its_cgroups_and_removal_cleans_them(
        state_dir: Path, cgroup_node: NodeId) -> None:  # noqa: F811 (fixture)
    first = ProcessDriver(state_dir, cgroup_node, HOST, wall_clock, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        started = await first.start(limits(spec("a1", "sleep", "60"), cpu_millis=300,
                                           memory_bytes=32 * MiB))
        cgroups = first.cgroups(AllocId("a1"))
        nursery.cancel_scope.cancel()  # meshd goes away; the workload stays

    second = ProcessDriver(state_dir, cgroup_node, HOST, wall_clock, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        assert [w.ref for w in await second.list()] == [started.ref]
        assert second.cgroups(AllocId("a1")) == cgroups
        assert all(_pids(d) == {int(started.ref)} for d in cgroups.values())
        await second.stop(AllocId("a1"), 5.0)
        await second.remove(AllocId("a1"))
        assert not any(d.exists() for d in cgroups.values())
        nursery.cancel_scope.cancel()


@needs_cgroups
async def test_an_unlimited_workload_gets_no_cgroup(limited: ProcessDriver,
                                                    cgroup_node: NodeId) -> None:
    w = await limited.start(spec("a1", "sleep", "60"))
    assert w.message == ""
    assert limited.cgroups(AllocId("a1")) == {}
    assert not _has_parents(cgroup_node)
    await limited.stop(AllocId("a1"), 5.0)


@pytest.fixture
def foreign(cgroup_node: NodeId, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The memory cgroup of allocation a1 holding a process meshd did not start (as
    if another meshd with this node name ran a1 here); killed and reaped after."""
    memory = _hierarchies()[MEMORY]
    directory = Path(memory.alloc_dir(cgroup_node, AllocId("a1")))
    directory.parent.mkdir()
    directory.mkdir()
    with (tmp_path / "out").open("wb") as out:
        stray = spawn_in_cgroups("/bin/sleep", ["sleep", "60"], os.environ, out.fileno(),
                                 [(memory, str(directory))], cgroup_node)
    yield directory, stray
    os.kill(stray, signal.SIGKILL)
    os.waitpid(stray, 0)


@needs_cgroups
async def test_a_cgroup_holding_foreign_processes_is_not_used(
        limited: ProcessDriver, foreign: tuple[Path, int]) -> None:
    directory, stray = foreign
    w = await limited.start(limits(spec("a1", "sleep", "60"), memory_bytes=64 * MiB))
    assert w.state == "running"
    assert limited.cgroups(AllocId("a1")) == {}  # started, without the limit
    assert _pids(directory) == {stray}  # and nothing of the other's was killed
    await limited.stop(AllocId("a1"), 5.0)
    await limited.remove(AllocId("a1"))
    assert _pids(directory) == {stray}


@needs_cgroups
@pytest.mark.parametrize("version", [1, 2])
def test_spawn_in_cgroups_places_the_child_before_it_runs(
        cgroup_node: NodeId, tmp_path: Path, version: int) -> None:
    """Both placements on this host: a fresh thread joining v1 hierarchies, and
    the helper that joins through ``cgroup.procs`` (v2's way; v1 has the file too)."""
    real = _hierarchies()[MEMORY]
    if version == 1 and real.version == 2:
        pytest.skip("cgroup v2 cannot move a single thread into a memory cgroup")
    placed = [(dataclasses.replace(real, version=version),
               real.alloc_dir(cgroup_node, AllocId("a1")))]
    directory = placed[0][1]
    os.mkdir(real.parent(cgroup_node))
    os.mkdir(directory)
    log = tmp_path / "out"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # SigIgn: the helper must hand over default SIGPIPE/SIGXFSZ, as posix_spawn does.
        pid = spawn_in_cgroups("/bin/sh", ["sh", "-c", "cat /proc/self/cgroup; "
                                           "grep SigIgn /proc/self/status"], os.environ, fd,
                               placed, cgroup_node)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if version == 2:
            # An exec failure in the helper is an exit status, the reason in the log.
            bad = spawn_in_cgroups(str(log), [str(log)], os.environ, fd, placed, cgroup_node)
            assert os.waitstatus_to_exitcode(os.waitpid(bad, 0)[1]) == 126
            assert f"meshd: cannot run {log}: Permission denied" in log.read_text()
    finally:
        os.close(fd)
    assert status == 0
    text = log.read_text()
    key = MEMORY if real.version == 1 else ""
    assert real.directory(parse_proc_cgroup(text)[key]) == directory
    ignored = int(text.split("SigIgn:")[1].split()[0], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores both; the workload not
        assert not ignored & (1 << (sig - 1)), sig
    assert _pids(Path(directory)) == set()


# -- where cgroups cannot be used -------------------------------------------------------


def _fake_proc(tmp_path: Path, mount_options: str) -> tuple[Path, Path]:
    """A /proc/self describing a cgroup v1 memory and cpu hierarchy mounted at a plain
    directory (writable, but without any cgroup files)."""
    proc, mount = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    mount.mkdir()
    (proc / "mountinfo").write_text(
        f"35 31 0:32 / {mount} {mount_options} - cgroup cgroup rw,memory,cpu\n")
    (proc / "cgroup").write_text("4:memory,cpu:/\n")
    return proc, mount


@pytest.mark.parametrize("mount_options", ["ro", "rw"])
async def test_without_usable_cgroups_the_workload_starts_unlimited(
        state_dir: Path, tmp_path: Path, nursery: trio.Nursery,  # noqa: F811 (fixture)
        mount_options: str) -> None:
    proc, mount = _fake_proc(tmp_path, mount_options)
    d = ProcessDriver(state_dir, NodeId("n1"), HOST, wall_clock, poll_interval_s=0.05,
                      proc_dir=proc)
    await nursery.start(d.serve)
    w = await d.start(limits(spec("a1", "sleep", "60"), cpu_millis=200, memory_bytes=64 * MiB))
    assert w.state == "running"
    assert d.cgroups(AllocId("a1")) == {}
    # meshctl ps says so while it runs (the reconciler reports a running workload's
    # message).
    assert w.message == ("running without its memory 64 MiB and cpu 200m limit (no usable "
                         "cgroup: see process_limits_not_enforced in the meshd log)")
    # rw: the directories were made, a knob was missing, and they were removed again.
    assert list(mount.iterdir()) == []
    await d.stop(AllocId("a1"), 5.0)
    await d.remove(AllocId("a1"))


async def test_an_impossible_limit_is_an_error_and_starts_nothing(
        state_dir: Path, nursery: trio.Nursery) -> None:  # noqa: F811 (fixture)
    d = ProcessDriver(state_dir, NodeId("n1"), HOST, wall_clock, poll_interval_s=0.05)
    await nursery.start(d.serve)
    with pytest.raises(DriverError, match="^allocation a1 of web has memory limit 1 MiB, "
                                          "below the smallest accepted"):
        await d.start(limits(spec("a1", "true"), memory_bytes=MiB))
    with pytest.raises(DriverError, match="cpu limit -100 millicores"):
        await d.start(limits(spec("a1", "true"), cpu_millis=-100))
    assert await d.list() == []



async def test_a_foreign_cgroup_in_a_state_file_is_left_alone(
        state_dir: Path) -> None:  # noqa: F811 (fixture)
    first = ProcessDriver(state_dir, NodeId("n1"), HOST, wall_clock, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        started = await first.start(spec("a1", "sleep", "60"))
        nursery.cancel_scope.cancel()
    path = state_dir / "a1" / "workload.json"
    record = json.loads(path.read_text())
    record["cgroups"] = [{"controller": "memory", "version": 1, "path": "/etc/meshd-n1/a1"}]
    path.write_text(json.dumps(record))

    second = ProcessDriver(state_dir, NodeId("n1"), HOST, wall_clock, poll_interval_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        # Still adopted (its process is known), but meshd will not touch that path.
        assert [w.ref for w in await second.list()] == [started.ref]
        assert second.cgroups(AllocId("a1")) == {}
        await second.stop(AllocId("a1"), 5.0)
        await second.remove(AllocId("a1"))
        assert await second.list() == []
        nursery.cancel_scope.cancel()
