"""Micro-benchmark: committed entries/s of three in-process RaftCores.

Closed loop: ``--clients`` clients each keep one write outstanding; a write
counts once the leader applies it. Each round every node handles one Ready
(one ``storage.save``, i.e. at most one fsync per node per round) and then all
messages are delivered, so proposals arriving while a round runs are batched
into the next one.

Everything runs in one thread: the three nodes' fsyncs happen one after another
instead of in parallel on three machines, so the file-backed figures are a
lower bound for the core plus WAL. No network, no trio, no TLS.

Usage::

    python bench/raft_core.py                       # memory and file (fsync on)
    python bench/raft_core.py --storage file --clients 64 --seconds 5
    python bench/raft_core.py --storage file --no-fsync

Prints figures; never passes or fails on a time.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.raft.config import RaftConfig  # noqa: E402
from mesh.raft.core import RaftCore, Role  # noqa: E402
from mesh.raft.messages import EntryKind, RaftMessage  # noqa: E402
from mesh.raft.storage import FileStorage, MemoryStorage, RaftStorage, bootstrap  # noqa: E402
from mesh.types import NodeId  # noqa: E402

IDS = [NodeId("n1"), NodeId("n2"), NodeId("n3")]


def run(
    make_storage: Callable[[NodeId], RaftStorage],
    *,
    clients: int,
    payload_bytes: int,
    seconds: float,
) -> dict[str, float]:
    """Run one closed-loop measurement and return its figures."""
    cfg = RaftConfig.lan()
    storages = {n: make_storage(n) for n in IDS}
    for s in storages.values():
        bootstrap(s, IDS)
    cores = {n: RaftCore(cfg, n, storages[n], random.Random(i)) for i, n in enumerate(IDS)}
    inbox: list[RaftMessage] = []
    fsyncs = 0
    committed = 0
    outstanding = 0
    rounds = 0
    payload = b"x" * payload_bytes
    lead = IDS[0]

    def handle_ready(n: NodeId) -> int:
        nonlocal fsyncs
        core = cores[n]
        rd = core.ready()
        if rd is None:
            return 0
        storages[n].save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
        fsyncs += rd.must_sync
        inbox.extend(rd.messages)
        done = 0
        if n == lead:
            done = sum(1 for e in rd.committed_entries if e.kind is EntryKind.NORMAL and e.data)
        core.advance(rd)
        return done

    for n in IDS:
        handle_ready(n)  # applies the bootstrap membership
    cores[lead].campaign()
    for _ in range(50):
        for n in IDS:
            handle_ready(n)
        batch, inbox[:] = list(inbox), []
        for m in batch:
            cores[m.dst].step(m)
        if cores[lead].role is Role.LEADER and cores[lead].commit_index >= cores[lead].last_index:
            break
    assert cores[lead].role is Role.LEADER

    start = time.perf_counter()
    deadline = start + seconds
    fsyncs = 0
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        while outstanding < clients:
            cores[lead].propose(payload)
            outstanding += 1
        for n in IDS:
            done = handle_ready(n)
            committed += done
            outstanding -= done
        batch, inbox[:] = list(inbox), []
        for m in batch:
            cores[m.dst].step(m)
        rounds += 1
    elapsed = time.perf_counter() - start
    for s in storages.values():
        close = getattr(s, "close", None)
        if close is not None:
            close()
    return {
        "committed_per_s": committed / elapsed,
        "rounds": rounds,
        "entries_per_fsync": committed / max(1, fsyncs / len(IDS)),
        "elapsed_s": elapsed,
        "committed": committed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", choices=["memory", "file", "both"], default="both")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-fsync", action="store_true", help="FileStorage without fsync")
    parser.add_argument(
        "--dir", default=None, help="where FileStorage writes (default: a temp dir)"
    )
    args = parser.parse_args()

    kinds = ["memory", "file"] if args.storage == "both" else [args.storage]
    print(
        f"raft core, 3 voters in one process, payload {args.payload_bytes} B, "
        f"{args.seconds:g} s per row"
    )
    print(f"{'storage':<22} {'clients':>7} {'committed/s':>12} {'entries/fsync':>14} {'rounds':>8}")
    for kind in kinds:
        for clients in args.clients:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:

                def make(n: NodeId, tmp: str = tmp, kind: str = kind) -> RaftStorage:
                    if kind == "memory":
                        return MemoryStorage()
                    return FileStorage(Path(tmp) / n, sync=not args.no_fsync)

                r = run(
                    make, clients=clients, payload_bytes=args.payload_bytes, seconds=args.seconds
                )
            label = kind if kind == "memory" else f"file fsync={'off' if args.no_fsync else 'on'}"
            per_fsync = f"{r['entries_per_fsync']:.1f}" if kind == "file" else "-"
            print(
                f"{label:<22} {clients:>7} {r['committed_per_s']:>12,.0f} {per_fsync:>14} "
                f"{int(r['rounds']):>8}"
            )


if __name__ == "__main__":
    main()
