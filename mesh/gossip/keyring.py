"""The gossip key ring: AES-256-GCM sealing of every UDP datagram, sans I/O.

Sealed datagram::

    +-----------+-------------+-------------------------------------------+
    | version u8| nonce (12)  | AES-256-GCM( ts u32 BE | payload ) + tag  |
    +-----------+-------------+-------------------------------------------+
    associated data = version byte | cluster label

- **version** (1) names this layout, as memberlist's ``security.go`` does; an
  unknown version is refused before any key is tried.
- **nonce**: 12 bytes chosen by the caller (the adapter passes ``os.urandom(12)``).
  Random nonces under one key stay safe (collision chance below 2^-32) for about
  2^32 datagrams *cluster-wide*; rotate the key well before that (docs/security.md).
- **ts**: whole seconds of the sender's wall clock, inside the ciphertext. A
  datagram whose ``ts`` is more than ``replay_window_s`` away from the receiver's
  clock is refused, so a datagram recorded long ago cannot be replayed. Within the
  window a replay is accepted; SWIM tolerates that because a message with an older
  incarnation never overrides a newer one, and duplicates are idempotent.
- **label**: the cluster label, authenticated but not sent, so two clusters that
  somehow share a key still cannot talk to each other.

Overhead: 1 + 12 + 4 + 16 = :data:`OVERHEAD_BYTES` (33) bytes per datagram.

The ring has one *primary* key (seals) and up to :data:`MAX_KEYS` - 1 others (still
open). Rotation without downtime, as ``meshctl keys`` drives it: ``install`` the new
key on every node, ``use`` it on every node, wait until
:attr:`KeyringStatistics.opened_with_secondary` stops growing everywhere, then
``remove`` the old one. ``AESGCM`` objects are built once per key, not per datagram.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError, StorageError
from mesh.wire import pack_body, unpack_body

SEAL_VERSION: Final = 1
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
TIMESTAMP_BYTES: Final = 4
OVERHEAD_BYTES: Final = 1 + NONCE_BYTES + TIMESTAMP_BYTES + TAG_BYTES
MAX_KEYS: Final = 16
"""Bound on the ring: opening a bad datagram costs up to this many tag checks."""

DEFAULT_REPLAY_WINDOW_S: Final = 300.0
"""Default largest |receiver clock - sender timestamp| accepted, in seconds (5 min,
Kerberos' customary skew). ``None`` turns the check off."""

_TS: Final = struct.Struct(">I")
_HEADER: Final = 1 + NONCE_BYTES
_VERSION_BYTE: Final = bytes((SEAL_VERSION,))


def key_id(key: bytes) -> str:
    """A short public name for a key (first 8 hex digits of its sha256); safe to log
    and to show in ``meshctl keys list``."""
    return hashlib.sha256(key).hexdigest()[:8]


def encode_key(key: bytes) -> str:
    """The text form of a key for people and files: standard base64 (44 chars)."""
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """Parse a key typed by a person (``meshctl keys install KEY``).

    Raises:
        ConfigError: not base64 of exactly 32 bytes.
    """
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            "gossip key is not base64; a key is 32 random bytes in base64, e.g. from `openssl rand -base64 32`"
        ) from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"gossip key must be {KEY_BYTES} bytes (base64 of 44 chars), got {len(key)}"
        )
    return key


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One row of ``meshctl keys list``."""

    key_id: str
    primary: bool


@dataclass(frozen=True, slots=True)
class KeyringStatistics:
    """Counters since the ring was created.

    Attributes:
        sealed: datagrams sealed.
        opened: datagrams opened (any key).
        opened_with_secondary: of those, opened by a key other than the primary;
            while this grows, some peer still seals with an older key.
        rejected_auth: no key authenticated the datagram (wrong key, wrong label,
            tampered, or garbage).
        rejected_stale: authenticated but outside the replay window.
        rejected_malformed: too short or an unknown version byte.
    """

    sealed: int
    opened: int
    opened_with_secondary: int
    rejected_auth: int
    rejected_stale: int
    rejected_malformed: int


class Keyring:
    """A versioned AES-256-GCM key ring: one primary key, others accepted.

    Args:
        keys: the keys, primary first; duplicates are dropped.
        replay_window_s: see :data:`DEFAULT_REPLAY_WINDOW_S`.

    Raises:
        ConfigError: no key, too many keys, or a key of the wrong length.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        replay_window_s: float | None = DEFAULT_REPLAY_WINDOW_S,
    ) -> None:
        if replay_window_s is not None and replay_window_s <= 0:
            raise ConfigError("replay_window_s must be positive or None")
        self._window = replay_window_s
        unique: list[bytes] = []
        for key in keys:
            _check_key(key)
            if key not in unique:
                unique.append(key)
        if not unique:
            raise ConfigError("a gossip key ring needs at least one key")
        if len(unique) > MAX_KEYS:
            raise ConfigError(f"a gossip key ring holds at most {MAX_KEYS} keys")
        self._keys = unique
        self._aeads = [AESGCM(k) for k in unique]
        self._sealed = self._opened = self._secondary = 0
        self._bad_auth = self._stale = self._malformed = 0

    # -- reading ----------------------------------------------------------------

    @property
    def keys(self) -> tuple[bytes, ...]:
        """All keys, primary first."""
        return tuple(self._keys)

    @property
    def primary(self) -> bytes:
        """The key that seals."""
        return self._keys[0]

    @property
    def replay_window_s(self) -> float | None:
        """The replay window in seconds, or ``None`` if off."""
        return self._window

    def list(self) -> list[KeyInfo]:
        """Key ids for ``meshctl keys list``, primary first (keys themselves hidden)."""
        return [KeyInfo(key_id(k), i == 0) for i, k in enumerate(self._keys)]

    # -- meshctl keys install|use|remove ---------------------------------------------

    def install(self, key: bytes) -> None:
        """Add ``key`` as a secondary (opening) key; a no-op if present.

        Raises:
            ConfigError: wrong length, or the ring is full.
        """
        _check_key(key)
        if key in self._keys:
            return
        if len(self._keys) >= MAX_KEYS:
            raise ConfigError(
                f"the gossip key ring is full ({MAX_KEYS} keys); remove an old key first "
                "with `meshctl keys remove KEY`"
            )
        self._keys.append(key)
        self._aeads.append(AESGCM(key))

    def use(self, key: bytes) -> None:
        """Make an installed key the primary.

        Raises:
            ConfigError: the key is not installed.
        """
        index = self._index(key, "use")
        self._keys.insert(0, self._keys.pop(index))
        self._aeads.insert(0, self._aeads.pop(index))

    def remove(self, key: bytes) -> None:
        """Remove a secondary key; datagrams sealed with it no longer open.

        Raises:
            ConfigError: the key is the primary or is not installed.
        """
        index = self._index(key, "remove")
        if index == 0:
            raise ConfigError(
                f"key {key_id(key)} is the primary gossip key and cannot be removed; "
                "make another key primary first with `meshctl keys use KEY`"
            )
        del self._keys[index]
        del self._aeads[index]

    def _index(self, key: bytes, verb: str) -> int:
        try:
            return self._keys.index(key)
        except ValueError:
            raise ConfigError(
                f"cannot {verb} key {key_id(key)}: it is not in the ring "
                "(see `meshctl keys list`; install it first with `meshctl keys install KEY`)"
            ) from None

    # -- sealing --------------------------------------------------------------------

    def seal(self, plaintext: bytes, label: bytes, nonce: bytes, now_s: float) -> bytes:
        """Seal one datagram with the primary key.

        Args:
            plaintext: the gossip envelope.
            label: the cluster label (associated data, not sent).
            nonce: 12 fresh random bytes; never reuse one under the same key.
            now_s: the sender's wall clock, seconds since the epoch.

        Raises:
            LocalProtocolError: the nonce has the wrong length (a caller bug).
        """
        if len(nonce) != NONCE_BYTES:
            raise LocalProtocolError(f"nonce must be {NONCE_BYTES} bytes")
        stamp = _TS.pack(int(now_s) & 0xFFFFFFFF)
        self._sealed += 1
        return (
            _VERSION_BYTE
            + nonce
            + self._aeads[0].encrypt(nonce, stamp + plaintext, _VERSION_BYTE + label)
        )

    def open(self, datagram: bytes, label: bytes, now_s: float) -> bytes:
        """Authenticate and decrypt one datagram, trying every key (primary first).

        Args:
            datagram: the bytes received.
            label: our cluster label.
            now_s: our wall clock, seconds since the epoch.

        Returns:
            The plaintext (the gossip envelope).

        Raises:
            RemoteProtocolError: malformed, unknown version, not authenticated by any
                key (wrong key or label, tampered), or outside the replay window. The
                message says which, for the DEBUG log; counted in :meth:`statistics`.
        """
        if len(datagram) < OVERHEAD_BYTES:
            self._malformed += 1
            raise RemoteProtocolError(f"sealed datagram of {len(datagram)} bytes is too short")
        if datagram[0] != SEAL_VERSION:
            self._malformed += 1
            raise RemoteProtocolError(
                f"sealed datagram version {datagram[0]} is unknown (we speak {SEAL_VERSION}); "
                "is the sender running gossip encryption of another meshd version?"
            )
        nonce = datagram[1:_HEADER]
        body = datagram[_HEADER:]
        aad = _VERSION_BYTE + label
        for index, aead in enumerate(self._aeads):
            try:
                plain = aead.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
            (stamp,) = _TS.unpack_from(plain)
            if self._window is not None:
                age = (int(now_s) & 0xFFFFFFFF) - stamp
                if abs(age) > self._window:
                    self._stale += 1
                    raise RemoteProtocolError(
                        f"datagram timestamp is {age:+d} s from our clock, outside the "
                        f"replay window of {self._window:g} s (an old replay, or clocks "
                        "out of step: check NTP)"
                    )
            self._opened += 1
            if index:
                self._secondary += 1
            return plain[TIMESTAMP_BYTES:]
        self._bad_auth += 1
        raise RemoteProtocolError(
            f"datagram failed authentication with all {len(self._aeads)} gossip keys "
            "(another cluster, a wrong key or label, or tampering)"
        )

    def statistics(self) -> KeyringStatistics:
        """Counters since creation."""
        return KeyringStatistics(
            self._sealed,
            self._opened,
            self._secondary,
            self._bad_auth,
            self._stale,
            self._malformed,
        )

    # -- persistence ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise the keys (primary first) for the data dir; secret material."""
        return pack_body({"v": 1, "keys": list(self._keys)})

    @classmethod
    def from_bytes(
        cls, data: bytes, *, replay_window_s: float | None = DEFAULT_REPLAY_WINDOW_S
    ) -> Keyring:
        """Load what :meth:`to_bytes` wrote.

        Raises:
            StorageError: the file is damaged.
        """
        try:
            body = unpack_body(data, 64 * 1024)
        except RemoteProtocolError as exc:
            raise StorageError(f"gossip key ring file is damaged: {exc}") from None
        if (
            not isinstance(body, dict)
            or body.get("v") != 1
            or not isinstance(body.get("keys"), list)
        ):
            raise StorageError("gossip key ring file is damaged or of another version")
        try:
            return cls(body["keys"], replay_window_s=replay_window_s)
        except ConfigError as exc:
            raise StorageError(f"gossip key ring file is damaged: {exc}") from None


class KeyringCodec:
    """Seals and opens datagrams for the gossip adapter (its ``PacketCodec``).

    Pure like the ring itself: the wall clock and the nonce source are injected.

    Args:
        keyring: the live ring (``meshctl keys`` changes apply at once).
        label: the cluster label (associated data).
        wall_clock_s: seconds since the epoch (the daemon passes its wall clock).
        entropy: a CSPRNG such as ``os.urandom``, for the 12-byte nonces.
    """

    def __init__(
        self,
        keyring: Keyring,
        label: str,
        wall_clock_s: Callable[[], float],
        entropy: Callable[[int], bytes],
    ) -> None:
        self._keyring = keyring
        self._label = label.encode()
        self._clock = wall_clock_s
        self._entropy = entropy

    @property
    def keyring(self) -> Keyring:
        """The ring in use."""
        return self._keyring

    def seal(self, data: bytes) -> bytes:
        """Seal one outgoing datagram with the primary key."""
        return self._keyring.seal(data, self._label, self._entropy(NONCE_BYTES), self._clock())

    def open(self, data: bytes) -> bytes:
        """Open one incoming datagram.

        Raises:
            RemoteProtocolError: see :meth:`Keyring.open`.
        """
        return self._keyring.open(data, self._label, self._clock())


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ConfigError(f"a gossip key must be {KEY_BYTES} bytes")
