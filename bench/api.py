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
two in alternation, repetition by repetition: a same-minute A/B on a shared,
noisy machine. ``--profile FILE`` records this tree's server with ``py-spy``
(GIL samples, raw format) during its first measured repetition.

Usage::

    python bench/api.py                              # 5 x 3 s, batches every 0.5 ms
    python bench/api.py --baseline /tmp/base --reps 7
    python bench/api.py --resolve-every-ms 0 --profile /tmp/api-prof.txt

Prints one line per repetition, the median and range per tree, and as its last
line one JSON object; never passes or fails on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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

from daemons import api_call, wait_for  # noqa: E402

from bench.raft import MeshProto, cpu_seconds, drive  # noqa: E402

COUNT_METHOD = "bench_count"
"""The server's one handler: how many ``kv_put`` calls it has begun."""


# --- the server (child process) ------------------------------------------------------


def serve(socket_path: Path, resolve_every_s: float) -> None:
    """Serve the API on ``socket_path`` until killed."""
    import trio

    from mesh.node import api

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

    begun: list[Write] = []
    proposed = trio.Event()
    count = 0

    def start_kv_put(params: dict[str, Any]) -> api.Pending:
        nonlocal count, proposed
        if not (isinstance(params.get("key"), str) and isinstance(params.get("value"), bytes)
                and isinstance(params.get("request_id"), bytes)):
            raise api.ApiError("give a key, a value and a request id")
        count += 1
        write = Write()
        if resolve_every_s:
            begun.append(write)
            proposed.set()
        else:
            write.resolve(count)
        return write

    async def count_calls(params: dict[str, Any]) -> int:
        return count

    async def resolve_batches() -> None:
        nonlocal proposed
        resolved = 0
        while True:
            await proposed.wait()
            proposed = trio.Event()
            await trio.sleep(resolve_every_s)
            batch = list(begun)
            begun.clear()
            for write in batch:
                resolved += 1
                write.resolve(resolved)

    async def main() -> None:
        listener = await api.bind_unix_socket(socket_path)
        async with trio.open_nursery() as nursery:
            if resolve_every_s:
                nursery.start_soon(resolve_batches)
            await nursery.start(api.serve_api, listener, {COUNT_METHOD: count_calls},
                                "bench", {"kv_put": start_kv_put})

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


# --- the client (this process) -------------------------------------------------------


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


def spread(values: list[float]) -> str:
    return (f"median {statistics.median(values):.1f}, "
            f"min {min(values):.1f}, max {max(values):.1f}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    trees = {"this": ROOT}
    if args.baseline:
        trees = {"baseline": Path(args.baseline).resolve(), **trees}
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, ExitStack() as stack:
        pids = {name: stack.enter_context(server(tree, Path(tmp) / f"{name}.sock",
                                                 args.resolve_every_ms))
                for name, tree in trees.items()}
        for name in trees:
            measure(f"{name} warm-up", Path(tmp) / f"{name}.sock", pids[name], args, 1.0)
        for rep in range(args.reps):
            for name in trees:
                profiler = None
                if args.profile and name == "this" and rep == 0:
                    profiler = start_profiler(pids[name], Path(args.profile), args.seconds)
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
    return out


def start_profiler(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not installed: no profile", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "record", "--gil", "--nonblocking", "-r", "250",
                             "--format", "raw", "-d", str(max(1, int(seconds))),
                             "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches before the measured load starts
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve", help="(internal) the server process")
    child.add_argument("socket", type=Path)
    child.add_argument("--resolve-every-ms", type=float, default=0.5)
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
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.socket, args.resolve_every_ms / 1000)
    else:
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
