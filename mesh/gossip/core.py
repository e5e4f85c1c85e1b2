"""The SWIM membership protocol with Lifeguard's refinements, sans I/O.

Theory of operation
-------------------
This implements SWIM (Das, Gupta, Motivala 2002) as refined by Lifeguard (Dadgar,
Phillips, Currey 2018) and shaped after hashicorp/memberlist:

* Failure detection (SWIM §3.1, §4.3): every ``probe_interval_s`` the node probes the
  next member of a list shuffled once per pass (randomized round-robin, so every
  member is probed within a bounded time). No ack within ``probe_timeout_s`` makes
  it ask ``indirect_checks`` other members to probe on its behalf (ping-req). No ack
  by the end of the interval makes it *suspect* the target.
* Suspicion (SWIM §4.2, Lifeguard §IV-B): a suspect has until its suspicion timeout
  to refute by gossiping an ``Alive`` with a higher incarnation. The timeout starts
  at ``max`` and shrinks towards ``min`` as independent members confirm the
  suspicion (``suspicion.py``). On expiry the node declares the member dead.
* Local health (Lifeguard §IV-A): missed nacks from indirect probers and refutations
  of our own suspicion raise a score that stretches our probe interval and timeout,
  so a slow node accuses less (``awareness.py``).
* Buddy system (Lifeguard §IV-C): a ping to a suspect carries the suspicion, so the
  suspect learns of it directly and can refute at once.
* Dissemination (SWIM §4.1): membership changes are queued as broadcasts and
  piggybacked on every datagram, and pushed to ``gossip_nodes`` random members every
  ``gossip_interval_s``; each is sent ``retransmit_mult * ceil(log10(N+1))`` times.
* Anti-entropy: a joining node, and every node periodically, exchanges its full
  state with one member over TCP (push-pull), which repairs anything gossip missed.
  A remote "dead" is merged as a suspicion, so a stale report cannot kill a live
  node without the suspect getting its chance to refute.
* Incarnations order all news about a member: ``Alive`` overrides ``Suspect`` only
  with a strictly higher incarnation; ``Suspect``/``Dead`` apply at an equal or
  higher one. Only the member itself raises its incarnation (refutation, metadata
  change). A restarted node learns its old incarnation from push-pull and refutes
  its own death with a higher one: that is how it rejoins under the same name.

The core never performs I/O. Time is always an argument; randomness comes from the
injected ``rng``. Inputs are ``handle_*`` calls and ``join``/``leave``; outputs are
drained with :meth:`Membership.poll_outputs`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.gossip.awareness import Awareness
from mesh.gossip.broadcast import BroadcastQueue
from mesh.gossip.config import GossipConfig
from mesh.gossip.messages import (
    PACKET_OVERHEAD_BYTES,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    Meta,
    Nack,
    Ping,
    PushPull,
    Status,
    Suspect,
    decode_packet,
    encode_packet,
    pack_message,
)
from mesh.gossip.suspicion import Suspicion, confirmations_needed, suspicion_bounds
from mesh.types import Addr, NodeId

_MSG_OVERHEAD_BYTES = 0  # packed messages are concatenated into the list as they are
_REAP_CHECK_S = 1.0
NACK_AFTER_FRACTION = 0.8
"""A relay nacks after this fraction of ``probe_timeout_s`` without an ack."""


# --- outputs -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberView:
    """A read-only snapshot of one member.

    Attributes:
        node: the member's unique name.
        addr: where its gossip port is.
        incarnation: the newest incarnation known for it.
        status: alive, suspect, dead or left.
        meta: labels, capacity, role and ports it announced.
        since: time (same clock as ``now``) its status last changed here.
    """

    node: NodeId
    addr: Addr
    incarnation: int
    status: Status
    meta: Meta
    since: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` as one UDP datagram to ``to``. Best effort."""

    to: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamSend:
    """Open a TCP stream to ``to``, send the frame ``data`` and read one reply frame;
    report it with ``handle_stream_reply(request_id, ...)`` or
    ``handle_stream_failed(request_id, ...)`` within ``stream_timeout_s``."""

    request_id: int
    to: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class MemberChanged:
    """A member appeared or changed status, address or metadata.

    ``previous`` is ``None`` for a member seen for the first time.
    """

    member: MemberView
    previous: Status | None


@dataclass(frozen=True, slots=True)
class MemberReaped:
    """A dead or left member was forgotten after ``dead_reap_s``."""

    node: NodeId


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """The local health score changed (0 is healthy)."""

    score: int


@dataclass(frozen=True, slots=True)
class JoinFinished:
    """Every push-pull started by :meth:`Membership.join` has completed.

    Attributes:
        ok: seeds that answered.
        failed: seeds that could not be reached, with the reason.
    """

    ok: tuple[Addr, ...]
    failed: tuple[tuple[Addr, str], ...]


GossipOutput = Send | StreamSend | MemberChanged | MemberReaped | HealthChanged | JoinFinished


@dataclass(frozen=True, slots=True)
class GossipStatistics:
    """Counters since start (``Membership.statistics()``)."""

    probes: int
    acks: int
    nacks: int
    indirect_probes: int
    suspicions: int
    refutations: int
    deaths: int
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    malformed: int
    push_pulls: int
    address_conflicts: int
    send_failures: int
    health_score: int
    members_alive: int
    members_suspect: int
    members_dead: int
    members_left: int


# --- internal state ----------------------------------------------------------------


@dataclass(slots=True)
class _Member:
    node: NodeId
    addr: Addr
    meta: Meta
    incarnation: int
    status: Status
    since: float

    def view(self) -> MemberView:
        return MemberView(self.node, self.addr, self.incarnation, self.status, self.meta,
                          self.since)


@dataclass(slots=True)
class _Probe:
    target: NodeId
    seq: int
    ack_deadline: float
    end: float
    acked: bool = False
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    """An indirect probe we run for someone else."""

    reply_to: Addr
    their_seq: int
    want_nack: bool
    deadline: float


@dataclass(slots=True)
class _Counters:
    probes: int = 0
    acks: int = 0
    nacks: int = 0
    indirect_probes: int = 0
    suspicions: int = 0
    refutations: int = 0
    deaths: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    malformed: int = 0
    push_pulls: int = 0
    address_conflicts: int = 0
    send_failures: int = 0


@dataclass(slots=True)
class _Join:
    pending: set[int] = field(default_factory=set)
    ok: list[Addr] = field(default_factory=list)
    failed: list[tuple[Addr, str]] = field(default_factory=list)


# --- the core ----------------------------------------------------------------------


class Membership:
    """One node's view of the cluster membership (SWIM + Lifeguard), sans I/O.

    Args:
        config: protocol timing and sizes.
        me: this node's unique name.
        addr: the address other members reach this node's gossip port at.
        meta: what this node announces about itself.
        rng: the only source of randomness (seed it for reproducible runs).
        now: the current time in seconds (any monotonic origin).
        incarnation: the incarnation to start from (0 for a fresh process).
    """

    def __init__(
        self,
        config: GossipConfig,
        me: NodeId,
        addr: Addr,
        meta: Meta,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
    ) -> None:
        self._config = config
        self._me = me
        self._rng = rng
        self._members: dict[NodeId, _Member] = {
            me: _Member(me, addr, meta, incarnation, Status.ALIVE, now)
        }
        self._suspicions: dict[NodeId, Suspicion] = {}
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._broadcasts = BroadcastQueue()
        self._outputs: list[GossipOutput] = []
        # A random start, so an ack to a probe of a previous process cannot match.
        self._seq = rng.getrandbits(32)
        self._probe: _Probe | None = None
        self._probe_order: list[NodeId] = []
        self._probe_index = 0
        self._relays: dict[int, _Relay] = {}
        self._streams: dict[int, tuple[Addr, bool]] = {}
        self._join: _Join | None = None
        self._stats = _Counters()
        self._leaving = False
        # Stagger the first probe and gossip rounds so that nodes started together
        # do not probe in lock step.
        self._next_probe_at = now + rng.uniform(0, config.probe_interval_s)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval_s)
        self._next_push_pull_at = self._push_pull_after(now)
        self._next_reap_at = now + _REAP_CHECK_S
        self._next_reconnect_at = now + config.reconnect_interval_s
        self._queue_alive_self()

    # --- properties and queries -------------------------------------------------

    @property
    def config(self) -> GossipConfig:
        """The protocol configuration."""
        return self._config

    @property
    def me(self) -> NodeId:
        """This node's name."""
        return self._me

    @property
    def incarnation(self) -> int:
        """This node's current incarnation."""
        return self._members[self._me].incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score (0 is healthy)."""
        return self._awareness.score

    @property
    def leaving(self) -> bool:
        """True once :meth:`leave` was called."""
        return self._leaving

    def members(self) -> list[MemberView]:
        """All known members, this node included, sorted by name."""
        return [self._members[n].view() for n in sorted(self._members)]

    def member(self, node: NodeId) -> MemberView | None:
        """One member's view, or ``None`` if unknown."""
        m = self._members.get(node)
        return m.view() if m else None

    def num_live(self) -> int:
        """Members alive or suspect, this node included (the N of the formulas)."""
        return sum(1 for m in self._members.values() if m.status <= Status.SUSPECT)

    def statistics(self) -> GossipStatistics:
        """Counters and gauges for metrics."""
        c = self._stats
        by_status = [0, 0, 0, 0]
        for m in self._members.values():
            by_status[m.status] += 1
        return GossipStatistics(
            c.probes, c.acks, c.nacks, c.indirect_probes, c.suspicions, c.refutations,
            c.deaths, c.packets_in, c.packets_out, c.bytes_in, c.bytes_out, c.malformed,
            c.push_pulls, c.address_conflicts, c.send_failures, self._awareness.score,
            *by_status,
        )

    # --- inputs -----------------------------------------------------------------

    def join(self, seeds: Sequence[Addr], now: float) -> None:
        """Start a push-pull state exchange with every seed.

        A :class:`JoinFinished` output follows once all of them completed.
        """
        if not seeds:
            raise LocalProtocolError("join needs at least one seed address")
        join = _Join()
        for seed in seeds:
            join.pending.add(self._start_stream(seed, is_join=True))
        self._join = join

    def leave(self, now: float) -> None:
        """Announce a graceful departure: gossip ``Dead(me, from=me)``.

        The caller keeps driving :meth:`handle_timeout` for ``leave_propagate_s`` so
        the news spreads, then stops. Probing stops at once.
        """
        if self._leaving:
            return
        self._leaving = True
        me = self._members[self._me]
        msg = Dead(self._me, me.incarnation, self._me)
        self._broadcasts.queue(self._me, pack_message(msg))
        me.status, me.since = Status.LEFT, now
        self._probe = None
        # Tell a few members directly, so the departure is known even if the
        # process exits before the next gossip round.
        for target in self._random_members(self._config.gossip_nodes, now, live_only=True):
            self._send(target.addr, [msg], now)

    def update_meta(self, meta: Meta, now: float) -> None:
        """Change what this node announces; spreads as a new incarnation."""
        me = self._members[self._me]
        if meta == me.meta:
            return
        me.meta = meta
        me.incarnation += 1
        self._queue_alive_self()
        self._outputs.append(MemberChanged(me.view(), Status.ALIVE))

    def load_members(self, states: Iterable[MemberState], now: float) -> None:
        """Learn members known from elsewhere (a snapshot, a test fixture) as a
        push-pull would, but without queueing broadcasts about them: they are
        not news to anyone."""
        states = list(states)
        pending = {s.node for s in states if self._broadcasts.has(s.node)}
        self._merge(states, now)
        for s in states:
            if s.node != self._me and s.node not in pending:
                self._broadcasts.discard(s.node)

    def handle_packet(self, src: Addr, data: bytes, now: float) -> None:
        """Process one datagram received from ``src``.

        Raises:
            RemoteProtocolError: the datagram is malformed; it was counted and
                ignored as a whole (nothing in it was applied).
        """
        try:
            msgs = decode_packet(data, self._config.max_packet_bytes * 4)
        except RemoteProtocolError:
            self._stats.malformed += 1
            raise
        self._stats.packets_in += 1
        self._stats.bytes_in += len(data)
        # Membership news first, then probes: an ack must carry what the news in
        # the same packet made us say (e.g. the refutation of a buddy-system
        # suspicion riding on the ping).
        for msg in msgs:
            if isinstance(msg, (Suspect, Alive, Dead)):
                self._dispatch(src, msg, now)
        for msg in msgs:
            if not isinstance(msg, (Suspect, Alive, Dead)):
                self._dispatch(src, msg, now)

    def handle_send_failed(self, to: Addr, reason: str, now: float) -> None:
        """Report that a :class:`Send` could not be handed to the network (h11
        ``send_failed``). SWIM treats it as a lost packet; it is counted."""
        self._stats.send_failures += 1

    def handle_stream(self, src: Addr, data: bytes, now: float) -> bytes:
        """Answer a push-pull request received over TCP; returns the reply envelope.

        Raises:
            RemoteProtocolError: the request is malformed; send nothing back.
        """
        try:
            req = PushPull.from_envelope(wire.decode(data, self._config.max_stream_bytes))
            if req.reply:
                raise RemoteProtocolError("unsolicited push-pull reply")
        except RemoteProtocolError:
            self._stats.malformed += 1
            raise
        self._stats.push_pulls += 1
        reply = PushPull(join=req.join, states=self._local_state(), reply=True).encode()
        self._merge(req.states, now)
        return reply

    def handle_stream_reply(self, request_id: int, data: bytes, now: float) -> None:
        """Deliver the reply to a :class:`StreamSend`.

        Raises:
            RemoteProtocolError: the reply is malformed (the exchange counts as failed).
        """
        addr, _ = self._streams.get(request_id, (None, False))
        if addr is None:
            return
        try:
            reply = PushPull.from_envelope(wire.decode(data, self._config.max_stream_bytes))
            if not reply.reply:
                raise RemoteProtocolError("expected a push-pull reply")
        except RemoteProtocolError as exc:
            self._stats.malformed += 1
            self.handle_stream_failed(request_id, f"bad reply: {exc}", now)
            raise
        self._streams.pop(request_id)
        self._stats.push_pulls += 1
        self._merge(reply.states, now)
        self._finish_join_step(request_id, addr, None)

    def handle_stream_failed(self, request_id: int, reason: str, now: float) -> None:
        """Report that a :class:`StreamSend` could not complete (h11 ``send_failed``)."""
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            self._finish_join_step(request_id, entry[0], reason)

    def handle_timeout(self, now: float) -> None:
        """Run every timer that is due at ``now`` (call at :meth:`next_deadline`)."""
        self._expire_relays(now)
        if not self._leaving:
            self._run_probe_timers(now)
            self._expire_suspicions(now)
            if self._config.push_pull_interval_s and now >= self._next_push_pull_at:
                self._next_push_pull_at = self._push_pull_after(now)
                targets = self._random_members(1, now, live_only=True)
                if targets:
                    self._start_stream(targets[0].addr, is_join=False)
            if now >= self._next_reap_at:
                self._next_reap_at = now + _REAP_CHECK_S
                self._reap(now)
            if self._config.reconnect_interval_s and now >= self._next_reconnect_at:
                self._next_reconnect_at = now + self._config.reconnect_interval_s
                self._reconnect()
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + self._config.gossip_interval_s
            self._gossip(now)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timeout` has work to do."""
        times = [self._next_gossip_at]
        if not self._leaving:
            times += [self._next_probe_at, self._next_reap_at]
            if self._config.push_pull_interval_s:
                times.append(self._next_push_pull_at)
            if self._config.reconnect_interval_s:
                times.append(self._next_reconnect_at)
            if self._probe is not None:
                times.append(self._probe.end if self._probe.indirect_sent or self._probe.acked
                             else self._probe.ack_deadline)
            times.extend(s.deadline() for s in self._suspicions.values())
        times.extend(r.deadline for r in self._relays.values())
        return min(times)

    def poll_outputs(self) -> list[GossipOutput]:
        """Drain the outputs produced so far, in order.

        Ordering contract: outputs appear in the order the protocol produced them;
        ``Send`` and ``StreamSend`` may be performed in any order (UDP reorders
        anyway); ``MemberChanged`` for one member appear in causal order.
        """
        out, self._outputs = self._outputs, []
        return out

    # --- dispatch ---------------------------------------------------------------

    def _dispatch(self, src: Addr, msg: Message, now: float) -> None:
        match msg:
            case Ping():
                if msg.target == self._me and not self._leaving:
                    self._send(src, [Ack(msg.seq)], now)
            case IndirectPing():
                self._relay_probe(src, msg, now)
            case Ack():
                self._on_ack(msg.seq, now)
            case Nack():
                if self._probe is not None and self._probe.seq == msg.seq:
                    self._probe.nacks += 1
                    self._stats.nacks += 1
            case Suspect():
                self._on_suspect(msg, now)
            case Alive():
                self._on_alive(msg, now)
            case Dead():
                self._on_dead(msg, now)

    # --- probing (SWIM §3.1, §4.3) ----------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _run_probe_timers(self, now: float) -> None:
        probe = self._probe
        if probe is not None:
            if not probe.acked and not probe.indirect_sent and now >= probe.ack_deadline:
                self._send_indirect(probe, now)
            if now >= probe.end:
                self._finish_probe(probe, now)
                self._probe = None
        if self._probe is None and now >= self._next_probe_at:
            self._start_probe(now)

    def _pick_probe_target(self) -> _Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                node = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self._members.get(node)
                if m is not None and node != self._me and m.status <= Status.SUSPECT:
                    return m
            # One pass done: reshuffle (randomized round-robin, SWIM §4.3).
            self._probe_order = [n for n, m in self._members.items()
                                 if n != self._me and m.status <= Status.SUSPECT]
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _start_probe(self, now: float) -> None:
        interval = self._awareness.scale(self._config.probe_interval_s)
        self._next_probe_at = now + interval
        target = self._pick_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(
            target.node, seq,
            ack_deadline=now + self._awareness.scale(self._config.probe_timeout_s),
            end=now + interval,
        )
        self._stats.probes += 1
        msgs: list[Message] = [Ping(seq, target.node, self._me)]
        if target.status == Status.SUSPECT:
            # Buddy system: tell the suspect it is suspected (Lifeguard §IV-C).
            msgs.append(Suspect(target.node, target.incarnation, self._me))
        self._send(target.addr, msgs, now)

    def _send_indirect(self, probe: _Probe, now: float) -> None:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None:
            return
        helpers = [m for m in self._random_members(self._config.indirect_checks + 1, now,
                                                   live_only=True, alive_only=True)
                   if m.node != probe.target][: self._config.indirect_checks]
        probe.expected_nacks = len(helpers)
        for helper in helpers:
            self._stats.indirect_probes += 1
            self._send(helper.addr,
                       [IndirectPing(probe.seq, probe.target, target.addr, True, self._me)], now)

    def _finish_probe(self, probe: _Probe, now: float) -> None:
        if probe.acked:
            return
        # Lifeguard §IV-A: missing nacks mean *we* may be the slow one.
        if probe.expected_nacks > 0:
            delta = probe.expected_nacks - probe.nacks
        else:
            delta = 1
        self._apply_awareness(delta)
        target = self._members.get(probe.target)
        if target is not None and target.status <= Status.SUSPECT:
            self._on_suspect(Suspect(target.node, target.incarnation, self._me), now)

    def _on_ack(self, seq: int, now: float) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq and not probe.acked:
            probe.acked = True
            self._stats.acks += 1
            self._apply_awareness(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.reply_to, [Ack(relay.their_seq)], now)

    def _relay_probe(self, src: Addr, msg: IndirectPing, now: float) -> None:
        if self._leaving:
            return
        seq = self._next_seq()
        # The prober sent this at probe_timeout into its probe and gives up one
        # probe_timeout later (the interval is about twice the timeout): a nack sent
        # only after a full probe_timeout arrives too late to count, and every
        # helpful relay would look missing (Lifeguard §IV-A counts missing nacks
        # against the prober's own health). Nack earlier.
        self._relays[seq] = _Relay(src, msg.seq, msg.want_nack,
                                   now + NACK_AFTER_FRACTION * self._config.probe_timeout_s)
        self._send(msg.target_addr, [Ping(seq, msg.target, self._me)], now)

    def _expire_relays(self, now: float) -> None:
        for seq in [s for s, r in self._relays.items() if r.deadline <= now]:
            relay = self._relays.pop(seq)
            if relay.want_nack:
                self._send(relay.reply_to, [Nack(relay.their_seq)], now)

    def _apply_awareness(self, delta: int) -> None:
        if self._awareness.apply_delta(delta):
            self._outputs.append(HealthChanged(self._awareness.score))

    # --- news about members -----------------------------------------------------

    def _on_alive(self, msg: Alive, now: float) -> None:
        m = self._members.get(msg.node)
        if msg.node == self._me:
            assert m is not None
            if msg.incarnation < m.incarnation:
                return
            if msg.incarnation == m.incarnation and msg.meta == m.meta and msg.addr == m.addr:
                return
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        if m is None:
            m = _Member(msg.node, msg.addr, msg.meta, msg.incarnation, Status.ALIVE, now)
            self._members[msg.node] = m
            # A new member joins the probe list at a random place, so not every
            # node probes it at the same moment.
            self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), msg.node)
            self._broadcasts.queue(msg.node, pack_message(msg))
            self._outputs.append(MemberChanged(m.view(), None))
            return
        reclaimed = False
        if msg.addr != m.addr:
            gone = m.status >= Status.DEAD
            if not gone or now - m.since < self._config.dead_node_reclaim_s:
                self._stats.address_conflicts += 1
                return
            reclaimed = True
        if msg.incarnation <= m.incarnation and not reclaimed:
            return
        previous = m.status
        changed = reclaimed or previous != Status.ALIVE or msg.meta != m.meta
        self._suspicions.pop(msg.node, None)
        m.incarnation, m.addr, m.meta = msg.incarnation, msg.addr, msg.meta
        if previous != Status.ALIVE:
            m.status, m.since = Status.ALIVE, now
        self._broadcasts.queue(msg.node, pack_message(msg))
        if changed:
            self._outputs.append(MemberChanged(m.view(), previous))

    def _on_suspect(self, msg: Suspect, now: float) -> None:
        m = self._members.get(msg.node)
        if m is None:
            return
        if msg.incarnation < m.incarnation:
            self._resend_refutation(msg.node)
            return
        suspicion = self._suspicions.get(msg.node)
        if suspicion is not None:
            if suspicion.confirm(msg.accuser):
                self._broadcasts.queue(msg.node, pack_message(msg))
            return
        if m.status != Status.ALIVE:
            return
        if msg.node == self._me:
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        n = self.num_live()
        min_s, max_s = suspicion_bounds(
            self._config.suspicion_mult, self._config.suspicion_max_timeout_mult, n,
            self._config.probe_interval_s)
        k = confirmations_needed(self._config.suspicion_mult, n)
        self._suspicions[msg.node] = Suspicion(now, k, min_s, max_s, msg.accuser)
        m.incarnation, m.status, m.since = msg.incarnation, Status.SUSPECT, now
        self._stats.suspicions += 1
        self._broadcasts.queue(msg.node, pack_message(msg))
        self._outputs.append(MemberChanged(m.view(), Status.ALIVE))

    def _on_dead(self, msg: Dead, now: float) -> None:
        m = self._members.get(msg.node)
        if m is None:
            return
        if msg.incarnation < m.incarnation:
            self._resend_refutation(msg.node)
            return
        if m.status >= Status.DEAD:
            return
        if msg.node == self._me:
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        previous = m.status
        self._suspicions.pop(msg.node, None)
        m.incarnation, m.since = msg.incarnation, now
        m.status = Status.LEFT if msg.is_leave else Status.DEAD
        self._broadcasts.queue(msg.node, pack_message(msg))
        self._outputs.append(MemberChanged(m.view(), previous))

    def _refute(self, accused_incarnation: int) -> None:
        me = self._members[self._me]
        me.incarnation = max(me.incarnation, accused_incarnation) + 1
        self._stats.refutations += 1
        # Being accused means others could not hear us in time: we may be the slow one.
        self._apply_awareness(1)
        self._queue_alive_self()

    def _resend_refutation(self, node: NodeId) -> None:
        """Someone still accuses us at an old incarnation: it missed our refutation.
        Queue our current ``Alive`` again (fresh, so it goes first) so the very
        reply to that accuser carries it."""
        if node == self._me and not self._leaving:
            self._queue_alive_self()

    def _queue_alive_self(self) -> None:
        me = self._members[self._me]
        self._broadcasts.queue(self._me, pack_message(Alive(self._me, me.incarnation, me.addr,
                                                            me.meta)))

    def _expire_suspicions(self, now: float) -> None:
        expired = [n for n, s in self._suspicions.items() if s.deadline() <= now]
        for node in expired:
            m = self._members[node]
            self._stats.deaths += 1
            self._on_dead(Dead(node, m.incarnation, self._me), now)

    def _reconnect(self) -> None:
        """Try one dead member (Serf's reconnect): if it was only cut off, the
        push-pull tells both sides about each other and they refute their deaths."""
        dead = [m for m in self._members.values() if m.status == Status.DEAD]
        if dead:
            self._start_stream(self._rng.choice(dead).addr, is_join=False)

    def _reap(self, now: float) -> None:
        reap_s = self._config.dead_reap_s
        gone = [n for n, m in self._members.items()
                if m.status >= Status.DEAD and now - m.since >= reap_s]
        for node in gone:
            del self._members[node]
            self._outputs.append(MemberReaped(node))

    # --- dissemination ----------------------------------------------------------

    def _random_members(
        self, k: int, now: float, *, live_only: bool, alive_only: bool = False
    ) -> list[_Member]:
        """Up to ``k`` random other members; with ``live_only`` false, members dead
        for less than ``gossip_to_the_dead_s`` qualify too."""
        dead_window = self._config.gossip_to_the_dead_s
        candidates = [
            m for n, m in self._members.items()
            if n != self._me and (
                m.status == Status.ALIVE
                or (m.status == Status.SUSPECT and not alive_only)
                or (not live_only and m.status >= Status.DEAD and now - m.since < dead_window)
            )
        ]
        if len(candidates) <= k:
            self._rng.shuffle(candidates)
            return candidates
        return self._rng.sample(candidates, k)

    def _gossip(self, now: float) -> None:
        if not len(self._broadcasts):
            return
        for target in self._random_members(self._config.gossip_nodes, now, live_only=False):
            if not self._send(target.addr, [], now):
                break

    def _send(self, to: Addr, primary: Iterable[Message], now: float) -> bool:
        """Send ``primary`` messages to ``to`` with piggybacked broadcasts filling the
        packet. Returns False (and sends nothing) if there was nothing to send."""
        packed = [pack_message(m) for m in primary]
        budget = self._config.max_packet_bytes - PACKET_OVERHEAD_BYTES - sum(map(len, packed))
        limit = self._config.retransmit_limit(self.num_live())
        packed += self._broadcasts.take(budget, _MSG_OVERHEAD_BYTES, limit)
        if not packed:
            return False
        data = encode_packet(packed)
        self._stats.packets_out += 1
        self._stats.bytes_out += len(data)
        self._outputs.append(Send(to, data))
        return True

    # --- push-pull anti-entropy -------------------------------------------------

    def _push_pull_after(self, now: float) -> float:
        period = self._config.push_pull_period_s(self.num_live())
        # Jitter the period by +-10% so exchanges of many nodes do not align.
        return now + period * self._rng.uniform(0.9, 1.1)

    def _local_state(self) -> tuple[MemberState, ...]:
        return tuple(MemberState(m.node, m.addr, m.incarnation, m.status, m.meta)
                     for m in self._members.values())

    def _start_stream(self, to: Addr, *, is_join: bool) -> int:
        request_id = self._next_seq()
        self._streams[request_id] = (to, is_join)
        data = PushPull(join=is_join, states=self._local_state()).encode()
        self._outputs.append(StreamSend(request_id, to, data))
        return request_id

    def _finish_join_step(self, request_id: int, addr: Addr, error: str | None) -> None:
        join = self._join
        if join is None or request_id not in join.pending:
            return
        join.pending.discard(request_id)
        if error is None:
            join.ok.append(addr)
        else:
            join.failed.append((addr, error))
        if not join.pending:
            self._outputs.append(JoinFinished(tuple(join.ok), tuple(join.failed)))
            self._join = None

    def _merge(self, states: Iterable[MemberState], now: float) -> None:
        for s in states:
            if s.status == Status.ALIVE:
                self._on_alive(Alive(s.node, s.incarnation, s.addr, s.meta), now)
            elif s.status == Status.LEFT:
                self._on_dead(Dead(s.node, s.incarnation, s.node), now)
            elif s.node not in self._suspicions:
                # A remote "dead" becomes a local suspicion: the member gets its
                # chance to refute before we believe it. It is second-hand news, so it
                # never counts as an independent confirmation of a running suspicion.
                self._on_suspect(Suspect(s.node, s.incarnation, self._me), now)
