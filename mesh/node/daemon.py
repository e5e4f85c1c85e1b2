"""``meshd``: the one daemon every host runs.

It composes the parts (it decides nothing about any protocol): the gossip adapter
over UDP+TCP on the gossip port, the local API on ``DIR/meshd.sock``, the metrics
endpoint, and the small bits of node life: its identity in the data dir, the peers
it remembers for rejoining after a restart, and a graceful leave on SIGTERM/SIGINT.

Resource handling:
    :func:`run_node` owns one nursery with every task; sockets are closed and the
    API socket file removed when it returns, whether by signal, error or cancel.

Error handling:
    Anything that prevents starting (a port in use, an unreachable join address, an
    unwritable data dir) raises :class:`~mesh.errors.StartupError`; :func:`main`
    prints its one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

import mesh
from mesh import tls
from mesh.dns.adapter import DnsServer, DnsSockets, bind_dns_sockets
from mesh.dns.catalog import CatalogBuilder
from mesh.dns.config import DnsConfig, container_resolvers
from mesh.dns.metrics import dns_metrics
from mesh.errors import ConfigError, DriverError, MeshError, StartupError
from mesh.gossip.adapter import (
    GossipAdapter,
    UdpTransport,
    bind_gossip_sockets,
    describe_bind_error,
)
from mesh.gossip.core import MemberChanged, Membership, MemberView
from mesh.gossip.messages import Meta, Status
from mesh.node import api, trust
from mesh.node.agent import Agent, Planner, Wakeup, wake_on_changes, wake_on_members
from mesh.node.config import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    GOSSIP_PROFILES,
    NodeConfig,
    choose_advertise,
    default_route_interfaces,
    parse_label,
)
from mesh.node.driver import Driver, open_driver
from mesh.node.entry import run_interruptible
from mesh.node.events import EventLog
from mesh.node.metrics import Metric, counter, gauge, render
from mesh.node.orchestrate import DRIVER_LABEL, STATE_LEVEL_LABEL, user_labels
from mesh.node.replica import Replica, ReplicaSettings
from mesh.node.services import CatalogFeed, ServiceApi
from mesh.raft.config import RaftConfig
from mesh.raft.state import STATE_LEVEL, CaSet, CertIssued, Command, Table, TokenSet
from mesh.security.pki import CertificateAuthority, WallClock, cert_to_pem, key_to_pem
from mesh.security.token import JoinToken
from mesh.types import Addr, AllocId, NodeId

LOGGER = logging.getLogger("mesh.node")

REJOIN_INTERVAL_S = 10.0
"""How often a node that is alone retries the peers it knows."""

PEERS_WRITE_DELAY_S = 1.0
"""Membership changes within this window are written to peers.json once."""

RAFT_PROFILES = {"lan": (RaftConfig.lan, 10.0), "wan": (RaftConfig.wan, 30.0),
                 "local": (RaftConfig.local, 2.0)}
"""Per --gossip-profile: Raft timing, and seconds a member must be alive before it
may become a voter."""




# --- data dir ----------------------------------------------------------------------


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_data_dir(data_dir: Path, name: str | None) -> NodeId:
    """Create or open the data dir and settle the node's name.

    The first start records the name in ``node.json``; later starts reuse it, and a
    different ``--name`` is refused (a data dir belongs to one node).

    Raises:
        StartupError: the directory cannot be created or written, or it belongs to
            another node.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = data_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data dir {data_dir} is not writable ({exc.strerror}): pass "
                           "--data-dir with a directory this user can write") from None
    identity = data_dir / "node.json"
    stored: str | None = None
    if identity.exists():
        try:
            stored = json.loads(identity.read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"{identity} is unreadable ({exc}): restore it or remove the "
                               "data dir to start this node afresh") from None
    if stored and name and stored != name:
        raise StartupError(f"data dir {data_dir} belongs to node {stored!r}, not {name!r}: "
                           "use another --data-dir, or drop --name")
    final = stored or name or socket.gethostname()
    if not stored:
        try:
            _write_json_atomic(identity, {"name": final, "version": mesh.__version__})
        except OSError as exc:
            raise StartupError(f"cannot write {identity}: {exc.strerror}") from None
    return NodeId(final)


def load_peers(data_dir: Path) -> list[Addr]:
    """Addresses of the members this node knew when it last ran."""
    path = data_dir / "peers.json"
    try:
        raw = json.loads(path.read_text())
        return [Addr.parse(p, DEFAULT_PORT) for p in raw["peers"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        LOGGER.warning("peers_file_ignored path=%s reason=%s", path, exc)
        return []


# --- the node ----------------------------------------------------------------------


class Node:
    """The running parts of one meshd, and the API handlers that read them."""

    def __init__(self, config: NodeConfig, adapter: GossipAdapter,
                 credentials: trust.Trust) -> None:
        self.config = config
        self.adapter = adapter
        self.trust = credentials
        self.started = trio.current_time()
        self.tls_server: tls.TlsServer | None = None
        self.dns: DnsServer | None = None
        self.replica: Replica | None = None
        self.dns_addr: Addr | None = None
        self.driver: Driver | None = None
        self.services: ServiceApi | None = None
        self.events: EventFeed | None = None

    @property
    def core(self) -> Membership:
        """The membership core (read-only use)."""
        return self.adapter.core

    def member_json(self, m: MemberView, now: float) -> dict[str, Any]:
        """One member as ``meshctl members --json`` shows it (a stable contract)."""
        return {
            "name": m.node,
            "address": str(m.addr),
            "status": m.status.label,
            "incarnation": m.incarnation,
            "labels": user_labels(m.meta),
            "driver": m.meta.labels_dict.get(DRIVER_LABEL, ""),
            "age": round(max(0.0, now - m.since), 3),
            "role": m.meta.role,
            "cpu_millis": m.meta.cpu_millis,
            "memory_bytes": m.meta.memory_bytes,
            "ports": m.meta.ports_dict,
            "self": m.node == self.core.me,
        }

    async def api_members(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [self.member_json(m, now) for m in self.core.members()]

    async def api_info(self, params: dict[str, Any]) -> dict[str, Any]:
        stats = self.core.statistics()
        return {
            "name": self.core.me,
            "version": mesh.__version__,
            "address": str(self.config.advertise),
            "incarnation": self.core.incarnation,
            "health_score": stats.health_score,
            "uptime": round(trio.current_time() - self.started, 3),
            "dns": str(self.dns_addr) if self.dns_addr else None,
            "members": {"alive": stats.members_alive, "suspect": stats.members_suspect,
                        "dead": stats.members_dead, "left": stats.members_left},
        }

    def handlers(self) -> dict[str, api.Handler]:
        """The API methods this node serves (locally and over ``mesh-rpc/1``)."""
        assert self.replica is not None, "open the replica before serving the API"
        return {"members": self.api_members, "info": self.api_info,
                **trust.SecurityApi(self.trust, self.core, self.replica).handlers(),
                **self.replica.handlers(),
                **(self.services.handlers() if self.services is not None else {}),
                **({"events": self.events.api_events} if self.events is not None else {})}

    def starters(self) -> dict[str, api.Starter]:
        """The API methods begun without a task of their own (Raft writes)."""
        assert self.replica is not None, "open the replica before serving the API"
        return self.replica.starters()

    async def local_logs(self, alloc: AllocId, tail: int) -> bytes:
        """The last ``tail`` lines of a workload's output on this node."""
        if self.driver is None:
            raise api.ApiError("this node runs no workload driver")
        chunks = []
        try:
            async for chunk in self.driver.logs(alloc, tail=tail, follow=False):
                chunks.append(chunk)
        except DriverError as exc:
            raise api.ApiError(str(exc)) from None
        return b"".join(chunks)

    def metrics(self) -> list[Metric]:
        """Every metric family of this node."""
        s = self.core.statistics()
        a = self.adapter.statistics()
        g = "meshd_gossip_"
        members = Metric(g + "members", "gauge", "Members by status as seen by this node.",
                         tuple(((("status", st),), float(v)) for st, v in (
                             ("alive", s.members_alive), ("suspect", s.members_suspect),
                             ("dead", s.members_dead), ("left", s.members_left))))
        return [
            counter(g + "probes_total", "Failure-detection probes started.", s.probes),
            counter(g + "acks_total", "Probe acks received.", s.acks),
            counter(g + "nacks_total", "Nacks received from indirect probers.", s.nacks),
            counter(g + "indirect_probes_total", "Indirect probe requests sent.",
                    s.indirect_probes),
            counter(g + "suspicions_total", "Members this node started to suspect.",
                    s.suspicions),
            counter(g + "refutations_total", "Times this node refuted its own suspicion.",
                    s.refutations),
            counter(g + "deaths_total", "Members this node declared dead.", s.deaths),
            counter(g + "push_pulls_total", "Full state exchanges completed.", s.push_pulls),
            counter(g + "packets_in_total", "Datagrams received.", a.packets_in),
            counter(g + "packets_out_total", "Datagrams sent.", a.packets_out),
            counter(g + "bytes_in_total", "Datagram bytes received.", a.bytes_in),
            counter(g + "bytes_out_total", "Datagram bytes sent.", a.bytes_out),
            counter(g + "packets_malformed_total",
                    "Datagrams dropped as malformed, foreign or unauthenticated.",
                    a.datagrams_rejected),
            counter(g + "streams_malformed_total",
                    "Push-pull streams dropped as malformed, oversized or truncated.",
                    a.streams_rejected),
            counter(g + "send_failures_total", "Datagrams the network refused.",
                    s.send_failures),
            gauge(g + "health_score", "Lifeguard local health score (0 is healthy).",
                  s.health_score),
            gauge(g + "incarnation", "This node's incarnation.", self.core.incarnation),
            members,
            *self._security_metrics(),
            *(dns_metrics(self.dns.statistics()) if self.dns is not None else []),
            *(self.replica.metrics() if self.replica is not None else []),
        ]

    def _security_metrics(self) -> list[Metric]:
        k = self.trust.keyring.statistics()
        t = "meshd_tls_"
        out = [
            counter("meshd_gossip_sealed_total", "Datagrams sealed.", k.sealed),
            counter("meshd_gossip_unsealed_total", "Datagrams opened.", k.opened),
            counter("meshd_gossip_rejected_auth_total",
                    "Datagrams that failed authentication (wrong key or label, tampered).",
                    k.rejected_auth),
            counter("meshd_gossip_rejected_stale_total",
                    "Authenticated datagrams outside the replay window.", k.rejected_stale),
            gauge("meshd_gossip_keys", "Keys in the gossip key ring.", len(self.trust.keyring.keys)),
            gauge(t + "revoked_serials", "Serials on the deny list.", len(self.trust.revoked)),
            counter(t + "links_closed_revoked_total",
                    "Open links closed because the peer's certificate was revoked.",
                    self.trust.revoked.links_closed),
            gauge(t + "issuing", "1 while this node issues certificates (a Raft voter whose "
                  "Raft log holds the CA key), else 0.",
                  int(self.trust.join_server is not None)),
        ]
        if self.tls_server is not None:
            s = self.tls_server.statistics()
            out += [
                counter(t + "links_accepted_total", "TLS links admitted.", s.served),
                counter(t + "links_refused_total", "TLS links refused after the handshake.",
                        s.refused),
                counter(t + "handshake_failures_total", "TLS handshakes that failed.",
                        s.handshake_failures),
            ]
        if self.trust.join_server is not None:  # a node that issues certificates
            out += trust.join_metrics(self.trust.join_server)
        return out

    def render_metrics(self) -> str:
        """The Prometheus text page."""
        return render(self.metrics(), {"node": self.core.me})


async def _write_peers(node: Node,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Remember the other live members' addresses, for rejoining after a restart."""
    events = node.adapter.subscribe()
    path = node.config.data_dir / "peers.json"
    task_status.started()
    async with events:
        while True:
            await events.receive()
            await trio.sleep(PEERS_WRITE_DELAY_S)  # coalesce a burst of changes
            while True:
                try:
                    events.receive_nowait()
                except trio.WouldBlock:
                    break
            peers = sorted(str(m.addr) for m in node.core.members()
                           if m.node != node.core.me and m.status <= Status.SUSPECT)
            if not peers:
                continue  # never forget the cluster because we are alone right now
            try:
                await trio.to_thread.run_sync(_write_json_atomic, path, {"peers": peers})
            except OSError as exc:
                LOGGER.error("peers_write_failed node=%s path=%s reason=%s; free disk space "
                             "or fix permissions", node.core.me, path, exc.strerror)


def _container_resolvers(config: NodeConfig, sockets: DnsSockets | None) -> list[str]:
    """Name servers for this node's containers (:func:`container_resolvers`)."""
    if sockets is None:
        return []
    try:
        host_conf = Path("/etc/resolv.conf").read_text(errors="replace")
    except OSError:
        host_conf = ""
    servers = container_resolvers(sockets.addr, config.advertise.host, host_conf)
    if not servers:
        LOGGER.info("dns_not_for_containers node=%s dns=%s reason=%r", config.name,
                    sockets.addr, "not on port 53: containers keep the host's resolvers "
                    "(run meshd as root, or free port 53, for containers to use it)")
    return servers


async def _feed_dns(node: Node, builder: CatalogBuilder, dns: DnsServer) -> None:
    """Keep the DNS catalogue in step with membership and the local replica: a member
    SWIM declares dead leaves the answers the moment this node learns it, and an
    endpoint appears as soon as the report that it is ready is applied here. Each
    wake-up applies only what changed (:class:`CatalogFeed`), and the DNS server
    drops only the cached answers of the names involved. It wakes at membership
    events and changes of the tables the catalogue reads (``ALLOC``, ``SERVICE``),
    never at key-value writes or leader changes."""
    assert node.replica is not None
    replica = node.replica
    feed = CatalogFeed(builder)
    wake = Wakeup()
    wake.set()  # build once at start
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake_on_members, node.adapter.subscribe, wake)
        nursery.start_soon(wake_on_changes, replica, frozenset({Table.ALLOC, Table.SERVICE}),
                           wake)
        while True:
            await wake.wait()
            dns.set_catalog(feed.refresh(replica.state, node.core.members()))


class EventFeed:
    """Feeds this node's :class:`EventLog` from membership, Raft and the replicated
    state, and serves it (``meshctl events [-f]``)."""

    MAX_WAIT_S = 30.0
    """The longest an ``events`` call waits for a new event."""

    TABLES = (Table.ALLOC, Table.SERVICE, Table.NODE)
    """The replicated tables whose changes are events."""

    def __init__(self, node: Node, wall: Callable[[], float]) -> None:
        self.log = EventLog()
        self._node = node
        self._wall = wall
        self._new = trio.Event()

    def _added(self) -> None:
        self._new.set()
        self._new = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Follow membership and the replica until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_members)
            nursery.start_soon(self._follow_raft)
            task_status.started()

    async def _follow_members(self) -> None:
        while True:
            events = self._node.adapter.subscribe()
            async with events:
                async for ev in events:
                    if isinstance(ev, MemberChanged) and ev.previous != ev.member.status:
                        self.log.member(self._wall(), ev.member.node, ev.member.status.label,
                                        str(ev.member.addr))
                        self._added()

    async def _follow_raft(self) -> None:
        """Log leader changes and the changes of :attr:`TABLES`: wakes at changes of
        those tables and of the replica's view (the leader), not at key-value
        writes, and reads the changes from the index :meth:`Replica.wait_changed`
        vouches for (those it slept through are of other tables)."""
        assert self._node.replica is not None
        replica = self._node.replica
        state = replica.state
        self.log.seed([*state.services(), *state.allocs()])
        seen, leader = state.applied_index, replica.leader
        while True:
            seen = max(seen, await replica.wait_changed(self.TABLES, view=True))
            if replica.leader != leader:
                leader = replica.leader
                self.log.leader(self._wall(), leader, int(replica.status()["term"]))
                self._added()
            if all(state.last_change(t) <= seen for t in self.TABLES):
                seen = state.applied_index  # nothing of ours to log
                continue
            try:
                self.log.changes(self._wall(), state.changes_since(seen))
            except MeshError:  # compacted: start over from the state as it is
                self.log.seed([*state.services(), *state.allocs()])
            seen = state.applied_index
            self._added()

    async def api_events(self, params: dict[str, Any]) -> dict[str, Any]:
        """Events after ``since``; waits up to ``wait_s`` for one if there is none."""
        since, wait_s = params.get("since", 0), params.get("wait_s", 0)
        if type(since) is not int or not isinstance(wait_s, (int, float)):
            raise api.ApiError("events takes since (an integer) and wait_s (seconds)")
        if since > self.log.last_seq:
            since = 0  # this node restarted since: its sequence started over
        if not self.log.since(since, 1) and wait_s > 0:
            with trio.move_on_after(min(float(wait_s), self.MAX_WAIT_S)):
                while not self.log.since(since, 1):
                    await self._new.wait()
        events = self.log.since(since)
        return {"events": [e.as_dict() for e in events], "last": self.log.last_seq}


async def _stay_joined(node: Node, seeds: Sequence[Addr]) -> None:
    """While this node is alone, keep trying the seeds it knows."""
    while True:
        if node.core.num_live() == 1:
            result = await node.adapter.join(seeds)
            if result.ok:
                LOGGER.info("rejoined node=%s via=%s", node.core.me,
                            ",".join(map(str, result.ok)))
            else:
                LOGGER.warning("rejoin_failed node=%s tried=%s; retrying in %gs",
                               node.core.me, ",".join(str(a) for a, _ in result.failed),
                               REJOIN_INTERVAL_S)
        await trio.sleep(REJOIN_INTERVAL_S)


ISSUED_RETRY_S = 5.0
"""Longest pause before a background write (issued certificates, the CA) is tried
again after it failed; a change of leader ends it sooner."""


async def _pause_after_failed_write(replica: Replica) -> None:
    with trio.move_on_after(ISSUED_RETRY_S):
        await replica.wait_changed(view=True)


async def _replicate_issued(registry: trust.IssuedRegistry, replica: Replica) -> None:
    """Commit the certificates this node issued to the replicated state
    (``CertIssued``, idempotent): each new one, and at start those issued before
    (recorded only in ``DIR/issued.json`` by older versions), so that ``meshctl
    node rm`` finds them on any node."""
    while True:
        changed = registry.changed
        known = {c.serial for c in replica.state.issued_certs()}
        try:
            for name, serial in registry.items():
                if f"{serial:x}" not in known:
                    await replica.write_command(CertIssued(f"{serial:x}", NodeId(name)))
        except api.ApiError as exc:
            LOGGER.info("certificates_not_recorded node=%s retry_in=%gs reason=%s",
                        replica.raft.me, ISSUED_RETRY_S, exc)
            await _pause_after_failed_write(replica)
            continue
        await changed.wait()


async def _record_ca(node: Node, ca: CertificateAuthority, token: JoinToken) -> None:
    """On the node whose files hold the CA (it created the cluster): commit the CA
    and the join token to Raft, so that every voter can issue certificates, once
    every Raft member applies those commands (state level 2). Once both are
    recorded there is nothing to do (each write is idempotent or conditional: a
    token rotated meanwhile is kept)."""
    replica = node.replica
    assert replica is not None
    cert_pem = cert_to_pem(ca.cert)
    waiting_for: list[str] = []
    while True:
        record = replica.state.cluster_ca()
        if record.ca_index and record.cert_pem != cert_pem:
            LOGGER.error("ca_not_recorded node=%s reason=the replicated state records another "
                         "CA than tls/ca.crt; this node's CA files are not the cluster's",
                         replica.raft.me)
            return
        if record.ca_index and record.token_index:
            return
        if replica.leader is None:  # a new cluster's first moment: no need to try yet
            await _pause_after_failed_write(replica)
            continue
        st = replica.status()
        older = trust.below_state_level((*st["voters"], *st["learners"]), node.core,
                                        STATE_LEVEL)
        if older:
            if older != waiting_for:
                LOGGER.warning("ca_not_recorded node=%s reason=Raft members %s run an older "
                               "meshd (or are not alive); this node issues alone until every "
                               "member is upgraded", replica.raft.me, ",".join(older))
            waiting_for = older
            await _pause_after_failed_write(replica)
            continue
        command: Command = CaSet(cert_pem, key_to_pem(ca.key)) if not record.ca_index \
            else TokenSet(token.secret, cas=0)
        try:
            await replica.write_command(command)
            await replica.read_point({})  # the write is in the local replica now
        except api.ApiError as exc:
            LOGGER.info("ca_not_recorded node=%s retry_in=%gs reason=%s", replica.raft.me,
                        ISSUED_RETRY_S, exc)
            await _pause_after_failed_write(replica)
            continue
        LOGGER.info("ca_recorded node=%s part=%s", replica.raft.me,
                    "certificate_and_key" if isinstance(command, CaSet) else "join_token")


async def _follow_ca(node: Node, issuing: trust.Issuing, meta: Callable[[bool], Meta]) -> None:
    """Issue certificates while :class:`~mesh.node.trust.Issuing` says so: keep
    ``trust.join_server``, the ``join`` port in this node's gossip metadata and
    ``DIR/join-token`` in step with the CA record, the vault and this node's Raft
    membership."""
    replica, credentials = node.replica, node.trust
    assert replica is not None
    written = credentials.file_ca[1] if credentials.file_ca else None  # DIR/join-token
    while True:
        server = issuing.decide(replica.state.cluster_ca(), replica.gate.vault,
                                replica.membership() == "voter")
        if (server is None) != (credentials.join_server is None):
            node.adapter.update_meta(meta(server is not None))
            LOGGER.info("certificate_issuer node=%s issuing=%s", node.core.me,
                        "yes" if server is not None else "no")
        credentials.join_server = server
        if server is not None and server.token != written:
            await trio.to_thread.run_sync(tls.save_token, node.config.data_dir, server.token)
            written = server.token
            continue  # the state may have moved while the file was written
        await replica.wait_changed((Table.CA,), view=True)


def detect_advertise_host() -> str:
    """The IPv4 address to advertise for a wildcard ``--bind`` (see
    :func:`mesh.node.config.choose_advertise`): reads ``/proc/net/route`` and each
    interface's address (``SIOCGIFADDR``).

    Raises:
        ConfigError: no single address to choose (the message says to pass
            ``--advertise``).
    """
    try:
        routes = Path("/proc/net/route").read_text()
    except OSError:
        routes = ""
    addresses: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, iface in socket.if_nameindex():
            request = struct.pack("256s", iface.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address (or gone meanwhile)
            addresses[iface] = socket.inet_ntoa(answer[20:24])
    return choose_advertise(default_route_interfaces(routes), addresses)


_SIOCGIFADDR: Final = 0x8915
"""Linux ioctl: an interface's IPv4 address (``struct ifreq``, address at 20-24)."""


def _link_handlers(node: Node) -> dict[str, tls.Handler]:
    """What each ALPN on the gossip port leads to."""
    adapter, credentials = node.adapter, node.trust
    api_handlers, api_starters = node.handlers(), node.starters()

    async def gossip(stream: tls.SSLStreamT, peer: tls.PeerInfo) -> None:
        await adapter.serve_push_pull(stream, peer.addr)

    async def rpc(stream: tls.SSLStreamT, peer: tls.PeerInfo) -> None:
        await api.serve_api_stream(stream, api_handlers, node.core.me, api_starters)

    handlers: dict[str, tls.Handler] = {tls.ALPN_GOSSIP: gossip, tls.ALPN_RPC: rpc}
    if node.replica is not None:
        handlers[tls.ALPN_RAFT] = node.replica.serve_link
    redirect = tls.redirect_join_handler(lambda: trust.issuers(node.core))
    taken = trust.LiveNames(node.core)
    serving: dict[int, tls.Handler] = {}

    async def join(stream: tls.SSLStreamT, peer: tls.PeerInfo) -> None:
        server = credentials.join_server  # changes as this node starts or stops issuing
        if server is None:
            await redirect(stream, peer)
            return
        handler = serving.get(id(server))
        if handler is None:
            serving.clear()
            handler = serving[id(server)] = tls.join_handler(server, taken=taken)
        try:
            await handler(stream, peer)
        finally:
            await trust.record_issued(credentials, server)

    handlers[tls.ALPN_JOIN] = join
    return handlers


async def run_node(config: NodeConfig, *, token: JoinToken | None = None,
                   cluster_label: str = "meshd", seed: int | None = None,
                   replica_settings: ReplicaSettings | None = None,
                   wall_clock: WallClock = trust.utc_now,
                   task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    """Run one node until SIGTERM/SIGINT (graceful leave) or cancellation.

    Args:
        config: the node's configuration.
        token: the join token, needed only for the first start of a joining node.
        cluster_label: the cluster's name, used only when creating a cluster.
        seed: seeds the node's RNG (tests); random otherwise.
        replica_settings: Raft timing and voter count (default: lan).
        wall_clock: the clock for certificate validity.

    Raises:
        StartupError: it cannot start; nothing is left running.
    """
    replica_settings = replica_settings or ReplicaSettings(RaftConfig.lan())
    try:
        udp, tcp = await bind_gossip_sockets(config.bind)
    except OSError as exc:
        raise StartupError(describe_bind_error(config.bind, exc)) from None
    bound_port = udp.getsockname()[1]
    if config.advertise.port == 0:
        config = dataclasses.replace(config, advertise=Addr(config.advertise.host, bound_port))
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "big"))
    try:
        dns_sockets = await bind_dns_sockets(config.dns) if config.dns is not None else None
    except BaseException:
        udp.close()
        await tcp.aclose()
        raise
    with udp, dns_sockets or contextlib.nullcontext():
        # The driver first: a node that cannot run workloads must fail before it
        # creates or joins a cluster, or its data dir would hold credentials
        # without the Raft state that goes with them.
        try:
            driver = await open_driver(
                config.driver, state_dir=config.allocs_dir, node=config.name,
                host=config.advertise.host, wall_clock=lambda: wall_clock().timestamp(),
                dns_servers=_container_resolvers(config, dns_sockets),
                docker_pull=config.docker_pull)
            credentials = await trust.establish(config, token, wall_clock, cluster_label)
        except DriverError as exc:
            await tcp.aclose()
            raise StartupError(str(exc)) from None
        except BaseException:
            await tcp.aclose()
            raise
        def meta(issuing: bool) -> Meta:
            ports = {"gossip": config.advertise.port}
            if issuing:
                ports[trust.JOIN_PORT_NAME] = config.advertise.port
            return Meta.build({**dict(config.labels), DRIVER_LABEL: driver.name,
                               STATE_LEVEL_LABEL: str(STATE_LEVEL)},
                              config.cpu_millis, config.memory_bytes, config.role, ports)

        core = Membership(config.gossip, config.name, config.advertise, meta(False), rng,
                          trio.current_time())
        adapter = GossipAdapter(core, UdpTransport(udp), credentials.gossip_dialer(),
                                credentials.codec)
        node = Node(config, adapter, credentials)
        node.driver = driver
        node.replica = await Replica.open(config, core, credentials, replica_settings,
                                          random.Random(rng.getrandbits(64)))
        node.services = ServiceApi(node.replica, core, node.local_logs)
        node.events = EventFeed(node, lambda: wall_clock().timestamp())
        node.tls_server = tls.TlsServer(credentials.server_ctx, _link_handlers(node),
                                        revoked=credentials.revoked, node=config.name)
        api_listener = await api.bind_unix_socket(config.socket_path)
        metrics_listener = await api.bind_tcp(config.metrics_bind) if config.metrics_bind \
            else None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(adapter.run)
                await nursery.start(node.tls_server.serve, [tcp])
                await node.replica.start(nursery)
                # Issue (or not) from the replicated state restored from disk, before
                # joining: the first node of a new cluster issues with its files.
                nursery.start_soon(_follow_ca, node, trust.Issuing(credentials, config.name,
                                                                   wall_clock), meta)
                await nursery.start(node.events.run)
                await nursery.start(driver.serve)
                agent = Agent(node.replica, driver, config.advertise.host,
                              lambda: wall_clock().timestamp(),
                              random.Random(rng.getrandbits(64)))
                await nursery.start(agent.run)
                await nursery.start(Planner(node.replica, core, adapter.subscribe).run)
                if config.dns is not None and dns_sockets is not None:
                    await _start_dns(node, config.dns, dns_sockets, rng, nursery)
                await nursery.start(api.serve_api, api_listener, node.handlers(), config.name,
                                    node.starters())
                if metrics_listener is not None:
                    await nursery.start(api.serve_metrics, metrics_listener,
                                        node.render_metrics)
                LOGGER.info("node_started node=%s addr=%s bind=%s api=%s metrics=%s version=%s",
                            config.name, config.advertise, config.bind, config.socket_path,
                            config.metrics_bind or "off", mesh.__version__)
                # Subscribe before joining: the join's own membership changes are the
                # ones that must reach peers.json (a node that joined last sees no more).
                await nursery.start(_write_peers, node)
                await _join(node, config, nursery)
                nursery.start_soon(trust.renew_forever, credentials, core, config, wall_clock,
                                   random.Random(rng.getrandbits(64)))
                nursery.start_soon(_replicate_issued, credentials.issued, node.replica)
                if credentials.file_ca is not None:
                    nursery.start_soon(_record_ca, node, *credentials.file_ca)
                task_status.started(node)
                await _wait_for_signal(node)
                nursery.cancel_scope.cancel()
        finally:
            config.socket_path.unlink(missing_ok=True)
            await node.replica.aclose()


async def _start_dns(node: Node, dns_config: DnsConfig, sockets: DnsSockets,
                     rng: random.Random, nursery: trio.Nursery) -> None:
    builder = CatalogBuilder(local_node=node.core.me)
    node.dns = DnsServer(dns_config, builder.build(node.core.members(), []),
                         random.Random(rng.getrandbits(64)))
    node.dns_addr = await nursery.start(node.dns.serve, sockets)
    nursery.start_soon(_feed_dns, node, builder, node.dns)


async def _join(node: Node, config: NodeConfig, nursery: trio.Nursery) -> None:
    if config.join:
        result = await node.adapter.join(config.join)
        if not result.ok:
            tried = "; ".join(f"{a}: {why}" for a, why in result.failed)
            raise StartupError(f"cannot join the cluster: no join address answered ({tried}). "
                               "Check the address and that meshd runs there")
        LOGGER.info("joined node=%s via=%s members=%d", config.name,
                    ",".join(map(str, result.ok)), node.core.num_live())
        nursery.start_soon(_stay_joined, node, config.join)
        return
    peers = [p for p in load_peers(config.data_dir) if p != config.advertise]
    if peers:
        LOGGER.info("rejoining node=%s known_peers=%d", config.name, len(peers))
        nursery.start_soon(_stay_joined, node, peers)
        return
    LOGGER.info("cluster_started node=%s addr=%s", config.name, config.advertise)


async def _wait_for_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            LOGGER.info("leaving node=%s signal=%s", node.core.me, signal.Signals(signum).name)
            await node.adapter.leave()
            return


# --- command line ------------------------------------------------------------------


class StructuredFormatter(logging.Formatter):
    """``2026-11-22T06:41:42.123Z INFO mesh.gossip member_dead node=a peer=b ...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str) -> None:
    """Send structured lines to stderr (only entry points configure logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    """The ``meshd`` argument parser."""
    parser = argparse.ArgumentParser(prog="meshd", description="meshd: the meshd daemon.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run this node in the foreground")
    start.add_argument("--data-dir", default=os.environ.get("MESH_DATA_DIR", "/var/lib/meshd"),
                       help="node state directory (default $MESH_DATA_DIR or /var/lib/meshd)")
    start.add_argument("--bind", default=f"0.0.0.0:{DEFAULT_PORT}",
                       help=f"IP[:PORT] for gossip UDP+TCP (default 0.0.0.0:{DEFAULT_PORT})")
    start.add_argument("--advertise", help="IP:PORT other nodes reach this one at "
                       "(default: the --bind address; for a wildcard --bind, the address "
                       "of the default route's interface)")
    start.add_argument("--name", help="unique node name (default: the name stored in the "
                       "data dir, else the hostname)")
    start.add_argument("--join", action="append", default=[],
                       help="HOST:PORT[,HOST:PORT...] of a member to join through; repeatable")
    start.add_argument("--token", default=os.environ.get("MESH_TOKEN"),
                       help="join token (first join only; default $MESH_TOKEN); a cluster "
                       "node shows it with `meshctl token`")
    start.add_argument("--cluster-name", default="meshd",
                       help="name of a new cluster (first node only; default meshd)")
    start.add_argument("--label", action="append", default=[], help="K=V node label; "
                       "repeatable (e.g. --label zone=a)")
    start.add_argument("--cpu", type=float, default=None,
                       help="schedulable CPU cores (default: all of this host's)")
    start.add_argument("--memory", default=None,
                       help="schedulable memory, e.g. 4G or 512M (default: this host's)")
    start.add_argument("--role", default="worker", help="free-form role announced to peers")
    start.add_argument("--metrics-bind", default=None,
                       help=f"IP:PORT of the Prometheus endpoint (default: the bind IP if it "
                       f"is loopback, else 127.0.0.1, port {DEFAULT_METRICS_PORT}); 'off' "
                       "disables it")
    start.add_argument("--dns-bind", default=None,
                       help="HOST[:PORT] of the DNS server, or 'off' (default: the --bind "
                       "host, port 53 if it may be bound, else 8600)")
    start.add_argument("--dns-domain", default="mesh", help="DNS zone answered (default mesh)")
    start.add_argument("--dns-upstream", default=None,
                       help="HOST[:PORT] of a resolver for names outside the zone (default: "
                       "refuse them)")
    start.add_argument("--driver", choices=["auto", "docker", "process"], default="auto",
                       help="workload driver: docker if a Docker engine answers, else local "
                       "processes (default auto)")
    start.add_argument("--docker-pull", action="store_true",
                       help="let the docker driver pull missing images (default: only use "
                       "images already loaded on the node)")
    start.add_argument("--raft-voters", type=int, choices=[3, 5], default=3,
                       help="Raft voters to keep (3 or 5; fewer while the cluster is smaller)")
    start.add_argument("--gossip-profile", choices=sorted(GOSSIP_PROFILES), default="lan",
                       help="gossip timing preset (default lan)")
    start.add_argument("--log-level", default=os.environ.get("MESH_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"])
    sub.add_parser("version", help="print the version")
    return parser


def parse_size(text: str) -> int:
    """``512M``, ``4G``, ``1024`` (bytes) -> bytes.

    Raises:
        ConfigError: not a size.
    """
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"size {text!r} is not like 512M or 4G") from None
    if value < 0:
        raise ConfigError(f"size {text!r} is negative")
    return int(value * mult)


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Build the node configuration from ``meshd start`` flags and the data dir.

    Raises:
        ConfigError: a flag is malformed.
        StartupError: the data dir is unusable.
    """
    try:
        bind = Addr.parse(args.bind, DEFAULT_PORT)
        if args.advertise:
            advertise = Addr.parse(args.advertise, bind.port)
        elif bind.host in ("0.0.0.0", "::"):
            advertise = Addr(detect_advertise_host(), bind.port)
        else:
            advertise = bind
        join = tuple(Addr.parse(part, DEFAULT_PORT) for item in args.join
                     for part in item.split(",") if part.strip())
        if args.metrics_bind == "off":
            metrics: Addr | None = None
        elif args.metrics_bind:
            metrics = Addr.parse(args.metrics_bind, DEFAULT_METRICS_PORT)
        else:
            host = bind.host if bind.host.startswith("127.") or bind.host == "::1" \
                else "127.0.0.1"
            metrics = Addr(host, DEFAULT_METRICS_PORT)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    labels = tuple(sorted(dict(parse_label(x) for x in args.label).items()))
    cpu = args.cpu if args.cpu is not None else float(os.cpu_count() or 1)
    memory = parse_size(args.memory) if args.memory else _host_memory_bytes()
    data_dir = Path(args.data_dir).resolve()
    name = prepare_data_dir(data_dir, args.name)
    return NodeConfig(
        data_dir=data_dir, name=name, bind=bind, advertise=advertise, join=join,
        labels=labels, cpu_millis=int(cpu * 1000), memory_bytes=memory, role=args.role,
        metrics_bind=metrics, gossip=GOSSIP_PROFILES[args.gossip_profile](),
        dns=DnsConfig.from_flags(args.dns_bind, args.dns_domain, args.dns_upstream,
                                 default_host=bind.host),
        driver=args.driver, docker_pull=args.docker_pull,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``meshd``; returns the exit status. A started node leaves the cluster
    on SIGINT or SIGTERM and returns 0; a Ctrl-C during start-up raises
    KeyboardInterrupt (in a group if it interrupted a nursery), which
    :func:`mesh.node.entry.run_interruptible` turns into exit status 130."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"meshd {mesh.__version__}")
        return 0
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
        token = JoinToken.parse(args.token) if args.token else None
        raft_config, stable_s = RAFT_PROFILES[args.gossip_profile]
        settings = ReplicaSettings(raft_config(), voters=args.raft_voters, stable_s=stable_s)
        trio.run(functools.partial(run_node, config, token=token,
                                   cluster_label=args.cluster_name,
                                   replica_settings=settings))
    except (ConfigError, StartupError) as exc:
        print(f"meshd: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # A startup failure inside the nursery arrives wrapped in a group.
        startup = group.subgroup(lambda e: isinstance(e, (ConfigError, StartupError)))
        if startup is None:
            raise
        print(f"meshd: error: {_first_leaf(startup)}", file=sys.stderr)
        return 1
    return 0


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(run_interruptible(main))
