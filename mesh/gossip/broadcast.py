"""A retransmit-limited broadcast queue (memberlist's TransmitLimitedQueue).

Each broadcast is a pre-encoded message about one member. A newer broadcast about
the same member replaces the older one (it is stale news). Packets take the
broadcasts sent the fewest times first, newest first among equals, and each
broadcast is dropped after ``retransmit_limit`` transmissions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Item:
    key: str
    data: bytes
    transmits: int
    seq: int


class BroadcastQueue:
    """Pending broadcasts keyed by the member they are about."""

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, data: bytes) -> None:
        """Add a broadcast about ``key``, replacing any older one about it."""
        self._seq += 1
        self._items[key] = _Item(key, data, 0, self._seq)

    def has(self, key: str) -> bool:
        """True if a broadcast about ``key`` is pending."""
        return key in self._items

    def discard(self, key: str) -> None:
        """Drop the pending broadcast about ``key``, if any."""
        self._items.pop(key, None)

    def take(self, budget_bytes: int, overhead_bytes: int, limit: int) -> list[bytes]:
        """Pick broadcasts whose sizes plus ``overhead_bytes`` each fit in
        ``budget_bytes``, count a transmission for each, drop the exhausted.

        Args:
            budget_bytes: room left in the packet.
            overhead_bytes: framing cost per message.
            limit: the retransmit limit for the current cluster size.
        """
        if not self._items or budget_bytes <= 0:
            return []
        order = sorted(self._items.values(), key=lambda it: (it.transmits, -it.seq))
        chosen: list[bytes] = []
        for item in order:
            cost = len(item.data) + overhead_bytes
            if cost > budget_bytes:
                continue
            budget_bytes -= cost
            chosen.append(item.data)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
        return chosen
