"""TLS for every TCP link: credentials on disk, contexts, the ALPN-routing listener,
outgoing links, and the trio glue of the join exchange.

The pure parts live in :mod:`mesh.security` (PKI, token, join messages and core) and
are re-exported here where the daemon needs them. This module does the I/O: files
(synchronous; call at startup, or through ``trio.to_thread.run_sync``) and sockets.

One listener on the gossip port (7946/TCP) serves four ALPN protocols:

============== ============================== ====================================
ALPN           who may connect                checked where
============== ============================== ====================================
mesh-join/1    anyone (token proof inside)    :mod:`mesh.security.join`
mesh-gossip/1  node certificates              :func:`authorize_link`
mesh-raft/1    node certificates              :func:`authorize_link`
mesh-rpc/1     node or admin certificates     :func:`authorize_link`
============== ============================== ====================================

TLS is 1.3 only. The server asks for a client certificate but does not require one
at the TLS layer (``CERT_OPTIONAL``), so a joiner without one can connect; a
certificate that *is* presented must chain to the cluster CA and be within its
validity, or OpenSSL aborts the handshake. After the handshake
:func:`authorize_link` enforces the table above and the deny list of revoked serials,
then the listener sends one status frame (``LinkAccepted`` or ``LinkRefused(reason)``)
on every ALPN but join, which :func:`open_tls_stream` consumes, so that a refused
client learns why instead of seeing a reset. Peer identity (node id = certificate CN,
role = certificate OU) always comes from the verified certificate, never from a
message. Session tickets are off: every link does a full handshake and certificate
check, so a revocation applies to the next connection at once.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import stat
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeAlias

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    StartupError,
    StorageError,
)
from mesh.gossip.keyring import DEFAULT_REPLAY_WINDOW_S, KEY_BYTES, Keyring
from mesh.security.join import (
    JoinClient,
    JoinRateLimited,
    JoinRedirected,
    JoinResult,
    JoinServer,
)
from mesh.security.messages import (
    MAX_JOIN_FRAME_BYTES,
    NONCE_BYTES,
    JoinRedirect,
    JoinRequest,
    LinkAccepted,
    LinkRefused,
    RenewRequest,
    SecurityMessage,
    from_envelope,
)
from mesh.security.pki import (
    CertIdentity,
    CertificateAuthority,
    Role,
    WallClock,
    ca_fingerprint,
    cert_to_pem,
    cluster_label_of,
    create_ca,
    create_csr,
    generate_key,
    identity_of,
    issue_admin_certificate,
    issue_node_certificate,
    key_to_pem,
    load_cert_der,
    load_cert_pem,
    load_key_pem,
)
from mesh.security.token import JoinToken, new_token
from mesh.streams import DirectTlsStream, open_direct_tcp
from mesh.types import Addr, NodeId
from mesh.wire import FRAME_PREFIX_BYTES, decode, frame

SSLStreamT: TypeAlias = DirectTlsStream
"""A TLS link between nodes (:class:`mesh.streams.DirectTlsStream`)."""

LOGGER = logging.getLogger(__name__)

ALPN_JOIN: Final = "mesh-join/1"
ALPN_GOSSIP: Final = "mesh-gossip/1"
ALPN_RAFT: Final = "mesh-raft/1"
ALPN_RPC: Final = "mesh-rpc/1"
ALPN_PROTOCOLS: Final = (ALPN_JOIN, ALPN_GOSSIP, ALPN_RAFT, ALPN_RPC)
ALPN_ROLES: Final[Mapping[str, frozenset[Role]]] = {
    ALPN_GOSSIP: frozenset({Role.NODE}),
    ALPN_RAFT: frozenset({Role.NODE}),
    ALPN_RPC: frozenset({Role.NODE, Role.ADMIN}),
}
"""Roles allowed on each ALPN that requires a certificate; join is open to anyone."""

DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_HANDSHAKES: Final = 256
"""Concurrent TLS handshakes in progress; beyond it new connections are closed at
once (bounds what a flood of idle connections can hold)."""

# Data dir layout. Secret files are 0600 and refused if group/other can read them.
TLS_DIR: Final = "tls"
ADMIN_DIR: Final = "admin"
CA_CERT_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"
NODE_CERT_FILE: Final = "node.crt"
NODE_KEY_FILE: Final = "node.key"
KEYRING_FILE: Final = "gossip.keys"
TOKEN_FILE: Final = "join-token"

Handler: TypeAlias = Callable[[SSLStreamT, "PeerInfo"], Awaitable[None]]
"""Serves one accepted, authorised link. The stream is closed after it returns."""


class LinkRefusedError(RemoteProtocolError):
    """A TLS link was refused, by the peer or by us (certificate, role, deny list,
    ALPN). ``code`` is a short machine-readable reason; ``str()`` is for people.

    Note: belongs in :mod:`mesh.errors` (kept here until the lead moves it).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- credential files ------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) with mode 0700 if it does not exist."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``.

    A temporary file in the same directory is created with ``mode`` from the start
    (never wider), written, fsync-ed and renamed over ``path``; then the directory is
    fsync-ed. A crash leaves either the old file or the new one, never a torn or
    world-readable one.
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_private_file(path: Path, data: bytes) -> None:
    """:func:`write_file_atomic` with mode 0600 (keys, key ring, token)."""
    write_file_atomic(path, data, 0o600)


def _check_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise StartupError(f"refusing to use {path}: it is not a regular file")
    if st.st_mode & 0o077:
        raise StartupError(
            f"refusing to use {path}: it is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
        )


def check_private_file(path: Path) -> None:
    """Refuse a secret file that group or others can access.

    Raises:
        StartupError: the mode allows group/other access or it is not a regular
            file; the message names the file and the ``chmod`` to run.
        FileNotFoundError: it does not exist.
    """
    _check_mode(path, os.lstat(path))


def read_private_file(path: Path) -> bytes:
    """Read a secret file after checking its mode on the open descriptor (no race
    between check and read; symlinks are refused).

    Raises:
        StartupError: see :func:`check_private_file`.
        FileNotFoundError: it does not exist.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StartupError(f"refusing to use {path}: it is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        _check_mode(path, os.fstat(f.fileno()))
        return f.read()


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """Where one TLS identity lives on disk: certificate, key and CA certificate.

    ``ssl`` loads certificates and keys from files only, so contexts are built from
    an identity; after a renewal rewrites the files, call
    ``ctx.load_cert_chain(identity.cert_file, identity.key_file)`` on the live
    contexts (new links use the new certificate; existing ones keep theirs).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path

    @classmethod
    def node(cls, data_dir: Path) -> TlsIdentity:
        """The node identity in ``DATA_DIR/tls/``."""
        tls = data_dir / TLS_DIR
        return cls(tls / NODE_CERT_FILE, tls / NODE_KEY_FILE, tls / CA_CERT_FILE)

    @classmethod
    def admin(cls, cert_dir: Path) -> TlsIdentity:
        """An admin client identity as meshctl reads it (``--cert-dir`` or
        ``$MESH_CERT_DIR``): ``ca.pem``, ``cert.pem``, ``key.pem``, as DOCKER_CERT_PATH."""
        return cls(cert_dir / "cert.pem", cert_dir / "key.pem", cert_dir / "ca.pem")

    def save(
        self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
    ) -> None:
        """Write the three files (key 0600, certificates 0644), key first."""
        ensure_private_dir(self.key_file.parent)
        write_private_file(self.key_file, key_to_pem(key))
        write_file_atomic(self.ca_file, cert_to_pem(ca), 0o644)
        write_file_atomic(self.cert_file, cert_to_pem(cert), 0o644)

    def load_cert(self) -> x509.Certificate:
        """The certificate (for its expiry and renewal time).

        Raises:
            StorageError: the file is not a certificate.
        """
        try:
            return load_cert_pem(self.cert_file.read_bytes())
        except RemoteProtocolError as exc:
            raise StorageError(f"{self.cert_file} is damaged: {exc}") from None

    def exists(self) -> bool:
        """Whether all three files exist."""
        return self.cert_file.exists() and self.key_file.exists() and self.ca_file.exists()


def save_ca(data_dir: Path, ca: CertificateAuthority) -> None:
    """Write ``tls/ca.key`` (0600) and ``tls/ca.crt``."""
    tls = data_dir / TLS_DIR
    ensure_private_dir(tls)
    write_private_file(tls / CA_KEY_FILE, key_to_pem(ca.key))
    write_file_atomic(tls / CA_CERT_FILE, cert_to_pem(ca.cert), 0o644)


def load_ca(data_dir: Path) -> CertificateAuthority | None:
    """The CA with its key, or ``None`` if this node holds no CA key.

    Raises:
        StartupError: the key file is readable by others.
        StorageError: a file is damaged.
    """
    tls = data_dir / TLS_DIR
    key_path = tls / CA_KEY_FILE
    if not key_path.exists():
        return None
    key = load_key_pem(read_private_file(key_path))
    try:
        cert = load_cert_pem((tls / CA_CERT_FILE).read_bytes())
    except RemoteProtocolError as exc:
        raise StorageError(f"{tls / CA_CERT_FILE} is damaged: {exc}") from None
    return CertificateAuthority(cert=cert, key=key)


def load_cluster_label(data_dir: Path) -> str:
    """The cluster label (gossip associated data), read from ``tls/ca.crt``, which
    every node has. Blocking file read: call at startup.

    Raises:
        StorageError: the CA certificate is damaged.
        FileNotFoundError: the node has not joined yet.
    """
    path = data_dir / TLS_DIR / CA_CERT_FILE
    try:
        return cluster_label_of(load_cert_pem(path.read_bytes()))
    except RemoteProtocolError as exc:
        raise StorageError(f"{path} is damaged: {exc}") from None


def save_keyring(data_dir: Path, keyring: Keyring) -> None:
    """Write ``gossip.keys`` (0600). Call after every ``meshctl keys`` change."""
    ensure_private_dir(data_dir)
    write_private_file(data_dir / KEYRING_FILE, keyring.to_bytes())


def load_keyring(
    data_dir: Path, *, replay_window_s: float | None = DEFAULT_REPLAY_WINDOW_S
) -> Keyring:
    """Read ``gossip.keys``.

    Raises:
        StartupError: readable by others. StorageError: damaged.
        FileNotFoundError: missing.
    """
    return Keyring.from_bytes(
        read_private_file(data_dir / KEYRING_FILE), replay_window_s=replay_window_s
    )


def save_token(data_dir: Path, token: JoinToken) -> None:
    """Write ``join-token`` (0600), the text a person pastes into ``--token``."""
    ensure_private_dir(data_dir)
    write_private_file(data_dir / TOKEN_FILE, f"{token}\n".encode())


def load_token(data_dir: Path) -> JoinToken:
    """Read ``join-token``.

    Raises:
        StartupError: readable by others. ConfigError: damaged.
        FileNotFoundError: missing.
    """
    return JoinToken.parse(read_private_file(data_dir / TOKEN_FILE).decode("ascii", "replace"))


def check_data_dir(data_dir: Path) -> None:
    """Refuse to start on a data dir whose secret files others can read.

    Raises:
        StartupError: names the first offending file and the ``chmod`` to run.
    """
    for path in (
        data_dir / TLS_DIR / CA_KEY_FILE,
        data_dir / TLS_DIR / NODE_KEY_FILE,
        data_dir / ADMIN_DIR / "key.pem",
        data_dir / KEYRING_FILE,
        data_dir / TOKEN_FILE,
    ):
        if path.exists():
            check_private_file(path)


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """What :func:`bootstrap_first_node` created."""

    ca: CertificateAuthority
    token: JoinToken
    keyring: Keyring
    node_cert: x509.Certificate


def bootstrap_first_node(
    data_dir: Path,
    node_id: NodeId,
    advertise: Addr,
    cluster_label: str,
    wall_clock: WallClock,
    *,
    entropy: Callable[[int], bytes] = os.urandom,
) -> Bootstrap:
    """Create the cluster's trust on the first node (empty data dir, no ``--join``).

    Writes ``tls/{ca.crt,ca.key,node.crt,node.key}``, ``admin/{ca,cert,key}.pem``,
    ``gossip.keys`` and ``join-token``. The caller prints the join command.

    Raises:
        ConfigError: invalid node id or advertise host.
    """
    ca = create_ca(cluster_label, wall_clock)
    save_ca(data_dir, ca)
    node_key = generate_key()
    node_cert = issue_node_certificate(
        ca, create_csr(node_key, node_id), node_id, advertise.host, wall_clock
    )
    TlsIdentity.node(data_dir).save(node_cert, node_key, ca.cert)
    admin_key = generate_key()
    admin_cert = issue_admin_certificate(ca, admin_key.public_key(), wall_clock)
    TlsIdentity.admin(data_dir / ADMIN_DIR).save(admin_cert, admin_key, ca.cert)
    keyring = Keyring([entropy(KEY_BYTES)])
    save_keyring(data_dir, keyring)
    token = new_token(ca.fingerprint, entropy)
    save_token(data_dir, token)
    LOGGER.info(
        "cluster_created node=%s ca_fingerprint=%s label=%s", node_id, ca.fingerprint, cluster_label
    )
    return Bootstrap(ca=ca, token=token, keyring=keyring, node_cert=node_cert)


def save_join_result(data_dir: Path, key: ec.EllipticCurvePrivateKey, result: JoinResult) -> None:
    """Persist what a join returned: node identity and gossip key ring.

    After this the node restarts from its data dir without the token.
    """
    TlsIdentity.node(data_dir).save(result.cert, key, result.ca_cert)
    save_keyring(data_dir, Keyring(result.gossip_keys))


# -- contexts ----------------------------------------------------------------------------


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(identity: TlsIdentity) -> ssl.SSLContext:
    """The listener's context: TLS 1.3, all four ALPNs, client certificate optional at
    the TLS layer (verified against the cluster CA when presented), no tickets.

    Raises:
        StartupError: the key file is readable by others.
        ssl.SSLError, OSError: the files are damaged or missing.
    """
    check_private_file(identity.key_file)
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    ctx.load_verify_locations(cafile=identity.ca_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    ctx.num_tickets = 0
    return ctx


def client_context(identity: TlsIdentity) -> ssl.SSLContext:
    """Context for outgoing links of a node (or of meshctl with an admin identity):
    TLS 1.3, the server must chain to the cluster CA, our certificate is presented.

    Host names are not checked: a peer is identified by the node id in its
    certificate, which :func:`open_tls_stream` compares with ``expect``.

    Raises:
        StartupError: the key file is readable by others.
    """
    check_private_file(identity.key_file)
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=identity.ca_file)
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    return ctx


def join_client_context() -> ssl.SSLContext:
    """Context for a joiner: TLS 1.3 without chain verification at the TLS layer.

    The CA is pinned by fingerprint in :class:`~mesh.security.join.JoinClient`
    before anything is sent; use this context for ``mesh-join/1`` only.
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- peer identity and link policy -------------------------------------------------------


class DenySet:
    """The serials on the deny list, and the links open now by the serial of the
    peer's certificate.

    A link checks the deny list when it opens; :meth:`revoke` also closes the
    links already open with a newly revoked serial, so that a revoked node loses
    its Raft, gossip and API links at once instead of when they next close. The
    :class:`TlsServer`, :class:`TlsDialer` and :func:`open_tls_stream` track the
    links they open when their ``revoked`` is a ``DenySet``.
    """

    PRUNE_AT: Final = 1024
    """Tracked serials beyond which the serials with no open link are forgotten."""

    def __init__(self, serials: Iterable[int] = ()) -> None:
        self._serials = set(serials)
        self._links: dict[int, weakref.WeakSet[SSLStreamT]] = {}
        self.links_closed = 0
        """Open links closed because their peer's serial was revoked."""

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._serials))

    def __len__(self) -> int:
        return len(self._serials)

    def track(self, serial: int, stream: SSLStreamT) -> bool:
        """Note a link just opened with a peer whose certificate has ``serial``;
        ``False`` if the serial was revoked meanwhile (the caller closes it)."""
        if serial in self._serials:
            return False
        if len(self._links) >= self.PRUNE_AT:
            self._links = {s: links for s, links in self._links.items() if links}
        self._links.setdefault(serial, weakref.WeakSet()).add(stream)
        return True

    def open_links(self, serial: int) -> int:
        """How many tracked links with ``serial`` are open."""
        return sum(1 for stream in self._links.get(serial, ()) if not stream.closed)

    async def revoke(self, serials: Iterable[int]) -> set[int]:
        """Put ``serials`` on the list and close the links open with them; returns
        the serials that were not on it yet."""
        new = set(serials) - self._serials
        self._serials |= new
        for serial in sorted(new):
            for stream in list(self._links.pop(serial, ())):
                if not stream.closed:
                    self.links_closed += 1
                    await trio.aclose_forcefully(stream)
        return new


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The other end of a link, from its verified certificate.

    Attributes:
        addr: the peer's TCP address.
        alpn: the negotiated protocol.
        identity: from the verified certificate; ``None`` if the peer presented none
            (possible on ``mesh-join/1`` only) or was not verified (the join client).
    """

    addr: Addr
    alpn: str
    identity: CertIdentity | None

    @property
    def node_id(self) -> NodeId:
        """The peer's node id, from its certificate CN.

        Raises:
            LocalProtocolError: the peer is not a node (an admin, or anonymous); the
                handler asked on an ALPN where that can happen.
        """
        if self.identity is None or self.identity.role is not Role.NODE:
            raise LocalProtocolError(f"peer {self.addr} on {self.alpn} is not a node")
        return NodeId(self.identity.name)


def authorize_link(
    alpn: str | None,
    cert_der: bytes | None,
    revoked: Container[int],
    served: Container[str],
) -> CertIdentity | None:
    """The listener's policy after a completed handshake.

    Args:
        alpn: the negotiated ALPN (``None`` if the client offered none we speak).
        cert_der: the client's certificate, already verified by TLS, or ``None``.
        revoked: serials on the deny list.
        served: the ALPNs with a handler on this node.

    Returns:
        The client's identity, or ``None`` for an anonymous joiner.

    Raises:
        LinkRefusedError: with a code and a reason for the client and the log.
    """
    if alpn is None:
        raise LinkRefusedError(
            "no_alpn", f"no ALPN protocol agreed; meshd speaks {', '.join(ALPN_PROTOCOLS)}"
        )
    if alpn not in served:
        hint = (
            "; this node holds no CA key: join through a node that does"
            if alpn == ALPN_JOIN
            else ""
        )
        raise LinkRefusedError("not_served", f"{alpn} is not served by this node{hint}")
    identity = None
    if cert_der is not None:
        try:
            identity = identity_of(load_cert_der(cert_der))
        except RemoteProtocolError as exc:
            raise LinkRefusedError("bad_cert", f"client certificate is not usable: {exc}") from None
        if identity.serial in revoked:
            raise LinkRefusedError(
                "revoked",
                f"certificate serial {identity.serial:x} of {identity.name!r} is revoked "
                "(the node was removed with `meshctl node rm`); wipe its data dir and "
                "join again with a current token",
            )
    if alpn == ALPN_JOIN:
        return identity
    if identity is None:
        raise LinkRefusedError(
            "no_client_cert",
            f"{alpn} needs a client certificate from the cluster CA; join the cluster "
            "first (`meshd start --join HOST --token TOKEN`), or give meshctl the admin "
            "certificate (--cert-dir)",
        )
    if identity.role not in ALPN_ROLES[alpn]:
        raise LinkRefusedError(
            "wrong_role",
            f"a {identity.role.value} certificate ({identity.name!r}) may not use {alpn}",
        )
    return identity


def _ssl_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return str(cause.verify_message)
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason)
    if cause is not None:
        return type(cause).__name__
    return str(exc) or type(exc).__name__


def _peer_addr(stream: trio.abc.Stream) -> Addr:
    sock = getattr(stream, "socket", None)
    try:
        name = sock.getpeername() if sock is not None else None
    except OSError:
        name = None
    if isinstance(name, tuple) and len(name) >= 2:
        return Addr(str(name[0]), int(name[1]))
    return Addr("?", 0)


# -- frames on a stream -----------------------------------------------------------------


async def _receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        chunk = await stream.receive_some(count - len(buf))
        if not chunk:
            raise RemoteProtocolError("peer closed the connection mid-exchange")
        buf += chunk
    return bytes(buf)


async def receive_message(stream: trio.abc.ReceiveStream) -> SecurityMessage:
    """Read exactly one length-prefixed join/link frame (never more, so the next
    protocol on the stream loses no bytes).

    Raises:
        RemoteProtocolError: oversized, malformed or early EOF.
        trio.BrokenResourceError: the TLS stream failed.
    """
    prefix = await _receive_exactly(stream, FRAME_PREFIX_BYTES)
    length = int.from_bytes(prefix, "big")
    if length > MAX_JOIN_FRAME_BYTES:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_JOIN_FRAME_BYTES}")
    payload = await _receive_exactly(stream, length)
    return from_envelope(decode(payload, max_bytes=MAX_JOIN_FRAME_BYTES))


async def send_message(stream: trio.abc.SendStream, message: SecurityMessage) -> None:
    """Send one join/link message as a length-prefixed frame."""
    await stream.send_all(frame(message.to_wire(), MAX_JOIN_FRAME_BYTES))


# -- the listener ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsServerStatistics:
    """Counters of a :class:`TlsServer` since it started.

    Attributes:
        accepted: TCP connections accepted.
        handshake_failures: TLS handshakes that failed (garbage, plain text, a
            certificate that does not chain to the CA or has expired, EOF).
        handshake_timeouts: handshakes that did not finish in time.
        over_capacity: connections closed because too many handshakes were running.
        refused: handshakes that succeeded but the link policy refused.
        served: links handed to a handler.
        stream_errors: handlers that ended on a broken stream or bad peer input.
        reasons: count per reason code (``handshake:<openssl reason>``, ``revoked``,
            ``no_client_cert``, ``wrong_role``, ``not_served``, ``no_alpn``, ...).
    """

    accepted: int
    handshake_failures: int
    handshake_timeouts: int
    over_capacity: int
    refused: int
    served: int
    stream_errors: int
    reasons: Mapping[str, int]


class TlsServer:
    """Accepts TCP, does the TLS handshake, authorises the link and routes it by ALPN.

    Args:
        ctx: from :func:`server_context`.
        handlers: ALPN -> ``async handler(stream, peer)``. An ALPN without a handler
            is refused with a reason ("not served").
        revoked: the deny list of certificate serials; any live container (the
            daemon passes a set it updates from the replicated state). Checked on
            every new link, including ``mesh-join/1`` when a certificate is shown.
        handshake_timeout_s: bound on handshake + status frame.
        max_handshakes: see :data:`DEFAULT_MAX_HANDSHAKES`.
        node: this node's id, for log lines.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        handlers: Mapping[str, Handler],
        *,
        revoked: Container[int] = frozenset(),
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        node: str = "-",
    ) -> None:
        unknown = set(handlers) - set(ALPN_PROTOCOLS)
        if unknown:
            raise LocalProtocolError(f"handlers for unknown ALPNs: {sorted(unknown)}")
        self._ctx = ctx
        self._node = node
        self._handlers = dict(handlers)
        self._revoked = revoked
        self._timeout_s = handshake_timeout_s
        self._max_handshakes = max_handshakes
        self._handshaking = 0
        self._reasons: Counter[str] = Counter()
        self._accepted = self._failed = self._timeouts = self._over = 0
        self._refused = self._served = self._stream_errors = 0

    def statistics(self) -> TlsServerStatistics:
        """A snapshot of the counters."""
        return TlsServerStatistics(
            accepted=self._accepted,
            handshake_failures=self._failed,
            handshake_timeouts=self._timeouts,
            over_capacity=self._over,
            refused=self._refused,
            served=self._served,
            stream_errors=self._stream_errors,
            reasons=dict(self._reasons),
        )

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        handler_nursery: trio.Nursery | None = None,
        task_status: trio.TaskStatus[Sequence[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve ``listeners`` until cancelled (closes them on exit).

        Resource handling:
            Every accepted stream is closed (``aclose_forcefully``) when its
            handshake fails, its link is refused or its handler returns.

        Error handling:
            Bad peers never crash the server: a failed or timed-out handshake, a
            refused link, or a handler ending in ``trio.BrokenResourceError``,
            ``trio.ClosedResourceError``, ``trio.TooSlowError`` or
            ``RemoteProtocolError`` is counted in :meth:`statistics` and logged
            (DEBUG for handshakes, streams and anonymous refusals; INFO for
            refusals of a client that presented a certificate).
            ``accept`` errors meaning overload (EMFILE, ENFILE, ENOBUFS, ENOMEM) are
            logged at ERROR and retried after 100 ms, as in trio's
            ``serve_listeners``. Any other exception from a handler is a bug and
            propagates.
        """
        async with trio.open_nursery() as nursery:
            target = handler_nursery or nursery
            for listener in listeners:
                nursery.start_soon(self._serve_one_listener, listener, target)
            task_status.started(listeners)
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _serve_one_listener(
        self, listener: trio.abc.Listener[Any], handler_nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    LOGGER.error(
                        "tls_accept_failed node=%s errno=%s retry_s=%s",
                        self._node,
                        errno.errorcode.get(exc.errno or 0, exc.errno),
                        _ACCEPT_RETRY_S,
                        exc_info=True,
                    )
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                self._accepted += 1
                if self._handshaking >= self._max_handshakes:
                    self._over += 1
                    LOGGER.debug(
                        "tls_over_capacity node=%s handshaking=%s", self._node, self._handshaking
                    )
                    await trio.aclose_forcefully(stream)
                    continue
                self._handshaking += 1
                handler_nursery.start_soon(self._run_link, stream)

    async def _run_link(self, tcp: trio.SocketStream) -> None:
        addr = _peer_addr(tcp)
        stream = DirectTlsStream(socket.socket(fileno=tcp.socket.detach()), self._ctx,
                                 server_side=True)
        try:
            admitted = await self._admit(stream, addr)
            if admitted is None:
                return
            handler, peer = admitted
            if not _tracked(self._revoked, peer, stream):
                return  # revoked while the link was being admitted
            self._served += 1
            try:
                await handler(stream, peer)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                RemoteProtocolError,
            ) as exc:
                self._stream_errors += 1
                LOGGER.debug(
                    "tls_link_error node=%s peer=%s alpn=%s error=%s",
                    self._node,
                    addr,
                    peer.alpn,
                    exc,
                    exc_info=True,
                )
        finally:
            await trio.aclose_forcefully(stream)

    async def _admit(self, stream: SSLStreamT, addr: Addr) -> tuple[Handler, PeerInfo] | None:
        try:
            with trio.move_on_after(self._timeout_s):
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    reason = _ssl_reason(exc)
                    self._failed += 1
                    self._reasons[f"handshake:{reason}"] += 1
                    LOGGER.debug(
                        "tls_handshake_failed node=%s peer=%s reason=%s", self._node, addr, reason
                    )
                    return None
                alpn = stream.selected_alpn_protocol()
                cert_der = stream.getpeercert(binary_form=True)
                try:
                    identity = authorize_link(alpn, cert_der, self._revoked, self._handlers)
                except LinkRefusedError as exc:
                    self._refused += 1
                    self._reasons[exc.code] += 1
                    # INFO when a certificate named someone (revoked, wrong role); an
                    # anonymous client must not be able to flood the log
                    LOGGER.log(
                        logging.INFO if cert_der is not None else logging.DEBUG,
                        "tls_link_refused node=%s peer=%s alpn=%s code=%s reason=%s",
                        self._node,
                        addr,
                        alpn,
                        exc.code,
                        exc,
                    )
                    try:
                        await send_message(stream, LinkRefused(str(exc)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # best effort: the client sees the close instead
                    return None
                assert alpn is not None
                if alpn != ALPN_JOIN:
                    await send_message(stream, LinkAccepted())
                return self._handlers[alpn], PeerInfo(addr, alpn, identity)
            self._timeouts += 1
            self._reasons["handshake_timeout"] += 1
            LOGGER.debug(
                "tls_handshake_timeout node=%s peer=%s timeout_s=%s",
                self._node,
                addr,
                self._timeout_s,
            )
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._failed += 1
            self._reasons["status_send_failed"] += 1
            LOGGER.debug("tls_status_send_failed node=%s peer=%s error=%s", self._node, addr, exc)
            return None
        finally:
            self._handshaking -= 1


_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_RETRY_S: Final = 0.100


async def open_tls_stream(
    addr: Addr,
    ctx: ssl.SSLContext,
    alpn: str,
    *,
    expect: NodeId | None = None,
    revoked: Container[int] = frozenset(),
    timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
) -> tuple[SSLStreamT, PeerInfo]:
    """Open a TLS link to ``addr`` on ``alpn`` and wait until the listener accepts it.

    ``ctx`` may be shared by concurrent calls: the ALPN list is set on it right
    before the (synchronous) wrap, and OpenSSL copies it into the connection.

    Args:
        addr: the peer's TCP address.
        ctx: :func:`client_context` (or :func:`join_client_context` for join).
        alpn: one of :data:`ALPN_PROTOCOLS`.
        expect: the node id the peer must have (its certificate CN), if known.
        revoked: the deny list; a server whose serial is on it is refused.
        timeout_s: bound on connect + handshake + status frame.

    Returns:
        The stream (the caller closes it) and the server's identity. With a context
        that does not verify (join), ``PeerInfo.identity`` is ``None``.

    Raises:
        OSError: cannot connect.
        trio.TooSlowError: no answer within ``timeout_s``.
        LinkRefusedError: the handshake failed, the server's certificate is not an
            acceptable node certificate, or the server refused the link (the
            message carries its reason).
        RemoteProtocolError: the server sent garbage.
    """
    if alpn not in ALPN_PROTOCOLS:
        raise LocalProtocolError(f"unknown ALPN {alpn!r}")
    with trio.fail_after(timeout_s):
        sock = await open_direct_tcp(addr.host, addr.port)
        ctx.set_alpn_protocols([alpn])
        stream = DirectTlsStream(sock, ctx, server_side=False)
        try:
            identity = await _client_handshake(stream, addr, ctx, alpn, expect, revoked)
            peer = PeerInfo(addr, alpn, identity)
            if not _tracked(revoked, peer, stream):
                raise LinkRefusedError("revoked", f"{addr} was revoked while the link opened")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream, peer


def _tracked(revoked: Container[int], peer: PeerInfo, stream: SSLStreamT) -> bool:
    """Track the link in ``revoked`` when it is a :class:`DenySet` (so that revoking
    the peer closes it); ``False`` if the peer was revoked meanwhile."""
    if isinstance(revoked, DenySet) and peer.identity is not None:
        return revoked.track(peer.identity.serial, stream)
    return True


async def _client_handshake(
    stream: SSLStreamT,
    addr: Addr,
    ctx: ssl.SSLContext,
    alpn: str,
    expect: NodeId | None,
    revoked: Container[int],
) -> CertIdentity | None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise LinkRefusedError(
            "handshake", f"TLS handshake with {addr} failed: {_ssl_reason(exc)}"
        ) from None
    if stream.selected_alpn_protocol() != alpn:
        raise LinkRefusedError("no_alpn", f"{addr} does not speak {alpn}; is it a meshd?")
    identity = None
    if ctx.verify_mode != ssl.CERT_NONE:
        der = stream.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - CERT_REQUIRED guarantees one
            raise LinkRefusedError("no_server_cert", f"{addr} presented no certificate")
        identity = identity_of(load_cert_der(der))
        if identity.role is not Role.NODE:
            raise LinkRefusedError("wrong_role", f"{addr} presented a non-node certificate")
        if identity.serial in revoked:
            raise LinkRefusedError(
                "revoked", f"{addr} ({identity.name}) presents revoked serial {identity.serial:x}"
            )
        if expect is not None and identity.name != expect:
            raise LinkRefusedError(
                "unexpected_peer", f"{addr} is {identity.name!r}, expected {expect!r}"
            )
    if alpn == ALPN_JOIN:
        return identity
    try:
        status = await receive_message(stream)
    except trio.BrokenResourceError as exc:
        raise LinkRefusedError(
            "closed",
            f"{addr} closed the {alpn} link after the handshake ({_ssl_reason(exc)}): it did "
            "not accept our certificate (expired? from another cluster? see its log)",
        ) from None
    except RemoteProtocolError as exc:
        raise LinkRefusedError(
            "closed",
            f"{addr} closed the {alpn} link after the handshake ({exc}): it did not accept "
            "our certificate (expired? from another cluster? see its log)",
        ) from None
    if isinstance(status, LinkRefused):
        raise LinkRefusedError("refused", f"{addr} refused the {alpn} link: {status.reason}")
    if not isinstance(status, LinkAccepted):
        raise RemoteProtocolError(f"{addr} sent {type(status).__name__} instead of a link status")
    return identity


class TlsDialer:
    """The gossip adapter's ``StreamDialer`` over TLS (ALPN ``mesh-gossip/1`` by
    default): every push-pull stream is a mutually authenticated link.

    Args:
        ctx: from :func:`client_context`.
        alpn: the protocol to ask for.
        revoked: the deny list (a live container).
        timeout_s: bound on connect + handshake + status frame.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        alpn: str = ALPN_GOSSIP,
        *,
        revoked: Container[int] = frozenset(),
        timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self._ctx = ctx
        self._alpn = alpn
        self._revoked = revoked
        self._timeout_s = timeout_s

    async def open_stream(self, to: Addr, *, expect: NodeId | None = None) -> SSLStreamT:
        """Open an authorised link to ``to``.

        Args:
            to: the peer's address.
            expect: the node id the peer's certificate must name, when the
                caller knows whom it dials (Raft does; gossip push-pull dials
                addresses). Another node answering there is refused.

        Raises:
            OSError: cannot connect.
            trio.TooSlowError: timed out.
            LinkRefusedError: refused either way (a ``RemoteProtocolError``),
                also when the peer is not ``expect``.
        """
        stream, _ = await open_tls_stream(
            to, self._ctx, self._alpn, expect=expect, revoked=self._revoked,
            timeout_s=self._timeout_s,
        )
        return stream


def _channel_binding(stream: SSLStreamT) -> bytes:
    binding = stream.get_channel_binding("tls-unique")
    return bytes(binding) if binding else b""


# -- join glue ------------------------------------------------------------------------


def join_handler(
    server: JoinServer,
    *,
    taken: Container[str] = frozenset(),
    entropy: Callable[[int], bytes] = os.urandom,
    timeout_s: float = 10.0,
) -> Handler:
    """The ``mesh-join/1`` handler to register with :class:`TlsServer`.

    The join server's rate limits are asked first, keyed by the peer's address: a
    refused connection gets ``LinkRefused(reason, retry_in_s)`` and costs nothing
    more (no nonce, no proof check, no signature).

    Args:
        server: the node's join core (it holds the CA key and current token).
        taken: live member names (any live container); joining under one is refused.
        entropy: CSPRNG for the challenge nonce.
        timeout_s: bound on the whole exchange.
    """

    async def handle(stream: SSLStreamT, peer: PeerInfo) -> None:
        source = peer.addr.host
        refusal = server.admit(
            source, trio.current_time(), authenticated=peer.identity is not None
        )
        if refusal is not None:
            with trio.fail_after(timeout_s):
                await send_message(stream, refusal)
            return
        challenge = server.challenge(entropy(NONCE_BYTES))
        with trio.fail_after(timeout_s):
            await send_message(stream, challenge)
            request = await receive_message(stream)
            if not isinstance(request, JoinRequest | RenewRequest):
                raise RemoteProtocolError(f"expected a join request, got {type(request).__name__}")
            reply = server.handle_request(
                request,
                challenge=challenge,
                tls_binding=_channel_binding(stream),
                peer=peer.identity,
                source=source,
                now=trio.current_time(),
                taken=taken,
            )
            await send_message(stream, reply)

    return handle


def redirect_join_handler(issuers: Callable[[], Sequence[Addr]]) -> Handler:
    """The ``mesh-join/1`` handler of a node without the CA key: it names the members
    that hold it (``issuers()``), and the joiner tries them next."""

    async def handle(stream: SSLStreamT, peer: PeerInfo) -> None:
        with trio.fail_after(DEFAULT_HANDSHAKE_TIMEOUT_S):
            await send_message(stream, JoinRedirect(tuple(str(a) for a in issuers())))

    return handle


async def _run_join_client(
    addr: Addr, ctx: ssl.SSLContext, client: JoinClient, timeout_s: float
) -> JoinResult:
    try:
        with trio.fail_after(timeout_s):
            stream, _ = await open_tls_stream(addr, ctx, ALPN_JOIN, timeout_s=timeout_s)
            async with stream:
                request = client.handle_challenge(
                    await receive_message(stream),
                    stream.getpeercert(binary_form=True),
                    _channel_binding(stream),
                )
                await send_message(stream, request)
                return client.handle_reply(await receive_message(stream))
    except (JoinRedirected, JoinRateLimited):
        raise
    except StartupError as exc:
        raise StartupError(f"join via {addr} failed: {exc}") from None
    except OSError as exc:
        raise StartupError(
            f"cannot reach {addr} to join: {exc.strerror or exc}; check the --join address "
            f"and that meshd runs there with TCP port {addr.port} open"
        ) from None
    except trio.TooSlowError:
        raise StartupError(
            f"join via {addr} timed out after {timeout_s:g} s; check the --join address "
            "and the network"
        ) from None
    except (RemoteProtocolError, trio.BrokenResourceError) as exc:
        raise StartupError(
            f"join via {addr} failed: {exc}; is that address a meshd of the same version?"
        ) from None


async def request_join(
    addr: Addr,
    token: JoinToken,
    csr: x509.CertificateSigningRequest,
    advertise: Addr,
    *,
    wall_clock: WallClock,
    timeout_s: float = 30.0,
) -> JoinResult:
    """Join the cluster through the node at ``addr`` (``meshd start --join``).

    The CA is pinned by the token's fingerprint before anything is sent; the secret
    is proven, never sent. Save the result with :func:`save_join_result`.

    Args:
        addr: a cluster node that holds the CA key.
        token: the parsed join token.
        csr: from :func:`~mesh.security.pki.create_csr`; its CN is the node name.
        advertise: where this node will be reachable (goes into the certificate SAN).
        wall_clock: the injected clock.
        timeout_s: bound on the whole exchange.

    Raises:
        JoinRateLimited: the node refused the attempt for now (too many join
            attempts); try again after its ``retry_in_s``.
        StartupError: one line for the person who ran ``meshd``: wrong or rotated
            token, another cluster's CA, unreachable address, timeout, refusal.
    """
    client = JoinClient.for_token(token, csr, advertise, wall_clock)
    return await _run_join_client(addr, join_client_context(), client, timeout_s)


async def request_renewal(
    addr: Addr,
    identity: TlsIdentity,
    csr: x509.CertificateSigningRequest,
    advertise: Addr,
    *,
    wall_clock: WallClock,
    timeout_s: float = 30.0,
) -> JoinResult:
    """Renew this node's certificate through a CA-holding node at ``addr``.

    Authenticates with the current certificate (it must still be valid and not
    revoked). The CSR should carry a fresh key; save the result with
    :func:`save_join_result` and reload the contexts' certificate chain.

    Raises:
        StartupError: refused, unreachable, timed out.
    """
    ca = load_cert_pem(await trio.to_thread.run_sync(identity.ca_file.read_bytes))
    ctx = await trio.to_thread.run_sync(client_context, identity)
    client = JoinClient(ca_fingerprint(ca), csr, advertise, wall_clock, secret=None)
    return await _run_join_client(addr, ctx, client, timeout_s)
