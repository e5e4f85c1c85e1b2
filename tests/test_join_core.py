"""The mesh-join/1 messages and the sans-I/O join exchange (no sockets)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError, RemoteProtocolError, StartupError
from mesh.gossip.keyring import Keyring
from mesh.security import pki
from mesh.security.join import (
    REJECT_WRONG_TOKEN,
    JoinClient,
    JoinRateLimited,
    JoinServer,
    join_proof,
)
from mesh.security.messages import (
    MAX_RETRY_S,
    MSG_JOIN_ACCEPT,
    MSG_JOIN_CHALLENGE,
    MSG_LINK_REFUSED,
    JoinAccept,
    JoinChallenge,
    JoinRedirect,
    JoinReject,
    JoinRequest,
    LinkAccepted,
    LinkRefused,
    RenewRequest,
    SecurityMessage,
    decode_message,
)
from mesh.security.token import JoinToken, new_token
from mesh.types import Addr
from mesh.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR

T0 = datetime(2030, 1, 1, tzinfo=UTC)
BINDING = b"\x42" * 48
NONCE = b"\x01" * 32
SOURCE = "10.0.0.2"


def clock(at: datetime = T0) -> pki.WallClock:
    return lambda: at


# -- messages -------------------------------------------------------------------------

b32 = st.binary(min_size=32, max_size=32)
text = st.text(min_size=1, max_size=64)
messages: st.SearchStrategy[SecurityMessage] = st.one_of(
    st.builds(JoinChallenge, st.binary(max_size=2000), b32),
    st.builds(JoinRequest, b32, st.binary(max_size=2000), text, text),
    st.builds(RenewRequest, st.binary(max_size=2000), text),
    st.builds(
        JoinAccept,
        st.binary(max_size=2000),
        st.binary(max_size=2000),
        st.lists(b32, min_size=1, max_size=16).map(tuple),
        st.text(max_size=128),
    ),
    st.builds(JoinReject, text),
    st.just(LinkAccepted()),
    st.builds(LinkRefused, text),
    st.builds(LinkRefused, text, st.floats(0.0, MAX_RETRY_S)),
    st.builds(JoinRedirect, st.lists(text, max_size=16).map(tuple)),
)


@given(messages)
def test_roundtrip(message: SecurityMessage) -> None:
    assert decode_message(message.to_wire()) == message


@given(st.binary(max_size=600))
def test_decoder_fuzz_bytes(data: bytes) -> None:
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["ca", "n", "p", "csr", "name", "addr", "cert", "keys", "label", "why", "retry"]
)


@given(
    msg_type=st.integers(32, 47),
    body=st.dictionaries(field_names, msgpack_values, max_size=6) | msgpack_values,
)
def test_decoder_fuzz_structured(msg_type: int, body: Any) -> None:
    """Well-formed envelopes with hostile bodies: decoded or refused, nothing else."""
    data = bytes((PROTOCOL_MAJOR, PROTOCOL_MINOR, msg_type)) + msgpack.packb(body)
    try:
        message = decode_message(data)
    except RemoteProtocolError:
        return
    assert decode_message(message.to_wire()) == message


def test_decoder_refusals() -> None:
    good = JoinAccept(b"c", b"a", (b"k" * 32,), "prod").to_wire()
    assert decode_message(good).cluster_label == "prod"  # type: ignore[union-attr]
    bad_keys = bytes((1, 0, MSG_JOIN_ACCEPT)) + msgpack.packb(
        {"cert": b"c", "ca": b"a", "keys": [b"short"], "label": ""}
    )
    with pytest.raises(RemoteProtocolError, match="32 bytes"):
        decode_message(bad_keys)
    short_nonce = bytes((1, 0, MSG_JOIN_CHALLENGE)) + msgpack.packb({"ca": b"x", "n": b"1"})
    with pytest.raises(RemoteProtocolError, match="expected 32"):
        decode_message(short_nonce)
    with pytest.raises(RemoteProtocolError, match="not a join/link"):
        decode_message(bytes((1, 0, 47)) + msgpack.packb({}))
    with pytest.raises(RemoteProtocolError, match="protocol 2"):
        decode_message(bytes((2, 0, MSG_LINK_REFUSED)) + msgpack.packb({"why": "x"}))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_message(bytes((1, 0, MSG_LINK_REFUSED)) + msgpack.packb({"why": "x" * 2000}))
    for retry in (-1.0, float("nan"), float("inf"), MAX_RETRY_S * 2, True, "4"):
        with pytest.raises(RemoteProtocolError, match="retry"):
            decode_message(
                bytes((1, 0, MSG_LINK_REFUSED)) + msgpack.packb({"why": "x", "retry": retry})
            )


def test_link_refused_sends_retry_only_when_temporary() -> None:
    """A permanent refusal encodes as before, so older joiners read it unchanged."""
    assert LinkRefused("no").to_wire() == bytes((1, 0, MSG_LINK_REFUSED)) + msgpack.packb(
        {"why": "no"}
    )
    limited = decode_message(LinkRefused("slow down", 4.5).to_wire())
    assert limited == LinkRefused("slow down", 4.5)


# -- the exchange ---------------------------------------------------------------------


class Cluster:
    """A CA-holding node's join core plus its TLS certificate."""

    def __init__(self, label: str = "prod") -> None:
        self.ca = pki.create_ca(label, clock())
        self.token = new_token(self.ca.fingerprint, os.urandom)
        self.keyring = Keyring([b"\x11" * 32, b"\x22" * 32])
        self.server = JoinServer(self.ca, self.token, self.keyring, clock())
        key = pki.generate_key()
        self.tls_cert = pki.issue_node_certificate(
            self.ca, pki.create_csr(key, "seed"), "seed", "10.0.0.1", clock()
        )
        self.tls_der = pki.cert_to_der(self.tls_cert)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster()


def joiner(token: JoinToken, name: str = "n2") -> tuple[JoinClient, ec.EllipticCurvePrivateKey]:
    key = pki.generate_key()
    client = JoinClient.for_token(token, pki.create_csr(key, name), Addr("10.0.0.2", 7946), clock())
    return client, key


def exchange(
    cluster: Cluster,
    client: JoinClient,
    *,
    server_binding: bytes = BINDING,
    taken: frozenset[str] = frozenset(),
) -> JoinAccept | JoinReject:
    challenge = cluster.server.challenge(NONCE)
    request = client.handle_challenge(decode_message(challenge.to_wire()), cluster.tls_der, BINDING)
    assert isinstance(request, JoinRequest)
    reply = cluster.server.handle_request(
        request, challenge=challenge, tls_binding=server_binding, peer=None, source=SOURCE, now=0.0,
        taken=taken
    )
    return reply


def test_join_happy_path(cluster: Cluster) -> None:
    client, key = joiner(cluster.token)
    reply = exchange(cluster, client)
    assert isinstance(reply, JoinAccept)
    result = client.handle_reply(decode_message(reply.to_wire()))
    assert result.node_id == "n2"
    assert result.ca_cert == cluster.ca.cert
    assert result.gossip_keys == cluster.keyring.keys
    assert result.cluster_label == "prod"
    assert result.cert.public_key() == key.public_key()
    issued = cluster.server.poll_issued()
    assert [(i.name, i.serial, i.renewal) for i in issued] == [
        ("n2", result.cert.serial_number, False)
    ]
    assert issued[0].advertise == "10.0.0.2:7946"
    assert cluster.server.poll_issued() == []


def test_wrong_token_rejected_with_actionable_reason() -> None:
    cluster = Cluster()
    wrong = JoinToken(cluster.ca.fingerprint, b"\x00" * 32)
    client, _ = joiner(wrong)
    reply = exchange(cluster, client)
    assert reply == JoinReject(REJECT_WRONG_TOKEN)
    with pytest.raises(StartupError, match="meshctl token"):
        client.handle_reply(reply)
    assert cluster.server.statistics().rejected_token == 1
    assert cluster.server.poll_issued() == []


def test_rotated_token_stops_working_new_one_works() -> None:
    cluster = Cluster()
    old = cluster.token
    cluster.server.rotate_token(new_token(cluster.ca.fingerprint, os.urandom))
    client, _ = joiner(old)
    assert exchange(cluster, client) == JoinReject(REJECT_WRONG_TOKEN)
    client, _ = joiner(cluster.server.token)
    assert isinstance(exchange(cluster, client), JoinAccept)


def test_rotate_to_another_ca_is_a_bug(cluster: Cluster) -> None:
    with pytest.raises(LocalProtocolError):
        cluster.server.rotate_token(new_token("00" * 32, os.urandom))


def test_proof_is_bound_to_the_tls_channel(cluster: Cluster) -> None:
    """A proof relayed onto another TLS connection (another binding) fails."""
    client, _ = joiner(cluster.token)
    assert exchange(cluster, client, server_binding=b"\x43" * 48) == JoinReject(REJECT_WRONG_TOKEN)


def test_request_fields_are_covered_by_the_proof(cluster: Cluster) -> None:
    client, _ = joiner(cluster.token)
    challenge = cluster.server.challenge(NONCE)
    request = client.handle_challenge(challenge, cluster.tls_der, BINDING)
    assert isinstance(request, JoinRequest)
    forged = JoinRequest(request.proof, request.csr_pem, "other-name", request.advertise)
    reply = cluster.server.handle_request(
        forged, challenge=challenge, tls_binding=BINDING, peer=None, source=SOURCE, now=0.0
    )
    assert reply == JoinReject(REJECT_WRONG_TOKEN)


def test_other_ca_is_refused_before_sending(cluster: Cluster) -> None:
    impostor = Cluster()
    client, _ = joiner(cluster.token)
    challenge = impostor.server.challenge(NONCE)
    with pytest.raises(StartupError, match="another cluster.*nothing was sent"):
        client.handle_challenge(challenge, impostor.tls_der, BINDING)


def test_server_cert_must_come_from_the_pinned_ca(cluster: Cluster) -> None:
    """Right CA certificate in the challenge, but the TLS certificate is another's."""
    impostor = Cluster()
    client, _ = joiner(cluster.token)
    challenge = JoinChallenge(pki.cert_to_pem(cluster.ca.cert), NONCE)
    with pytest.raises(StartupError, match="pinned CA.*nothing was sent"):
        client.handle_challenge(challenge, impostor.tls_der, BINDING)
    with pytest.raises(StartupError, match="no TLS certificate"):
        client.handle_challenge(challenge, None, BINDING)


def test_link_refused_instead_of_challenge(cluster: Cluster) -> None:
    client, _ = joiner(cluster.token)
    with pytest.raises(StartupError, match="no CA key"):
        client.handle_challenge(LinkRefused("holds no CA key"), cluster.tls_der, BINDING)


def test_rate_limited_refusal_raises_join_rate_limited(cluster: Cluster) -> None:
    """A temporary refusal is told apart from a permanent one, with the advised delay."""
    client, _ = joiner(cluster.token)
    refusal = LinkRefused("too many join attempts from 10.0.0.2; retry in 5 s", 4.2)
    with pytest.raises(JoinRateLimited, match="retry in 5 s") as raised:
        client.handle_challenge(decode_message(refusal.to_wire()), cluster.tls_der, BINDING)
    assert raised.value.retry_in_s == 4.2
    assert isinstance(raised.value, StartupError)
    # the client has not pinned anything yet: it can be handed a challenge after
    with pytest.raises(LocalProtocolError):
        client.handle_reply(JoinReject("x"))


def test_reply_before_challenge_is_a_bug(cluster: Cluster) -> None:
    client, _ = joiner(cluster.token)
    with pytest.raises(LocalProtocolError):
        client.handle_reply(JoinReject("x"))


def test_name_taken(cluster: Cluster) -> None:
    client, _ = joiner(cluster.token, "busy")
    reply = exchange(cluster, client, taken=frozenset({"busy"}))
    assert isinstance(reply, JoinReject)
    assert "meshctl node rm busy" in reply.reason


def test_accept_for_another_key_refused(cluster: Cluster) -> None:
    client, _ = joiner(cluster.token)
    assert isinstance(exchange(cluster, client), JoinAccept)
    other, _ = joiner(cluster.token)
    stolen = exchange(cluster, other)
    assert isinstance(stolen, JoinAccept)
    with pytest.raises(StartupError, match="not for this node"):
        client.handle_reply(stolen)


def test_expired_issued_cert_refused(cluster: Cluster) -> None:
    client = JoinClient.for_token(
        cluster.token,
        pki.create_csr(pki.generate_key(), "n9"),
        Addr("10.0.0.9", 7946),
        clock(T0 + timedelta(days=40)),
    )
    challenge = JoinChallenge(pki.cert_to_pem(cluster.ca.cert), NONCE)
    with pytest.raises(StartupError, match="expired"):
        client.handle_challenge(challenge, cluster.tls_der, BINDING)


def test_bad_csr_and_address_rejected(cluster: Cluster) -> None:
    key = pki.generate_key()
    client = JoinClient.for_token(
        cluster.token, pki.create_csr(key, "n3"), Addr("bad host!", 7946), clock()
    )
    reply = exchange(cluster, client)
    assert isinstance(reply, JoinReject)
    assert "advertise" in reply.reason


def test_renewal_keeps_name_and_role(cluster: Cluster) -> None:
    key = pki.generate_key()
    peer = pki.CertIdentity(pki.Role.NODE, "n2", 1234, T0)
    client = JoinClient(
        cluster.ca.fingerprint,
        pki.create_csr(key, "n2"),
        Addr("10.0.0.2", 7946),
        clock(),
        secret=None,
    )
    challenge = cluster.server.challenge(NONCE)
    request = client.handle_challenge(challenge, cluster.tls_der, BINDING)
    assert isinstance(request, RenewRequest)
    reply = cluster.server.handle_request(
        request, challenge=challenge, tls_binding=BINDING, peer=peer, source=SOURCE, now=0.0
    )
    result = client.handle_reply(reply)
    assert result.node_id == "n2"
    assert cluster.server.poll_issued()[-1].renewal
    # without a certificate there is nothing to renew
    reply = cluster.server.handle_request(request, challenge=challenge, tls_binding=b"", peer=None,
                                          source=SOURCE, now=0.0)
    assert isinstance(reply, JoinReject)
    assert "current certificate" in reply.reason
    # a renewal cannot change the name: the CSR must match the certificate
    other = pki.CertIdentity(pki.Role.NODE, "n7", 99, T0)
    reply = cluster.server.handle_request(request, challenge=challenge, tls_binding=b"", peer=other,
                                          source=SOURCE, now=0.0)
    assert isinstance(reply, JoinReject)
    assert "common name" in reply.reason


def test_admin_renewal_gets_admin_cert(cluster: Cluster) -> None:
    key = pki.generate_key()
    request = RenewRequest(pki.csr_to_pem(pki.create_csr(key, "admin")), "10.0.0.5:7946")
    peer = pki.CertIdentity(pki.Role.ADMIN, "admin", 5, T0)
    reply = cluster.server.handle_request(
        request, challenge=cluster.server.challenge(NONCE), tls_binding=b"", peer=peer,
        source=SOURCE, now=0.0,
    )
    assert isinstance(reply, JoinAccept)
    assert pki.identity_of(pki.load_cert_pem(reply.cert_pem)).role is pki.Role.ADMIN


def test_admin_certificate_through_the_api() -> None:
    cluster = Cluster()
    key = pki.generate_key()
    reply = cluster.server.issue_admin(pki.csr_to_pem(pki.create_csr(key, "ops")), "ops")
    assert isinstance(reply, JoinAccept)
    cert = pki.load_cert_pem(reply.cert_pem)
    assert pki.identity_of(cert) == pki.CertIdentity(pki.Role.ADMIN, "ops", cert.serial_number,
                                                     cert.not_valid_after_utc)
    assert cert.public_key() == key.public_key()
    (issued,) = cluster.server.poll_issued()
    assert (issued.name, issued.role, issued.serial, issued.advertise, issued.renewal) == (
        "ops", pki.Role.ADMIN, cert.serial_number, "-", False)
    stats = cluster.server.statistics()
    assert (stats.joins_accepted, stats.renewals_accepted) == (0, 0)  # neither
    # The CSR's name must be the one asked for.
    other = cluster.server.issue_admin(pki.csr_to_pem(pki.create_csr(key, "root")), "ops")
    assert isinstance(other, JoinReject)
    assert other.reason.startswith("admin certificate refused: CSR common name")


@given(csr_pem=st.binary(max_size=300), name=text, addr=text)
def test_server_survives_garbage_requests_with_valid_proof(
    csr_pem: bytes, name: str, addr: str
) -> None:
    """Even an authenticated joiner with garbage fields gets a reply, not a crash."""
    cluster = _SHARED
    proof = join_proof(
        cluster.token.secret,
        tls_binding=BINDING,
        nonce=NONCE,
        ca_fp=cluster.ca.fingerprint,
        csr_pem=csr_pem,
        node_name=name,
        advertise=addr,
    )
    reply = cluster.server.handle_request(
        JoinRequest(proof, csr_pem, name, addr),
        challenge=JoinChallenge(b"", NONCE),
        tls_binding=BINDING,
        peer=None,
        source=SOURCE,
        now=0.0,
    )
    assert isinstance(reply, JoinReject)


_SHARED = Cluster()
