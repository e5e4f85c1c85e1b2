"""Jepsen-style check of the real Raft stack: KvPut/KvDelete proposals and ReadIndex
reads from concurrent clients under drops, duplicates, reordering, partitions and
crashes, recorded as a history and checked with the WGL linearizability checker.

The cluster is :class:`mesh.raft.testing.Network` (real ``RaftCore`` instances,
which also check Raft's safety invariants at every step). Each node's applied log
is replayed into a :class:`~mesh.raft.state.MeshState` replica, from which reads
are served once the node has applied the ``ReadState`` index. Time is an event
counter bumped at every invocation, answer and simulation step, so real-time
order in the history is exact.

Client rules (what a client can actually know):

* a write is acknowledged when its proposer applies the entry at its
  ``EntryId`` with the proposal's term; it is *known lost* (dropped from the
  history) when a different term's entry is applied at that index or
  ``propose`` refuses it; if the proposer crashes or the client times out,
  its outcome is unknown;
* a read is answered when its node has a ``ReadState`` for the read's context
  and has applied up to its index; a read that is refused, lost or timed out
  is dropped (it changed nothing).

``MESH_SIM_SEED=n`` reruns one seed.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest

from mesh.errors import MeshError
from mesh.raft.core import RaftCore
from mesh.raft.messages import Entry
from mesh.raft.state import KvDelete, KvPut, MeshState
from mesh.raft.testing import Network
from mesh.testing.linearizability import (
    ClientId,
    History,
    Operation,
    OpKind,
    Outcome,
    check_kv,
)
from mesh.types import NodeId

NODES = ("n1", "n2", "n3")
KEYS = ("x", "y")
CLIENTS = 5
STEPS = 3000
SETTLE_STEPS = 400
OP_TIMEOUT_STEPS = 60


@dataclass
class _Pending:
    handle: int
    client: ClientId
    node: NodeId
    core: RaftCore
    """The proposer's/reader's core at invocation: a crash replaces it."""
    started: int
    key: str
    term: int = 0
    index: int = 0
    command: bytes = b""
    context: bytes = b""
    read_index: int | None = None


class _Run:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed ^ 0x5EED)
        self.net = Network(NODES, seed=seed)
        self.history = History()
        self.clock = 0
        self.step_no = 0
        self.pending: dict[ClientId, _Pending] = {}
        self.commands: set[bytes] = set()
        self.replicas: dict[NodeId, tuple[object, MeshState]] = {}
        self.counter = 0
        self.acked_writes = 0
        self.answered_reads = 0

    # ------------------------------------------------------------ plumbing

    def now(self) -> float:
        self.clock += 1
        return float(self.clock)

    def replica(self, nid: NodeId) -> MeshState:
        """``nid``'s applied log replayed into a MeshState (rebuilt after a crash)."""
        node = self.net.nodes[nid]
        rep = self.replicas.get(nid)
        if rep is None or rep[0] is not node.sm or rep[1].applied_index > node.sm.last_index:
            rep = (node.sm, MeshState())
            self.replicas[nid] = rep
        state = rep[1]
        for index, term, data in node.sm.entries[state.applied_index :]:
            assert index == state.applied_index + 1, "no compaction in this test"
            # Bootstrap membership entries are not commands; feed them as no-ops.
            state.apply(Entry(term, index, data if data in self.commands else b""))
        return state

    def faults(self) -> None:
        net, rng = self.net, self.rng
        r = rng.random()
        alive = net.alive()
        if r < 0.008 and len(alive) == len(NODES):
            net.crash(rng.choice(alive))
        elif r < 0.03 and len(alive) < len(NODES):
            net.restart(rng.choice(sorted(set(net.nodes) - set(alive))))
        elif r < 0.04:
            a = rng.choice(NODES)
            net.partition([a], [n for n in NODES if n != a])
        elif r < 0.047:
            net.cut(*rng.sample(NODES, 2))
        elif r < 0.07:
            self.heal()

    def heal(self) -> None:
        self.net.recover()
        self.net.drop_rate = 0.05
        self.net.dup_rate = 0.02
        self.net.reorder = True

    def advance_network(self) -> None:
        for _ in range(self.rng.randint(0, 8)):
            if not self.net.deliver_one():
                break
        if self.step_no % 2 == 0:
            for nid in self.net.alive():
                self.net.core(nid).tick()
                self.net.process(nid)

    # ------------------------------------------------------------ clients

    def invoke(self, client: ClientId, kind: OpKind | None = None, key: str | None = None) -> None:
        rng, net = self.rng, self.net
        alive = net.alive()
        if not alive:
            return
        if kind is None:
            kind = rng.choices([OpKind.PUT, OpKind.DELETE, OpKind.GET], [40, 15, 45])[0]
        if key is None:
            key = rng.choice(KEYS)
        self.counter += 1
        if kind is OpKind.GET:
            nid = NodeId(rng.choice(alive))
            context = f"read-{self.counter}".encode()
            handle = self.history.invoke(client, kind, key, None, self.now())
            core = net.core(nid)
            try:
                core.read_index(context)
            except MeshError:
                self.history.fail(handle)
                return
            net.process(nid)
            self.pending[client] = _Pending(
                handle, client, nid, core, self.step_no, key, context=context
            )
            return
        lead = net.leader()
        nid = lead if lead is not None and rng.random() < 0.85 else NodeId(rng.choice(alive))
        request_id = f"req-{self.counter}".encode()
        if kind is OpKind.PUT:
            value = f"v{self.counter}".encode()
            command = KvPut(key, value, request_id=request_id).encode()
            handle = self.history.invoke(client, kind, key, value, self.now())
        else:
            command = KvDelete(key, request_id=request_id).encode()
            handle = self.history.invoke(client, kind, key, None, self.now())
        self.commands.add(command)
        core = net.core(nid)
        try:
            eid = net.propose(nid, command)
        except MeshError:
            self.history.fail(handle)  # refused: nothing was appended
            return
        self.pending[client] = _Pending(
            handle, client, nid, core, self.step_no, key, eid.term, eid.index, command
        )

    def poll(self, p: _Pending) -> bool:
        """Settle ``p`` if its client can know the answer now; True when settled."""
        node = self.net.nodes[p.node]
        if node.core is not p.core or self.step_no - p.started > OP_TIMEOUT_STEPS:
            if p.context:
                self.history.fail(p.handle)  # an unanswered read changed nothing
            return True  # a write stays open: unknown outcome
        if p.context:
            if p.read_index is None:
                for rs in node.read_states:
                    if rs.context == p.context:
                        node.read_states.remove(rs)
                        p.read_index = rs.index
                        break
            if p.read_index is None or p.core.applied_index < p.read_index:
                return False
            entry = self.replica(p.node).get(p.key)
            self.history.complete(p.handle, entry.value if entry else None, self.now())
            self.answered_reads += 1
            return True
        seen = self.net.applied_at.get(p.index)
        if seen is None:
            return False
        if seen[0] != p.term:
            self.history.fail(p.handle)  # another term's entry won the index
            return True
        assert seen[1] == p.command
        if p.core.applied_index < p.index:
            return False
        self.history.complete(p.handle, None, self.now())
        self.acked_writes += 1
        return True

    def poll_all(self) -> None:
        for client in sorted(self.pending):
            if self.poll(self.pending[client]):
                del self.pending[client]

    # ------------------------------------------------------------ the run

    def run(self) -> list[Operation]:
        self.net.wait_leader()
        self.heal()
        clients = [ClientId(f"c{i}") for i in range(CLIENTS)]
        for self.step_no in range(STEPS):
            self.now()
            self.faults()
            for client in clients:
                if client not in self.pending and self.rng.random() < 0.3:
                    self.invoke(client)
            self.advance_network()
            self.poll_all()
        # Heal, bring everyone back and let open operations settle.
        self.net.recover()
        for nid in sorted(set(self.net.nodes) - set(self.net.alive())):
            self.net.restart(nid)
        for self.step_no in range(STEPS, STEPS + SETTLE_STEPS):
            self.now()
            if not self.pending:
                break
            self.advance_network()
            self.poll_all()
        # Final reads of every key, through the leader, on a quiet network.
        self.net.wait_leader()
        final = ClientId("final")
        for key in KEYS:
            answered = self.answered_reads
            for _ in range(200):
                self.step_no += 1
                if final not in self.pending:
                    if self.answered_reads > answered:
                        break
                    self.invoke(final, OpKind.GET, key)
                self.advance_network()
                self.poll_all()
            assert self.answered_reads > answered, f"final read of {key!r} never answered"
        return self.history.operations()


def _seeds() -> list[int]:
    env = os.environ.get("MESH_SIM_SEED")
    return [int(env)] if env else list(range(1, 9))


@pytest.mark.parametrize("seed", _seeds())
def test_raft_kv_history_is_linearizable(seed: int) -> None:
    run = _Run(seed)
    ops = run.run()
    # The run must have exercised something worth checking.
    assert run.acked_writes >= 20, run.acked_writes
    assert run.answered_reads >= 20, run.answered_reads
    result = check_kv(ops)
    assert result.outcome is Outcome.OK, f"seed {seed}: {result.describe()}"
    # Negative control on the same history: a read of a value nobody wrote fails.
    reads = [i for i, op in enumerate(ops) if op.kind is OpKind.GET and op.ret is not None]
    i = reads[len(reads) // 2]
    r = ops[i]
    ops[i] = Operation(r.client, r.kind, r.key, r.input, b"never written", r.invoke, r.ret)
    assert check_kv(ops).outcome is Outcome.FAILED


class _LocalReads(_Run):
    """A broken client: answers a read from its node's replica at once, skipping
    ReadIndex (a follower, or a deposed leader, may be behind)."""

    def poll(self, p: _Pending) -> bool:
        if p.context and self.net.nodes[p.node].core is p.core:
            entry = self.replica(p.node).get(p.key)
            self.history.complete(p.handle, entry.value if entry else None, self.now())
            self.answered_reads += 1
            return True
        return super().poll(p)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reads_that_skip_read_index_are_caught(seed: int) -> None:
    result = check_kv(_LocalReads(seed).run())
    assert result.outcome is Outcome.FAILED
    assert result.culprit is not None
    assert result.culprit.kind is OpKind.GET
