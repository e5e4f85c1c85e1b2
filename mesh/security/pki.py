"""The cluster PKI: CA, node and admin certificates, CSRs, fingerprints, renewal.

Pure: no sockets, no files and no clock. Wall-clock time reaches every function that
needs it through an injected ``wall_clock: Callable[[], datetime]`` returning an
aware UTC datetime (STYLE 1.6), so tests can issue certificates that are already
expired or not yet valid. Key pairs and serial numbers come from the operating
system's CSPRNG (through ``cryptography``); that is deliberate, since key material
must never come from a seeded ``random.Random``.

Identities:

- The **CA** is ECDSA P-256, self-signed, ``CN=meshd cluster CA``, ``O=<cluster label>``,
  path length 0 (it signs leaves only), default life 10 years.
- A **node** certificate has ``CN=<node id>`` and ``OU=node``, EKU serverAuth and
  clientAuth (every node both accepts and dials links), SAN = the advertise address
  (an IP or a DNS name) plus the node id when it is a valid DNS name, default life 30
  days, a random 159-bit serial. Only the CSR's public key is used: the CA builds the
  subject and extensions itself, so a CSR cannot ask for more than it gets.
- An **admin** certificate (for ``meshctl --addr``) has ``CN=<name>`` and ``OU=admin``,
  EKU clientAuth only, default life 90 days. The role comes from ``OU``, never from the
  name, so a node called ``admin`` gets no admin rights and an admin cannot act as a
  node on ``mesh-gossip/1`` or ``mesh-raft/1``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import ConfigError, RemoteProtocolError
from mesh.types import NodeId

WallClock = Callable[[], datetime]
"""Returns the current wall-clock time as an aware UTC ``datetime``."""

CA_LIFETIME: Final = timedelta(days=3650)
NODE_CERT_LIFETIME: Final = timedelta(days=30)
ADMIN_CERT_LIFETIME: Final = timedelta(days=90)
BACKDATE: Final = timedelta(minutes=5)
"""``not_valid_before`` is set this far in the past so that a peer whose clock is a
little behind ours does not reject a certificate we have just issued."""

RENEW_AT_MIN: Final = 0.5
RENEW_AT_MAX: Final = 0.8
"""A certificate renews at a uniformly random point in [50%, 80%) of its life: late
enough not to churn, early enough to survive an issuer being down for a while, and
spread so that a cluster that joined at once does not renew at once."""

MAX_NAME_CHARS: Final = 64
"""Upper bound of an X.520 common name, hence of a node id."""

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_CURVE: Final = ec.SECP256R1()


class Role(Enum):
    """What a certificate may do, read from its ``OU``."""

    NODE = "node"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """Who a (verified) certificate names.

    Attributes:
        role: node or admin, from ``OU``.
        name: the common name; for a node this is its :class:`~mesh.types.NodeId`.
        serial: the certificate serial number (what the deny list holds).
        not_valid_after: the expiry instant, aware UTC.
    """

    role: Role
    name: str
    serial: int
    not_valid_after: datetime


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """The cluster CA: its certificate and, on nodes that issue, its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def fingerprint(self) -> str:
        """The sha256 of the CA certificate's DER, lowercase hex (what tokens pin)."""
        return ca_fingerprint(self.cert)

    @property
    def cluster_label(self) -> str:
        """The cluster label recorded as the CA's organisation."""
        return cluster_label_of(self.cert)


def cluster_label_of(ca_cert: x509.Certificate) -> str:
    """The cluster label a CA certificate records as its ``O`` (``""`` if none)."""
    attrs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else ""


def validate_node_name(name: str) -> NodeId:
    """Check that ``name`` can be a node id and a certificate common name.

    1 to 64 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit.

    Raises:
        ConfigError: the name is not acceptable; the message says why.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"node name {name!r} is not valid: use 1-{MAX_NAME_CHARS} characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return NodeId(name)


def _now(wall_clock: WallClock) -> datetime:
    now = wall_clock()
    assert now.tzinfo is not None, "wall_clock() must return an aware UTC datetime"
    return now


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key (from the OS CSPRNG)."""
    return ec.generate_private_key(_CURVE)


def ca_fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER encoding, 64 lowercase hex digits."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def create_ca(
    cluster_label: str,
    wall_clock: WallClock,
    *,
    lifetime: timedelta = CA_LIFETIME,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> CertificateAuthority:
    """Create a new self-signed cluster CA.

    Args:
        cluster_label: recorded as the CA's ``O``; also the gossip associated data.
        wall_clock: the injected clock.
        lifetime: validity from now.
        key: the CA key; a new P-256 key if ``None``.
    """
    key = key or generate_key()
    now = _now(wall_clock)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "meshd cluster CA")]
    if cluster_label:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_label))
    name = x509.Name(attrs)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def create_csr(key: ec.EllipticCurvePrivateKey, name: str) -> x509.CertificateSigningRequest:
    """A CSR for a joiner (or an admin) whose common name is ``name``.

    Raises:
        ConfigError: ``name`` is not a valid node name.
    """
    validate_node_name(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _leaf(
    ca: CertificateAuthority,
    public: ec.EllipticCurvePublicKey,
    name: str,
    role: Role,
    sans: Sequence[x509.GeneralName],
    wall_clock: WallClock,
    lifetime: timedelta,
) -> x509.Certificate:
    now = _now(wall_clock)
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    attrs = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
    ]
    label = ca.cluster_label
    if label:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, label))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role is Role.NODE:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def csr_public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, after checking its self-signature.

    Raises:
        RemoteProtocolError: the signature is invalid or the key is not P-256.
    """
    if not csr.is_signature_valid:
        raise RemoteProtocolError("CSR signature is invalid")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != _CURVE.name:
        raise RemoteProtocolError("CSR key must be ECDSA P-256")
    return public


def csr_common_name(csr: x509.CertificateSigningRequest) -> str:
    """The CSR's common name.

    Raises:
        RemoteProtocolError: the CSR has no single common name.
    """
    attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        raise RemoteProtocolError("CSR must carry exactly one common name")
    return str(attrs[0].value)


def subject_alt_names(node_id: str, advertise_host: str) -> list[x509.GeneralName]:
    """The SANs of a node certificate: the advertise host (IP or DNS name) and the
    node id when it is a valid DNS name.

    Raises:
        ConfigError: ``advertise_host`` is neither an IP literal nor a DNS name.
    """
    sans: list[x509.GeneralName] = []
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(advertise_host)))
    except ValueError:
        if not _DNS_RE.fullmatch(advertise_host):
            raise ConfigError(
                f"advertise host {advertise_host!r} is neither an IP address nor a DNS name"
            ) from None
        sans.append(x509.DNSName(advertise_host.lower()))
    if _DNS_RE.fullmatch(node_id) and node_id.lower() != advertise_host.lower():
        sans.append(x509.DNSName(node_id.lower()))
    return sans


def issue_node_certificate(
    ca: CertificateAuthority,
    csr: x509.CertificateSigningRequest,
    node_id: str,
    advertise_host: str,
    wall_clock: WallClock,
    *,
    lifetime: timedelta = NODE_CERT_LIFETIME,
) -> x509.Certificate:
    """Sign a node certificate for the key in ``csr``.

    The subject is built from ``node_id`` (the CSR's requested subject and extensions
    are ignored, only its key and self-signature are used). The life is capped at the
    CA's own expiry.

    Raises:
        RemoteProtocolError: the CSR's signature is invalid or its key is not P-256.
        ConfigError: ``node_id`` or ``advertise_host`` is invalid.
    """
    validate_node_name(node_id)
    public = csr_public_key(csr)
    sans = subject_alt_names(node_id, advertise_host)
    return _leaf(ca, public, node_id, Role.NODE, sans, wall_clock, lifetime)


def issue_admin_certificate(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    wall_clock: WallClock,
    *,
    name: str = "admin",
    lifetime: timedelta = ADMIN_CERT_LIFETIME,
) -> x509.Certificate:
    """Sign a client-only admin certificate (``OU=admin``, EKU clientAuth) for meshctl.

    Raises:
        ConfigError: ``name`` is invalid.
    """
    validate_node_name(name)
    return _leaf(ca, public_key, name, Role.ADMIN, (), wall_clock, lifetime)


def identity_of(cert: x509.Certificate) -> CertIdentity:
    """Read role, name and serial from a certificate that TLS has already verified.

    Raises:
        RemoteProtocolError: the certificate has no single CN or no known role; it was
            not issued by meshd.
    """
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise RemoteProtocolError("certificate has no single CN/OU; not issued by meshd")
    try:
        role = Role(str(ous[0].value))
    except ValueError:
        raise RemoteProtocolError(f"certificate role {ous[0].value!r} is unknown") from None
    return CertIdentity(
        role=role,
        name=str(cns[0].value),
        serial=cert.serial_number,
        not_valid_after=cert.not_valid_after_utc,
    )


def verify_issued_by(
    cert: x509.Certificate, ca_cert: x509.Certificate, wall_clock: WallClock
) -> CertIdentity:
    """Check by hand what TLS would: ``cert`` is signed by ``ca_cert`` and valid now.

    Used where Python's ``ssl`` cannot verify for us (the join client pins a CA it
    learns during the exchange).

    Raises:
        RemoteProtocolError: not signed by that CA, not valid now, or not a meshd
            certificate; the message says which.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise RemoteProtocolError("certificate is not signed by the pinned cluster CA") from None
    now = _now(wall_clock)
    if now < cert.not_valid_before_utc:
        raise RemoteProtocolError(
            f"certificate is not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(our clock says {now.isoformat()}; check NTP)"
        )
    if now > cert.not_valid_after_utc:
        raise RemoteProtocolError(f"certificate expired at {cert.not_valid_after_utc.isoformat()}")
    return identity_of(cert)


def renewal_time(cert: x509.Certificate, rng: random.Random) -> datetime:
    """The instant at which ``cert`` should be renewed.

    A uniformly random point in [50%, 80%) of the certificate's life, measured from
    ``not_valid_before`` (so the backdating counts as life already spent).

    Args:
        cert: the certificate in use.
        rng: the injected source of jitter.
    """
    start = cert.not_valid_before_utc
    life = cert.not_valid_after_utc - start
    fraction = RENEW_AT_MIN + (RENEW_AT_MAX - RENEW_AT_MIN) * rng.random()
    return start + life * fraction


# -- PEM helpers --------------------------------------------------------------------


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_to_der(cert: x509.Certificate) -> bytes:
    """DER encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.DER)


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (file permissions protect it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    """PEM encoding of a CSR."""
    return csr.public_bytes(serialization.Encoding.PEM)


def load_cert_pem(data: bytes) -> x509.Certificate:
    """Parse one PEM certificate from untrusted bytes.

    Raises:
        RemoteProtocolError: not a PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise RemoteProtocolError(f"not a PEM certificate: {exc}") from None


def load_cert_der(data: bytes) -> x509.Certificate:
    """Parse one DER certificate from untrusted bytes.

    Raises:
        RemoteProtocolError: not a DER certificate.
    """
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise RemoteProtocolError(f"not a DER certificate: {exc}") from None


def load_csr_pem(data: bytes) -> x509.CertificateSigningRequest:
    """Parse one PEM CSR from untrusted bytes.

    Raises:
        RemoteProtocolError: not a PEM CSR.
    """
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise RemoteProtocolError(f"not a PEM CSR: {exc}") from None


def load_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM private key (from our own data dir).

    Raises:
        ConfigError: not an unencrypted ECDSA private key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("private key is not ECDSA")
    return key
