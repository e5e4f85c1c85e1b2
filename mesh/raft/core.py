"""RaftCore: a deterministic, sans-I/O Raft state machine in etcd's RawNode shape.

Theory of operation
===================

This module is the whole Raft protocol and nothing else. It never touches a
clock, a socket, a disk or the global RNG: time arrives as :meth:`RaftCore.tick`
calls (etcd logical ticks), peer messages through :meth:`RaftCore.step`, client
requests through :meth:`RaftCore.propose`, :meth:`RaftCore.propose_conf_change`,
:meth:`RaftCore.read_index` and :meth:`RaftCore.transfer_leadership`. Everything
the outside world must do comes back as one :class:`Ready` at a time, which the
caller persists, sends and applies before calling :meth:`RaftCore.advance`.
Given the same storage, the same RNG seed and the same calls, a core produces
the same Readies, byte for byte.

Rule 1 (as in h11): every decision that depends on what Raft means lives here;
the adapter only moves bytes and calls methods.

What is implemented, by section of the Raft paper (Ongaro & Ousterhout 2014,
"In Search of an Understandable Consensus Algorithm") and the dissertation
(Ongaro 2014, "Consensus: Bridging Theory and Practice"):

* §5.1 terms. Every message carries one; :meth:`RaftCore.step` handles the
  term first (a higher term makes us a follower, a lower one is dropped or
  answered so the stale sender learns the new term), then dispatches on role
  (etcd ``stepLeader/stepCandidate/stepFollower``).
* §5.2 leader election with randomized timeouts drawn from the injected
  ``random.Random`` in ``[election_ticks, 2 * election_ticks)``.
* §5.3 log replication: AppendEntries with the (prev index, prev term)
  consistency check; per follower a *progress* in one of three states (etcd
  ``tracker``): PROBE (one message per heartbeat until the match point is
  found), REPLICATE (optimistic pipelining, up to ``max_inflight_msgs`` /
  ``max_inflight_bytes`` in flight) and SNAPSHOT. Batching: proposals only
  append to the leader's log; one broadcast per :meth:`RaftCore.ready` sends
  them, so N proposals cost one message per follower and one fsync per node.
  Rejections carry a (hint index, hint term) pair so the leader skips a whole
  term per round trip (fast log backtracking, dissertation §5.3 / etcd
  ``findConflictByTerm``).
* §5.4.1 election restriction (vote only for an up-to-date log) and §5.4.2 /
  Figure 8: a leader commits by counting replicas only for entries of its own
  term; it appends an empty entry when elected so that happens promptly. The
  leader counts *itself* only once its own entries are persisted (reported
  through :meth:`RaftCore.advance`), so it may safely write its log in
  parallel with its followers (dissertation §10.2.1).
* §5.5 / Figure 2 persistence: term, vote and new entries are in the Ready's
  ``hard_state``/``entries`` and must be durable before its messages leave.
* §6 / dissertation §4.1 membership changes, one server at a time: ADD_VOTER,
  ADD_LEARNER, PROMOTE, REMOVE as CONF_CHANGE entries. A new change is refused
  until the previous one is applied, and a new leader refuses changes until
  its first entry is applied (the fix for the single-server bug described on
  raft-dev in 2015). Changes take effect when applied (as in etcd); quorum
  math lives in :mod:`mesh.raft.quorum` and already handles joint configs.
* Learners (dissertation §4.2.1): receive the log, never campaign and never
  count for a quorum.
* §7 / dissertation §5 log compaction: the application snapshots through
  storage; a follower behind the compaction point receives the snapshot in
  ``snapshot_chunk_bytes`` chunks (InstallSnapshot), stop-and-wait, resent
  from the last acknowledged offset when a chunk goes unanswered.
* Dissertation §3.10 leadership transfer: the leader catches the target up,
  then sends TimeoutNow; proposals are dropped meanwhile; aborted after one
  election timeout.
* Dissertation §6.4 ReadIndex: linearizable reads without writing the log;
  the leader records its commit index, confirms leadership with a heartbeat
  round carrying the request's context, and answers once a quorum echoes it.
  Followers forward requests to the leader.
* Dissertation §9.6 PreVote and §6.2 CheckQuorum: a would-be candidate first
  asks whether it could win without bumping its term; a leader that has not
  heard from a quorum for an election timeout steps down, and followers that
  heard from a leader within the timeout ignore vote requests (the lease),
  unless the request comes from a leadership transfer.

Determinism traps avoided: peers are always iterated in sorted order; the only
randomness is the injected RNG; no ``hash()``.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.errors import LocalProtocolError, NotLeader, ProposalDropped, RemoteProtocolError
from mesh.raft.config import RaftConfig
from mesh.raft.log import RaftLog
from mesh.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    RaftMessage,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    TimeoutNow,
)
from mesh.raft.quorum import JointConfig, VoteResult
from mesh.raft.storage import Compacted, RaftStorage, Unavailable
from mesh.types import NodeId

LOGGER = logging.getLogger(__name__)


class Role(enum.Enum):
    """A node's role in its current term."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class ProgressState(enum.Enum):
    """How a leader replicates to one follower (etcd ``tracker.StateType``)."""

    PROBE = "probe"
    """Match point unknown: one AppendEntries per heartbeat until it is found."""
    REPLICATE = "replicate"
    """Match point known: stream entries optimistically within the window."""
    SNAPSHOT = "snapshot"
    """Sending a snapshot; no entries until it is installed."""


class _Campaign(enum.Enum):
    PRE_ELECTION = "pre-election"
    ELECTION = "election"
    TRANSFER = "transfer"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth reporting when it changes (not persisted)."""

    leader: NodeId | None
    """Who this node believes leads (None: unknown)."""
    role: Role
    """This node's role."""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex answer: reads for ``context`` are linearizable once the
    local state machine has applied ``index``."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class EntryId:
    """Where a proposal landed: it committed iff the entry applied at ``index``
    has ``term``; if another term's entry is applied there, it was lost."""

    term: int
    index: int


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the caller must do, in order, before :meth:`RaftCore.advance`.

    See :meth:`RaftCore.ready` for the ordering contract.
    """

    soft_state: SoftState | None
    """New leader/role, if changed since the last Ready (report only)."""
    hard_state: HardState | None
    """New term/vote/commit to persist, if changed."""
    entries: tuple[Entry, ...]
    """Entries to append to storage (they replace any from their first index)."""
    snapshot: Snapshot | None
    """A snapshot received from the leader: persist it, and load it into the
    state machine before applying ``committed_entries``."""
    messages: tuple[RaftMessage, ...]
    """Messages to send once the above is durable."""
    committed_entries: tuple[Entry, ...]
    """Entries to apply to the state machine, in order. CONF_CHANGE entries are
    applied to the membership by :meth:`RaftCore.advance` itself."""
    read_states: tuple[ReadState, ...]
    """Answered ReadIndex requests."""
    must_sync: bool
    """Whether the write must be fsynced (term, vote or entries changed); a
    commit-index-only change may be written lazily."""
    send_before_persist: bool = False
    """Whether ``messages`` may leave before (or while) the write is persisted:
    true on a leader whose term and vote are already durable, so every message
    is the leader's own (AppendEntries, heartbeats, snapshots, answers) and
    none promises anything about this Ready's writes (dissertation §10.2.1:
    the leader writes its log in parallel with replicating it; it counts
    itself toward a commit only after :meth:`RaftCore.advance`)."""


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A leader's view of one peer's replication."""

    match: int
    next: int
    state: ProgressState
    recent_active: bool
    is_learner: bool


@dataclass(frozen=True, slots=True)
class RaftStatus:
    """A snapshot of a core's state for ``meshctl raft status`` and metrics."""

    id: NodeId
    term: int
    vote: NodeId | None
    leader: NodeId | None
    role: Role
    commit_index: int
    applied_index: int
    last_index: int
    first_index: int
    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...]
    lead_transferee: NodeId | None
    progress: dict[NodeId, PeerStatus]
    """Per peer (including this node) when leader; empty otherwise."""


class _Inflights:
    """Sliding window of in-flight AppendEntries to one follower (etcd ``Inflights``)."""

    __slots__ = ("_q", "_bytes", "_max_count", "_max_bytes")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self._q: deque[tuple[int, int]] = deque()
        self._bytes = 0
        self._max_count = max_count
        self._max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._q)

    def add(self, index: int, size: int) -> None:
        self._q.append((index, size))
        self._bytes += size

    def free_le(self, index: int) -> None:
        while self._q and self._q[0][0] <= index:
            self._bytes -= self._q.popleft()[1]

    def free_first_one(self) -> None:
        if self._q:
            self._bytes -= self._q.popleft()[1]

    def full(self) -> bool:
        return len(self._q) >= self._max_count or (0 < self._max_bytes <= self._bytes)

    def reset(self) -> None:
        self._q.clear()
        self._bytes = 0


class _Progress:
    """A leader's view of one follower (etcd ``tracker.Progress``)."""

    __slots__ = (
        "match",
        "next",
        "state",
        "paused",
        "pending_snapshot",
        "recent_active",
        "is_learner",
        "inflights",
        "snapshot",
        "snapshot_offset",
        "snapshot_stall_ticks",
    )

    def __init__(self, next_index: int, inflights: _Inflights, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.paused = False
        """PROBE: a probe is outstanding; wait for its answer or a heartbeat."""
        self.pending_snapshot = 0
        self.recent_active = True
        self.is_learner = is_learner
        self.inflights = inflights
        self.snapshot: Snapshot | None = None
        """The snapshot being sent (SNAPSHOT state)."""
        self.snapshot_offset = 0
        """Next byte of ``snapshot.data`` to send (acknowledged so far)."""
        self.snapshot_stall_ticks = 0

    def _reset_state(self, state: ProgressState) -> None:
        self.paused = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()
        self.snapshot = None
        self.snapshot_offset = 0
        self.snapshot_stall_ticks = 0

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot.meta.index
        self.snapshot = snapshot

    def maybe_update(self, index: int) -> bool:
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        if self.state is ProgressState.REPLICATE:
            if rejected < self.match or (rejected == self.match and match_hint >= self.match):
                return False  # stale rejection of an entry already matched
            if rejected == self.match:
                # The follower no longer has an entry it acknowledged: it was restored
                # from an old copy of its data dir. Go back to what it has, or it would
                # be probed at the same index forever (the leader's commit index never
                # goes back, so this only costs resending entries).
                self.match = match_hint
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale: answers an older probe
        if match_hint < self.match:
            self.match = match_hint  # lost acknowledged entries (see above)
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.paused
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def sent_entries(self, entries: list[Entry]) -> None:
        if self.state is ProgressState.REPLICATE:
            if entries:
                self.next = entries[-1].index + 1
                self.inflights.add(entries[-1].index, sum(e.size for e in entries))
        elif self.state is ProgressState.PROBE:
            self.paused = True


class _ReadRequest:
    __slots__ = ("index", "context", "origin", "acks")

    def __init__(self, index: int, context: bytes, origin: NodeId | None) -> None:
        self.index = index
        self.context = context
        self.origin = origin
        """Follower that forwarded it, or None for a local request."""
        self.acks: dict[NodeId, bool] = {}


class _SnapshotReceive:
    __slots__ = ("src", "term", "meta_key", "total", "data")

    def __init__(self, m: InstallSnapshot) -> None:
        self.src = m.src
        self.term = m.term
        self.meta_key = (m.meta.index, m.meta.term)
        self.total = m.total_bytes
        self.data = bytearray()

    def matches(self, m: InstallSnapshot) -> bool:
        return (m.src, m.term, (m.meta.index, m.meta.term), m.total_bytes) == (
            self.src,
            self.term,
            self.meta_key,
            self.total,
        )


class RaftCore:
    """One Raft node's protocol state machine (etcd ``RawNode``). Not thread-safe.

    Args:
        config: timing and limits.
        node_id: this node's id.
        storage: durable state; read here, written by the caller.
        rng: the only source of randomness (election timeouts).
        applied: highest index the caller's state machine already reflects on a
            restart; ``None`` means the storage snapshot's index (the caller
            loads ``storage.snapshot()`` into its state machine first).

    Raises:
        LocalProtocolError: the storage's state is inconsistent with ``applied``.
    """

    def __init__(
        self,
        config: RaftConfig,
        node_id: NodeId,
        storage: RaftStorage,
        rng: random.Random,
        applied: int | None = None,
    ) -> None:
        self._cfg = config
        self._id = node_id
        self._rng = rng
        self._log = RaftLog(storage)
        hard_state, conf_state = storage.initial_state()
        snap_index = storage.snapshot().meta.index
        self._voters: frozenset[NodeId] = frozenset(conf_state.voters)
        self._learners: frozenset[NodeId] = frozenset(conf_state.learners)
        self._quorum = JointConfig(self._voters)
        self._term = hard_state.term
        self._vote = hard_state.vote
        self._lead: NodeId | None = None
        self._role = Role.FOLLOWER
        self._prs: dict[NodeId, _Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        self._msgs: list[RaftMessage] = []
        self._read_states: list[ReadState] = []
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = config.election_ticks
        self._lead_transferee: NodeId | None = None
        self._pending_conf_index = 0
        self._campaigns_held = False
        """Set from outside while the group no longer names this node (see
        :meth:`hold_campaigns`)."""
        self._uncommitted_bytes = 0
        self._bcast_entries = False
        self._bcast_commit = False
        self._bcast_read = False
        self._reads: dict[bytes, _ReadRequest] = {}
        self._read_queue: deque[bytes] = deque()
        self._pending_reads: list[tuple[bytes, NodeId | None]] = []
        self._snap_recv: _SnapshotReceive | None = None
        self._ready_outstanding = False

        start_applied = snap_index if applied is None else max(applied, snap_index)
        last = self._log.last_index()
        if hard_state.commit > last or start_applied > max(hard_state.commit, snap_index):
            raise LocalProtocolError(
                f"storage holds entries up to {last} and commit {hard_state.commit}, but "
                f"applied={start_applied}; the data directory does not match the state machine"
            )
        self._log.committed = max(hard_state.commit, snap_index, self._log.committed)
        # The membership in storage is the snapshot's; entries between the
        # compaction point and the snapshot are already reflected in it.
        self._log.applied = max(self._log.applied, snap_index)
        if start_applied > self._log.applied:
            # Conf changes the state machine already applied before the restart.
            for e in self._log.slice(self._log.applied + 1, start_applied + 1, None):
                if e.kind is EntryKind.CONF_CHANGE:
                    self._apply_conf_change(ConfChange.decode(e.data), quiet=True)
            self._log.applied = start_applied
        self._prev_soft = SoftState(None, Role.FOLLOWER)
        self._prev_hard = hard_state
        self._become_follower(self._term, None)
        LOGGER.info(
            "raft_start node=%s term=%s commit=%s applied=%s last=%s voters=%s learners=%s",
            self._id,
            self._term,
            self._log.committed,
            self._log.applied,
            last,
            ",".join(sorted(self._voters)),
            ",".join(sorted(self._learners)),
        )

    # ================================================================== properties

    @property
    def id(self) -> NodeId:
        """This node's id."""
        return self._id

    @property
    def config(self) -> RaftConfig:
        """The configuration this core runs with (the adapter reads its timings)."""
        return self._cfg

    @property
    def term(self) -> int:
        """Current term."""
        return self._term

    @property
    def role(self) -> Role:
        """Current role."""
        return self._role

    @property
    def leader(self) -> NodeId | None:
        """Who this node believes leads, if anyone."""
        return self._lead

    @property
    def is_leader(self) -> bool:
        """Whether this node is the leader."""
        return self._role is Role.LEADER

    @property
    def commit_index(self) -> int:
        """Highest committed index known here."""
        return self._log.committed

    @property
    def applied_index(self) -> int:
        """Highest index applied (as reported through advance)."""
        return self._log.applied

    @property
    def last_index(self) -> int:
        """Index of the last log entry (persisted or not)."""
        return self._log.last_index()

    @property
    def conf_state(self) -> ConfState:
        """Membership as of ``applied_index``; pass it to ``create_snapshot``."""
        return ConfState.of(self._voters, self._learners)

    @property
    def log(self) -> RaftLog:
        """The log (read-only use: tests, invariant checkers, status)."""
        return self._log

    def status(self) -> RaftStatus:
        """A consistent snapshot of this node's state."""
        progress = {}
        if self._role is Role.LEADER:
            for nid in sorted(self._prs):
                pr = self._prs[nid]
                progress[nid] = PeerStatus(
                    pr.match, pr.next, pr.state, pr.recent_active, pr.is_learner
                )
        return RaftStatus(
            id=self._id,
            term=self._term,
            vote=self._vote,
            leader=self._lead,
            role=self._role,
            commit_index=self._log.committed,
            applied_index=self._log.applied,
            last_index=self._log.last_index(),
            first_index=self._log.first_index(),
            voters=tuple(sorted(self._voters)),
            learners=tuple(sorted(self._learners)),
            lead_transferee=self._lead_transferee,
            progress=progress,
        )

    # ================================================================== inputs

    def tick(self) -> None:
        """Advance logical time by one tick (the adapter owns ``tick_interval_s``)."""
        if self._role is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def hold_campaigns(self, held: bool) -> None:
        """Stop (or resume) starting elections when the election timeout passes.

        For a node the group removed while it was away: nobody tells a removed
        node, so its own configuration still names it a voter, and it would run
        PreVote rounds that cannot win for as long as it runs. The node layer
        learns from the group's view (the watch stream) that it was removed, and
        holds. Always safe: a node that does not campaign changes no one's term
        or vote; it still votes, follows a leader and applies what it receives.
        """
        if held != self._campaigns_held:
            LOGGER.info("raft_campaigns_%s node=%s term=%s", "held" if held else "resumed",
                        self._id, self._term)
        self._campaigns_held = held

    def campaign(self) -> None:
        """Start an election now (PreVote first if enabled), as if timed out.

        Does nothing on a leader or on a node that may not vote.
        """
        self._hup(_Campaign.ELECTION)

    def propose(self, data: bytes) -> EntryId:
        """Append a command to the leader's log.

        Returns:
            Where the entry landed; it is committed when an entry with this
            (term, index) shows up in ``Ready.committed_entries``.

        Raises:
            NotLeader: this node is not the leader (``leader_hint`` says who is).
            ProposalDropped: a leadership transfer is in progress, the entry is
                too large, or too many bytes are uncommitted; retry later.
        """
        return self._propose(data, EntryKind.NORMAL)

    def propose_conf_change(self, change: ConfChange) -> EntryId:
        """Propose a single-server membership change (dissertation §4.1).

        Raises:
            NotLeader: not the leader.
            ProposalDropped: another change is not yet applied, or the leader
                has not yet applied an entry of its term; retry.
            LocalProtocolError: the change makes no sense for the current
                membership (adding an existing voter, promoting a non-learner,
                removing the last voter, demoting a voter).
        """
        self._require_leader()
        if self._pending_conf_index > self._log.applied:
            raise ProposalDropped(
                "a membership change is still in progress; retry when it has been applied"
            )
        problem = self._conf_change_problem(change)
        if problem:
            raise LocalProtocolError(problem)
        eid = self._propose(change.encode(), EntryKind.CONF_CHANGE)
        self._pending_conf_index = eid.index
        return eid

    def read_index(self, context: bytes) -> None:
        """Request a linearizable read point (dissertation §6.4).

        The answer arrives as a :class:`ReadState` with this ``context`` in a
        later Ready; serve the read once ``applied_index >= ReadState.index``.
        A request can be lost (leader change, dropped message): callers retry
        after a timeout with a fresh context.

        Args:
            context: unique, non-empty request id, at most
                ``max_read_context_bytes``.

        Raises:
            NotLeader: no leader is known to forward the request to.
            ProposalDropped: too many reads are pending on the leader.
            LocalProtocolError: the context is empty or too long.
        """
        if not context or len(context) > self._cfg.max_read_context_bytes:
            raise LocalProtocolError(
                f"read context must be 1-{self._cfg.max_read_context_bytes} bytes"
            )
        if self._role is Role.LEADER:
            if not self._leader_read(context, None):
                raise ProposalDropped("too many pending reads; retry later")
            return
        if self._lead is None:
            raise NotLeader(None)
        self._send(ReadIndexRequest(self._id, self._lead, self._term, context))

    def transfer_leadership(self, target: NodeId) -> None:
        """Hand leadership to ``target`` (dissertation §3.10).

        The leader stops accepting proposals, brings ``target`` up to date and
        sends it TimeoutNow; the transfer is abandoned after one election
        timeout. Watch ``Ready.soft_state`` for the outcome.

        Raises:
            NotLeader: not the leader.
            LocalProtocolError: ``target`` is not a voter.
        """
        self._require_leader()
        if target not in self._voters:
            raise LocalProtocolError(f"cannot transfer leadership to {target}: not a voter")
        if target == self._id:
            return
        if self._lead_transferee is not None:
            if self._lead_transferee == target:
                return
            self._abort_leader_transfer()
        LOGGER.info("raft_transfer_start node=%s term=%s to=%s", self._id, self._term, target)
        self._lead_transferee = target
        self._election_elapsed = 0
        pr = self._prs[target]
        if pr.match == self._log.last_index():
            self._send(TimeoutNow(self._id, target, self._term))
        else:
            self._send_append(target)

    def report_unreachable(self, peer: NodeId) -> None:
        """The adapter failed to send to ``peer``: stop streaming to it and probe."""
        pr = self._prs.get(peer)
        if self._role is Role.LEADER and pr is not None and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def step(self, msg: RaftMessage) -> None:
        """Feed one message from a peer; the single entry point (etcd ``Step``).

        Messages not addressed to this node, or claiming to come from it, are
        ignored. Bad remote input never raises; a message that proves another
        node broke Raft's safety rules trips an assertion.
        """
        if msg.dst != self._id or msg.src == self._id:
            LOGGER.debug("raft_drop_misrouted node=%s msg=%s", self._id, type(msg).__name__)
            return
        if msg.term > self._term:
            if isinstance(msg, RequestVote) and not msg.transfer and self._in_lease():
                # Thesis §6.2 / §4.2.3: a live leader's followers ignore
                # disruptive candidates (e.g. a removed or partitioned node).
                LOGGER.debug(
                    "raft_ignore_vote node=%s term=%s from=%s lease=yes",
                    self._id,
                    self._term,
                    msg.src,
                )
                return
            if isinstance(msg, RequestVote) and msg.pre_vote:
                pass  # a PreVote never changes our term
            elif isinstance(msg, RequestVoteResponse) and msg.pre_vote and msg.granted:
                pass  # granted PreVotes carry the term we would campaign in
            elif isinstance(msg, AppendEntries | Heartbeat | InstallSnapshot):
                self._become_follower(msg.term, msg.src)
            else:
                self._become_follower(msg.term, None)
        elif msg.term < self._term:
            if (self._cfg.check_quorum or self._cfg.pre_vote) and isinstance(
                msg, AppendEntries | Heartbeat
            ):
                # Tell a stale leader about the newer term, otherwise with
                # PreVote/CheckQuorum it might never learn it and we would
                # never hear from it again.
                self._send(AppendEntriesResponse(self._id, msg.src, self._term, 0))
            elif isinstance(msg, RequestVote) and msg.pre_vote:
                self._send(
                    RequestVoteResponse(self._id, msg.src, self._term, granted=False, pre_vote=True)
                )
            return

        if isinstance(msg, RequestVote):
            self._handle_vote_request(msg)
        elif self._role is Role.LEADER:
            self._step_leader(msg)
        elif self._role is Role.FOLLOWER:
            self._step_follower(msg)
        else:
            self._step_candidate(msg)

    # ================================================================== Ready

    def has_ready(self) -> bool:
        """Whether :meth:`ready` would return a Ready.

        On a leader this first turns pending proposals, commit advances and
        reads into their (batched) broadcast messages.
        """
        if self._ready_outstanding:
            return False
        self._flush_broadcasts()
        return bool(
            self._msgs
            or self._read_states
            or self._log.unstable.entries
            or self._log.has_pending_snapshot()
            or self._soft_state() != self._prev_soft
            or self._hard_state() != self._prev_hard
            or (
                self._log.committed > self._log.applied
                and bool(self._log.next_committed_entries(1))
            )
        )

    def ready(self) -> Ready | None:
        """Collect what must be persisted, sent and applied, or ``None`` if nothing.

        Ordering contract (etcd ``Ready``), step by step:

        1. Persist ``snapshot`` (if any), then ``entries``, then ``hard_state``
           with one ``storage.save(...)``, fsynced when ``must_sync``.
        2. Only then send ``messages`` (votes and acknowledgements promise
           that state is durable), unless ``send_before_persist`` says they
           may go first (a leader's). A message that cannot be sent is simply
           lost; call :meth:`report_unreachable`.
        3. Then, if ``snapshot`` is set, load it into the state machine, and
           apply ``committed_entries`` in order; answer ``read_states`` once
           ``applied_index`` reaches their index.
        4. Call :meth:`advance` with this Ready.

        No other :meth:`ready` until :meth:`advance`; :meth:`step`,
        :meth:`tick` and :meth:`propose` may be called in between (an adapter
        keeps stepping while it fsyncs; what they produce goes into the next
        Ready, so proposals pile up into one batch and one fsync).

        Raises:
            LocalProtocolError: the previous Ready was not advanced.
        """
        if self._ready_outstanding:
            raise LocalProtocolError("ready() called again before advance()")
        if not self.has_ready():
            return None
        soft = self._soft_state()
        hard = self._hard_state()
        entries = tuple(self._log.unstable.entries)
        term_or_vote_changed = hard.term != self._prev_hard.term or hard.vote != self._prev_hard.vote
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != self._prev_hard else None,
            entries=entries,
            snapshot=self._log.unstable.snapshot,
            messages=tuple(self._msgs),
            committed_entries=tuple(
                self._log.next_committed_entries(self._cfg.max_committed_bytes_per_ready)
            ),
            read_states=tuple(self._read_states),
            must_sync=bool(entries) or term_or_vote_changed,
            send_before_persist=self._role is Role.LEADER and not term_or_vote_changed,
        )
        self._msgs = []
        self._read_states = []
        self._prev_soft = soft
        self._prev_hard = hard
        self._ready_outstanding = True
        return rd

    def advance(self, ready: Ready) -> None:
        """The caller persisted, sent and applied ``ready`` (see :meth:`ready`).

        Also applies committed CONF_CHANGE entries to the membership, and lets a
        leader count its own freshly persisted entries toward the quorum.
        """
        if not self._ready_outstanding:
            raise LocalProtocolError("advance() without an outstanding ready()")
        self._ready_outstanding = False
        if ready.snapshot is not None:
            index = ready.snapshot.meta.index
            self._log.stable_snap_to(index)
            if index > self._log.applied:
                self._log.applied = index
        if ready.entries:
            last = ready.entries[-1]
            self._log.stable_to(last.index, last.term)
            if self._role is Role.LEADER:
                pr = self._prs.get(self._id)
                if pr is not None and pr.maybe_update(self._log.persisted_index()):
                    self._after_match_update()
        if ready.committed_entries:
            for e in ready.committed_entries:
                if e.kind is EntryKind.CONF_CHANGE:
                    self._apply_conf_change(ConfChange.decode(e.data))
                if self._role is Role.LEADER:
                    self._uncommitted_bytes = max(0, self._uncommitted_bytes - e.size)
            self._log.applied_to(ready.committed_entries[-1].index)

    # ================================================================== roles

    def _soft_state(self) -> SoftState:
        return SoftState(self._lead, self._role)

    def _hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._log.committed)

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = None
        self._lead = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = self._cfg.election_ticks + self._rng.randrange(
            self._cfg.election_ticks
        )
        self._lead_transferee = None
        self._votes = {}
        self._pending_conf_index = 0
        self._uncommitted_bytes = 0
        self._bcast_entries = False
        self._bcast_commit = False
        self._bcast_read = False
        self._reads = {}
        self._read_queue = deque()
        self._pending_reads = []
        self._rebuild_progress()

    def _rebuild_progress(self) -> None:
        last = self._log.last_index()
        self._prs = {}
        for nid in sorted(self._voters | self._learners):
            pr = _Progress(
                last + 1,
                _Inflights(self._cfg.max_inflight_msgs, self._cfg.max_inflight_bytes),
                nid in self._learners,
            )
            if nid == self._id:
                pr.match = self._log.persisted_index()
            self._prs[nid] = pr

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        was = self._role
        self._reset(term)
        self._lead = lead
        self._role = Role.FOLLOWER
        if was is not Role.FOLLOWER or lead is not None:
            LOGGER.info(
                "raft_become_follower node=%s term=%s leader=%s", self._id, term, lead or "-"
            )

    def _become_pre_candidate(self) -> None:
        assert self._role is not Role.LEADER, "leader cannot become pre-candidate"
        # PreVote keeps term and vote: nothing to persist, nothing disrupted.
        again = self._role is Role.PRE_CANDIDATE
        self._votes = {}
        self._lead = None
        self._role = Role.PRE_CANDIDATE
        # A node that cannot win (cut off, or removed while it was down: nobody
        # tells it) tries every election timeout: only the first try is news.
        LOGGER.log(logging.DEBUG if again else logging.INFO,
                   "raft_become_pre_candidate node=%s term=%s", self._id, self._term)

    def _become_candidate(self) -> None:
        assert self._role is not Role.LEADER, "leader cannot become candidate"
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE
        LOGGER.info("raft_become_candidate node=%s term=%s", self._id, self._term)

    def _become_leader(self) -> None:
        assert self._role is not Role.FOLLOWER, "follower cannot become leader directly"
        self._reset(self._term)
        self._lead = self._id
        self._role = Role.LEADER
        self._prs[self._id].become_replicate()
        self._prs[self._id].match = self._log.persisted_index()
        # No membership change until an entry of this term is applied (the fix
        # for the single-server change bug): everything up to here is pending.
        self._pending_conf_index = self._log.last_index()
        # §5.4.2: an entry of our own term lets earlier entries commit.
        self._append_entries([Entry(self._term, self._log.last_index() + 1)])
        LOGGER.info("raft_become_leader node=%s term=%s", self._id, self._term)

    def _promotable(self) -> bool:
        return self._id in self._voters

    def _in_lease(self) -> bool:
        return (
            self._cfg.check_quorum
            and self._lead is not None
            and self._election_elapsed < self._cfg.election_ticks
        )

    # ================================================================== ticks

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and not self._campaigns_held \
                and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._hup(_Campaign.ELECTION)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._cfg.election_ticks:
            self._election_elapsed = 0
            if self._cfg.check_quorum:
                self._check_quorum()
                if self._role is not Role.LEADER:
                    return
            if self._lead_transferee is not None:
                self._abort_leader_transfer()
        for nid in sorted(self._prs):
            pr = self._prs[nid]
            if pr.state is ProgressState.SNAPSHOT and nid != self._id:
                pr.snapshot_stall_ticks += 1
                if pr.snapshot_stall_ticks >= self._cfg.election_ticks:
                    self._send_snapshot_chunk(nid, pr)  # resend the unacknowledged chunk
        if self._heartbeat_elapsed >= self._cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat(self._last_read_context())

    def _check_quorum(self) -> None:
        if self._id in self._prs:
            self._prs[self._id].recent_active = True
        active = self._quorum.active(lambda n: n in self._prs and self._prs[n].recent_active)
        for nid, pr in self._prs.items():
            if nid != self._id:
                pr.recent_active = False
        if not active:
            LOGGER.warning(
                "raft_lost_quorum node=%s term=%s action=step_down", self._id, self._term
            )
            self._become_follower(self._term, None)

    # ================================================================== elections

    def _hup(self, kind: _Campaign) -> None:
        if self._role is Role.LEADER:
            return
        if not self._promotable():
            LOGGER.debug("raft_no_campaign node=%s reason=not_a_voter", self._id)
            return
        if self._has_unapplied_conf_change():
            LOGGER.info(
                "raft_no_campaign node=%s term=%s reason=unapplied_conf_change",
                self._id,
                self._term,
            )
            return
        if kind is _Campaign.ELECTION and self._cfg.pre_vote:
            kind = _Campaign.PRE_ELECTION
        self._campaign(kind)

    def _has_unapplied_conf_change(self) -> bool:
        lo = self._log.applied + 1
        hi = self._log.committed + 1
        if hi <= lo or lo < self._log.first_index():
            return False
        return any(e.kind is EntryKind.CONF_CHANGE for e in self._log.slice(lo, hi, None))

    def _campaign(self, kind: _Campaign) -> None:
        if kind is _Campaign.PRE_ELECTION:
            self._become_pre_candidate()
            term = self._term + 1
        else:
            self._become_candidate()
            term = self._term
        self._votes[self._id] = True
        result = self._quorum.vote_result(self._votes)
        if result is VoteResult.WON:
            # A single voter wins at once.
            if kind is _Campaign.PRE_ELECTION:
                self._campaign(_Campaign.ELECTION)
            else:
                self._become_leader()
                self._bcast_entries = True
            return
        last_index = self._log.last_index()
        last_term = self._log.last_term()
        for nid in self._quorum.voters():
            if nid == self._id:
                continue
            self._send(
                RequestVote(
                    self._id,
                    nid,
                    term,
                    last_index,
                    last_term,
                    pre_vote=kind is _Campaign.PRE_ELECTION,
                    transfer=kind is _Campaign.TRANSFER,
                )
            )

    def _handle_vote_request(self, m: RequestVote) -> None:
        can_vote = (
            self._vote == m.src
            or (self._vote is None and self._lead is None)
            or (m.pre_vote and m.term > self._term)
        )
        if can_vote and self._log.is_up_to_date(m.last_log_index, m.last_log_term):
            # Granted answers carry the request's term (for a PreVote, the
            # candidate's future term) so the candidate counts them.
            self._send(RequestVoteResponse(self._id, m.src, m.term, True, m.pre_vote))
            if not m.pre_vote:
                self._election_elapsed = 0
                self._vote = m.src
        else:
            self._send(RequestVoteResponse(self._id, m.src, self._term, False, m.pre_vote))

    def _step_candidate(self, m: RaftMessage) -> None:
        if isinstance(m, AppendEntries):
            self._become_follower(m.term, m.src)
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            self._become_follower(m.term, m.src)
            self._handle_heartbeat(m)
        elif isinstance(m, InstallSnapshot):
            self._become_follower(m.term, m.src)
            self._handle_snapshot_chunk(m)
        elif isinstance(m, RequestVoteResponse):
            if m.pre_vote != (self._role is Role.PRE_CANDIDATE):
                return  # an answer to the other kind of round
            self._votes.setdefault(m.src, m.granted)
            result = self._quorum.vote_result(self._votes)
            if result is VoteResult.WON:
                if self._role is Role.PRE_CANDIDATE:
                    self._campaign(_Campaign.ELECTION)
                else:
                    self._become_leader()
                    self._bcast_entries = True
            elif result is VoteResult.LOST:
                # PreVote losers stay in their term; real losers are already in it.
                self._become_follower(self._term, None)

    def _step_follower(self, m: RaftMessage) -> None:
        if isinstance(m, AppendEntries):
            self._election_elapsed = 0
            self._lead = m.src
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            self._election_elapsed = 0
            self._lead = m.src
            self._handle_heartbeat(m)
        elif isinstance(m, InstallSnapshot):
            self._election_elapsed = 0
            self._lead = m.src
            self._handle_snapshot_chunk(m)
        elif isinstance(m, TimeoutNow):
            if self._promotable():
                LOGGER.info(
                    "raft_timeout_now node=%s term=%s from=%s action=campaign",
                    self._id,
                    self._term,
                    m.src,
                )
                # Transfer campaigns skip PreVote: the old leader asked for it.
                if not self._has_unapplied_conf_change():
                    self._campaign(_Campaign.TRANSFER)
        elif isinstance(m, ReadIndexResponse):
            self._read_states.append(ReadState(m.index, m.context))

    # ================================================================== follower side

    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_log_index < self._log.committed:
            self._send(AppendEntriesResponse(self._id, m.src, self._term, self._log.committed))
            return
        last_new = self._log.maybe_append(
            m.prev_log_index, m.prev_log_term, m.commit, list(m.entries)
        )
        if last_new is not None:
            self._send(AppendEntriesResponse(self._id, m.src, self._term, last_new))
            return
        hint_index = min(m.prev_log_index, self._log.last_index())
        hint_index, hint_term = self._log.find_conflict_by_term(hint_index, m.prev_log_term)
        LOGGER.debug(
            "raft_reject_append node=%s term=%s index=%s hint=%s/%s",
            self._id,
            self._term,
            m.prev_log_index,
            hint_index,
            hint_term,
        )
        self._send(
            AppendEntriesResponse(
                self._id,
                m.src,
                self._term,
                m.prev_log_index,
                reject=True,
                reject_hint=hint_index,
                hint_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        # The leader sends min(its commit, our match), so this passes our log only
        # if we lost entries we acknowledged (restored from an old copy of the data
        # dir): say so with a rejection, so that the leader backs up and resends
        # (its heartbeats alone would never tell it).
        last = self._log.last_index()
        if m.commit > last:
            LOGGER.warning("raft_log_behind_acknowledged node=%s term=%s commit=%s last=%s; "
                           "this node's log is older than what it acknowledged (restored "
                           "from a backup?): catching up from the leader",
                           self._id, self._term, m.commit, last)
            self._send(AppendEntriesResponse(self._id, m.src, self._term, m.commit,
                                             reject=True, reject_hint=last,
                                             hint_term=self._log.term(last)))
        self._log.commit_to(min(m.commit, last))
        self._send(HeartbeatResponse(self._id, m.src, self._term, m.context))

    def _handle_snapshot_chunk(self, m: InstallSnapshot) -> None:
        if m.meta.index <= self._log.committed:
            self._snap_recv = None
            self._send(AppendEntriesResponse(self._id, m.src, self._term, self._log.committed))
            return
        if m.total_bytes > self._cfg.max_snapshot_bytes:
            LOGGER.error(
                "raft_snapshot_too_large node=%s term=%s bytes=%s limit=%s; raise "
                "max_snapshot_bytes",
                self._id,
                self._term,
                m.total_bytes,
                self._cfg.max_snapshot_bytes,
            )
            self._send(self._snapshot_ack(m, 0, reject=True))
            return
        recv = self._snap_recv
        if m.offset == 0:
            recv = self._snap_recv = _SnapshotReceive(m)
        elif recv is None or not recv.matches(m) or len(recv.data) != m.offset:
            # Out of order or from another transfer: ask for what we need.
            have = len(recv.data) if recv is not None and recv.matches(m) else 0
            self._send(self._snapshot_ack(m, have))
            return
        recv.data += m.data
        if not m.done:
            self._send(self._snapshot_ack(m, len(recv.data)))
            return
        self._snap_recv = None
        snap = Snapshot(m.meta, bytes(recv.data))
        if self._restore(snap):
            LOGGER.info(
                "raft_snapshot_restored node=%s term=%s index=%s snap_term=%s bytes=%s",
                self._id,
                self._term,
                snap.meta.index,
                snap.meta.term,
                len(snap.data),
            )
            self._send(AppendEntriesResponse(self._id, m.src, self._term, self._log.last_index()))
        else:
            self._send(AppendEntriesResponse(self._id, m.src, self._term, self._log.committed))

    def _snapshot_ack(self, m: InstallSnapshot, offset: int, reject: bool = False) -> RaftMessage:
        return InstallSnapshotResponse(
            self._id, m.src, self._term, m.meta.index, m.meta.term, offset, reject
        )

    def _restore(self, snap: Snapshot) -> bool:
        if snap.meta.index <= self._log.committed:
            return False
        if self._log.match_term(snap.meta.index, snap.meta.term):
            # We already have the entry: just fast-forward the commit index.
            self._log.commit_to(snap.meta.index)
            return False
        self._log.restore(snap)
        cs = snap.meta.conf_state
        self._set_membership(frozenset(cs.voters), frozenset(cs.learners))
        return True

    # ================================================================== leader side

    def _require_leader(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._lead)

    def check_propose(self) -> None:
        """Raise what :meth:`propose` would raise now whatever the command
        (an adapter that joins several commands into one entry checks each one
        as it comes).

        Raises:
            NotLeader: this node is not the leader (``leader_hint`` says who is).
            ProposalDropped: a leadership transfer is in progress.
        """
        self._require_leader()
        if self._lead_transferee is not None:
            raise ProposalDropped(
                f"leadership is being transferred to {self._lead_transferee}; retry there"
            )

    def _propose(self, data: bytes, kind: EntryKind) -> EntryId:
        self.check_propose()
        if len(data) > self._cfg.max_entry_bytes:
            raise ProposalDropped(
                f"command of {len(data)} bytes exceeds max_entry_bytes={self._cfg.max_entry_bytes}"
            )
        limit = self._cfg.max_uncommitted_bytes
        if limit and self._uncommitted_bytes + len(data) > limit and self._uncommitted_bytes:
            raise ProposalDropped("too many uncommitted bytes; slow down and retry")
        index = self._log.last_index() + 1
        self._append_entries([Entry(self._term, index, bytes(data), kind)])
        self._uncommitted_bytes += len(data)
        self._bcast_entries = True
        return EntryId(self._term, index)

    def _append_entries(self, entries: list[Entry]) -> None:
        self._log.append(entries)
        # Our own progress moves only when these are persisted (advance()).

    def _flush_broadcasts(self) -> None:
        if self._role is not Role.LEADER:
            self._bcast_entries = self._bcast_commit = self._bcast_read = False
            return
        if self._bcast_read:
            self._bcast_read = False
            self._bcast_heartbeat(self._last_read_context())
        if not (self._bcast_entries or self._bcast_commit):
            return
        with_empty = self._bcast_commit
        self._bcast_entries = self._bcast_commit = False
        for nid in sorted(self._prs):
            if nid == self._id:
                continue
            sent = self._maybe_send_append(nid, send_if_empty=with_empty)
            while sent and self._maybe_send_append(nid, send_if_empty=False):
                pass

    def _send_append(self, to: NodeId) -> None:
        self._maybe_send_append(to, send_if_empty=True)

    def _maybe_send_append(self, to: NodeId, send_if_empty: bool) -> bool:
        pr = self._prs[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        try:
            prev_term = self._log.term(prev_index)
        except Compacted:
            return self._maybe_send_snapshot(to, pr)
        entries: list[Entry] = []
        if pr.state is not ProgressState.REPLICATE or not pr.inflights.full():
            try:
                entries = self._log.entries(pr.next, self._cfg.max_size_per_msg)
            except Compacted:
                return self._maybe_send_snapshot(to, pr)
        if not entries and not send_if_empty:
            return False
        self._send(
            AppendEntries(
                self._id,
                to,
                self._term,
                prev_index,
                prev_term,
                self._log.committed,
                tuple(entries),
            )
        )
        pr.sent_entries(entries)
        return True

    def _maybe_send_snapshot(self, to: NodeId, pr: _Progress) -> bool:
        if not pr.recent_active:
            LOGGER.debug("raft_snapshot_deferred node=%s peer=%s reason=inactive", self._id, to)
            return False
        try:
            snap = self._log.snapshot()
        except Unavailable:
            LOGGER.debug("raft_snapshot_deferred node=%s peer=%s reason=unavailable", self._id, to)
            return False
        assert not snap.is_empty, "entries were compacted without a snapshot"
        LOGGER.info(
            "raft_snapshot_send node=%s term=%s peer=%s index=%s bytes=%s",
            self._id,
            self._term,
            to,
            snap.meta.index,
            len(snap.data),
        )
        pr.become_snapshot(snap)
        self._send_snapshot_chunk(to, pr)
        return True

    def _send_snapshot_chunk(self, to: NodeId, pr: _Progress) -> None:
        snap = pr.snapshot
        assert snap is not None
        start = pr.snapshot_offset
        chunk = snap.data[start : start + self._cfg.snapshot_chunk_bytes]
        total = len(snap.data)
        self._send(
            InstallSnapshot(
                self._id,
                to,
                self._term,
                snap.meta,
                total,
                start,
                chunk,
                done=start + len(chunk) == total,
            )
        )
        pr.snapshot_stall_ticks = 0

    def _bcast_heartbeat(self, context: bytes) -> None:
        for nid in sorted(self._prs):
            if nid == self._id:
                continue
            pr = self._prs[nid]
            commit = min(pr.match, self._log.committed)
            self._send(Heartbeat(self._id, nid, self._term, commit, context))

    def _step_leader(self, m: RaftMessage) -> None:
        if isinstance(m, AppendEntriesResponse):
            self._handle_append_response(m)
        elif isinstance(m, HeartbeatResponse):
            self._handle_heartbeat_response(m)
        elif isinstance(m, InstallSnapshotResponse):
            self._handle_snapshot_response(m)
        elif isinstance(m, ReadIndexRequest):
            if m.src not in self._prs:
                return
            if not self._leader_read(m.context, m.src):
                LOGGER.debug("raft_read_dropped node=%s from=%s", self._id, m.src)
        elif isinstance(m, AppendEntries | Heartbeat | InstallSnapshot):
            # Two leaders in one term: impossible unless a peer is broken.
            LOGGER.error(
                "raft_two_leaders node=%s term=%s other=%s; a peer violates Raft",
                self._id,
                self._term,
                m.src,
            )

    def _handle_append_response(self, m: AppendEntriesResponse) -> None:
        pr = self._prs.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.hint_term > 0:
                next_probe, _ = self._log.find_conflict_by_term(m.reject_hint, m.hint_term)
            if pr.maybe_decr_to(m.index, next_probe):
                LOGGER.debug("raft_backtrack node=%s peer=%s next=%s", self._id, m.src, pr.next)
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.src)
            return
        if m.index > self._log.last_index():
            LOGGER.debug("raft_bogus_ack node=%s peer=%s index=%s", self._id, m.src, m.index)
            return
        old_paused = pr.is_paused()
        if not (
            pr.maybe_update(m.index) or (pr.match == m.index and pr.state is ProgressState.PROBE)
        ):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match < pr.pending_snapshot:
                return  # an old ack; keep sending the snapshot
            pr.become_probe()
            if pr.match + 1 >= self._log.first_index():
                pr.become_replicate()
        else:
            pr.inflights.free_le(m.index)
        if not self._after_match_update() and old_paused:
            self._send_append(m.src)
        while self._maybe_send_append(m.src, send_if_empty=False):
            pass
        if m.src == self._lead_transferee and pr.match == self._log.last_index():
            LOGGER.info("raft_transfer_timeout_now node=%s to=%s", self._id, m.src)
            self._send(TimeoutNow(self._id, m.src, self._term))

    def _after_match_update(self) -> bool:
        """Recompute the commit index after a match moved; True if it advanced."""
        if self._role is not Role.LEADER:
            return False
        index = self._quorum.committed_index(
            lambda n: self._prs[n].match if n in self._prs else None
        )
        if not self._log.maybe_commit(index, self._term):
            return False
        self._bcast_commit = True
        if self._pending_reads and self._committed_in_term():
            pending, self._pending_reads = self._pending_reads, []
            for context, origin in pending:
                self._leader_read(context, origin)
        return True

    def _handle_heartbeat_response(self, m: HeartbeatResponse) -> None:
        pr = self._prs.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.paused = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            # Let one message through in case the window is full of lost ones.
            pr.inflights.free_first_one()
        if pr.match < self._log.last_index() or pr.state is ProgressState.PROBE:
            self._send_append(m.src)
        if m.context:
            self._read_ack(m.src, m.context)

    def _handle_snapshot_response(self, m: InstallSnapshotResponse) -> None:
        pr = self._prs.get(m.src)
        if pr is None or pr.state is not ProgressState.SNAPSHOT or pr.snapshot is None:
            return
        meta = pr.snapshot.meta
        if (m.snapshot_index, m.snapshot_term) != (meta.index, meta.term):
            return
        pr.recent_active = True
        if m.reject:
            LOGGER.warning(
                "raft_snapshot_rejected node=%s peer=%s index=%s", self._id, m.src, meta.index
            )
            pr.become_probe()
            pr.paused = True  # wait for a heartbeat before trying again
            return
        if m.next_offset >= len(pr.snapshot.data):
            return  # the final acknowledgement is an AppendEntriesResponse
        pr.snapshot_offset = m.next_offset
        self._send_snapshot_chunk(m.src, pr)

    def _abort_leader_transfer(self) -> None:
        if self._lead_transferee is not None:
            LOGGER.info(
                "raft_transfer_abort node=%s term=%s to=%s",
                self._id,
                self._term,
                self._lead_transferee,
            )
        self._lead_transferee = None

    # ================================================================== ReadIndex

    def _committed_in_term(self) -> bool:
        return self._log.term_or_zero(self._log.committed) == self._term

    def _leader_read(self, context: bytes, origin: NodeId | None) -> bool:
        """Start a ReadIndex round; False if it had to be dropped."""
        if not self._committed_in_term():
            # §6.4 step 1: until an entry of this term commits, our commit
            # index may be behind the previous leader's.
            if len(self._pending_reads) >= self._cfg.max_pending_reads:
                return False
            self._pending_reads.append((context, origin))
            return True
        if self._voters == frozenset({self._id}):
            self._answer_read(self._log.committed, context, origin)
            return True
        if context in self._reads:
            return True  # a duplicate of a request already in flight
        if len(self._reads) >= self._cfg.max_pending_reads:
            return False
        req = _ReadRequest(self._log.committed, context, origin)
        req.acks[self._id] = True
        self._reads[context] = req
        self._read_queue.append(context)
        # One heartbeat round per Ready confirms every read queued so far: an
        # ack for the newest context releases all older ones.
        self._bcast_read = True
        return True

    def _answer_read(self, index: int, context: bytes, origin: NodeId | None) -> None:
        if origin is None:
            self._read_states.append(ReadState(index, context))
        else:
            self._send(ReadIndexResponse(self._id, origin, self._term, index, context))

    def _read_ack(self, src: NodeId, context: bytes) -> None:
        req = self._reads.get(context)
        if req is None:
            return
        req.acks[src] = True
        if self._quorum.vote_result(req.acks) is not VoteResult.WON:
            return
        # A quorum confirmed leadership after every request queued up to this
        # one was recorded: answer them all, in order.
        while self._read_queue:
            ctx = self._read_queue.popleft()
            done = self._reads.pop(ctx)
            self._answer_read(done.index, done.context, done.origin)
            if ctx == context:
                break

    def _last_read_context(self) -> bytes:
        return self._read_queue[-1] if self._read_queue else b""

    # ================================================================== membership

    def _conf_change_problem(self, cc: ConfChange) -> str:
        n = cc.node
        if cc.kind is ConfChangeKind.ADD_VOTER and n in self._voters:
            return f"{n} is already a voter"
        if cc.kind is ConfChangeKind.ADD_LEARNER:
            if n in self._learners:
                return f"{n} is already a learner"
            if n in self._voters:
                return f"{n} is a voter; remove it first to make it a learner"
        if cc.kind is ConfChangeKind.PROMOTE and n not in self._learners:
            return f"{n} is not a learner; add it as a learner first"
        if cc.kind is ConfChangeKind.REMOVE:
            if n not in self._voters and n not in self._learners:
                return f"{n} is not a member"
            if self._voters == frozenset({n}):
                return f"{n} is the last voter; removing it would leave no quorum"
        return ""

    def _apply_conf_change(self, cc: ConfChange, quiet: bool = False) -> None:
        problem = self._conf_change_problem(cc)
        if problem:
            # Checked at proposal time too; applying is deterministic either way.
            LOGGER.warning("raft_conf_change_ignored node=%s reason=%s", self._id, problem)
            return
        voters, learners = set(self._voters), set(self._learners)
        if cc.kind is ConfChangeKind.ADD_VOTER or cc.kind is ConfChangeKind.PROMOTE:
            learners.discard(cc.node)
            voters.add(cc.node)
        elif cc.kind is ConfChangeKind.ADD_LEARNER:
            learners.add(cc.node)
        else:
            voters.discard(cc.node)
            learners.discard(cc.node)
        if not quiet:
            LOGGER.info(
                "raft_conf_change node=%s term=%s change=%s peer=%s voters=%s learners=%s",
                self._id,
                self._term,
                cc.kind.name,
                cc.node,
                ",".join(sorted(voters)),
                ",".join(sorted(learners)),
            )
        self._set_membership(frozenset(voters), frozenset(learners))

    def _set_membership(self, voters: frozenset[NodeId], learners: frozenset[NodeId]) -> None:
        self._voters = voters
        self._learners = learners
        self._quorum = JointConfig(voters)
        if self._role is not Role.LEADER:
            self._rebuild_progress()
            return
        last = self._log.last_index()
        for nid in sorted(set(self._prs) - (voters | learners)):
            del self._prs[nid]
        for nid in sorted(voters | learners):
            pr = self._prs.get(nid)
            if pr is None:
                pr = _Progress(
                    last + 1,
                    _Inflights(self._cfg.max_inflight_msgs, self._cfg.max_inflight_bytes),
                    nid in learners,
                )
                self._prs[nid] = pr
            pr.is_learner = nid in learners
        if self._id not in voters:
            self._step_down_after_removal()
            return
        if self._lead_transferee is not None and self._lead_transferee not in voters:
            self._abort_leader_transfer()
        if not self._after_match_update():
            for nid in sorted(self._prs):
                if nid != self._id:
                    self._maybe_send_append(nid, send_if_empty=False)

    def _step_down_after_removal(self) -> None:
        if not self._cfg.step_down_on_removal:
            return
        # Hand over to the most caught-up voter so the group does not wait for
        # an election timeout (dissertation §3.10 used for §4.2.2).
        candidates = sorted(
            (n for n in self._voters if n in self._prs),
            key=lambda n: (-self._prs[n].match, n),
        )
        successor = candidates[0] if candidates else None
        if successor is not None and self._prs[successor].match == self._log.last_index():
            self._send(TimeoutNow(self._id, successor, self._term))
        LOGGER.info(
            "raft_step_down_removed node=%s term=%s successor=%s",
            self._id,
            self._term,
            successor or "-",
        )
        self._become_follower(self._term, None)

    # ================================================================== plumbing

    def _send(self, msg: RaftMessage) -> None:
        self._msgs.append(msg)


def decode_conf_change(entry: Entry) -> ConfChange:
    """The ConfChange inside a committed CONF_CHANGE entry (for the state machine).

    Raises:
        LocalProtocolError: the entry is not a valid CONF_CHANGE entry.
    """
    if entry.kind is not EntryKind.CONF_CHANGE:
        raise LocalProtocolError(f"entry {entry.index} is not a conf change")
    try:
        return ConfChange.decode(entry.data)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"entry {entry.index} holds a bad conf change: {exc}") from None


__all__: Sequence[str] = (
    "EntryId",
    "PeerStatus",
    "RaftCore",
    "RaftStatus",
    "ReadState",
    "Ready",
    "Role",
    "ProgressState",
    "SoftState",
    "decode_conf_change",
)
