"""A deterministic simulator of a SWIM cluster (etcd rafttest / FoundationDB style).

Many nodes' real :class:`~mesh.gossip.core.Membership` cores run in one thread on a
virtual clock. Events (timer, packet delivery, stream request/reply) sit in a heap
ordered by ``(time, seq)``; one ``random.Random(seed)`` hands every node and the
network its own RNG, so a seed replays a run exactly (``MESH_SIM_SEED``).

Faults: the :class:`~mesh.testing.net.FaultyNetwork` drops, delays, duplicates,
reorders and partitions; :meth:`GossipSimulator.crash` throws a node's memory away,
:meth:`GossipSimulator.restart` starts it again under the same name (a new process:
incarnation 0) and joins it; :meth:`GossipSimulator.pause` freezes a node (SIGSTOP,
a long GC pause) so its timers and inbound packets wait until it resumes.
"""

from __future__ import annotations

import heapq
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import RemoteProtocolError
from mesh.gossip.config import GossipConfig
from mesh.gossip.core import (
    GossipOutput,
    JoinFinished,
    MemberChanged,
    Membership,
    Send,
    StreamSend,
)
from mesh.gossip.messages import MemberState, Meta, Status
from mesh.testing.net import FaultyNetwork
from mesh.types import Addr, NodeId

STREAM_CONNECT_TIMEOUT_S = 1.0
"""How long a push-pull to an unreachable peer takes to fail."""


def seed_from_env(default: int) -> int:
    """The seed to use: ``$MESH_SIM_SEED`` if set (to replay a failure), else ``default``."""
    value = os.environ.get("MESH_SIM_SEED")
    return int(value) if value else default


@dataclass(slots=True)
class StatusEvent:
    """``observer`` saw ``node`` change to ``status`` at virtual time ``at``."""

    at: float
    observer: NodeId
    node: NodeId
    status: Status
    incarnation: int


@dataclass(slots=True)
class SimNode:
    """One simulated host."""

    name: NodeId
    addr: Addr
    core: Membership | None
    meta: Meta
    paused_until: float = 0.0
    timer_gen: int = 0
    bytes_out_before_crash: int = 0
    stream_bytes_out: int = 0
    finished_joins: list[JoinFinished] = field(default_factory=list)

    @property
    def up(self) -> bool:
        """True unless crashed."""
        return self.core is not None


class GossipSimulator:
    """N SWIM nodes on a virtual clock over a faulty network.

    Args:
        n: number of nodes, named ``n000``, ``n001``...
        seed: the one seed for everything.
        config: gossip configuration for every node.
        join: if True, every node but the first joins through ``n000`` at time 0
            (so the cluster forms by push-pull and gossip, as in real life); if
            False the members start knowing each other (a formed cluster).
        meta_for: metadata per node name (default: empty labels).
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        config: GossipConfig | None = None,
        *,
        join: bool = False,
        meta_for: Callable[[NodeId], Meta] | None = None,
    ) -> None:
        self.seed = seed
        self.config = config or GossipConfig.lan()
        self._rng = random.Random(seed)
        self.net = FaultyNetwork(random.Random(self._rng.getrandbits(64)))
        self.now = 0.0
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.nodes: dict[NodeId, SimNode] = {}
        self._by_addr: dict[Addr, NodeId] = {}
        self.events: list[StatusEvent] = []
        self.observers: list[Callable[[GossipSimulator, NodeId, GossipOutput], None]] = []
        meta_for = meta_for or (lambda _n: Meta())
        for i in range(n):
            name = NodeId(f"n{i:03d}")
            addr = Addr(f"10.0.{i // 250}.{i % 250 + 1}", 7946)
            node = SimNode(name, addr, None, meta_for(name))
            self.nodes[name] = node
            self._by_addr[addr] = name
            node.core = self._new_core(node)
        first = next(iter(self.nodes.values()))
        if join:
            for node in list(self.nodes.values())[1:]:
                assert node.core is not None
                node.core.join([first.addr], self.now)
                self._after_input(node)
        else:
            self._preload_members()
        for node in self.nodes.values():
            self._after_input(node)

    # --- set-up -----------------------------------------------------------------

    def _new_core(self, node: SimNode) -> Membership:
        rng = random.Random(self._rng.getrandbits(64))
        return Membership(self.config, node.name, node.addr, node.meta, rng, self.now)

    def _preload_members(self) -> None:
        # Every core starts knowing every other member: a formed cluster.
        states = [MemberState(n.name, n.addr, 0, Status.ALIVE, n.meta)
                  for n in self.nodes.values()]
        for node in self.nodes.values():
            assert node.core is not None
            node.core.load_members(states, self.now)
            node.core.poll_outputs()

    # --- the event loop ---------------------------------------------------------

    def _push(self, at: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))

    def _after_input(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        for out in core.poll_outputs():
            self._handle_output(node, out)
        deadline = core.next_deadline()
        if deadline is not None:
            node.timer_gen += 1
            self._push(max(deadline, self.now), "timer", (node.name, node.timer_gen))

    def _handle_output(self, node: SimNode, out: GossipOutput) -> None:
        for observer in self.observers:
            observer(self, node.name, out)
        match out:
            case Send():
                dst = self._by_addr.get(out.to)
                if dst is None:
                    return
                for delay in self.net.route(node.name, dst):
                    self._push(self.now + delay, "packet", (dst, node.addr, out.data))
            case StreamSend():
                dst = self._by_addr.get(out.to)
                ok = (dst is not None and self.nodes[dst].up
                      and self.net.connected(node.name, dst)
                      and self.net.connected(dst, node.name))
                if not ok:
                    self._push(self.now + STREAM_CONNECT_TIMEOUT_S, "stream_failed",
                               (node.name, out.request_id, "connection timed out"))
                    return
                assert dst is not None
                node.stream_bytes_out += len(out.data)
                rtt = self.net.latency(node.name, dst) + self.net.latency(dst, node.name)
                self._push(self.now + rtt, "stream", (dst, node.name, node.addr,
                                                      out.request_id, out.data))
            case MemberChanged():
                m = out.member
                self.events.append(StatusEvent(self.now, node.name, m.node, m.status,
                                               m.incarnation))
            case JoinFinished():
                node.finished_joins.append(out)
            case _:
                pass

    def _deliver(self, kind: str, payload: Any) -> None:
        if kind == "timer":
            name, gen = payload
            node = self.nodes[name]
            if node.core is None or gen != node.timer_gen:
                return
            if self._deferred(node, kind, payload):
                return
            node.core.handle_timeout(self.now)
        elif kind == "packet":
            name, src, data = payload
            node = self.nodes[name]
            if node.core is None or self._deferred(node, kind, payload):
                return
            try:
                node.core.handle_packet(src, data, self.now)
            except RemoteProtocolError:
                pass  # counted by the core, as the adapter would
        elif kind == "stream":
            name, client, client_addr, request_id, data = payload
            node = self.nodes[name]
            client_node = self.nodes[client]
            if node.core is None or self._deferred(node, kind, payload):
                return
            try:
                reply = node.core.handle_stream(client_addr, data, self.now)
            except RemoteProtocolError:
                return
            node.stream_bytes_out += len(reply)
            self._after_input(node)
            if client_node.core is not None:
                self._push(self.now, "stream_reply", (client, request_id, reply,
                                                      client_node.core))
            return
        elif kind == "stream_reply":
            name, request_id, data, core = payload
            node = self.nodes[name]
            if node.core is None or node.core is not core:
                return  # the client crashed meanwhile
            if self._deferred(node, kind, payload):
                return
            try:
                node.core.handle_stream_reply(request_id, data, self.now)
            except RemoteProtocolError:
                pass
        elif kind == "stream_failed":
            name, request_id, reason = payload
            node = self.nodes[name]
            if node.core is None:
                return
            node.core.handle_stream_failed(request_id, reason, self.now)
        else:  # pragma: no cover - a bug in this file
            raise AssertionError(kind)
        self._after_input(node)

    def _deferred(self, node: SimNode, kind: str, payload: Any) -> bool:
        """A paused node handles nothing until it resumes: requeue for then."""
        if self.now < node.paused_until:
            self._push(node.paused_until, kind, payload)
            return True
        return False

    def run_until(self, t: float) -> None:
        """Process every event up to virtual time ``t``."""
        while self._heap and self._heap[0][0] <= t:
            at, _, kind, payload = heapq.heappop(self._heap)
            self.now = at
            self._deliver(kind, payload)
        self.now = t

    def run_for(self, dt: float) -> None:
        """Advance the virtual clock by ``dt`` seconds."""
        self.run_until(self.now + dt)

    def run_until_true(self, predicate: Callable[[], bool], timeout_s: float,
                       step_s: float = 0.05) -> float | None:
        """Advance until ``predicate()`` holds; return the virtual time it took, or
        ``None`` if ``timeout_s`` passed first."""
        start = self.now
        while self.now - start < timeout_s:
            if predicate():
                return self.now - start
            self.run_for(step_s)
        return self.now - start if predicate() else None

    # --- faults -----------------------------------------------------------------

    def crash(self, name: NodeId) -> None:
        """Kill a node: its memory is gone, packets to it vanish."""
        node = self.nodes[name]
        assert node.core is not None, f"{name} is already down"
        node.bytes_out_before_crash += node.core.statistics().bytes_out
        node.core = None

    def restart(self, name: NodeId, seeds: Iterable[NodeId] | None = None) -> None:
        """Start a crashed node again as a new process and join it through ``seeds``
        (default: every other node that is up)."""
        node = self.nodes[name]
        assert node.core is None, f"{name} is still running"
        node.core = self._new_core(node)
        peers = [self.nodes[s].addr for s in (seeds or [n for n in self.nodes if n != name
                                                        and self.nodes[n].up])]
        if peers:
            node.core.join(peers, self.now)
        self._after_input(node)

    def pause(self, name: NodeId, duration_s: float) -> None:
        """Freeze a node for ``duration_s`` (it keeps its memory)."""
        self.nodes[name].paused_until = self.now + duration_s

    def leave(self, name: NodeId) -> None:
        """Make a node leave gracefully, then stop it after ``leave_propagate_s``."""
        node = self.nodes[name]
        assert node.core is not None
        node.core.leave(self.now)
        self._after_input(node)
        self.run_for(self.config.leave_propagate_s)
        self.crash(name)

    def update_meta(self, name: NodeId, meta: Meta) -> None:
        """Change one node's announced metadata."""
        node = self.nodes[name]
        assert node.core is not None
        node.meta = meta
        node.core.update_meta(meta, self.now)
        self._after_input(node)

    # --- observations -----------------------------------------------------------

    def up_nodes(self) -> list[SimNode]:
        """Nodes that are running."""
        return [n for n in self.nodes.values() if n.core is not None]

    def status(self, observer: NodeId, node: NodeId) -> Status | None:
        """How ``observer`` sees ``node`` now (``None``: unknown or observer down)."""
        core = self.nodes[observer].core
        if core is None:
            return None
        view = core.member(node)
        return view.status if view else None

    def all_see(self, node: NodeId, status: Status, among: Iterable[NodeId] | None = None,
                ) -> bool:
        """True if every running node other than ``node`` sees it with ``status``."""
        names = among if among is not None else [n.name for n in self.up_nodes()]
        return all(self.status(o, node) == status for o in names if o != node)

    def converged(self) -> bool:
        """True if every running node sees exactly the running nodes as alive and
        every stopped node as not alive."""
        up = {n.name for n in self.up_nodes()}
        for obs in up:
            core = self.nodes[obs].core
            assert core is not None
            alive = {m.node for m in core.members() if m.status == Status.ALIVE}
            if alive != up:
                return False
        return True

    def deaths_of(self, nodes: Iterable[NodeId], since: float = 0.0) -> list[StatusEvent]:
        """Every time some node declared one of ``nodes`` dead after ``since``; for
        nodes that never crashed these are false deaths."""
        wanted = set(nodes)
        return [e for e in self.events
                if e.at >= since and e.status == Status.DEAD and e.node in wanted]

    def first_and_all(self, node: NodeId, status: Status, since: float,
                      observers: Iterable[NodeId]) -> tuple[float | None, float | None]:
        """Seconds after ``since`` until the first, and until every one, of
        ``observers`` saw ``node`` reach ``status``."""
        seen: dict[NodeId, float] = {}
        wanted = set(observers) - {node}
        for e in self.events:
            if e.at >= since and e.node == node and e.status == status \
                    and e.observer in wanted and e.observer not in seen:
                seen[e.observer] = e.at - since
        if not seen:
            return None, None
        first = min(seen.values())
        return first, (max(seen.values()) if set(seen) == wanted else None)

    def bytes_out(self, name: NodeId) -> int:
        """Gossip bytes this node has sent since the start: UDP payloads plus
        push-pull frames (requests it sent and replies it gave)."""
        node = self.nodes[name]
        current = node.core.statistics().bytes_out if node.core else 0
        return node.bytes_out_before_crash + current + node.stream_bytes_out
