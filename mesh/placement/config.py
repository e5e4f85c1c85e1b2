"""Placement configuration: one frozen record with documented defaults.

Every node must use the same values (and the same ``hash_key``), or two leaders
would compute different plans from the same state; the leader's config is the one
that counts, since only the leader places. Placement has no network to tune, so
there are no ``lan()``/``wan()`` variants: :meth:`PlacementConfig.default` is for
clusters, :meth:`PlacementConfig.local` for tests and one-machine clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from mesh.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """Tunables of the scheduler.

    Raises:
        ConfigError: a value is out of range (see each field).
    """

    load_bound_eps: float = 0.25
    """Bounded-load slack eps (default 0.25). With ``avg`` the desired replicas of
    replicated spread services per schedulable node, no new spread placement makes a
    node hold more than ``cap = max(ceil(avg), floor((1 + eps) * avg))`` of them: at
    most Mirrokni, Thorup and Zadimoghaddam's ``ceil((1 + eps) * avg)``
    ("Consistent Hashing with Bounded Loads", 2018), and at most ``(1 + eps) * avg``
    whenever that is at least the average rounded up. Only when every feasible node
    is at the cap does a replica go above it. Range 0-10."""

    vnodes_per_node: int = 100
    """Points per node on the hash ring (default 100). More points even out the arc
    each node owns (relative spread about 1/sqrt(vnodes)) and cost memory and ring
    build time linearly. Range 1-4096."""

    walk_steps: int = 64
    """Ring points a slot examines before its walk continues over one point per node
    (default 64). Bounds the cost of slots whose near successors are all full; does
    not change which nodes are feasible, only the order past the first 64 points.
    Range 1-100000."""

    hash_key: bytes = b"meshd/placement/v1"
    """Key of every blake2b hash (1-64 bytes). Changing it reshuffles every
    preference order, so it is fixed for the life of a cluster."""

    explain_max_nodes: int = 5
    """How many skipped nodes an explanation of a placed replica names before it
    says "and N more" (default 5). Range 0-1000."""

    def __post_init__(self) -> None:
        if not 0 <= self.load_bound_eps <= 10:
            raise ConfigError(f"load_bound_eps must be 0-10, got {self.load_bound_eps}")
        if not 1 <= self.vnodes_per_node <= 4096:
            raise ConfigError(f"vnodes_per_node must be 1-4096, got {self.vnodes_per_node}")
        if not 1 <= self.walk_steps <= 100_000:
            raise ConfigError(f"walk_steps must be 1-100000, got {self.walk_steps}")
        if not 1 <= len(self.hash_key) <= 64:
            raise ConfigError(f"hash_key must be 1-64 bytes, got {len(self.hash_key)}")
        if not 0 <= self.explain_max_nodes <= 1000:
            raise ConfigError(f"explain_max_nodes must be 0-1000, got {self.explain_max_nodes}")

    @property
    def eps(self) -> Fraction:
        """``load_bound_eps`` as an exact fraction, so caps agree on every machine."""
        return Fraction(self.load_bound_eps).limit_denominator(1_000_000)

    @classmethod
    def default(cls) -> PlacementConfig:
        """The defaults: eps 0.25, 100 vnodes per node, 64 walk steps."""
        return cls()

    @classmethod
    def local(cls) -> PlacementConfig:
        """For tests and tiny clusters: 16 vnodes per node (cheap rings), 16 walk steps."""
        return cls(vnodes_per_node=16, walk_steps=16)
