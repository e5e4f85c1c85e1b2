"""``python -m chaos.netem``: delay, reorder and duplicate the packets of one NFQUEUE.

Run inside a node's network namespace (``ip netns exec``) while an iptables rule
sends that node's outgoing cluster packets to ``--queue``. Each packet is held
``delay_ms`` plus a uniform draw from ``[0, jitter_ms]`` and then accepted, so
jitter larger than the gap between packets reorders them. With probability
``--duplicate`` a copy is also sent at once through a raw socket, marked with
``--mark`` so that the queue rule lets it pass (and with its TCP/UDP checksum
recomputed, see :func:`chaos.nfq.with_l4_checksum`).

It prints ``ready`` once the queue is bound. On SIGTERM or SIGINT it accepts
every packet it still holds, prints ``held=N duplicated=M`` and exits. If it dies, the rule's
``--queue-bypass`` lets packets through unharmed.
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

from chaos import nfq

RCVBUF_BYTES = 8 << 20
"""Netlink receive buffer: a burst of queued packets must not overflow it."""


class _Stop(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _expect_ack(sock: socket.socket) -> None:
    nfq.parse(sock.recv(65_536))  # raises NetlinkError on a refusal


def run(queue: int, delay_s: float, jitter_s: float, duplicate: float, mark: int,
        rng: random.Random) -> None:
    """Serve the queue until SIGTERM/SIGINT."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nfq.NETLINK_NETFILTER)
    nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    nl.bind((0, 0))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    nl.send(nfq.bind_queue(queue))
    _expect_ack(nl)
    nl.send(nfq.copy_packets(queue))
    _expect_ack(nl)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print("ready", flush=True)
    held: list[tuple[float, int, int]] = []  # (release at, arrival order, packet id)
    order = duplicated = 0
    try:
        while True:
            timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
            readable, _, _ = select.select([nl], [], [], timeout)
            if readable:
                try:
                    data = nl.recv(1 << 17)
                except OSError:  # ENOBUFS: the kernel dropped messages; carry on
                    data = b""
                for pkt in nfq.parse(data):
                    order += 1
                    due = time.monotonic() + delay_s + rng.uniform(0.0, jitter_s)
                    heapq.heappush(held, (due, order, pkt.packet_id))
                    if duplicate and len(pkt.payload) >= 20 and rng.random() < duplicate:
                        dst = socket.inet_ntoa(pkt.payload[16:20])
                        try:
                            raw.sendto(nfq.with_l4_checksum(pkt.payload), (dst, 0))
                            duplicated += 1
                        except OSError:
                            pass  # a lost duplicate is still a faithful network
            now = time.monotonic()
            while held and held[0][0] <= now:
                _, _, packet_id = heapq.heappop(held)
                nl.send(nfq.verdict(queue, packet_id))
    except _Stop:
        for _, _, packet_id in held:
            nl.send(nfq.verdict(queue, packet_id))
        print(f"held={order} duplicated={duplicated}", flush=True)
    finally:
        nl.close()
        raw.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point."""
    p = argparse.ArgumentParser(prog="python -m chaos.netem", description=__doc__)
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--duplicate", type=float, default=0.0, help="probability 0..1")
    p.add_argument("--mark", type=lambda s: int(s, 0), required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        run(args.queue, args.delay_ms / 1000, args.jitter_ms / 1000, args.duplicate,
            args.mark, random.Random(args.seed))
    except OSError as exc:
        print(f"chaos.netem: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
