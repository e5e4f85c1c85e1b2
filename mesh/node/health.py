"""Health of a running workload, and when to restart one that stopped.

Theory of operation
===================

Two small state machines, one per allocation, both pure: time arrives as a float
argument (``trio.current_time()`` in the agent, a virtual clock in tests),
randomness as an injected :class:`random.Random`. Neither does I/O; the agent runs
the probes (:mod:`mesh.node.probes`) and the restarts, and feeds the results in.

Health checks (:class:`HealthTracker`)
--------------------------------------

The semantics are Docker's ``HEALTHCHECK`` (``--interval``, ``--timeout``,
``--retries``, ``--start-period``; ``daemon/health.go``), which Swarm and Compose
inherit, so a ``healthcheck:`` section imported from a Compose file means what its
author expects:

* a workload starts :attr:`Health.STARTING`;
* ``retries`` consecutive failures make it :attr:`Health.UNHEALTHY`, from any state;
* a single success makes it :attr:`Health.HEALTHY`, from any state (Kubernetes'
  ``successThreshold`` is 1 for liveness too);
* during ``start_period_s`` a failure is not counted, as long as the workload is
  still starting: a success ends the start period at once, and from then on every
  failure counts. Whether a probe falls in the start period is decided by the time
  it *started* (Docker compares ``result.Start`` with ``StartedAt``).

Two deliberate differences from Docker, both to heal in seconds: the first probe
runs at once when the workload starts (Docker waits one ``interval``), and probes
run every ``interval_s`` measured from the start of the previous probe (Docker
measures from its end, so a probe that times out stretches the cadence by
``timeout_s``). Probes never overlap: while one is in flight
:meth:`HealthTracker.next_probe_at` is infinite, and a probe slower than the
interval is followed by the next one as soon as its result arrives.

``readiness_only`` splits Kubernetes' two probe kinds out of one check: a
readiness check that fails only takes the endpoint out of DNS (:attr:`ready` is
false); a liveness check (the default) that fails also asks for a restart
(:attr:`HealthTracker.wants_restart`).

Restarts (:class:`RestartBackoff`)
----------------------------------

The policy names are Swarm's and Compose's (``restart_policy.condition``:
``any``/``always``, ``on-failure``, ``none``/``never``): ``never`` restarts
nothing, ``on-failure`` restarts a non-zero or unknown (``None``: killed by a
signal, lost) exit status and a liveness failure, ``always`` restarts every exit.
``max_attempts`` bounds the restarts in a row, after which the allocation gives up
with a reason a person can act on.

Restarts in a row back off exponentially, as Kubernetes' ``CrashLoopBackOff``
does: ``delay_s * 2**n``, capped at ``max_delay_s``, and the count resets once the
workload has run for ``window_s``. Kubernetes starts at 10 s, caps at 5 minutes and
resets after 10 minutes of running. meshd starts at 0.5 s, caps at 30 s and resets
after 30 s, because healing in seconds is the point of meshd (issue 6: a replica
back in under 5 s): a workload that died once, because a dependency was not up yet
or an OOM kill hit it, should be back before a client notices, not 10 s later. The
backoff still protects the node: a workload that crashes at once is started 6 times
in its first 30 s and then once every 30 s, a negligible load. And a workload that
ran for 30 s was really up: its next crash is a new incident, to be healed as fast
as the first.

Each backoff run (the restarts between two resets) draws one jitter factor from
``[1, 1 + JITTER_FRACTION)`` and stretches all of its delays by it. Replicas that
crash together (a shared dependency went away) are therefore restarted apart rather
than in lockstep, while the delays of one allocation never get shorter from one
restart to the next, as they could with a fresh draw per restart once the cap is
reached.
"""

from __future__ import annotations

import enum
import math
import random
from typing import TYPE_CHECKING, Final

from mesh.errors import LocalProtocolError

if TYPE_CHECKING:
    from mesh.node.spec import HealthSpec, RestartSpec

JITTER_FRACTION: Final = 0.2
"""Restart delays are stretched by a factor drawn from ``[1, 1.2)``: enough to
spread replicas that crashed together, little enough to keep the delays readable."""

_MAX_DOUBLINGS: Final = 1000
"""``2.0**n`` overflows past 1023; any delay is capped long before this many doublings."""


class Health(enum.Enum):
    """What the health check says about a running workload."""

    STARTING = "starting"
    """No success yet, and not yet ``retries`` counted failures."""
    HEALTHY = "healthy"
    """The last probe, or a recent one, succeeded: DNS serves the endpoint."""
    UNHEALTHY = "unhealthy"
    """``retries`` probes in a row failed (outside the start period)."""


START_INTERVAL_S: Final = 0.25
"""Until its first success, a workload is probed this often (or every
``interval_s`` if shorter): a replica enters DNS a quarter second after it can
serve, not one interval later (Docker's ``start_interval``). Failures still count
towards ``retries`` at most once per ``interval_s``, so a slow starter is not
declared unhealthy sooner than with the plain interval."""


class HealthTracker:
    """The health-check state of one running workload (one start of an allocation).

    The agent asks :meth:`next_probe_at`, calls :meth:`probe_started` when it
    launches a probe and :meth:`record` with its result. A restarted workload gets a
    new tracker. A workload without a health check has no tracker at all: it is
    ready as soon as it runs.

    Args:
        spec: the service's health check.
        started_at: when the workload started; the first probe is due then.
    """

    def __init__(self, spec: HealthSpec, started_at: float) -> None:
        self._spec = spec
        self._started_at = started_at
        self._health = Health.STARTING
        self._next_probe_at = started_at
        self._probe_started_at: float | None = None
        self._failures = 0
        self._checks = 0
        self._last_detail = ""
        self._last_counted: float | None = None
        """When the last failure that counted towards ``retries`` was probed."""

    def next_probe_at(self) -> float:
        """When the agent should launch the next probe.

        Returns:
            A time on the caller's clock, possibly in the past (the probe is due);
            ``math.inf`` while a probe is in flight.
        """
        if self._probe_started_at is not None:
            return math.inf
        return self._next_probe_at

    def probe_started(self, now: float) -> None:
        """Note that the agent launched a probe at ``now``.

        Raises:
            LocalProtocolError: a probe is already in flight (probes never overlap).
        """
        if self._probe_started_at is not None:
            raise LocalProtocolError(
                f"probe_started({now}) while the probe started at "
                f"{self._probe_started_at} has no result yet; call record() first"
            )
        self._probe_started_at = now

    def record(self, ok: bool, now: float, detail: str = "") -> Health | None:
        """Feed in the result of the probe in flight.

        Args:
            ok: whether the probe succeeded.
            now: when the result arrived.
            detail: what the probe saw (``"GET / -> 503"``), kept for people.

        Returns:
            The new health if this result changed it, else ``None``.

        Raises:
            LocalProtocolError: no probe is in flight, or ``now`` is before the
                probe started.
        """
        started = self._probe_started_at
        if started is None:
            raise LocalProtocolError("record() without a probe in flight; call probe_started()")
        if now < started:
            raise LocalProtocolError(f"record() at {now}, before its probe started at {started}")
        self._probe_started_at = None
        self._checks += 1
        self._last_detail = detail
        before = self._health
        interval = self._spec.interval_s
        if before is Health.STARTING and not ok:
            interval = min(interval, START_INTERVAL_S)
        self._next_probe_at = max(now, started + interval)
        if ok:
            self._failures = 0
            self._health = Health.HEALTHY
        elif before is Health.STARTING and started < self._started_at + self._spec.start_period_s:
            pass  # Docker: a failure in the start period does not count towards retries
        elif before is Health.STARTING and self._last_counted is not None \
                and started < self._last_counted + self._spec.interval_s:
            pass  # a fast start probe: only one failure per interval counts
        else:
            self._failures += 1
            self._last_counted = started
            if self._failures >= self._spec.retries:
                self._health = Health.UNHEALTHY
        return self._health if self._health is not before else None

    @property
    def health(self) -> Health:
        """The current health."""
        return self._health

    @property
    def ready(self) -> bool:
        """Whether DNS should serve the endpoint: the workload is healthy."""
        return self._health is Health.HEALTHY

    @property
    def wants_restart(self) -> bool:
        """Whether a liveness failure asks for a restart: unhealthy, and the check
        is not ``readiness_only``."""
        return self._health is Health.UNHEALTHY and not self._spec.readiness_only

    @property
    def last_detail(self) -> str:
        """What the last probe saw (empty before the first result)."""
        return self._last_detail

    @property
    def failures(self) -> int:
        """Counted failures in a row (those in the start period are not counted)."""
        return self._failures

    @property
    def checks(self) -> int:
        """Probe results recorded so far."""
        return self._checks


def _describe_exit(exit_code: int | None, unhealthy: bool) -> str:
    if unhealthy:
        return "failed its liveness check"
    if exit_code is None:
        return "stopped without an exit status"
    return f"exited with status {exit_code}"


class RestartBackoff:
    """Decides whether and when one allocation restarts after its workload stopped.

    The agent calls :meth:`record_exit` each time the workload exits or is killed
    for failing its liveness check, and restarts it at the time returned.

    Args:
        spec: the service's restart policy.
        rng: the source of the jitter; seed it per allocation for reproducible runs.
    """

    def __init__(self, spec: RestartSpec, rng: random.Random) -> None:
        self._spec = spec
        self._rng = rng
        self._attempts = 0
        self._jitter = 1.0
        self._gave_up = False
        self._reason = ""

    def should_restart(self, exit_code: int | None, *, unhealthy: bool) -> bool:
        """Whether the policy restarts an exit like this one (ignoring
        ``max_attempts``, which :meth:`record_exit` applies).

        Args:
            exit_code: the exit status; ``None`` when unknown (killed, lost).
            unhealthy: the workload was stopped for failing its liveness check.
        """
        match self._spec.policy:
            case "never":
                return False
            case "on-failure":
                return unhealthy or exit_code != 0
            case _:  # "always"; RestartSpec admits no other policy
                return True

    def record_exit(
        self, now: float, ran_s: float, exit_code: int | None, *, unhealthy: bool = False
    ) -> float | None:
        """Record that the workload stopped, and decide when it starts again.

        Args:
            now: when it stopped.
            ran_s: how long it had been running; ``window_s`` or more ends the
                current backoff run (the next delay is ``delay_s`` again).
            exit_code: its exit status; ``None`` when unknown (killed, lost).
            unhealthy: it was stopped for failing its liveness check.

        Returns:
            When to start it again, or ``None`` when it must stay stopped (the policy
            says so, or ``max_attempts`` restarts in a row were used up: then
            :attr:`gave_up` is true). :attr:`reason` says which, in words.

        Raises:
            LocalProtocolError: called again after giving up.
        """
        if self._gave_up:
            raise LocalProtocolError(f"record_exit() after giving up: {self._reason}")
        spec = self._spec
        if ran_s >= spec.window_s:
            self._attempts = 0
        what = _describe_exit(exit_code, unhealthy)
        if not self.should_restart(exit_code, unhealthy=unhealthy):
            self._reason = f"{what}; not restarting (restart.policy={spec.policy})"
            return None
        if 0 < spec.max_attempts <= self._attempts:
            self._gave_up = True
            self._reason = (
                f"{what} ({self._attempts + 1} exits in a row, each after less than "
                f"restart.window_s={spec.window_s:g}s); not restarting "
                f"(restart.max_attempts={spec.max_attempts}); fix the workload, "
                "then apply its service again"
            )
            return None
        if self._attempts == 0:
            self._jitter = 1.0 + self._rng.random() * JITTER_FRACTION
        base_s = min(spec.delay_s * 2.0 ** min(self._attempts, _MAX_DOUBLINGS), spec.max_delay_s)
        delay_s: float = base_s * self._jitter
        self._attempts += 1
        self._reason = f"{what}; restarting in {delay_s:.2f}s (restart {self._attempts} in a row)"
        return now + delay_s

    @property
    def attempts(self) -> int:
        """Restarts in the current backoff run (0 after a reset)."""
        return self._attempts

    @property
    def gave_up(self) -> bool:
        """Whether ``max_attempts`` restarts in a row were used up: no more restarts."""
        return self._gave_up

    @property
    def reason(self) -> str:
        """The last decision in words (empty before the first exit), e.g.
        ``exited with status 1; restarting in 1.08s (restart 2 in a row)``."""
        return self._reason
