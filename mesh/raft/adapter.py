"""The trio adapter that runs a :class:`~mesh.raft.core.RaftCore`.

It owns every piece of Raft's I/O and no protocol decision (STYLE 1.2): a tick
task calls ``core.tick()`` every ``tick_interval_s``; one *ready loop* takes
each :class:`~mesh.raft.core.Ready` and carries out its contract (persist
through ``trio.to_thread``, send, apply to the state machine, ``advance``);
one sender task per peer writes that peer's bounded queue to a persistent
stream; inbound streams are decoded frame by frame into ``core.step``.

Batching falls out of the shape: while the ready loop waits for one fsync,
every proposal and every peer message keeps feeding the core; all of it lands
in the next Ready, so N concurrent proposals cost one ``save`` (one fsync) and
one AppendEntries per follower.

Client calls (:meth:`RaftAdapter.propose`, :meth:`RaftAdapter.read_index`,
:meth:`RaftAdapter.propose_conf_change`) feed the core synchronously (it raises
``NotLeader`` or ``ProposalDropped`` at once) and then wait for the ready loop
to apply their entry or answer their read.

Resource handling:
    :meth:`RaftAdapter.run` owns a nursery with the tick task, the ready loop
    and the per-peer senders; cancelling it stops them, closes every peer
    stream (outbound and inbound) and fails every waiting client call with
    ``ProposalDropped``. An adapter runs once: a restarted node builds a new
    one over the same storage (:meth:`RaftAdapter.create`).

Error handling:
    A frame that fails to decode is dropped, counted in :meth:`statistics`
    and logged at DEBUG; an oversized frame closes its stream. A failed dial
    or write drops the frames at hand, tells the core
    (``report_unreachable``) and retries with exponential backoff. A full peer
    queue drops the new message (Raft resends what matters). A failing
    ``storage.save`` (full disk) is retried with backoff and logged at ERROR;
    meanwhile proposals are refused with :class:`~mesh.errors.StorageError`
    and nothing already acknowledged is lost. Nothing a peer sends can end
    the adapter.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import outcome
import trio

from mesh import wire
from mesh.errors import (
    LocalProtocolError,
    NotLeader,
    ProposalDropped,
    RemoteProtocolError,
    StorageError,
)
from mesh.raft import voters as voter_selection
from mesh.raft.config import RaftConfig
from mesh.raft.core import RaftCore, Ready, Role
from mesh.raft.messages import ConfChange, ConfChangeKind, Entry, RaftMessage, from_wire
from mesh.raft.metrics import LatencySummary, LatencyWindow
from mesh.raft.storage import RaftStorage
from mesh.types import Addr, NodeId

LOGGER = logging.getLogger(__name__)

ALPN = "mesh-raft/1"
"""The ALPN protocol id of raft streams on the shared TLS port (DESIGN.md)."""

_T = TypeVar("_T")


class StateMachine(Protocol):
    """What the adapter applies committed entries to
    (:class:`mesh.raft.state.MeshState` is the real one)."""

    @property
    def applied_index(self) -> int:
        """Index of the last entry applied or restored."""
        ...

    def apply(self, entry: Entry) -> object:
        """Apply one committed entry (any kind, in order); return the result
        handed to the proposer. Must not raise for bad entry data."""
        ...

    def snapshot(self) -> bytes:
        """The whole state, for log compaction."""
        ...

    def restore(self, data: bytes, index: int) -> None:
        """Replace the whole state with a snapshot taken at ``index``."""
        ...


class Batcher(Protocol):
    """Joins commands proposed together into one command, so that they share a
    log entry (:class:`mesh.raft.state.KvBatcher` is the real one). The state
    machine's ``apply`` returns a sequence with one result per joined command."""

    @property
    def max_commands(self) -> int:
        """Most commands in one joined command."""
        ...

    @property
    def max_bytes(self) -> int:
        """Most bytes of commands in one joined command."""
        ...

    def join(self, commands: Sequence[bytes]) -> bytes:
        """One command that applies ``commands`` (at least two) in order."""
        ...


class StreamDialer(Protocol):
    """Reliable streams to peers: plain TCP now, TLS with ALPN ``mesh-raft/1``
    later (the same shape as :class:`mesh.gossip.adapter.StreamDialer`)."""

    async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> trio.abc.Stream:
        """Connect to ``to``, where node ``expect`` should answer (a dialer that
        authenticates peers refuses anyone else with ``RemoteProtocolError``).
        Raises ``OSError`` (or ``trio.BrokenResourceError`` for a failed
        handshake) if it cannot."""
        ...


PeerAddr = Callable[[NodeId], Addr | None]
"""Where a peer's raft streams go (fed by membership); ``None``: unknown."""


@dataclass(frozen=True, slots=True)
class RaftAdapterStatistics:
    """What the adapter counted (the core's state is in ``core.status()``)."""

    frames_in: int
    """Frames decoded and stepped into the core."""
    frames_out: int
    """Frames written to peer streams."""
    bytes_in: int
    bytes_out: int
    frames_malformed: int
    """Inbound frames dropped because they did not decode (or were oversized)."""
    frames_misrouted: int
    """Inbound frames dropped because they were not for this node, or not from
    the authenticated peer of their stream."""
    queue_drops: int
    """Outbound messages dropped because the peer's queue was full."""
    send_drops: int
    """Outbound frames dropped because the peer was unreachable."""
    send_failures: int
    """Failed dials and writes."""
    dials: int
    """Streams opened to peers."""
    readies: int
    saves: int
    """``storage.save`` calls that succeeded (one per Ready with something to persist)."""
    storage_errors: int
    entries_applied: int
    snapshots_created: int
    snapshots_restored: int
    leader_changes: int
    proposals_committed: int
    proposals_lost: int
    """Proposals that failed with ``ProposalDropped`` after entering the log
    (leader change, timeout, stop): their outcome is unknown."""
    entries_saved: int
    """Log entries written to storage (``entries_saved / saves``: the batch size)."""
    sends_before_persist: int
    """Readies whose messages left before their write was durable (a leader's)."""
    snapshot_bytes: int
    """Size of the state image in the latest snapshot created or restored here."""
    commit_latency: LatencySummary
    """From :meth:`RaftAdapter.propose` to the entry applied here, for proposals
    that committed (seconds)."""
    wal_sync_latency: LatencySummary
    """One synced ``storage.save`` (WAL write + fsync) in the worker thread."""


class _Waiter:
    """One read waiting for the ready loop (ReadIndex)."""

    __slots__ = ("event", "leader", "error", "index")

    def __init__(self, leader: NodeId | None) -> None:
        self.event = trio.Event()
        self.leader = leader
        self.error: BaseException | None = None
        self.index = 0

    def resolve(self) -> None:
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class Proposal:
    """An entry this node proposed, waiting to be applied here
    (:meth:`RaftAdapter.propose_nowait`).

    Many proposals can be in flight while one task waits for them in order: the
    ready loop resolves every proposal of an applied batch at once.
    """

    __slots__ = ("event", "term", "result", "error", "deadline", "started")

    def __init__(self, term: int, started: float, deadline: float) -> None:
        self.event = trio.Event()
        self.term = term
        self.started = started
        self.deadline = deadline
        """When it gives up (checked every tick: one timer for all of them)."""
        self.result: object = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Applied, or failed."""
        return self.event.is_set()

    def outcome(self) -> object:
        """What the state machine's ``apply`` returned for the entry (once :attr:`done`).

        Raises:
            ProposalDropped: lost (leadership lost, replaced after a leader change,
                not applied within the timeout, adapter stopped); the outcome is
                unknown: retry with the same request id.
        """
        assert self.event.is_set(), "the proposal is still in flight"
        if self.error is not None:
            raise self.error
        return self.result

    async def wait(self) -> object:
        """Wait until applied; returns (or raises) like :meth:`outcome`."""
        await self.event.wait()
        return self.outcome()

    def resolve(self, result: object) -> None:
        if not self.event.is_set():
            self.result = result
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class _Joined:
    """The proposals joined into one entry (:class:`Batcher`): the ready loop
    tracks, resolves and fails them as one."""

    __slots__ = ("term", "started", "deadline", "parts")

    def __init__(self, term: int, parts: list[Proposal]) -> None:
        self.term = term
        self.parts = parts
        self.started = min(p.started for p in parts)
        self.deadline = min(p.deadline for p in parts)

    def resolve(self, result: object) -> None:
        """Hand each part its own result (the state machine returned one per
        command), or all of them the same one (e.g. the batch was invalid)."""
        if isinstance(result, tuple) and len(result) == len(self.parts):
            for part, one in zip(self.parts, result, strict=True):
                part.resolve(one)
        else:
            for part in self.parts:
                part.resolve(result)

    def fail(self, error: BaseException) -> None:
        for part in self.parts:
            part.fail(error)


class _StorageJob:
    __slots__ = ("fn", "task", "result")

    def __init__(self, fn: Callable[[], object], task: trio.lowlevel.Task) -> None:
        self.fn = fn
        self.task = task
        """The task waiting for the job (rescheduled with its outcome)."""
        self.result: outcome.Outcome[object] | None = None


class _StorageThread:
    """The one thread that runs an adapter's storage writes (WAL appends with
    fsync, snapshot files), one at a time and in order.

    A handoff to it costs about 55 us less CPU (and 70 us less latency) than
    ``trio.to_thread.run_sync``, which every Ready of every node pays.

    Resource handling:
        :meth:`start` starts the thread; :meth:`stop` ends it after the jobs
        already queued (it is a daemon thread, so a stuck disk cannot keep the
        process alive).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_StorageJob | None] = queue.SimpleQueue()

    def start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        threading.Thread(target=self._loop, args=(token,), name=self._name,
                         daemon=True).start()

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self, token: trio.lowlevel.TrioToken) -> None:
        _disfavour_on_wakeup()
        while (job := self._jobs.get()) is not None:
            # An exception is handed to the waiting task and raised there.
            job.result = outcome.capture(job.fn)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, job.task, job.result)
            except trio.RunFinishedError:
                return

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in the thread and return its result (or raise its
        exception). Not abandoned when cancelled: a write in progress is waited
        for, as ``trio.to_thread.run_sync`` does (the task parks without a
        cancel scope or an event: about 10 us less per call)."""
        self._jobs.put(_StorageJob(fn, trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            _cannot_abort)


def _cannot_abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
    """A storage write, once handed over, is waited for even when cancelled."""
    return trio.lowlevel.Abort.FAILED


def _disfavour_on_wakeup() -> None:
    """Put the calling thread in Linux's ``SCHED_BATCH`` class: handing it a job
    then no longer preempts the trio thread that handed it over. Under the
    default policy the woken storage thread took the CPU (only to wait for the
    GIL the trio thread holds), and the trio thread lost 300-500 us per handoff
    waiting to run again on a busy 2-core machine; with it, 30-90 us, and about
    10% more writes per second. Elsewhere (no ``SCHED_BATCH``) nothing changes."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))


class _Peer:
    """One peer's outbound queue and the state of its sender task.

    The tick loop watches senders (:meth:`RaftAdapter._watch_senders`) instead
    of each wait and write paying a cancel scope with a deadline (about 10 us
    each, twice per batch sent)."""

    __slots__ = ("node", "send", "recv", "backoff_s", "retry_at", "failing", "idle_since",
                 "sending_since", "scope")

    def __init__(self, node: NodeId, size: int, backoff_s: float) -> None:
        self.node = node
        self.send, self.recv = trio.open_memory_channel[bytes](size)
        self.backoff_s = backoff_s
        self.retry_at = -float("inf")
        self.failing = False
        self.idle_since: float | None = None
        """When the sender began waiting on an empty queue (``None``: not waiting)."""
        self.sending_since: float | None = None
        """When the write in progress began (``None``: not writing)."""
        self.scope = trio.CancelScope()
        """Covers the sender's use of its current stream; cancelled when a write
        blocks for ``send_timeout_s``."""


class RaftAdapter:
    """Runs one Raft core: ticks, Ready handling, peer streams, client calls.

    Args:
        core: the protocol state machine (this adapter is its only caller).
        storage: the core's storage; written here, read by the core.
        state: the replicated state machine committed entries are applied to;
            it must already reflect ``core.applied_index``.
        dialer: opens streams to peers.
        peer_addr: a peer's raft address, or ``None`` if unknown (its messages
            are then dropped and the core told it is unreachable).
        rng: seeds this adapter's read contexts (the core has its own RNG).
        storage_in_thread: run ``storage.save``/``create_snapshot`` in the
            adapter's storage thread (default; required for a real disk). Tests with
            :class:`~mesh.raft.storage.MemoryStorage` pass ``False`` so that
            trio's autojump clock does not move during a save.
        batcher: joins the commands proposed with a ``batch_key`` into one entry
            per ready-loop turn (:meth:`propose_nowait`); ``None``: every command
            gets an entry of its own.
    """

    def __init__(
        self,
        core: RaftCore,
        storage: RaftStorage,
        state: StateMachine,
        dialer: StreamDialer,
        peer_addr: PeerAddr,
        *,
        rng: random.Random,
        storage_in_thread: bool = True,
        batcher: Batcher | None = None,
    ) -> None:
        assert state.applied_index == core.applied_index, (
            f"state machine at {state.applied_index}, core at {core.applied_index}"
        )
        self._core = core
        self._cfg: RaftConfig = core.config
        self._storage = storage
        self._state = state
        self._dialer = dialer
        self._peer_addr = peer_addr
        self._storage_thread = _StorageThread(f"raft-storage-{core.id}") \
            if storage_in_thread else None
        self._max_frame = wire.DEFAULT_MAX_FRAME_BYTES
        self._read_prefix = hashlib.blake2b(
            core.id.encode() + rng.getrandbits(64).to_bytes(8, "big"), digest_size=12
        ).digest()
        self._read_seq = itertools.count(1)
        self._wake = trio.Event()
        self._changed = trio.Event()
        self.on_changed: Callable[[], None] | None = None
        """Called whenever :meth:`wait_changed` wakes, in the same step (it must not
        block or raise): a follower of every Ready without a task of its own."""
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._closed = False
        self._peers: dict[NodeId, _Peer] = {}
        self._inbound: set[trio.abc.Stream] = set()
        self._proposals: dict[int, Proposal | _Joined] = {}
        self._batcher = batcher
        self._batch: list[tuple[bytes, Proposal, Hashable]] = []
        """Proposals waiting to be joined into the next entry (see
        :meth:`propose_nowait`)."""
        self._batch_keys: set[Hashable] = set()
        self._batch_bytes = 0
        self._reads: dict[bytes, _Waiter] = {}
        self._applied_waiters: list[tuple[int, int, trio.Event]] = []
        self._applied_seq = itertools.count()
        self._storage_error: str | None = None
        self._last_leader: NodeId | None = core.leader
        self._was_leader = core.is_leader
        self._c: dict[str, int] = {
            name: 0
            for name, f in RaftAdapterStatistics.__dataclass_fields__.items()
            if f.type == "int"
        }
        self._c["snapshot_bytes"] = len(storage.snapshot().data)
        self._commit_latency = LatencyWindow()
        self._wal_sync_latency = LatencyWindow()

    @classmethod
    def create(
        cls,
        config: RaftConfig,
        node_id: NodeId,
        storage: RaftStorage,
        state: StateMachine,
        dialer: StreamDialer,
        peer_addr: PeerAddr,
        *,
        rng: random.Random,
        storage_in_thread: bool = True,
        batcher: Batcher | None = None,
    ) -> RaftAdapter:
        """Build the core over ``storage`` and the adapter around it.

        Loads the storage's snapshot into ``state`` first (unless ``state`` is
        already past it), so a restarted node resumes from its snapshot and
        re-applies the committed entries after it.

        Raises:
            StorageError: the snapshot's state image is malformed.
            LocalProtocolError: storage and state machine do not match.
        """
        snap = storage.snapshot()
        if not snap.is_empty and state.applied_index < snap.meta.index:
            state.restore(snap.data, snap.meta.index)
        core_rng = random.Random(rng.getrandbits(64))
        core = RaftCore(config, node_id, storage, core_rng, applied=state.applied_index)
        return cls(
            core,
            storage,
            state,
            dialer,
            peer_addr,
            rng=random.Random(rng.getrandbits(64)),
            storage_in_thread=storage_in_thread,
            batcher=batcher,
        )

    # ------------------------------------------------------------------ reading

    @property
    def core(self) -> RaftCore:
        """The core (read its state; never feed it directly)."""
        return self._core

    @property
    def me(self) -> NodeId:
        """This node's id."""
        return self._core.id

    @property
    def state(self) -> StateMachine:
        """The state machine (read it; only the adapter applies to it)."""
        return self._state

    @property
    def is_leader(self) -> bool:
        """Whether this node leads right now."""
        return self._core.is_leader

    @property
    def leader(self) -> NodeId | None:
        """Who this node believes leads."""
        return self._core.leader

    def statistics(self) -> RaftAdapterStatistics:
        """I/O and apply counters of this adapter."""
        return RaftAdapterStatistics(
            **self._c,
            commit_latency=self._commit_latency.summary(),
            wal_sync_latency=self._wal_sync_latency.summary(),
        )

    def status(self) -> dict[str, Any]:
        """The JSON-ready document behind ``meshctl raft status``.

        Keys: ``id``, ``term``, ``leader`` (node name or ``None``), ``role``,
        ``voters``, ``learners`` (names), ``commit_index``, ``applied_index``,
        ``last_index``, ``first_index``, ``snapshot_index``, ``lead_transferee``,
        ``storage_error``, and on the leader ``peers``: per peer ``match``,
        ``next``, ``state``, ``active``, ``learner`` and ``lag`` (entries behind).
        Metrics: ``apply_lag`` (committed entries not yet applied here),
        ``leader_changes``, ``snapshot_bytes`` (latest snapshot's state image),
        ``commit_latency`` and ``wal_sync_latency`` (:meth:`LatencySummary.as_dict
        <mesh.raft.metrics.LatencySummary.as_dict>`: count, sum and recent
        quantiles in seconds), ``entries_per_fsync`` (mean batch written per fsync),
        ``counters`` (what :class:`RaftAdapterStatistics` counts: frames, bytes,
        readies, saves, entries saved and applied, proposals...).
        """
        st = self._core.status()
        peers = {
            nid: {
                "match": p.match,
                "next": p.next,
                "state": p.state.value,
                "active": p.recent_active,
                "learner": p.is_learner,
                "lag": max(0, st.last_index - p.match),
            }
            for nid, p in st.progress.items()
            if nid != st.id
        }
        return {
            "id": st.id,
            "term": st.term,
            "leader": st.leader,
            "role": st.role.value,
            "voters": list(st.voters),
            "learners": list(st.learners),
            "commit_index": st.commit_index,
            "applied_index": st.applied_index,
            "last_index": st.last_index,
            "first_index": st.first_index,
            "snapshot_index": self._storage.snapshot().meta.index,
            "lead_transferee": st.lead_transferee,
            "storage_error": self._storage_error,
            "peers": peers,
            "apply_lag": st.commit_index - st.applied_index,
            "leader_changes": self._c["leader_changes"],
            "snapshot_bytes": self._c["snapshot_bytes"],
            "commit_latency": self._commit_latency.summary().as_dict(),
            "wal_sync_latency": self._wal_sync_latency.summary().as_dict(),
            "entries_per_fsync": round(
                self._c["entries_saved"] / max(1, self._wal_sync_latency.count), 2
            ),
            "counters": dict(self._c),
        }

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: tick, handle Readies, send to peers."""
        if self._running or self._closed:
            raise LocalProtocolError("a RaftAdapter runs once; build a new one to restart")
        self._running = True
        try:
            if self._storage_thread is not None:
                self._storage_thread.start()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._ready_loop)
                task_status.started()
        finally:
            if self._storage_thread is not None:
                self._storage_thread.stop()
            self._running = False
            self._closed = True
            self._nursery = None
            stopped = ProposalDropped("raft stopped on this node; the outcome is unknown, retry")
            self._fail_proposals(stopped)
            self._fail_reads(stopped)
            for peer in self._peers.values():
                peer.send.close()
            self._peers.clear()
            for stream in list(self._inbound):
                await trio.aclose_forcefully(stream)
            self._inbound.clear()
            self._signal_changed()

    async def serve_stream(self, stream: trio.abc.Stream, peer: NodeId | None = None) -> None:
        """Read length-prefixed raft frames from ``stream`` into the core until
        it closes, stays idle for ``stream_idle_timeout_s`` (up to a quarter
        more: the deadline moves a quarter ahead at a time, not at every read),
        or the adapter stops.

        Args:
            stream: an accepted stream (closed here).
            peer: the authenticated node at the other end (mTLS certificate),
                or ``None`` when the link is not authenticated. Frames whose
                ``src`` is another node are dropped.
        """
        if self._closed:
            await trio.aclose_forcefully(stream)
            return
        self._inbound.add(stream)
        decoder = wire.FrameDecoder(self._max_frame)
        idle_s = self._cfg.stream_idle_timeout_s
        try:
            async with stream:
                with trio.move_on_after(idle_s) as idle:
                    await self._read_frames(stream, decoder, peer, idle, idle_s)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            LOGGER.debug("raft_stream_closed node=%s peer=%s reason=%r", self.me, peer or "-", exc)
        finally:
            self._inbound.discard(stream)

    async def _read_frames(self, stream: trio.abc.Stream, decoder: wire.FrameDecoder,
                           peer: NodeId | None, idle: trio.CancelScope, idle_s: float) -> None:
        while not self._closed:
            chunk = await stream.receive_some(65_536)
            if not chunk:  # closed by the peer
                return
            now = trio.current_time()
            if idle.deadline < now + idle_s:
                idle.deadline = now + 1.25 * idle_s
            self._c["bytes_in"] += len(chunk)
            decoder.receive_data(bytes(chunk))
            while True:
                try:
                    payload = decoder.next_payload()
                except RemoteProtocolError as exc:
                    self._c["frames_malformed"] += 1
                    LOGGER.debug("raft_stream_rejected node=%s peer=%s reason=%s", self.me,
                                 peer or "-", exc)
                    return
                if not isinstance(payload, bytes):
                    break
                self._handle_frame(payload, peer)

    def _handle_frame(self, payload: bytes, peer: NodeId | None) -> None:
        if self._closed:
            return
        try:
            msg = from_wire(payload, self._max_frame)
        except RemoteProtocolError as exc:
            self._c["frames_malformed"] += 1
            LOGGER.debug("raft_frame_dropped node=%s peer=%s reason=%s", self.me, peer or "-", exc)
            return
        if msg.dst != self.me or (peer is not None and msg.src != peer):
            self._c["frames_misrouted"] += 1
            LOGGER.debug(
                "raft_frame_misrouted node=%s peer=%s src=%s dst=%s",
                self.me,
                peer or "-",
                msg.src,
                msg.dst,
            )
            return
        self._c["frames_in"] += 1
        self._core.step(msg)
        self._kick()

    # ------------------------------------------------------------------ client calls

    async def propose(self, command: bytes, *, timeout_s: float | None = None) -> object:
        """Replicate ``command`` and return what the state machine's ``apply``
        returned for it, once it is applied on this node.

        Raises:
            NotLeader: this node is not the leader (``leader_hint`` says who is).
            ProposalDropped: refused (leadership transfer, too many bytes in
                flight) or lost (leadership lost, not applied within
                ``timeout_s``, adapter stopped): retry, with the same request
                id so that a command that did commit is not applied twice.
            StorageError: this node's storage is failing; writes are stopped.
        """
        return await self.propose_nowait(command, timeout_s=timeout_s).wait()

    def propose_nowait(self, command: bytes, *, timeout_s: float | None = None,
                       batch_key: Hashable | None = None) -> Proposal:
        """Append ``command`` to the log and return at once: the :class:`Proposal`
        resolves when the entry is applied here (or fails like :meth:`propose`).

        With a ``batch_key`` (and a :class:`Batcher`), the command waits for the
        ready loop's next turn, which joins every command proposed until then
        into one entry (a single one is proposed as it is); proposals with equal
        keys never share an entry (a key-value write's key: all the commands of
        a batch get the same index). A proposal without a key goes into an entry
        of its own, after the batch in progress.

        Raises:
            NotLeader: this node is not the leader (``leader_hint`` says who is).
            ProposalDropped: refused (leadership transfer, too many bytes in flight).
            StorageError: this node's storage is failing; writes are stopped.
        """
        self._check_writable()
        batcher = self._batcher
        if batch_key is None or batcher is None or len(command) > batcher.max_bytes:
            self._flush_batch()
            eid = self._core.propose(command)
            return self._track(eid.index, eid.term, timeout_s)
        self._core.check_propose()
        if (batch_key in self._batch_keys or len(self._batch) >= batcher.max_commands
                or self._batch_bytes + len(command) > batcher.max_bytes):
            self._flush_batch()
        now = trio.current_time()
        timeout = self._cfg.propose_timeout_s if timeout_s is None else timeout_s
        proposal = Proposal(self._core.term, now, now + timeout)
        self._batch.append((command, proposal, batch_key))
        self._batch_keys.add(batch_key)
        self._batch_bytes += len(command)
        self._kick()
        return proposal

    async def propose_conf_change(
        self, change: ConfChange, *, timeout_s: float | None = None
    ) -> None:
        """Propose a single-server membership change and wait until it is applied.

        Raises:
            NotLeader: not the leader.
            ProposalDropped: another change is in progress, or it was lost.
            LocalProtocolError: the change makes no sense for the membership.
            StorageError: this node's storage is failing.
        """
        self._check_writable()
        eid = self._core.propose_conf_change(change)
        await self._track(eid.index, eid.term, timeout_s).wait()

    async def read_index(self, *, timeout_s: float | None = None) -> int:
        """A linearizable read point (dissertation §6.4): returns once the local
        state machine has applied everything committed when the read began, so
        reading it now is linearizable. Works on followers and learners too.

        Returns:
            The read index (the state machine's applied index is at least this).

        Raises:
            NotLeader: no leader is known.
            ProposalDropped: the leader changed, too many reads were pending,
                or no answer came within ``timeout_s``; retry.
        """
        ctx = self._read_prefix + next(self._read_seq).to_bytes(8, "big")
        self._core.read_index(ctx)
        waiter = _Waiter(leader=self._core.leader)
        self._reads[ctx] = waiter
        self._kick()
        timeout = self._cfg.propose_timeout_s if timeout_s is None else timeout_s
        try:
            with trio.move_on_after(timeout) as scope:
                await waiter.event.wait()
                if waiter.error is None:
                    await self.wait_applied(waiter.index)
        finally:
            self._reads.pop(ctx, None)
        if waiter.error is not None:
            raise waiter.error
        if scope.cancelled_caught:
            raise ProposalDropped(
                f"read not confirmed by a leader quorum within {timeout:g}s; retry"
            )
        return waiter.index

    async def transfer_leadership(
        self, target: NodeId, *, timeout_s: float | None = None
    ) -> NodeId:
        """Hand leadership to ``target`` (``meshctl raft transfer``) and wait
        until this node follows a new leader.

        Returns:
            The new leader (normally ``target``).

        Raises:
            NotLeader: not the leader.
            LocalProtocolError: ``target`` is not a voter.
            ProposalDropped: the transfer did not happen within the timeout.
        """
        self._core.transfer_leadership(target)
        self._kick()
        timeout = (
            2 * self._cfg.election_ticks * self._cfg.tick_interval_s
            if timeout_s is None
            else timeout_s
        )
        with trio.move_on_after(timeout):
            while self._core.is_leader or self._core.leader is None:
                await self.wait_changed()
                self._check_running()
            return self._core.leader
        raise ProposalDropped(f"leadership transfer to {target} did not finish within {timeout:g}s")

    async def wait_applied(self, index: int) -> None:
        """Wait until the state machine has applied ``index``.

        Raises:
            ProposalDropped: the adapter stopped first.
        """
        if self._state.applied_index < index and not self._closed:
            event = trio.Event()
            heapq.heappush(self._applied_waiters, (index, next(self._applied_seq), event))
            await event.wait()
        if self._state.applied_index < index:
            raise ProposalDropped(f"raft stopped on this node before index {index} was applied")

    async def wait_changed(self) -> None:
        """Wait until the next Ready has been handled (or the adapter stopped)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        await self._changed.wait()

    async def wait_leader(self) -> NodeId:
        """Wait until this node knows a leader; return it.

        Raises:
            ProposalDropped: the adapter stopped first.
        """
        while True:
            leader = self._core.leader
            if leader is not None:
                await trio.lowlevel.checkpoint()
                return leader
            await self.wait_changed()
            self._check_running()

    def _check_running(self) -> None:
        if self._closed:
            raise ProposalDropped("raft is not running on this node")

    async def manage_voters(
        self,
        members: Callable[[], Sequence[voter_selection.Candidate]],
        *,
        desired: int | Callable[[], int] = 3,
        interval_s: float = 1.0,
        catch_up_entries: int = 250,
    ) -> None:
        """While leader, move the voters toward :func:`mesh.raft.voters.target_voters`,
        one :func:`~mesh.raft.voters.next_step` every ``interval_s``.

        Args:
            members: the live members now (e.g. ``voters.candidates(...)`` over
                the gossip members).
            desired: wanted voters (``--raft-voters``), or a function asked at
                every look (the cluster configuration may change it).
            interval_s: seconds between two looks.
            catch_up_entries: a learner at most this many entries behind the
                leader's log (and recently active) is promoted.

        Raises:
            ConfigError: ``desired`` is not allowed.
        """
        wanted = desired if callable(desired) else lambda: desired
        voter_selection.check_desired(wanted())
        pause = interval_s
        while True:
            await trio.sleep(pause)
            pause = interval_s
            if not self._core.is_leader or self._closed:
                continue
            st = self._core.status()
            caught_up = [
                n
                for n in st.learners
                if (p := st.progress.get(n)) is not None
                and p.recent_active
                and p.match + catch_up_entries >= st.last_index
            ]
            step = voter_selection.next_step(
                members(),
                st.voters,
                st.learners,
                desired=wanted(),
                leader=self.me,
                caught_up=caught_up,
            )
            if step is None:
                continue
            LOGGER.info(
                "raft_voter_step node=%s term=%s change=%s peer=%s",
                self.me,
                st.term,
                step.kind.name,
                step.node,
            )
            try:
                await self.propose_conf_change(step)
                if step.kind is ConfChangeKind.ADD_LEARNER:
                    # a learner only receives the log: add the next one at once, so
                    # every member of a new cluster has its replica within moments
                    pause = 0.0
            except (NotLeader, ProposalDropped, LocalProtocolError, StorageError) as exc:
                LOGGER.info(
                    "raft_voter_step_failed node=%s change=%s peer=%s reason=%s",
                    self.me,
                    step.kind.name,
                    step.node,
                    exc,
                )

    def _check_writable(self) -> None:
        self._check_running()
        if self._storage_error is not None:
            raise StorageError(
                f"raft storage is failing ({self._storage_error}); writes are stopped until "
                "it recovers: free disk space or fix the disk"
            )

    def _flush_batch(self) -> None:
        """Propose the waiting batch as one entry (see :meth:`propose_nowait`)."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self._batch_keys = set()
        self._batch_bytes = 0
        assert self._batcher is not None
        try:
            if len(batch) == 1:
                command, proposal, _ = batch[0]
                eid = self._core.propose(command)
                proposal.term = eid.term
                self._proposals[eid.index] = proposal
                return
            eid = self._core.propose(self._batcher.join([c for c, _, _ in batch]))
        except (NotLeader, ProposalDropped) as exc:
            # Accepted a moment ago, in this ready loop turn: the leadership
            # changed since, or the log is full.
            lost = exc if isinstance(exc, ProposalDropped) else ProposalDropped(
                "this node lost the leadership before the write was proposed; retry")
            for _, proposal, _ in batch:
                self._lose(proposal, lost)
            return
        self._proposals[eid.index] = _Joined(eid.term, [p for _, p, _ in batch])

    def _track(self, index: int, term: int, timeout_s: float | None) -> Proposal:
        now = trio.current_time()
        timeout = self._cfg.propose_timeout_s if timeout_s is None else timeout_s
        proposal = Proposal(term, now, now + timeout)
        self._proposals[index] = proposal
        self._kick()
        return proposal

    # ------------------------------------------------------------------ the loops

    def _kick(self) -> None:
        self._wake.set()

    def _signal_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self.on_changed is not None:
            self.on_changed()

    async def _tick_loop(self) -> None:
        interval = self._cfg.tick_interval_s
        deadline = trio.current_time() + interval
        while True:
            await trio.sleep_until(deadline)
            self._core.tick()
            self._kick()
            now = trio.current_time()
            self._expire_proposals(now)
            self._watch_senders(now)
            deadline += interval
            if deadline <= now:
                # The process stalled (SIGSTOP, a long GC): skip missed ticks
                # rather than firing a burst that would look like lost heartbeats.
                deadline = now + interval

    async def _ready_loop(self) -> None:
        while True:
            self._flush_batch()
            rd = self._core.ready()
            if rd is None:
                self._wake = trio.Event()
                await self._wake.wait()
                # Let the other tasks woken by the same I/O poll (requests that
                # arrived together) propose before this Ready is cut.
                await trio.lowlevel.checkpoint()
                continue
            await self._handle_ready(rd)

    async def _handle_ready(self, rd: Ready) -> None:
        self._c["readies"] += 1
        if rd.send_before_persist:
            # A leader's messages: its followers write while it writes.
            self._c["sends_before_persist"] += 1
            self._send_all(rd.messages)
        if rd.snapshot is None:
            # Committed entries are durable on a quorum already: apply them
            # (and wake their proposers, whose answers go out while this task
            # waits for the disk) before persisting this Ready's new entries.
            self._apply(rd)
            await self._persist(rd)
        else:
            await self._persist(rd)
            self._restore(rd)
            self._apply(rd)
        if not rd.send_before_persist:
            self._send_all(rd.messages)
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state.leader, rd.soft_state.role)
        self._core.advance(rd)
        assert self._state.applied_index == self._core.applied_index, (
            f"state machine at {self._state.applied_index}, core at {self._core.applied_index}"
        )
        self._notify_applied()
        await self._maybe_snapshot()
        self._signal_changed()

    def _send_all(self, messages: Sequence[RaftMessage]) -> None:
        for m in messages:
            self._enqueue(m)

    def _restore(self, rd: Ready) -> None:
        assert rd.snapshot is not None
        index = rd.snapshot.meta.index
        self._state.restore(rd.snapshot.data, index)
        self._c["snapshots_restored"] += 1
        self._c["snapshot_bytes"] = len(rd.snapshot.data)
        lost = ProposalDropped(
            "replaced by a snapshot from the leader; the outcome is unknown: retry with "
            "the same request id"
        )
        for i in [i for i in self._proposals if i <= index]:
            self._lose(self._proposals.pop(i), lost)

    def _apply(self, rd: Ready) -> None:
        now = trio.current_time() if self._proposals else 0.0
        for e in rd.committed_entries:
            result = self._state.apply(e)
            self._c["entries_applied"] += 1
            proposal = self._proposals.pop(e.index, None)
            if proposal is not None:
                if e.term == proposal.term:
                    self._c["proposals_committed"] += (
                        len(proposal.parts) if type(proposal) is _Joined else 1)
                    self._commit_latency.observe(now - proposal.started)
                    proposal.resolve(result)
                else:
                    self._lose(
                        proposal,
                        ProposalDropped(
                            f"entry {e.index} was replaced after a leader change; retry with "
                            "the same request id"
                        ),
                    )
        for rs in rd.read_states:
            read = self._reads.get(rs.context)
            if read is not None:
                read.index = rs.index
                read.resolve()

    def _on_soft_state(self, leader: NodeId | None, role: Role) -> None:
        if leader != self._last_leader:
            if leader is not None:
                self._c["leader_changes"] += 1
            self._last_leader = leader
            dropped = ProposalDropped(f"the leader changed (now {leader or 'unknown'}); retry")
            for ctx, waiter in list(self._reads.items()):
                if waiter.leader != leader and waiter.index == 0:
                    self._reads.pop(ctx)
                    waiter.fail(dropped)
        is_leader = role is Role.LEADER
        if self._was_leader and not is_leader:
            self._fail_proposals(
                ProposalDropped(
                    f"this node lost the leadership (leader now {leader or 'unknown'}); the "
                    "outcome is unknown: retry with the same request id"
                )
            )
        self._was_leader = is_leader

    def _expire_proposals(self, now: float) -> None:
        """Fail proposals past their deadline (one sweep per tick instead of a
        cancel scope per proposal)."""
        expired = [i for i, w in self._proposals.items() if w.deadline <= now]
        for index in expired:
            self._lose(
                self._proposals.pop(index),
                ProposalDropped(
                    f"entry {index} was not applied within the propose timeout; the outcome "
                    "is unknown: retry with the same request id"
                ),
            )
        if any(p.deadline <= now for _, p, _ in self._batch):
            # The ready loop has not turned since (a stalled disk): never proposed.
            waiting, self._batch = self._batch, []
            self._batch_keys = set()
            self._batch_bytes = 0
            for command, proposal, key in waiting:
                if proposal.deadline > now:
                    self._batch.append((command, proposal, key))
                    self._batch_keys.add(key)
                    self._batch_bytes += len(command)
                else:
                    self._lose(proposal, ProposalDropped(
                        "the write was not proposed within the propose timeout (this node's "
                        "storage is slow); retry"))

    def _fail_proposals(self, error: ProposalDropped) -> None:
        proposals, self._proposals = self._proposals, {}
        batch, self._batch = self._batch, []
        self._batch_keys = set()
        self._batch_bytes = 0
        for proposal in [*proposals.values(), *(p for _, p, _ in batch)]:
            self._lose(proposal, error)

    def _lose(self, proposal: Proposal | _Joined, error: ProposalDropped) -> None:
        """Fail a proposal whose entry may or may not commit (counted as lost)."""
        self._c["proposals_lost"] += len(proposal.parts) if type(proposal) is _Joined else 1
        proposal.fail(error)

    def _fail_reads(self, error: ProposalDropped) -> None:
        waiters, self._reads = self._reads, {}
        for waiter in waiters.values():
            waiter.fail(error)
        for _, _, event in self._applied_waiters:
            event.set()
        self._applied_waiters = []

    def _notify_applied(self) -> None:
        applied = self._state.applied_index
        while self._applied_waiters and self._applied_waiters[0][0] <= applied:
            heapq.heappop(self._applied_waiters)[2].set()

    async def _storage_call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        call = functools.partial(fn, *args, **kwargs)
        if self._storage_thread is not None:
            return await self._storage_thread.call(call)
        return call()

    async def _persist(self, rd: Ready) -> None:
        if rd.snapshot is None and not rd.entries and rd.hard_state is None:
            return
        backoff = self._cfg.reconnect_min_s
        while True:
            try:
                if rd.must_sync or rd.snapshot is not None:
                    took = await self._storage_call(
                        _timed, self._storage.save, rd.hard_state, rd.entries, rd.snapshot,
                        sync=rd.must_sync,
                    )
                    if rd.must_sync:
                        self._wal_sync_latency.observe(took)
                else:
                    # Only the commit index moved: a write without fsync, too
                    # short to be worth a worker thread.
                    self._storage.save(rd.hard_state, rd.entries, None, sync=False)
            except StorageError as exc:
                self._c["storage_errors"] += 1
                self._storage_error = str(exc)
                self._signal_changed()  # status() changed: let watchers see it
                LOGGER.error(
                    "raft_storage_failed node=%s term=%s retry_in=%gs reason=%s",
                    self.me,
                    self._core.term,
                    backoff,
                    exc,
                )
                await trio.sleep(backoff)
                backoff = min(2 * backoff, self._cfg.storage_retry_max_s)
                continue
            if self._storage_error is not None:
                LOGGER.warning("raft_storage_recovered node=%s", self.me)
                self._storage_error = None
            self._c["saves"] += 1
            self._c["entries_saved"] += len(rd.entries)
            return

    async def _maybe_snapshot(self) -> None:
        applied = self._core.applied_index
        snap_index = self._storage.snapshot().meta.index
        if applied - snap_index < self._cfg.snapshot_entries:
            return
        data = self._state.snapshot()
        conf = self._core.conf_state
        try:
            await self._storage_call(self._storage.create_snapshot, applied, conf, data)
            compact_to = applied - self._cfg.snapshot_keep_entries
            if compact_to >= self._storage.first_index():
                # In this thread: compaction changes the entries the core reads.
                self._storage.compact(compact_to)
        except StorageError as exc:
            LOGGER.error("raft_snapshot_failed node=%s index=%s reason=%s", self.me, applied, exc)
            return
        self._c["snapshots_created"] += 1
        self._c["snapshot_bytes"] = len(data)
        LOGGER.info(
            "raft_snapshot_created node=%s term=%s index=%s bytes=%s",
            self.me,
            self._core.term,
            applied,
            len(data),
        )

    # ------------------------------------------------------------------ peers

    def _enqueue(self, m: RaftMessage) -> None:
        try:
            frame = wire.frame(m.to_wire(), self._max_frame)
        except LocalProtocolError as exc:
            LOGGER.error("raft_message_too_large node=%s peer=%s reason=%s", self.me, m.dst, exc)
            return
        peer = self._peers.get(m.dst)
        if peer is None:
            assert self._nursery is not None
            peer = _Peer(m.dst, self._cfg.send_queue_msgs, self._cfg.reconnect_min_s)
            self._peers[m.dst] = peer
            self._nursery.start_soon(self._sender, peer)
        try:
            peer.send.send_nowait(frame)
        except trio.WouldBlock:
            self._c["queue_drops"] += 1
            self._core.report_unreachable(m.dst)
        except trio.BrokenResourceError:
            self._c["send_drops"] += 1

    def _watch_senders(self, now: float) -> None:
        """Close the queue of a peer whose sender waited ``stream_idle_timeout_s``
        for a message (its stream is closed; the next message starts over), and
        cut the stream of one whose write has blocked ``send_timeout_s``."""
        for peer in list(self._peers.values()):
            if peer.sending_since is not None:
                if now - peer.sending_since >= self._cfg.send_timeout_s:
                    peer.scope.cancel()
            elif peer.idle_since is not None and \
                    now - peer.idle_since >= self._cfg.stream_idle_timeout_s:
                del self._peers[peer.node]
                peer.send.close()

    async def _next_batch(self, peer: _Peer) -> list[bytes] | None:
        """Queued frames up to ``send_batch_bytes`` (waiting for one), or ``None``
        once the queue is closed and empty."""
        try:
            first = peer.recv.receive_nowait()
        except trio.WouldBlock:
            peer.idle_since = trio.current_time()
            try:
                first = await peer.recv.receive()
            except trio.EndOfChannel:
                return None
            finally:
                peer.idle_since = None
        except trio.EndOfChannel:
            return None
        batch = [first]
        size = len(first)
        while size < self._cfg.send_batch_bytes:
            try:
                frame = peer.recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.append(frame)
            size += len(frame)
        return batch

    async def _sender(self, peer: _Peer) -> None:
        batch = await self._next_batch(peer)
        while batch is not None:
            stream = await self._connect(peer, len(batch))
            if stream is None:
                batch = await self._next_batch(peer)
                continue
            failure = ""
            peer.scope = trio.CancelScope()
            try:
                with peer.scope:
                    while batch is not None:
                        data = b"".join(batch)
                        peer.sending_since = trio.current_time()
                        try:
                            await stream.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError,
                                OSError) as exc:
                            failure = f"write failed: {exc!r}"
                            break
                        finally:
                            peer.sending_since = None
                        self._c["frames_out"] += len(batch)
                        self._c["bytes_out"] += len(data)
                        batch = await self._next_batch(peer)
                if peer.scope.cancelled_caught:
                    failure = f"a write blocked for {self._cfg.send_timeout_s:g}s"
            finally:
                await trio.aclose_forcefully(stream)
            if failure:
                self._send_failed(peer, len(batch) if batch is not None else 0, failure)
                batch = await self._next_batch(peer)

    async def _connect(self, peer: _Peer, frames: int) -> trio.abc.Stream | None:
        if trio.current_time() < peer.retry_at:
            self._c["send_drops"] += frames
            self._core.report_unreachable(peer.node)
            self._kick()
            return None
        addr = self._peer_addr(peer.node)
        if addr is None:
            self._send_failed(peer, frames, "no known address")
            return None
        try:
            with trio.fail_after(self._cfg.dial_timeout_s):
                stream = await self._dialer.open_stream(addr, expect=peer.node)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError,
                RemoteProtocolError) as exc:
            # RemoteProtocolError: the link was refused (TLS: revoked, wrong CA...).
            self._send_failed(peer, frames, f"dial {addr} failed: {exc!r}")
            return None
        self._c["dials"] += 1
        peer.backoff_s = self._cfg.reconnect_min_s
        if peer.failing:
            peer.failing = False
            LOGGER.info("raft_peer_reachable node=%s peer=%s addr=%s", self.me, peer.node, addr)
        return stream

    def _send_failed(self, peer: _Peer, frames: int, reason: str) -> None:
        self._c["send_failures"] += 1
        self._c["send_drops"] += frames
        level = logging.DEBUG if peer.failing else logging.WARNING
        LOGGER.log(
            level,
            "raft_peer_unreachable node=%s peer=%s retry_in=%gs reason=%s",
            self.me,
            peer.node,
            peer.backoff_s,
            reason,
        )
        peer.failing = True
        peer.retry_at = trio.current_time() + peer.backoff_s
        peer.backoff_s = min(2 * peer.backoff_s, self._cfg.reconnect_max_s)
        self._core.report_unreachable(peer.node)
        self._kick()


def _timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    """Run ``fn`` (in the worker thread) and return how long it took, in seconds."""
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


__all__: Sequence[str] = (
    "ALPN",
    "PeerAddr",
    "Proposal",
    "RaftAdapter",
    "RaftAdapterStatistics",
    "StateMachine",
    "StreamDialer",
)
