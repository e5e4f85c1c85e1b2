"""Keyed blake2b hashing and the hash ring.

Every number that decides a placement comes from ``hashlib.blake2b`` keyed with
``PlacementConfig.hash_key`` over UTF-8 bytes, with a distinct ``person`` string per
use, so positions are identical across processes, machines and ``PYTHONHASHSEED``
values (Python's ``hash()`` is salted per process and is never used).

Positions live in a 64-bit space. A *point* on the ring packs a 44-bit position
above a 20-bit node index, ``(position << 20) | node``, so the ring is one sorted
list of ints (cheap to sort, to bisect and to walk). A slot's position has zero low
bits, so ``bisect_left`` finds the first point at or after it whatever the node
indices are. Points whose 44-bit positions collide are ordered by node id (never by
index, which depends on input order); see :func:`build_ring`.

One blake2b call with a 64-byte digest yields eight 64-bit words, so slot positions
and virtual-node positions are made eight at a time.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Final

NODE_BITS: Final = 20
"""Low bits of a ring point that hold the node index."""
NODE_MASK: Final = (1 << NODE_BITS) - 1
MAX_NODE_INDEX: Final = NODE_MASK
"""Largest node index a ring point can hold (about a million nodes, tombstones included)."""

_POSITION_SHIFT: Final = 64 - 44
_WORDS: Final = struct.Struct("<8Q")
_WORD: Final = struct.Struct("<Q")

_P_SLOT: Final = b"mesh-slot"
_P_VNODE: Final = b"mesh-vnode"
_P_COARSE: Final = b"mesh-coarse"
_P_RANK: Final = b"mesh-rank"
_P_ZONE: Final = b"mesh-zone"


def _prefix(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(4, "little") + raw


def _words(key: bytes, person: bytes, prefix: bytes, block: int) -> tuple[int, ...]:
    digest = hashlib.blake2b(
        prefix + block.to_bytes(8, "little"), digest_size=64, key=key, person=person
    ).digest()
    return _WORDS.unpack(digest)


def slot_positions(key: bytes, service: str, count: int) -> list[int]:
    """Ring positions of slots ``0..count-1`` of ``service`` (low node bits zero)."""
    prefix = _prefix(service)
    out: list[int] = []
    shift = _POSITION_SHIFT
    for block in range((count + 7) // 8):
        out.extend((w >> shift) << NODE_BITS for w in _words(key, _P_SLOT, prefix, block))
    del out[count:]
    return out


def slot_position(key: bytes, service: str, index: int) -> int:
    """Ring position of one slot; equals ``slot_positions(...)[index]``."""
    word = _words(key, _P_SLOT, _prefix(service), index // 8)[index % 8]
    return (word >> _POSITION_SHIFT) << NODE_BITS


def vnode_points(key: bytes, node: str, index: int, count: int) -> list[int]:
    """The ``count`` ring points of a node whose internal index is ``index``."""
    assert 0 <= index <= MAX_NODE_INDEX
    prefix = _prefix(node)
    out: list[int] = []
    shift = _POSITION_SHIFT
    for block in range((count + 7) // 8):
        out.extend(((w >> shift) << NODE_BITS) | index for w in _words(key, _P_VNODE, prefix, block))
    del out[count:]
    return out


def coarse_point(key: bytes, node: str, index: int) -> int:
    """The node's single point on the coarse ring (one point per node)."""
    word = _word(key, _P_COARSE, node)
    return ((word >> _POSITION_SHIFT) << NODE_BITS) | index


def node_rank(key: bytes, node: str) -> int:
    """The node's 64-bit rank in the cluster-wide binpack order (lower fills first)."""
    return _word(key, _P_RANK, node)


def zone_rank(key: bytes, service: str, zone: str) -> int:
    """Order in which a service's spread groups receive the remainder of an uneven split."""
    return _word(key, _P_ZONE, service + "\x00" + zone)


def _word(key: bytes, person: bytes, text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key, person=person).digest()
    value: int = _WORD.unpack(digest)[0]
    return value


def position_of(point: int) -> int:
    """The 44-bit position of a ring point."""
    return point >> NODE_BITS


def build_ring(points: list[int], node_id: Callable[[int], str]) -> list[int]:
    """Sort ring points; points at the same position are ordered by node id.

    Args:
        points: packed points (see module docstring); consumed.
        node_id: maps a node index to its id, for the (rare) collisions.
    """
    points.sort()
    positions = [p >> NODE_BITS for p in points]
    if len(set(positions)) != len(positions):
        start = 0
        while start < len(points):
            end = start + 1
            while end < len(points) and positions[end] == positions[start]:
                end += 1
            if end - start > 1:
                points[start:end] = sorted(points[start:end], key=lambda p: node_id(p & NODE_MASK))
            start = end
    return points


def insert_points(ring: list[int], new: Sequence[int], node_id: Callable[[int], str]) -> None:
    """Insert points into a sorted ring in place, keeping the collision order."""
    for point in new:
        position = point >> NODE_BITS
        x = bisect.bisect_left(ring, position << NODE_BITS)
        name = node_id(point & NODE_MASK)
        while (
            x < len(ring)
            and ring[x] >> NODE_BITS == position
            and node_id(ring[x] & NODE_MASK) < name
        ):
            x += 1
        ring.insert(x, point)


def ring_index(ring: Sequence[int]) -> tuple[int, list[int]]:
    """A bucket table that narrows a bisect on ``ring`` to a few neighbouring points.

    Returns:
        ``(shift, table)``: the points whose top bits ``point >> shift`` equal ``b``
        are ``ring[table[b]:table[b + 1]]``, so ``bisect_left(ring, p, table[b],
        table[b + 1])`` with ``b = p >> shift`` finds the same index as a bisect of
        the whole ring while touching only nearby memory. About 8 points per bucket.
    """
    bits = max(1, min(20, len(ring).bit_length() - 3))
    shift = 64 - bits
    counts = [0] * ((1 << bits) + 1)
    for point in ring:
        counts[(point >> shift) + 1] += 1
    return shift, list(accumulate(counts))
