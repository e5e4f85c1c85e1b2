"""A network that drops, delays, duplicates, reorders and partitions packets.

Pure and deterministic: every decision comes from the injected ``random.Random``.
Endpoints are opaque hashable names (a node id, an address); a partition is a set
of one-way blocked links, so asymmetric cuts are as easy as symmetric ones.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class LinkFaults:
    """Faults on one directed link (or the default for every link).

    Attributes:
        loss: probability a packet is dropped.
        duplicate: probability a delivered packet is delivered twice.
        delay_s: fixed one-way latency.
        jitter_s: extra uniform random latency in ``[0, jitter_s]``; large jitter
            reorders packets.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    delay_s: float = 0.0005
    jitter_s: float = 0.0005


@dataclass(slots=True)
class FaultyNetwork:
    """Decides when (and whether) each packet arrives.

    Args:
        rng: the only randomness used.
        default: faults of every link without its own entry.
    """

    rng: random.Random
    default: LinkFaults = field(default_factory=LinkFaults)
    _links: dict[tuple[Hashable, Hashable], LinkFaults] = field(default_factory=dict)
    _blocked: set[tuple[Hashable, Hashable]] = field(default_factory=set)
    _isolated: set[Hashable] = field(default_factory=set)
    dropped: int = 0
    delivered: int = 0

    def set_link(self, src: Hashable, dst: Hashable, faults: LinkFaults) -> None:
        """Give the directed link ``src -> dst`` its own faults."""
        self._links[(src, dst)] = faults

    def block(self, src: Hashable, dst: Hashable) -> None:
        """Drop everything from ``src`` to ``dst`` (one way)."""
        self._blocked.add((src, dst))

    def partition(self, *groups: Iterable[Hashable]) -> None:
        """Cut every link between different groups, both ways."""
        sets = [list(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1:]:
                for x in a:
                    for y in b:
                        self._blocked.add((x, y))
                        self._blocked.add((y, x))

    def isolate(self, node: Hashable) -> None:
        """Cut ``node`` off from everyone, both ways."""
        self._isolated.add(node)

    def heal(self) -> None:
        """Remove every partition, block and isolation (link faults stay)."""
        self._blocked.clear()
        self._isolated.clear()

    def connected(self, src: Hashable, dst: Hashable) -> bool:
        """True if packets from ``src`` can reach ``dst`` at all."""
        return (src not in self._isolated and dst not in self._isolated
                and (src, dst) not in self._blocked)

    def latency(self, src: Hashable, dst: Hashable) -> float:
        """One draw of the one-way latency of a link, ignoring loss."""
        f = self._links.get((src, dst), self.default)
        return f.delay_s + (self.rng.uniform(0.0, f.jitter_s) if f.jitter_s else 0.0)

    def route(self, src: Hashable, dst: Hashable) -> list[float]:
        """Delays after which copies of one packet arrive: ``[]`` if it is lost,
        two entries if it is duplicated."""
        if not self.connected(src, dst):
            self.dropped += 1
            return []
        f = self._links.get((src, dst), self.default)
        if f.loss and self.rng.random() < f.loss:
            self.dropped += 1
            return []
        delays = [self.latency(src, dst)]
        if f.duplicate and self.rng.random() < f.duplicate:
            delays.append(self.latency(src, dst))
        self.delivered += len(delays)
        return delays
