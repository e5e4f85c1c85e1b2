"""The node's replica of the desired state: Raft storage, adapter, voters, watch and API.

Every node runs a :class:`~mesh.raft.adapter.RaftAdapter` over ``DIR/raft``. The node
that created the cluster bootstraps a one-voter configuration; every other node
starts empty. The leader keeps ``--raft-voters`` voters (3 by default): it adds a
member it is about to promote as a learner, catches it up, promotes it, and
replaces a dead voter the same way, one membership change at a time
(:mod:`mesh.raft.voters`). Only the voters (and a learner for the moments of its
catch-up) receive the log.

Every other node is a *watcher*: it keeps its read replica through the resumable
watch stream of :mod:`mesh.raft.watch` (DESIGN.md, State). The watch loop picks a
live voter (rendezvous hash on the node names, followers before the leader), asks
it over a dedicated ``mesh-rpc/1`` link for the entries after the local applied
index (a long poll) or a snapshot when it is too far behind, and moves to another
voter when a call fails or the voter has no leader. The loop idles while Raft
feeds this node: it is a voter or learner in its own configuration, it leads or
knows a leader, and it heard from the group within :data:`RAFT_QUIET_S`; so a
node removed from the configuration (which never hears of its removal) goes back
to watching by itself. Both feeds go through one
:class:`~mesh.raft.watch.StateGate`, the adapter's state machine, which applies
each index once and only forward (see its hand-over notes). Every node keeps the
last committed entries it applied for watchers; only voters that Raft feeds
serve them (the ``watch`` API method), others redirect.

Readers (agent, planner, DNS, events, deny list, long polls) follow
:meth:`Replica.wait_changed` and :attr:`Replica.leader`, which cover both feeds.
Each names what it follows: some tables (a restored snapshot changes every table;
it also resets the state's change list, which they already handle:
``changes_since`` raises ``Compacted``), any applied index, or the view of the
group (leader, term, role, membership, feed). Under a key-value write load nearly
every Ready moves only the key-value table, so the readers of the other tables
sleep through it. The adapter calls the replica back at the end of each Ready,
in the same step (``RaftAdapter.on_changed``: no relay task).

Raft messages travel over ``mesh-raft/1`` on the gossip port, so a peer's identity
comes from its certificate and the peer's address from membership. Writes reaching
a node that is not the leader are forwarded to the leader over ``mesh-rpc/1``
(once: a forwarded call that lands on a non-leader again fails with a message to
retry) over one kept-open link per node that carries many calls at once
(:class:`~mesh.node.api.RpcLink`). Reads are linearizable (ReadIndex) unless
``stale`` is asked for; on a watcher a linearizable read asks a voter for a read
index (``raft_read_index``) and waits until the watch stream has applied it.
``kv_watch`` (``meshctl kv watch``) long-polls the readers' state's change list for
keys under a prefix, so it works the same on voters and watchers.

Resource handling:
    :meth:`Replica.open` opens the WAL (blocking, in a thread); :meth:`Replica.aclose`
    closes it and the links to other nodes. The adapter's tasks and the links run
    in the node's nursery.

Error handling:
    NotLeader without a reachable leader, dropped proposals and storage failures
    become :class:`~mesh.node.api.ApiError` with what to do next. A watch call that
    fails (link, timeout, malformed answer, bad snapshot image) backs that voter off
    and the loop asks another; nothing a voter answers can end the loop.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import trio

from mesh import tls
from mesh.errors import MeshError, NotLeader, ProposalDropped, RemoteProtocolError, StorageError
from mesh.gossip.core import Membership, MemberView
from mesh.gossip.messages import Status
from mesh.node import api
from mesh.node.config import NodeConfig
from mesh.node.messages import MAX_API_FRAME_BYTES
from mesh.node.metrics import Metric, counter, gauge, summary
from mesh.node.trust import Trust
from mesh.raft import voters
from mesh.raft.adapter import Proposal, RaftAdapter
from mesh.raft.config import RaftConfig
from mesh.raft.state import (
    MAX_INDEX,
    Change,
    ClusterCa,
    Command,
    ConfigSet,
    DenyAdd,
    KvBatcher,
    KvDelete,
    KvEntry,
    KvPut,
    MeshState,
    Result,
    Table,
    decode_command,
)
from mesh.raft.storage import Compacted, FileStorage, bootstrap
from mesh.raft.watch import (
    AnswerKind,
    ApplyEntries,
    ClusterView,
    SnapshotImage,
    StateGate,
    WatchAnswer,
    WatchBuffer,
    WatchClient,
    WatchConfig,
    WatchRequest,
    WatchServer,
)
from mesh.types import Addr, NodeId

LOGGER = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 15.0
"""Bound on a write forwarded to the leader."""

READ_LEADER_WAIT_S = 5.0
"""How long a linearizable read waits for a leader to be known (an election)."""

READ_APPLY_WAIT_S = 10.0
"""How long a linearizable read on a watcher waits for the watch stream to reach
the read index."""

FRESH_RETRY_S = 1.0
"""Pause between two attempts of :meth:`Replica.wait_fresh`."""

RAFT_QUIET_S = 2.0
"""A member that heard nothing from its group for this long (and is not the
leader) watches a voter instead: it was removed, or is cut off from the leader."""

WATCHERS_RECENT_S = 30.0
"""A voter lists the watchers that asked it within this many seconds."""

KV_LIST_MAX = 10_000
"""Most entries one ``kv_ls`` answer (or one compacted ``kv_watch`` answer) holds."""

KV_WATCH_MAX_WAIT_S = 30.0
"""Longest long poll of one ``kv_watch`` call (a longer ``wait_s`` is cut to this);
a client's own timeout must be longer."""

KV_WATCH_MAX_EVENTS = 1000
"""The ``limit`` a ``kv_watch`` answer passes to ``changes_since`` (one log index
is never split, so an answer may hold a few more)."""

KV_WATCH_MAX_BYTES = MAX_API_FRAME_BYTES // 2
"""Keys and values in one ``kv_watch`` answer, at most (8 MiB: half the API frame
limit, leaving room for the rest of each event); the first log index of an answer
is sent whole even if it is bigger. A ``kv_ls`` answer holds no more either."""


_TABLES = tuple(Table)
"""Every table (a tuple is cheaper to walk than the enum, at each Ready)."""


class _ChangeWaiter:
    """One caller of :meth:`Replica.wait_changed` and what it waits for."""

    __slots__ = ("tables", "applied", "view", "event", "since")

    def __init__(self, tables: frozenset[Table], applied: bool, view: bool) -> None:
        self.tables = tables
        self.applied = applied
        self.view = view
        self.event = trio.Event()
        self.since = 0
        """Set when woken: the readers' applied index before the change that woke it."""


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """How this node takes part in Raft.

    Attributes:
        raft: Raft timing.
        voters: wanted voters (3 or 5; fewer in smaller clusters).
        stable_s: seconds a member must have been alive before it may become a
            voter (autopilot's stabilization time).
        watch: bounds and timings of the watch stream.
    """

    raft: RaftConfig
    voters: int = 3
    stable_s: float = 10.0
    watch: WatchConfig = WatchConfig()


class Replica:
    """The running Raft member (or watcher) of this node and its API.

    Args:
        raft: the adapter, whose state machine is ``gate``.
        gate: the readers' state and its two feeds.
        storage: the adapter's storage (closed by :meth:`aclose`).
        core: gossip membership (who is alive, where).
        trust: TLS material for links to other nodes.
        settings: how this node takes part.
    """

    def __init__(self, raft: RaftAdapter, gate: StateGate, storage: FileStorage,
                 core: Membership, trust: Trust, settings: ReplicaSettings) -> None:
        self.raft = raft
        self.gate = gate
        self.state = gate.state
        self._storage = storage
        self._core = core
        self._trust = trust
        self._settings = settings
        self._links: dict[NodeId, api.RpcLink] = {}
        self._dialing: dict[NodeId, trio.Lock] = {}
        self._answers = _Answers()
        self._nursery: trio.Nursery | None = None
        self._fed_at = -float("inf")
        """When Raft last fed this node (a Ready while a member that knows a leader)."""
        self.watch_client = WatchClient(raft.me, settings.watch)
        self._watch_server = WatchServer(settings.watch, gate.buffer)
        self._watch_link: tuple[NodeId, api.RpcLink] | None = None
        self._waiters: dict[_ChangeWaiter, None] = {}
        """The callers of :meth:`wait_changed` (insertion order: woken in turn)."""
        self._signalled_index = self.state.applied_index
        """The readers' applied index at the last :meth:`_signal_changed`."""
        self._signalled_view = self._view_key(self.membership())
        """:meth:`_view_key` at the last :meth:`_signal_changed`."""
        raft.on_changed = self._raft_changed

    @classmethod
    async def open(cls, config: NodeConfig, core: Membership, trust: Trust,
                   settings: ReplicaSettings, rng: random.Random) -> Replica:
        """Open ``DIR/raft`` (bootstrapping it on the node that created the cluster).

        Raises:
            StartupError-like StorageError: the WAL is corrupt (the message says how
                to recover).
        """
        storage = await trio.to_thread.run_sync(FileStorage, config.data_dir / "raft")
        if trust.created_cluster and storage.last_index() == 0:
            await trio.to_thread.run_sync(bootstrap, storage, [config.name])
            LOGGER.info("raft_bootstrapped node=%s voters=%s", config.name, config.name)
        buffer = WatchBuffer(settings.watch)

        def term_of(index: int) -> int | None:
            meta = storage.snapshot().meta
            return meta.term if meta.index == index else None

        gate = StateGate(MeshState(), buffer, term_of)

        def peer_addr(node: NodeId) -> Addr | None:
            view = core.member(node)
            return view.addr if view is not None and view.status <= Status.SUSPECT else None

        dialer = tls.TlsDialer(trust.client_ctx, tls.ALPN_RAFT, revoked=trust.revoked)
        raft = RaftAdapter.create(settings.raft, config.name, storage, gate, dialer,
                                  peer_addr, rng=rng, batcher=KvBatcher(gate.state))
        return cls(raft, gate, storage, core, trust, settings)

    async def aclose(self) -> None:
        """Close the links to other nodes and the WAL."""
        for link in self._links.values():
            link.close()
        self._links.clear()
        self._close_watch_link()
        self._storage.close()

    async def start(self, nursery: trio.Nursery) -> None:
        """Run the adapter and the voter management in ``nursery``."""
        self._nursery = nursery
        await nursery.start(self.raft.run)

        def members() -> list[voters.Candidate]:
            return voters.candidates(self._core.members(), trio.current_time(),
                                     stable_s=self._settings.stable_s)

        nursery.start_soon(functools.partial(self.raft.manage_voters, members,
                                             desired=self.desired_voters))
        nursery.start_soon(self._watch_loop)
        nursery.start_soon(self._follow_deny_list)

    def desired_voters(self) -> int:
        """The voters the leader keeps: the cluster configuration's count (``meshctl
        raft config --voters``), else this node's ``--raft-voters``. A count this
        version does not run (set by a newer one) becomes the largest it runs below
        it."""
        configured = self.state.cluster_config().raft_voters
        if configured is None:
            return self._settings.voters
        return max(c for c in voters.ALLOWED_VOTER_COUNTS if c <= configured)

    # --- which feed, who leads --------------------------------------------------------

    async def wait_changed(self, tables: Collection[Table] = (), *, applied: bool = False,
                           view: bool = False) -> int:
        """Wait until either feed changes something the caller follows.

        Only changes signalled after the call wake it: look at the state, then
        wait, with no checkpoint in between (or compare the state with what was
        seen before waiting again).

        Args:
            tables: wake when one of these tables changed (a restored snapshot
                changes every table).
            applied: wake when the readers' applied index moved (any entry).
            view: wake when the view of the group changed: this node's Raft
                leader, term or role, its membership, which feed feeds it,
                :attr:`leader`, the voter the watch stream follows, or the vault
                (a :attr:`leader` that only times out is noticed at the next Ready
                or watch answer).

        Returns:
            The readers' applied index before the change that woke the caller: no
            change of ``tables`` at or below it came since the call, so a reader
            that had seen the state at ``seen`` finds every change it missed in
            ``changes_since(max(seen, returned))``, however many writes of other
            tables it slept through.
        """
        assert tables or applied or view, "wait_changed needs something to wait for"
        waiter = _ChangeWaiter(frozenset(tables), applied, view)
        self._waiters[waiter] = None
        try:
            await waiter.event.wait()
        finally:
            self._waiters.pop(waiter, None)
        return waiter.since

    def _signal_changed(self, membership: str | None = None) -> None:
        """Wake the :meth:`wait_changed` callers concerned by what changed since the
        last call (each Ready and each watch answer ends here); ``membership`` is
        :meth:`membership` if the caller has it."""
        state = self.state
        before, applied = self._signalled_index, state.applied_index
        assert applied >= before, f"readers' state went back from {before} to {applied}"
        view = self._view_key(membership or self.membership())
        moved, view_moved = applied != before, view != self._signalled_view
        if not (moved or view_moved):
            return
        self._signalled_index, self._signalled_view = applied, view
        tables = frozenset(t for t in _TABLES if state.last_change(t) > before) if moved \
            else frozenset()
        woken = [w for w in self._waiters
                 if (view_moved and w.view) or (moved and w.applied)
                 or not tables.isdisjoint(w.tables)]
        for waiter in woken:
            del self._waiters[waiter]
            waiter.since = before
            waiter.event.set()

    def _raft_changed(self) -> None:
        """The adapter handled a Ready (or stopped): note when Raft last fed this
        node and wake the readers concerned."""
        membership = self.membership()
        if self.raft.leader is not None and membership != "watcher":
            self._fed_at = trio.current_time()
            self.raft.core.hold_campaigns(False)  # a member again (a bool compare)
        self._signal_changed(membership)

    def _view_key(self, membership: str) -> tuple[object, ...]:
        """What :meth:`wait_changed` callers with ``view`` follow (compared between
        two signals); ``membership`` is :meth:`membership`."""
        feeds = self._feeds(membership)
        core, client = self.raft.core, self.watch_client
        leader = core.leader if feeds else client.leader(trio.current_time())
        watched_term = client.view.term if client.view is not None else 0
        return (membership, feeds, core.role, core.term, core.leader, leader, watched_term,
                client.source, self.gate.vault.version)

    def membership(self) -> str:
        """``voter`` or ``learner`` (in this node's Raft configuration), else
        ``watcher``."""
        conf = self.raft.core.conf_state
        if self.raft.me in conf.voters:
            return "voter"
        return "learner" if self.raft.me in conf.learners else "watcher"

    def _removed_by_group(self, membership: str) -> bool:
        """Whether this node's own configuration names it a member (``membership``)
        while the group, as the watch stream brings it, does not: it was removed
        while away, and nobody tells a removed node.

        Only a view that names a live leader, in this node's term or a later one,
        counts: a voter that lost its leader too answers with what it knows (or
        with no voters at all), and a node that took that for its removal would
        hold its campaigns while the group needs it to elect a leader.
        """
        if membership == "watcher" or self._feeds(membership):
            return False
        view = self.watch_client.view
        return (view is not None and self.watch_client.leader(trio.current_time()) is not None
                and view.term >= self.raft.core.term
                and self.raft.me not in (*view.voters, *view.learners))

    def raft_feeds(self) -> bool:
        """Whether Raft feeds this node now (else the watch stream does): it leads,
        or it is a member that knew a leader within :data:`RAFT_QUIET_S` (an
        election does not start the watch stream)."""
        return self._feeds(self.membership())

    def _feeds(self, membership: str) -> bool:
        """:meth:`raft_feeds`, ``membership`` being :meth:`membership`."""
        if self.raft.is_leader:
            return True
        return membership != "watcher" and trio.current_time() - self._fed_at <= RAFT_QUIET_S

    @property
    def leader(self) -> NodeId | None:
        """The leader as this node knows it: from Raft while Raft feeds it, else
        from the voters' watch answers (``None`` once they stop coming)."""
        if self.raft_feeds():
            return self.raft.leader
        return self.watch_client.leader(trio.current_time())

    def status(self) -> dict[str, Any]:
        """The ``raft status`` document: the adapter's (see
        :meth:`RaftAdapter.status`), with ``membership`` (``voter``, ``learner`` or
        ``watcher``), ``feed`` (``raft`` or ``watch``), ``applied_index`` of the
        readers' state, ``raft_applied_index`` (the adapter's), ``watch`` (the
        voter followed, its leader's commit index as last heard, snapshots and
        voter switches), on a voter ``watchers`` (nodes that watched it
        recently), ``config`` (the cluster configuration) and ``ca`` (the log
        indexes that recorded the CA and the join token, and whether this
        node's Raft log gave it the CA key). While the watch stream feeds this
        node, ``term``, ``leader``, ``voters``, ``learners`` and
        ``commit_index`` are the freshest a voter told it."""
        st = self.raft.status()
        now = trio.current_time()
        feeds = self.raft_feeds()
        client = self.watch_client
        view = client.view
        st["membership"] = self.membership()
        if self._removed_by_group(st["membership"]):
            st["membership"] = "watcher"
        st["feed"] = "raft" if feeds else "watch"
        st["raft_applied_index"] = st["applied_index"]
        st["applied_index"] = self.gate.readers_index
        if not feeds and view is not None:
            st["term"], st["leader"] = view.term, client.leader(now)
            st["voters"], st["learners"] = list(view.voters), list(view.learners)
            st["commit_index"] = max(view.commit, self.gate.readers_index)
        st["apply_lag"] = max(0, st["commit_index"] - st["applied_index"])
        st["watch"] = {"source": client.source if not feeds else None,
                       "leader_commit": view.commit if view is not None else 0,
                       "snapshots": client.snapshots, "switches": client.switches}
        st["watchers"] = self._watch_server.watchers(now, WATCHERS_RECENT_S)
        st["config"] = {**self.state.cluster_config().as_dict(),
                        "desired_voters": self.desired_voters()}
        ca = self.state.cluster_ca()
        st["ca"] = {"ca_index": ca.ca_index, "token_index": ca.token_index,
                    "holds_key": bool(self.gate.vault.key_pem)}
        return st

    # --- the watch stream: serving ------------------------------------------------------

    def _view(self) -> ClusterView:
        """What this node tells a watcher about the group."""
        if self.raft_feeds():
            st = self.raft.core.status()
            return ClusterView(self.raft.me, st.term, st.leader, st.voters, st.learners,
                               st.commit_index)
        view = self.watch_client.view
        if view is None:
            return ClusterView(self.raft.me)
        return ClusterView(self.raft.me, view.term,
                           self.watch_client.leader(trio.current_time()), view.voters,
                           view.learners, view.commit)

    def _image(self) -> SnapshotImage:
        return SnapshotImage(self.gate.readers_index, self.gate.readers_term,
                             self.state.snapshot())

    async def watch(self, params: dict[str, Any]) -> dict[str, Any]:
        """API (voters): the next committed entries after ``after``, a snapshot
        chunk, or nothing within the long poll; other nodes redirect.

        An answer needs entries past the watcher's index (applied here, or a
        restored snapshot): the long poll wakes whenever the applied index moves.
        """
        try:
            request = WatchRequest.from_params(params)
        except RemoteProtocolError as exc:
            raise api.ApiError(f"bad watch request: {exc}") from None
        if self.membership() != "voter" or not self.raft_feeds():
            return WatchAnswer(AnswerKind.REDIRECT, self._view()).to_wire()
        wait_s = min(request.wait_s, self._settings.watch.long_poll_s)
        deadline = trio.current_time() + wait_s
        while True:
            answer = self._watch_server.answer(request, self._view(), self._image,
                                               trio.current_time())
            if answer is not None:
                return answer.to_wire()
            if trio.current_time() >= deadline:
                return WatchAnswer(AnswerKind.NOTHING, self._view()).to_wire()
            with trio.move_on_at(deadline):
                await self.wait_changed(applied=True)

    async def raft_read_index(self, params: dict[str, Any]) -> dict[str, Any]:
        """API (members): a linearizable read point, for a watcher's read."""
        if not self.raft_feeds():
            raise api.ApiError(f"{self.raft.me} is not a Raft member right now; ask a voter")
        try:
            index = await self.raft.read_index()
        except (NotLeader, ProposalDropped) as exc:
            raise api.ApiError(f"no linearizable read possible now ({exc}); retry") from None
        return {"index": index}

    # --- the watch stream: watching -----------------------------------------------------

    async def _watch_loop(self) -> None:
        """Keep the readers' state up to date from a voter while Raft does not feed
        this node (runs until cancelled).

        While Raft feeds it, the loop only waits for :meth:`raft_feeds` to turn
        false: at a change of the view (leadership lost, this node removed from
        the configuration) or after a quiet spell, which the timeout notices.
        """
        client = self.watch_client
        while True:
            if self.raft_feeds():
                self.raft.core.hold_campaigns(False)
                self._close_watch_link()
                with trio.move_on_after(RAFT_QUIET_S / 2):
                    await self.wait_changed(view=True)
                continue
            # A voter the group removed while it was away learns it from the views
            # the voters send, and stops running elections it cannot win; a view
            # that goes stale (no answers) releases it.
            self.raft.core.hold_campaigns(self._removed_by_group(self.membership()))
            now = trio.current_time()
            live = [m.node for m in self._core.members() if m.status <= Status.SUSPECT]
            target = client.choose(live, now)
            if target is None:
                wake = client.next_wake(live, now)
                await trio.sleep_until(min(wake if wake is not None else now + 1.0, now + 1.0))
                continue
            request = client.request(target, self.gate.readers_index, self.gate.readers_term)
            try:
                raw = await self._watch_call(target, request)
                answer = WatchAnswer.from_wire(raw)
                outputs = client.handle_answer(target, request, answer, trio.current_time())
                moved = False
                for out in outputs:
                    if isinstance(out, ApplyEntries):
                        moved |= self.gate.watch_apply(out.entries) > 0
                    else:
                        moved |= self.gate.watch_restore(out.data, out.index, out.term)
                        LOGGER.info("watch_snapshot_restored node=%s voter=%s index=%s bytes=%s",
                                    self.raft.me, target, out.index, len(out.data))
            except (api.ApiError, RemoteProtocolError, StorageError) as exc:
                LOGGER.info("watch_failed node=%s voter=%s reason=%s; asking another voter",
                            self.raft.me, target, exc)
                client.handle_failure(target, trio.current_time())
                self._close_watch_link()
                continue
            self.raft.core.hold_campaigns(self._removed_by_group(self.membership()))
            if moved or answer.kind is not AnswerKind.REDIRECT:
                self._signal_changed()  # also: the leader as a voter names it may have moved

    async def _watch_call(self, node: NodeId, request: WatchRequest) -> Any:
        """One watch call on the link dedicated to the voter watched (a long poll
        must not hold up other calls to that node).

        Raises:
            ApiError: the node is unreachable, the call timed out or failed.
        """
        view = self._core.member(node)
        if view is None or view.status > Status.SUSPECT:
            raise api.ApiError(f"node {node} is not alive")
        try:
            with trio.fail_after(self._settings.watch.long_poll_s + FORWARD_TIMEOUT_S):
                held = self._watch_link
                if held is None or held[0] != node or held[1].broken:
                    self._close_watch_link()
                    stream, _ = await tls.open_tls_stream(
                        view.addr, self._trust.client_ctx, tls.ALPN_RPC, expect=node,
                        revoked=self._trust.revoked)
                    link = api.RpcLink(stream)
                    assert self._nursery is not None, "start() the replica before watching"
                    await self._nursery.start(link.run)
                    held = self._watch_link = (node, link)
                return await held[1].call("watch", request.to_params())
        except (OSError, trio.TooSlowError, trio.BrokenResourceError,
                RemoteProtocolError) as exc:
            raise api.ApiError(f"cannot reach {node} at {view.addr} ({exc!r})") from None
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None

    def _close_watch_link(self) -> None:
        if self._watch_link is not None:
            self._watch_link[1].close()
            self._watch_link = None

    async def _follow_deny_list(self) -> None:
        """Apply the replicated deny list to this node's live TLS deny set, so every
        link checks it, including on nodes that were down when it changed.

        Wakes only at changes of the deny table (a restored snapshot included); one
        applied while the set was being updated is taken at once.
        """
        state = self.state
        while True:
            seen = state.applied_index
            serials = {int(e.serial, 16) for e in state.deny_list()}
            new = await self._trust.revoked.add(serials)
            if new:
                LOGGER.warning("certificates_revoked node=%s count=%d source=raft",
                               self.raft.me, new)
            if state.last_change(Table.DENY) <= seen:
                await self.wait_changed((Table.DENY,))

    def cluster_ca(self) -> ClusterCa:
        """The cluster CA record of the readers' state."""
        return self.state.cluster_ca()

    async def call_leader(self, method: str, params: dict[str, Any]) -> Any:
        """Call API ``method`` on the Raft leader (this node included).

        Raises:
            ApiError: no leader is known, it is not reachable, or it answered
                with an error.
        """
        leader = self.leader
        if leader is None:
            raise api.ApiError("the cluster has no Raft leader right now (see `meshctl raft "
                               "status`); retry in a few seconds")
        return await self.call_node(leader, method, params)

    def issued_serials(self, node: NodeId) -> list[str]:
        """The serials (hex) the replicated state records as issued to ``node``."""
        return [c.serial for c in self.state.issued_to(node)]

    async def deny(self, serials: list[str], node: NodeId, reason: str) -> list[int]:
        """Commit serials to the replicated deny list; returns their log indexes."""
        indexes = []
        for serial in serials:
            result = await self.deny_add({"serial": serial, "node": node, "reason": reason})
            indexes.append(int(result["index"]))
        return indexes

    async def deny_add(self, params: dict[str, Any]) -> dict[str, Any]:
        """API: put one serial (hex) of ``node`` on the replicated deny list."""
        try:
            command = DenyAdd(str(params.get("serial", "")), NodeId(str(params.get("node", ""))),
                              str(params.get("reason", "")),
                              request_id=self._request_id(params)).encode()
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None
        return await self._write("deny_add", params, command)

    async def raft_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """API: the cluster configuration, after setting ``voters`` (1, 3, 5 or 7)
        when given (``cas``: only if the configuration is at that ``mod_index``).
        Read linearizably unless ``stale``."""
        if params.get("voters") is not None:
            try:
                voters.check_desired(params["voters"])
                command = ConfigSet(params["voters"], cas=self._cas(params),
                                    request_id=self._request_id(params)).encode()
            except MeshError as exc:
                raise api.ApiError(str(exc)) from None
            await self._write("raft_config", params, command)
        await self.read_point(params)
        return {**self.state.cluster_config().as_dict(), "desired_voters": self.desired_voters()}

    async def serve_link(self, stream: tls.SSLStreamT, peer: tls.PeerInfo) -> None:
        """The ``mesh-raft/1`` handler: the sender is who its certificate says."""
        await self.raft.serve_stream(stream, peer=peer.node_id)

    # --- API -------------------------------------------------------------------

    def handlers(self) -> dict[str, api.Handler]:
        """The API methods of the replicated state."""
        return {
            "kv_put": self.kv_put,
            "kv_get": self.kv_get,
            "kv_del": self.kv_del,
            "kv_ls": self.kv_ls,
            "kv_watch": self.kv_watch,
            "raft_status": self.raft_status,
            "raft_transfer": self.raft_transfer,
            "raft_config": self.raft_config,
            "raft_read_index": self.raft_read_index,
            "watch": self.watch,
            "deny_add": self.deny_add,
            "propose": self.propose,
        }

    def starters(self) -> dict[str, api.Starter]:
        """The writes begun without a task when this node leads (see
        :data:`mesh.node.api.Starter`); elsewhere their handlers forward them."""
        return {"kv_put": self._start_kv_put, "kv_del": self._start_kv_del,
                "propose": self._start_propose}

    async def write_command(self, command: Command) -> dict[str, Any]:
        """Commit ``command`` through the leader (forwarded if this node does not
        lead); returns its result.

        Raises:
            ApiError: not committed, or the command failed (the message says why).
        """
        data = self._encoded(command)
        return await self._write("propose", {"command": data}, data)

    async def propose(self, params: dict[str, Any]) -> dict[str, Any]:
        """API: commit an encoded state command (what :meth:`write_command` forwards)."""
        return await self._write("propose", params, self._proposed_command(params))

    def _start_propose(self, params: dict[str, Any]) -> api.Pending | None:
        return self._start_write("propose", params, self._proposed_command(params))

    def _proposed_command(self, params: dict[str, Any]) -> bytes:
        data = params.get("command")
        if not isinstance(data, bytes):
            raise api.ApiError("propose needs the encoded command")
        try:
            self.state.expect(data, decode_command(data))
        except RemoteProtocolError as exc:
            raise api.ApiError(f"not a command this meshd understands: {exc}") from None
        return data

    async def _write(self, method: str, params: dict[str, Any], command: bytes,
                     key: str | None = None) -> dict[str, Any]:
        try:
            pending = self._begin_write(command, key)
        except NotLeader as exc:
            return await self._forward(method, params, self._leader_hint(exc))
        await pending.wait()
        answer: dict[str, Any] = pending.outcome().value
        return answer

    def _leader_hint(self, exc: NotLeader) -> NodeId | None:
        if not self.raft_feeds():
            return self.leader  # a watcher knows the leader from the voters
        return NodeId(exc.leader_hint) if exc.leader_hint else None

    def _start_write(self, method: str, params: dict[str, Any], command: bytes,
                     key: str | None = None) -> api.Pending | None:
        """Begin a write: proposed here on the leader, elsewhere forwarded over the
        open link to the leader (``None`` if there is none yet: the handler dials)."""
        try:
            return self._begin_write(command, key)
        except NotLeader as exc:
            return self._start_forward(method, params, self._leader_hint(exc))

    def _begin_write(self, command: bytes, key: str | None = None) -> _PendingWrite:
        """Propose ``command`` here; a key-value write names its ``key``, so that
        writes to distinct keys proposed together share a log entry
        (:class:`~mesh.raft.state.KvBatcher`).

        Raises:
            NotLeader: this node does not lead.
            ApiError: refused at once (the message says what to do).
        """
        try:
            return _PendingWrite(self.raft.propose_nowait(command, batch_key=key),
                                 self._answers)
        except ProposalDropped as exc:
            raise api.ApiError(_not_committed(exc)) from None
        except StorageError as exc:
            raise api.ApiError(f"this node cannot write: {exc}") from None

    async def _forward(self, method: str, params: dict[str, Any], leader: NodeId | None
                       ) -> dict[str, Any]:
        view = self._leader_view(params, leader)
        result: dict[str, Any] = await self.call_node(view.node, method,
                                                      {**params, "forwarded": True})
        return result

    def _start_forward(self, method: str, params: dict[str, Any], leader: NodeId | None
                       ) -> api.Pending | None:
        """Forward a write over the open link to the leader without a task of its
        own (``None`` when no link is open yet: the handler dials it)."""
        view = self._leader_view(params, leader)
        link = self._links.get(view.node)
        if link is None or link.broken:
            return None
        return _ForwardedWrite(link.start_call(method, {**params, "forwarded": True}), view)

    def _leader_view(self, params: dict[str, Any], leader: NodeId | None) -> MemberView:
        if params.get("forwarded"):
            raise api.ApiError("the leader changed while the write was forwarded; retry it")
        view = self._core.member(leader) if leader else None
        if view is None or view.status > Status.SUSPECT:
            raise api.ApiError("the cluster has no Raft leader right now (see `meshctl raft "
                               "status`); retry in a few seconds")
        return view

    async def call_node(self, node: NodeId, method: str, params: dict[str, Any]) -> Any:
        """Call API ``method`` on another node over ``mesh-rpc/1`` (one shared link
        per node, many calls in flight).

        Raises:
            ApiError: the node is not reachable, or its answer is an error.
        """
        view = self._core.member(node)
        if view is None or view.status > Status.SUSPECT:
            raise api.ApiError(f"node {node} is not alive (see `meshctl members`)")
        try:
            with trio.fail_after(FORWARD_TIMEOUT_S):
                link = await self._link_to(view.node, view.addr)
                return await link.call(method, params)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError,
                RemoteProtocolError) as exc:
            raise api.ApiError(_unreachable(view, exc)) from None
        except MeshError as exc:  # the node answered with an error: the link is fine
            raise api.ApiError(str(exc)) from None

    async def _link_to(self, node: NodeId, addr: Addr) -> api.RpcLink:
        """The link to ``node`` that calls share (opened on first use, and again
        after it broke)."""
        async with self._dialing.setdefault(node, trio.Lock()):
            link = self._links.get(node)
            if link is None or link.broken:
                stream, _ = await tls.open_tls_stream(
                    addr, self._trust.client_ctx, tls.ALPN_RPC, expect=node,
                    revoked=self._trust.revoked)
                link = api.RpcLink(stream, call_timeout_s=FORWARD_TIMEOUT_S)
                assert self._nursery is not None, "start() the replica before calling nodes"
                await self._nursery.start(link.run)
                self._links[node] = link
            return link

    @staticmethod
    def _key(params: dict[str, Any]) -> str:
        key = params.get("key")
        if not isinstance(key, str) or not key:
            raise api.ApiError("name the key")
        return key

    @staticmethod
    def _cas(params: dict[str, Any]) -> int | None:
        cas = params.get("cas")
        if cas is not None and (type(cas) is not int or cas < 0):
            raise api.ApiError("--cas takes a modify index (an integer >= 0)")
        return cas

    @staticmethod
    def _request_id(params: dict[str, Any]) -> bytes:
        rid = params.get("request_id", b"")
        if not isinstance(rid, bytes) or len(rid) > 64:
            raise api.ApiError("request_id must be at most 64 bytes")
        return rid

    async def kv_put(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._write("kv_put", params, self._kv_put_command(params), params["key"])

    def _start_kv_put(self, params: dict[str, Any]) -> api.Pending | None:
        return self._start_write("kv_put", params, self._kv_put_command(params), params["key"])

    def _kv_put_command(self, params: dict[str, Any]) -> bytes:
        value = params.get("value")
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise api.ApiError("give a value")
        try:
            return self._encoded(KvPut(self._key(params), value, cas=self._cas(params),
                                       request_id=self._request_id(params)))
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None

    def _encoded(self, command: Command) -> bytes:
        """``command`` encoded, noted in the state so that applying it here does not
        decode it again."""
        data = command.encode()
        self.state.expect(data, command)
        return data

    async def kv_del(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._write("kv_del", params, self._kv_del_command(params), params["key"])

    def _start_kv_del(self, params: dict[str, Any]) -> api.Pending | None:
        return self._start_write("kv_del", params, self._kv_del_command(params), params["key"])

    def _kv_del_command(self, params: dict[str, Any]) -> bytes:
        try:
            return self._encoded(KvDelete(self._key(params), cas=self._cas(params),
                                          request_id=self._request_id(params)))
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None

    async def read_point(self, params: dict[str, Any]) -> None:
        """Wait until a linearizable read may be served here (ReadIndex), unless
        ``params["stale"]`` (without a leader yet, waits for the view to name one,
        or a voter to watch).

        Raises:
            ApiError: no leader within a few seconds, or the round failed.
        """
        if params.get("stale"):
            return
        if not self.raft_feeds() and (self.membership() == "watcher"
                                      or self.watch_client.source is not None):
            # Watching: ask the voter watched. A member whose Raft is quiet but that
            # watches nobody (just restarted; maybe the only voter) asks its own
            # group; one that watches a voter may have been removed from the group
            # while it was away (it is never told), so it reads like a watcher.
            await self._watcher_read_point()
            return
        if self.raft.leader is None:  # e.g. just joined, or an election is under way
            with trio.move_on_after(READ_LEADER_WAIT_S):
                while self.raft.leader is None and self.watch_client.source is None:
                    await self.wait_changed(view=True)
            if self.raft.leader is None and self.watch_client.source is not None:
                # No leader in sight but a voter answers the watch stream: this
                # member may have been removed while it was down.
                await self._watcher_read_point()
                return
        try:
            await self.raft.read_index()
        except (NotLeader, ProposalDropped) as exc:
            raise api.ApiError(f"no linearizable read possible now ({exc}); retry, or read "
                               "this node's replica with --stale") from None

    async def wait_fresh(self) -> None:
        """Return once this node's replica has caught up with the cluster since
        meshd started (a linearizable read point was reached: everything committed
        when it was asked is applied here). A restarted node's replica may be far
        behind (a removed voter's WAL, or nothing); the agent acts on nothing older.
        Retries every :data:`FRESH_RETRY_S` until a voter answers."""
        reported = False
        while True:
            try:
                await self.read_point({})
                return
            except api.ApiError as exc:
                if not reported:
                    LOGGER.info("replica_catching_up node=%s applied=%s reason=%s",
                                self.raft.me, self.state.applied_index, exc)
                    reported = True
            await trio.sleep(FRESH_RETRY_S)

    async def _watcher_read_point(self) -> None:
        """ReadIndex for a watcher: a voter confirms the read index with its
        leader; the watch stream then brings the readers' state to it (waits for
        the view to name a voter, then for every applied index up to the read
        index)."""
        client = self.watch_client
        with trio.move_on_after(READ_LEADER_WAIT_S):  # just started: no voter answered yet
            while client.source is None:
                await self.wait_changed(view=True)
        voter = client.source
        if voter is None:
            raise api.ApiError("no voter is reachable for a linearizable read; retry, or "
                               "read this node's replica with --stale")
        # The voter watched may have just left the group (the voter count changed,
        # or it was replaced) before the watch stream moved on: ask the others the
        # group named last.
        view = client.view
        others = [v for v in (view.voters if view is not None else ()) if v != voter]
        for asked in (voter, *others):
            try:
                result = await self.call_node(asked, "raft_read_index", {})
            except api.ApiError as exc:
                problem = exc
                continue
            break
        else:
            raise api.ApiError(f"no voter gave a linearizable read point ({problem}); retry, "
                               "or read this node's replica with --stale")
        index = result.get("index") if isinstance(result, dict) else None
        if type(index) is not int:
            raise api.ApiError(f"{asked} gave no read index; retry")
        with trio.move_on_after(READ_APPLY_WAIT_S):
            while self.gate.readers_index < index:
                await self.wait_changed(applied=True)
        if self.gate.readers_index < index:
            raise api.ApiError(f"this node's replica did not reach index {index} within "
                               f"{READ_APPLY_WAIT_S:g}s; retry, or read it with --stale")

    async def kv_get(self, params: dict[str, Any]) -> dict[str, Any]:
        key = self._key(params)
        await self.read_point(params)
        entry = self.state.get(key)
        if entry is None:
            raise api.ApiError(f"key {key!r} not found")
        return entry.as_dict()

    async def kv_ls(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """API: every entry under ``prefix``, in key order.

        Raises:
            ApiError: more than :data:`KV_LIST_MAX` entries or
                :data:`KV_WATCH_MAX_BYTES` of keys and values are under the prefix
                (one answer could not carry them).
        """
        prefix = params.get("prefix", "")
        if not isinstance(prefix, str):
            raise api.ApiError("prefix must be text")
        await self.read_point(params)
        entries = self.state.items(prefix, limit=KV_LIST_MAX + 1)
        if len(entries) > KV_LIST_MAX or _kv_bytes(entries) > KV_WATCH_MAX_BYTES:
            raise api.ApiError(
                f"more than {KV_LIST_MAX} keys or {KV_WATCH_MAX_BYTES // 2**20} MiB are under "
                f"{prefix!r}; list a narrower prefix")
        return [e.as_dict() for e in entries]

    async def kv_watch(self, params: dict[str, Any]) -> dict[str, Any]:
        """API: the changes of keys under ``prefix`` after index ``after`` (a long
        poll); works on voters and watchers alike (it reads the readers' state).

        Args:
            params: ``prefix`` (text, default ``""``: every key); ``after``, the
                ``index`` of the previous answer, or absent to start from now:
                the replica's applied index after a linearizable read point (as
                ``kv_get``), or without one if ``stale`` is true; ``wait_s``,
                seconds to wait for a change (default 0: answer at once), cut to
                :data:`KV_WATCH_MAX_WAIT_S` (an answer with changes comes as soon
                as there are some: the long poll wakes at each change of the
                key-value table, a restored snapshot included).

        Returns:
            ``{"index", "events", "compacted"}``, see :func:`kv_watch_answer`.

        Raises:
            ApiError: a bad parameter (an ``after`` beyond the last committed
                index included, unless ``stale``), no read point (see
                :meth:`read_point`), or a compacted answer that would not fit.
        """
        prefix = params.get("prefix", "")
        if not isinstance(prefix, str):
            raise api.ApiError("prefix must be text")
        after = params.get("after")
        if after is not None and (type(after) is not int or not 0 <= after <= MAX_INDEX):
            raise api.ApiError("after takes a log index (an integer >= 0): the index of the "
                               "previous answer, or none to start from now")
        wait_s = params.get("wait_s", 0)
        if type(wait_s) not in (int, float) or not 0 <= wait_s < math.inf:
            raise api.ApiError("wait_s takes seconds (a number >= 0)")
        if after is None:
            await self.read_point(params)
            after = self.state.applied_index
        elif after > self.state.applied_index and not params.get("stale"):
            # Ahead of this replica: fine if it lags the cluster (it catches up),
            # a mistake if nothing was ever committed there.
            await self.read_point(params)
            if after > self.state.applied_index:
                raise api.ApiError(
                    f"index {after} is beyond the last committed index "
                    f"({self.state.applied_index}); pass the index a watch printed last")
        deadline = trio.current_time() + min(wait_s, KV_WATCH_MAX_WAIT_S)
        while True:
            answer = kv_watch_answer(self.state, after, prefix)
            if answer["events"] or answer["compacted"] or trio.current_time() >= deadline:
                return answer
            after = answer["index"]  # nothing under the prefix up to there
            with trio.move_on_at(deadline):
                await self.wait_changed((Table.KV,))

    async def raft_status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def raft_transfer(self, params: dict[str, Any]) -> dict[str, Any]:
        target = params.get("to")
        if not self.raft.is_leader:
            return await self._forward("raft_transfer", params, self.leader)
        if target is None:
            others = [v for v in self.raft.status()["voters"] if v != self.raft.me]
            if not others:
                raise api.ApiError("there is no other voter to hand leadership to")
            target = others[0]
        try:
            await self.raft.transfer_leadership(NodeId(str(target)))
        except (NotLeader, ProposalDropped, MeshError) as exc:
            raise api.ApiError(f"leadership transfer failed: {exc}") from None
        return self.raft.status()

    def metrics(self) -> list[Metric]:
        """Raft and watch metric families (latencies as summaries over the recent
        window)."""
        st = self.status()
        gate = self.gate.statistics()
        stats = self.raft.statistics()
        r = "meshd_raft_"

        return [
            gauge(r + "term", "Current Raft term.", st["term"]),
            gauge(r + "is_leader", "1 on the leader.", 1 if self.raft.is_leader else 0),
            gauge(r + "commit_index", "Highest committed log index.", st["commit_index"]),
            gauge(r + "applied_index", "Highest log index applied to this node's replica.",
                  st["applied_index"]),
            gauge(r + "watcher", "1 while the watch stream (not Raft) feeds this node.",
                  1 if st["feed"] == "watch" else 0),
            gauge(r + "watchers", "Nodes that watched this voter recently.",
                  len(st["watchers"])),
            counter(r + "watch_entries_applied_total", "Entries the watch stream applied here.",
                  gate.watch_applied),
            counter(r + "watch_snapshots_restored_total", "Snapshots the watch stream "
                  "restored here.", gate.watch_restores),
            gauge(r + "apply_lag", "Committed entries not yet applied on this node.",
                  st["apply_lag"]),
            gauge(r + "voters", "Voters in the configuration.", len(st["voters"])),
            gauge(r + "last_index", "Last log index.", st["last_index"]),
            counter(r + "leader_changes_total", "Times this node saw a new leader.",
                  stats.leader_changes),
            summary(r + "commit_latency_seconds", "Proposal to applied on this node, "
                    "proposals made here (recent window).", stats.commit_latency.quantiles),
            counter(r + "commits_total", "Proposals made here that committed.",
                  stats.commit_latency.count),
            counter(r + "commit_latency_seconds_total", "Sum of commit latencies.",
                  stats.commit_latency.sum_s),
            summary(r + "wal_fsync_seconds", "One synced WAL write (write + fsync), recent "
                    "window.", stats.wal_sync_latency.quantiles),
            counter(r + "wal_fsyncs_total", "Synced WAL writes.", stats.wal_sync_latency.count),
            counter(r + "wal_fsync_seconds_total", "Sum of synced WAL write times.",
                  stats.wal_sync_latency.sum_s),
            counter(r + "wal_entries_total", "Log entries written to the WAL.",
                  stats.entries_saved),
            gauge(r + "snapshot_bytes", "State image size of the latest snapshot.",
                  stats.snapshot_bytes),
            counter(r + "snapshots_created_total", "Snapshots taken on this node.",
                  stats.snapshots_created),
            counter(r + "snapshots_restored_total", "Snapshots received from a leader.",
                  stats.snapshots_restored),
        ]


def kv_watch_answer(state: MeshState, after: int, prefix: str) -> dict[str, Any]:
    """One ``kv_watch`` answer: the changes of keys under ``prefix`` after ``after``.

    Returns:
        ``index``: what the client passes as ``after`` next (every change under
        the prefix up to it is answered); ``events``: the changes in index order,
        each ``{"index", "op": "put"|"del", "key", "value" (bytes, put only),
        "create_index", "mod_index"}`` (a ``del`` has ``create_index`` 0 and
        ``mod_index`` = its ``index``), at most about :data:`KV_WATCH_MAX_EVENTS`
        and :data:`KV_WATCH_MAX_BYTES`, never part of a log index; ``compacted``:
        the changes after ``after`` are no longer kept (the watcher fell too far
        behind, or the replica restored a snapshot), so ``events`` are instead
        every entry under the prefix now, as ``put`` events at their
        ``mod_index``, and ``index`` is the applied index. Keys deleted in that
        gap are not reported.

    Raises:
        ApiError: compacted, and more than :data:`KV_LIST_MAX` entries or
            :data:`KV_WATCH_MAX_BYTES` are under the prefix.
    """
    applied = state.applied_index
    if state.last_change(Table.KV) <= after:  # cheap, and exact even when compacted
        return {"index": max(after, applied), "events": [], "compacted": False}
    try:
        changes = state.changes_since(after, table=Table.KV, prefix=prefix,
                                      limit=KV_WATCH_MAX_EVENTS)
    except Compacted:
        entries = state.items(prefix, limit=KV_LIST_MAX + 1)
        if len(entries) > KV_LIST_MAX or _kv_bytes(entries) > KV_WATCH_MAX_BYTES:
            raise api.ApiError(
                f"this watch fell behind (changes after index {after} are no longer kept) "
                f"and the keys under {prefix!r} are too many to send again in one answer "
                f"(over {KV_LIST_MAX} or {KV_WATCH_MAX_BYTES // 2**20} MiB); watch a "
                "narrower prefix") from None
        return {"index": applied, "compacted": True,
                "events": [_put_event(e.mod_index, e) for e in entries]}
    kept = _whole_indexes_within(changes, KV_WATCH_MAX_BYTES)
    cut = len(kept) < len(changes) or len(changes) >= KV_WATCH_MAX_EVENTS
    return {"index": kept[-1].index if cut else max(after, applied), "compacted": False,
            "events": [_kv_event(ch) for ch in kept]}


def _whole_indexes_within(changes: list[Change], max_bytes: int) -> list[Change]:
    """The longest head of ``changes`` made of whole log indexes whose keys and
    values fit ``max_bytes`` (the first index always, whatever its size)."""
    kept: list[Change] = []
    size = 0
    for _, group in itertools.groupby(changes, key=lambda ch: ch.index):
        batch = list(group)
        size += sum(len(ch.key.encode("utf-8", "surrogatepass"))
                    + (len(ch.record.value) if isinstance(ch.record, KvEntry) else 0)
                    for ch in batch)
        if kept and size > max_bytes:
            break
        kept += batch
    return kept


def _put_event(index: int, entry: KvEntry) -> dict[str, Any]:
    return {"index": index, "op": "put", "key": entry.key, "value": entry.value,
            "create_index": entry.create_index, "mod_index": entry.mod_index}


def _kv_event(change: Change) -> dict[str, Any]:
    record = change.record
    if record is None:
        return {"index": change.index, "op": "del", "key": change.key, "create_index": 0,
                "mod_index": change.index}
    assert isinstance(record, KvEntry), f"KV change of {change.key!r} holds {record!r:.80}"
    return _put_event(change.index, record)


def _not_committed(exc: ProposalDropped) -> str:
    return (f"the write was not committed ({exc}); retry it (it is applied once however "
            "often it is retried)")


def _unreachable(view: MemberView, exc: BaseException) -> str:
    return f"cannot reach {view.node} at {view.addr} ({exc}); retry"


class _ForwardedWrite:
    """A write forwarded to the leader, as the API waits for it (:class:`api.Pending`)."""

    __slots__ = ("_call", "_view")

    def __init__(self, call: api.RpcCall, view: MemberView) -> None:
        self._call = call
        self._view = view

    @property
    def done(self) -> bool:
        return self._call.done

    async def wait(self) -> None:
        await self._call.wait()

    def outcome(self) -> Any:
        try:
            return self._call.outcome()
        except trio.BrokenResourceError as exc:
            raise api.ApiError(_unreachable(self._view, exc)) from None
        except MeshError as exc:  # the leader answered with an error
            raise api.ApiError(str(exc)) from None


class _Answers:
    """The answer of the latest successful write result, shared by the writes it
    is the result of (the puts of one log entry share one :class:`Result`)."""

    __slots__ = ("_result", "_answer")

    def __init__(self) -> None:
        self._result: Result | None = None
        self._answer = api.SharedResult(None)

    def of(self, result: Result) -> api.SharedResult:
        if result is not self._result:
            self._result = result
            self._answer = api.SharedResult(result.as_dict())
        return self._answer


class _PendingWrite:
    """A write proposed on this node, as the API waits for it (:class:`api.Pending`)."""

    __slots__ = ("_proposal", "_answers")

    def __init__(self, proposal: Proposal, answers: _Answers) -> None:
        self._proposal = proposal
        self._answers = answers

    @property
    def done(self) -> bool:
        return self._proposal.done

    async def wait(self) -> None:
        await self._proposal.event.wait()

    def outcome(self) -> api.SharedResult:
        try:
            result = self._proposal.outcome()
        except ProposalDropped as exc:
            raise api.ApiError(_not_committed(exc)) from None
        assert isinstance(result, Result)
        if not result.ok:
            raise api.ApiError(result.message or result.code.value)
        return self._answers.of(result)


def _kv_bytes(entries: list[KvEntry]) -> int:
    """The bytes of the keys and values of ``entries``."""
    return sum(len(e.key.encode("utf-8", "surrogatepass")) + len(e.value) for e in entries)
