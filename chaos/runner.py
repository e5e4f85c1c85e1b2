"""One chaos run: start the cluster, inject the schedule, watch, heal, check, report.

Theory of operation
===================

Three kinds of task share one trio nursery:

* the **observer** polls every responsive node's ``members`` and ``raft status``
  every :data:`POLL_INTERVAL_S`, records them as observations, checks "one leader
  per term" on each, and notices daemon exits (a crash unless the harness caused it);
* the **KV clients** (:mod:`chaos.workload`) run through every fault;
* the **fault loop** runs the schedule in order. For each fault it resolves the
  target (the leader is only known now), injects it, holds it, heals it, and then
  waits up to ``heal_timeout_s`` for membership to converge and a leader to be
  agreed (the time this takes is the fault's *time to heal*; not converging is a
  violation). For faults that take a node away it computes the *time to detect*
  from the observations and checks that the survivors' DNS stopped answering for it.
  Then a new node must be able to join: the harness runs the join exchange itself
  (``mesh-join/1`` with the cluster's token and a fresh key, following redirects)
  through a random live member, whichever node created the cluster or is down.

After the schedule, everything is healed (processes thawed and restarted, rules
flushed, disks freed), the final convergence, DNS and (if declared) service checks
run, the clients stop, every key is read once more, and the whole history goes to
the linearizability checker. Times are on the run clock: seconds since start.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from chaos import invariants as inv
from chaos.nodes import NodeProc, query_a, spawn_helper
from chaos.report import FaultRecord, InvariantResult, build_report
from chaos.scenario import (
    DETECTED_FAULTS,
    NETWORK_FAULTS,
    QUEUE_FAULTS,
    Fault,
    FaultKind,
    Scenario,
    node_names,
)
from chaos.topology import (
    NETEM_MARK,
    NETEM_QUEUE,
    NodeRules,
    Topology,
    fill_disk,
    oneway_rules,
    partition_rules,
)
from chaos.workload import KvWorkload
from mesh import tls
from mesh.errors import MeshError, StartupError
from mesh.node.trust import utc_now
from mesh.security import pki
from mesh.security.join import JoinRateLimited, JoinRedirected
from mesh.security.token import JoinToken
from mesh.testing.linearizability import check_kv
from mesh.types import Addr

LOGGER = logging.getLogger(__name__)

POLL_INTERVAL_S: Final = 0.25
"""Pause between two polls of every node (the resolution of detect/heal times)."""

START_TIMEOUT_S: Final = 40.0
"""How long a node may take to answer its API after being spawned."""

FORM_TIMEOUT_S: Final = 60.0
"""How long the new cluster may take to converge with a full set of voters."""

DNS_GRACE_S: Final = 0.5
"""How long a node's DNS may lag behind its own membership view."""

DNS_ATTEMPTS: Final = 3
"""Queries sent before a DNS server counts as not answering (UDP may be lost)."""

JOIN_HOPS: Final = 4
"""Join addresses one probe attempt tries (the member, then the issuers it names)."""

JOIN_ATTEMPT_TIMEOUT_S: Final = 5.0
"""Bound on one join exchange of a probe."""

MIN_HELD_JOIN_S: Final = 3.0
"""Least time a join probe made while nodes are killed gets (beyond the fault's
hold if it must)."""

KILL_FAULTS: Final = frozenset({FaultKind.KILL, FaultKind.LEADER_KILL, FaultKind.VOTERS_KILL})
"""Faults whose victims are down (not frozen or cut off): a join must still work
through the survivors while they are held."""

NETEM_START_TIMEOUT_S: Final = 10.0
"""How long :mod:`chaos.netem` may take to bind its queue."""

ORPHAN_SETTLE_S: Final = 10.0
"""How long the orphan check waits for workloads being stopped to go."""

FILLER: Final = "chaos-filler"
"""The file that fills a node's data dir for ``disk_full``."""


class HarnessError(MeshError):
    """The harness could not do its job (a node would not start...): not a verdict
    on meshd, so the run ends without one."""


class Interrupted(MeshError):
    """SIGTERM or SIGHUP arrived: clean up and stop."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What ``python -m chaos run`` was asked for."""

    scenario: Scenario
    schedule: tuple[Fault, ...]
    nodes: int
    duration_s: float
    seed: int


class Runner:
    """State of one run; :meth:`run` drives it and returns the report.

    Args:
        opts: the scenario, schedule and sizes.
        topo: the network and directories (created by the caller, who tears it down).
    """

    def __init__(self, opts: RunOptions, topo: Topology) -> None:
        self.opts = opts
        self.topo = topo
        names = node_names(opts.nodes)
        self.nodes = {n: NodeProc(topo, n, opts.scenario.gossip_profile) for n in names}
        self.t0 = 0.0
        self.token: str | None = None
        self.member_obs: list[inv.MemberObs] = []
        self.raft_obs: list[inv.RaftObs] = []
        self.leaders = inv.LeaderTracker()
        self.violations: list[inv.Violation] = []
        self.exits: list[inv.ProcessExit] = []
        self.records: list[FaultRecord] = []
        self.member_counts: list[tuple[float, int]] = []
        self.replica_counts: list[tuple[float, int]] = []
        self._exits_seen: dict[str, int] = {}
        self._orphan_counts = ""
        """Workload process groups per node at the last orphan check (for the report)."""
        self._notes: list[str] = []
        """What the fault being run did, as measured (for its record)."""
        self.checks = {"membership_converges": 0, "dns_live_nodes_only": 0, "no_crash": 0,
                       "services_converge": 0, "dns_ready_endpoints_only": 0,
                       "no_orphan_workloads": 0, "joins_admitted": 0}
        self.rng = random.Random(opts.seed)
        self._join_rng = random.Random(f"joins:{opts.seed}")
        """Picks the member a join probe goes through (apart from ``rng``, so that the
        faults' targets stay what they were before the probes existed)."""
        self.workload = KvWorkload(opts.scenario.workload, list(self.nodes.values()),
                                   random.Random(self.rng.getrandbits(64)), self.now)

    def now(self) -> float:
        """Seconds since the run started."""
        return trio.current_time() - self.t0

    def log(self, event: str, **fields: object) -> None:
        """A progress line on stderr (structured, like meshd's)."""
        LOGGER.info("%s t=%.2f %s", event, self.now(),
                    " ".join(f"{k}={v}" for k, v in fields.items()))

    # --- observing ----------------------------------------------------------------

    async def _poll_node(self, node: NodeProc) -> None:
        with contextlib.suppress(MeshError, OSError, trio.TooSlowError,
                                 trio.BrokenResourceError):
            members = await node.call("members", timeout_s=1.0)
            self.member_obs.append(inv.MemberObs(self.now(), node.name, {
                m["name"]: m["status"] for m in members}))
            st = await node.call("raft_status", timeout_s=1.0)
            obs = inv.RaftObs(self.now(), node.name, int(st["term"]), st.get("leader"),
                              tuple(st.get("voters", ())), st.get("storage_error"))
            self.raft_obs.append(obs)
            violation = self.leaders.observe(obs)
            if violation is not None:
                self._violate(violation)

    def _violate(self, v: inv.Violation) -> None:
        self.violations.append(v)
        LOGGER.error("violation t=%.2f invariant=%s %s", v.t, v.invariant, v.message)

    def _check_exits(self) -> None:
        for node in self.nodes.values():
            status = node.exit_status()
            if status is None or node.proc is None or \
                    self._exits_seen.get(node.name) == node.proc.pid:
                continue
            self._exits_seen[node.name] = node.proc.pid
            self.checks["no_crash"] += 1
            exit_ = inv.ProcessExit(self.now(), node.name, status, node.expected_exit,
                                    "" if node.expected_exit else node.log_tail())
            self.exits.append(exit_)
            for v in inv.crash_violations([exit_]):
                self._violate(v)

    async def observe(self) -> None:
        """The observer task (runs until cancelled)."""
        last_count = -1
        while True:
            self._check_exits()
            async with trio.open_nursery() as nursery:
                for node in self.nodes.values():
                    if node.responsive():
                        nursery.start_soon(self._poll_node, node)
            latest: dict[str, inv.MemberObs] = {}
            for o in self.member_obs[-4 * len(self.nodes):]:
                latest[o.observer] = o
            counts = [len(o.alive()) for n, o in latest.items() if self.nodes[n].responsive()]
            if counts and min(counts) != last_count:
                last_count = min(counts)
                self.member_counts.append((self.now(), last_count))
            if self.opts.scenario.services:
                await self._count_replicas()
            await trio.sleep(POLL_INTERVAL_S)

    async def _count_replicas(self) -> None:
        """Record the declared services' healthy replicas when the count changes
        (from one node's replica, ``stale``: a poll must not wait for a leader)."""
        live = self.live()
        if not live:
            return
        names = {s.name for s in self.opts.scenario.services}
        with contextlib.suppress(MeshError, OSError, trio.TooSlowError,
                                 trio.BrokenResourceError):
            rows = await self.nodes[live[0]].call("service_ls", {"stale": True},
                                                  timeout_s=1.0)
            n = sum(int(r["healthy"]) for r in rows if r["name"] in names)
            if not self.replica_counts or self.replica_counts[-1][1] != n:
                self.replica_counts.append((self.now(), n))

    def members_since(self, t: float) -> list[inv.MemberObs]:
        """Member observations from ``t`` on (a slice: long runs hold many). Each is
        stamped when it is appended, so the list is in time order."""
        return self.member_obs[bisect.bisect_left(self.member_obs, t, key=lambda o: o.t):]

    def rafts_since(self, t: float) -> list[inv.RaftObs]:
        """Raft observations from ``t`` on."""
        return self.raft_obs[bisect.bisect_left(self.raft_obs, t, key=lambda o: o.t):]

    def live(self) -> list[str]:
        """Nodes whose process runs and is not frozen."""
        return [n for n, node in self.nodes.items() if node.responsive()]

    async def current_raft(self) -> dict[str, Any] | None:
        """``raft status`` from the first responsive node that answers with a leader."""
        for node in self.nodes.values():
            if not node.responsive():
                continue
            with contextlib.suppress(MeshError, OSError, trio.TooSlowError,
                                     trio.BrokenResourceError):
                st: dict[str, Any] = await node.call("raft_status", timeout_s=1.0)
                if st.get("leader"):
                    return st
        return None

    async def wait_healed(self, since: float, what: str) -> float | None:
        """Wait until membership converged and a leader is agreed (observations after
        ``since``); returns the seconds it took, or ``None`` (a violation) on timeout."""
        self.checks["membership_converges"] += 1
        deadline = self.now() + self.opts.scenario.heal_timeout_s
        while self.now() < deadline:
            t = inv.first_healed(self.members_since(since), self.rafts_since(since), since,
                                 self.live())
            if t is not None:
                return t - since
            await trio.sleep(POLL_INTERVAL_S)
        self._violate(inv.Violation(
            self.now(), "membership_converges",
            f"{what}: not converged {self.opts.scenario.heal_timeout_s:g}s after healing; "
            f"last views: {self._describe_views()}"))
        return None

    async def check_join(self, name: str, what: str, among: Sequence[str] | None = None,
                         within_s: float | None = None) -> None:
        """A node called ``name`` can join through a random member of ``among``
        (default: the live nodes) within ``within_s`` (default ``heal_timeout_s``),
        a violation otherwise: the join exchange with the cluster's token,
        following redirects to the members that issue."""
        self.checks["joins_admitted"] += 1
        live = list(among if among is not None else self.live())
        if not live or self.token is None:
            return
        via = self.nodes[self._join_rng.choice(live)]
        token = JoinToken.parse(self.token)
        csr = pki.create_csr(pki.generate_key(), name)
        advertise = Addr(via.ip, via.port)  # only for the certificate's addresses
        within_s = self.opts.scenario.heal_timeout_s if within_s is None else within_s
        deadline = self.now() + within_s
        last = "no attempt"
        while self.now() < deadline:
            queue = [Addr(via.ip, via.port)]
            for _ in range(JOIN_HOPS):
                if not queue:
                    break
                addr = queue.pop(0)
                try:
                    with trio.fail_after(JOIN_ATTEMPT_TIMEOUT_S):
                        await tls.request_join(addr, token, csr, advertise,
                                               wall_clock=utc_now)
                except JoinRedirected as redirect:
                    queue += [Addr.parse(a, via.port) for a in redirect.issuers]
                    last = f"{addr} redirected to {', '.join(redirect.issuers) or 'nobody'}"
                except (JoinRateLimited, StartupError, trio.TooSlowError, OSError,
                        ValueError) as exc:
                    last = f"{addr}: {exc or type(exc).__name__}"
                else:
                    self.log("join_admitted", name=name, via=via.name, issuer=str(addr))
                    return
            await trio.sleep(POLL_INTERVAL_S)
        self._violate(inv.Violation(self.now(), "joins_admitted",
                                    f"{what}: no member admitted {name} through {via.name} "
                                    f"within {within_s:g}s; last: {last}"))

    def _describe_views(self) -> str:
        members: dict[str, inv.MemberObs] = {}
        rafts: dict[str, inv.RaftObs] = {}
        for o in self.member_obs:
            members[o.observer] = o
        for r in self.raft_obs:
            rafts[r.observer] = r
        parts = []
        for n in self.live():
            alive = sorted(members[n].alive()) if n in members else "?"
            lead = f"{rafts[n].leader}@{rafts[n].term}" if n in rafts else "?"
            parts.append(f"{n}: alive={alive} leader={lead}")
        return "; ".join(parts)

    # --- DNS ----------------------------------------------------------------------

    async def _dns_answers(self, server: str, names: Sequence[str]
                           ) -> dict[str, tuple[str, ...]] | None:
        """``{name: addresses}`` from one server; ``None`` (a violation) if it is mute."""
        node = self.nodes[server]
        answers: dict[str, tuple[str, ...]] = {}
        for name in names:
            self.checks["dns_live_nodes_only"] += 1
            for _ in range(DNS_ATTEMPTS):
                got = await query_a(node.ip, f"{name}.node.mesh")
                if got is not None:
                    answers[name] = got
                    break
            else:
                self._violate(inv.Violation(self.now(), "dns_live_nodes_only",
                                            f"{server}'s DNS server did not answer "
                                            f"{name}.node.mesh ({DNS_ATTEMPTS} tries, 1s each)"))
                return None
        return answers

    async def check_dns(self, servers: Sequence[str], gone: Sequence[str]) -> None:
        """Ask each server for every node name: live ones must answer with their
        address, ``gone`` ones with nothing. A wrong answer is asked again after
        :data:`DNS_GRACE_S` (the catalogue follows membership events, a moment
        after ``members`` shows them) and only then counts."""
        expected = {n: self.nodes[n].ip for n in self.live() if n not in gone}
        names = sorted(set(expected) | set(gone))
        for server in servers:
            found: list[inv.Violation] = []
            for attempt in range(2):
                if attempt:
                    await trio.sleep(DNS_GRACE_S)
                answers = await self._dns_answers(server, names)
                if answers is None:
                    break
                found = inv.dns_node_violations(self.now(), server, answers, expected, gone)
                if not found:
                    break
            for v in found:
                self._violate(v)

    # --- faults -------------------------------------------------------------------

    async def start_node(self, name: str) -> bool:
        """(Re)start a node and wait for its API; a failure is a violation."""
        self._check_exits()  # before the old process is forgotten
        node = self.nodes[name]
        join = [] if name == "n1" and self.token is None else \
            [self.nodes[n].addr for n in self.nodes if n != name]
        node.spawn(join, self.token)
        try:
            await node.wait_ready(START_TIMEOUT_S)
        except MeshError as exc:
            node.expected_exit = True  # reported here, not again as a crash
            node.kill()
            self._violate(inv.Violation(self.now(), "no_crash", f"restart failed: {exc}"))
            return False
        return True

    async def _resolve(self, fault: Fault) -> list[str]:
        """The nodes a fault hits now; empty if its target does not exist now."""
        live = self.live()
        if fault.kind is FaultKind.PARTITION:
            return list(fault.minority)
        if fault.target == "all":
            return live
        if fault.target in self.nodes:
            return [fault.target] if fault.target in live else []
        st = await self.current_raft()
        if st is None:
            return []
        leader, voters = st["leader"], list(st["voters"])
        if fault.target == "leader":
            return [leader] if leader in live else []
        if fault.target in ("follower", "voters"):
            followers = [v for v in voters if v != leader and v in live]
            return [self.rng.choice(followers)] if followers else []
        watchers = [n for n in live if n not in voters]
        return [self.rng.choice(watchers)] if watchers else []

    async def run_fault(self, index: int, fault: Fault) -> None:
        """Inject, hold, heal and measure one fault."""
        kind = fault.kind
        if kind in NETWORK_FAULTS and self.topo.mode != "netns":
            self.records.append(FaultRecord(index, fault, (), None, None,
                                            "network faults need namespace mode"))
            return
        if kind is FaultKind.DISK_FULL and not self.topo.tmpfs:
            self.records.append(FaultRecord(index, fault, (), None, None,
                                            "data dirs are not tmpfs mounts (mount refused)"))
            return
        targets = await self._resolve(fault)
        if not targets:
            self.records.append(FaultRecord(index, fault, (), None, None,
                                            f"no node matches target {fault.target!r} now"))
            return
        injected = self.now()
        self._notes = []
        self.log("fault_injected", index=index, kind=kind.value, targets=",".join(targets))
        victims = await self._inject(index, fault, targets)
        healed = self.now()
        self.log("fault_healed", index=index, kind=kind.value)
        detect = recover = None
        if kind in DETECTED_FAULTS and victims:
            gone = {v for v, _ in victims}
            observers = [n for n in self.live() if n not in gone]
            first, last = min(t for _, t in victims), max(t for _, t in victims)
            members = self.members_since(first)
            times = [inv.time_to_detect(members, t, v, observers) for v, t in victims]
            detect = None if None in times else max(t for t in times if t is not None)
            done = inv.first_healed([o for o in members if o.t <= healed],
                                    [o for o in self.rafts_since(last) if o.t <= healed],
                                    last, observers)
            recover = None if done is None else done - last
        heal = await self.wait_healed(healed, f"fault #{index} {kind.value}")
        await self.check_join(f"probe-{index}", f"fault #{index} {kind.value}")
        if self.opts.scenario.services:
            took = await self.wait_services(f"fault #{index} {kind.value}")
            self._notes.append("services did not converge" if took is None else
                               f"services converged {took:.2f}s after membership")
        self.records.append(FaultRecord(index, fault, tuple(targets) if kind is not
                                        FaultKind.VOTERS_KILL else tuple(v for v, _ in victims),
                                        injected, healed, "", detect, heal,
                                        "; ".join(self._notes), recover))
        self.log("fault_done", index=index, detect_s=detect, recover_s=recover, heal_s=heal)
        await trio.sleep(fault.gap_s)

    async def _hold_and_check_gone(self, index: int, fault: Fault,
                                   victims: Sequence[tuple[str, float]]) -> None:
        """Hold the fault; once every survivor saw the victims dead, check their DNS."""
        deadline = self.now() + fault.duration_s
        names = {v for v, _ in victims}
        survivors = [n for n in self.live() if n not in names]
        checked = not victims
        while self.now() < deadline:
            if not checked and all(inv.time_to_detect(self.members_since(t), t, v, survivors)
                                   is not None for v, t in victims):
                await self.check_dns(survivors, sorted(names))
                checked = True
                if fault.kind in KILL_FAULTS:
                    # Joins go on while the victims are down (the node that created
                    # the cluster included): the surviving voters issue.
                    await self.check_join(f"probe-{index}-down", f"fault #{index} "
                                          f"{fault.kind.value} (held)", among=survivors,
                                          within_s=max(deadline - self.now(),
                                                       MIN_HELD_JOIN_S))
            await trio.sleep(POLL_INTERVAL_S)

    async def _inject(self, index: int, fault: Fault, targets: list[str]
                      ) -> list[tuple[str, float]]:
        """Do the fault and heal it; returns ``(victim, when)`` for faults that take
        nodes away."""
        kind, p = fault.kind, fault.params
        if kind in (FaultKind.KILL, FaultKind.LEADER_KILL):
            victim = targets[0]
            self.nodes[victim].kill()
            victims = [(victim, self.now())]
            await self._hold_and_check_gone(index, fault, victims)
            await self.start_node(victim)
            return victims
        if kind is FaultKind.VOTERS_KILL:
            first = targets[0]
            self.nodes[first].kill()
            victims = [(first, self.now())]
            await trio.sleep(p["second_after_s"])
            st = await self.current_raft()
            others = [v for v in (st["voters"] if st else []) if v != first
                      and self.nodes[v].responsive()]
            if others:
                second = st["leader"] if st and st["leader"] in others else others[0]
                self.nodes[second].kill()
                victims.append((second, self.now()))
            await self._hold_and_check_gone(index, fault, victims)
            for v, _ in victims:
                await self.start_node(v)
            return victims
        if kind is FaultKind.FREEZE:
            self.nodes[targets[0]].freeze()
            victims = [(targets[0], self.now())]
            await self._hold_and_check_gone(index, fault, victims)
            self.nodes[targets[0]].thaw()
            return victims
        if kind is FaultKind.STARVE:
            node = self.nodes[targets[0]]
            stop_s = p["period_s"] * p["stopped_fraction"]
            end = self.now() + fault.duration_s
            try:
                while self.now() < end and node.running():
                    node.freeze()
                    await trio.sleep(stop_s)
                    node.thaw()
                    await trio.sleep(p["period_s"] - stop_s)
            finally:
                node.thaw()
            return []
        if kind is FaultKind.STALE_REJOIN:
            return await self._stale_rejoin(fault, targets[0])
        if kind is FaultKind.DISK_FULL:
            filler = self.nodes[targets[0]].data_dir / FILLER
            written = await trio.to_thread.run_sync(fill_disk, filler)
            self.log("disk_filled", node=targets[0], bytes=written)
            self._notes.append(f"wrote {written >> 20} MiB until the disk was full")
            since = self.now()
            try:
                await trio.sleep(fault.duration_s)
            finally:
                filler.unlink(missing_ok=True)
            bit = any(o.storage_error for o in self.rafts_since(since)
                      if o.observer == targets[0])
            self._notes.append("the node reported a Raft storage error" if bit else
                               "no storage error reported (nothing needed new space)")
            return []
        rules = self._network_rules(fault, targets)
        helpers = await self._start_netem(fault, targets) if kind in QUEUE_FAULTS else []
        try:
            await trio.to_thread.run_sync(self.topo.set_rules, rules)
            victims = [(targets[0], self.now())] if kind is FaultKind.ISOLATE else []
            await self._hold_and_check_gone(index, fault, victims)
        finally:
            drops = await trio.to_thread.run_sync(self.topo.dropped_packets)
            if kind not in QUEUE_FAULTS:
                self._notes.append(f"{sum(drops.values())} packets dropped")
            await trio.to_thread.run_sync(self.topo.heal_network)
            stats = await trio.to_thread.run_sync(_stop_helpers, helpers)
            self._notes += [f"{n}: {line}" for n, line in zip(targets, stats, strict=False)]
        return victims

    async def _start_netem(self, fault: Fault, targets: Sequence[str]
                           ) -> list[subprocess.Popen[bytes]]:
        """Start :mod:`chaos.netem` in each target's namespace; wait until each has
        bound its queue."""
        p = fault.params
        helpers: list[subprocess.Popen[bytes]] = []
        try:
            for name in targets:
                argv = [sys.executable, "-m", "chaos.netem", "--queue", str(NETEM_QUEUE),
                        "--mark", hex(NETEM_MARK), "--delay-ms", f"{p.get('delay_ms', 0):g}",
                        "--jitter-ms", f"{p.get('jitter_ms', 0):g}",
                        "--duplicate", f"{p.get('probability', 0):g}",
                        "--seed", str(self.rng.getrandbits(32))]
                proc = spawn_helper(self.topo, name, argv)
                helpers.append(proc)
                assert proc.stdout is not None
                with trio.move_on_after(NETEM_START_TIMEOUT_S):
                    line = await trio.to_thread.run_sync(proc.stdout.readline,
                                                         abandon_on_cancel=True)
                    if line.strip() == b"ready":
                        continue
                proc.kill()
                _, err = proc.communicate()
                raise HarnessError(f"chaos.netem did not start in {name}'s namespace: "
                                   f"{err.decode(errors='replace').strip() or 'no answer'}")
        except BaseException:
            _stop_helpers(helpers)
            raise
        return helpers

    def _network_rules(self, fault: Fault, targets: list[str]) -> dict[str, NodeRules]:
        ips = {n: self.nodes[n].ip for n in self.nodes}
        if fault.kind is FaultKind.PARTITION:
            minority = set(fault.minority)
            return partition_rules([sorted(minority), sorted(set(ips) - minority)], ips)
        if fault.kind is FaultKind.ISOLATE:
            return partition_rules([[targets[0]], sorted(set(ips) - {targets[0]})], ips)
        if fault.kind is FaultKind.ONEWAY:
            return oneway_rules(targets[0], ips)
        if fault.kind in QUEUE_FAULTS:
            return {n: NodeRules(queue=True) for n in targets}
        assert fault.kind is FaultKind.LOSS
        return {n: NodeRules(loss=fault.params["probability"]) for n in targets}

    async def _stale_rejoin(self, fault: Fault, name: str) -> list[tuple[str, float]]:
        node = self.nodes[name]
        old = self.topo.run_dir / f"{name}.old"
        node.kill()
        await trio.to_thread.run_sync(
            lambda: shutil.copytree(node.data_dir, old,
                                    ignore=shutil.ignore_patterns("meshd.sock", FILLER)))
        await self.start_node(name)
        await trio.sleep(fault.duration_s)
        node.kill()

        def restore() -> None:
            for child in node.data_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            shutil.copytree(old, node.data_dir, dirs_exist_ok=True)
            shutil.rmtree(old)

        await trio.to_thread.run_sync(restore)
        await self.start_node(name)
        return []

    # --- the run ------------------------------------------------------------------

    async def form(self) -> None:
        """Start every node and wait for a converged cluster with its voters."""
        names = list(self.nodes)
        first = self.nodes[names[0]]
        first.spawn([], None)
        await first.wait_ready(START_TIMEOUT_S)
        self.token = (first.data_dir / "join-token").read_text().strip()
        for n in names[1:]:
            self.nodes[n].spawn([first.addr], self.token)
        for n in names[1:]:
            await self.nodes[n].wait_ready(START_TIMEOUT_S)
        want_voters = min(3, len(names))
        with trio.move_on_after(FORM_TIMEOUT_S):
            while True:
                st = await self.current_raft()
                recent = self.now() - 1.0
                if st is not None and len(st["voters"]) >= want_voters and inv.first_healed(
                        self.members_since(recent), self.rafts_since(recent), recent,
                        names) is not None:
                    return
                await trio.sleep(POLL_INTERVAL_S)
        raise HarnessError(f"the cluster did not form with {want_voters} voters within "
                           f"{FORM_TIMEOUT_S:g}s: {self._describe_views()}")

    async def heal_all(self) -> None:
        """Undo everything: thaw, flush rules, free disks, restart what is down."""
        for node in self.nodes.values():
            node.thaw()
            (node.data_dir / FILLER).unlink(missing_ok=True)
        await trio.to_thread.run_sync(self.topo.heal_network)
        for name, node in self.nodes.items():
            if not node.running():
                await self.start_node(name)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as received:
            async for signum in received:
                raise Interrupted(f"signal {signal.Signals(signum).name}")

    async def run(self) -> dict[str, Any]:
        """The whole run; returns the report (see :func:`chaos.report.build_report`)."""
        self.t0 = trio.current_time()
        sc = self.opts.scenario
        async with trio.open_nursery() as outer:
            outer.start_soon(self._signals)
            outer.start_soon(self.observe)
            await self.form()
            self.log("cluster_formed", nodes=len(self.nodes), mode=self.topo.mode)
            await self.deploy_services()
            async with trio.open_nursery() as clients:
                for i in range(sc.workload.clients):
                    clients.start_soon(self.workload.run_client, i)
                await trio.sleep(sc.settle_s)
                for i, fault in enumerate(self.opts.schedule):
                    await self.run_fault(i, fault)
                await self.heal_all()
                final_since = self.now()
                final_heal = await self.wait_healed(final_since, "final heal")
                await self.check_dns(self.live(), [])
                await self.check_join("probe-final", "final heal")
                services_detail = orphans_detail = "the scenario declares no services"
                if self.opts.scenario.services:
                    services_detail = ""
                    await self.wait_services("final heal")
                    await self.check_service_dns()
                    orphans_detail = await self.check_orphans()
                clients.cancel_scope.cancel()
            unread = await self.workload.final_reads()
            self._check_exits()
            outer.cancel_scope.cancel()
        return self._report(final_heal, unread, services_detail, orphans_detail)

    async def meshctl(self, node: NodeProc, *args: str) -> str:
        """Run ``meshctl --socket <node's socket> ARGS``; returns its stdout.

        Raises:
            MeshError: it failed (its stderr).
        """
        proc = await trio.run_process(
            [sys.executable, "-m", "mesh.node.cli", "--socket", str(node.socket_path), *args],
            capture_stdout=True, capture_stderr=True, check=False)
        if proc.returncode != 0:
            raise MeshError(f"meshctl {' '.join(args)} on {node.name} failed: "
                            f"{proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout.decode()

    async def deploy_services(self) -> None:
        """``meshctl run`` every declared service and wait for it to converge (a
        failure is a violation)."""
        for svc in self.opts.scenario.services:
            node = self.nodes[self.live()[0]]
            try:
                await self.meshctl(node, "run", "--timeout", f"{svc.converge_s:g}",
                                   *svc.run_args)
            except MeshError as exc:
                self._violate(inv.Violation(self.now(), "services_converge",
                                            f"could not deploy {svc.name}: {exc}"))

    async def _service_views(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``meshctl ls --json`` and ``meshctl ps --json`` (the same objects, through
        the API socket of the first responsive node: no process start per poll)."""
        node = self.nodes[self.live()[0]]
        services = await node.call("service_ls", {}, timeout_s=5.0)
        allocs = await node.call("service_ps", {}, timeout_s=5.0)
        return services, [a for a in allocs if a.get("desired", "run") == "run"]

    async def wait_services(self, what: str) -> float | None:
        """Wait until every declared service has converged on the live nodes (within
        the longest ``converge_s``); returns how long it took, or ``None`` and
        records the violations still seen at the deadline."""
        declared = self.opts.scenario.services
        start = self.now()
        deadline = start + max(s.converge_s for s in declared)
        while True:
            self.checks["services_converge"] += 1
            asked = (self.live() or ["-"])[0]  # the node _service_views asks
            try:
                services, allocs = await self._service_views()
            except (MeshError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                found = [inv.unreadable_services(self.now(), asked, exc)]
            else:
                found = inv.service_violations(self.now(), services, allocs, self.live(),
                                               [s.name for s in declared])
            if not found:
                return self.now() - start
            if self.now() >= deadline:
                for v in found:
                    self._violate(inv.Violation(v.t, v.invariant, f"{what}: {v.message}"))
                return None
            await trio.sleep(POLL_INTERVAL_S * 2)

    def _workload_sessions(self, name: str) -> int:
        """Process sessions in the node's namespace other than meshd's (and the
        harness's netem helpers, which are not running at the end)."""
        node = self.nodes[name]
        assert node.proc is not None
        own = os.getsid(node.proc.pid)
        sessions = set()
        for pid in self.topo.namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                sid = os.getsid(pid)
                if sid != own:
                    sessions.add(sid)
        return len(sessions)

    async def check_orphans(self) -> str:
        """After convergence: no node runs more workload process groups than it has
        starting or running allocations (rechecked for a few seconds: stops are
        asynchronous). Returns why it was skipped (empty if it ran)."""
        if self.topo.mode != "netns":
            return "loopback mode: processes cannot be told apart by node"
        deadline = self.now() + ORPHAN_SETTLE_S
        while True:
            self.checks["no_orphan_workloads"] += 1
            found: list[inv.Violation] = []
            try:
                _, allocs = await self._service_views()
            except (MeshError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                return f"cannot read allocations: {exc}"
            counts = []
            for name in self.live():
                sessions = await trio.to_thread.run_sync(self._workload_sessions, name)
                found += inv.orphan_violations(self.now(), name, sessions, allocs)
                counts.append(f"{name} {sessions}")
            self._orphan_counts = ", ".join(counts)
            if not found or self.now() >= deadline:
                break
            await trio.sleep(1.0)
        for v in found:
            self._violate(v)
        return ""

    async def check_service_dns(self) -> None:
        """Every live node's DNS answers each service with its healthy endpoints only
        (with the same grace as node names)."""
        ips = {n: self.nodes[n].ip for n in self.live()}
        for server in self.live():
            for svc in self.opts.scenario.services:
                found: list[inv.Violation] = []
                for attempt in range(2):
                    if attempt:
                        await trio.sleep(DNS_GRACE_S)
                    self.checks["dns_ready_endpoints_only"] += 1
                    try:
                        _, allocs = await self._service_views()
                    except (MeshError, OSError, trio.TooSlowError,
                            trio.BrokenResourceError):
                        continue  # wait_services reported it
                    got = await query_a(self.nodes[server].ip, f"{svc.name}.service.mesh")
                    found = inv.service_dns_violations(self.now(), server, svc.name,
                                                       got or (), allocs, ips)
                    if not found:
                        break
                for v in found:
                    self._violate(v)

    def _report(self, final_heal: float | None, unread: list[str],
                services_detail: str, orphans_detail: str) -> dict[str, Any]:
        ops = self.workload.history.operations()
        result = check_kv(ops)
        if not result.ok:
            self._violate(inv.Violation(self.now(), "kv_linearizable", result.describe()))
        for key in unread:
            self._violate(inv.Violation(self.now(), "kv_linearizable",
                                        f"key {key} could not be read after healing"))
        by_name: dict[str, list[inv.Violation]] = {}
        for v in self.violations:
            by_name.setdefault(v.invariant, []).append(v)

        def verdict(name: str, checks: int, detail: str, skipped: str = "") -> InvariantResult:
            if skipped:
                return InvariantResult(name, "skipped", 0, skipped)
            n = len(by_name.get(name, []))
            return InvariantResult(name, "violated" if n else "ok", checks,
                                   f"{n} violation(s); {detail}" if n else detail)

        stats = self.workload.stats
        invariants = [
            verdict("one_leader_per_term", len(self.raft_obs),
                    f"{len(self.leaders.terms())} terms with a known leader"),
            verdict("membership_converges", self.checks["membership_converges"],
                    f"after every fault and at the end (final heal "
                    f"{'-' if final_heal is None else f'{final_heal:.2f}s'})"),
            verdict("no_crash", self.checks["no_crash"],
                    f"{len(self.exits)} exits, "
                    f"{sum(1 for e in self.exits if not e.by_harness)} not by the harness"),
            verdict("dns_live_nodes_only", self.checks["dns_live_nodes_only"],
                    "<node>.node.mesh on survivors after each detected fault, on all at the end"),
            verdict("kv_linearizable", len(ops), result.describe().split("\n")[0]),
            verdict("services_converge", self.checks["services_converge"],
                    "desired replicas, healthy, on live nodes, after every fault and at "
                    "the end (meshctl ls/ps)",
                    skipped=services_detail),
            verdict("dns_ready_endpoints_only", self.checks["dns_ready_endpoints_only"],
                    "<service>.service.mesh on every live node", skipped=services_detail),
            verdict("joins_admitted", self.checks["joins_admitted"],
                    "a new node joins through a random live member (redirects followed) "
                    "after every fault and at the end"),
            verdict("no_orphan_workloads", self.checks["no_orphan_workloads"],
                    "workload process groups per node vs its allocations, at the end "
                    f"({self._orphan_counts})",
                    skipped=orphans_detail),
        ]
        meta = {
            "scenario": self.opts.scenario.name, "seed": self.opts.seed,
            "nodes": self.opts.nodes, "node_names": list(self.nodes),
            "duration_s": self.opts.duration_s, "mode": self.topo.mode,
            "gossip_profile": self.opts.scenario.gossip_profile,
            "ips": {n: node.ip for n, node in self.nodes.items()},
            "elapsed_s": round(self.now(), 3),
            "schedule": [f.to_json() for f in self.opts.schedule],
            "exits": [{"t": round(e.t, 3), "node": e.node, "status": e.status,
                       "by_harness": e.by_harness} for e in self.exits],
        }
        kv = {"ops": stats.ops, "ok": stats.ok, "failed": stats.failed,
              "unknown": stats.unknown, "acked_writes": stats.acked_writes,
              "keys": len(stats.keys), "verdict": result.describe().split("\n")[0],
              "unread_keys": unread}
        return build_report(meta, self.records, invariants, self.violations, kv,
                            self.leaders.changes, self.member_counts, self.replica_counts)


def _stop_helpers(helpers: Sequence[subprocess.Popen[bytes]]) -> list[str]:
    """SIGTERM each netem helper (it releases what it holds), SIGKILL if it lingers;
    returns the last line each printed (its packet counts)."""
    for proc in helpers:
        if proc.poll() is None:
            proc.terminate()
    lines = []
    for proc in helpers:
        try:
            out, _ = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        last = out.decode(errors="replace").strip().splitlines()[-1:]
        lines.append(last[0] if last else "no counts (killed)")
    return lines


def copy_logs(topo: Topology, dest: Path) -> None:
    """Copy every node's log into ``dest`` (before the run dir is removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in topo.run_dir.glob("*.log"):
        shutil.copy(log, dest / log.name)

