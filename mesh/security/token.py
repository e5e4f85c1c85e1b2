"""The join token: ``MESH1-<CA fingerprint>-<secret>``.

- ``MESH1`` names the format (a later format gets ``MESH2``; an old meshd refuses it
  with a message instead of misreading it).
- The CA fingerprint is the sha256 of the CA certificate's DER, 64 hex digits. The
  joiner pins the CA with it before it sends anything: no trust on first use.
- The secret is 32 random bytes, 52 characters of lowercase RFC 4648 base32 without
  padding. It never crosses the wire: the joiner proves it with an HMAC bound to the
  TLS channel (:func:`mesh.security.join.join_proof`).

Neither part contains ``-``, so splitting on ``-`` is unambiguous. Rotation
(:func:`new_token`) keeps the fingerprint and draws a new secret; the server verifies
against the current secret only, so the old token stops working at once while joined
nodes (which hold certificates) are unaffected.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from mesh.errors import ConfigError

TOKEN_PREFIX: Final = "MESH1"
SECRET_BYTES: Final = 32
SECRET_CHARS: Final = 52
FINGERPRINT_CHARS: Final = 64

_HELP: Final = "copy the whole token again from `meshctl token` on a cluster node"
_B32_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_HEX: Final = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A parsed join token. ``repr`` hides the secret; ``str`` is the token text.

    Attributes:
        ca_fingerprint: 64 lowercase hex digits, sha256 of the CA certificate DER.
        secret: 32 bytes.
    """

    ca_fingerprint: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.ca_fingerprint) != FINGERPRINT_CHARS or not set(self.ca_fingerprint) <= _HEX:
            raise ConfigError("CA fingerprint must be 64 lowercase hex digits")
        if len(self.secret) != SECRET_BYTES:
            raise ConfigError(f"join secret must be {SECRET_BYTES} bytes")

    def __str__(self) -> str:
        secret = base64.b32encode(self.secret).decode("ascii").rstrip("=").lower()
        return f"{TOKEN_PREFIX}-{self.ca_fingerprint}-{secret}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Parse a token typed or pasted by a person (surrounding blanks ignored,
        case-insensitive).

        Raises:
            ConfigError: the text is not a join token; the message says what is
                wrong and what to do.
        """
        text = text.strip()
        if not text:
            raise ConfigError(f"join token is empty; {_HELP}")
        parts = text.split("-")
        if parts[0].upper() != TOKEN_PREFIX:
            if parts[0].upper().startswith("MESH"):
                raise ConfigError(
                    f"join token format {parts[0]!r} is not supported by this meshd "
                    f"(it reads {TOKEN_PREFIX}); use a meshd of the same version as the cluster"
                )
            raise ConfigError(
                f"this is not a meshd join token (it must start with {TOKEN_PREFIX}-); {_HELP}"
            )
        if len(parts) != 3:
            raise ConfigError(
                f"join token must have 3 parts separated by '-' "
                f"({TOKEN_PREFIX}-<fingerprint>-<secret>), found {len(parts)}; {_HELP}"
            )
        fingerprint, secret_text = parts[1].lower(), parts[2].lower()
        if len(fingerprint) != FINGERPRINT_CHARS or not set(fingerprint) <= _HEX:
            raise ConfigError(
                f"the CA fingerprint in the join token must be {FINGERPRINT_CHARS} hex "
                f"digits, found {len(fingerprint)} characters; {_HELP}"
            )
        if len(secret_text) != SECRET_CHARS or not set(secret_text) <= _B32_ALPHABET:
            raise ConfigError(
                f"the secret in the join token must be {SECRET_CHARS} base32 characters "
                f"(a-z, 2-7), found {len(secret_text)} characters; {_HELP}"
            )
        try:
            secret = base64.b32decode(secret_text.upper() + "====")
        except binascii.Error:
            raise ConfigError(f"the secret in the join token is not base32; {_HELP}") from None
        token = cls(fingerprint, secret)
        if str(token).split("-")[2] != secret_text:
            # Non-zero trailing bits: two texts would name one secret. Refuse, so a
            # token has exactly one spelling.
            raise ConfigError(f"the secret in the join token is damaged; {_HELP}")
        return token


def new_token(ca_fingerprint: str, entropy: Callable[[int], bytes]) -> JoinToken:
    """A new token for the CA ``ca_fingerprint`` with a fresh secret (rotation).

    Args:
        ca_fingerprint: :func:`mesh.security.pki.ca_fingerprint` of the CA.
        entropy: a CSPRNG such as ``os.urandom`` (injected so tests can be exact).
    """
    return JoinToken(ca_fingerprint, entropy(SECRET_BYTES))
