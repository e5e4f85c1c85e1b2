"""An in-process network of Raft cores for tests, the simulator and benchmarks.

Modelled on etcd's ``raft_test.go`` ``network`` helper: messages are queued
and delivered until the network is quiet; links can be cut, nodes isolated,
crashed (memory lost, storage kept) and restarted from storage; a seeded
``random.Random`` drops, duplicates and reorders messages. Every node runs a
tiny replicated state machine (the list of entries it applied), so the checkers
can verify Raft's safety properties while a scenario runs:

* *election safety*: at most one leader per term;
* *log matching*: two logs that agree on (index, term) agree on everything before;
* *leader completeness*: every applied entry is in every later leader's log;
* *state machine safety*: no two nodes apply different entries at one index.

Violations raise :class:`InvariantViolation` at the step that causes them. No
I/O, no wall clock: same seed, same calls, same run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh import wire
from mesh.errors import MeshError, RemoteProtocolError
from mesh.raft.config import RaftConfig
from mesh.raft.core import RaftCore, ReadState, Role
from mesh.raft.messages import Entry, RaftMessage, from_wire
from mesh.raft.storage import MemoryStorage, RaftStorage, bootstrap
from mesh.types import NodeId


class InvariantViolation(AssertionError):
    """A Raft safety property failed; the message says which and where."""


class AppliedLog:
    """The test state machine: every applied entry as (index, term, data)."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, bytes]] = []

    @property
    def last_index(self) -> int:
        """Index of the last entry applied (0 if none)."""
        return self.entries[-1][0] if self.entries else 0

    def apply(self, e: Entry) -> None:
        """Apply one committed entry."""
        assert e.index > self.last_index, f"applied {e.index} after {self.last_index}"
        self.entries.append((e.index, e.term, e.data))

    def commands(self) -> list[bytes]:
        """The non-empty payloads applied, in order (commands and conf changes)."""
        return [d for _, _, d in self.entries if d]

    def encode(self) -> bytes:
        """Snapshot image."""
        return wire.pack_body([[i, t, d] for i, t, d in self.entries])

    @classmethod
    def decode(cls, data: bytes) -> AppliedLog:
        """Restore from :meth:`encode` output (empty bytes: empty machine)."""
        sm = cls()
        if data:
            sm.entries = [(i, t, d) for i, t, d in wire.unpack_body(data, 1 << 30)]
        return sm


@dataclass
class SimNode:
    """One simulated node: a core (None while crashed), its storage, its machine."""

    id: NodeId
    storage: RaftStorage
    core: RaftCore | None
    sm: AppliedLog = field(default_factory=AppliedLog)
    read_states: list[ReadState] = field(default_factory=list)


def _default_config() -> RaftConfig:
    return RaftConfig(election_ticks=10, heartbeat_ticks=1)


class Network:
    """N Raft cores wired together in memory.

    Args:
        ids: the initial voters (bootstrapped into their storages).
        seed: seeds the network's RNG, which also hands out per-node RNGs.
        config: every node's config (default: 10 election ticks, 1 heartbeat).
        storage_factory: ``(node_id) -> storage``, called at creation and at
            each restart; the default keeps one MemoryStorage per node.
        codec: pass every message through ``to_wire``/``from_wire``.
        learners: extra nodes bootstrapped as learners (added by config change
            entries after the voters).
    """

    def __init__(
        self,
        ids: Sequence[str],
        *,
        seed: int = 0,
        config: RaftConfig | None = None,
        storage_factory: Callable[[NodeId], RaftStorage] | None = None,
        codec: bool = False,
        bootstrap_ids: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config or _default_config()
        self.codec = codec
        self._mem: dict[NodeId, MemoryStorage] = {}
        self._factory = storage_factory or self._memory_storage
        self.nodes: dict[NodeId, SimNode] = {}
        self.in_flight: list[RaftMessage] = []
        self.drop_rate = 0.0
        """Probability that a sent message is lost."""
        self.dup_rate = 0.0
        """Probability that a sent message is delivered twice."""
        self.reorder = False
        """Deliver queued messages in random order instead of FIFO."""
        self._cut: set[tuple[NodeId, NodeId]] = set()
        self.msg_filter: Callable[[RaftMessage], bool] | None = None
        """Extra hook: return False to drop a message (etcd ``msgHook``)."""
        self.crash_after_send: set[NodeId] = set()
        """Nodes that crash at their next Ready whose messages may leave before it
        is persisted (a leader's), after sending them and before saving anything:
        a leader that dies during its fsync."""
        self.delivered = 0
        self.leaders_by_term: dict[int, NodeId] = {}
        self.applied_at: dict[int, tuple[int, bytes]] = {}
        """Global record of what was applied at each index, by any node."""
        voters = [NodeId(i) for i in ids]
        for nid in voters:
            storage = self._factory(nid)
            if bootstrap_ids:
                bootstrap(storage, voters)
            self.nodes[nid] = SimNode(nid, storage, None)
            self._start(nid)

    # ------------------------------------------------------------------ lifecycle

    def _memory_storage(self, nid: NodeId) -> RaftStorage:
        return self._mem.setdefault(nid, MemoryStorage())

    def _start(self, nid: NodeId) -> None:
        node = self.nodes[nid]
        snap = node.storage.snapshot()
        node.sm = AppliedLog.decode(snap.data)
        self._check_snapshot_entries(nid, node.sm)
        node.core = RaftCore(
            self.config, nid, node.storage, random.Random(self.rng.getrandbits(64))
        )
        self.process(nid)

    def add_node(self, nid: str) -> SimNode:
        """A fresh node with empty storage (to be added by a config change)."""
        node_id = NodeId(nid)
        assert node_id not in self.nodes
        self.nodes[node_id] = SimNode(node_id, self._factory(node_id), None)
        self._start(node_id)
        return self.nodes[node_id]

    def crash(self, nid: str) -> None:
        """Lose the node's memory (core, state machine, unsent output); keep storage."""
        node = self.nodes[NodeId(nid)]
        node.core = None
        node.sm = AppliedLog()
        node.read_states = []

    def restart(self, nid: str) -> None:
        """Rebuild a crashed node from its storage (via the storage factory)."""
        node_id = NodeId(nid)
        node = self.nodes[node_id]
        assert node.core is None, f"{nid} is running"
        close = getattr(node.storage, "close", None)
        if close is not None:
            close()
        node.storage = self._factory(node_id)
        self._start(node_id)

    def close(self) -> None:
        """Close every storage that has a ``close()`` (file-backed ones)."""
        for node in self.nodes.values():
            close = getattr(node.storage, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def core(self, nid: str) -> RaftCore:
        """The running core of ``nid``."""
        core = self.nodes[NodeId(nid)].core
        assert core is not None, f"{nid} is crashed"
        return core

    def alive(self) -> list[NodeId]:
        """Running nodes, sorted."""
        return sorted(n for n, node in self.nodes.items() if node.core is not None)

    # ------------------------------------------------------------------ faults

    def cut(self, a: str, b: str) -> None:
        """Drop everything between ``a`` and ``b`` both ways."""
        self._cut.add((NodeId(a), NodeId(b)))
        self._cut.add((NodeId(b), NodeId(a)))

    def cut_one_way(self, src: str, dst: str) -> None:
        """Drop everything from ``src`` to ``dst``."""
        self._cut.add((NodeId(src), NodeId(dst)))

    def isolate(self, nid: str) -> None:
        """Cut ``nid`` off from every other node."""
        for other in self.nodes:
            if other != nid:
                self.cut(nid, other)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between different groups."""
        sets = [set(g) for g in groups]
        for i, g1 in enumerate(sets):
            for g2 in sets[i + 1 :]:
                for a in g1:
                    for b in g2:
                        self.cut(a, b)

    def recover(self) -> None:
        """Heal every cut and stop dropping, duplicating and reordering."""
        self._cut.clear()
        self.drop_rate = 0.0
        self.dup_rate = 0.0
        self.reorder = False
        self.msg_filter = None

    def _link_up(self, m: RaftMessage) -> bool:
        if (m.src, m.dst) in self._cut:
            return False
        dst = self.nodes.get(m.dst)
        return dst is not None and dst.core is not None

    # ------------------------------------------------------------------ driving

    def process(self, nid: str) -> None:
        """Handle every Ready of ``nid``: persist, send, apply, advance."""
        node = self.nodes[NodeId(nid)]
        core = node.core
        assert core is not None
        while True:
            rd = core.ready()
            if rd is None:
                break
            if rd.send_before_persist and node.id in self.crash_after_send:
                self.crash_after_send.discard(node.id)
                for m in rd.messages:
                    self._send(m)
                self.crash(nid)
                return
            node.storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
            for m in rd.messages:
                self._send(m)
            if rd.snapshot is not None:
                node.sm = AppliedLog.decode(rd.snapshot.data)
                self._check_snapshot_entries(node.id, node.sm)
            for e in rd.committed_entries:
                self._check_apply(node.id, e)
                node.sm.apply(e)
            node.read_states.extend(rd.read_states)
            core.advance(rd)
            if core.role is Role.LEADER:
                self._check_leader(node.id, core)

    def _send(self, m: RaftMessage) -> None:
        if self.drop_rate and self.rng.random() < self.drop_rate:
            return
        if self.msg_filter is not None and not self.msg_filter(m):
            return
        if self.codec:
            m = from_wire(m.to_wire())
        self.in_flight.append(m)
        if self.dup_rate and self.rng.random() < self.dup_rate:
            self.in_flight.append(m)

    def deliver_one(self) -> bool:
        """Deliver one queued message (FIFO, or random with ``reorder``)."""
        if not self.in_flight:
            return False
        i = self.rng.randrange(len(self.in_flight)) if self.reorder else 0
        m = self.in_flight.pop(i)
        if not self._link_up(m):
            return True
        self.delivered += 1
        core = self.nodes[m.dst].core
        assert core is not None
        core.step(m)
        self.process(m.dst)
        return True

    def deliver_all(self, max_msgs: int = 100_000) -> int:
        """Deliver until no message is queued; returns how many were handled."""
        n = 0
        while self.in_flight:
            assert n < max_msgs, "network did not go quiet (livelock?)"
            self.deliver_one()
            n += 1
        return n

    def tick(self, ticks: int = 1, nodes: Iterable[str] | None = None) -> None:
        """Tick the given (default: all running) nodes, delivering after each tick."""
        for _ in range(ticks):
            for nid in sorted(nodes) if nodes is not None else self.alive():
                node = self.nodes[NodeId(nid)]
                if node.core is not None:
                    node.core.tick()
                    self.process(nid)
            self.deliver_all()

    def campaign(self, nid: str) -> None:
        """Make ``nid`` start an election and deliver until quiet."""
        self.core(nid).campaign()
        self.process(nid)
        self.deliver_all()

    def leader(self) -> NodeId | None:
        """The running leader with the highest term, if any."""
        best: tuple[int, NodeId] | None = None
        for nid in self.alive():
            core = self.core(nid)
            if core.role is Role.LEADER and (best is None or core.term > best[0]):
                best = (core.term, nid)
        return best[1] if best else None

    def wait_leader(self, max_ticks: int = 200) -> NodeId:
        """Tick until some running node leads and a quorum agrees on it."""
        for _ in range(max_ticks):
            lead = self.leader()
            if lead is not None:
                followers = [n for n in self.alive() if self.core(n).leader == lead]
                if len(followers) >= len(self.core(lead).conf_state.voters) // 2 + 1:
                    return lead
            self.tick()
        raise AssertionError(f"no leader after {max_ticks} ticks")

    def propose(self, nid: str, data: bytes) -> Any:
        """Propose on ``nid`` and process its Ready (without delivering)."""
        eid = self.core(nid).propose(data)
        self.process(nid)
        return eid

    def propose_until_committed(self, data: bytes, max_ticks: int = 300) -> NodeId:
        """Keep proposing ``data`` on whoever leads until a quorum applied it.

        Returns the leader that got it committed.
        """
        for _ in range(max_ticks):
            lead = self.leader()
            if lead is not None:
                try:
                    eid = self.propose(lead, data)
                except MeshError:
                    eid = None
                for _ in range(30):
                    self.tick()
                    if eid is not None and self._applied_by_quorum(eid.index, eid.term):
                        return lead
            else:
                self.tick()
        raise AssertionError(f"{data!r} not committed after {max_ticks} rounds")

    def _applied_by_quorum(self, index: int, term: int) -> bool:
        return self.applied_at.get(index, (None, b""))[0] == term

    def compact(self, nid: str, keep: int = 0) -> int:
        """Snapshot ``nid``'s state machine at its applied index and compact its
        log, keeping ``keep`` entries before that index. Returns the index."""
        node = self.nodes[NodeId(nid)]
        core = self.core(nid)
        index = core.applied_index
        assert node.sm.last_index == index or index == node.storage.snapshot().meta.index
        node.storage.create_snapshot(index, core.conf_state, node.sm.encode())
        if index - keep > node.storage.first_index() - 1:
            node.storage.compact(index - keep)
        return index

    # ------------------------------------------------------------------ invariants

    def _check_apply(self, nid: NodeId, e: Entry) -> None:
        seen = self.applied_at.get(e.index)
        if seen is None:
            self.applied_at[e.index] = (e.term, e.data)
        elif seen != (e.term, e.data):
            raise InvariantViolation(
                f"state machine safety: {nid} applied {(e.term, e.data)!r} at {e.index}, "
                f"another node applied {seen!r}"
            )

    def _check_snapshot_entries(self, nid: NodeId, sm: AppliedLog) -> None:
        for i, t, d in sm.entries:
            self._check_apply(nid, Entry(t, i, d))

    def _check_leader(self, nid: NodeId, core: RaftCore) -> None:
        other = self.leaders_by_term.get(core.term)
        if other == nid:
            return
        if other is not None:
            raise InvariantViolation(f"election safety: {other} and {nid} lead term {core.term}")
        self.leaders_by_term[core.term] = nid
        # Leader completeness: everything ever applied is in this leader's log.
        log = core.log
        first = log.first_index()
        for index, (term, _) in self.applied_at.items():
            if index < first:
                continue  # covered by its snapshot, itself committed state
            if index > log.last_index() or log.term_or_zero(index) != term:
                raise InvariantViolation(
                    f"leader completeness: leader {nid} of term {core.term} lacks applied "
                    f"entry {index} of term {term}"
                )

    def check_log_matching(self) -> None:
        """Pairwise log matching over the running nodes (raises on violation)."""
        logs: dict[NodeId, dict[int, Entry]] = {}
        for nid in self.alive():
            log = self.core(nid).log
            first, last = log.first_index(), log.last_index()
            logs[nid] = (
                {e.index: e for e in log.slice(first, last + 1, None)} if last >= first else {}
            )
        ids = sorted(logs)
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                la, lb = logs[a], logs[b]
                common = sorted(set(la) & set(lb), reverse=True)
                agreed = False
                for index in common:
                    if la[index].term == lb[index].term:
                        agreed = True
                    if agreed and la[index] != lb[index]:
                        raise InvariantViolation(
                            f"log matching: {a} and {b} agree on a later entry but differ at "
                            f"{index}: {la[index]!r} vs {lb[index]!r}"
                        )

    def check_converged(self) -> None:
        """Every running node applied the same prefix up to the leader's commit."""
        lead = self.leader()
        assert lead is not None
        commit = self.core(lead).commit_index
        for nid in self.alive():
            core = self.core(nid)
            assert core.applied_index == commit, f"{nid} applied {core.applied_index} != {commit}"


def fuzz_decode(data: bytes) -> RaftMessage | None:
    """``from_wire`` that returns None on RemoteProtocolError (for fuzzers)."""
    try:
        return from_wire(data)
    except RemoteProtocolError:
        return None
