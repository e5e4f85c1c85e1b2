"""The join rate limits, sans I/O: the limiter on a virtual clock, and the join
server refusing a flood from one source while other sources still join."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.gossip.keyring import Keyring
from mesh.security import pki
from mesh.security.join import JoinClient, JoinServer
from mesh.security.messages import (
    JoinAccept,
    JoinChallenge,
    JoinReject,
    JoinRequest,
    LinkRefused,
    decode_message,
)
from mesh.security.ratelimit import (
    DEFAULT_JOIN_LIMITS,
    JoinLimiter,
    JoinLimits,
    LimitScope,
    Refusal,
    source_key,
)
from mesh.security.token import JoinToken, new_token
from mesh.types import Addr

SMALL = JoinLimits(
    source_burst=3,
    source_rate_per_s=0.5,
    failure_cost=4,
    global_burst=5,
    global_rate_per_s=2.0,
    max_sources=8,
    log_interval_s=60.0,
    max_log_lines=3,
)
"""Small enough to reach every edge in a few calls."""


def admitted(refusal: Refusal | None) -> bool:
    return refusal is None


# -- source keys ------------------------------------------------------------------------


def test_source_key_ipv4_is_the_address() -> None:
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert source_key("10.1.2.4") != source_key("10.1.2.3")


def test_source_key_ipv6_is_the_slash_64() -> None:
    assert source_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_key("fe80::1%eth0") == "fe80::/64"


def test_source_key_ipv4_mapped_counts_as_ipv4() -> None:
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"


def test_source_key_of_non_ip_text_is_the_text() -> None:
    assert source_key("?") == "?"


# -- buckets ----------------------------------------------------------------------------


def test_burst_then_refusal_with_exact_retry_then_refill() -> None:
    limiter = JoinLimiter(SMALL)
    assert all(admitted(limiter.admit("10.0.0.1", 0.0)) for _ in range(3))
    refusal = limiter.admit("10.0.0.1", 0.0)
    assert refusal is not None
    assert refusal.scope is LimitScope.SOURCE
    assert refusal.source == "10.0.0.1"
    assert refusal.retry_in_s == pytest.approx(2.0)  # one token at 0.5/s
    assert limiter.admit("10.0.0.1", 1.999) is not None
    assert admitted(limiter.admit("10.0.0.1", 2.0))
    assert limiter.admit("10.0.0.1", 2.0) is not None
    # a long pause refills to the burst, not beyond it
    assert all(admitted(limiter.admit("10.0.0.1", 1000.0)) for _ in range(3))
    assert limiter.admit("10.0.0.1", 1000.0) is not None


def test_a_refusal_charges_nothing() -> None:
    """Hammering while refused does not push the advised time further out."""
    limiter = JoinLimiter(SMALL)
    for _ in range(3):
        limiter.admit("10.0.0.1", 0.0)
    for t in (0.0, 0.5, 1.0, 1.5):
        refusal = limiter.admit("10.0.0.1", t)
        assert refusal is not None
        assert refusal.retry_in_s == pytest.approx(2.0 - t)
    assert admitted(limiter.admit("10.0.0.1", 2.0))


def test_sources_are_independent() -> None:
    limiter = JoinLimiter(replace(SMALL, global_burst=100))
    for _ in range(3):
        limiter.admit("10.0.0.1", 0.0)
    assert limiter.admit("10.0.0.1", 0.0) is not None
    assert admitted(limiter.admit("10.0.0.2", 0.0))
    assert admitted(limiter.admit("2001:db8::1", 0.0))
    # but one /64 is one source
    assert admitted(limiter.admit("2001:db8::2", 0.0))
    assert admitted(limiter.admit("2001:db8::3", 0.0))
    assert limiter.admit("2001:db8::4", 0.0) is not None


def test_global_cap_holds_over_many_sources() -> None:
    limiter = JoinLimiter(SMALL)
    results = [limiter.admit(f"10.0.1.{i}", 0.0) for i in range(8)]
    assert [r is None for r in results] == [True] * 5 + [False] * 3
    refusal = results[5]
    assert refusal is not None
    assert refusal.scope is LimitScope.GLOBAL
    assert refusal.retry_in_s == pytest.approx(0.5)  # one token at 2/s
    assert "from all sources" in refusal.reason
    assert admitted(limiter.admit("10.0.1.99", 0.5))
    stats = limiter.statistics()
    assert (stats.attempts, stats.refused_global, stats.refused_source) == (9, 3, 0)
    # a refused source was not charged: it holds its whole burst later
    assert all(admitted(limiter.admit("10.0.1.7", 100.0)) for _ in range(3))


def test_authenticated_callers_skip_the_global_cap_not_their_own() -> None:
    """A renewal (the caller showed a cluster certificate) is not starved by a flood
    of anonymous attempts, but one source still cannot exceed its own rate."""
    limiter = JoinLimiter(SMALL)
    for i in range(5):
        limiter.admit(f"10.0.1.{i}", 0.0)
    assert limiter.admit("10.0.2.1", 0.0) is not None
    assert admitted(limiter.admit("10.0.2.1", 0.0, authenticated=True))
    for _ in range(2):
        limiter.admit("10.0.2.2", 0.0, authenticated=True)
    assert admitted(limiter.admit("10.0.2.2", 0.0, authenticated=True))
    refusal = limiter.admit("10.0.2.2", 0.0, authenticated=True)
    assert refusal is not None
    assert refusal.scope is LimitScope.SOURCE


def test_failed_attempts_cost_more() -> None:
    limiter = JoinLimiter(SMALL)  # burst 3, 0.5/s, a failure costs 4 in all
    assert admitted(limiter.admit("10.0.0.1", 0.0))
    limiter.record_failure("10.0.0.1", 0.0)
    refusal = limiter.admit("10.0.0.1", 0.0)  # 3 - 4 = -1 tokens: in debt
    assert refusal is not None
    assert refusal.retry_in_s == pytest.approx(4.0)  # from -1 to 1 at 0.5/s
    assert admitted(limiter.admit("10.0.0.1", 4.0))
    limiter.record_failure("10.0.0.1", 4.0)
    assert limiter.admit("10.0.0.1", 4.0 + 7.99) is not None
    assert admitted(limiter.admit("10.0.0.1", 4.0 + 8.0))  # one guess per 8 s
    # the same number of successful attempts would all have gone through
    honest = JoinLimiter(SMALL)
    assert all(admitted(honest.admit("10.0.0.1", t)) for t in (0.0, 0.0, 4.0))
    assert limiter.statistics().failures == 2


def test_at_most_max_sources_are_tracked_least_recent_first_out() -> None:
    limiter = JoinLimiter(replace(SMALL, max_sources=3, global_burst=100))
    for i in range(3):
        limiter.admit(f"10.0.0.{i}", 0.0)
    limiter.admit("10.0.0.0", 0.0)  # charged again: now the most recent
    limiter.admit("10.0.0.0", 0.0)  # its bucket is empty
    for i in range(3, 10):
        limiter.admit(f"10.0.0.{i}", 0.0)
    stats = limiter.statistics()
    assert stats.sources == 3
    assert stats.evicted == 7
    # 10.0.0.0 went out after the two older ones; it was forgotten (a fresh bucket)
    assert admitted(limiter.admit("10.0.0.0", 0.0))
    # a spray of sources that are all refused creates no buckets at all
    sprayed = JoinLimiter(replace(SMALL, global_burst=1))
    sprayed.admit("10.0.0.1", 0.0)
    for i in range(1000):
        assert sprayed.admit(f"10.1.{i // 256}.{i % 256}", 0.0) is not None
    assert sprayed.statistics().sources == 1


def test_default_eviction_forgives_nothing() -> None:
    """With the defaults a bucket leaves the table only after it has refilled: at
    least ``max_sources - global_burst`` other charges at the global rate come
    after it, and that outlasts repaying the deepest debt."""
    d = DEFAULT_JOIN_LIMITS
    evicted_after_s = (d.max_sources - d.global_burst) / d.global_rate_per_s
    deepest_debt = d.source_burst + d.failure_cost
    assert evicted_after_s > deepest_debt / d.source_rate_per_s


def test_default_limits_let_a_rack_join_at_once() -> None:
    """50 nodes from 50 addresses in 3 s all get in at the first try; 50 nodes behind
    one address get in within a minute, each retrying after its advised delay."""
    limiter = JoinLimiter()
    assert all(admitted(limiter.admit(f"10.2.0.{i}", i * 0.06)) for i in range(50))

    nat = JoinLimiter()
    next_try = [0.0] * 50
    joined_at: list[float] = []
    while next_try:
        now = min(next_try)
        i = next_try.index(now)
        refusal = nat.admit("192.0.2.1", now)
        if refusal is None:
            joined_at.append(now)
            next_try.pop(i)
        else:
            next_try[i] = now + refusal.retry_in_s
    assert len(joined_at) == 50
    assert joined_at[19] == 0.0
    assert max(joined_at) <= 31.0


def test_default_limits_make_guessing_slow() -> None:
    """Without the token, one address gets two tries and then one per 10 s."""
    limiter = JoinLimiter()
    now, guesses = 0.0, 0
    while now < 3600.0:
        refusal = limiter.admit("198.51.100.7", now)
        if refusal is None:
            guesses += 1
            limiter.record_failure("198.51.100.7", now)
            continue
        now += refusal.retry_in_s
    assert guesses <= 2 + 360 + 1


def test_config_is_validated() -> None:
    for bad in (
        {"source_burst": 0},
        {"global_rate_per_s": 0.0},
        {"source_rate_per_s": math.inf},
        {"failure_cost": 0},
        {"max_sources": 0},
        {"log_interval_s": 0.0},
        {"max_log_lines": 0},
    ):
        with pytest.raises(ConfigError):
            replace(DEFAULT_JOIN_LIMITS, **bad)


# -- log throttling ---------------------------------------------------------------------


def test_refusals_of_one_source_are_logged_once_per_interval() -> None:
    limiter = JoinLimiter(SMALL)
    for _ in range(3):
        limiter.admit("10.0.0.1", 0.0)
    flags = [limiter.admit("10.0.0.1", t * 0.01) for t in range(100)]
    assert [r is not None and r.log for r in flags].count(True) == 1
    later = limiter.admit("10.0.0.1", 0.0)
    assert later is not None
    assert not later.log
    # one interval on, the next line reports how many went unlogged
    for _ in range(3):
        limiter.admit("10.0.0.1", 61.0)
    line = limiter.admit("10.0.0.1", 61.0)
    assert line is not None
    assert line.log
    assert line.unlogged == 100
    assert limiter.statistics().unlogged == 100


def test_log_lines_are_capped_over_all_sources() -> None:
    """A spray of locked-out sources logs ``max_log_lines`` per interval, no more."""
    limiter = JoinLimiter(replace(SMALL, global_burst=100, max_sources=100))
    logged = 0
    for i in range(20):
        source = f"10.0.3.{i}"
        limiter.admit(source, 0.0)
        limiter.record_failure(source, 0.0)
        refusal = limiter.admit(source, 0.0)
        assert refusal is not None
        logged += refusal.log
    assert logged == SMALL.max_log_lines
    assert limiter.statistics().unlogged == 20 - SMALL.max_log_lines


def test_refusal_reason_names_the_source_and_a_whole_second_delay() -> None:
    refusal = Refusal("10.1.2.3", LimitScope.SOURCE, 3.2, True, 0)
    assert refusal.reason == "too many join attempts from 10.1.2.3; retry in 4 s"
    assert Refusal("2001:db8::/64", LimitScope.SOURCE, 0.01, True, 0).reason.endswith(
        "from 2001:db8::/64; retry in 1 s"
    )


# -- the rate, over any window ----------------------------------------------------------

events = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.5, 2.0, 10.0]),  # seconds since the last
        st.integers(0, 7),  # which source
        st.booleans(),  # does its proof fail?
        st.booleans(),  # authenticated?
    ),
    min_size=10,
    max_size=150,
)


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param(replace(SMALL, global_burst=4, global_rate_per_s=0.5), id="global-binds"),
        pytest.param(replace(SMALL, global_burst=1000, global_rate_per_s=100.0), id="source-binds"),
    ],
)
@given(schedule=events)
def test_never_more_than_the_configured_rate_over_any_window(
    limits: JoinLimits, schedule: list[tuple[float, int, bool, bool]]
) -> None:
    """In any window of length w, one source gets at most ``source_burst +
    source_rate_per_s * w`` attempts in, and anonymous sources together at most
    ``global_burst + global_rate_per_s * w``. One set of limits makes the global
    bucket the tighter one, the other the sources' buckets."""
    limiter = JoinLimiter(limits)
    now = 0.0
    per_source: dict[int, list[float]] = {}
    anonymous: list[float] = []
    for gap, source, fails, authenticated in schedule:
        now += gap
        if limiter.admit(f"10.0.0.{source}", now, authenticated=authenticated) is None:
            per_source.setdefault(source, []).append(now)
            if not authenticated:
                anonymous.append(now)
            if fails:
                limiter.record_failure(f"10.0.0.{source}", now)

    def within(times: list[float], burst: int, rate: float) -> bool:
        return all(
            j - i + 1 <= burst + rate * (times[j] - times[i]) + 1e-6
            for i in range(len(times))
            for j in range(i, len(times))
        )

    for times in per_source.values():
        assert within(times, limits.source_burst, limits.source_rate_per_s)
    assert within(anonymous, limits.global_burst, limits.global_rate_per_s)


# -- the join server --------------------------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)
NONCE = b"\x01" * 32
BINDING = b"\x42" * 48


def clock() -> datetime:
    return T0


class Seed:
    """A CA-holding node's join core with small limits, and its TLS certificate."""

    def __init__(self) -> None:
        self.ca = pki.create_ca("prod", clock)
        self.token = new_token(self.ca.fingerprint, os.urandom)
        self.server = JoinServer(
            self.ca, self.token, Keyring([b"\x11" * 32]), clock, limits=SMALL, node="seed"
        )
        cert = pki.issue_node_certificate(
            self.ca, pki.create_csr(pki.generate_key(), "seed"), "seed", "10.0.0.1", clock
        )
        self.tls_der = pki.cert_to_der(cert)

    def attempt(self, source: str, now: float, token: JoinToken, name: str) -> object:
        """One connection from ``source``: the refusal, or the join reply."""
        refusal = self.server.admit(source, now)
        if refusal is not None:
            return decode_message(refusal.to_wire())
        client = JoinClient.for_token(
            token, pki.create_csr(pki.generate_key(), name), Addr(source, 7946), clock
        )
        challenge = self.server.challenge(NONCE)
        request = client.handle_challenge(challenge, self.tls_der, BINDING)
        assert isinstance(request, JoinRequest)
        return self.server.handle_request(
            request, challenge=challenge, tls_binding=BINDING, peer=None, source=source, now=now
        )


def test_server_refuses_a_flood_from_one_source_while_another_joins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed = Seed()
    wrong = JoinToken(seed.ca.fingerprint, b"\x00" * 32)
    caplog.set_level(logging.WARNING, logger="mesh.security.join")
    # 200 connections in 20 s from one address, every proof wrong
    replies = [seed.attempt("10.6.6.6", i * 0.1, wrong, f"x{i}") for i in range(200)]
    # a wrong proof costs 4 tokens of a burst of 3: the source got its proof checked
    # at 0 s, at 4 s (the debt repaid) and then every 8 s (4 tokens at 0.5/s)
    checked = [i * 0.1 for i, r in enumerate(replies) if isinstance(r, JoinReject)]
    assert checked == pytest.approx([0.0, 4.0, 12.0])
    # every other connection was refused before any proof check or signature
    refusals = [r for r in replies if isinstance(r, LinkRefused)]
    assert len(refusals) == 197
    assert all(r.retry_in_s > 0 for r in refusals)
    assert refusals[0].reason == "too many join attempts from 10.6.6.6; retry in 4 s"
    # meanwhile another address joins at once
    good = seed.attempt("10.0.0.2", 10.0, seed.token, "n2")
    assert isinstance(good, JoinAccept)
    stats = seed.server.statistics()
    assert stats.rejected_token == 3
    assert stats.joins_accepted == 1
    assert stats.limiter.attempts == 201
    assert stats.limiter.refused_source == 197
    assert stats.limiter.failures == 3
    # the flood wrote one log line, not 197
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_server_renewal_is_not_starved_by_anonymous_flood() -> None:
    seed = Seed()
    for i in range(SMALL.global_burst):
        seed.server.admit(f"10.7.0.{i}", 0.0)
    refused = seed.server.admit("10.0.0.3", 0.0)
    assert isinstance(refused, LinkRefused)
    assert "from all sources" in refused.reason
    assert seed.server.admit("10.0.0.3", 0.0, authenticated=True) is None
    assert isinstance(seed.server.challenge(NONCE), JoinChallenge)
