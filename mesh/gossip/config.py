"""Gossip configuration: every knob with its unit, default and formula.

Defaults are chosen so that a crashed node is declared dead by every member in
about two seconds on a LAN of ten nodes, while 10% packet loss on every link still
causes no false deaths (Lifeguard's dynamic suspicion timeout absorbs lost probes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mesh.errors import ConfigError


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Timing and sizing of the SWIM protocol. Build with :meth:`lan`, :meth:`wan` or
    :meth:`local` and adjust with :func:`dataclasses.replace`."""

    probe_interval_s: float = 0.4
    """Seconds between two failure-detection probes by this node (SWIM protocol
    period). Scaled by the local health multiplier (Lifeguard)."""

    probe_timeout_s: float = 0.2
    """Seconds to wait for a direct ack before asking ``indirect_checks`` members to
    probe for us. Must be below ``probe_interval_s``; scaled by local health."""

    indirect_checks: int = 3
    """Members asked to ping an unresponsive target on our behalf (SWIM's k)."""

    suspicion_mult: int = 3
    """Multiplier of the minimum suspicion timeout:
    ``min = suspicion_mult * max(1, log10(N)) * probe_interval_s``. Also sets the
    number of independent confirmations that shrink it: ``suspicion_mult - 2``."""

    suspicion_max_timeout_mult: int = 6
    """``max = suspicion_max_timeout_mult * min``: the timeout a suspicion starts
    with when nobody else confirms it (Lifeguard's dynamic suspicion)."""

    awareness_max_multiplier: int = 8
    """Upper bound of the local health multiplier; timeouts scale by
    ``score + 1`` with ``0 <= score < awareness_max_multiplier``."""

    retransmit_mult: int = 6
    """Each broadcast is piggybacked ``retransmit_mult * ceil(log10(N + 1))`` times.
    memberlist uses 4; at 20% loss a member then misses a refutation with
    probability about ``exp(-0.8 * 8)`` and may falsely declare a death, while 6
    makes that ``exp(-0.8 * 12)``. Broadcasts exist only while something changes,
    so an idle cluster pays nothing for it."""

    gossip_interval_s: float = 0.1
    """Seconds between two gossip rounds that push pending broadcasts."""

    gossip_nodes: int = 3
    """Members (fanout) that each gossip round sends its broadcasts to."""

    gossip_to_the_dead_s: float = 30.0
    """Seconds after its death a member still receives gossip, so a node that was
    only cut off learns of its death and refutes it."""

    push_pull_interval_s: float = 30.0
    """Seconds between two full state syncs over TCP with a random member, for
    clusters up to ``push_pull_scale_threshold`` nodes. Above that the interval
    grows linearly with N so the anti-entropy traffic per node stays flat:
    ``push_pull_interval_s * N / push_pull_scale_threshold``. 0 disables it."""

    push_pull_scale_threshold: int = 10
    """Cluster size above which the push-pull interval scales with N. Linear
    scaling keeps each node's anti-entropy bytes/s constant (the state it sends
    grows with N as fast as the interval does); gossip does the fast work."""

    reconnect_interval_s: float = 10.0
    """Seconds between two attempts to push-pull with a random dead (not left)
    member (Serf's reconnect). This is what merges the two sides of a long
    partition once it heals, after ``gossip_to_the_dead_s`` has passed. 0 disables."""

    dead_reap_s: float = 600.0
    """Seconds a dead or left member stays in the member list before it is
    forgotten (reaped)."""

    dead_node_reclaim_s: float = 10.0
    """Seconds after a member died or left before another process may take its
    name at a different address."""

    leave_propagate_s: float = 0.5
    """Seconds a leaving node keeps gossiping its departure before it exits."""

    stream_timeout_s: float = 5.0
    """Seconds a TCP push-pull exchange may take before it is abandoned."""

    max_packet_bytes: int = 1400
    """Largest UDP payload built (before sealing), to stay below the path MTU."""

    max_meta_bytes: int = 1024
    """Largest encoded member metadata (labels, capacity, role) accepted."""

    max_stream_bytes: int = 4 * 1024 * 1024
    """Largest push-pull state accepted over TCP."""

    def __post_init__(self) -> None:
        if self.probe_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ConfigError("probe_interval_s and probe_timeout_s must be positive")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError(
                f"probe_timeout_s ({self.probe_timeout_s}) must be below "
                f"probe_interval_s ({self.probe_interval_s}): indirect probes need time"
            )
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ConfigError("suspicion_mult and suspicion_max_timeout_mult must be >= 1")
        if self.awareness_max_multiplier < 1:
            raise ConfigError("awareness_max_multiplier must be >= 1")
        if self.indirect_checks < 0 or self.gossip_nodes < 1 or self.retransmit_mult < 1:
            raise ConfigError("indirect_checks >= 0, gossip_nodes >= 1, retransmit_mult >= 1")
        if self.gossip_interval_s <= 0:
            raise ConfigError("gossip_interval_s must be positive")
        if self.reconnect_interval_s < 0:
            raise ConfigError("reconnect_interval_s must be >= 0 (0 disables it)")
        if self.push_pull_interval_s < 0:
            raise ConfigError("push_pull_interval_s must be >= 0 (0 disables it)")
        if self.max_packet_bytes < 512:
            raise ConfigError("max_packet_bytes must be at least 512")
        if self.dead_reap_s < self.gossip_to_the_dead_s:
            raise ConfigError("dead_reap_s must be >= gossip_to_the_dead_s")

    @classmethod
    def lan(cls) -> GossipConfig:
        """Defaults for one data centre: detection in about 2 s at 10 nodes."""
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        """Defaults for links with 10-100 ms RTT and more loss."""
        return cls(
            probe_interval_s=3.0,  # RTTs of 100 ms need room for indirect probes
            probe_timeout_s=1.5,
            suspicion_mult=6,  # distant links flap: be slower to accuse
            retransmit_mult=4,
            gossip_interval_s=0.5,
            gossip_nodes=4,
            gossip_to_the_dead_s=60.0,
            push_pull_interval_s=60.0,
            reconnect_interval_s=30.0,
            dead_node_reclaim_s=30.0,
            stream_timeout_s=30.0,
        )

    @classmethod
    def local(cls) -> GossipConfig:
        """Defaults for loopback or one host: fast, for tests and demos."""
        return cls(
            probe_interval_s=0.2,
            probe_timeout_s=0.1,
            indirect_checks=2,
            suspicion_mult=3,
            retransmit_mult=3,
            gossip_interval_s=0.05,
            gossip_to_the_dead_s=15.0,
            push_pull_interval_s=15.0,
            reconnect_interval_s=3.0,
            dead_reap_s=120.0,
            dead_node_reclaim_s=2.0,
            leave_propagate_s=0.3,
            stream_timeout_s=2.0,
        )

    def with_(self, **changes: object) -> GossipConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def retransmit_limit(self, n_members: int) -> int:
        """Times each broadcast is sent: ``retransmit_mult * ceil(log10(N + 1))``."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n_members + 1)))

    def push_pull_period_s(self, n_members: int) -> float:
        """The push-pull interval for a cluster of ``n_members``."""
        scale = max(1.0, n_members / self.push_pull_scale_threshold)
        return self.push_pull_interval_s * scale
