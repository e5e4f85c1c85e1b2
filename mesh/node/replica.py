"""The node's replica of the desired state: Raft storage, adapter, voters and API.

Every node runs a :class:`~mesh.raft.adapter.RaftAdapter` over ``DIR/raft``. The node
that created the cluster bootstraps a one-voter configuration; every other node
starts empty and is added by the leader, first as a learner (a read replica that
receives the log), then promoted while the group has fewer voters than wanted
(``--raft-voters``, 3 by default). A dead voter is replaced the same way, one
membership change at a time (:mod:`mesh.raft.voters`). Every other live member stays
a learner: its local replica serves DNS, ``--stale`` reads and (later) its
reconciler. (DESIGN's resumable watch stream from a voter would scale further than
one learner per node; this is the interim.)

Raft messages travel over ``mesh-raft/1`` on the gossip port, so a peer's identity
comes from its certificate and the peer's address from membership. Writes reaching
a node that is not the leader are forwarded to the leader over ``mesh-rpc/1``
(once: a forwarded call that lands on a non-leader again fails with a message to
retry) over one kept-open link per node that carries many calls at once
(:class:`~mesh.node.api.RpcLink`). Reads are linearizable (ReadIndex) unless
``stale`` is asked for.

Resource handling:
    :meth:`Replica.open` opens the WAL (blocking, in a thread); :meth:`Replica.aclose`
    closes it and the links to other nodes. The adapter's tasks and the links run
    in the node's nursery.

Error handling:
    NotLeader without a reachable leader, dropped proposals and storage failures
    become :class:`~mesh.node.api.ApiError` with what to do next.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from typing import Any

import trio

from mesh import tls
from mesh.errors import MeshError, NotLeader, ProposalDropped, RemoteProtocolError, StorageError
from mesh.gossip.core import Membership
from mesh.gossip.messages import Status
from mesh.node import api
from mesh.node.config import NodeConfig
from mesh.node.metrics import Metric, gauge
from mesh.node.trust import Trust
from mesh.raft import voters
from mesh.raft.adapter import Proposal, RaftAdapter
from mesh.raft.config import RaftConfig
from mesh.raft.state import (
    Command,
    DenyAdd,
    KvDelete,
    KvPut,
    MeshState,
    Result,
    decode_command,
)
from mesh.raft.storage import FileStorage, bootstrap
from mesh.types import Addr, NodeId

LOGGER = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 15.0
"""Bound on a write forwarded to the leader."""

READ_LEADER_WAIT_S = 5.0
"""How long a linearizable read waits for a leader to be known (an election)."""


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """How this node takes part in Raft.

    Attributes:
        raft: Raft timing.
        voters: wanted voters (3 or 5; fewer in smaller clusters).
        stable_s: seconds a member must have been alive before it may become a
            voter (autopilot's stabilization time).
    """

    raft: RaftConfig
    voters: int = 3
    stable_s: float = 10.0


class Replica:
    """The running Raft member of this node and its API."""

    def __init__(self, raft: RaftAdapter, state: MeshState, storage: FileStorage,
                 core: Membership, trust: Trust, settings: ReplicaSettings) -> None:
        self.raft = raft
        self.state = state
        self._storage = storage
        self._core = core
        self._trust = trust
        self._settings = settings
        self._links: dict[NodeId, api.RpcLink] = {}
        self._dialing: dict[NodeId, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

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
        state = MeshState()

        def peer_addr(node: NodeId) -> Addr | None:
            view = core.member(node)
            return view.addr if view is not None and view.status <= Status.SUSPECT else None

        dialer = tls.TlsDialer(trust.client_ctx, tls.ALPN_RAFT, revoked=trust.revoked)
        raft = RaftAdapter.create(settings.raft, config.name, storage, state, dialer,
                                  peer_addr, rng=rng)
        return cls(raft, state, storage, core, trust, settings)

    async def aclose(self) -> None:
        """Close the links to other nodes and the WAL."""
        for link in self._links.values():
            link.close()
        self._links.clear()
        self._storage.close()

    async def start(self, nursery: trio.Nursery) -> None:
        """Run the adapter and the voter management in ``nursery``."""
        self._nursery = nursery
        await nursery.start(self.raft.run)

        def members() -> list[voters.Candidate]:
            return voters.candidates(self._core.members(), trio.current_time(),
                                     stable_s=self._settings.stable_s)

        nursery.start_soon(functools.partial(self.raft.manage_voters, members,
                                             desired=self._settings.voters,
                                             read_replicas=True))
        nursery.start_soon(self._follow_deny_list)

    async def _follow_deny_list(self) -> None:
        """Apply the replicated deny list to this node's live TLS deny set, so every
        link checks it, including on nodes that were down when it changed."""
        while True:
            serials = {int(e.serial, 16) for e in self.state.deny_list()}
            new = await self._trust.revoked.add(serials)
            if new:
                LOGGER.warning("certificates_revoked node=%s count=%d source=raft",
                               self.raft.me, new)
            await self.raft.wait_changed()

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
            "raft_status": self.raft_status,
            "raft_transfer": self.raft_transfer,
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
        data = command.encode()
        return await self._write("propose", {"command": data}, data)

    async def propose(self, params: dict[str, Any]) -> dict[str, Any]:
        """API: commit an encoded state command (what :meth:`write_command` forwards)."""
        return await self._write("propose", params, self._proposed_command(params))

    def _start_propose(self, params: dict[str, Any]) -> api.Pending | None:
        return self._start_write(self._proposed_command(params))

    @staticmethod
    def _proposed_command(params: dict[str, Any]) -> bytes:
        data = params.get("command")
        if not isinstance(data, bytes):
            raise api.ApiError("propose needs the encoded command")
        try:
            decode_command(data)
        except RemoteProtocolError as exc:
            raise api.ApiError(f"not a command this meshd understands: {exc}") from None
        return data

    async def _write(self, method: str, params: dict[str, Any], command: bytes
                     ) -> dict[str, Any]:
        try:
            pending = self._begin_write(command)
        except NotLeader as exc:
            hint = NodeId(exc.leader_hint) if exc.leader_hint else None
            return await self._forward(method, params, hint)
        await pending.wait()
        return pending.outcome()

    def _start_write(self, command: bytes) -> api.Pending | None:
        """Begin a write on the leader (``None`` elsewhere: the handler forwards it)."""
        try:
            return self._begin_write(command)
        except NotLeader:
            return None

    def _begin_write(self, command: bytes) -> _PendingWrite:
        """Propose ``command`` here.

        Raises:
            NotLeader: this node does not lead.
            ApiError: refused at once (the message says what to do).
        """
        try:
            return _PendingWrite(self.raft.propose_nowait(command))
        except ProposalDropped as exc:
            raise api.ApiError(_not_committed(exc)) from None
        except StorageError as exc:
            raise api.ApiError(f"this node cannot write: {exc}") from None

    async def _forward(self, method: str, params: dict[str, Any], leader: NodeId | None
                       ) -> dict[str, Any]:
        if params.get("forwarded"):
            raise api.ApiError("the leader changed while the write was forwarded; retry it")
        view = self._core.member(leader) if leader else None
        if view is None or view.status > Status.SUSPECT:
            raise api.ApiError("the cluster has no Raft leader right now (see `meshctl raft "
                               "status`); retry in a few seconds")
        result: dict[str, Any] = await self.call_node(view.node, method,
                                                      {**params, "forwarded": True})
        return result

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
            raise api.ApiError(f"cannot reach {view.node} at {view.addr} ({exc}); "
                               "retry") from None
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
                link = api.RpcLink(stream)
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
        return await self._write("kv_put", params, self._kv_put_command(params))

    def _start_kv_put(self, params: dict[str, Any]) -> api.Pending | None:
        return self._start_write(self._kv_put_command(params))

    def _kv_put_command(self, params: dict[str, Any]) -> bytes:
        value = params.get("value")
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise api.ApiError("give a value")
        try:
            return KvPut(self._key(params), value, cas=self._cas(params),
                         request_id=self._request_id(params)).encode()
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None

    async def kv_del(self, params: dict[str, Any]) -> dict[str, Any]:
        return await self._write("kv_del", params, self._kv_del_command(params))

    def _start_kv_del(self, params: dict[str, Any]) -> api.Pending | None:
        return self._start_write(self._kv_del_command(params))

    def _kv_del_command(self, params: dict[str, Any]) -> bytes:
        try:
            return KvDelete(self._key(params), cas=self._cas(params),
                            request_id=self._request_id(params)).encode()
        except MeshError as exc:
            raise api.ApiError(str(exc)) from None

    async def read_point(self, params: dict[str, Any]) -> None:
        """Wait until a linearizable read may be served here (ReadIndex), unless
        ``params["stale"]``.

        Raises:
            ApiError: no leader within a few seconds, or the round failed.
        """
        if params.get("stale"):
            return
        if self.raft.leader is None:  # e.g. just joined, or an election is under way
            with trio.move_on_after(READ_LEADER_WAIT_S):
                await self.raft.wait_leader()
        try:
            await self.raft.read_index()
        except (NotLeader, ProposalDropped) as exc:
            raise api.ApiError(f"no linearizable read possible now ({exc}); retry, or read "
                               "this node's replica with --stale") from None

    async def kv_get(self, params: dict[str, Any]) -> dict[str, Any]:
        key = self._key(params)
        await self.read_point(params)
        entry = self.state.get(key)
        if entry is None:
            raise api.ApiError(f"key {key!r} not found")
        return entry.as_dict()

    async def kv_ls(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        prefix = params.get("prefix", "")
        if not isinstance(prefix, str):
            raise api.ApiError("prefix must be text")
        await self.read_point(params)
        return [e.as_dict() for e in self.state.items(prefix, limit=10_000)]

    async def raft_status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.raft.status()

    async def raft_transfer(self, params: dict[str, Any]) -> dict[str, Any]:
        target = params.get("to")
        if not self.raft.is_leader:
            return await self._forward("raft_transfer", params, self.raft.leader)
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
        """Raft metric families (latencies as summaries over the recent window)."""
        st = self.raft.status()
        stats = self.raft.statistics()
        r = "meshd_raft_"

        def summary(name: str, help_text: str, qs: tuple[tuple[float, float], ...]) -> Metric:
            return Metric(name, "summary", help_text,
                          tuple(((("quantile", f"{q:g}"),), v) for q, v in qs))

        def total(name: str, help_text: str, value: float) -> Metric:
            return Metric(name, "counter", help_text, (((), value),))

        return [
            gauge(r + "term", "Current Raft term.", st["term"]),
            gauge(r + "is_leader", "1 on the leader.", 1 if self.raft.is_leader else 0),
            gauge(r + "commit_index", "Highest committed log index.", st["commit_index"]),
            gauge(r + "applied_index", "Highest applied log index.", st["applied_index"]),
            gauge(r + "apply_lag", "Committed entries not yet applied on this node.",
                  st["apply_lag"]),
            gauge(r + "voters", "Voters in the configuration.", len(st["voters"])),
            gauge(r + "last_index", "Last log index.", st["last_index"]),
            total(r + "leader_changes_total", "Times this node saw a new leader.",
                  stats.leader_changes),
            summary(r + "commit_latency_seconds", "Proposal to applied on this node, "
                    "proposals made here (recent window).", stats.commit_latency.quantiles),
            total(r + "commits_total", "Proposals made here that committed.",
                  stats.commit_latency.count),
            total(r + "commit_latency_seconds_total", "Sum of commit latencies.",
                  stats.commit_latency.sum_s),
            summary(r + "wal_fsync_seconds", "One synced WAL write (write + fsync), recent "
                    "window.", stats.wal_sync_latency.quantiles),
            total(r + "wal_fsyncs_total", "Synced WAL writes.", stats.wal_sync_latency.count),
            total(r + "wal_fsync_seconds_total", "Sum of synced WAL write times.",
                  stats.wal_sync_latency.sum_s),
            total(r + "wal_entries_total", "Log entries written to the WAL.",
                  stats.entries_saved),
            gauge(r + "snapshot_bytes", "State image size of the latest snapshot.",
                  stats.snapshot_bytes),
            total(r + "snapshots_created_total", "Snapshots taken on this node.",
                  stats.snapshots_created),
            total(r + "snapshots_restored_total", "Snapshots received from a leader.",
                  stats.snapshots_restored),
        ]


def _not_committed(exc: ProposalDropped) -> str:
    return (f"the write was not committed ({exc}); retry it (it is applied once however "
            "often it is retried)")


class _PendingWrite:
    """A write proposed on this node, as the API waits for it (:class:`api.Pending`)."""

    __slots__ = ("_proposal",)

    def __init__(self, proposal: Proposal) -> None:
        self._proposal = proposal

    @property
    def done(self) -> bool:
        return self._proposal.done

    async def wait(self) -> None:
        await self._proposal.event.wait()

    def outcome(self) -> dict[str, Any]:
        try:
            result = self._proposal.outcome()
        except ProposalDropped as exc:
            raise api.ApiError(_not_committed(exc)) from None
        assert isinstance(result, Result)
        if not result.ok:
            raise api.ApiError(result.message or result.code.value)
        return result.as_dict()
