"""Unit tests of the SWIM core, driven directly (no trio, no simulator).

Cores are wired by hand, h11 ``ConnectionPair`` style: a test calls inputs, drains
``poll_outputs()`` and asserts on them.
"""

from __future__ import annotations

import random

import pytest

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.gossip.config import GossipConfig
from mesh.gossip.core import (
    HealthChanged,
    JoinFinished,
    MemberChanged,
    MemberReaped,
    Membership,
    Send,
    StreamSend,
)
from mesh.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    Meta,
    Nack,
    Ping,
    PushPull,
    Status,
    Suspect,
    decode_packet,
    encode_packet,
    pack_message,
)
from mesh.types import Addr, NodeId

CFG = GossipConfig.lan().with_(push_pull_interval_s=0, reconnect_interval_s=0)


def addr(name: str) -> Addr:
    return Addr(f"10.0.0.{int(name[1:]) + 1}", 7946)


def node(i: int) -> NodeId:
    return NodeId(f"n{i}")


def make(me: int, n: int, config: GossipConfig = CFG, seed: int = 1, now: float = 0.0
         ) -> Membership:
    """A core for node ``me`` that already knows ``n`` members (n0..n{n-1})."""
    core = Membership(config, node(me), addr(f"n{me}"), Meta(), random.Random(seed), now)
    core.load_members([MemberState(node(i), addr(f"n{i}"), 0, Status.ALIVE, Meta())
                       for i in range(n)], now)
    core.poll_outputs()
    return core


def packet(*msgs: Message) -> bytes:
    return encode_packet([pack_message(m) for m in msgs])


def sends(outputs: list[object]) -> list[tuple[Addr, list[Message]]]:
    return [(o.to, decode_packet(o.data, 1 << 16)) for o in outputs if isinstance(o, Send)]


def msgs_of(outputs: list[object], kind: type) -> list[tuple[Addr, Message]]:
    return [(to, m) for to, ms in sends(outputs) for m in ms if isinstance(m, kind)]


def run_until(core: Membership, t: float) -> list[object]:
    """Fire every timer up to ``t``; return all outputs."""
    out: list[object] = []
    while (d := core.next_deadline()) is not None and d <= t:
        core.handle_timeout(d)
        out += core.poll_outputs()
    return out


def status(core: Membership, i: int) -> Status:
    view = core.member(node(i))
    assert view is not None
    return view.status


# --- probing -------------------------------------------------------------------------


def test_probe_gets_ack_and_nothing_is_suspected() -> None:
    a, b = make(0, 2), make(1, 2)
    pings = msgs_of(run_until(a, CFG.probe_interval_s), Ping)
    assert [(to, m.target) for to, m in pings] == [(addr("n1"), node(1))]
    b.handle_packet(addr("n0"), packet(pings[0][1]), 0.5)
    acks = msgs_of(b.poll_outputs(), Ack)
    assert acks == [(addr("n0"), Ack(pings[0][1].seq))]
    a.handle_packet(addr("n1"), packet(acks[0][1]), 0.5)
    run_until(a, 2 * CFG.probe_interval_s)
    assert a.statistics().acks == 1
    assert status(a, 1) == Status.ALIVE


def test_ping_for_another_name_is_not_acked() -> None:
    b = make(1, 2)
    b.handle_packet(addr("n0"), packet(Ping(7, NodeId("someone-else"), node(0))), 0.1)
    assert msgs_of(b.poll_outputs(), Ack) == []


def test_missing_ack_leads_to_indirect_probes_then_suspicion() -> None:
    a = make(0, 5)
    out = run_until(a, 10.0 * CFG.probe_interval_s)
    first_ping = msgs_of(out, Ping)[0]
    target = first_ping[1].target
    indirect = [m for _, m in msgs_of(out, IndirectPing) if m.target == target]
    assert len(indirect) == CFG.indirect_checks
    assert all(m.want_nack and m.seq == first_ping[1].seq for m in indirect)
    changed = [o for o in out if isinstance(o, MemberChanged)]
    assert changed[0].member.node == target
    assert changed[0].member.status == Status.SUSPECT
    # The suspicion is gossiped with us as the accuser.
    assert (target, node(0)) in {(m.node, m.accuser) for _, m in msgs_of(out, Suspect)}


def first_probe(core: Membership) -> tuple[float, Ping, list[object]]:
    """Run timers until the first ping goes out; return (time, ping, outputs)."""
    while True:
        t = core.next_deadline()
        assert t is not None
        assert t < 10.0, "no probe within 10 s"
        core.handle_timeout(t)
        out = core.poll_outputs()
        pings = msgs_of(out, Ping)
        if pings:
            return t, pings[0][1], out


def test_missing_nacks_raise_local_health_and_stretch_the_probe_interval() -> None:
    a = make(0, 5)
    start, _, _ = first_probe(a)
    out = run_until(a, start + CFG.probe_interval_s)
    assert [o.score for o in out if isinstance(o, HealthChanged)] == [3]
    assert a.health_score == 3
    # The failed probe ends as the next one starts; that one runs (score + 1) = 4
    # intervals, so the third ping waits that long.
    second = start + CFG.probe_interval_s
    assert len(msgs_of(out, Ping)) == 1
    assert msgs_of(run_until(a, second + 4 * CFG.probe_interval_s - 0.001), Ping) == []
    assert msgs_of(run_until(a, second + 4 * CFG.probe_interval_s), Ping) != []


def test_nacks_from_helpers_keep_health_while_target_fails() -> None:
    a = make(0, 5)
    start, _, _ = first_probe(a)
    indirect = msgs_of(run_until(a, start + CFG.probe_timeout_s), IndirectPing)
    assert len(indirect) == 3
    for to, m in indirect:
        a.handle_packet(to, packet(Nack(m.seq)), start + CFG.probe_timeout_s + 0.01)
    run_until(a, start + CFG.probe_interval_s)
    assert a.health_score == 0
    assert a.statistics().nacks == 3


def test_indirect_ack_is_relayed_and_missing_ack_is_nacked() -> None:
    helper = make(1, 3)
    helper.handle_packet(addr("n0"), packet(IndirectPing(42, node(2), addr("n2"), True,
                                                         node(0))), 1.0)
    ping = msgs_of(helper.poll_outputs(), Ping)
    assert [(to, m.target) for to, m in ping] == [(addr("n2"), node(2))]
    helper.handle_packet(addr("n2"), packet(Ack(ping[0][1].seq)), 1.01)
    assert msgs_of(helper.poll_outputs(), Ack) == [(addr("n0"), Ack(42))]
    # Second request: the target stays silent, so the requester gets a nack.
    helper.handle_packet(addr("n0"), packet(IndirectPing(43, node(2), addr("n2"), True,
                                                         node(0))), 2.0)
    helper.poll_outputs()
    out = run_until(helper, 2.0 + CFG.probe_timeout_s)
    assert (addr("n0"), Nack(43)) in msgs_of(out, Nack)


def test_buddy_system_tells_the_suspect_directly() -> None:
    a = make(0, 2)
    a.handle_packet(addr("n1"), packet(Suspect(node(1), 0, node(5))), 0.0)
    a.poll_outputs()
    out = run_until(a, 2 * CFG.probe_interval_s)
    to_suspect = [ms for to, ms in sends(out) if to == addr("n1") and
                  any(isinstance(m, Ping) for m in ms)]
    assert to_suspect
    assert any(isinstance(m, Suspect) and m.node == node(1)
                              for m in to_suspect[0])


# --- suspicion, refutation, incarnations ----------------------------------------------


def test_suspicion_about_me_is_refuted_with_a_higher_incarnation() -> None:
    b = make(1, 3)
    b.handle_packet(addr("n0"), packet(Suspect(node(1), 4, node(0))), 1.0)
    assert b.incarnation == 5
    assert b.statistics().refutations == 1
    assert b.health_score == 1
    out = run_until(b, 1.0 + CFG.gossip_interval_s)
    alive = [m for _, m in msgs_of(out, Alive) if m.node == node(1)]
    assert alive
    assert alive[0].incarnation == 5


def test_stale_accusation_resends_the_refutation_without_bumping() -> None:
    b = make(1, 3)
    b.handle_packet(addr("n0"), packet(Suspect(node(1), 0, node(0))), 1.0)
    run_until(b, 5.0)  # the refutation's retransmissions are used up
    assert b.incarnation == 1
    b.handle_packet(addr("n2"), packet(Ping(9, node(1), node(2)), Suspect(node(1), 0, node(2))),
                    5.5)
    assert b.incarnation == 1
    reply = sends(b.poll_outputs())
    assert reply[0][0] == addr("n2")
    assert Ack(9) in reply[0][1]
    assert Alive(node(1), 1, addr("n1"), Meta()) in reply[0][1]


def test_incarnation_ordering_of_alive_suspect_dead() -> None:
    a = make(0, 3)
    a.handle_packet(addr("n2"), packet(Suspect(node(1), 3, node(2))), 1.0)
    assert status(a, 1) == Status.SUSPECT
    a.handle_packet(addr("n1"), packet(Alive(node(1), 3, addr("n1"), Meta())), 1.1)
    assert status(a, 1) == Status.SUSPECT           # equal incarnation does not refute
    a.handle_packet(addr("n1"), packet(Alive(node(1), 4, addr("n1"), Meta())), 1.2)
    assert status(a, 1) == Status.ALIVE
    a.handle_packet(addr("n2"), packet(Suspect(node(1), 3, node(2))), 1.3)
    assert status(a, 1) == Status.ALIVE             # old news
    a.handle_packet(addr("n2"), packet(Dead(node(1), 3, node(2))), 1.4)
    assert status(a, 1) == Status.ALIVE             # old news
    a.handle_packet(addr("n2"), packet(Dead(node(1), 4, node(2))), 1.5)
    assert status(a, 1) == Status.DEAD
    a.handle_packet(addr("n2"), packet(Alive(node(1), 4, addr("n1"), Meta())), 1.6)
    assert status(a, 1) == Status.DEAD              # a dead node needs a new incarnation
    a.handle_packet(addr("n1"), packet(Alive(node(1), 5, addr("n1"), Meta())), 1.7)
    assert status(a, 1) == Status.ALIVE


def test_suspicion_expires_at_max_without_confirmations_and_at_min_with_them() -> None:
    n = 10
    # A 100 s probe interval keeps probing out of the way; with N=10 the bounds are
    # min = 3 * log10(10) * 100 and max = 6 * min.
    lo, hi = 3 * 100.0, 18 * 100.0
    a = make(0, n, CFG.with_(probe_interval_s=100.0, probe_timeout_s=50.0))
    a.handle_packet(addr("n2"), packet(Suspect(node(1), 0, node(2))), 0.0)
    a.poll_outputs()
    a.handle_timeout(hi - 1.0)
    assert status(a, 1) == Status.SUSPECT
    a.handle_timeout(hi)
    assert status(a, 1) == Status.DEAD
    assert a.statistics().deaths == 1

    b = make(0, n, CFG.with_(probe_interval_s=100.0, probe_timeout_s=50.0))
    b.handle_packet(addr("n2"), packet(Suspect(node(1), 0, node(2))), 0.0)
    b.handle_packet(addr("n3"), packet(Suspect(node(1), 0, node(3))), 0.1)
    b.handle_timeout(lo - 0.01)
    assert status(b, 1) == Status.SUSPECT
    b.handle_timeout(lo)
    assert status(b, 1) == Status.DEAD


def test_push_pull_suspect_state_is_not_an_independent_confirmation() -> None:
    cfg = CFG.with_(probe_interval_s=100.0, probe_timeout_s=50.0)
    a = make(0, 10, cfg)
    a.handle_packet(addr("n2"), packet(Suspect(node(1), 0, node(2))), 0.0)
    remote = PushPull(False, (MemberState(node(1), addr("n1"), 0, Status.SUSPECT, Meta()),))
    a.handle_stream(addr("n5"), remote.encode(), 1.0)
    a.handle_timeout(3 * 100.0)
    assert status(a, 1) == Status.SUSPECT  # still waiting for a real confirmation


def test_remote_dead_state_is_merged_as_a_suspicion() -> None:
    a = make(0, 3)
    remote = PushPull(False, (MemberState(node(1), addr("n1"), 0, Status.DEAD, Meta()),))
    a.handle_stream(addr("n2"), remote.encode(), 1.0)
    assert status(a, 1) == Status.SUSPECT


def test_leave_is_gossiped_and_marks_left() -> None:
    b = make(1, 3)
    b.leave(1.0)
    direct = msgs_of(b.poll_outputs(), Dead)
    assert {to for to, _ in direct} == {addr("n0"), addr("n2")}
    assert all(m.is_leave for _, m in direct)
    a = make(0, 3)
    a.handle_packet(addr("n1"), packet(direct[0][1]), 1.1)
    assert status(a, 1) == Status.LEFT
    # A leaving node neither probes nor refutes.
    assert msgs_of(run_until(b, 5.0), Ping) == []
    b.handle_packet(addr("n0"), packet(Ping(3, node(1), node(0))), 5.1)
    assert msgs_of(b.poll_outputs(), Ack) == []


def test_update_meta_bumps_incarnation_and_spreads() -> None:
    b = make(1, 3)
    new = Meta.build({"zone": "b"}, 2000, 1 << 30)
    b.update_meta(new, 1.0)
    assert b.incarnation == 1
    a = make(0, 3)
    for _, m in msgs_of(run_until(b, 1.0 + CFG.gossip_interval_s), Alive):
        a.handle_packet(addr("n1"), packet(m), 1.2)
    view = a.member(node(1))
    assert view is not None
    assert view.meta.labels_dict == {"zone": "b"}
    changes = [o for o in a.poll_outputs() if isinstance(o, MemberChanged)]
    assert changes
    assert changes[0].previous == Status.ALIVE


# --- addresses, reaping, joining --------------------------------------------------


def test_address_conflict_is_refused_until_the_old_owner_is_dead_long_enough() -> None:
    a = make(0, 3)
    other = Addr("10.9.9.9", 7946)
    a.handle_packet(other, packet(Alive(node(1), 9, other, Meta())), 1.0)
    view = a.member(node(1))
    assert view is not None
    assert view.addr == addr("n1")
    assert a.statistics().address_conflicts == 1
    a.handle_packet(addr("n2"), packet(Dead(node(1), 0, node(2))), 2.0)
    a.handle_packet(other, packet(Alive(node(1), 9, other, Meta())), 2.0 + 1.0)
    assert status(a, 1) == Status.DEAD
    a.handle_packet(other, packet(Alive(node(1), 9, other, Meta())),
                    2.0 + CFG.dead_node_reclaim_s)
    view = a.member(node(1))
    assert view is not None
    assert view.addr == other
    assert view.status == Status.ALIVE


def test_dead_members_are_reaped() -> None:
    a = make(0, 3)
    a.handle_packet(addr("n2"), packet(Dead(node(1), 0, node(2))), 1.0)
    a.poll_outputs()
    out = run_until(a, 1.0 + CFG.dead_reap_s + 1.5)
    assert MemberReaped(node(1)) in out
    assert a.member(node(1)) is None


def test_join_reports_which_seeds_answered() -> None:
    joiner = Membership(CFG, node(5), addr("n5"), Meta(), random.Random(3), 0.0)
    joiner.join([addr("n0"), addr("n1")], 0.0)
    reqs = [o for o in joiner.poll_outputs() if isinstance(o, StreamSend)]
    assert [r.to for r in reqs] == [addr("n0"), addr("n1")]
    seed = make(0, 2)
    reply = seed.handle_stream(addr("n5"), reqs[0].data, 0.01)
    assert seed.member(node(5)) is not None  # the seed learned the joiner
    joiner.handle_stream_reply(reqs[0].request_id, reply, 0.02)
    joiner.handle_stream_failed(reqs[1].request_id, "connection refused", 0.03)
    finished = [o for o in joiner.poll_outputs() if isinstance(o, JoinFinished)]
    assert finished == [JoinFinished((addr("n0"),), ((addr("n1"), "connection refused"),))]
    assert {m.node for m in joiner.members()} == {node(0), node(1), node(5)}


def test_join_without_seeds_is_a_local_error() -> None:
    core = make(0, 1)
    with pytest.raises(LocalProtocolError):
        core.join([], 0.0)


def test_restarted_node_learns_its_old_incarnation_and_refutes_its_death() -> None:
    seed = make(0, 3)
    seed.handle_packet(addr("n2"), packet(Dead(node(1), 7, node(2))), 1.0)
    reborn = Membership(CFG, node(1), addr("n1"), Meta(), random.Random(4), 50.0)
    reborn.join([addr("n0")], 50.0)
    req = next(o for o in reborn.poll_outputs() if isinstance(o, StreamSend))
    reply = seed.handle_stream(addr("n1"), req.data, 50.01)
    reborn.handle_stream_reply(req.request_id, reply, 50.02)
    assert reborn.incarnation == 8
    for _, m in msgs_of(run_until(reborn, 50.0 + CFG.gossip_interval_s), Alive):
        seed.handle_packet(addr("n1"), packet(m), 50.2)
    assert status(seed, 1) == Status.ALIVE


# --- hostile input and determinism ----------------------------------------------------


def test_malformed_packet_is_counted_and_nothing_in_it_applies() -> None:
    a = make(0, 3)
    good = pack_message(Dead(node(1), 0, node(2)))
    bad = wire.pack_body([3, "not a seq"])
    with pytest.raises(RemoteProtocolError):
        a.handle_packet(addr("n2"), encode_packet([good, bad]), 1.0)
    assert status(a, 1) == Status.ALIVE
    assert a.statistics().malformed == 1
    with pytest.raises(RemoteProtocolError):
        a.handle_stream(addr("n2"), b"\x01\x00\x02garbage", 1.0)
    assert a.statistics().malformed == 2


def test_same_seed_same_outputs() -> None:
    def trace(seed: int) -> list[bytes]:
        core = make(0, 8, seed=seed)
        out = run_until(core, 20.0)
        return [o.data for o in out if isinstance(o, Send)]

    assert trace(5) == trace(5)
    assert trace(5) != trace(6)
