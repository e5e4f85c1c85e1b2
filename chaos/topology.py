"""The network and disks the harness builds for a run, and their removal.

Namespace mode (root, ``ip netns`` works): one network namespace per node, a veth
pair from each to a bridge the harness creates, addresses ``10.213.X.(10+i)/24``
with ``X`` a subnet no interface on the machine uses yet. The bridge gets
``.1`` so the harness can query each node's DNS server; there is no default
route and no NAT, so nothing leaves the machine. Network faults are iptables
rules in two chains of each node's namespace (``CHAOS_IN`` hooked from INPUT,
``CHAOS_OUT`` from OUTPUT), replaced atomically with ``iptables-restore -n``;
healing flushes them.

Loopback mode (no namespaces): nodes bind ``127.5.X.(10+i)``. Network faults are
skipped there: an outgoing TCP connection on ``lo`` carries source 127.0.0.1,
not the node's address, so a rule cannot tell which node sent it, and a fault
that only half works would make the report lie.

Disks: each node's data dir is a small tmpfs (so ``disk_full`` can fill it
without touching the machine's disks), when mounting is allowed.

Every name starts with :data:`PREFIX` plus the run id, and a ``state.json`` in
the run directory lists what was created and the PIDs started, so
:func:`cleanup_leftovers` can remove what a killed harness left behind.

Resource handling:
    :meth:`Topology.teardown` removes everything it created and never raises;
    call it in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

LOGGER = logging.getLogger(__name__)

PREFIX: Final = "chx"
"""Every namespace, link and run directory the harness creates starts with this."""

RUN_ROOT: Final = Path("/tmp")
"""Run directories are ``/tmp/chx-<run id>`` (short: unix socket paths are limited)."""

TMPFS_SIZE: Final = "64m"
"""Size of each node's data-dir tmpfs."""

NETEM_QUEUE: Final = 7
"""The NFQUEUE number a node's outgoing packets go to for delay/reorder/duplicate
(queues are per namespace, so every node uses the same number)."""

NETEM_MARK: Final = 0xC4A0
"""The mark :mod:`chaos.netem` puts on duplicates so that they skip the queue."""


def _run(argv: Sequence[str], *, check: bool = True, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True, slots=True)
class NodeRules:
    """The network faults in force on one node (namespace mode).

    Attributes:
        drop_from: addresses whose packets this node does not receive.
        drop_to: addresses this node's packets do not reach.
        loss: probability of dropping any packet it receives from the cluster.
        queue: send its outgoing cluster packets to :data:`NETEM_QUEUE`.
    """

    drop_from: frozenset[str] = frozenset()
    drop_to: frozenset[str] = frozenset()
    loss: float = 0.0
    queue: bool = False


def iptables_restore_text(rules: NodeRules, subnet: str, exempt: str | None = None) -> str:
    """The ``iptables-restore -n`` input that replaces a node's chaos chains.

    ``exempt`` (the harness's own address) is never dropped: its DNS queries
    observe the cluster and must not suffer the faults.
    """
    lines = ["*filter", ":CHAOS_IN - [0:0]", ":CHAOS_OUT - [0:0]"]
    if exempt:
        lines += [f"-A CHAOS_IN -s {exempt}/32 -j RETURN",
                  f"-A CHAOS_OUT -d {exempt}/32 -j RETURN"]
    lines += [f"-A CHAOS_IN -s {ip}/32 -j DROP" for ip in sorted(rules.drop_from)]
    lines += [f"-A CHAOS_OUT -d {ip}/32 -j DROP" for ip in sorted(rules.drop_to)]
    if rules.loss > 0:
        lines.append(f"-A CHAOS_IN -s {subnet} -m statistic --mode random "
                     f"--probability {rules.loss:.4f} -j DROP")
    if rules.queue:
        lines += [f"-A CHAOS_OUT -m mark --mark {NETEM_MARK:#x} -j RETURN",
                  f"-A CHAOS_OUT -d {subnet} -j NFQUEUE --queue-num {NETEM_QUEUE} "
                  "--queue-bypass"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def count_drops(listing: str) -> int:
    """Sum the packet counters of the DROP rules in ``iptables -L CHAIN -v -x -n``."""
    total = 0
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "DROP" and fields[0].isdigit():
            total += int(fields[0])
    return total


def partition_rules(sides: Sequence[Iterable[str]], ips: Mapping[str, str]
                    ) -> dict[str, NodeRules]:
    """Rules cutting every side off from every other (both directions)."""
    groups = [frozenset(s) for s in sides]
    out = {}
    for g in groups:
        others = frozenset(ips[n] for h in groups if h is not g for n in h)
        for n in g:
            out[n] = NodeRules(drop_from=others, drop_to=others)
    return out


def oneway_rules(victim: str, ips: Mapping[str, str]) -> dict[str, NodeRules]:
    """``victim`` receives nothing from the others; they still receive from it."""
    others = frozenset(ip for n, ip in ips.items() if n != victim)
    return {victim: NodeRules(drop_from=others)}


@dataclass
class Topology:
    """The run directory, addresses and (in namespace mode) namespaces and bridge.

    Use :func:`create`. Attributes are read by the runner.
    """

    run_id: str
    run_dir: Path
    mode: str
    """``netns`` or ``loopback``."""
    ips: dict[str, str]
    subnet: str
    host_ip: str | None
    """The bridge address (namespace mode): the harness's source for DNS queries."""
    tmpfs: bool = False
    """Whether data dirs are tmpfs mounts (``disk_full`` needs it)."""
    namespaces: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    pids: dict[int, str] = field(default_factory=dict)
    _rules: dict[str, NodeRules] = field(default_factory=dict)

    def data_dir(self, name: str) -> Path:
        """The node's data dir."""
        return self.run_dir / name

    def wrap(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the node's namespace (unchanged in loopback mode)."""
        if self.mode == "netns":
            return ["ip", "netns", "exec", self.namespaces[name], *argv]
        return list(argv)

    def remember_pid(self, pid: int, name: str) -> None:
        """Record a started process so :func:`cleanup_leftovers` can find it."""
        self.pids[pid] = name
        self.save_state()

    def save_state(self) -> None:
        """Write ``state.json`` (what to remove if this harness dies)."""
        state = {"harness_pid": os.getpid(), "namespaces": sorted(self.namespaces.values()),
                 "links": self.links, "mounts": [str(m) for m in self.mounts],
                 "pids": {str(p): n for p, n in self.pids.items()}}
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.run_dir / "state.json")

    def set_rules(self, rules: Mapping[str, NodeRules]) -> None:
        """Make ``rules`` the network faults in force (nodes not named: none)."""
        assert self.mode == "netns", "network faults need namespace mode"
        for name, ns in sorted(self.namespaces.items()):
            want = rules.get(name, NodeRules())
            if self._rules.get(name, NodeRules()) == want:
                continue
            _run(["ip", "netns", "exec", ns, "iptables-restore", "-w", "-n"],
                 stdin=iptables_restore_text(want, self.subnet, self.host_ip))
            self._rules[name] = want

    def dropped_packets(self) -> dict[str, int]:
        """Packets each node's chaos rules dropped so far (the proof a fault bit)."""
        out = {}
        for name, ns in sorted(self.namespaces.items()):
            total = 0
            for chain in ("CHAOS_IN", "CHAOS_OUT"):
                listing = _run(["ip", "netns", "exec", ns, "iptables", "-w", "-L", chain,
                                "-v", "-x", "-n"], check=False).stdout
                total += count_drops(listing)
            out[name] = total
        return out

    def namespace_pids(self, name: str) -> list[int]:
        """Every process in node ``name``'s namespace (namespace mode only)."""
        out = _run(["ip", "netns", "pids", self.namespaces[name]], check=False).stdout
        return [int(p) for p in out.split()]

    def heal_network(self) -> None:
        """Remove every network fault."""
        if self.mode == "netns":
            self.set_rules({})

    def teardown(self, keep_dir: bool = False) -> list[str]:
        """Remove namespaces, links, mounts, processes (meshd and the workloads it
        started) and (unless ``keep_dir``) the run directory; returns the problems
        met (never raises)."""
        problems = _kill_pids(self.pids, self.run_dir)
        _kill_workloads(self.run_dir)
        for ns in sorted(self.namespaces.values()):
            problems += _kill_namespace_pids(ns)
            if _run(["ip", "netns", "del", ns], check=False).returncode != 0:
                problems.append(f"could not delete namespace {ns}")
        for link in self.links:
            _run(["ip", "link", "del", link], check=False)
        for mount in reversed(self.mounts):
            if _run(["umount", "-l", str(mount)], check=False).returncode != 0:
                problems.append(f"could not unmount {mount}")
        if not keep_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return problems


def _free_subnet() -> int:
    used = set(re.findall(r"inet 10\.213\.(\d+)\.", _run(["ip", "-4", "addr"]).stdout))
    for x in range(256):
        if str(x) not in used:
            return x
    raise OSError("every 10.213.X.0/24 is in use: run `python -m chaos cleanup`")


def netns_available() -> str:
    """Empty if namespace mode works here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("iptables-restore") is None:
        return "ip or iptables-restore missing"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    proc = _run(["ip", "netns", "add", probe], check=False)
    if proc.returncode != 0:
        return f"ip netns add failed: {proc.stderr.strip()}"
    try:
        chain = _run(["ip", "netns", "exec", probe, "iptables", "-w", "-N", "CHAOS_PROBE"],
                     check=False)
        if chain.returncode != 0:
            return f"iptables inside a namespace failed: {chain.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return ""


def create(names: Sequence[str], mode: str = "auto") -> tuple[Topology, str]:
    """Build the run directory and network for ``names``.

    Args:
        names: the node names.
        mode: ``auto`` (namespaces if available), ``netns`` or ``loopback``.

    Returns:
        The topology, and why namespace mode is not used (empty if it is).

    Raises:
        OSError: setting up failed (whatever was created is removed first).
    """
    why = netns_available() if mode in ("auto", "netns") else "loopback mode asked for"
    if mode == "netns" and why:
        raise OSError(f"namespace mode is not available: {why}")
    run_id = os.urandom(2).hex()
    run_dir = RUN_ROOT / f"{PREFIX}-{run_id}"
    run_dir.mkdir(mode=0o700)
    if why:
        x = os.getpid() % 250
        topo = Topology(run_id, run_dir, "loopback",
                        {n: f"127.5.{x}.{10 + i}" for i, n in enumerate(names)},
                        f"127.5.{x}.0/24", None)
    else:
        x = _free_subnet()
        topo = Topology(run_id, run_dir, "netns",
                        {n: f"10.213.{x}.{10 + i}" for i, n in enumerate(names)},
                        f"10.213.{x}.0/24", f"10.213.{x}.1")
    topo.save_state()
    try:
        if topo.mode == "netns":
            _build_netns(topo, names)
        _mount_data_dirs(topo, names)
    except BaseException:
        topo.teardown()
        raise
    return topo, why


def _build_netns(topo: Topology, names: Sequence[str]) -> None:
    bridge = f"{PREFIX}b{topo.run_id}"
    _run(["ip", "link", "add", bridge, "type", "bridge"])
    topo.links.append(bridge)
    topo.save_state()
    _run(["ip", "addr", "add", f"{topo.host_ip}/24", "dev", bridge])
    _run(["ip", "link", "set", bridge, "up"])
    for i, name in enumerate(names):
        ns = f"{PREFIX}-{topo.run_id}-{name}"
        host_end, node_end = f"{PREFIX}v{topo.run_id}{i}", f"{PREFIX}p{topo.run_id}{i}"
        _run(["ip", "netns", "add", ns])
        topo.namespaces[name] = ns
        topo.save_state()
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end])
        topo.links.append(host_end)
        topo.save_state()
        _run(["ip", "link", "set", node_end, "netns", ns])
        _run(["ip", "link", "set", host_end, "master", bridge])
        _run(["ip", "link", "set", host_end, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{topo.ips[name]}/24", "dev", node_end])
        _run(["ip", "-n", ns, "link", "set", node_end, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "netns", "exec", ns, "iptables-restore", "-w"], stdin=(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":CHAOS_IN - [0:0]\n:CHAOS_OUT - [0:0]\n-A INPUT -j CHAOS_IN\n"
            "-A OUTPUT -j CHAOS_OUT\nCOMMIT\n"))


def _mount_data_dirs(topo: Topology, names: Sequence[str]) -> None:
    if os.geteuid() != 0:
        return
    for name in names:
        d = topo.data_dir(name)
        d.mkdir(mode=0o700)
        proc = _run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                     f"{PREFIX}-{topo.run_id}", str(d)], check=False)
        if proc.returncode != 0:
            LOGGER.warning("tmpfs_unavailable dir=%s reason=%s", d, proc.stderr.strip())
            return
        topo.mounts.append(d)
        topo.save_state()
    topo.tmpfs = True


def fill_disk(path: Path) -> int:
    """Write ``path`` until its file system is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n = f.write(chunk)
            except OSError:
                break
            written += n or 0
            if not n:
                break
    with contextlib.suppress(OSError):
        with open(path, "ab", buffering=0) as f:  # the last partial blocks
            while f.write(b"\0" * 4096):
                written += 4096
    return written


# --- leftovers ------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_pids(pids: Mapping[int, str], run_dir: Path) -> list[str]:
    """SIGKILL the recorded PIDs that still run a command naming ``run_dir`` (a
    recycled PID belongs to someone else and is left alone)."""
    problems = []
    for pid in sorted(pids):
        if str(run_dir) not in _cmdline(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        if str(run_dir) in _cmdline(pid):
            problems.append(f"pid {pid} ({pids[pid]}) survived SIGKILL")
    return problems


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time), what the process driver records
    in ``workload.json`` to recognise its process; ``None`` if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])


def _kill_workloads(run_dir: Path) -> None:
    """SIGKILL the process group of every workload the nodes' process drivers started
    (``<data dir>/allocs/<alloc>/workload.json``) that still runs: workloads outlive
    meshd by design, and in loopback mode no namespace takes them down."""
    for state in run_dir.glob("*/allocs/*/workload.json"):
        try:
            doc = json.loads(state.read_text())
            pid, ticks = int(doc["pid"]), int(doc["start_ticks"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid > 1 and _start_ticks(pid) == ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _kill_namespace_pids(ns: str) -> list[str]:
    """Every process inside one of the harness's namespaces is the harness's."""
    out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in map(int, out):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers(force: bool = False) -> list[str]:
    """Remove what crashed or killed runs left: processes, namespaces, links, mounts
    and run directories named with :data:`PREFIX`. A run whose harness still runs
    is left alone unless ``force``. Returns what was removed."""
    removed: list[str] = []
    active: set[str] = set()
    for run_dir in sorted(RUN_ROOT.glob(f"{PREFIX}-*")):
        if not run_dir.is_dir() or not re.fullmatch(rf"{PREFIX}-[0-9a-f]{{4}}", run_dir.name):
            continue
        state_path = run_dir / "state.json"
        try:
            state: dict[str, Any] = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        harness = int(state.get("harness_pid", 0))
        if not force and harness and harness != os.getpid() and _alive(harness) \
                and "chaos" in _cmdline(harness):
            active.add(run_dir.name)
            continue
        _kill_pids({int(p): n for p, n in state.get("pids", {}).items()}, run_dir)
        _kill_workloads(run_dir)
        for m in reversed(state.get("mounts", [])):
            if _run(["umount", "-l", m], check=False).returncode == 0:
                removed.append(f"mount {m}")
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(f"dir {run_dir}")
    for ns in _run(["ip", "netns", "list"], check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(f"{PREFIX}-") and not any(name.startswith(a) for a in active):
            _kill_namespace_pids(name)
            _run(["ip", "netns", "del", name], check=False)
            removed.append(f"netns {name}")
    links = re.findall(r"^\d+: (" + PREFIX + r"[bv][0-9a-f]{4}\d*)[@:]",
                       _run(["ip", "-o", "link"], check=False).stdout, re.M)
    for link in links:
        if not any(link[4:8] == a[len(PREFIX) + 1:] for a in active):
            _run(["ip", "link", "del", link], check=False)
            removed.append(f"link {link}")
    return removed

