"""Security costs: TLS handshakes one core accepts, datagram sealing throughput and
overhead.

1. **Handshakes**: a ``TlsServer`` runs in a child process on 127.0.0.1 with a
   ``mesh-gossip/1`` handler that returns at once; the parent opens mutually
   authenticated links with ``open_tls_stream`` (full TLS 1.3 handshake, client
   certificate verified, deny-list check, status frame) from ``--concurrency`` trio
   tasks and closes each one. The server's *CPU* time is measured in the child, so
   ``handshakes per server CPU-second`` is what one core accepts regardless of how
   fast this one client process can dial (on a small machine the client, which does
   the same ECDSA work, is the bottleneck of the wall-clock rate).
2. **Sealing**: ``KeyringCodec`` seal + open round trips (AES-256-GCM, fresh
   ``os.urandom`` nonce, wall-clock timestamp, replay check) for 64, 512 and 1400
   byte payloads; opening with the second key of a ring (during a rotation); and the
   cost of refusing garbage with a full ring (what a flood of forged datagrams costs).
3. **Overhead**: bytes added per datagram.

Usage::

    python bench/security.py              # ~15 s
    python bench/security.py --quick      # ~4 s
    python bench/security.py --seconds 10 --concurrency 8

Prints figures; never passes or fails. The last line is one JSON object with the
keys ``handshakes_per_cpu_s``, ``handshakes_per_s``, ``seal_open_per_s_512``,
``overhead_bytes``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from mesh.errors import RemoteProtocolError  # noqa: E402
from mesh.gossip.keyring import MAX_KEYS, OVERHEAD_BYTES, Keyring, KeyringCodec  # noqa: E402
from mesh.security import pki  # noqa: E402
from mesh.tls import (  # noqa: E402
    ALPN_GOSSIP,
    PeerInfo,
    SSLStreamT,
    TlsIdentity,
    TlsServer,
    bootstrap_first_node,
    client_context,
    load_ca,
    open_tls_stream,
    server_context,
)
from mesh.types import Addr, NodeId  # noqa: E402


def wall_clock() -> datetime:
    return datetime.now(UTC)


# -- handshakes --------------------------------------------------------------------


async def _noop(stream: SSLStreamT, peer: PeerInfo) -> None:
    return None


async def _serve_child(data_dir: str, conn: Connection) -> None:
    ctx = server_context(TlsIdentity.node(Path(data_dir)))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = TlsServer(ctx, {ALPN_GOSSIP: _noop})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        conn.send(listeners[0].socket.getsockname()[1])
        assert await trio.to_thread.run_sync(conn.recv) == "start"
        cpu0, served0 = time.process_time(), server.statistics().served
        assert await trio.to_thread.run_sync(conn.recv) == "stop"
        stats = server.statistics()
        conn.send(
            {
                "cpu_s": time.process_time() - cpu0,
                "served": stats.served - served0,
                "failures": stats.handshake_failures + stats.refused,
            }
        )
        nursery.cancel_scope.cancel()


def serve_child(data_dir: str, conn: Connection) -> None:
    trio.run(_serve_child, data_dir, conn)


async def _dial(addr: Addr, ctx: ssl.SSLContext, seconds: float, concurrency: int) -> int:
    done = 0
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            stream, _ = await open_tls_stream(addr, ctx, ALPN_GOSSIP)
            await trio.aclose_forcefully(stream)
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return done


def bench_handshakes(seconds: float, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "seed"
        bootstrap_first_node(seed, NodeId("seed"), Addr("127.0.0.1", 7946), "bench", wall_clock)
        ca = load_ca(seed)
        assert ca is not None
        key = pki.generate_key()
        cert = pki.issue_node_certificate(
            ca, pki.create_csr(key, "client"), "client", "127.0.0.1", wall_clock
        )
        client = TlsIdentity.node(Path(tmp) / "client")
        client.save(cert, key, ca.cert)
        ctx = client_context(client)

        mp = multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        proc = mp.Process(target=serve_child, args=(str(seed), child), daemon=True)
        proc.start()
        try:
            addr = Addr("127.0.0.1", parent.recv())
            trio.run(_dial, addr, ctx, min(1.0, seconds / 4), concurrency)  # warm up
            parent.send("start")
            t0 = time.perf_counter()
            done = trio.run(_dial, addr, ctx, seconds, concurrency)
            wall_s = time.perf_counter() - t0
            parent.send("stop")
            child_stats = parent.recv()
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    return {
        "handshakes": done,
        "wall_s": wall_s,
        "handshakes_per_s": done / wall_s,
        "server_cpu_s": child_stats["cpu_s"],
        "server_served": child_stats["served"],
        "server_failures": child_stats["failures"],
        "handshakes_per_cpu_s": child_stats["served"] / child_stats["cpu_s"],
    }


# -- sealing -----------------------------------------------------------------------


def _rate(fn: object, seconds: float) -> float:
    """Calls per second of ``fn()`` over about ``seconds`` (batches of 1000)."""
    assert callable(fn)
    count, t0 = 0, time.perf_counter()
    while True:
        for _ in range(1000):
            fn()
        count += 1000
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return count / elapsed


def bench_sealing(seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    key_a, key_b = os.urandom(32), os.urandom(32)
    codec = KeyringCodec(Keyring([key_a]), "bench", time.time, os.urandom)
    for size in (64, 512, 1400):
        payload = os.urandom(size)
        sealed = codec.seal(payload)
        assert codec.open(sealed) == payload
        out[f"seal_open_per_s_{size}"] = _rate(lambda p=payload: codec.open(codec.seal(p)), seconds)

    # during a rotation: the sender still seals with the key that is now secondary here
    old_sender = KeyringCodec(Keyring([key_a]), "bench", time.time, os.urandom)
    rotated = KeyringCodec(Keyring([key_b, key_a]), "bench", time.time, os.urandom)
    sealed = old_sender.seal(os.urandom(512))
    out["open_with_second_key_per_s_512"] = _rate(lambda: rotated.open(sealed), seconds)

    # forged datagrams against a full ring: every key's tag check fails
    full = Keyring([os.urandom(32) for _ in range(MAX_KEYS)])
    forged = bytes([1]) + os.urandom(12 + 4 + 512 + 16)

    def refuse() -> None:
        try:
            full.open(forged, b"bench", time.time())
        except RemoteProtocolError:
            pass

    out["refuse_forged_full_ring_per_s_512"] = _rate(refuse, seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per handshake run")
    parser.add_argument("--concurrency", type=int, default=4, help="dialling tasks")
    parser.add_argument("--quick", action="store_true", help="short runs")
    args = parser.parse_args()
    hs_s = 1.5 if args.quick else args.seconds
    seal_s = 0.3 if args.quick else 1.0

    print(
        f"python {platform.python_version()}, {ssl.OPENSSL_VERSION}, "
        f"{os.cpu_count()} cpus, {platform.machine()}"
    )
    hs = bench_handshakes(hs_s, args.concurrency)
    print(
        f"TLS 1.3 mutual handshakes (ECDSA P-256, ALPN {ALPN_GOSSIP}, status frame): "
        f"{hs['handshakes_per_s']:.0f}/s wall with {args.concurrency} dialling tasks "
        f"(client and server share {os.cpu_count()} cpus); "
        f"server {hs['server_cpu_s'] * 1000 / max(hs['server_served'], 1):.2f} ms CPU each "
        f"= {hs['handshakes_per_cpu_s']:.0f} handshakes per server CPU-second "
        f"({hs['server_failures']:.0f} failures)"
    )
    seal = bench_sealing(seal_s)
    for size in (64, 512, 1400):
        rate = seal[f"seal_open_per_s_{size}"]
        print(
            f"seal+open {size:>4} B datagrams: {rate:,.0f}/s ({1e6 / rate:.1f} us per round trip)"
        )
    print(
        f"open with the 2nd key of the ring (rotation), 512 B: "
        f"{seal['open_with_second_key_per_s_512']:,.0f}/s"
    )
    print(
        f"refuse a forged 512 B datagram with a full ring ({MAX_KEYS} keys): "
        f"{seal['refuse_forged_full_ring_per_s_512']:,.0f}/s"
    )
    print(
        f"bytes added per datagram: {OVERHEAD_BYTES} (version 1 + nonce 12 + timestamp 4 + tag 16)"
    )
    print(
        json.dumps(
            {
                "handshakes_per_cpu_s": round(hs["handshakes_per_cpu_s"]),
                "handshakes_per_s": round(hs["handshakes_per_s"]),
                "seal_open_per_s_512": round(seal["seal_open_per_s_512"]),
                "overhead_bytes": OVERHEAD_BYTES,
            }
        )
    )


if __name__ == "__main__":
    main()
