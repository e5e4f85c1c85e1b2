"""The envelope and TCP framing: roundtrips, limits and hostile input."""

from __future__ import annotations

import threading

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError

bodies = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=5),
    max_leaves=20,
)


@given(st.integers(1, 255), bodies)
def test_encode_decode_roundtrip(msg_type: int, body: object) -> None:
    env = wire.decode(wire.encode(msg_type, body))
    assert (env.major, env.msg_type, env.body) == (wire.PROTOCOL_MAJOR, msg_type, body)


@given(st.binary(max_size=200))
def test_decode_random_bytes_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except RemoteProtocolError:
        pass


def test_other_major_version_is_refused_with_both_versions_named() -> None:
    data = bytearray(wire.encode(5, [1]))
    data[0] = wire.PROTOCOL_MAJOR + 1
    with pytest.raises(RemoteProtocolError, match=r"peer speaks protocol 2\.0, we speak 1\.0"):
        wire.decode(bytes(data))


def test_other_minor_version_is_accepted() -> None:
    data = bytearray(wire.encode(5, [1]))
    data[1] = 7
    assert wire.decode(bytes(data)).minor == 7


def test_trailing_bytes_and_oversize_are_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode(wire.encode(5, [1]) + b"\x00")
    with pytest.raises(RemoteProtocolError, match="exceeds limit"):
        wire.decode(wire.encode(5, "x" * 100), max_bytes=50)


def test_type_zero_is_reserved() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode(0, [])
    with pytest.raises(RemoteProtocolError):
        wire.decode(bytes((wire.PROTOCOL_MAJOR, 0, 0, 0x90)))


@given(st.lists(bodies, min_size=1, max_size=5), st.integers(1, 7))
def test_frame_decoder_reassembles_any_chunking(items: list[object], chunk: int) -> None:
    stream = b"".join(wire.frame(wire.encode(9, item)) for item in items)
    dec = wire.FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        dec.receive_data(stream[i:i + chunk])
        while not isinstance(env := dec.next_frame(), wire.NeedData):
            out.append(env.body)
    assert out == items
    assert dec.buffered_bytes == 0


def test_frame_decoder_refuses_oversized_length_before_buffering_body() -> None:
    dec = wire.FrameDecoder(max_frame_bytes=100)
    dec.receive_data((10_000).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="exceeds limit 100"):
        dec.next_frame()


@given(st.integers(1, 255), bodies)
def test_frame_encoder_gives_the_bytes_of_frame_and_encode(msg_type: int, body: object) -> None:
    encoder = wire.FrameEncoder()
    expected = wire.frame(wire.encode(msg_type, body))
    assert encoder.encode(msg_type, body) == expected
    assert encoder.encode(msg_type, body) == expected  # the packer starts afresh


def test_frame_encoder_refuses_what_frame_and_encode_refuse() -> None:
    encoder = wire.FrameEncoder(max_frame_bytes=50)
    with pytest.raises(LocalProtocolError, match="out of range"):
        encoder.encode(0, [])
    with pytest.raises(LocalProtocolError, match="exceeds limit 50"):
        encoder.encode(5, "x" * 100)
    with pytest.raises(TypeError):
        encoder.encode(5, [object()])
    assert encoder.encode(5, [1]) == wire.frame(wire.encode(5, [1]))  # still usable


def test_frame_encoder_after_a_body_bigger_than_the_buffer_it_keeps() -> None:
    encoder = wire.FrameEncoder()
    big = [b"x" * (wire.FrameEncoder.KEPT_BUFFER_BYTES + 1)]
    for body in (big, [1], big, {"k": "v"}):
        assert encoder.encode(7, body) == wire.frame(wire.encode(7, body))


@given(st.binary(max_size=200))
def test_decode_tagged_agrees_with_decode(data: bytes) -> None:
    try:
        env = wire.decode(data)
        expected: object = (env.msg_type, env.body)
    except RemoteProtocolError as exc:
        expected = str(exc)  # the same message, for the same log line
    try:
        got: object = wire.decode_tagged(data)
    except RemoteProtocolError as exc:
        got = str(exc)
    assert got == expected


@given(st.lists(bodies, min_size=1, max_size=5), st.integers(1, 40))
def test_next_payloads_returns_what_next_payload_returns(items: list[object], chunk: int
                                                         ) -> None:
    stream = b"".join(wire.frame(wire.encode(9, item)) for item in items)
    one, many = wire.FrameDecoder(), wire.FrameDecoder()
    by_one: list[bytes] = []
    by_many: list[bytes] = []
    for i in range(0, len(stream), chunk):
        one.receive_data(stream[i:i + chunk])
        many.receive_data(stream[i:i + chunk])
        while isinstance(payload := one.next_payload(), bytes):
            by_one.append(payload)
        by_many += many.next_payloads()
        assert by_many == by_one
        assert many.buffered_bytes == one.buffered_bytes
    assert [wire.decode(p).body for p in by_many] == items


def test_next_payloads_returns_the_frames_before_an_oversized_one_then_refuses() -> None:
    dec = wire.FrameDecoder(max_frame_bytes=100)
    good = wire.frame(wire.encode(9, [1]))
    dec.receive_data(good + good + (10_000).to_bytes(4, "big") + good)
    assert dec.next_payloads() == [good[4:], good[4:]]
    with pytest.raises(RemoteProtocolError, match="exceeds limit 100"):
        dec.next_payloads()
    assert wire.FrameDecoder().next_payloads() == []


@given(bodies)
def test_pack_body_is_msgpack_packb(body: object) -> None:
    assert wire.pack_body(body) == msgpack.packb(body, use_bin_type=True)


def test_pack_body_keeps_one_packer_per_thread() -> None:
    big = [b"x" * (wire.FrameEncoder.KEPT_BUFFER_BYTES + 1)]
    results: dict[int, list[bytes]] = {}

    def pack_many(n: int) -> None:
        results[n] = [wire.pack_body([n, i, big if i % 50 == 0 else b"v"]) for i in range(500)]

    threads = [threading.Thread(target=pack_many, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, packed in results.items():
        assert [wire.unpack_body(p, 1 << 20) for p in packed] == [
            [n, i, big if i % 50 == 0 else b"v"] for i in range(500)]
