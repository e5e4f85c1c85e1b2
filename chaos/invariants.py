"""What must hold while faults run and after they heal, checked on observations.

The runner polls every node (``members``, ``raft status``, DNS, and once workloads
exist ``meshctl ls/ps``) and records what it saw as the frozen observations below,
timestamped on the run's own clock (seconds since the run started). The checkers
here are pure functions of those records, so each one is tested with synthetic
observations, and a report can be re-checked from its JSON.

Invariants:

* **one leader per term**: no two nodes are ever reported leader of the same
  term (Raft's Election Safety, §5.2). Every observer's ``(term, leader)`` counts:
  a follower names the leader it heard from in that term.
* **membership converges**: once faults heal, every live node sees exactly the
  live nodes alive, within a bound.
* **leader agreed**: once healed, every live node names the same leader, which is
  live, and no node reports a Raft storage error (a disk that filled up and was
  freed must be written to again).
* **no crash**: every daemon exit not caused by the harness is a violation.
* **DNS answers only live nodes**: ``<node>.node.mesh`` answers with the node's
  address when it is live and with no address once the asking node saw it dead.
* **KV linearizable, nothing acknowledged lost**: the client history passes
  :func:`mesh.testing.linearizability.check_kv` (final reads after healing make a
  lost acknowledged write a linearizability failure).
* **services converge** (only when the scenario declares services): every
  service runs its desired replicas, healthy, on live nodes; its DNS name answers
  exactly the nodes of its healthy running allocations; no node runs a workload
  that no allocation of its own accounts for.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GONE = frozenset({"dead", "left"})
"""Member statuses that count as "detected not alive"."""


@dataclass(frozen=True, slots=True)
class Violation:
    """An invariant that did not hold.

    Attributes:
        t: when it was seen (run clock, seconds).
        invariant: which one (``one_leader_per_term``, ``no_crash``...).
        message: what was seen, for a person.
    """

    t: float
    invariant: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"t": round(self.t, 3), "invariant": self.invariant, "message": self.message}


@dataclass(frozen=True, slots=True)
class RaftObs:
    """One node's ``raft status`` at time ``t``."""

    t: float
    observer: str
    term: int
    leader: str | None
    voters: tuple[str, ...] = ()
    storage_error: str | None = None
    """Set while the node cannot write its Raft log (a full disk)."""


@dataclass(frozen=True, slots=True)
class MemberObs:
    """One node's ``members`` view at time ``t``: ``{name: status}``."""

    t: float
    observer: str
    statuses: Mapping[str, str]

    def alive(self) -> frozenset[str]:
        """Names it lists alive."""
        return frozenset(n for n, s in self.statuses.items() if s == "alive")


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """A daemon process ended.

    Attributes:
        t: when the harness noticed.
        node: its name.
        status: exit status (negative: killed by that signal).
        by_harness: the harness killed or stopped it on purpose.
        log_tail: the last lines of its log (for the report).
    """

    t: float
    node: str
    status: int
    by_harness: bool
    log_tail: str = ""


@dataclass(slots=True)
class LeaderTracker:
    """Checks "at most one leader per term" as observations arrive."""

    _leaders: dict[int, tuple[str, str, float]] = field(default_factory=dict)
    changes: list[tuple[float, int, str]] = field(default_factory=list)
    """``(t, term, leader)`` each time a new term's leader is first seen (timeline)."""

    def observe(self, obs: RaftObs) -> Violation | None:
        """Record one observation; a violation if it names a second leader for its term."""
        if obs.leader is None:
            return None
        seen = self._leaders.get(obs.term)
        if seen is None:
            self._leaders[obs.term] = (obs.leader, obs.observer, obs.t)
            self.changes.append((obs.t, obs.term, obs.leader))
            return None
        leader, observer, t = seen
        if leader == obs.leader:
            return None
        return Violation(obs.t, "one_leader_per_term",
                         f"term {obs.term}: {obs.observer} names leader {obs.leader} but "
                         f"{observer} named {leader} at t={t:.2f}s")

    def terms(self) -> dict[int, str]:
        """``{term: leader}`` for every term with a known leader."""
        return {term: v[0] for term, v in sorted(self._leaders.items())}


def membership_converged(views: Mapping[str, MemberObs], live: Iterable[str]) -> bool:
    """Every live node has a view, and it lists exactly the live nodes alive."""
    want = frozenset(live)
    return all(n in views and views[n].alive() == want for n in want)


def leader_agreed(views: Mapping[str, RaftObs], live: Iterable[str]) -> str | None:
    """The leader every live node names, if they all name the same live one and none
    of them is failing to write its log."""
    want = frozenset(live)
    if any(n in views and views[n].storage_error for n in want):
        return None
    leaders = {views[n].leader if n in views else None for n in want}
    if len(leaders) != 1:
        return None
    leader = next(iter(leaders))
    return leader if leader in want else None


def first_healed(members: Sequence[MemberObs], rafts: Sequence[RaftObs], since: float,
                 live: Iterable[str]) -> float | None:
    """The first time after ``since`` when membership converged and a leader is agreed.

    Only observations taken at or after ``since`` count (older ones describe the
    cluster before the heal). Returns ``None`` if it never happened.
    """
    live_set = frozenset(live)
    events: list[tuple[float, int, MemberObs | RaftObs]] = (
        [(o.t, 0, o) for o in members if o.t >= since]
        + [(o.t, 1, o) for o in rafts if o.t >= since])
    events.sort(key=lambda e: (e[0], e[1]))
    member_views: dict[str, MemberObs] = {}
    raft_views: dict[str, RaftObs] = {}
    for t, _, obs in events:
        if isinstance(obs, MemberObs):
            member_views[obs.observer] = obs
        else:
            raft_views[obs.observer] = obs
        if membership_converged(member_views, live_set) \
                and leader_agreed(raft_views, live_set) is not None:
            return t
    return None


def time_to_detect(members: Sequence[MemberObs], killed_at: float, victim: str,
                   observers: Iterable[str]) -> float | None:
    """Seconds from ``killed_at`` until every observer listed ``victim`` dead or left
    (the slowest observer's first such view); ``None`` if one never did."""
    latest = 0.0
    for observer in observers:
        seen = [o.t for o in members if o.observer == observer and o.t >= killed_at
                and o.statuses.get(victim) in GONE]
        if not seen:
            return None
        latest = max(latest, min(seen))
    return latest - killed_at


def crash_violations(exits: Iterable[ProcessExit]) -> list[Violation]:
    """A violation for every exit the harness did not cause."""
    return [Violation(e.t, "no_crash", f"{e.node} exited with status {e.status} without "
                      f"being killed by the harness\n{e.log_tail}")
            for e in exits if not e.by_harness]


def dns_node_violations(t: float, server: str, answers: Mapping[str, tuple[str, ...]],
                        expected: Mapping[str, str], gone: Iterable[str]) -> list[Violation]:
    """Check one DNS server's ``<node>.node.mesh`` answers.

    Args:
        t: when the answers were collected.
        server: the node whose DNS server answered.
        answers: ``{node: A-record addresses}`` (empty tuple: no address / NXDOMAIN).
        expected: ``{node: address}`` of the nodes that must answer.
        gone: nodes that must not answer (the server saw them dead).
    """
    out = []
    for node, ip in sorted(expected.items()):
        got = answers.get(node, ())
        if got != (ip,):
            out.append(Violation(t, "dns_live_nodes_only",
                                 f"{server}'s DNS answers {node}.node.mesh with {list(got)}, "
                                 f"expected [{ip}]"))
    for node in sorted(gone):
        got = answers.get(node, ())
        if got:
            out.append(Violation(t, "dns_live_nodes_only",
                                 f"{server}'s DNS still answers {node}.node.mesh with "
                                 f"{list(got)} although {node} is dead"))
    return out


def unreadable_services(t: float, node: str, exc: BaseException) -> Violation:
    """The services could not be read through ``node``'s API socket.

    Names the node asked and the error's type, which is all a timeout
    (``trio.TooSlowError``, empty text) says.
    """
    text = str(exc)
    return Violation(t, "services_converge",
                     f"cannot read services through {node}'s API: {type(exc).__name__}"
                     + (f": {text}" if text else ""))


def service_violations(t: float, services: Sequence[Mapping[str, Any]],
                       allocs: Sequence[Mapping[str, Any]], live: Iterable[str],
                       declared: Iterable[str]) -> list[Violation]:
    """Check ``meshctl ls --json`` and ``meshctl ps --json`` after healing.

    Args:
        t: when they were read.
        services: ``ls`` objects with ``name, desired, running, healthy``.
        allocs: ``ps`` objects with ``id, service, node, state, healthy``.
        live: nodes alive now.
        declared: the scenario's services (each must be listed).
    """
    live_set = frozenset(live)
    out = []
    by_name = {s["name"]: s for s in services}
    for name in sorted(declared):
        svc = by_name.get(name)
        if svc is None:
            out.append(Violation(t, "services_converge", f"service {name} is not listed"))
            continue
        placed = [a for a in allocs if a["service"] == name and a["state"] == "running"
                  and a["healthy"] and a["node"] in live_set]
        if not (svc["running"] == svc["healthy"] == svc["desired"] == len(placed)):
            out.append(Violation(
                t, "services_converge",
                f"service {name}: desired {svc['desired']}, running {svc['running']}, "
                f"healthy {svc['healthy']}, healthy allocations on live nodes {len(placed)}"))
    for a in allocs:
        if a["state"] == "running" and a["node"] not in live_set:
            out.append(Violation(t, "services_converge",
                                 f"allocation {a['id']} of {a['service']} runs on "
                                 f"{a['node']}, which is not live"))
    return out


def service_dns_violations(t: float, server: str, service: str, answered: Iterable[str],
                           allocs: Sequence[Mapping[str, Any]],
                           node_ips: Mapping[str, str]) -> list[Violation]:
    """``<service>.service.mesh`` must answer exactly the addresses of the nodes of
    its healthy running allocations."""
    want = sorted({node_ips[a["node"]] for a in allocs if a["service"] == service
                   and a["state"] == "running" and a["healthy"] and a["node"] in node_ips})
    got = sorted(set(answered))
    if got == want:
        return []
    return [Violation(t, "dns_ready_endpoints_only",
                      f"{server}'s DNS answers {service}.service.mesh with {got}, "
                      f"expected {want}")]


def orphan_violations(t: float, node: str, sessions: int,
                      allocs: Sequence[Mapping[str, Any]]) -> list[Violation]:
    """No workload left running that no allocation owns.

    Args:
        t: when the processes were counted.
        node: the node whose namespace was inspected.
        sessions: process sessions in its namespace other than meshd's own (the
            process driver starts each workload in a session of its own).
        allocs: every allocation (``meshctl ps --json``), any desired state.
    """
    owned = sum(1 for a in allocs if a["node"] == node
                and a["state"] in ("starting", "running"))
    if sessions <= owned:
        return []
    return [Violation(t, "no_orphan_workloads",
                      f"{node} runs {sessions} workload process group(s) but holds "
                      f"{owned} starting or running allocation(s)")]


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    """``count, min, median, p90, max`` (seconds, 3 decimals); ``None`` when empty."""
    vs = sorted(values)
    if not vs:
        return {"count": 0, "min": None, "median": None, "p90": None, "max": None}
    p90 = vs[min(len(vs) - 1, max(0, -(-9 * len(vs) // 10) - 1))]
    return {"count": len(vs), "min": round(vs[0], 3),
            "median": round(statistics.median(vs), 3), "p90": round(p90, 3),
            "max": round(vs[-1], 3)}
