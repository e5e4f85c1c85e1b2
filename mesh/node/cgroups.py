"""Linux cgroups for the process driver: where an allocation's cgroups go, what is
written into them, and what their counters mean.

Pure: the functions here parse what :class:`~mesh.node.driver.ProcessDriver` read
from ``/proc`` and the cgroup file systems, and compute paths and file contents; the
driver does every read, write, ``mkdir`` and ``rmdir``.

Theory of operation
===================

Layouts. A host mounts cgroup v1 (one hierarchy per controller or group of
controllers: ``/sys/fs/cgroup/memory``, ``/sys/fs/cgroup/cpu,cpuacct``), cgroup v2
(one ``cgroup2`` hierarchy, ``/sys/fs/cgroup``, whose ``cgroup.controllers`` lists
the controllers it offers), or both ("hybrid": v1 controllers, plus an empty
``cgroup2`` at ``/sys/fs/cgroup/unified``). A controller is bound to one version at
a time, so :func:`locate` looks for a v1 hierarchy with the controller first and
falls back to the v2 one if its ``cgroup.controllers`` lists it. Each controller is
located on its own (:class:`Hierarchy`, or :class:`Unavailable` with the reason), so
a host where only one of them works still enforces that one.

Paths. meshd puts each allocation's cgroup under a parent named after its node,
``meshd-<node>``, which sits in meshd's own cgroup on v1
(``<mount>/<meshd's cgroup>/meshd-<node>/<alloc>``). Cgroup v2 enables a
controller for the children of a cgroup only if that cgroup holds no processes
("no internal processes"), and meshd's own cgroup holds meshd, so on v2 the parent
sits *beside* meshd's cgroup, in its parent (``/system.slice/meshd-<node>`` for
meshd in ``/system.slice/meshd.service``). When meshd runs at the top of the
hierarchy it can see, there is no beside: it sits in meshd's cgroup, which works in
the real root cgroup (exempt from the rule) and elsewhere fails with ``EBUSY``,
reported as the reason the limits are not enforced. The names are deterministic
from the node and the allocation; where they hang depends on meshd's own cgroup,
which may differ after a restart, so the driver records the directories it made in
the allocation's state file. Two meshd instances with one node name on one host
(test clusters) share the names: a start does not use a directory holding
processes it did not start, but one instance's removal can still end what the
other started in a directory it found empty and reused. Give them distinct names.

Limits. ``0`` means no limit and gets no cgroup of that controller. Memory: v1
``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``, memory plus swap,
set to the same value so that no swap is used, where swap accounting exists); v2
``memory.max`` (and ``memory.swap.max`` = 0 where it exists). CPU: a CFS bandwidth
quota per period, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, v2 ``cpu.max``;
see :func:`cpu_quota`.

Out of memory. When a cgroup's memory cannot be reclaimed below its limit, the
kernel kills a process in it and counts the kill (``oom_kill`` in v1
``memory.oom_control``, kernel 4.13 and later, and in v2 ``memory.events``) *before*
it sends the ``SIGKILL`` ("task reaper must see this", ``mm/oom_kill.c``). So once
the driver sees the main process dead, the counter already says whether the kernel
killed it: :func:`oom_exit_message`. The count covers kills by any out-of-memory
condition (the cgroup's limit, a parent cgroup's, the whole host's), as Docker's
``OOMKilled`` does; with a limit of its own a workload nearly always meets that
first, so the message names it.
"""

from __future__ import annotations

import posixpath
import re
import signal
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from mesh.errors import DriverError
from mesh.types import AllocId, NodeId

MEMORY: Final = "memory"
CPU: Final = "cpu"
CONTROLLERS: Final = (MEMORY, CPU)
"""The controllers the process driver uses, in the order it sets them up."""

PARENT_PREFIX: Final = "meshd-"
"""The parent of one node's allocation cgroups is ``meshd-<node>``."""

MIN_MEMORY_LIMIT_BYTES: Final = 6 * 1024 * 1024
"""Smallest memory limit accepted (6 MiB, as Docker): below it even a small program
is killed while it starts."""

MAX_MEMORY_LIMIT_BYTES: Final = (1 << 63) - 1
"""Largest memory limit the kernel parses (a signed 64-bit count of bytes)."""

CPU_PERIOD_US: Final = 100_000
"""CFS period of a cpu limit of 10 millicores or more (100 ms, the kernel's default)."""

CPU_LONG_PERIOD_US: Final = 1_000_000
"""CFS period of a cpu limit below 10 millicores (1 s, the kernel's longest)."""

MIN_CPU_QUOTA_US: Final = 1_000
"""Shortest quota (and period) the kernel accepts (1 ms)."""

MAX_CPU_QUOTA_US: Final = (1 << 44) - 1
"""Longest quota the kernel accepts (``max_cfs_runtime``, about 203 days)."""

OOM_KILLED_STATUS: Final = 128 + signal.SIGKILL
"""The exit status (128 + 9) of a process the kernel killed for memory."""

OOM_COUNTER_FILE: Final = {1: "memory.oom_control", 2: "memory.events"}
"""The memory-cgroup file, per cgroup version, whose ``oom_kill`` line counts kills."""

_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """One cgroup file system mount: a line of ``/proc/self/mountinfo``.

    Attributes:
        mount_point: where it is mounted (``/sys/fs/cgroup/memory``).
        root: the cgroup shown at the mount point (``/`` unless it is a bind mount
            of a subtree or the mount was made inside a cgroup namespace).
        version: 1 (``cgroup``) or 2 (``cgroup2``).
        controllers: v1: the controllers bound to the hierarchy (from the super
            options, with flags such as ``xattr`` left in); v2: empty (the
            controllers are listed in ``cgroup.controllers``).
        read_only: mounted read-only.
    """

    mount_point: str
    root: str
    version: int
    controllers: frozenset[str]
    read_only: bool


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Where the allocation cgroups of one controller are made.

    Attributes:
        controller: ``memory`` or ``cpu``.
        version: 1 or 2.
        mount_point: the mount of the hierarchy.
        mount_root: the cgroup shown at ``mount_point`` (see :class:`CgroupMount`).
        own: meshd's own cgroup in the hierarchy (``/proc/self/cgroup``).
    """

    controller: str
    version: int
    mount_point: str
    mount_root: str
    own: str

    def directory(self, cgroup: str) -> str:
        """The directory of ``cgroup`` (a path as ``/proc/<pid>/cgroup`` gives it).

        Raises:
            ValueError: ``cgroup`` is outside the part of the hierarchy mounted here.
        """
        if not _is_under(cgroup, self.mount_root):
            raise ValueError(f"cgroup {cgroup} is outside {self.mount_point} (which shows "
                             f"{self.mount_root})")
        rest = cgroup[len(self.mount_root):].strip("/")
        return posixpath.join(self.mount_point, rest) if rest else self.mount_point

    @property
    def base(self) -> str:
        """The directory holding ``meshd-<node>``: meshd's own cgroup (v1), or beside
        it (v2; see the module docstring)."""
        if self.version == 2 and self.own.rstrip("/") != self.mount_root.rstrip("/"):
            return self.directory(posixpath.dirname(self.own.rstrip("/")))
        return self.directory(self.own)

    def parent(self, node: NodeId) -> str:
        """The directory ``meshd-<node>`` of this hierarchy."""
        return posixpath.join(self.base, PARENT_PREFIX + _component(node, "node"))

    def alloc_dir(self, node: NodeId, alloc: AllocId) -> str:
        """The directory of the cgroup of ``alloc``."""
        return posixpath.join(self.parent(node), _component(alloc, "allocation"))


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why a controller cannot be used on this host.

    Attributes:
        controller: ``memory`` or ``cpu``.
        reason: what is missing or refused, for a person (``/sys/fs/cgroup/memory
            is mounted read-only``).
    """

    controller: str
    reason: str


@dataclass(frozen=True, slots=True)
class AllocCgroup:
    """One cgroup an allocation's processes run in, as its state file records it.

    Attributes:
        controller: ``memory`` or ``cpu``.
        version: 1 or 2 (which files hold the counters).
        path: its directory (on v2 the memory and cpu entries share it).
    """

    controller: str
    version: int
    path: str

    def to_json(self) -> dict[str, Any]:
        """The entry of the state file's ``cgroups`` (:func:`parse_alloc_cgroups`)."""
        return {"controller": self.controller, "version": self.version, "path": self.path}


@dataclass(frozen=True, slots=True)
class Write:
    """One value to write into a cgroup file.

    Attributes:
        file: the file's name (``memory.max``).
        value: what to write.
        optional: skip it when the file does not exist (a knob the kernel was built
            or booted without, such as swap accounting).
    """

    file: str
    value: str
    optional: bool = False


def _is_under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _component(name: str, what: str) -> str:
    """``name``, checked to be one plain directory name."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or "\n" in name:
        raise DriverError(f"{what} name {name!r} cannot name a cgroup directory; use "
                          "letters, digits, '-' and '_'")
    return name


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup mounts in the content of ``/proc/<pid>/mountinfo``, in its order.

    Lines that are not cgroup mounts, or are malformed, are left out.
    """
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        fields, tail = before.split(), after.split()
        if len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mount_options = fields[5].split(",")
        super_options = tail[2].split(",")
        controllers = frozenset(o for o in super_options
                                if "=" not in o and o not in ("rw", "ro"))
        mounts.append(CgroupMount(
            mount_point=_unescape(fields[4]), root=_unescape(fields[3]),
            version=1 if tail[0] == "cgroup" else 2,
            controllers=controllers if tail[0] == "cgroup" else frozenset(),
            read_only="ro" in mount_options or "ro" in super_options))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map each controller of ``/proc/<pid>/cgroup`` to the process's cgroup.

    ``4:memory:/a`` gives ``{"memory": "/a"}``; ``1:cpu,cpuacct:/b`` gives both
    ``cpu`` and ``cpuacct``; the v2 line ``0::/c`` gives ``{"": "/c"}``; named v1
    hierarchies keep their name (``name=systemd``). Malformed lines are left out.
    """
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            found[controller] = parts[2]
    return found


def v2_mount(mounts: Sequence[CgroupMount], own: Mapping[str, str]) -> CgroupMount | None:
    """The ``cgroup2`` mount that shows meshd's own v2 cgroup, if any."""
    cgroup = own.get("")
    if cgroup is None:
        return None
    for mount in mounts:
        if mount.version == 2 and _is_under(cgroup, mount.root):
            return mount
    return None


def _v2_hierarchy(mount: CgroupMount, own: Mapping[str, str], controller: str) -> Hierarchy:
    return Hierarchy(controller=controller, version=2, mount_point=mount.mount_point,
                     mount_root=mount.root, own=own[""])


def v2_base(mounts: Sequence[CgroupMount], own: Mapping[str, str]) -> str | None:
    """The directory whose ``cgroup.controllers`` says which controllers cgroup v2
    offers meshd (:attr:`Hierarchy.base`); ``None`` without a v2 mount."""
    mount = v2_mount(mounts, own)
    return None if mount is None else _v2_hierarchy(mount, own, MEMORY).base


def locate(mounts: Sequence[CgroupMount], own: Mapping[str, str],
           v2_controllers: Collection[str] | None,
           ) -> dict[str, Hierarchy | Unavailable]:
    """Where each of :data:`CONTROLLERS` can be used, or why not.

    Args:
        mounts: the cgroup mounts (:func:`parse_mountinfo`).
        own: meshd's own cgroups (:func:`parse_proc_cgroup`).
        v2_controllers: the words of ``cgroup.controllers`` in :func:`v2_base`;
            ``None`` when there is no v2 mount or the file could not be read.

    Returns:
        Controller name -> its hierarchy, or why it is unavailable.
    """
    found: dict[str, Hierarchy | Unavailable] = {}
    v2 = v2_mount(mounts, own)
    for controller in CONTROLLERS:
        v1 = [m for m in mounts if m.version == 1 and controller in m.controllers]
        if v1:
            found[controller] = _locate_v1(controller, v1, own)
        elif v2 is not None:
            hierarchy = _v2_hierarchy(v2, own, controller)
            if v2.read_only:
                found[controller] = Unavailable(controller,
                                                f"{v2.mount_point} is mounted read-only")
            elif v2_controllers is None:
                found[controller] = Unavailable(
                    controller, f"cannot read {hierarchy.base}/cgroup.controllers")
            elif controller not in v2_controllers:
                listed = " ".join(sorted(v2_controllers)) or "nothing"
                found[controller] = Unavailable(
                    controller, f"the {controller} controller is not available in "
                    f"{hierarchy.base} (its cgroup.controllers lists {listed})")
            else:
                found[controller] = hierarchy
        else:
            found[controller] = Unavailable(
                controller, f"no cgroup file system offers the {controller} controller "
                f"(no cgroup v1 {controller} hierarchy and no cgroup2 mount showing "
                "meshd's cgroup)")
    return found


def _locate_v1(controller: str, mounts: Sequence[CgroupMount],
               own: Mapping[str, str]) -> Hierarchy | Unavailable:
    cgroup = own.get(controller)
    if cgroup is None:
        return Unavailable(controller, f"/proc/self/cgroup names no {controller} cgroup "
                           "for meshd")
    for mount in mounts:
        if _is_under(cgroup, mount.root):
            if mount.read_only:
                return Unavailable(controller, f"{mount.mount_point} is mounted read-only")
            return Hierarchy(controller=controller, version=1,
                             mount_point=mount.mount_point, mount_root=mount.root,
                             own=cgroup)
    return Unavailable(controller, f"meshd's {controller} cgroup {cgroup} is outside "
                       f"every mount of its hierarchy ({mounts[0].mount_point} shows "
                       f"{mounts[0].root})")


def check_limits(cpu_millis: int, memory_bytes: int, where: str) -> None:
    """Check that the limits can be enforced at all (0 is no limit).

    Args:
        cpu_millis: the cpu limit in millicores.
        memory_bytes: the memory limit in bytes.
        where: what the limits belong to, for the message (``allocation web-0-1``).

    Raises:
        DriverError: a limit is negative, a memory limit below
            :data:`MIN_MEMORY_LIMIT_BYTES`, or one beyond what the kernel takes.
    """
    if cpu_millis < 0:
        raise DriverError(f"{where} has cpu limit {cpu_millis} millicores; give a positive "
                          "limit (500m is half a core) or 0 for none")
    if cpu_millis and cpu_quota(cpu_millis)[0] > MAX_CPU_QUOTA_US:
        raise DriverError(f"{where} has cpu limit {cpu_millis} millicores, more than the "
                          "kernel can express; give a smaller limit or 0 for none")
    if memory_bytes < 0:
        raise DriverError(f"{where} has memory limit {memory_bytes} bytes; give a positive "
                          "limit or 0 for none")
    if 0 < memory_bytes < MIN_MEMORY_LIMIT_BYTES:
        raise DriverError(f"{where} has memory limit {format_bytes(memory_bytes)}, below "
                          f"the smallest accepted ({format_bytes(MIN_MEMORY_LIMIT_BYTES)}) "
                          "in which a program can start; raise it or give 0 for none")
    if memory_bytes > MAX_MEMORY_LIMIT_BYTES:
        raise DriverError(f"{where} has memory limit {memory_bytes} bytes, more than the "
                          "kernel takes; give a smaller limit or 0 for none")


def cpu_quota(millis: int) -> tuple[int, int]:
    """``(quota_us, period_us)`` of a CFS bandwidth limit of ``millis`` millicores.

    ``quota / period == millis / 1000`` exactly. The period is 100 ms; below 10
    millicores the quota would be shorter than the kernel's 1 ms minimum, so the
    period grows to 1 s (1 millicore is 1 ms per second).
    """
    assert millis > 0
    period = CPU_PERIOD_US if millis * CPU_PERIOD_US >= 1000 * MIN_CPU_QUOTA_US \
        else CPU_LONG_PERIOD_US
    return millis * period // 1000, period


def limit_writes(controller: str, version: int, limit: int) -> tuple[Write, ...]:
    """What to write, in order, into a fresh or reused allocation cgroup to set
    ``limit`` (bytes for memory, millicores for cpu; not 0).

    A reused v1 directory may hold the limits of an earlier run, and the kernel
    refuses a memory limit above the memory+swap limit, so memory+swap is lifted
    first; a cpu quota is lifted before its period changes for the same reason
    (a parent's bandwidth must cover its children's at every step).
    """
    assert limit > 0
    if controller == MEMORY:
        if version == 1:
            return (Write("memory.memsw.limit_in_bytes", "-1", optional=True),
                    Write("memory.limit_in_bytes", str(limit)),
                    Write("memory.memsw.limit_in_bytes", str(limit), optional=True))
        return (Write("memory.max", str(limit)),
                Write("memory.swap.max", "0", optional=True))
    assert controller == CPU, controller
    quota, period = cpu_quota(limit)
    if version == 1:
        return (Write("cpu.cfs_quota_us", "-1"), Write("cpu.cfs_period_us", str(period)),
                Write("cpu.cfs_quota_us", str(quota)))
    return (Write("cpu.max", f"{quota} {period}"),)


def oom_kills(text: str) -> int | None:
    """The ``oom_kill`` count in a v1 ``memory.oom_control`` or v2 ``memory.events``;
    ``None`` when the file has no such line (kernels before 4.13)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def format_bytes(size_bytes: int) -> str:
    """``67108864`` -> ``"64 MiB"``; one decimal when not a whole unit (``"1.5 GiB"``)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        scale = 1 << shift
        if size_bytes >= scale:
            if size_bytes % scale == 0:
                return f"{size_bytes // scale} {unit}"
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} byte{'' if size_bytes == 1 else 's'}"


def oom_exit_message(message: str, exit_code: int | None, kills: int,
                     limit_bytes: int) -> str:
    """The exit message of a workload whose cgroup saw ``kills`` out-of-memory kills
    during its run.

    Args:
        message: the message without the cgroup's view (``killed by signal SIGKILL``).
        exit_code: the main process's status (``None``: unknown, adopted).
        kills: kills counted since the workload started.
        limit_bytes: its memory limit.

    Returns:
        ``message`` when there were none; ``killed: out of memory (limit 64 MiB)``
        when the main process died of ``SIGKILL`` (the kernel's kill); else
        ``message`` and how many processes the kernel killed.
    """
    if kills <= 0:
        return message
    limit = format_bytes(limit_bytes)
    if exit_code == OOM_KILLED_STATUS:
        return f"killed: out of memory (limit {limit})"
    victims = "1 process" if kills == 1 else f"{kills} processes"
    return f"{message}; out of memory: the kernel killed {victims} (limit {limit})"


def parse_alloc_cgroups(data: object, node: NodeId, alloc: AllocId,
                        mount_points: Collection[str]) -> tuple[AllocCgroup, ...]:
    """The ``cgroups`` field of a state file, treating it as untrusted.

    Every path must be a normalized absolute path ``.../meshd-<node>/<alloc>`` under
    one of ``mount_points``: the driver kills what runs in these directories and
    removes them.

    Raises:
        ValueError: it is not such a list.
    """
    if not isinstance(data, list):
        raise ValueError("field 'cgroups' is not a list")
    tail = f"/{PARENT_PREFIX}{node}/{alloc}"
    found = []
    for item in data:
        if not isinstance(item, dict):
            raise ValueError("an entry of field 'cgroups' is not a map")
        controller, version, path = item.get("controller"), item.get("version"), \
            item.get("path")
        if controller not in CONTROLLERS or version not in (1, 2) \
                or isinstance(version, bool) or not isinstance(path, str):
            raise ValueError(f"cgroup entry {item!r} is not a controller, version and path")
        if posixpath.normpath(path) != path or not path.endswith(tail) or not any(
                path.startswith(m.rstrip("/") + "/") for m in mount_points):
            raise ValueError(f"cgroup {path!r} is not a cgroup of allocation {alloc} "
                             f"of node {node} under a cgroup mount")
        found.append(AllocCgroup(controller=controller, version=version, path=path))
    return tuple(found)
