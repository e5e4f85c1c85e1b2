"""Raft benchmarks on real ``meshd`` processes (loopback, default ``lan`` profile).

    python bench/raft.py failover --rounds 20   # SIGKILL the leader, time until a
                                                # write is acknowledged again
    python bench/raft.py replace --rounds 5     # SIGKILL a voter, time until a new
                                                # voter is promoted in its place
    python bench/raft.py throughput             # 3 voters, fsync on, 64 clients:
                                                # committed kv_put/s via the leader and
                                                # via a follower; then PySyncObj
    python bench/raft.py restart --entries 1000000   # a voter's WAL + snapshot after
                                                # 1M puts over 100k keys: time to
                                                # open it and rebuild the state

Each prints one line per round, then min/median/p99, and as its last line one JSON
object. Writes are issued through a surviving node's local API every 10 ms (each a
fresh request; the write is forwarded to whichever node leads). Issue [raft] goals:
failover median <= 1.0 s and p99 <= 2 s; voter replacement <= 10 s.

Daemons run on 127.0.4.150-127.0.4.159, gossip port 17946 (``tests/daemons.py``),
and are killed by PID on the way out.

``throughput`` (issue 4: "3 voters, fsync on, 64 concurrent clients: committed
writes/s; >= 10,000/s and ahead of PySyncObj measured in the same run"): 3 meshd
nodes on 127.0.4.160-162; N clients in this process (one thread, one epoll loop),
each with one persistent connection to a node's API socket and one ``kv_put``
(100-byte value, fresh request id) outstanding; a write counts when it is
acknowledged (``--depth D``: the N clients share N/D connections, D puts pipelined
on each, as etcd's benchmark tool shares ``--conns`` among ``--clients``). First
through the leader, then through a follower (forwarded). Each phase also prints
Raft frames, Readies and fsyncs per write on every node. Then, unless
``--no-pysyncobj``, the same load against a 3-process PySyncObj KV on
127.0.4.163-165 (``pip install pysyncobj``; not a project dependency), each process
serving the same client protocol shape (one request, one answer, persistent unix
socket) and applying ``set`` through a ``@replicated`` method with ``sync=True``;
PySyncObj always gets one connection per client (its server answers a
connection's requests one at a time). ``--profile DIR`` runs ``py-spy record`` (if
installed) on the meshd leader and a follower during the leader phase.

``restart`` (issue 4: "restart of a voter with 1M log entries / 100k keys: <= 3 s to
serve"): builds, in this process, the ``DIR/raft`` a voter has after that many
puts (WAL records of 256 entries, the adapter's snapshot and compaction policy;
``--no-snapshot`` keeps every entry in the WAL), then times ``FileStorage`` recovery
plus what ``RaftAdapter.create`` and the first Readies do before the node serves:
restore the snapshot into a ``MeshState`` and re-apply the committed entries after it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import random
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemons import ApiUnavailable, Cluster, Daemon, wait_for  # noqa: E402

from mesh import wire  # noqa: E402
from mesh.errors import MeshError  # noqa: E402
from mesh.node.messages import MAX_API_FRAME_BYTES, RpcType  # noqa: E402
from mesh.raft.config import RaftConfig  # noqa: E402
from mesh.raft.core import RaftCore  # noqa: E402
from mesh.raft.messages import ConfState, Entry, HardState  # noqa: E402
from mesh.raft.state import KvPut, MeshState  # noqa: E402
from mesh.raft.storage import FileStorage, bootstrap  # noqa: E402
from mesh.types import NodeId  # noqa: E402

WRITE_POLL_S = 0.01


def bench_ips(first: int, count: int) -> list[str]:
    """``127.0.4.<first>`` ...: addresses no test run uses (tests take 127.0.0.x)."""
    return [f"127.0.4.{i}" for i in range(first, first + count)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summary(name: str, values: list[float]) -> dict[str, float]:
    return {f"{name}_min_s": round(min(values), 3),
            f"{name}_median_s": round(statistics.median(values), 3),
            f"{name}_p99_s": round(percentile(values, 0.99), 3)}


def status(d: Daemon) -> dict[str, Any]:
    return d.api("raft_status")  # type: ignore[no-any-return]


def wait_group(cluster: Cluster, observer: Daemon, voters: int, timeout_s: float = 60
               ) -> dict[str, Any]:
    """Wait until ``observer`` sees ``voters`` voters and a leader, and that leader's
    own status agrees (a watcher's view can mix what different voters told it, and
    killing a leader the group has just shrunk to would stall the next round)."""
    def ok() -> dict[str, Any] | None:
        st = status(observer)
        if not st["leader"] or len(st["voters"]) != voters:
            return None
        lead = cluster[st["leader"]]
        if not lead.running():
            return None
        own = status(lead)
        return st if own["role"] == "leader" and len(own["voters"]) == voters else None

    return wait_for(ok, timeout_s, f"{voters} voters with a leader")


def write_until_acked(d: Daemon, round_no: int, timeout_s: float = 30) -> float:
    """Issue writes through ``d`` until one is acknowledged; return when (wall clock)."""
    deadline = time.monotonic() + timeout_s
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            d.api("kv_put", {"key": f"bench/{round_no}", "value": str(i),
                             "request_id": os.urandom(16)})
            return time.time()
        except (MeshError, ApiUnavailable, OSError):
            time.sleep(WRITE_POLL_S)
    raise SystemExit(f"round {round_no}: no write acknowledged within {timeout_s}s")


@contextlib.contextmanager
def formed_cluster(base: Path, nodes: int) -> Iterator[Cluster]:
    """``nodes`` daemons (lan profile) on 127.0.4.150+, formed; killed on the way out."""
    with Cluster(base, profile="lan") as cluster:
        for i, ip in enumerate(bench_ips(150, nodes)):
            cluster.add(f"n{i}", ip)
        cluster.start()
        cluster.wait_formed(60)
        yield cluster


def failover(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    with formed_cluster(base, args.nodes) as cluster:
        times = []
        for r in range(args.rounds):
            observer = cluster["n1"] if cluster["n1"].running() else cluster["n0"]
            st = wait_group(cluster, observer, 3)
            leader = cluster[st["leader"]]
            via = next(d for d in cluster if d.running() and d is not leader)
            write_until_acked(via, -1 - r)  # the group is healthy before the kill
            killed_at = leader.kill()
            acked_at = write_until_acked(via, r)
            times.append(acked_at - killed_at)
            print(f"round {r + 1}: leader {leader.name} killed; write acknowledged again "
                  f"after {times[-1]:.3f} s", flush=True)
            leader.start()  # same data dir: it rejoins and catches up
            cluster.wait_formed(60)
        return {"bench": "raft_failover", "nodes": args.nodes, "rounds": args.rounds,
                **summary("failover", times)}


def replace(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    with formed_cluster(base, args.nodes) as cluster:
        times = []
        for r in range(args.rounds):
            st = wait_group(cluster, next(d for d in cluster if d.running()), 3)
            victim = cluster[next(v for v in st["voters"] if v != st["leader"])]
            observer = cluster[st["leader"]]
            killed_at = victim.kill()

            def replaced(observer: Daemon = observer, victim: Daemon = victim) -> bool:
                s = status(observer)
                return victim.name not in s["voters"] and len(s["voters"]) == 3

            wait_for(replaced, 60, f"a voter to replace {victim.name}", interval_s=0.05)
            times.append(time.time() - killed_at)
            print(f"round {r + 1}: voter {victim.name} killed; replaced after "
                  f"{times[-1]:.3f} s", flush=True)
            victim.start()
            cluster.wait_formed(60)
            # Let the restarted node become a stable candidate again (autopilot 10 s).
            time.sleep(11)
        return {"bench": "raft_voter_replacement", "nodes": args.nodes, "rounds": args.rounds,
                **summary("replace", times)}


# --- throughput ----------------------------------------------------------------------

VALUE = b"v" * 100
KEYS_PER_CLIENT = 64
PYSYNCOBJ_PORT = 17947
BUILD_BATCH = 256
"""Entries per save while building the restart bench's log."""


class MeshProto:
    """meshd's API framing: one ``kv_put`` request per write (fresh request id).

    Encoded and decoded the way the API server does it (one ``wire.FrameEncoder``
    per connection, ``decode_tagged`` without envelope objects): the client shares
    the server's 2 cores, so its CPU per write (printed as ``bench``) is kept low."""

    def __init__(self) -> None:
        self.decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
        self.encoder = wire.FrameEncoder(MAX_API_FRAME_BYTES)

    def request(self, key: str) -> bytes:
        return self.encoder.encode(RpcType.REQUEST, ["kv_put", {
            "key": key, "value": VALUE, "request_id": os.urandom(16)}])

    def answers(self, chunk: bytes) -> list[str | None]:
        """Answers completed by ``chunk``: ``None`` for success, else the error."""
        self.decoder.receive_data(chunk)
        out: list[str | None] = []
        for payload in self.decoder.next_payloads():
            msg_type, body = wire.decode_tagged(payload, MAX_API_FRAME_BYTES)
            if msg_type != RpcType.RESPONSE or type(body) is not list or len(body) != 3:
                raise MeshError(f"not an API response: {body!r:.80}")
            out.append(None if body[0] is True else str(body[2]))
        return out


class LineProto:
    """The PySyncObj node's line protocol (``bench/raft.py _pso-node``)."""

    def __init__(self) -> None:
        self.buf = b""

    @staticmethod
    def request(key: str) -> bytes:
        return b"P " + key.encode() + b" " + VALUE + b"\n"

    def answers(self, chunk: bytes) -> list[str | None]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [None if line == b"OK" else line.decode(errors="replace") for line in lines]


class LineConn:
    """One blocking connection to a PySyncObj node, for status and warm-up."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def request(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\n")
        answer = self.file.readline()
        if not answer:
            raise OSError("connection closed")
        return answer.rstrip(b"\n")

    def put(self, key: str) -> None:
        answer = self.request(LineProto.request(key).rstrip(b"\n"))
        if answer != b"OK":
            raise MeshError(answer.decode(errors="replace"))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            out[name] = 0.0
    return out


def drive(path: Path, proto: type[MeshProto] | type[LineProto], label: str, clients: int,
          seconds: float, pids: dict[str, int], depth: int = 1) -> dict[str, Any]:
    """``clients`` closed-loop clients, each with its own connection to the unix
    socket ``path`` and one put outstanding, for ``seconds``: acknowledged puts
    per second, latency percentiles, CPU per process. With ``depth`` > 1, the
    clients share ``clients // depth`` connections, each with ``depth`` puts
    pipelined (answers come back in order).

    The clients share one thread and an epoll loop (a load generator must not be
    what is measured: 64 Python threads cost the servers' 2 cores more CPU and a
    wake-up per answer)."""
    conns: dict[int, tuple[socket.socket, MeshProto | LineProto, int]] = {}
    sel = selectors.DefaultSelector()
    links = max(1, clients // depth)
    for c in range(links):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(path))
        conns[sock.fileno()] = (sock, proto(), c)
        sel.register(sock, selectors.EVENT_READ)
    lat: list[float] = []
    sent_at: list[collections.deque[float]] = [collections.deque() for _ in range(links)]
    count = [0] * links
    errors = 0
    last_error = ""
    cpu0 = cpu_seconds({**pids, "bench": os.getpid()})
    t_start = time.perf_counter()
    end = t_start + seconds
    for sock, p, c in conns.values():
        for i in range(depth):
            sent_at[c].append(time.perf_counter())
            sock.sendall(p.request(f"bench/c{c}/{i}"))
    open_conns = links
    while open_conns:
        for key, _ in sel.select(timeout=30):
            sock, p, c = conns[key.fd]
            chunk = sock.recv(65_536)
            if not chunk:
                raise SystemExit(f"{label}: the server closed connection {c}")
            out = []
            for error in p.answers(chunk):
                now = time.perf_counter()
                started = sent_at[c].popleft()
                if error is None:
                    if now <= end:
                        lat.append(now - started)
                    count[c] += 1
                else:
                    errors += 1
                    last_error = error
                if now < end:
                    sent_at[c].append(now)
                    out.append(p.request(f"bench/c{c}/{count[c] % KEYS_PER_CLIENT}"))
            if out:
                sock.sendall(b"".join(out))
            elif not sent_at[c]:
                sel.unregister(sock)
                open_conns -= 1
    elapsed = time.perf_counter() - t_start
    cpu1 = cpu_seconds({**pids, "bench": os.getpid()})
    for sock, _, _ in conns.values():
        sock.close()
    sel.close()
    result = {
        "writes": len(lat),
        "writes_per_s": round(len(lat) / seconds),
        "p50_ms": round(percentile(lat, 0.50) * 1000, 2) if lat else None,
        "p99_ms": round(percentile(lat, 0.99) * 1000, 2) if lat else None,
        "errors": errors,
        "load_1m": round(os.getloadavg()[0], 2),
        "cpu_pct": {k: round(100 * (cpu1[k] - cpu0[k]) / elapsed) for k in cpu1},
    }
    print(f"{label}: {result['writes_per_s']} writes/s ({result['writes']} in {seconds:g} s), "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, errors {result['errors']}"
          f"{' (' + last_error[:120] + ')' if last_error else ''}, "
          f"load {result['load_1m']}, cpu% {result['cpu_pct']}", flush=True)
    return result


COUNTED = ("frames_out", "frames_in", "readies", "saves", "entries_saved")
"""Raft adapter counters the throughput bench reports per acknowledged write."""


def counters(cluster: Cluster) -> dict[str, dict[str, int]]:
    return {d.name: status(d).get("counters", {}) for d in cluster}


def per_write(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
              result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Counter increments per acknowledged write, per node (how well the leader
    batches: frames sent and received, Readies, fsyncs)."""
    writes = max(1, result["writes"])
    out = {node: {k: round((after[node].get(k, 0) - before[node].get(k, 0)) / writes, 3)
                  for k in COUNTED} for node in after}
    print(f"  per write: {out}", flush=True)
    return out


def start_profiler(pid: int, out: Path, seconds: float, rate: int = 250
                   ) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``out`` (raw stacks), or
    ``None`` without py-spy. Only the thread holding the GIL is sampled: where the
    CPU goes, not where threads wait (a thread blocked on the GIL is otherwise
    sampled at the line it waits on)."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not installed: no profile", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "--gil", "--nonblocking", "-r", str(rate),
                             "--format", "raw", "-d", str(max(1, int(seconds))),
                             "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def meshd_throughput(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    with Cluster(base / "mesh", profile="lan") as cluster:
        for i, ip in enumerate(bench_ips(160, 3)):
            cluster.add(f"t{i}", ip)
        cluster.start()
        cluster.wait_formed(60)
        st = wait_group(cluster, cluster["t0"], 3, timeout_s=90)
        leader = cluster[st["leader"]]
        follower = next(d for d in cluster if d is not leader)
        write_until_acked(leader, 0)
        pids = {("leader" if d is leader else d.name): d.pid for d in cluster}
        print(f"meshd: voters {st['voters']}, leader {leader.name} (pid {leader.pid}), "
              f"follower used {follower.name}", flush=True)
        profs = []
        if args.profile:
            profs = [start_profiler(leader.pid, Path(args.profile) / "meshd-leader.txt",
                                    min(10, args.seconds)),
                     start_profiler(follower.pid, Path(args.profile) / "meshd-follower.txt",
                                    min(10, args.seconds))]
        before = counters(cluster)
        via_leader = drive(leader.socket_path, MeshProto, "meshd via leader",
                           args.clients, args.seconds, pids, args.depth)
        via_leader["per_write"] = per_write(before, counters(cluster), via_leader)
        for prof in profs:
            if prof is not None:
                prof.wait()
        before = counters(cluster)
        via_follower = drive(follower.socket_path, MeshProto, "meshd via follower",
                             args.clients, args.seconds, pids, args.depth)
        via_follower["per_write"] = per_write(before, counters(cluster), via_follower)
        end = status(leader)
        if end["leader"] != leader.name:
            print(f"warning: leadership moved to {end['leader']} during the run", flush=True)
        return {"via_leader": via_leader, "via_follower": via_follower,
                "leader_changed": end["leader"] != leader.name}


# PySyncObj side: one process per node, started as `bench/raft.py _pso-node`.

def pso_node(args: argparse.Namespace) -> None:  # pragma: no cover - runs in a child
    import socketserver

    from pysyncobj import SyncObj, SyncObjConf, replicated  # type: ignore[import-not-found]

    class KV(SyncObj):  # type: ignore[misc]
        def __init__(self, me: str, others: list[str], conf: Any) -> None:
            super().__init__(me, others, conf)
            self.data: dict[str, bytes] = {}

        @replicated  # type: ignore[misc]
        def set(self, key: str, value: bytes) -> None:
            self.data[key] = value

    conf = SyncObjConf(bindAddress=args.me,  # default 0.0.0.0: one port for all three
                       journalFile=str(Path(args.dir) / "journal"),
                       fullDumpFile=str(Path(args.dir) / "dump"),
                       appendEntriesUseBatch=not args.no_batch,
                       dynamicMembershipChange=False, commandsWaitLeader=True)
    kv = KV(args.me, args.peers.split(","), conf)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                if line.startswith(b"P "):
                    _, key, value = line.rstrip(b"\n").split(b" ", 2)
                    try:
                        kv.set(key.decode(), value, sync=True, timeout=10)
                        self.wfile.write(b"OK\n")
                    except Exception as exc:  # SyncObjException: no leader, timeout...
                        self.wfile.write(f"ERR {exc!r}".encode() + b"\n")
                elif line.startswith(b"S"):
                    st = kv.getStatus()
                    leader = st.get("leader")
                    self.wfile.write(json.dumps({
                        "leader": str(leader) if leader is not None else None,
                        "self": str(st.get("self")), "ready": kv.isReady(),
                    }).encode() + b"\n")
                else:
                    self.wfile.write(b"ERR bad request\n")

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        request_queue_size = 128

    sock = Path(args.dir) / "kv.sock"
    with Server(str(sock), Handler) as server:
        server.serve_forever()


def pysyncobj_throughput(args: argparse.Namespace, base: Path, batch: bool) -> dict[str, Any]:
    """``batch``: PySyncObj's default ``appendEntriesUseBatch=True`` (entries go out on
    the next ``appendEntriesPeriod`` tick, 100 ms) or False (an AppendEntries per
    command, sent at once)."""
    tag = "pysyncobj" + ("" if batch else " appendEntriesUseBatch=False")
    addrs = [f"{ip}:{PYSYNCOBJ_PORT}" for ip in bench_ips(163, 3)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    dirs = {a: base / f"pso{int(batch)}" / f"p{i}" for i, a in enumerate(addrs)}
    try:
        for a, d in dirs.items():
            d.mkdir(parents=True)
            with open(d.with_suffix(".log"), "ab") as log:
                procs[a] = subprocess.Popen(
                    [sys.executable, __file__, "_pso-node", "--me", a, "--dir", str(d),
                     "--peers", ",".join(x for x in addrs if x != a)]
                    + ([] if batch else ["--no-batch"]),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        def leader() -> str | None:
            seen = set()
            for a, d in dirs.items():
                if procs[a].poll() is not None:
                    raise SystemExit(f"pysyncobj node {a} exited; see {d}.log")
                conn = LineConn(d / "kv.sock")
                try:
                    st = json.loads(conn.request(b"S"))
                finally:
                    conn.close()
                if not st["ready"] or st["leader"] is None:
                    return None
                seen.add(st["leader"])
            return seen.pop() if len(seen) == 1 else None

        lead = wait_for(leader, 60, "a PySyncObj leader")
        fol = next(a for a in addrs if a != lead)
        LineConn(dirs[lead] / "kv.sock").put("bench/warmup")
        pids = {("leader" if a == lead else a): p.pid for a, p in procs.items()}
        print(f"{tag} (pysyncobj {importlib.metadata.version('pysyncobj')}): leader {lead}, follower used {fol}", flush=True)
        # One connection per client whatever --depth says: the PySyncObj node's
        # server answers a connection's requests one at a time (a thread each), so
        # sharing connections would only hold it back.
        via_leader = drive(dirs[lead] / "kv.sock", LineProto, f"{tag} via leader",
                           args.clients, args.seconds, pids)
        via_follower = drive(dirs[fol] / "kv.sock", LineProto, f"{tag} via follower",
                             args.clients, args.seconds, pids)
        return {"via_leader": via_leader, "via_follower": via_follower}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


# --- restart ---------------------------------------------------------------------


def build_log(directory: Path, entries: int, keys: int, cfg: RaftConfig) -> dict[str, Any]:
    """Write what a voter's ``DIR/raft`` holds after ``entries`` ``kv_put``s over
    ``keys`` keys (100-byte values, fresh request ids), saved in batches of
    ``BUILD_BATCH`` as a leader's Readies would be, with the adapter's snapshot and
    compaction policy (``snapshot_entries``, ``snapshot_keep_entries``) applied
    when the last snapshot before the end is due. fsync is off while building
    (the files are the same)."""
    storage = FileStorage(directory, sync=False)
    bootstrap(storage, [NodeId("n0")])
    state = MeshState()
    first = storage.last_index() + 1
    batch: list[Entry] = []
    for e in storage.entries(1, first):
        state.apply(e)
    last_snap = 0
    end = first + entries
    for index in range(first, end):
        key = f"app/{(index * 7919) % keys:08d}"
        batch.append(Entry(2, index, KvPut(key, VALUE, request_id=os.urandom(16)).encode()))
        if len(batch) == BUILD_BATCH or index == end - 1:
            storage.save(HardState(2, NodeId("n0"), index), batch, None)
            for e in batch:
                state.apply(e)
            batch = []
            # The adapter snapshots once snapshot_entries are applied since the
            # last one; only the last such snapshot shapes the final files.
            if index - last_snap >= cfg.snapshot_entries and end - 1 - index < cfg.snapshot_entries:
                conf = ConfState(voters=(NodeId("n0"),))
                storage.create_snapshot(index, conf, state.snapshot())
                storage.compact(index - cfg.snapshot_keep_entries)
                last_snap = index
    storage.close()
    files = sorted(directory.iterdir())
    return {"wal_bytes": sum(f.stat().st_size for f in files if f.suffix == ".log"),
            "wal_segments": sum(1 for f in files if f.suffix == ".log"),
            "snapshot_bytes": sum(f.stat().st_size for f in files if f.suffix == ".snap"),
            "snapshot_index": last_snap, "last_index": end - 1}


def recover(directory: Path, cfg: RaftConfig) -> tuple[float, float, int]:
    """Open the storage and rebuild the state as a restarting meshd does
    (:meth:`RaftAdapter.create`, then applying the committed entries of the first
    Readies). Returns (seconds to open the WAL, seconds to serve, entries applied)."""
    t0 = time.perf_counter()
    storage = FileStorage(directory)
    t_open = time.perf_counter() - t0
    state = MeshState()
    snap = storage.snapshot()
    if not snap.is_empty:
        state.restore(snap.data, snap.meta.index)
    core = RaftCore(cfg, NodeId("n0"), storage, random.Random(1), applied=state.applied_index)
    applied = 0
    while (rd := core.ready()) is not None and rd.committed_entries:
        for e in rd.committed_entries:
            state.apply(e)
        applied += len(rd.committed_entries)
        core.advance(rd)
    t_serve = time.perf_counter() - t0
    storage.close()
    return t_open, t_serve, applied


def restart(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    cfg = RaftConfig.lan()
    if args.no_snapshot:
        cfg = dataclasses.replace(cfg, snapshot_entries=10 * args.entries)
    t0 = time.perf_counter()
    built = build_log(base / "raft", args.entries, args.keys, cfg)
    print(f"built {args.entries} entries over {args.keys} keys in "
          f"{time.perf_counter() - t0:.1f} s: {built}", flush=True)
    opens, serves = [], []
    applied = 0
    for r in range(args.rounds):
        t_open, t_serve, applied = recover(base / "raft", cfg)
        opens.append(t_open)
        serves.append(t_serve)
        print(f"round {r + 1}: WAL open {t_open:.3f} s, serving after {t_serve:.3f} s "
              f"({applied} entries re-applied), load {os.getloadavg()[0]:.2f}", flush=True)
    return {"bench": "raft_restart", "entries": args.entries, "keys": args.keys,
            "rounds": args.rounds, **built, "reapplied": applied,
            **summary("open", opens), **summary("serve", serves)}


def throughput(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "raft_throughput", "voters": 3, "fsync": True,
                              "clients": args.clients, "depth": args.depth,
                              "seconds": args.seconds,
                              "cpus": os.cpu_count()}
    if not args.no_meshd:
        result["meshd"] = meshd_throughput(args, base)
    if not args.no_pysyncobj:
        result["pysyncobj"] = pysyncobj_throughput(args, base, batch=True)
        result["pysyncobj_nobatch"] = pysyncobj_throughput(args, base, batch=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("failover")
    f.add_argument("--rounds", type=int, default=20)
    f.add_argument("--nodes", type=int, default=3)
    r = sub.add_parser("replace")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--nodes", type=int, default=4)
    t = sub.add_parser("throughput")
    t.add_argument("--clients", type=int, default=64)
    t.add_argument("--depth", type=int, default=1,
                   help="puts pipelined per connection (clients share clients/depth "
                        "connections); 1: one connection per client")
    t.add_argument("--seconds", type=float, default=20)
    t.add_argument("--no-pysyncobj", action="store_true")
    t.add_argument("--no-meshd", action="store_true")
    t.add_argument("--profile", metavar="DIR", help="py-spy the meshd leader and a follower (raw stacks)")
    rs = sub.add_parser("restart")
    rs.add_argument("--entries", type=int, default=1_000_000)
    rs.add_argument("--keys", type=int, default=100_000)
    rs.add_argument("--rounds", type=int, default=3)
    rs.add_argument("--no-snapshot", action="store_true",
                    help="never snapshot: every entry stays in the WAL (worst case)")
    n = sub.add_parser("_pso-node")  # one PySyncObj node (internal, for throughput)
    n.add_argument("--me", required=True)
    n.add_argument("--peers", required=True)
    n.add_argument("--dir", required=True)
    n.add_argument("--no-batch", action="store_true")
    args = parser.parse_args()
    if args.command == "_pso-node":
        pso_node(args)
        return
    commands = {"failover": failover, "replace": replace, "throughput": throughput,
                "restart": restart}
    with tempfile.TemporaryDirectory(prefix="raftb", dir="/tmp") as tmp:
        result = commands[args.command](args, Path(tmp))
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
