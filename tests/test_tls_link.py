"""Real TLS 1.3 over loopback: the ALPN-routing listener, link policy, join glue.

Certificates here are checked by OpenSSL against the real clock, so the fixtures issue
them with the real one (``datetime.now``); the logic under test still takes it as an
injected ``wall_clock``. No test sleeps: each waits on a reply, an EOF, or (for the
handshake timeout) the autojump clock.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from mesh.errors import StartupError
from mesh.gossip.keyring import Keyring
from mesh.security import pki
from mesh.security.join import JoinRedirected, JoinServer
from mesh.security.messages import LinkRefused
from mesh.security.token import JoinToken, new_token
from mesh.tls import (
    ADMIN_DIR,
    ALPN_GOSSIP,
    ALPN_JOIN,
    ALPN_RAFT,
    ALPN_RPC,
    DenySet,
    Handler,
    LinkRefusedError,
    PeerInfo,
    SSLStreamT,
    TlsDialer,
    TlsIdentity,
    TlsServer,
    bootstrap_first_node,
    client_context,
    join_handler,
    load_ca,
    load_cluster_label,
    load_keyring,
    open_tls_stream,
    receive_message,
    redirect_join_handler,
    request_join,
    request_renewal,
    save_join_result,
    server_context,
)
from mesh.types import Addr, NodeId


def real_clock() -> datetime:
    return datetime.now(UTC)


def past_clock() -> datetime:
    return datetime.now(UTC) - timedelta(days=60)


def issue(
    directory: Path,
    ca: pki.CertificateAuthority,
    name: str,
    wall_clock: Callable[[], datetime] = real_clock,
) -> TlsIdentity:
    key = pki.generate_key()
    cert = pki.issue_node_certificate(ca, pki.create_csr(key, name), name, "127.0.0.1", wall_clock)
    identity = TlsIdentity.node(directory)
    identity.save(cert, key, ca.cert)
    return identity


@dataclass
class Env:
    seed_dir: Path
    ca: pki.CertificateAuthority
    token: JoinToken
    keyring: Keyring
    seed: TlsIdentity
    n2: TlsIdentity
    admin: TlsIdentity
    expired: TlsIdentity
    foreign: TlsIdentity
    """A node certificate from another CA, trusting ours (built by hand below)."""
    tmp: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    tmp = tmp_path_factory.mktemp("tls")
    boot = bootstrap_first_node(
        tmp / "seed", NodeId("seed"), Addr("127.0.0.1", 7946), "test", real_clock
    )
    ca = boot.ca
    other_ca = pki.create_ca("other", real_clock)
    foreign = issue(tmp / "foreign", other_ca, "n2")
    # present the other CA's certificate, but trust ours, so that our server (not the
    # client) is the one refusing
    (foreign.ca_file).write_bytes(pki.cert_to_pem(ca.cert))
    return Env(
        seed_dir=tmp / "seed",
        ca=ca,
        token=boot.token,
        keyring=boot.keyring,
        seed=TlsIdentity.node(tmp / "seed"),
        n2=issue(tmp / "n2", ca, "n2"),
        admin=TlsIdentity.admin(tmp / "seed" / ADMIN_DIR),
        expired=issue(tmp / "expired", ca, "n4", past_clock),
        foreign=foreign,
        tmp=tmp,
    )


async def greet_then_echo(stream: SSLStreamT, peer: PeerInfo) -> None:
    """Speaks first (tests that the status frame read does not swallow our bytes)."""
    assert peer.identity is not None
    await stream.send_all(f"hi {peer.identity.name}\n".encode())
    data = await stream.receive_some(100)
    await stream.send_all(data)


@dataclass
class Served:
    server: TlsServer
    addr: Addr
    revoked: set[int]
    join: JoinServer


async def start_server(
    nursery: trio.Nursery,
    env: Env,
    *,
    alpns: tuple[str, ...] = (ALPN_JOIN, ALPN_GOSSIP, ALPN_RAFT, ALPN_RPC),
) -> Served:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ca = load_ca(env.seed_dir)
    assert ca is not None
    join = JoinServer(ca, env.token, env.keyring, real_clock)
    handlers: dict[str, Handler] = {a: greet_then_echo for a in alpns if a != ALPN_JOIN}
    if ALPN_JOIN in alpns:
        handlers[ALPN_JOIN] = join_handler(join)
    revoked: set[int] = set()
    server = TlsServer(server_context(env.seed), handlers, revoked=revoked)
    await nursery.start(server.serve, listeners)
    return Served(server, Addr("127.0.0.1", port), revoked, join)


@pytest.fixture
async def served(nursery: trio.Nursery, env: Env) -> Served:
    return await start_server(nursery, env)


async def talk(stream: SSLStreamT, name: str) -> None:
    async with stream:
        expected = f"hi {name}\n".encode()
        got = b""
        while len(got) < len(expected):
            got += await stream.receive_some(100)
        assert got == expected
        await stream.send_all(b"ping")
        assert await stream.receive_some(100) == b"ping"


def ctx_without_cert(env: Env) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=env.seed.ca_file)
    return ctx


# -- accepted links -----------------------------------------------------------------


async def test_mutual_tls_identifies_both_ends(served: Served, env: Env) -> None:
    for alpn in (ALPN_GOSSIP, ALPN_RAFT, ALPN_RPC):
        stream, peer = await open_tls_stream(
            served.addr, client_context(env.n2), alpn, expect=NodeId("seed")
        )
        assert peer.node_id == "seed"
        assert peer.alpn == alpn
        await talk(stream, "n2")
    stats = served.server.statistics()
    assert stats.served == 3
    assert stats.refused == 0
    assert stats.handshake_failures == 0


async def test_admin_allowed_on_rpc_only(served: Served, env: Env) -> None:
    stream, _ = await open_tls_stream(served.addr, client_context(env.admin), ALPN_RPC)
    await talk(stream, "admin")
    for alpn in (ALPN_GOSSIP, ALPN_RAFT):
        with pytest.raises(LinkRefusedError, match="admin certificate.*may not use") as info:
            await open_tls_stream(served.addr, client_context(env.admin), alpn)
        assert info.value.code == "refused"
    assert served.server.statistics().reasons["wrong_role"] == 2


async def test_dialer_for_the_gossip_adapter(served: Served, env: Env) -> None:
    dialer = TlsDialer(client_context(env.n2))
    stream = await dialer.open_stream(served.addr)
    await talk(stream, "n2")
    revoked_dialer = TlsDialer(client_context(env.n2), revoked={env.seed.load_cert().serial_number})
    with pytest.raises(LinkRefusedError):
        await revoked_dialer.open_stream(served.addr)


async def test_expect_checks_the_certificate_name(served: Served, env: Env) -> None:
    with pytest.raises(LinkRefusedError, match="expected 'n7'") as info:
        await open_tls_stream(served.addr, client_context(env.n2), ALPN_GOSSIP, expect=NodeId("n7"))
    assert info.value.code == "unexpected_peer"


# -- refused links --------------------------------------------------------------------


async def test_client_without_cert_refused_on_every_alpn_but_join(served: Served, env: Env) -> None:
    for alpn in (ALPN_GOSSIP, ALPN_RAFT, ALPN_RPC):
        with pytest.raises(LinkRefusedError, match="needs a client certificate") as info:
            await open_tls_stream(served.addr, ctx_without_cert(env), alpn)
        assert info.value.code == "refused"
    stream, peer = await open_tls_stream(served.addr, ctx_without_cert(env), ALPN_JOIN)
    async with stream:
        assert peer.identity is not None
        assert peer.identity.name == "seed"
    stats = served.server.statistics()
    assert stats.reasons["no_client_cert"] == 3
    assert stats.refused == 3


async def test_cert_from_another_ca_refused(served: Served, env: Env) -> None:
    with pytest.raises(LinkRefusedError, match="did not accept our certificate") as info:
        await open_tls_stream(served.addr, client_context(env.foreign), ALPN_GOSSIP)
    assert info.value.code == "closed"
    stats = served.server.statistics()
    assert stats.handshake_failures == 1
    assert stats.served == 0
    assert stats.reasons == {"handshake:unable to get local issuer certificate": 1}


async def test_expired_cert_refused(served: Served, env: Env) -> None:
    with pytest.raises(LinkRefusedError, match="did not accept our certificate"):
        await open_tls_stream(served.addr, client_context(env.expired), ALPN_RAFT)
    assert served.server.statistics().reasons == {"handshake:certificate has expired": 1}


async def test_revoked_serial_refused_on_every_alpn(served: Served, env: Env) -> None:
    served.revoked.add(env.n2.load_cert().serial_number)
    for alpn in (ALPN_GOSSIP, ALPN_RAFT, ALPN_RPC, ALPN_JOIN):
        ctx = client_context(env.n2)
        if alpn == ALPN_JOIN:
            stream, _ = await open_tls_stream(served.addr, ctx, alpn)
            async with stream:  # join has no status frame: the refusal comes first
                refusal = await receive_message(stream)
            assert isinstance(refusal, LinkRefused)
            assert "revoked" in refusal.reason
            continue
        with pytest.raises(LinkRefusedError, match="is revoked.*meshctl node rm"):
            await open_tls_stream(served.addr, ctx, alpn)
    assert served.server.statistics().reasons["revoked"] == 4
    # other nodes are unaffected
    stream, _ = await open_tls_stream(served.addr, client_context(env.seed), ALPN_GOSSIP)
    await talk(stream, "seed")


async def test_revoking_a_serial_closes_the_links_already_open_both_ways(
    nursery: trio.Nursery, env: Env,
) -> None:
    server_denies, client_denies = DenySet(), DenySet()
    ended: list[str] = []

    async def hold(stream: SSLStreamT, peer: PeerInfo) -> None:
        try:
            await stream.send_all(b"hello")
            while await stream.receive_some(100):
                pass
        finally:
            ended.append(peer.node_id)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    addr = Addr("127.0.0.1", listeners[0].socket.getsockname()[1])
    server = TlsServer(server_context(env.seed), {ALPN_RAFT: hold}, revoked=server_denies)
    await nursery.start(server.serve, listeners)
    n2_serial = env.n2.load_cert().serial_number
    seed_serial = env.seed.load_cert().serial_number

    n2_link, _ = await open_tls_stream(addr, client_context(env.n2), ALPN_RAFT)
    seed_link, _ = await open_tls_stream(addr, client_context(env.seed), ALPN_RAFT)
    for link in (n2_link, seed_link):
        assert await link.receive_some(100) == b"hello"
    await trio.testing.wait_all_tasks_blocked()
    assert server_denies.open_links(n2_serial) == 1
    # The server revokes n2: its link is cut at once, the other one stays.
    assert await server_denies.revoke([n2_serial]) == {n2_serial}
    assert await n2_link.receive_some(100) == b""  # closed by the server
    await trio.testing.wait_all_tasks_blocked()
    assert ended == ["n2"]
    assert server_denies.open_links(seed_serial) == 1
    assert server_denies.links_closed == 1
    assert await server_denies.revoke([n2_serial]) == set()  # already revoked
    # A dialer that revokes the server's serial closes its own end of its links.
    dialed, _ = await open_tls_stream(addr, client_context(env.seed), ALPN_RAFT,
                                      revoked=client_denies)
    assert client_denies.open_links(seed_serial) == 1
    assert await client_denies.revoke([seed_serial]) == {seed_serial}
    assert dialed.closed
    assert client_denies.open_links(seed_serial) == 0
    with pytest.raises(LinkRefusedError, match="revoked"):
        await open_tls_stream(addr, client_context(env.n2), ALPN_RAFT, revoked=client_denies)
    await seed_link.aclose()
    await n2_link.aclose()


async def test_ca_signed_cert_without_meshd_role_refused(
    served: Served, env: Env, tmp_path: Path
) -> None:
    """Signed by our CA but not shaped by meshd (no OU): refused, server unaffected."""
    key = pki.generate_key()
    now = real_clock()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(env.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(env.ca.key, hashes.SHA256())
    )
    odd = TlsIdentity.node(tmp_path)
    odd.save(cert, key, env.ca.cert)
    with pytest.raises(LinkRefusedError, match="not usable"):
        await open_tls_stream(served.addr, client_context(odd), ALPN_GOSSIP)
    assert served.server.statistics().reasons == {"bad_cert": 1}
    stream, _ = await open_tls_stream(served.addr, client_context(env.n2), ALPN_GOSSIP)
    await talk(stream, "n2")


async def test_client_refuses_revoked_server(served: Served, env: Env) -> None:
    seed_serial = env.seed.load_cert().serial_number
    with pytest.raises(LinkRefusedError, match="revoked") as info:
        await open_tls_stream(
            served.addr, client_context(env.n2), ALPN_GOSSIP, revoked={seed_serial}
        )
    assert info.value.code == "revoked"


async def test_alpn_not_served_or_not_offered(nursery: trio.Nursery, env: Env) -> None:
    served = await start_server(nursery, env, alpns=(ALPN_GOSSIP,))
    with pytest.raises(LinkRefusedError, match="mesh-raft/1 is not served"):
        await open_tls_stream(served.addr, client_context(env.n2), ALPN_RAFT)
    ctx = client_context(env.n2)
    ctx.set_alpn_protocols(["h2"])
    stream = trio.SSLStream(await trio.open_tcp_stream(*served.addr), ctx)
    async with stream:
        await stream.do_handshake()
        refusal = await receive_message(stream)
    assert isinstance(refusal, LinkRefused)
    assert "no ALPN" in refusal.reason
    reasons = served.server.statistics().reasons
    assert reasons["not_served"] == 1
    assert reasons["no_alpn"] == 1


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(4096):
            data += chunk
    except trio.BrokenResourceError:
        pass  # a reset is a close too
    return data


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",  # a TLS record header with nonsense inside
        bytes(range(256)) * 4,
    ],
    ids=["http", "bad-tls-record", "binary"],
)
async def test_garbage_closes_connection_server_keeps_serving(
    served: Served, env: Env, garbage: bytes
) -> None:
    raw = await trio.open_tcp_stream(*served.addr)
    async with raw:
        await raw.send_all(garbage)
        reply = await read_until_closed(raw)
    assert b"hi" not in reply  # at most a TLS alert, never application data
    stats = served.server.statistics()
    assert stats.handshake_failures == 1
    assert stats.served == 0
    stream, _ = await open_tls_stream(served.addr, client_context(env.n2), ALPN_GOSSIP)
    await talk(stream, "n2")


async def test_handshake_timeout(
    nursery: trio.Nursery, env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    served = await start_server(nursery, env)
    raw = await trio.open_tcp_stream(*served.addr)
    start = trio.current_time()
    async with raw:
        assert await read_until_closed(raw) == b""
    assert trio.current_time() - start == pytest.approx(10.0)
    assert served.server.statistics().handshake_timeouts == 1


# -- join over TLS --------------------------------------------------------------------


async def test_join_then_use_the_new_certificate(served: Served, env: Env, tmp_path: Path) -> None:
    key = pki.generate_key()
    csr = pki.create_csr(key, "n5")
    result = await request_join(
        served.addr, env.token, csr, Addr("127.0.0.5", 7946), wall_clock=real_clock
    )
    assert result.node_id == "n5"
    assert result.gossip_keys == env.keyring.keys
    assert result.cluster_label == "test"
    save_join_result(tmp_path, key, result)
    assert load_cluster_label(tmp_path) == "test"
    assert load_keyring(tmp_path).keys == env.keyring.keys
    stream, peer = await open_tls_stream(
        served.addr, client_context(TlsIdentity.node(tmp_path)), ALPN_GOSSIP
    )
    assert peer.node_id == "seed"
    await talk(stream, "n5")
    issued = served.join.poll_issued()
    assert [i.name for i in issued] == ["n5"]


async def test_join_with_wrong_token_says_what_to_do(served: Served, env: Env) -> None:
    wrong = JoinToken(env.ca.fingerprint, b"\x00" * 32)
    csr = pki.create_csr(pki.generate_key(), "n6")
    with pytest.raises(
        StartupError, match=r"join token is wrong or was rotated.*meshctl token"
    ):
        await request_join(served.addr, wrong, csr, Addr("127.0.0.6", 7946), wall_clock=real_clock)
    assert served.join.statistics().rejected_token == 1


async def test_join_pins_the_ca(served: Served, env: Env) -> None:
    """A token for another cluster: refused by the joiner before it sends anything."""
    other = new_token(pki.create_ca("other", real_clock).fingerprint, lambda n: b"\x05" * n)
    csr = pki.create_csr(pki.generate_key(), "n6")
    with pytest.raises(StartupError, match="another cluster.*nothing was sent"):
        await request_join(served.addr, other, csr, Addr("127.0.0.6", 7946), wall_clock=real_clock)
    stats = served.join.statistics()
    assert stats.rejected_token == 0
    assert stats.joins_accepted == 0


async def test_join_on_a_node_without_ca_key(nursery: trio.Nursery, env: Env) -> None:
    served = await start_server(nursery, env, alpns=(ALPN_GOSSIP,))
    csr = pki.create_csr(pki.generate_key(), "n6")
    with pytest.raises(StartupError, match="no CA key"):
        await request_join(
            served.addr, env.token, csr, Addr("127.0.0.6", 7946), wall_clock=real_clock
        )


async def test_join_is_redirected_by_a_node_without_ca_key(nursery: trio.Nursery, env: Env
                                                          ) -> None:
    """A node without the CA key names the members that hold it; following the
    redirect to the real issuer then succeeds (CA pinning still applies there)."""
    issuer = await start_server(nursery, env)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    relay_addr = Addr("127.0.0.1", listeners[0].socket.getsockname()[1])
    relay = TlsServer(server_context(env.n2),
                      {ALPN_JOIN: redirect_join_handler(lambda: [issuer.addr]),
                       ALPN_GOSSIP: greet_then_echo})
    await nursery.start(relay.serve, listeners)
    csr = pki.create_csr(pki.generate_key(), "n7")
    with pytest.raises(JoinRedirected) as info:
        await request_join(relay_addr, env.token, csr, Addr("127.0.0.7", 7946),
                           wall_clock=real_clock)
    assert info.value.issuers == (str(issuer.addr),)
    result = await request_join(Addr.parse(info.value.issuers[0], 0), env.token, csr,
                                Addr("127.0.0.7", 7946), wall_clock=real_clock)
    assert result.node_id == "n7"


async def test_join_unreachable(env: Env) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    csr = pki.create_csr(pki.generate_key(), "n6")
    with pytest.raises(StartupError, match="cannot reach 127.0.0.1"):
        await request_join(
            Addr("127.0.0.1", port), env.token, csr, Addr("127.0.0.6", 7946), wall_clock=real_clock
        )


async def test_renewal_over_tls(served: Served, env: Env) -> None:
    old = env.n2.load_cert()
    key = pki.generate_key()
    result = await request_renewal(
        served.addr,
        env.n2,
        pki.create_csr(key, "n2"),
        Addr("127.0.0.2", 7946),
        wall_clock=real_clock,
    )
    assert result.node_id == "n2"
    assert result.cert.serial_number != old.serial_number
    assert served.join.poll_issued()[0].renewal
