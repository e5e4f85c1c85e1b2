"""Messages of ``mesh-join/1`` and the link status frames, wire tags 32-47.

Each message is a frozen dataclass with ``to_wire() -> bytes`` (one
:mod:`mesh.wire` envelope, not yet length-framed) and ``from_wire(envelope)``.
Bodies are msgpack maps with short string keys; unknown keys are ignored (a minor
version may add optional fields), missing or mistyped ones are refused. Every field
is bounded and treated as hostile.

The exchange on ``mesh-join/1`` (see :mod:`mesh.security.join`)::

    server -> JoinChallenge(ca_pem, nonce)
    client -> JoinRequest(proof, csr_pem, node_name, advertise)     # holds the token
           |  RenewRequest(csr_pem, advertise)                      # holds a node cert
    server -> JoinAccept(cert_pem, ca_pem, gossip_keys, cluster_label) | JoinReject(reason)

On every other ALPN the listener sends one status frame before the protocol starts:
``LinkAccepted()`` or ``LinkRefused(reason)``. On ``mesh-join/1`` a refusal is also a
``LinkRefused``, sent instead of the challenge; one for too many join attempts
carries ``retry_in_s``, the delay after which the joiner may try again (an older
joiner ignores the field and shows the reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Final

from mesh.errors import RemoteProtocolError
from mesh.wire import Envelope, decode, encode

MSG_JOIN_CHALLENGE: Final = 32
MSG_JOIN_REQUEST: Final = 33
MSG_JOIN_ACCEPT: Final = 34
MSG_JOIN_REJECT: Final = 35
MSG_RENEW_REQUEST: Final = 36
MSG_LINK_ACCEPTED: Final = 37
MSG_LINK_REFUSED: Final = 38
MSG_JOIN_REDIRECT: Final = 39
MAX_REDIRECT_ADDRS: Final = 16

MAX_JOIN_FRAME_BYTES: Final = 64 * 1024
"""Largest frame on ``mesh-join/1`` and largest status frame (64 KiB)."""

NONCE_BYTES: Final = 32
PROOF_BYTES: Final = 32
GOSSIP_KEY_BYTES: Final = 32
MAX_GOSSIP_KEYS: Final = 16
MAX_PEM_BYTES: Final = 16 * 1024
MAX_NAME_CHARS: Final = 64
MAX_ADDR_CHARS: Final = 300
MAX_REASON_CHARS: Final = 1024
MAX_LABEL_CHARS: Final = 128
MAX_RETRY_S: Final = 3600.0
"""Longest retry delay a ``LinkRefused`` may advise (an hour)."""


def _map(env: Envelope, expected: int) -> dict[str, Any]:
    if env.msg_type != expected:
        raise RemoteProtocolError(f"expected message type {expected}, got {env.msg_type}")
    if not isinstance(env.body, dict):
        raise RemoteProtocolError(f"message type {expected} body is not a map")
    return env.body


def _bytes(body: dict[str, Any], key: str, max_len: int, exact: int | None = None) -> bytes:
    value = body.get(key)
    if not isinstance(value, bytes):
        raise RemoteProtocolError(f"field {key!r} missing or not bytes")
    if exact is not None and len(value) != exact:
        raise RemoteProtocolError(f"field {key!r} is {len(value)} bytes, expected {exact}")
    if len(value) > max_len:
        raise RemoteProtocolError(f"field {key!r} exceeds {max_len} bytes")
    return value


def _str(body: dict[str, Any], key: str, max_len: int, *, empty_ok: bool = False) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"field {key!r} missing or not text")
    if len(value) > max_len:
        raise RemoteProtocolError(f"field {key!r} exceeds {max_len} characters")
    if not value and not empty_ok:
        raise RemoteProtocolError(f"field {key!r} is empty")
    return value


@dataclass(frozen=True, slots=True)
class JoinChallenge:
    """Server's first frame: the CA certificate to pin and a fresh nonce."""

    MSG_TYPE: ClassVar[int] = MSG_JOIN_CHALLENGE
    ca_pem: bytes
    nonce: bytes

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(self.MSG_TYPE, {"ca": self.ca_pem, "n": self.nonce})

    @classmethod
    def from_wire(cls, env: Envelope) -> JoinChallenge:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        body = _map(env, cls.MSG_TYPE)
        return cls(_bytes(body, "ca", MAX_PEM_BYTES), _bytes(body, "n", NONCE_BYTES, NONCE_BYTES))


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """Joiner's request: token proof, CSR, its name and its advertise address."""

    MSG_TYPE: ClassVar[int] = MSG_JOIN_REQUEST
    proof: bytes
    csr_pem: bytes
    node_name: str
    advertise: str

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(
            self.MSG_TYPE,
            {"p": self.proof, "csr": self.csr_pem, "name": self.node_name, "addr": self.advertise},
        )

    @classmethod
    def from_wire(cls, env: Envelope) -> JoinRequest:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        body = _map(env, cls.MSG_TYPE)
        return cls(
            _bytes(body, "p", PROOF_BYTES, PROOF_BYTES),
            _bytes(body, "csr", MAX_PEM_BYTES),
            _str(body, "name", MAX_NAME_CHARS),
            _str(body, "addr", MAX_ADDR_CHARS),
        )


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """A node's certificate renewal, authenticated by the client certificate it
    presented in the TLS handshake (no token)."""

    MSG_TYPE: ClassVar[int] = MSG_RENEW_REQUEST
    csr_pem: bytes
    advertise: str

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(self.MSG_TYPE, {"csr": self.csr_pem, "addr": self.advertise})

    @classmethod
    def from_wire(cls, env: Envelope) -> RenewRequest:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        body = _map(env, cls.MSG_TYPE)
        return cls(_bytes(body, "csr", MAX_PEM_BYTES), _str(body, "addr", MAX_ADDR_CHARS))


@dataclass(frozen=True, slots=True)
class JoinAccept:
    """The new node certificate, the CA, the gossip key ring (primary first) and the
    cluster label used as gossip associated data."""

    MSG_TYPE: ClassVar[int] = MSG_JOIN_ACCEPT
    cert_pem: bytes
    ca_pem: bytes
    gossip_keys: tuple[bytes, ...]
    cluster_label: str

    def __repr__(self) -> str:
        return f"JoinAccept(cluster_label={self.cluster_label!r}, keys={len(self.gossip_keys)})"

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(
            self.MSG_TYPE,
            {
                "cert": self.cert_pem,
                "ca": self.ca_pem,
                "keys": list(self.gossip_keys),
                "label": self.cluster_label,
            },
        )

    @classmethod
    def from_wire(cls, env: Envelope) -> JoinAccept:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        body = _map(env, cls.MSG_TYPE)
        keys = body.get("keys")
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_GOSSIP_KEYS:
            raise RemoteProtocolError(f"field 'keys' must list 1-{MAX_GOSSIP_KEYS} keys")
        for key in keys:
            if not isinstance(key, bytes) or len(key) != GOSSIP_KEY_BYTES:
                raise RemoteProtocolError(f"gossip keys must be {GOSSIP_KEY_BYTES} bytes each")
        return cls(
            _bytes(body, "cert", MAX_PEM_BYTES),
            _bytes(body, "ca", MAX_PEM_BYTES),
            tuple(keys),
            _str(body, "label", MAX_LABEL_CHARS, empty_ok=True),
        )


@dataclass(frozen=True, slots=True)
class JoinReject:
    """Refusal with a reason a person can act on."""

    MSG_TYPE: ClassVar[int] = MSG_JOIN_REJECT
    reason: str

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(self.MSG_TYPE, {"why": self.reason[:MAX_REASON_CHARS]})

    @classmethod
    def from_wire(cls, env: Envelope) -> JoinReject:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        return cls(_str(_map(env, cls.MSG_TYPE), "why", MAX_REASON_CHARS))


@dataclass(frozen=True, slots=True)
class LinkAccepted:
    """The listener accepted the link; the ALPN's own protocol starts after it."""

    MSG_TYPE: ClassVar[int] = MSG_LINK_ACCEPTED

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(self.MSG_TYPE, {})

    @classmethod
    def from_wire(cls, env: Envelope) -> LinkAccepted:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        _map(env, cls.MSG_TYPE)
        return cls()


@dataclass(frozen=True, slots=True)
class LinkRefused:
    """The listener refused the link (no or wrong certificate, revoked, ALPN not
    served, too many join attempts); the reason says what to do. The connection
    closes after it.

    Attributes:
        reason: for a person.
        retry_in_s: above 0 when the refusal is temporary (rate limiting): the
            seconds after which the same attempt would be admitted. Sent only then.
    """

    MSG_TYPE: ClassVar[int] = MSG_LINK_REFUSED
    reason: str
    retry_in_s: float = 0.0

    def to_wire(self) -> bytes:
        """One envelope."""
        body: dict[str, Any] = {"why": self.reason[:MAX_REASON_CHARS]}
        if self.retry_in_s > 0:
            body["retry"] = min(float(self.retry_in_s), MAX_RETRY_S)
        return encode(self.MSG_TYPE, body)

    @classmethod
    def from_wire(cls, env: Envelope) -> LinkRefused:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        body = _map(env, cls.MSG_TYPE)
        retry = body.get("retry", 0.0)
        if type(retry) not in (int, float) or not 0 <= retry <= MAX_RETRY_S:
            raise RemoteProtocolError(f"field 'retry' must be 0-{MAX_RETRY_S:g} seconds")
        return cls(_str(body, "why", MAX_REASON_CHARS), float(retry))


@dataclass(frozen=True, slots=True)
class JoinRedirect:
    """The node holds no CA key; ``issuers`` (``host:port``) do. Unauthenticated by
    nature: following it is safe because the next node must still pass CA pinning."""

    MSG_TYPE: ClassVar[int] = MSG_JOIN_REDIRECT
    issuers: tuple[str, ...]

    def to_wire(self) -> bytes:
        """One envelope."""
        return encode(self.MSG_TYPE, {"to": list(self.issuers[:MAX_REDIRECT_ADDRS])})

    @classmethod
    def from_wire(cls, env: Envelope) -> JoinRedirect:
        """Validate an untrusted envelope. Raises RemoteProtocolError."""
        raw = _map(env, cls.MSG_TYPE).get("to")
        if type(raw) is not list or len(raw) > MAX_REDIRECT_ADDRS or not all(
                type(a) is str and 0 < len(a) <= MAX_ADDR_CHARS for a in raw):
            raise RemoteProtocolError("malformed join redirect")
        return cls(tuple(raw))


SecurityMessage = (
    JoinChallenge
    | JoinRequest
    | RenewRequest
    | JoinAccept
    | JoinReject
    | LinkAccepted
    | LinkRefused
    | JoinRedirect
)

_DECODERS: Final[dict[int, Any]] = {
    cls.MSG_TYPE: cls
    for cls in (
        JoinChallenge,
        JoinRequest,
        RenewRequest,
        JoinAccept,
        JoinReject,
        LinkAccepted,
        LinkRefused,
        JoinRedirect,
    )
}


def from_envelope(env: Envelope) -> SecurityMessage:
    """Dispatch an envelope to its message class.

    Raises:
        RemoteProtocolError: an unknown type tag or an invalid body.
    """
    cls = _DECODERS.get(env.msg_type)
    if cls is None:
        raise RemoteProtocolError(f"message type {env.msg_type} is not a join/link message")
    message: SecurityMessage = cls.from_wire(env)
    return message


def decode_message(data: bytes) -> SecurityMessage:
    """Decode one envelope (already unframed) into a message.

    Raises:
        RemoteProtocolError: anything wrong with the bytes.
    """
    return from_envelope(decode(data, max_bytes=MAX_JOIN_FRAME_BYTES))
