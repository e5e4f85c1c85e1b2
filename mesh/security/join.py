"""The ``mesh-join/1`` exchange, sans I/O: a joiner gets a certificate for a token.

Theory of operation
-------------------
The join token ``MESH1-<fp>-<secret>`` (:mod:`mesh.security.token`) carries two
things: the sha256 fingerprint ``fp`` of the cluster CA certificate, and a 32-byte
secret. The exchange runs inside TLS 1.3 on ALPN ``mesh-join/1``; the joiner has no
certificate yet, so at the TLS layer it does not verify the server (Python's ``ssl``
cannot pin a CA it only knows by fingerprint). Instead:

1. The server sends ``JoinChallenge(ca_pem, nonce)``.
2. The joiner checks, *before sending anything*, that sha256(DER of ``ca_pem``) equals
   the token's fingerprint, and that the certificate the server presented in the TLS
   handshake is a node certificate signed by that CA and valid now. The TLS handshake
   proved that the server holds that certificate's private key, so the server is a
   cluster node. There is no trust on first use: a different CA is refused.
3. The joiner sends ``JoinRequest(proof, csr_pem, node_name, advertise)`` where
   ``proof = HMAC-SHA256(secret, transcript)`` and the transcript binds the TLS
   channel (``tls-unique``: the client Finished, unique per connection), the nonce,
   the CA fingerprint and every request field. The secret itself never crosses the
   wire, a captured proof is worthless on another connection, and nothing in the
   request can be altered without the proof failing.
4. The server recomputes the proof with the *current* secret (so a rotated token
   fails), compares in constant time, and only then parses the CSR. It answers
   ``JoinAccept(cert_pem, ca_pem, gossip_keys, cluster_label)`` or
   ``JoinReject(reason)``; the reason is written for a person.

Before any of this the server asks its :class:`~mesh.security.ratelimit.JoinLimiter`
(:meth:`JoinServer.admit`): a source, or all anonymous sources together, past their
rate gets ``LinkRefused(reason, retry_in_s)`` instead of the challenge, so a flood
costs the node a handshake per connection and nothing more. A wrong proof costs its
source several attempts' worth. The joiner raises :class:`JoinRateLimited`, and
``meshd start --join`` waits the advised delay and tries again.

Renewal reuses the ALPN: a node that presents its (valid, unrevoked) certificate in
the handshake sends ``RenewRequest(csr_pem, advertise)`` instead of a ``JoinRequest``
and receives a new certificate for the same name and role. The joiner of a renewal
has verified the server at the TLS layer already; it still checks the challenge.

Every certificate issued is an *output* (:meth:`JoinServer.poll_issued`) so the
daemon can record serial -> node in the replicated state; ``meshctl node rm`` must
put *every* unexpired serial of that node on the deny list, renewals included.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError, StartupError
from mesh.gossip.keyring import Keyring
from mesh.security.messages import (
    NONCE_BYTES,
    JoinAccept,
    JoinChallenge,
    JoinRedirect,
    JoinReject,
    JoinRequest,
    LinkRefused,
    RenewRequest,
    SecurityMessage,
)
from mesh.security.pki import (
    NODE_CERT_LIFETIME,
    CertIdentity,
    CertificateAuthority,
    Role,
    WallClock,
    ca_fingerprint,
    cert_to_pem,
    csr_common_name,
    csr_public_key,
    csr_to_pem,
    identity_of,
    issue_admin_certificate,
    issue_node_certificate,
    load_cert_der,
    load_cert_pem,
    load_csr_pem,
    validate_node_name,
    verify_issued_by,
)
from mesh.security.ratelimit import (
    DEFAULT_JOIN_LIMITS,
    JoinLimiter,
    JoinLimiterStatistics,
    JoinLimits,
)
from mesh.security.token import JoinToken
from mesh.types import Addr, NodeId

LOGGER = logging.getLogger(__name__)

DEFAULT_PORT: Final = 7946

REJECT_WRONG_TOKEN: Final = (
    "join token is wrong or was rotated; "
    "get a new one with `meshctl token` on a cluster node"
)
REJECT_RENEW_NO_CERT: Final = (
    "certificate renewal needs the node's current certificate in the TLS handshake; "
    "if it has expired, wipe the node's data dir and join again with a token"
)

_PROOF_LABEL: Final = b"mesh-join/1 proof\x00"
_LEN: Final = struct.Struct(">I")


def join_proof(
    secret: bytes,
    *,
    tls_binding: bytes,
    nonce: bytes,
    ca_fp: str,
    csr_pem: bytes,
    node_name: str,
    advertise: str,
) -> bytes:
    """HMAC-SHA256 of the join transcript under the token secret.

    Every field is length-prefixed so that no two transcripts serialise alike.

    Args:
        secret: the token secret (the HMAC key).
        tls_binding: the connection's ``tls-unique`` channel binding (``b""`` if the
            TLS library offers none; then the nonce alone prevents replay).
        nonce: the server's challenge nonce.
        ca_fp: the pinned CA fingerprint.
        csr_pem, node_name, advertise: the request fields being authorised.
    """
    mac = hmac.new(secret, _PROOF_LABEL, hashlib.sha256)
    for part in (
        tls_binding,
        nonce,
        ca_fp.encode(),
        csr_pem,
        node_name.encode(),
        advertise.encode(),
    ):
        mac.update(_LEN.pack(len(part)))
        mac.update(part)
    return mac.digest()


class JoinRedirected(StartupError):
    """The node holds no CA key and named the members that do (``issuers``)."""

    def __init__(self, issuers: tuple[str, ...]) -> None:
        where = ", ".join(issuers) or "none that it knows of"
        super().__init__(f"the node holds no CA key; members that do: {where}")
        self.issuers = issuers


class JoinRateLimited(StartupError):
    """The node refused the attempt for now: too many join attempts reached it.

    The advice comes before the CA is pinned, so it is unauthenticated: a caller
    bounds how long it lets the advice make it wait.

    Attributes:
        reason: the node's words, e.g. ``too many join attempts from 10.1.2.3;
            retry in 4 s``.
        retry_in_s: the seconds after which the node would admit the attempt.
    """

    def __init__(self, reason: str, retry_in_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_in_s = retry_in_s


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """Output of :class:`JoinServer`: a certificate was issued.

    Attributes:
        name: the node id (or admin name) in the certificate.
        role: node or admin.
        serial: what goes on the deny list if the node is removed.
        not_valid_after: after this the serial can leave the deny list.
        advertise: the address the node said it is reachable at (``-`` for an
            admin certificate asked through the API).
        renewal: ``True`` for a renewal, ``False`` for a first join or an admin
            certificate.
    """

    name: str
    role: Role
    serial: int
    not_valid_after: datetime
    advertise: str
    renewal: bool


@dataclass(frozen=True, slots=True)
class JoinServerStatistics:
    """Counters of :class:`JoinServer` (monotonic since start).

    Attributes:
        joins_accepted: certificates issued to joiners.
        renewals_accepted: certificates issued to renewing nodes.
        rejected_token: join requests with a wrong proof (wrong or rotated token).
        rejected_other: requests refused for another reason (name taken, bad CSR).
        limiter: attempts admitted and refused by the rate limits.
    """

    joins_accepted: int
    renewals_accepted: int
    rejected_token: int
    rejected_other: int
    limiter: JoinLimiterStatistics


class JoinServer:
    """Validates join and renewal requests and issues certificates. Sans I/O.

    One instance per node that holds the CA key; it serves every connection. For
    each connection the caller asks :meth:`admit` first (the rate limits), then
    sends :meth:`challenge` and decides the request with :meth:`handle_request`.
    The daemon calls :meth:`rotate_token` when ``meshctl token rotate`` commits a
    new token, and reads gossip keys from the shared :class:`Keyring` at accept
    time.

    Args:
        ca: the CA, with its private key.
        token: the current join token.
        keyring: the live gossip key ring (read, never changed).
        wall_clock: the injected clock for certificate validity.
        node_cert_lifetime: life of issued node certificates.
        limits: the rate limits on join attempts.
        node: this node's id, for log lines.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        token: JoinToken,
        keyring: Keyring,
        wall_clock: WallClock,
        *,
        node_cert_lifetime: timedelta = NODE_CERT_LIFETIME,
        limits: JoinLimits = DEFAULT_JOIN_LIMITS,
        node: str = "-",
    ) -> None:
        self._node = node
        self._limiter = JoinLimiter(limits)
        self._ca = ca
        self._ca_pem = cert_to_pem(ca.cert)
        self._keyring = keyring
        self._wall_clock = wall_clock
        self._lifetime = node_cert_lifetime
        self._token = token
        self.rotate_token(token)
        self._issued: list[IssuedCertificate] = []
        self._joins = self._renewals = self._bad_token = self._bad_other = 0

    @property
    def token(self) -> JoinToken:
        """The current join token."""
        return self._token

    def rotate_token(self, token: JoinToken) -> None:
        """Make ``token`` the only accepted token.

        Raises:
            LocalProtocolError: the token names another CA (a caller bug).
        """
        if token.ca_fingerprint != self._ca.fingerprint:
            raise LocalProtocolError("token names another CA than this join server's")
        self._token = token

    def admit(self, source: str, now: float, *, authenticated: bool = False) -> LinkRefused | None:
        """Gate one connection before any work is done for it (before the challenge).

        Refusals are logged as ``join_rate_limited``, throttled so that a flood
        cannot flood the log (see :mod:`mesh.security.ratelimit`).

        Args:
            source: the caller's IP address, from the socket.
            now: a monotonic clock reading in seconds.
            authenticated: the caller presented a cluster certificate in the TLS
                handshake (a renewal); it is not charged to the global limit.

        Returns:
            ``None`` to go ahead, or the refusal to send instead of the challenge
            (it carries the advised ``retry_in_s``).
        """
        refusal = self._limiter.admit(source, now, authenticated=authenticated)
        if refusal is None:
            return None
        if refusal.log:
            LOGGER.warning(
                "join_rate_limited node=%s source=%s key=%s scope=%s retry_in=%.1f "
                "unlogged=%d",
                self._node,
                source,
                refusal.source,
                refusal.scope.value,
                refusal.retry_in_s,
                refusal.unlogged,
            )
        return LinkRefused(refusal.reason, refusal.retry_in_s)

    def challenge(self, nonce: bytes) -> JoinChallenge:
        """The first frame of a connection; ``nonce`` is 32 fresh CSPRNG bytes."""
        if len(nonce) != NONCE_BYTES:
            raise LocalProtocolError(f"nonce must be {NONCE_BYTES} bytes")
        return JoinChallenge(self._ca_pem, nonce)

    def handle_request(
        self,
        request: JoinRequest | RenewRequest,
        *,
        challenge: JoinChallenge,
        tls_binding: bytes,
        peer: CertIdentity | None,
        source: str,
        now: float,
        taken: Container[str] = (),
    ) -> JoinAccept | JoinReject:
        """Decide one request (of a connection that :meth:`admit` let through).

        Args:
            request: the decoded request.
            challenge: the challenge this connection was sent.
            tls_binding: this connection's ``tls-unique`` (``b""`` if unavailable).
            peer: the identity from the verified client certificate, if one was
                presented (the listener has already refused revoked serials).
            source: the caller's IP address, as given to :meth:`admit`; a wrong
                proof is charged to it as a failed attempt.
            now: a monotonic clock reading in seconds (the clock of :meth:`admit`).
            taken: names of live members other than the requester; joining under one
                of them is refused.

        Returns:
            The reply to send. Accepted certificates also appear in
            :meth:`poll_issued`.
        """
        if isinstance(request, RenewRequest):
            return self._renew(request, peer)
        expected = join_proof(
            self._token.secret,
            tls_binding=tls_binding,
            nonce=challenge.nonce,
            ca_fp=self._ca.fingerprint,
            csr_pem=request.csr_pem,
            node_name=request.node_name,
            advertise=request.advertise,
        )
        if not hmac.compare_digest(expected, request.proof):
            self._bad_token += 1
            self._limiter.record_failure(source, now)
            LOGGER.info(
                "join_rejected node=%s reason=wrong_token name=%s source=%s",
                self._node,
                request.node_name,
                source,
            )
            return JoinReject(REJECT_WRONG_TOKEN)
        if request.node_name in taken:
            return self._reject(
                request.node_name,
                f"node name {request.node_name!r} belongs to a live member; start this node "
                f"with another name, or remove the old one with `meshctl node rm "
                f"{request.node_name}` first",
            )
        return self._issue(request.csr_pem, request.node_name, request.advertise, Role.NODE, False)

    def issue_admin(self, csr_pem: bytes, name: str) -> JoinAccept | JoinReject:
        """Sign an admin client certificate (``OU=admin``) for the key of ``csr_pem``,
        whose common name must be ``name``: what ``meshctl admin cert`` asks
        through the API (the caller is trusted: a local root user or an authenticated
        member). Counted as neither a join nor a renewal; reported by
        :meth:`poll_issued` like every certificate."""
        return self._issue(csr_pem, name, "", Role.ADMIN, None)

    def _renew(self, request: RenewRequest, peer: CertIdentity | None) -> JoinAccept | JoinReject:
        if peer is None:
            return self._reject("?", REJECT_RENEW_NO_CERT)
        return self._issue(request.csr_pem, peer.name, request.advertise, peer.role, True)

    def _reject(self, name: str, reason: str) -> JoinReject:
        self._bad_other += 1
        LOGGER.info("join_rejected node=%s name=%s reason=%r", self._node, name, reason)
        return JoinReject(reason)

    def _issue(
        self, csr_pem: bytes, name: str, advertise: str, role: Role, renewal: bool | None
    ) -> JoinAccept | JoinReject:
        """``renewal``: ``True`` a renewal, ``False`` a join, ``None`` an admin
        certificate asked through the API (``advertise`` unused)."""
        try:
            validate_node_name(name)
            csr = load_csr_pem(csr_pem)
            if csr_common_name(csr) != name:
                raise RemoteProtocolError(f"CSR common name is not {name!r}")
            if role is Role.NODE:
                parsed = Addr.parse(advertise, DEFAULT_PORT)
                addr = str(parsed)
                cert = issue_node_certificate(
                    self._ca, csr, name, parsed.host, self._wall_clock, lifetime=self._lifetime
                )
            else:
                addr = advertise or "-"
                cert = issue_admin_certificate(
                    self._ca, csr_public_key(csr), self._wall_clock, name=name
                )
        except (RemoteProtocolError, ConfigError, ValueError) as exc:
            what = "admin certificate" if renewal is None else "join request"
            return self._reject(name, f"{what} refused: {exc}")
        if renewal:
            self._renewals += 1
        elif renewal is not None:
            self._joins += 1
        self._issued.append(
            IssuedCertificate(
                name=name,
                role=role,
                serial=cert.serial_number,
                not_valid_after=cert.not_valid_after_utc,
                advertise=addr,
                renewal=bool(renewal),
            )
        )
        LOGGER.info(
            "certificate_issued node=%s name=%s role=%s serial=%x renewal=%s addr=%s",
            self._node,
            name,
            role.value,
            cert.serial_number,
            renewal,
            addr,
        )
        return JoinAccept(
            cert_pem=cert_to_pem(cert),
            ca_pem=self._ca_pem,
            gossip_keys=self._keyring.keys,
            cluster_label=self._ca.cluster_label,
        )

    def poll_issued(self) -> list[IssuedCertificate]:
        """Certificates issued since the last call (record them before revoking)."""
        issued, self._issued = self._issued, []
        return issued

    def statistics(self) -> JoinServerStatistics:
        """Counters since start."""
        return JoinServerStatistics(
            self._joins,
            self._renewals,
            self._bad_token,
            self._bad_other,
            self._limiter.statistics(),
        )


@dataclass(frozen=True, slots=True)
class JoinResult:
    """What a successful join (or renewal) yields, checked by :class:`JoinClient`."""

    cert: x509.Certificate
    ca_cert: x509.Certificate
    gossip_keys: tuple[bytes, ...]
    cluster_label: str

    @property
    def node_id(self) -> NodeId:
        """The name in the new certificate."""
        return NodeId(identity_of(self.cert).name)


class JoinClient:
    """The joiner's side of ``mesh-join/1``. Sans I/O, one instance per attempt.

    Args:
        ca_fp: the CA fingerprint to pin (from the token, or from the local CA
            certificate for a renewal).
        csr: the CSR for the new certificate; its common name is the node name.
        advertise: where this node is reachable (``host:port``).
        wall_clock: the injected clock for certificate validity.
        secret: the token secret for a join; ``None`` for a renewal.
    """

    def __init__(
        self,
        ca_fp: str,
        csr: x509.CertificateSigningRequest,
        advertise: Addr,
        wall_clock: WallClock,
        *,
        secret: bytes | None,
    ) -> None:
        self._fp = ca_fp
        self._csr = csr
        self._csr_pem = csr_to_pem(csr)
        self._name = csr_common_name(csr)
        self._advertise = str(advertise)
        self._wall_clock = wall_clock
        self._secret = secret
        self._ca: x509.Certificate | None = None

    @classmethod
    def for_token(
        cls,
        token: JoinToken,
        csr: x509.CertificateSigningRequest,
        advertise: Addr,
        wall_clock: WallClock,
    ) -> JoinClient:
        """A client for a first join with ``token``."""
        return cls(token.ca_fingerprint, csr, advertise, wall_clock, secret=token.secret)

    def handle_challenge(
        self, message: SecurityMessage, server_cert_der: bytes | None, tls_binding: bytes
    ) -> JoinRequest | RenewRequest:
        """Pin the CA and authenticate the server, then build the request to send.

        Args:
            message: the server's first frame.
            server_cert_der: the certificate the server presented in the TLS handshake.
            tls_binding: this connection's ``tls-unique`` (``b""`` if unavailable).

        Raises:
            JoinRateLimited: the server refused the attempt for now; try again
                after ``retry_in_s``.
            StartupError: the server refused the link, belongs to another cluster (CA
                fingerprint mismatch) or presented a certificate the pinned CA did not
                issue. Nothing must be sent.
            RemoteProtocolError: the frame is not a challenge.
        """
        if isinstance(message, LinkRefused):
            if message.retry_in_s > 0:
                raise JoinRateLimited(message.reason, message.retry_in_s)
            raise StartupError(f"the node refused to serve the join: {message.reason}")
        if isinstance(message, JoinRedirect):
            raise JoinRedirected(message.issuers)
        if not isinstance(message, JoinChallenge):
            raise RemoteProtocolError(f"expected a join challenge, got {type(message).__name__}")
        ca = load_cert_pem(message.ca_pem)
        got = ca_fingerprint(ca)
        if not hmac.compare_digest(got, self._fp):
            raise StartupError(
                f"the node's cluster CA has fingerprint {got[:16]}..., but the token pins "
                f"{self._fp[:16]}...: this is another cluster, or a machine in the middle; "
                "check the --join address and the token (nothing was sent)"
            )
        if server_cert_der is None:
            raise StartupError("the node presented no TLS certificate; nothing was sent")
        try:
            identity = verify_issued_by(load_cert_der(server_cert_der), ca, self._wall_clock)
        except RemoteProtocolError as exc:
            raise StartupError(
                f"the node's TLS certificate does not check out against the pinned CA: {exc}; "
                "nothing was sent"
            ) from None
        if identity.role is not Role.NODE:
            raise StartupError("the node's TLS certificate is not a node certificate")
        self._ca = ca
        if self._secret is None:
            return RenewRequest(self._csr_pem, self._advertise)
        proof = join_proof(
            self._secret,
            tls_binding=tls_binding,
            nonce=message.nonce,
            ca_fp=self._fp,
            csr_pem=self._csr_pem,
            node_name=self._name,
            advertise=self._advertise,
        )
        return JoinRequest(proof, self._csr_pem, self._name, self._advertise)

    def handle_reply(self, message: SecurityMessage) -> JoinResult:
        """Check the server's answer.

        Raises:
            StartupError: the join was rejected (the reason is the server's, for a
                person) or the certificate does not match what was asked for.
            RemoteProtocolError: the frame is not an accept/reject.
            LocalProtocolError: called before :meth:`handle_challenge` succeeded.
        """
        if self._ca is None:
            raise LocalProtocolError("handle_reply before a successful handle_challenge")
        if isinstance(message, JoinReject):
            raise StartupError(message.reason)
        if not isinstance(message, JoinAccept):
            raise RemoteProtocolError(f"expected a join reply, got {type(message).__name__}")
        cert = load_cert_pem(message.cert_pem)
        if load_cert_pem(message.ca_pem) != self._ca:
            raise StartupError("the join reply names another CA than the challenge")
        try:
            identity = verify_issued_by(cert, self._ca, self._wall_clock)
        except RemoteProtocolError as exc:
            raise StartupError(f"the issued certificate does not check out: {exc}") from None
        mine = self._csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if mine != theirs or identity.name != self._name:
            raise StartupError("the issued certificate is not for this node's key and name")
        return JoinResult(cert, self._ca, message.gossip_keys, message.cluster_label)
