"""Rate limits on join attempts, sans I/O: per source address, and in total.

Theory of operation
-------------------
Anyone who can reach a CA-holding node's gossip port can open ``mesh-join/1``
links, and each one costs the node a TLS handshake and a challenge; one with a
valid proof also costs a certificate signature and a write of the issued
registry. Guessing the 256-bit token secret is hopeless at any rate. The limits
bound the *work* an anonymous caller can make a node do, and they turn a
guessing loop into a few attempts a minute. They follow the auth-attempt limits of
Consul, Nomad and Vault: token buckets per client, and one for all clients.

Both kinds of bucket are plain token buckets: ``burst`` tokens at most, refilled
continuously at ``rate_per_s``. Time is an argument, so the limiter is
deterministic and tests drive it with a virtual clock.

- One bucket per *source*: the caller's IPv4 address, or the /64 of its IPv6
  address. A single host usually holds a whole /64, and one bucket per /128 would
  give it 2**64 of them (:func:`source_key`).
- One *global* bucket for every anonymous source together, so that many sources
  cannot exceed a total rate either.

An attempt costs one token from its source's bucket and one from the global bucket.
It is admitted only if both hold one. A refusal takes nothing, so a joiner that
waits the advised ``retry_in_s`` gets in. An attempt whose proof turns out wrong
costs its source ``failure_cost`` tokens in all (:meth:`JoinLimiter.record_failure`).
The bucket can go into debt, which shuts the source out for longer. The global
bucket charges one token per attempt whatever the outcome: it bounds work, and a
failed proof costs the node less than a success. A caller that presented a cluster
certificate in the TLS handshake (a renewal) is charged to its source only: a flood
of anonymous attempts cannot starve renewals.

Memory is bounded. At most ``max_sources`` source buckets are kept, and the least
recently charged one is evicted first. A bucket is created only when a source is
*charged*, and the global bucket bounds how often that happens, so the defaults
evict a bucket only long after it has refilled:
``(max_sources - global_burst) / global_rate_per_s`` exceeds
``(source_burst + failure_cost) / source_rate_per_s``. Forgetting it then forgives
nothing, because a full bucket is the same as one never seen.

Refusals are logged at most once per source per ``log_interval_s``, once for the
global bucket per interval, and at most ``max_log_lines`` times per interval in
all. Each logged refusal says how many went unlogged before it, and
:meth:`JoinLimiter.statistics` has the exact counts.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from mesh.errors import ConfigError

IPV6_SOURCE_PREFIX: Final = 64
"""IPv6 callers are charged per /64: the smallest block a site is usually given."""

_EPSILON: Final = 1e-9
"""Tokens of slack when comparing against one token. Refill is float arithmetic,
so a bucket refilled for exactly the advised delay can land a hair below 1."""


@dataclass(frozen=True, slots=True)
class JoinLimits:
    """How many join attempts a node serves. Adjust with :func:`dataclasses.replace`.

    The defaults never slow a real cluster down. A whole rack of 50 nodes joining
    through one seed within a few seconds fits in ``global_burst``, and each node
    joins from its own address. Tests and single-host clusters join every node
    from one address, and ``source_burst`` covers them. A rack behind one NAT
    address gets 20 nodes in at once and the rest at one a second, each retrying
    after the advised delay. A caller without the token gets two attempts from one
    address, then one every 10 s; from many addresses, 10 a second in all.
    """

    source_burst: int = 20
    """Attempts one source may make back to back (tokens in its bucket)."""

    source_rate_per_s: float = 1.0
    """Attempts per second one source may keep making (its bucket's refill rate)."""

    failure_cost: int = 10
    """Tokens an attempt with a wrong proof costs its source in all, its admission
    included. At the defaults a guessing source gets two quick failures and then
    one guess every ``failure_cost / source_rate_per_s`` = 10 s."""

    global_burst: int = 100
    """Anonymous attempts, from all sources together, that may arrive back to back."""

    global_rate_per_s: float = 10.0
    """Anonymous attempts per second, from all sources together, that may keep
    arriving: about 10 handshakes and signatures a second, a small part of a core."""

    max_sources: int = 4096
    """Source buckets kept at most (under 1 MiB for 4096 IPv6 sources); the least
    recently charged one is evicted first."""

    log_interval_s: float = 60.0
    """Seconds between two logged refusals of one source, or of the global bucket."""

    max_log_lines: int = 20
    """Refusals logged per ``log_interval_s``, all sources together."""

    def __post_init__(self) -> None:
        if self.source_burst < 1 or self.global_burst < 1:
            raise ConfigError("join rate limit bursts must be at least 1 attempt")
        if not (self.source_rate_per_s > 0 and self.global_rate_per_s > 0):
            raise ConfigError("join rate limit rates must be above 0 attempts per second")
        if not (math.isfinite(self.source_rate_per_s) and math.isfinite(self.global_rate_per_s)):
            raise ConfigError("join rate limit rates must be finite")
        if self.failure_cost < 1:
            raise ConfigError("a failed join attempt must cost at least 1 token")
        if self.max_sources < 1:
            raise ConfigError("the join rate limiter must track at least 1 source")
        if not self.log_interval_s > 0 or self.max_log_lines < 1:
            raise ConfigError("join rate limit logging needs an interval above 0 and 1 line")


DEFAULT_JOIN_LIMITS: Final = JoinLimits()
"""The limits a join server applies unless told otherwise."""


class LimitScope(enum.Enum):
    """Which bucket refused an attempt."""

    SOURCE = "source"
    GLOBAL = "global"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An attempt was refused; nothing was charged for it.

    Attributes:
        source: the bucket key of the caller (:func:`source_key`).
        scope: whether the caller's own bucket or the global one was empty.
        retry_in_s: seconds after which the same attempt would be admitted, if
            nothing else is charged in between.
        log: whether this refusal should be logged (the rest are only counted).
        unlogged: refusals not logged since the previous logged one.
    """

    source: str
    scope: LimitScope
    retry_in_s: float
    log: bool
    unlogged: int

    @property
    def reason(self) -> str:
        """The refusal as the joining person reads it."""
        wait = f"retry in {max(1, math.ceil(self.retry_in_s))} s"
        if self.scope is LimitScope.SOURCE:
            return f"too many join attempts from {self.source}; {wait}"
        return f"too many join attempts reach this node from all sources together; {wait}"


@dataclass(frozen=True, slots=True)
class JoinLimiterStatistics:
    """Counters of a :class:`JoinLimiter` since it was created.

    Attributes:
        attempts: attempts presented to :meth:`JoinLimiter.admit`.
        refused_source: attempts refused because their source's bucket was empty.
        refused_global: attempts refused because the global bucket was empty.
        failures: attempts charged as failed (wrong proof).
        sources: source buckets held now.
        evicted: source buckets evicted to stay within ``max_sources``.
        unlogged: refusals that were counted but not logged.
    """

    attempts: int
    refused_source: int
    refused_global: int
    failures: int
    sources: int
    evicted: int
    unlogged: int

    @property
    def refused(self) -> int:
        """Attempts refused by either bucket."""
        return self.refused_source + self.refused_global


def source_key(host: str) -> str:
    """The bucket a caller at ``host`` is charged to.

    That is the IPv4 address itself, or the /64 network of an IPv6 address. An
    IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, from a dual-stack listener) counts
    as IPv4, and a zone index (``%eth0``) is ignored. Text that is no IP literal keys
    its own bucket.
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at_s: float
    logged_at_s: float = -math.inf

    def refill(self, now: float, burst: int, rate_per_s: float) -> None:
        if now > self.at_s:
            self.tokens = min(float(burst), self.tokens + (now - self.at_s) * rate_per_s)
            self.at_s = now

    def wait_s(self, rate_per_s: float) -> float:
        """Seconds until the bucket holds one token (after :meth:`refill`)."""
        return max(0.0, (1.0 - self.tokens) / rate_per_s)


class JoinLimiter:
    """Token buckets per source and in total over join attempts. Sans I/O.

    The caller asks :meth:`admit` before it does any work for a connection, and
    tells :meth:`record_failure` when the connection's proof was wrong. ``now`` is
    any monotonic clock in seconds (the adapter passes ``trio.current_time()``) and
    must not run backwards.

    Args:
        limits: the rates, bursts and bounds.
    """

    def __init__(self, limits: JoinLimits = DEFAULT_JOIN_LIMITS) -> None:
        self._limits = limits
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket(float(limits.global_burst), -math.inf)
        self._window_start_s = -math.inf
        self._window_lines = 0
        self._pending_unlogged = 0
        self._attempts = self._refused_source = self._refused_global = 0
        self._failures = self._evicted = self._unlogged = 0

    @property
    def limits(self) -> JoinLimits:
        """The limits applied."""
        return self._limits

    def admit(self, source: str, now: float, *, authenticated: bool = False) -> Refusal | None:
        """Charge one attempt from ``source``, or refuse it without charging.

        Args:
            source: the caller's address (an IP literal, from the socket).
            now: the current time in seconds.
            authenticated: the caller presented a cluster certificate in the TLS
                handshake; it is charged to its source only, not to the global bucket.

        Returns:
            ``None`` if the attempt may go ahead, else the refusal.
        """
        limits = self._limits
        key = source_key(source)
        self._attempts += 1
        own = self._sources.get(key)
        if own is not None:
            own.refill(now, limits.source_burst, limits.source_rate_per_s)
            if own.tokens < 1.0 - _EPSILON:
                self._refused_source += 1
                retry_s = own.wait_s(limits.source_rate_per_s)
                log = self._may_log(own.logged_at_s, now)
                if log:
                    own.logged_at_s = now
                return self._refusal(key, LimitScope.SOURCE, retry_s, log)
        if not authenticated:
            self._global.refill(now, limits.global_burst, limits.global_rate_per_s)
            if self._global.tokens < 1.0 - _EPSILON:
                self._refused_global += 1
                retry_s = self._global.wait_s(limits.global_rate_per_s)
                log = self._may_log(self._global.logged_at_s, now)
                if log:
                    self._global.logged_at_s = now
                return self._refusal(key, LimitScope.GLOBAL, retry_s, log)
            self._global.tokens -= 1.0
        self._charge(key, 1, now)
        return None

    def record_failure(self, source: str, now: float) -> None:
        """Charge an admitted attempt from ``source`` as failed (its proof was wrong):
        the source pays ``failure_cost`` tokens in all, its admission included."""
        self._failures += 1
        self._charge(source_key(source), self._limits.failure_cost - 1, now)

    def statistics(self) -> JoinLimiterStatistics:
        """A snapshot of the counters."""
        return JoinLimiterStatistics(
            attempts=self._attempts,
            refused_source=self._refused_source,
            refused_global=self._refused_global,
            failures=self._failures,
            sources=len(self._sources),
            evicted=self._evicted,
            unlogged=self._unlogged,
        )

    def _charge(self, key: str, cost: int, now: float) -> None:
        limits = self._limits
        bucket = self._sources.get(key)
        if bucket is None:
            if len(self._sources) >= limits.max_sources:
                self._sources.popitem(last=False)
                self._evicted += 1
            bucket = self._sources[key] = _Bucket(float(limits.source_burst), now)
        else:
            self._sources.move_to_end(key)
            bucket.refill(now, limits.source_burst, limits.source_rate_per_s)
        bucket.tokens -= cost

    def _may_log(self, last_logged_s: float, now: float) -> bool:
        limits = self._limits
        if now - last_logged_s < limits.log_interval_s:
            return False
        if now - self._window_start_s >= limits.log_interval_s:
            self._window_start_s, self._window_lines = now, 0
        if self._window_lines >= limits.max_log_lines:
            return False
        self._window_lines += 1
        return True

    def _refusal(self, key: str, scope: LimitScope, retry_s: float, log: bool) -> Refusal:
        if not log:
            self._unlogged += 1
            self._pending_unlogged += 1
            return Refusal(key, scope, retry_s, False, 0)
        unlogged, self._pending_unlogged = self._pending_unlogged, 0
        return Refusal(key, scope, retry_s, True, unlogged)
