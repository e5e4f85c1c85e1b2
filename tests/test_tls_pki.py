"""The cluster PKI (pure) and credential files on disk."""

from __future__ import annotations

import ipaddress
import os
import random
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, RemoteProtocolError, StartupError
from mesh.security import pki
from mesh.security.token import JoinToken
from mesh.tls import (
    ADMIN_DIR,
    KEYRING_FILE,
    TOKEN_FILE,
    TlsIdentity,
    bootstrap_first_node,
    check_data_dir,
    load_ca,
    load_cluster_label,
    load_keyring,
    load_token,
    read_private_file,
    save_token,
    server_context,
    write_private_file,
)
from mesh.types import Addr, NodeId

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def clock(at: datetime = T0) -> pki.WallClock:
    return lambda: at


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("prod", clock())


def test_ca_shape(ca: pki.CertificateAuthority) -> None:
    cert = ca.cert
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert cert.not_valid_after_utc - T0 == pki.CA_LIFETIME
    assert isinstance(ca.key.curve, type(pki.generate_key().curve))
    assert ca.cluster_label == "prod"
    assert len(ca.fingerprint) == 64
    assert int(ca.fingerprint, 16) >= 0
    assert ca.fingerprint == pki.ca_fingerprint(pki.load_cert_pem(pki.cert_to_pem(cert)))


def test_node_certificate(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    csr = pki.create_csr(key, "web-1")
    cert = pki.issue_node_certificate(ca, csr, "web-1", "10.0.0.7", clock())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert san.get_values_for_type(x509.DNSName) == ["web-1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc - T0 == timedelta(days=30)
    assert cert.not_valid_before_utc == T0 - pki.BACKDATE
    ident = pki.verify_issued_by(cert, ca.cert, clock())
    assert ident.role is pki.Role.NODE
    assert ident.name == "web-1"
    assert ident.serial == cert.serial_number
    other = pki.issue_node_certificate(ca, csr, "web-1", "10.0.0.7", clock())
    assert other.serial_number != cert.serial_number  # random serials


def test_dns_advertise_and_csr_subject_ignored(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    # a CSR asking for another name gets the name the CA was told, nothing else
    csr = pki.create_csr(key, "evil")
    cert = pki.issue_node_certificate(ca, csr, "n2", "host.example", clock())
    assert pki.identity_of(cert).name == "n2"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host.example", "n2"]


def test_admin_certificate(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = pki.issue_admin_certificate(ca, key.public_key(), clock())
    ident = pki.identity_of(cert)
    assert ident.role is pki.Role.ADMIN
    assert ident.name == "admin"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_verify_issued_by_refuses(ca: pki.CertificateAuthority) -> None:
    other_ca = pki.create_ca("other", clock())
    key = pki.generate_key()
    cert = pki.issue_node_certificate(ca, pki.create_csr(key, "n1"), "n1", "10.0.0.1", clock())
    with pytest.raises(RemoteProtocolError, match="not signed"):
        pki.verify_issued_by(cert, other_ca.cert, clock())
    with pytest.raises(RemoteProtocolError, match="expired"):
        pki.verify_issued_by(cert, ca.cert, clock(T0 + timedelta(days=31)))
    with pytest.raises(RemoteProtocolError, match="not valid before"):
        pki.verify_issued_by(cert, ca.cert, clock(T0 - timedelta(hours=1)))


def test_lifetime_capped_by_ca() -> None:
    short_ca = pki.create_ca("x", clock(), lifetime=timedelta(days=2))
    key = pki.generate_key()
    cert = pki.issue_node_certificate(short_ca, pki.create_csr(key, "n"), "n", "1.2.3.4", clock())
    assert cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "é", "a/b", "a,b"])
def test_bad_node_names(name: str) -> None:
    with pytest.raises(ConfigError, match="node name"):
        pki.validate_node_name(name)


def test_bad_advertise(ca: pki.CertificateAuthority) -> None:
    csr = pki.create_csr(pki.generate_key(), "n")
    with pytest.raises(ConfigError, match="advertise"):
        pki.issue_node_certificate(ca, csr, "n", "not a host!", clock())


@given(seed=st.integers(0, 2**64), life_days=st.integers(1, 400))
def test_renewal_point_within_50_to_80_percent(seed: int, life_days: int) -> None:
    ca = _FAST_CA
    cert = pki.issue_node_certificate(
        ca, _FAST_CSR, "n", "10.0.0.1", clock(), lifetime=timedelta(days=life_days)
    )
    at = pki.renewal_time(cert, random.Random(seed))
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    life = end - start
    assert start + life * 0.5 <= at <= start + life * 0.8
    assert at == pki.renewal_time(cert, random.Random(seed))  # deterministic per seed


_FAST_CA = pki.create_ca("p", clock())
_FAST_CSR = pki.create_csr(pki.generate_key(), "n")


# -- files ------------------------------------------------------------------------------


def test_private_file_written_0600_atomically(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "secret"
        write_private_file(path, b"one")
        write_private_file(path, b"two")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private_file(path) == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_readable_key_file_refused_with_chmod(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    write_private_file(path, b"k")
    path.chmod(mode)
    with pytest.raises(StartupError, match=rf"chmod 600 {path}") as info:
        read_private_file(path)
    assert str(path) in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_symlinked_key_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    write_private_file(target, b"k")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(StartupError, match="symbolic link"):
        read_private_file(tmp_path / "link")


def test_bootstrap_writes_everything_private(tmp_path: Path) -> None:
    now = datetime.now(UTC)  # ssl below checks validity with the real clock
    boot = bootstrap_first_node(
        tmp_path, NodeId("n1"), Addr("127.0.0.1", 7946), "prod", lambda: now
    )
    check_data_dir(tmp_path)
    for secret in ("tls/ca.key", "tls/node.key", f"{ADMIN_DIR}/key.pem", KEYRING_FILE, TOKEN_FILE):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600, secret
    assert load_token(tmp_path) == boot.token
    assert str(boot.token).startswith("MESH1-" + boot.ca.fingerprint)
    assert load_keyring(tmp_path).keys == boot.keyring.keys
    assert load_cluster_label(tmp_path) == "prod"
    loaded = load_ca(tmp_path)
    assert loaded is not None
    assert loaded.fingerprint == boot.ca.fingerprint
    node = TlsIdentity.node(tmp_path)
    assert pki.identity_of(node.load_cert()).name == "n1"
    assert (
        pki.identity_of(TlsIdentity.admin(tmp_path / ADMIN_DIR).load_cert()).role is pki.Role.ADMIN
    )
    server_context(node)  # loads
    (tmp_path / "tls" / "node.key").chmod(0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        check_data_dir(tmp_path)
    with pytest.raises(StartupError, match="chmod 600"):
        server_context(node)


def test_token_file_roundtrip(tmp_path: Path) -> None:
    token = JoinToken("ab" * 32, b"\x01" * 32)
    save_token(tmp_path, token)
    assert load_token(tmp_path) == token
