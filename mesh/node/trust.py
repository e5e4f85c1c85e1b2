"""A node's trust life cycle: how it comes to hold credentials, and keeps them fresh.

* First node (empty data dir, no ``--join``): creates the cluster CA, its node
  certificate, the admin client certificate, the gossip key ring and a join token.
* Joining node (empty data dir, ``--join``): proves the token to a CA-holding node
  over ``mesh-join/1`` (the CA pinned by the token's fingerprint first) and receives
  its certificate, the CA certificate and the gossip keys. A node that refuses it
  for too many join attempts is asked again after the delay it advises, for up to
  :data:`JOIN_RATE_LIMIT_PATIENCE_S` of waiting in all.
* Restart (credentials in the data dir): loads them; no token needed.

Who issues certificates (answers joins and renewals): every Raft voter. The CA
key and the join token's secret are held by Raft (:mod:`mesh.raft.vault`): the
first node records its CA and token once it leads, and every member's Raft feed
gives them to it. :class:`Issuing` decides, whenever the CA record, the vault or
the node's Raft membership changes, whether this node issues and with what; an
issuing node announces :data:`JOIN_PORT_NAME` in its gossip metadata, and the
others redirect joiners to the issuers and renew through them. Before the CA is
recorded in Raft (the first moments of a new cluster, or a cluster an older
version created), the node holding ``tls/ca.key`` issues with ``DIR/join-token``.

Then, while running: the deny list of revoked serials (checked on every link), the
registry of serials this node issued (committed to the replicated state as well, so
``meshctl node rm NAME`` knows what to revoke on any node), certificate renewal at a
random point in 50-80% of the certificate's life, and cluster-wide operations fanned
out to every live member over ``mesh-rpc/1`` (gossip key rotation).

The deny list is held in the replicated state ([raft]); each node applies it to its
live TLS deny set (persisted in ``DIR/revoked.json``, so it holds from the first
link after a restart, before the replica has caught up).

Resource handling:
    Files are written atomically (temp, fsync, rename) through ``trio.to_thread``;
    every link opened here is closed before the call returns.

Error handling:
    Startup problems raise :class:`~mesh.errors.StartupError` with one line a person
    can act on; fan-out failures are returned per node, never raised.
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import trio
from cryptography import x509

from mesh import tls
from mesh.errors import ConfigError, MeshError, RemoteProtocolError, StartupError
from mesh.gossip.core import Membership
from mesh.gossip.keyring import Keyring, KeyringCodec
from mesh.gossip.messages import Status
from mesh.node import api
from mesh.node.config import NodeConfig
from mesh.node.metrics import Metric, counter, gauge
from mesh.node.orchestrate import STATE_LEVEL_LABEL
from mesh.raft.state import ClusterCa, Command, TokenSet
from mesh.raft.vault import Vault
from mesh.security.join import (
    JoinRateLimited,
    JoinRedirected,
    JoinResult,
    JoinServer,
)
from mesh.security.messages import JoinReject
from mesh.security.pki import (
    CertificateAuthority,
    WallClock,
    ca_fingerprint,
    create_csr,
    generate_key,
    load_cert_pem,
    load_key_pem,
    renewal_time,
)
from mesh.security.token import JoinToken, new_token
from mesh.types import Addr, NodeId

LOGGER = logging.getLogger(__name__)

JOIN_PORT_NAME = "join"
"""Members that issue certificates announce their gossip port under this name in
their metadata ports: they serve joins and renewals."""

FAN_OUT_TIMEOUT_S = 10.0
"""Bound on one cluster-wide operation per member."""

MAX_JOIN_ATTEMPTS = 8
"""Join addresses (given and redirected to) tried before giving up."""

JOIN_RATE_LIMIT_PATIENCE_S = 120.0
"""Seconds a joining node waits in all, over every node that refused it for too
many join attempts, before it gives up with the node's reason. At the default limits
a rack of 50 nodes behind one NAT address is in after about 30 s."""

MAX_RATE_LIMIT_WAIT_S = 30.0
"""Longest single wait a rate-limit refusal imposes. The advice arrives before the
CA is pinned, so it is not trusted further than this."""

RATE_LIMIT_JITTER = 0.5
"""Each wait is the advised delay times ``1 + RATE_LIMIT_JITTER * u``, with ``u``
drawn from an RNG seeded with the node name, so that joiners refused at the same
moment do not all come back at the same moment."""

RENEW_RETRY_S = 60.0
"""Wait between renewal attempts that failed."""

MAX_RENEW_ATTEMPTS = 24 * 60
"""Attempts before rescheduling from the (unchanged) certificate: a day of retries."""

ROTATE_CONFIRM_S = 5.0
"""How long ``meshctl token rotate`` waits for every alive issuer to serve the new
token (each applies the entry within a heartbeat or two)."""

ROTATE_POLL_S = 0.1
"""Pause between two rounds of asking the issuers that did not serve it yet."""


def _write_json(path: Path, data: Any) -> None:
    tls.write_file_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode(), 0o600)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StartupError(f"{path} is damaged ({exc}): restore it or remove it") from None


class RevocationList(tls.DenySet):
    """The deny list of certificate serials, persisted in ``DIR/revoked.json``.

    A live :class:`~mesh.tls.DenySet`: the TLS server and dialers hold a reference,
    see additions at once and track the links they open, so that a revocation also
    closes the links already open with the revoked certificates.
    """

    def __init__(self, path: Path, serials: Iterable[int] = ()) -> None:
        super().__init__(serials)
        self._path = path

    @classmethod
    def load(cls, data_dir: Path) -> RevocationList:
        """Read the list (empty if the file does not exist)."""
        path = data_dir / "revoked.json"
        raw = _read_json(path) or {"serials": []}
        return cls(path, (int(s, 16) for s in raw["serials"]))

    async def add(self, serials: Iterable[int]) -> int:
        """Revoke ``serials`` (closing their open links) and persist; returns how
        many were new."""
        new = await self.revoke(serials)
        if new:
            data = {"serials": [f"{s:x}" for s in self]}
            await trio.to_thread.run_sync(_write_json, self._path, data)
        return len(new)


class IssuedRegistry:
    """Which serials this node issued to which node (``DIR/issued.json``); the
    node also commits them to the replicated state (``CertIssued``), so that
    ``meshctl node rm`` works from any node."""

    def __init__(self, path: Path, by_name: dict[str, list[int]]) -> None:
        self._path = path
        self._by_name = by_name
        self.changed = trio.Event()
        """Set when a serial was recorded (replaced by a fresh event after each)."""

    @classmethod
    def load(cls, data_dir: Path) -> IssuedRegistry:
        """Read the registry (empty if the file does not exist)."""
        path = data_dir / "issued.json"
        raw = _read_json(path) or {}
        return cls(path, {name: [int(s, 16) for s in serials] for name, serials in raw.items()})

    def serials_of(self, name: str) -> list[int]:
        """Every serial issued to ``name``."""
        return list(self._by_name.get(name, []))

    def items(self) -> list[tuple[str, int]]:
        """Every (name, serial) issued, by name."""
        return [(n, s) for n, ss in sorted(self._by_name.items()) for s in ss]

    async def record(self, name: str, serial: int) -> None:
        """Remember one issued serial and persist."""
        self._by_name.setdefault(name, []).append(serial)
        data = {n: [f"{s:x}" for s in ss] for n, ss in sorted(self._by_name.items())}
        await trio.to_thread.run_sync(_write_json, self._path, data)
        self.changed.set()
        self.changed = trio.Event()


@dataclass(slots=True)
class Trust:
    """Everything a running node needs to speak securely."""

    data_dir: Path
    identity: tls.TlsIdentity
    keyring: Keyring
    codec: KeyringCodec
    client_ctx: ssl.SSLContext
    server_ctx: ssl.SSLContext
    revoked: RevocationList
    join_server: JoinServer | None
    """The join server while this node issues certificates (see :class:`Issuing`)."""
    issued: IssuedRegistry
    created_cluster: bool
    file_ca: tuple[CertificateAuthority, JoinToken] | None
    """The CA and token in this data dir's files (the node that created the
    cluster), which it records in Raft and issues with until then."""

    def gossip_dialer(self) -> tls.TlsDialer:
        """Push-pull streams over ``mesh-gossip/1``."""
        return tls.TlsDialer(self.client_ctx, tls.ALPN_GOSSIP, revoked=self.revoked)

    async def save_keyring(self) -> None:
        """Persist the gossip key ring after a change."""
        await trio.to_thread.run_sync(tls.save_keyring, self.data_dir, self.keyring)


def utc_now() -> datetime:
    """The wall clock, for certificate validity (injected everywhere else)."""
    return datetime.now(UTC)


async def establish(config: NodeConfig, token: JoinToken | None, wall_clock: WallClock,
                    cluster_label: str) -> Trust:
    """Bootstrap, join or load this node's credentials.

    Raises:
        StartupError: a key file readable by others, no token for a first join, a
            wrong or rotated token, no join address reachable, damaged files.
    """
    data_dir = config.data_dir
    await trio.to_thread.run_sync(tls.check_data_dir, data_dir)
    identity = tls.TlsIdentity.node(data_dir)
    created = False
    if not await trio.to_thread.run_sync(identity.exists):
        if config.join:
            await _join_with_token(config, token, wall_clock)
        else:
            boot = await trio.to_thread.run_sync(
                tls.bootstrap_first_node, data_dir, config.name, config.advertise,
                cluster_label, wall_clock)
            created = True
            LOGGER.warning(
                "join_command node=%s: add nodes with: meshd start --join %s --token %s "
                "(the token is also in %s; meshctl admin credentials are in %s)",
                config.name, config.advertise, boot.token, data_dir / tls.TOKEN_FILE,
                data_dir / tls.ADMIN_DIR)
    elif token is not None:
        LOGGER.info("token_ignored node=%s reason=already_joined data_dir=%s", config.name,
                    data_dir)
    credentials = await trio.to_thread.run_sync(_load, data_dir, created)
    if created:
        # The first certificates, signed at bootstrap: recorded like every issued
        # one (and committed to Raft), so `meshctl node rm admin` can revoke the
        # admin credentials.
        admin = tls.TlsIdentity.admin(data_dir / tls.ADMIN_DIR)
        for name, ident in ((config.name, identity), ("admin", admin)):
            cert = await trio.to_thread.run_sync(ident.load_cert)
            await credentials.issued.record(name, cert.serial_number)
    return credentials


class JoinRequester(Protocol):
    """Runs one join exchange with one node (:func:`mesh.tls.request_join`)."""

    async def __call__(self, addr: Addr, token: JoinToken, csr: x509.CertificateSigningRequest,
                       advertise: Addr, *, wall_clock: WallClock) -> JoinResult:
        """Join through ``addr``.

        Raises:
            JoinRedirected: the node holds no CA key and names members that do.
            JoinRateLimited: the node refused the attempt for now.
            StartupError: the join failed.
        """


async def _join_with_token(config: NodeConfig, token: JoinToken | None,
                           wall_clock: WallClock,
                           request: JoinRequester = tls.request_join) -> None:
    if token is None:
        raise StartupError(
            "joining a cluster needs its join token: on a cluster node run `meshctl token` "
            "(or read DIR/join-token there) and pass --token TOKEN or set MESH_TOKEN")
    key = generate_key()
    csr = create_csr(key, config.name)
    errors = []
    queue = list(config.join)
    tried: set[Addr] = set()
    patience = _Patience(config.name, trio.current_time())
    while queue and len(tried) < MAX_JOIN_ATTEMPTS:
        seed = queue.pop(0)
        if seed in tried:
            continue
        tried.add(seed)
        try:
            result = await patience.join(request, seed, token, csr, config.advertise,
                                         wall_clock)
        except JoinRedirected as redirect:
            # A node without the CA key named the ones that have it: try them next.
            LOGGER.info("join_redirected node=%s via=%s to=%s", config.name, seed,
                        ",".join(redirect.issuers))
            for text in redirect.issuers:
                try:
                    queue.append(Addr.parse(text, seed.port))
                except ValueError:
                    continue
            if not redirect.issuers:
                errors.append(f"{seed}: {redirect}")
            continue
        except StartupError as exc:
            errors.append(str(exc))
            continue
        await trio.to_thread.run_sync(tls.save_join_result, config.data_dir, key, result)
        LOGGER.info("credentials_received node=%s via=%s", config.name, seed)
        return
    raise StartupError("; ".join(errors) or "no join address could be tried")


class _Patience:
    """Retries joins that a node refused for rate limiting, within one deadline
    (:data:`JOIN_RATE_LIMIT_PATIENCE_S` after ``started_at``) shared by every node
    tried."""

    def __init__(self, name: NodeId, started_at: float) -> None:
        self._name = name
        self._started_at = started_at
        self._rng = random.Random(f"join-retry:{name}")

    async def join(self, request: JoinRequester, seed: Addr, token: JoinToken,
                   csr: x509.CertificateSigningRequest, advertise: Addr,
                   wall_clock: WallClock) -> JoinResult:
        """``request`` through ``seed``, again after each rate-limit refusal.

        Raises:
            StartupError: the join failed, or the advised waits no longer fit
                before the deadline (the message keeps the node's reason).
            JoinRedirected: as ``request``.
        """
        while True:
            try:
                return await request(seed, token, csr, advertise, wall_clock=wall_clock)
            except JoinRateLimited as refused:
                wait_s = (min(refused.retry_in_s, MAX_RATE_LIMIT_WAIT_S)
                          * (1.0 + RATE_LIMIT_JITTER * self._rng.random()))
                now = trio.current_time()
                if now + wait_s > self._started_at + JOIN_RATE_LIMIT_PATIENCE_S:
                    raise StartupError(
                        f"join via {seed} refused: {refused.reason}; stopped retrying after "
                        f"{now - self._started_at:.0f} s (this node waits at most "
                        f"{JOIN_RATE_LIMIT_PATIENCE_S:g} s for rate limits). Too many join "
                        "attempts reach that node (many nodes joining from one address, or "
                        "a flood): start this node again in a minute, or --join through "
                        "another member"
                    ) from None
                LOGGER.warning("join_rate_limited node=%s via=%s retry_in=%.1f reason=%s",
                               self._name, seed, wait_s, refused.reason)
                await trio.sleep(wait_s)


def _load(data_dir: Path, created: bool) -> Trust:
    identity = tls.TlsIdentity.node(data_dir)
    keyring = tls.load_keyring(data_dir)
    label = tls.load_cluster_label(data_dir)
    codec = KeyringCodec(keyring, label, time.time, os.urandom)
    ca = tls.load_ca(data_dir)
    file_ca = (ca, tls.load_token(data_dir)) if ca is not None else None
    return Trust(data_dir, identity, keyring, codec, tls.client_context(identity),
                 tls.server_context(identity), RevocationList.load(data_dir), None,
                 IssuedRegistry.load(data_dir), created, file_ca)


class LiveNames:
    """Names of live members: a joiner may not take one (``Container[str]``)."""

    def __init__(self, core: Membership) -> None:
        self._core = core

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        view = self._core.member(NodeId(name))
        return view is not None and view.status <= Status.SUSPECT


class Issuing:
    """Decides whether this node issues certificates, and keeps its join server.

    A node issues while it is a Raft voter whose vault holds the CA key and the
    join token of the CA the replicated state records. Until the state records
    both, the node whose files hold the CA (``Trust.file_ca``) issues with them.
    There is one join server per node (its rate limits and counters last); a
    token change rotates it.

    Args:
        trust: the node's credentials (``file_ca``, the key ring).
        name: this node, for log lines.
        wall_clock: certificate validity.
    """

    def __init__(self, trust: Trust, name: NodeId, wall_clock: WallClock) -> None:
        self._trust = trust
        self._name = name
        self._wall_clock = wall_clock
        self._server: JoinServer | None = None
        self._loaded: tuple[tuple[bytes, bytes], CertificateAuthority | None] | None = None
        """The vault material last parsed, and the CA it gave (``None``: unusable,
        logged once)."""

    def decide(self, record: ClusterCa, vault: Vault, voter: bool) -> JoinServer | None:
        """The join server to serve with now, or ``None`` (redirect joiners)."""
        if not (record.ca_index and record.token_index):
            file_ca = self._trust.file_ca
            if file_ca is None:
                return None
            return self._serve(*file_ca)
        if not (voter and vault.complete and vault.cert_pem == record.cert_pem):
            return None
        ca = self._vault_ca(vault)
        if ca is None:
            return None
        return self._serve(ca, JoinToken(ca.fingerprint, vault.token_secret))

    def _vault_ca(self, vault: Vault) -> CertificateAuthority | None:
        material = (vault.cert_pem, vault.key_pem)
        if self._loaded is not None and self._loaded[0] == material:
            return self._loaded[1]
        ca: CertificateAuthority | None = None
        try:
            cert, key = load_cert_pem(vault.cert_pem), load_key_pem(vault.key_pem)
            if cert.public_key() != key.public_key():
                raise ConfigError("the CA key does not match the CA certificate")
            ca = CertificateAuthority(cert, key)
        except MeshError as exc:
            LOGGER.error("ca_material_unusable node=%s reason=%s; this voter does not issue "
                         "certificates (the others do)", self._name, exc)
        self._loaded = (material, ca)
        return ca

    def _serve(self, ca: CertificateAuthority, token: JoinToken) -> JoinServer:
        server = self._server
        if server is None or server.token.ca_fingerprint != ca.fingerprint:
            server = self._server = JoinServer(ca, token, self._trust.keyring,
                                               self._wall_clock, node=self._name)
        elif server.token != token:
            server.rotate_token(token)
        return server


def below_state_level(names: Iterable[str], core: Membership, level: int) -> list[str]:
    """Which of ``names`` (Raft members) do not announce state level ``level`` or
    higher in their gossip metadata (the ``meshd.state`` label), or are not alive:
    a command of that level must wait for them, or they would apply it as invalid
    (:data:`mesh.raft.state.STATE_LEVEL`)."""
    out = []
    for name in sorted(set(names)):
        view = core.member(NodeId(name))
        text = view.meta.labels_dict.get(STATE_LEVEL_LABEL, "") if view is not None else ""
        if view is None or view.status is not Status.ALIVE or not text.isdigit() \
                or int(text) < level:
            out.append(name)
    return out


def issuers(core: Membership) -> list[Addr]:
    """Addresses of alive members that issue certificates (serve joins and
    renewals)."""
    return [m.addr for m in core.members()
            if m.status == Status.ALIVE and JOIN_PORT_NAME in m.meta.ports_dict]


def join_metrics(server: JoinServer) -> list[Metric]:
    """The join server's counters as metric families (for a CA-holding node's
    metrics page)."""
    s = server.statistics()
    limiter = s.limiter
    j = "meshd_join_"
    return [
        counter(j + "attempts_total",
                "Connections on mesh-join/1 presented to the rate limits.", limiter.attempts),
        Metric(j + "rate_limited_total", "counter",
               "Join attempts refused by the rate limits, by the bucket that was empty.",
               (((("scope", "source"),), float(limiter.refused_source)),
                ((("scope", "global"),), float(limiter.refused_global)))),
        counter(j + "failed_proofs_total",
                "Join requests with a wrong proof (wrong or rotated token).", s.rejected_token),
        counter(j + "rejected_other_total",
                "Join requests refused for another reason (name taken, bad CSR).",
                s.rejected_other),
        counter(j + "accepted_total", "Certificates issued to joining nodes.",
                s.joins_accepted),
        counter(j + "renewals_total", "Certificates issued to renewing nodes.",
                s.renewals_accepted),
        gauge(j + "rate_limit_sources", "Source addresses the join rate limits track.",
              limiter.sources),
    ]


async def record_issued(trust: Trust, server: JoinServer) -> None:
    """Move certificates ``server`` issued into the registry (after each join)."""
    for cert in server.poll_issued():
        await trust.issued.record(cert.name, cert.serial)
        LOGGER.info("certificate_issued name=%s serial=%x renewal=%s", cert.name, cert.serial,
                    cert.renewal)


# --- renewal -----------------------------------------------------------------------


async def renew_forever(trust: Trust, core: Membership, config: NodeConfig,
                        wall_clock: WallClock, rng: random.Random) -> None:
    """Renew the node certificate at a random point in 50-80% of its life, through
    a member that holds the CA key (this node itself if it does)."""
    while True:
        cert = await trio.to_thread.run_sync(trust.identity.load_cert)
        due = renewal_time(cert, rng)
        wait_s = (due - wall_clock()).total_seconds()
        LOGGER.info("certificate_renewal_scheduled node=%s at=%s", config.name, due.isoformat())
        await trio.sleep(max(0.0, wait_s))
        for _ in range(MAX_RENEW_ATTEMPTS):
            if await _renew_once(trust, core, config, wall_clock):
                break
            await trio.sleep(RENEW_RETRY_S)


async def _renew_once(trust: Trust, core: Membership, config: NodeConfig,
                      wall_clock: WallClock) -> bool:
    key = generate_key()
    csr = create_csr(key, config.name)
    candidates = issuers(core)
    for addr in candidates:
        try:
            result = await tls.request_renewal(addr, trust.identity, csr, config.advertise,
                                               wall_clock=wall_clock)
        except StartupError as exc:
            LOGGER.warning("certificate_renewal_failed node=%s via=%s reason=%s", config.name,
                           addr, exc)
            continue
        await trio.to_thread.run_sync(trust.identity.save, result.cert, key, result.ca_cert)
        for ctx in (trust.client_ctx, trust.server_ctx):
            ctx.load_cert_chain(trust.identity.cert_file, trust.identity.key_file)
        LOGGER.info("certificate_renewed node=%s via=%s", config.name, addr)
        return True
    LOGGER.error("certificate_renewal_failed node=%s reason=no CA-holding member answered "
                 "(tried %d); the certificate expires unless one comes back", config.name,
                 len(candidates))
    return False


# --- cluster-wide operations -------------------------------------------------------


async def fan_out(trust: Trust, core: Membership, method: str, params: dict[str, Any],
                  local: Callable[[dict[str, Any]], Any],
                  exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Call ``method`` on every alive member (``local`` for this node) concurrently.

    Returns:
        ``{node: {"ok": True, "result": ...} | {"ok": False, "error": "..."}}``.
    """
    results: dict[str, dict[str, Any]] = {}
    skip = set(exclude)

    async def one(name: NodeId, addr: Addr) -> None:
        try:
            with trio.fail_after(FAN_OUT_TIMEOUT_S):
                if name == core.me:
                    result = await local(params)
                else:
                    stream, _ = await tls.open_tls_stream(addr, trust.client_ctx, tls.ALPN_RPC,
                                                           expect=name, revoked=trust.revoked)
                    async with stream:
                        result = await api.call_stream(stream, method, params)
            results[name] = {"ok": True, "result": result}
        except (MeshError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                RemoteProtocolError) as exc:
            results[name] = {"ok": False, "error": str(exc) or type(exc).__name__}

    async with trio.open_nursery() as nursery:
        for m in core.members():
            if m.status == Status.ALIVE and m.node not in skip:
                nursery.start_soon(one, m.node, m.addr)
    return dict(sorted(results.items()))


class ReplicatedTrust(Protocol):
    """What the security API needs of the replicated state (the node's replica)."""

    def issued_serials(self, node: NodeId) -> list[str]:
        """The serials (hex) the replicated state records as issued to ``node``."""

    async def deny(self, serials: list[str], node: NodeId, reason: str) -> list[int]:
        """Commit serials (hex) of ``node`` to the deny list; returns log indexes."""

    async def write_command(self, command: Command) -> dict[str, Any]:
        """Commit ``command`` through the leader; returns its result."""

    def cluster_ca(self) -> ClusterCa:
        """The CA record of the local replica."""

    async def call_leader(self, method: str, params: dict[str, Any]) -> Any:
        """Call an API method on the Raft leader."""

    async def call_node(self, node: NodeId, method: str, params: dict[str, Any]) -> Any:
        """Call an API method on another node."""


class SecurityApi:
    """API methods for tokens, gossip keys and node removal.

    ``token`` answers on a node that issues, and is forwarded to the Raft leader
    elsewhere; ``token_rotate`` commits a new token through Raft (any node), and
    every issuer serves it once it applies the entry. ``keys_*`` are cluster-wide:
    they fan out over ``mesh-rpc/1`` to every alive member, which applies
    ``keys_local``; the answer lists the outcome per node, so a person sees exactly
    which node missed a change. ``node_rm`` commits the node's serials to the
    replicated deny list (every node applies it, also one that was down) and then
    rotates the gossip key without the node; it works on any node (the serials come
    from the replicated state, and from this node's own registry when it issued
    some).
    """

    def __init__(self, trust: Trust, core: Membership, replica: ReplicatedTrust) -> None:
        self._trust = trust
        self._core = core
        self._replica = replica

    def handlers(self) -> dict[str, api.Handler]:
        """The methods, by name."""
        return {
            "token": self.token,
            "token_rotate": self.token_rotate,
            "keys_list": self.keys_list,
            "keys_install": self.keys_install,
            "keys_use": self.keys_use,
            "keys_remove": self.keys_remove,
            "keys_local": self.keys_local,
            "node_rm": self.node_rm,
            "admin_cert": self.admin_cert,
        }

    def _answer(self, token: JoinToken) -> dict[str, Any]:
        me = self._core.member(self._core.me)
        assert me is not None
        return {"token": str(token),
                "join_command": f"meshd start --join {me.addr} --token {token}"}

    async def token(self, params: dict[str, Any]) -> dict[str, Any]:
        """The current join token and the command to join with it (from the Raft
        leader when this node does not issue)."""
        server = self._trust.join_server
        if server is None:
            return await self._ask_the_leader("token", params)
        return self._answer(server.token)

    async def _ask_the_leader(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """``method`` answered by the Raft leader, for a node that does not issue
        (once: a forwarded call that reaches a node that does not issue fails)."""
        if params.get("forwarded"):
            raise api.ApiError("the Raft leader does not issue certificates yet (the CA is "
                               "not in its Raft log); retry in a few seconds")
        answer: dict[str, Any] = await self._replica.call_leader(
            method, {**params, "forwarded": True})
        return answer

    async def token_rotate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Commit a new join token, then wait (up to :data:`ROTATE_CONFIRM_S`) until
        every alive issuer serves it. ``issuers`` in the answer says, per issuer,
        ``serving``, ``old token`` or ``unreachable``: when none says ``old token``,
        the old token is refused everywhere and the new one accepted."""
        record = self._replica.cluster_ca()
        if not record.ca_index:
            raise api.ApiError("the cluster CA is not recorded in Raft yet (the node that "
                               "created the cluster records it once it leads); retry in a few "
                               "seconds")
        fresh = new_token(ca_fingerprint(load_cert_pem(record.cert_pem)), os.urandom)
        await self._replica.write_command(TokenSet(fresh.secret))
        LOGGER.warning("join_token_rotated node=%s", self._core.me)
        return {**self._answer(fresh), "issuers": await self._serving(fresh)}

    async def _serving(self, token: JoinToken) -> dict[str, str]:
        """Per alive issuer: ``serving`` (``token``), ``old token`` or ``unreachable``,
        asked again every :data:`ROTATE_POLL_S` until all serve it or
        :data:`ROTATE_CONFIRM_S` passed. An unreachable issuer (down, and not yet
        declared so) admits nobody, so it does not fail the rotation."""
        text = str(token)
        names = sorted(m.node for m in self._core.members()
                       if m.status == Status.ALIVE and JOIN_PORT_NAME in m.meta.ports_dict)
        states: dict[str, str] = dict.fromkeys(names, "old token")

        async def ask(name: str) -> None:
            if name == self._core.me:
                server = self._trust.join_server
                states[name] = "serving" if server is not None and server.token == token \
                    else "old token"
                return
            try:
                answer = await self._replica.call_node(NodeId(name), "token",
                                                       {"forwarded": True})
            except api.ApiError:
                states[name] = "unreachable"
                return
            states[name] = "serving" if answer.get("token") == text else "old token"

        with trio.move_on_after(ROTATE_CONFIRM_S):
            while any(v != "serving" for v in states.values()):
                async with trio.open_nursery() as nursery:
                    for name in [n for n, v in states.items() if v != "serving"]:
                        nursery.start_soon(ask, name)
                if any(v != "serving" for v in states.values()):
                    await trio.sleep(ROTATE_POLL_S)
        return states

    async def admin_cert(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sign an admin certificate for ``csr`` (PEM; its common name is ``name``,
        default ``admin``): ``meshctl admin cert`` keeps the key where it runs. A
        node that does not issue forwards the request to the Raft leader. The
        serial is recorded like every issued one, so ``meshctl node rm NAME``
        revokes it too."""
        csr = params.get("csr")
        name = params.get("name") or "admin"
        if not isinstance(csr, bytes) or not isinstance(name, str):
            raise api.ApiError("admin_cert needs csr (PEM bytes) and name")
        server = self._trust.join_server
        if server is None:
            return await self._ask_the_leader("admin_cert", params)
        reply = server.issue_admin(csr, name)
        if isinstance(reply, JoinReject):
            raise api.ApiError(reply.reason)
        await record_issued(self._trust, server)
        cert = load_cert_pem(reply.cert_pem)
        LOGGER.warning("admin_certificate_issued node=%s name=%s serial=%x", self._core.me,
                       name, cert.serial_number)
        return {"cert_pem": reply.cert_pem, "ca_pem": reply.ca_pem, "name": name,
                "serial": f"{cert.serial_number:x}",
                "not_after": cert.not_valid_after_utc.isoformat(), "issuer": self._core.me}

    # --- gossip keys -----------------------------------------------------------

    def _key(self, params: dict[str, Any]) -> bytes:
        from mesh.errors import ConfigError
        from mesh.gossip.keyring import decode_key, key_id

        text = params.get("key")
        if not isinstance(text, str) or not text:
            raise api.ApiError("name the key (its base64 text, or its id from `meshctl keys list`)")
        for key in self._trust.keyring.keys:
            if key_id(key) == text:
                return key
        try:
            return decode_key(text)
        except ConfigError as exc:
            raise api.ApiError(str(exc)) from None

    async def keys_local(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Apply one key operation to this node's ring and persist it."""
        from mesh.errors import ConfigError

        op = params.get("op")
        ring = self._trust.keyring
        try:
            if op == "install":
                ring.install(self._key(params))
            elif op == "use":
                ring.use(self._key(params))
            elif op == "remove":
                ring.remove(self._key(params))
            elif op != "list":
                raise api.ApiError(f"unknown key operation {op!r}")
        except ConfigError as exc:
            raise api.ApiError(str(exc)) from None
        if op != "list":
            await self._trust.save_keyring()
            LOGGER.warning("gossip_keyring_changed node=%s op=%s keys=%d", self._core.me, op,
                           len(ring.keys))
        return [{"id": k.key_id, "primary": k.primary} for k in ring.list()]

    async def _keys_everywhere(self, op: str, key_text: str | None,
                               exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        params: dict[str, Any] = {"op": op}
        if key_text is not None:
            params["key"] = key_text
        return await fan_out(self._trust, self._core, "keys_local", params, self.keys_local,
                             exclude)

    async def keys_list(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every alive member's key ids."""
        return {"nodes": await self._keys_everywhere("list", None)}

    async def keys_install(self, params: dict[str, Any]) -> dict[str, Any]:
        """Install a key on every member (a new random key if none is given)."""
        from mesh.gossip.keyring import KEY_BYTES, encode_key

        text = params.get("key") or encode_key(os.urandom(KEY_BYTES))
        self._key({"key": text})  # validate before fanning out
        return {"key": text, "nodes": await self._keys_everywhere("install", text)}

    async def keys_use(self, params: dict[str, Any]) -> dict[str, Any]:
        """Make a key primary on every member."""
        return {"nodes": await self._keys_everywhere("use", params.get("key"))}

    async def keys_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        """Remove a key from every member."""
        return {"nodes": await self._keys_everywhere("remove", params.get("key"))}

    # --- node removal ------------------------------------------------------------

    async def node_rm(self, params: dict[str, Any]) -> dict[str, Any]:
        """Remove a node for good: revoke every certificate issued to it on every
        member, then rotate the gossip key without it, so it can neither open a
        link nor read or forge gossip."""
        from mesh.gossip.keyring import KEY_BYTES, encode_key

        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise api.ApiError("name the node to remove")
        if name == self._core.me:
            raise api.ApiError("a node cannot remove itself; run `meshctl node rm` on another")
        local = self._trust.issued.serials_of(name)
        hex_serials = sorted({*self._replica.issued_serials(NodeId(name)),
                              *(f"{s:x}" for s in local)})
        if not hex_serials:
            raise api.ApiError(f"no certificate issued to {name!r} is recorded; check the "
                               "name with `meshctl members`")
        try:
            indexes = await self._replica.deny(hex_serials, NodeId(name),
                                               "removed with meshctl node rm")
        except api.ApiError as exc:
            raise api.ApiError(f"revoking {name} was not committed ({exc}); nothing changed, "
                               "retry") from None
        old = self._trust.keyring.primary
        fresh = encode_key(os.urandom(KEY_BYTES))
        steps = {}
        for op, key in (("install", fresh), ("use", fresh), ("remove", encode_key(old))):
            steps[op] = await self._keys_everywhere(op, key, exclude=[name])
        LOGGER.warning("node_removed node=%s removed=%s serials=%s", self._core.me, name,
                       ",".join(hex_serials))
        return {"name": name, "serials": hex_serials, "deny_indexes": indexes,
                "key_rotation": steps}
