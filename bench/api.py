"""Micro-benchmark: the CPU the local API layer spends per pipelined ``kv_put``.

A child process serves the API (:func:`mesh.node.api.serve_api` on a unix
socket, as meshd does) with nothing behind it but a ``kv_put`` starter: each
call leaves a pending answer that a resolver task resolves a batch at a time,
``--resolve-every-ms`` after the first of the batch was begun, as the Raft ready
loop resolves every proposal of an applied batch at once (0: each answer is
ready when its call begins). This process drives it with the client of
``bench/raft.py throughput`` (:func:`drive`, :class:`MeshProto`): ``--clients``
puts in flight over ``--clients / --depth`` connections (100-byte values, fresh
request ids). Each repetition reports the server process's CPU time
(``/proc/PID/stat`` utime + stime) divided by the requests it answered: the
cost of framing, decoding, scheduling and answering that every write through
the leader's API pays on top of Raft.

``--baseline DIR`` also starts a server from another meshd tree (e.g. ``git
archive`` of the commit to compare against, unpacked in DIR) and measures the
two in alternation, repetition by repetition (ABBA): a same-minute A/B on a
shared, noisy machine (the ratio of each pair is printed too: a slow minute
slows both). ``--profile FILE`` records this tree's server with ``py-spy`` (GIL
samples, raw format) during its first measured repetition.

CPU time on a shared VM moves by several percent from one minute to the next.
``--instructions`` counts instead (``valgrind --tool=callgrind``, about 30 s
per tree): one process runs the server and ``--clients / --depth`` lockstep
clients over socket pairs (each sends ``--depth`` puts, waits for every answer,
and again; the writes are resolved once all clients' puts are begun), twice
with a different number of rounds; the difference divided by the extra
requests is the instructions per request of server, clients and resolver
together, repeatable to about 0.5%.

Usage::

    python bench/api.py                              # 5 x 3 s, batches every 0.5 ms
    python bench/api.py --baseline /tmp/base --reps 8 --seconds 2
    python bench/api.py --resolve-every-ms 0 --profile /tmp/api-prof.txt
    python bench/api.py --instructions --baseline /tmp/base

Prints one line per repetition, the median and range per tree, and as its last
line one JSON object; never passes or fails on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TREE = Path(os.environ.get("MESH_BENCH_TREE", ROOT))
"""The meshd tree whose ``mesh`` package is imported (a baseline server's differs)."""
sys.path.insert(0, str(TREE))
sys.path.insert(0, str(TREE / "tests"))

import trio  # noqa: E402
from daemons import api_call, wait_for  # noqa: E402

from bench.raft import MeshProto, cpu_seconds, drive, start_profiler  # noqa: E402
from mesh.node import api  # noqa: E402
from mesh.streams import DirectSocketStream  # noqa: E402

COUNT_METHOD = "bench_count"
"""The server's one handler: how many ``kv_put`` calls it has begun."""

INSTRUCTION_ROUNDS = (50, 150)
"""Lockstep rounds of the two ``--instructions`` runs."""


# --- the server ----------------------------------------------------------------------


class Write:
    """A begun ``kv_put``, as the API waits for it (:class:`api.Pending`)."""

    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()

    def outcome(self) -> dict[str, Any]:
        return self.result

    def resolve(self, index: int) -> None:
        # the shape of mesh.raft.state.Result.as_dict()
        self.result = {"ok": True, "code": "ok", "index": index, "mod_index": index,
                       "message": "", "duplicate": False}
        self.event.set()


class Writes:
    """The ``kv_put`` starter: begun writes wait in a batch until
    :meth:`resolve_batch` (``batch``: how many begun writes make
    :meth:`wait_batch` return; ``at_once``: resolve each when it begins)."""

    def __init__(self, batch: int = 1, at_once: bool = False) -> None:
        self.count = 0
        self._begun: list[Write] = []
        self._batch = batch
        self._at_once = at_once
        self._ready = trio.Event()

    def start(self, params: dict[str, Any]) -> api.Pending:
        if not (isinstance(params.get("key"), str) and isinstance(params.get("value"), bytes)
                and isinstance(params.get("request_id"), bytes)):
            raise api.ApiError("give a key, a value and a request id")
        self.count += 1
        write = Write()
        if self._at_once:
            write.resolve(self.count)
        else:
            self._begun.append(write)
            if len(self._begun) >= self._batch:
                self._ready.set()
        return write

    async def wait_batch(self) -> None:
        await self._ready.wait()
        self._ready = trio.Event()

    def resolve_batch(self) -> None:
        batch, self._begun = self._begun, []
        for write in batch:
            write.resolve(self.count)


async def resolve_batches(writes: Writes, delay_s: float) -> None:
    """Resolve each batch ``delay_s`` after it is ready (as an fsync would)."""
    while True:
        await writes.wait_batch()
        if delay_s:
            await trio.sleep(delay_s)
        writes.resolve_batch()


def serve(socket_path: Path, resolve_every_s: float) -> None:
    """Serve the API on ``socket_path`` until killed."""
    writes = Writes(at_once=not resolve_every_s)

    async def count_calls(params: dict[str, Any]) -> int:
        return writes.count

    async def main() -> None:
        listener = await api.bind_unix_socket(socket_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resolve_batches, writes, resolve_every_s)
            await nursery.start(api.serve_api, listener, {COUNT_METHOD: count_calls},
                                "bench", {"kv_put": writes.start})

    trio.run(main)


@contextmanager
def server(tree: Path, socket_path: Path, resolve_every_ms: float) -> Iterator[int]:
    """A server child process importing ``tree``'s ``mesh``; yields its PID once it
    answers, and kills it on the way out."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve", str(socket_path),
         "--resolve-every-ms", str(resolve_every_ms)],
        env={**os.environ, "MESH_BENCH_TREE": str(tree)})
    try:
        wait_for(lambda: proc.poll() is None and socket_path.exists()
                 and api_call(socket_path, COUNT_METHOD) is not None,
                 30, f"the API server of {tree} at {socket_path}")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# --- CPU time: the client in this process --------------------------------------------


def measure(label: str, socket_path: Path, pid: int, args: argparse.Namespace,
            seconds: float) -> dict[str, float]:
    """One repetition: :func:`drive` for ``seconds``; the server's CPU per request."""
    calls0 = api_call(socket_path, COUNT_METHOD)
    cpu0 = cpu_seconds({"server": pid})["server"]
    result = drive(socket_path, MeshProto, label, args.clients, seconds, {"server": pid},
                   args.depth)
    cpu1 = cpu_seconds({"server": pid})["server"]
    calls = api_call(socket_path, COUNT_METHOD) - calls0
    return {"us_per_request": 1e6 * (cpu1 - cpu0) / max(1, calls),
            "requests_per_s": result["writes_per_s"]}


def spread(values: list[float], digits: int = 1) -> str:
    return (f"median {statistics.median(values):.{digits}f}, "
            f"min {min(values):.{digits}f}, max {max(values):.{digits}f}")


def cpu_time(args: argparse.Namespace, trees: dict[str, Path]) -> dict[str, Any]:
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, ExitStack() as stack:
        pids = {name: stack.enter_context(server(tree, Path(tmp) / f"{name}.sock",
                                                 args.resolve_every_ms))
                for name, tree in trees.items()}
        for name in trees:
            measure(f"{name} warm-up", Path(tmp) / f"{name}.sock", pids[name], args, 1.0)
        for rep in range(args.reps):
            # ABBA order: whichever runs second in a pair measures a little worse
            for name in list(trees)[::-1 if rep % 2 else 1]:
                profiler = None
                if args.profile and name == "this" and rep == 0:
                    profiler = start_profiler(pids[name], Path(args.profile), args.seconds,
                                              rate=1000)
                    time.sleep(0.5)  # py-spy attaches before the measured load starts
                figure = measure(f"{name} rep {rep + 1}", Path(tmp) / f"{name}.sock",
                                 pids[name], args, args.seconds)
                if profiler is not None:
                    profiler.wait()
                figures[name].append(figure)
                print(f"  {name} rep {rep + 1}: {figure['us_per_request']:.1f} us of server "
                      f"CPU per request", flush=True)
    out: dict[str, Any] = {"bench": "api_cpu_per_request", "clients": args.clients,
                           "depth": args.depth, "resolve_every_ms": args.resolve_every_ms,
                           "seconds": args.seconds, "reps": args.reps}
    for name, reps in figures.items():
        us = [f["us_per_request"] for f in reps]
        rate = [f["requests_per_s"] for f in reps]
        print(f"{name} ({trees[name]}): us of server CPU per request: {spread(us)}; "
              f"requests/s: {spread(rate)}", flush=True)
        out[name] = {"us_per_request_median": round(statistics.median(us), 1),
                     "us_per_request_min": round(min(us), 1),
                     "us_per_request_max": round(max(us), 1),
                     "requests_per_s_median": round(statistics.median(rate))}
    if "baseline" in trees:
        ratios = [t["us_per_request"] / b["us_per_request"]
                  for t, b in zip(figures["this"], figures["baseline"], strict=True)]
        print(f"this / baseline, repetition by repetition: {spread(ratios, 3)}", flush=True)
        out["ratio_median"] = round(statistics.median(ratios), 3)
    return out


# --- instructions: server and lockstep clients in one process ------------------------


def lockstep(connections: int, depth: int, rounds: int) -> None:
    """Serve ``connections`` socket pairs and drive each for ``rounds`` rounds of
    ``depth`` pipelined puts; the client side parses only length prefixes, so
    that it costs the same whatever the tree."""
    writes = Writes(batch=connections * depth)
    proto = MeshProto()
    batch = b"".join(proto.request(f"k{i}") for i in range(depth))
    prefix = struct.Struct(">I")

    async def client(sock: socket.socket) -> None:
        stream = DirectSocketStream(sock)
        buf = b""
        for _ in range(rounds):
            await stream.send_all(batch)
            answered = 0
            while answered < depth:
                buf += await stream.receive_some(65_536)
                while len(buf) >= prefix.size:
                    end = prefix.size + prefix.unpack_from(buf)[0]
                    if len(buf) < end:
                        break
                    buf = buf[end:]
                    answered += 1
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resolve_batches, writes, 0.0)
            async with trio.open_nursery() as pairs:
                for _ in range(connections):
                    a, b = socket.socketpair()
                    pairs.start_soon(api.serve_api_stream, DirectSocketStream(a), {}, "bench",
                                     {"kv_put": writes.start})
                    pairs.start_soon(client, b)
            nursery.cancel_scope.cancel()
        assert writes.count == connections * depth * rounds

    trio.run(main)


def instructions(args: argparse.Namespace, trees: dict[str, Path]) -> dict[str, Any]:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    connections = max(1, args.clients // args.depth)

    def collected(tree: Path, rounds: int) -> int:
        run = subprocess.run(
            [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             str(Path(__file__).resolve()), "lockstep", "--connections", str(connections),
             "--depth", str(args.depth), "--rounds", str(rounds)],
            env={**os.environ, "MESH_BENCH_TREE": str(tree)},
            capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", run.stderr)
        assert found, run.stderr[-2000:]
        return int(found.group(1))

    out: dict[str, Any] = {"bench": "api_instructions_per_request",
                           "connections": connections, "depth": args.depth}
    low, high = INSTRUCTION_ROUNDS
    for name, tree in trees.items():
        extra = (collected(tree, high) - collected(tree, low)) / (
            (high - low) * connections * args.depth)
        print(f"{name} ({tree}): {extra:.0f} instructions per request", flush=True)
        out[name] = round(extra)
    if "baseline" in trees:
        out["ratio"] = round(out["this"] / out["baseline"], 3)
        print(f"this / baseline: {out['ratio']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve", help="(internal) the server process")
    child.add_argument("socket", type=Path)
    child.add_argument("--resolve-every-ms", type=float, default=0.5)
    load = sub.add_parser("lockstep", help="(internal) the --instructions process")
    load.add_argument("--connections", type=int, required=True)
    load.add_argument("--depth", type=int, required=True)
    load.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--depth", type=int, default=8,
                        help="puts pipelined per connection (connections = clients / depth)")
    parser.add_argument("--resolve-every-ms", type=float, default=0.5,
                        help="a batch of answers is resolved this long after its first "
                             "call began (0: at once)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", help="another meshd tree, measured in alternation")
    parser.add_argument("--profile", help="py-spy raw output file for this tree's server")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request under valgrind instead")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.socket, args.resolve_every_ms / 1000)
    elif args.command == "lockstep":
        lockstep(args.connections, args.depth, args.rounds)
    else:
        trees = {"this": ROOT}
        if args.baseline:
            trees = {"baseline": Path(args.baseline).resolve(), **trees}
        measured = instructions if args.instructions else cpu_time
        print(json.dumps(measured(args, trees)), flush=True)


if __name__ == "__main__":
    main()
