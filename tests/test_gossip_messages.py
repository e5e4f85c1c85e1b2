"""Gossip messages: every message roundtrips; hostile bytes only raise
RemoteProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import RemoteProtocolError
from mesh.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
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

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=20).map(NodeId)
addrs = st.builds(Addr, st.sampled_from(["127.0.0.1", "10.0.0.7", "::1", "node-a.lan"]),
                  st.integers(1, 65535))
seqs = st.integers(0, 2**32 - 1)
incs = st.integers(0, 2**63 - 1)
metas = st.builds(
    Meta.build,
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4),
    st.integers(0, 64_000),
    st.integers(0, 2**40),
    st.sampled_from(["worker", "edge", ""]),
    st.dictionaries(st.text(min_size=1, max_size=8), st.integers(1, 65535), max_size=3),
)
messages = st.one_of(
    st.builds(Ping, seqs, names, names),
    st.builds(IndirectPing, seqs, names, addrs, st.booleans(), names),
    st.builds(Ack, seqs),
    st.builds(Nack, seqs),
    st.builds(Suspect, names, incs, names),
    st.builds(Alive, names, incs, addrs, metas),
    st.builds(Dead, names, incs, names),
)


@given(st.lists(messages, min_size=1, max_size=20))
def test_packet_roundtrip(msgs: list[object]) -> None:
    data = encode_packet([pack_message(m) for m in msgs])  # type: ignore[arg-type]
    assert decode_packet(data, 1 << 20) == msgs


@given(st.lists(st.builds(MemberState, names, addrs, incs, st.sampled_from(list(Status)),
                          metas), max_size=10), st.booleans(), st.booleans())
def test_push_pull_roundtrip(states: list[MemberState], join: bool, reply: bool) -> None:
    pp = PushPull(join, tuple(states), reply)
    assert PushPull.from_envelope(wire.decode(pp.encode(), 1 << 20)) == pp


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        decode_packet(data, 1400)
    except RemoteProtocolError:
        pass


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_mutated_packets_never_raise_anything_else(msgs: list[object], data: st.DataObject
                                                    ) -> None:
    raw = bytearray(encode_packet([pack_message(m) for m in msgs]))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        decode_packet(bytes(raw[:cut]), 1400)
    except RemoteProtocolError:
        pass


@given(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.booleans(),
                          st.lists(st.integers(0, 9), max_size=3)), max_size=8),
       st.integers(1, 7))
def test_well_formed_msgpack_with_wrong_fields_is_refused(fields: list[object], kind: int
                                                          ) -> None:
    data = wire.encode(1, [[kind, *fields]])
    try:
        decode_packet(data, 1400)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize("bad", [
    [[1, 5, "a"]],                       # ping with a missing field
    [[1, -1, "a", "b"]],                 # negative sequence number
    [[1, 5, "", "b"]],                   # empty name
    [[6, "a", 1, "h", 0, [{}, 0, 0, "", {}]]],   # port 0
    [[6, "a", 1, "h", 7946, [{"k": 1}, 0, 0, "", {}]]],  # label value not text
    [[99]],                              # unknown kind
    [],                                  # empty packet
    [[5, "a", 2**63, "b"]],              # incarnation out of range
])
def test_specific_malformed_packets(bad: list[object]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_packet(wire.encode(1, bad), 1400)


def test_wrong_envelope_type_on_gossip_port_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="unexpected message type"):
        decode_packet(wire.encode(80, [[3, 1]]), 1400)
