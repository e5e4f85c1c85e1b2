"""The node's trust life cycle, in process over real TLS on 127.0.0.1: a first node
bootstraps, a second joins with the token and later renews its certificate through the
member that announces the CA (the ``join`` port in its gossip metadata). A joiner that
a node refuses for too many join attempts waits the advised delay and tries again."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509

from mesh import tls
from mesh.errors import StartupError
from mesh.gossip.config import GossipConfig
from mesh.gossip.core import Membership
from mesh.gossip.keyring import Keyring
from mesh.gossip.messages import MemberState, Meta, Status
from mesh.node import trust
from mesh.node.config import NodeConfig
from mesh.node.metrics import render
from mesh.raft.state import CaSet, ClusterCa, Result, ResultCode, TokenSet
from mesh.raft.vault import Vault
from mesh.security import pki
from mesh.security.join import JoinClient, JoinRateLimited, JoinResult, JoinServer
from mesh.security.messages import JoinRequest
from mesh.security.ratelimit import JoinLimits
from mesh.security.token import JoinToken, new_token
from mesh.types import Addr, NodeId


def node_config(data_dir: Path, name: str, addr: Addr, join: tuple[Addr, ...] = ()
                ) -> NodeConfig:
    return NodeConfig(data_dir=data_dir, name=NodeId(name), bind=addr, advertise=addr,
                      join=join)


def file_join_server(credentials: trust.Trust) -> JoinServer:
    """The join server of the node that created the cluster, before Raft records
    its CA."""
    server = trust.Issuing(credentials, NodeId("a"), trust.utc_now).decide(
        ClusterCa(), Vault(), voter=False)
    assert server is not None
    return server


async def test_join_then_renew_through_the_ca_member(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ca_addr = Addr("127.0.0.1", listeners[0].socket.getsockname()[1])
    first = await trust.establish(node_config(tmp_path / "a", "a", ca_addr), None,
                                  trust.utc_now, "test")
    assert first.created_cluster
    join_server = file_join_server(first)
    presented: list[int] = []
    seen = trio.Event()

    async def record(stream: tls.SSLStreamT, peer: tls.PeerInfo) -> None:
        assert peer.identity is not None
        presented.append(peer.identity.serial)
        seen.set()
        await stream.aclose()

    server = tls.TlsServer(first.server_ctx,
                           {tls.ALPN_JOIN: tls.join_handler(join_server),
                            tls.ALPN_GOSSIP: record})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        b_config = node_config(tmp_path / "b", "b", Addr("127.0.0.2", 7946), join=(ca_addr,))
        second = await trust.establish(b_config, join_server.token, trust.utc_now,
                                       "ignored")
        assert not second.created_cluster
        assert second.file_ca is None
        assert second.join_server is None
        old = second.identity.load_cert()

        core = Membership(GossipConfig.local(), NodeId("b"), b_config.advertise, Meta(),
                          random.Random(1), 0.0)
        core.load_members([MemberState(NodeId("a"), ca_addr, 0, Status.ALIVE,
                                       Meta.build(ports={trust.JOIN_PORT_NAME: ca_addr.port}))],
                          0.0)
        assert trust.issuers(core) == [ca_addr]
        assert await trust._renew_once(second, core, b_config, trust.utc_now)
        new = second.identity.load_cert()
        assert new.serial_number != old.serial_number
        assert new.subject == old.subject
        # The live contexts now present the new certificate on new links.
        stream, _ = await tls.open_tls_stream(ca_addr, second.client_ctx, tls.ALPN_GOSSIP)
        with trio.fail_after(5):
            await seen.wait()
        await stream.aclose()
        assert presented == [new.serial_number]
        nursery.cancel_scope.cancel()


async def test_renewal_without_a_ca_member_fails_and_keeps_the_certificate(
        tmp_path: Path) -> None:
    addr = Addr("127.0.0.1", 7946)
    alone = await trust.establish(node_config(tmp_path / "a", "a", addr), None,
                                  trust.utc_now, "test")
    core = Membership(GossipConfig.local(), NodeId("a"), addr, Meta(), random.Random(1), 0.0)
    before = alone.identity.load_cert()
    assert not await trust._renew_once(alone, core, node_config(tmp_path / "a", "a", addr),
                                       trust.utc_now)
    assert alone.identity.load_cert().serial_number == before.serial_number


# -- rate limits on joins -----------------------------------------------------------------


CA = pki.create_ca("test", trust.utc_now)
TOKEN = new_token(CA.fingerprint, os.urandom)


class LimitedSeed:
    """A CA-holding node as a join requester (:class:`trust.JoinRequester`), in
    memory: the real join core and its rate limits on trio's clock, the real join
    client. Every joiner appears to come from one address (a NAT)."""

    SOURCE = "192.0.2.1"

    def __init__(self, limits: JoinLimits) -> None:
        self.token = TOKEN
        self.server = JoinServer(CA, TOKEN, Keyring([b"\x11" * 32]), trust.utc_now,
                                 limits=limits, node="seed")
        cert = pki.issue_node_certificate(
            CA, pki.create_csr(pki.generate_key(), "seed"), "seed", "10.0.0.1", trust.utc_now)
        self.tls_der = pki.cert_to_der(cert)
        self.calls: list[float] = []

    async def __call__(self, addr: Addr, token: JoinToken, csr: x509.CertificateSigningRequest,
                       advertise: Addr, *, wall_clock: pki.WallClock) -> JoinResult:
        now = trio.current_time()
        self.calls.append(now)
        client = JoinClient.for_token(token, csr, advertise, wall_clock)
        refusal = self.server.admit(self.SOURCE, now)
        if refusal is not None:
            client.handle_challenge(refusal, self.tls_der, b"")  # raises JoinRateLimited
        challenge = self.server.challenge(os.urandom(32))
        request = client.handle_challenge(challenge, self.tls_der, b"")
        assert isinstance(request, JoinRequest)
        reply = self.server.handle_request(request, challenge=challenge, tls_binding=b"",
                                           peer=None, source=self.SOURCE, now=now)
        return client.handle_reply(reply)


ONE_PER_4S = JoinLimits(source_burst=1, source_rate_per_s=0.25)


async def test_joiner_retries_after_the_advised_delay(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    seed = LimitedSeed(ONE_PER_4S)
    start = trio.current_time()
    assert seed.server.admit(LimitedSeed.SOURCE, start) is None  # another node just joined
    config = node_config(tmp_path / "b", "b", Addr("10.0.0.2", 7946),
                         join=(Addr("10.0.0.1", 7946),))
    await trust._join_with_token(config, seed.token, trust.utc_now, seed)
    assert tls.TlsIdentity.node(config.data_dir).exists()
    # refused at once with 4 s to wait; back after 4 s plus this node's jitter
    jitter = random.Random("join-retry:b").random()
    assert [t - start for t in seed.calls] == [0.0, 4.0 * (1 + trust.RATE_LIMIT_JITTER * jitter)]
    assert seed.server.statistics().limiter.refused_source == 1
    assert seed.server.statistics().joins_accepted == 1


ONE_PER_HOUR = JoinLimits(source_burst=1, source_rate_per_s=1 / 3600)


async def test_joiner_gives_up_on_a_node_that_keeps_refusing(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    slow = LimitedSeed(ONE_PER_HOUR)
    slow.server.admit(LimitedSeed.SOURCE, trio.current_time())
    start = trio.current_time()
    config = node_config(tmp_path / "b", "b", Addr("10.0.0.2", 7946),
                         join=(Addr("10.0.0.1", 7946),))
    with pytest.raises(StartupError) as raised:
        await trust._join_with_token(config, slow.token, trust.utc_now, slow)
    message = str(raised.value)
    assert "join via 10.0.0.1:7946 refused: too many join attempts from 192.0.2.1" in message
    assert "--join through another member" in message
    # each advised hour was cut to MAX_RATE_LIMIT_WAIT_S (plus jitter), and the waits
    # stayed within the patience
    gaps = [b - a for a, b in itertools.pairwise(slow.calls)]
    assert len(gaps) >= 2
    assert all(trust.MAX_RATE_LIMIT_WAIT_S <= g
               <= trust.MAX_RATE_LIMIT_WAIT_S * (1 + trust.RATE_LIMIT_JITTER) for g in gaps)
    assert trio.current_time() - start <= trust.JOIN_RATE_LIMIT_PATIENCE_S
    assert not tls.TlsIdentity.node(config.data_dir).exists()


async def test_joiner_moves_on_to_the_next_join_address(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The patience is shared by every address tried, but running out of it on one
    node only ends the waiting there: the next address is tried at once."""
    slow, quick = LimitedSeed(ONE_PER_HOUR), LimitedSeed(ONE_PER_4S)
    slow.server.admit(LimitedSeed.SOURCE, trio.current_time())
    seeds = {Addr("10.0.0.1", 7946): slow, Addr("10.0.0.9", 7946): quick}

    async def route(addr: Addr, token: JoinToken, csr: x509.CertificateSigningRequest,
                    advertise: Addr, *, wall_clock: pki.WallClock) -> JoinResult:
        return await seeds[addr](addr, token, csr, advertise, wall_clock=wall_clock)

    config = node_config(tmp_path / "b", "b", Addr("10.0.0.2", 7946), join=tuple(seeds))
    await trust._join_with_token(config, TOKEN, trust.utc_now, route)
    assert tls.TlsIdentity.node(config.data_dir).exists()
    assert len(slow.calls) >= 3
    assert quick.calls == [slow.calls[-1]]


async def test_rate_limited_join_over_tls_says_when_to_retry(tmp_path: Path) -> None:
    """The real listener and dialer: a second join from the same address within the
    limit is refused with the reason and the delay, before any proof is checked."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ca_addr = Addr("127.0.0.1", listeners[0].socket.getsockname()[1])
    first = await trust.establish(node_config(tmp_path / "a", "a", ca_addr), None,
                                  trust.utc_now, "test")
    ca = tls.load_ca(first.data_dir)
    assert ca is not None
    server = JoinServer(ca, file_join_server(first).token, first.keyring, trust.utc_now,
                        limits=JoinLimits(source_burst=1, source_rate_per_s=1 / 3600))
    tls_server = tls.TlsServer(first.server_ctx, {tls.ALPN_JOIN: tls.join_handler(server)})
    async with trio.open_nursery() as nursery:
        await nursery.start(tls_server.serve, listeners)
        csr = pki.create_csr(pki.generate_key(), "b")
        result = await tls.request_join(ca_addr, server.token, csr, Addr("127.0.0.2", 7946),
                                        wall_clock=trust.utc_now)
        assert result.node_id == "b"
        csr = pki.create_csr(pki.generate_key(), "c")
        with pytest.raises(JoinRateLimited) as raised:
            await tls.request_join(ca_addr, server.token, csr, Addr("127.0.0.3", 7946),
                                   wall_clock=trust.utc_now)
        assert str(raised.value).startswith("too many join attempts from 127.0.0.1; retry in ")
        assert 3500 < raised.value.retry_in_s <= 3600
        nursery.cancel_scope.cancel()
    text = render(trust.join_metrics(server), {})
    assert "meshd_join_attempts_total 2" in text
    assert 'meshd_join_rate_limited_total{scope="source"} 1' in text
    assert 'meshd_join_rate_limited_total{scope="global"} 0' in text
    assert "meshd_join_accepted_total 1" in text
    assert "meshd_join_failed_proofs_total 0" in text


# -- who issues: Issuing ------------------------------------------------------------------


def _vault_of(ca: pki.CertificateAuthority, secret: bytes, index: int = 1) -> Vault:
    vault = Vault()
    ok = Result(ResultCode.OK, index, index)
    vault.take(CaSet(pki.cert_to_pem(ca.cert), pki.key_to_pem(ca.key)), ok)
    vault.take(TokenSet(secret), ok)
    return vault


def _record(ca: pki.CertificateAuthority, token_index: int = 2) -> ClusterCa:
    return ClusterCa(pki.cert_to_pem(ca.cert), 1, token_index)


async def test_issuing_follows_the_file_ca_until_raft_records_ca_and_token(
        tmp_path: Path) -> None:
    first = await trust.establish(node_config(tmp_path / "a", "a", Addr("127.0.0.1", 7946)),
                                  None, trust.utc_now, "test")
    assert first.file_ca is not None
    ca, file_token = first.file_ca
    issuing = trust.Issuing(first, NodeId("a"), trust.utc_now)
    before = issuing.decide(ClusterCa(), Vault(), voter=False)
    assert before is not None
    assert before.token == file_token
    # The CA is recorded, the token not yet: still the files (even as a watcher).
    assert issuing.decide(_record(ca, token_index=0), Vault(), voter=False) is before
    # Both recorded: only a voter whose vault holds them issues, with the same
    # server (its rate limits and counters last), the token the vault holds.
    secret = bytes(range(32))
    vault = _vault_of(ca, secret)
    assert issuing.decide(_record(ca), vault, voter=False) is None
    assert issuing.decide(_record(ca), Vault(), voter=True) is None
    after = issuing.decide(_record(ca), vault, voter=True)
    assert after is before
    assert after.token == JoinToken(ca.fingerprint, secret)
    # A rotation through Raft rotates the server.
    vault.take(TokenSet(bytes(32)), Result(ResultCode.OK, 9, 9))
    assert issuing.decide(_record(ca, 9), vault, voter=True) is before
    assert before.token == JoinToken(ca.fingerprint, bytes(32))


async def test_a_voter_without_ca_files_issues_from_its_vault(tmp_path: Path) -> None:
    first = await trust.establish(node_config(tmp_path / "a", "a", Addr("127.0.0.1", 7946)),
                                  None, trust.utc_now, "test")
    assert first.file_ca is not None
    ca = first.file_ca[0]
    other = trust.Trust(**{**{f: getattr(first, f) for f in trust.Trust.__dataclass_fields__},
                           "file_ca": None})
    issuing = trust.Issuing(other, NodeId("b"), trust.utc_now)
    assert issuing.decide(ClusterCa(), Vault(), voter=True) is None
    server = issuing.decide(_record(ca), _vault_of(ca, bytes(32)), voter=True)
    assert server is not None
    # It signs with the recorded CA: a joiner pinning the token's fingerprint
    # accepts what it issues.
    csr = pki.create_csr(pki.generate_key(), "c")
    client = JoinClient.for_token(server.token, csr, Addr("127.0.0.3", 7946), trust.utc_now)
    challenge = server.challenge(b"n" * 32)
    server_cert = pki.cert_to_der(first.identity.load_cert())
    request = client.handle_challenge(challenge, server_cert, b"binding")
    reply = server.handle_request(request, challenge=challenge, tls_binding=b"binding",
                                  peer=None, source="127.0.0.3", now=0.0)
    assert client.handle_reply(reply).node_id == "c"


async def test_a_vault_key_that_does_not_match_the_certificate_is_not_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = await trust.establish(node_config(tmp_path / "a", "a", Addr("127.0.0.1", 7946)),
                                  None, trust.utc_now, "test")
    assert first.file_ca is not None
    ca = first.file_ca[0]
    stranger = pki.generate_key()
    vault = Vault()
    ok = Result(ResultCode.OK, 1, 1)
    vault.take(CaSet(pki.cert_to_pem(ca.cert), pki.key_to_pem(stranger)), ok)
    vault.take(TokenSet(bytes(32)), ok)
    issuing = trust.Issuing(first, NodeId("a"), trust.utc_now)
    for _ in range(2):
        assert issuing.decide(_record(ca), vault, voter=True) is None
    assert sum("ca_material_unusable" in r.getMessage() for r in caplog.records) == 1


def test_below_state_level_names_members_that_would_not_understand() -> None:
    core = Membership(GossipConfig.local(), NodeId("a"), Addr("127.0.0.1", 7946),
                      Meta.build({"meshd.state": "2"}), random.Random(1), 0.0)

    def member(name: str, status: Status, labels: dict[str, str]) -> MemberState:
        return MemberState(NodeId(name), Addr(f"127.0.0.{ord(name[0]) - 90}", 7946), 1,
                           status, Meta.build(labels))

    core.load_members([member("b", Status.ALIVE, {"meshd.state": "1"}),
                       member("c", Status.ALIVE, {}),
                       member("d", Status.DEAD, {"meshd.state": "2"}),
                       member("f", Status.ALIVE, {"meshd.state": "3"}),
                       member("g", Status.ALIVE, {"meshd.state": "x"})], 0.0)
    names = ["a", "b", "c", "d", "e", "f", "g"]
    assert trust.below_state_level(names, core, 2) == ["b", "c", "d", "e", "g"]
    assert trust.below_state_level(["a", "f"], core, 2) == []


async def test_the_first_node_records_its_own_and_the_admin_certificate(tmp_path: Path) -> None:
    first = await trust.establish(node_config(tmp_path / "a", "a", Addr("127.0.0.1", 7946)),
                                  None, trust.utc_now, "test")
    admin = tls.TlsIdentity.admin(tmp_path / "a" / tls.ADMIN_DIR).load_cert()
    assert first.issued.items() == sorted([
        ("a", first.identity.load_cert().serial_number), ("admin", admin.serial_number)])
    # A restart records nothing again.
    again = await trust.establish(node_config(tmp_path / "a", "a", Addr("127.0.0.1", 7946)),
                                  None, trust.utc_now, "test")
    assert again.issued.items() == first.issued.items()
