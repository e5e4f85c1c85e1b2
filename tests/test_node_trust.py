"""The node's trust life cycle, in process over real TLS on 127.0.0.1: a first node
bootstraps, a second joins with the token and later renews its certificate through the
member that announces the CA (the ``join`` port in its gossip metadata)."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from mesh import tls
from mesh.gossip.config import GossipConfig
from mesh.gossip.core import Membership
from mesh.gossip.messages import MemberState, Meta, Status
from mesh.node import trust
from mesh.node.config import NodeConfig
from mesh.types import Addr, NodeId


def node_config(data_dir: Path, name: str, addr: Addr, join: tuple[Addr, ...] = ()
                ) -> NodeConfig:
    return NodeConfig(data_dir=data_dir, name=NodeId(name), bind=addr, advertise=addr,
                      join=join)


async def test_join_then_renew_through_the_ca_member(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ca_addr = Addr("127.0.0.1", listeners[0].socket.getsockname()[1])
    first = await trust.establish(node_config(tmp_path / "a", "a", ca_addr), None,
                                  trust.utc_now, "test")
    assert first.created_cluster
    assert first.join_server is not None
    presented: list[int] = []
    seen = trio.Event()

    async def record(stream: tls.SSLStreamT, peer: tls.PeerInfo) -> None:
        assert peer.identity is not None
        presented.append(peer.identity.serial)
        seen.set()
        await stream.aclose()

    server = tls.TlsServer(first.server_ctx,
                           {tls.ALPN_JOIN: tls.join_handler(first.join_server),
                            tls.ALPN_GOSSIP: record})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        b_config = node_config(tmp_path / "b", "b", Addr("127.0.0.2", 7946), join=(ca_addr,))
        second = await trust.establish(b_config, first.join_server.token, trust.utc_now,
                                       "ignored")
        assert not second.created_cluster
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
