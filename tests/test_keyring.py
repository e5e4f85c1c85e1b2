"""The gossip key ring: sealing, opening, rotation, replay window, persistence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError, StorageError
from mesh.gossip.keyring import (
    MAX_KEYS,
    OVERHEAD_BYTES,
    SEAL_VERSION,
    Keyring,
    KeyringCodec,
    decode_key,
    encode_key,
    key_id,
)

K1, K2, K3 = bytes(range(32)), bytes(range(1, 33)), b"\xff" * 32
LABEL = b"prod"
NONCE = b"\x07" * 12
NOW = 1_900_000_000.0

keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=12, max_size=12)


@given(plaintext=st.binary(max_size=1500), label=st.binary(max_size=64), nonce=nonces)
def test_roundtrip(plaintext: bytes, label: bytes, nonce: bytes) -> None:
    ring = Keyring([K1])
    sealed = ring.seal(plaintext, label, nonce, NOW)
    assert len(sealed) == len(plaintext) + OVERHEAD_BYTES
    assert sealed[0] == SEAL_VERSION
    assert ring.open(sealed, label, NOW + 1) == plaintext


@given(plaintext=st.binary(max_size=200), data=st.data())
def test_any_flipped_bit_is_refused(plaintext: bytes, data: st.DataObject) -> None:
    ring = Keyring([K1])
    sealed = bytearray(ring.seal(plaintext, LABEL, NONCE, NOW))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RemoteProtocolError):
        ring.open(bytes(sealed), LABEL, NOW)


@given(garbage=st.binary(max_size=300))
def test_garbage_only_raises_remote_protocol_error(garbage: bytes) -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(RemoteProtocolError):
        ring.open(garbage, LABEL, NOW)


def test_truncated_and_unknown_version_refused() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(b"hello", LABEL, NONCE, NOW)
    with pytest.raises(RemoteProtocolError, match="too short"):
        ring.open(sealed[: OVERHEAD_BYTES - 1], LABEL, NOW)
    with pytest.raises(RemoteProtocolError, match="version 9"):
        ring.open(b"\x09" + sealed[1:], LABEL, NOW)
    assert ring.statistics().rejected_malformed == 2


def test_wrong_label_refused() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(b"ping", b"cluster-a", NONCE, NOW)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        ring.open(sealed, b"cluster-b", NOW)


def test_wrong_key_refused() -> None:
    sealed = Keyring([K1]).seal(b"ping", LABEL, NONCE, NOW)
    other = Keyring([K2])
    with pytest.raises(RemoteProtocolError, match="all 1 gossip keys"):
        other.open(sealed, LABEL, NOW)
    assert other.statistics().rejected_auth == 1
    assert other.statistics().opened == 0


def test_rotation_without_downtime() -> None:
    old_node, new_node = Keyring([K1]), Keyring([K1])
    # install everywhere: nothing changes yet
    new_node.install(K2)
    old_node.install(K2)
    # `use` on one node first: its datagrams still open on a node that has not switched
    new_node.use(K2)
    assert new_node.primary == K2
    from_new = new_node.seal(b"alive", LABEL, NONCE, NOW)
    from_old = old_node.seal(b"alive", LABEL, NONCE, NOW)
    assert old_node.open(from_new, LABEL, NOW) == b"alive"
    assert new_node.open(from_old, LABEL, NOW) == b"alive"
    assert new_node.statistics().opened_with_secondary == 1
    # after the old key is removed it no longer opens
    new_node.remove(K1)
    assert new_node.keys == (K2,)
    with pytest.raises(RemoteProtocolError):
        new_node.open(from_old, LABEL, NOW)


def test_remove_primary_refused_with_next_step() -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(ConfigError, match="meshctl keys use"):
        ring.remove(K1)
    with pytest.raises(ConfigError, match="not in the ring"):
        ring.remove(K3)
    with pytest.raises(ConfigError, match="not in the ring"):
        ring.use(K3)


def test_install_is_idempotent_and_bounded() -> None:
    ring = Keyring([K1, K1])
    assert ring.keys == (K1,)
    ring.install(K1)
    assert ring.keys == (K1,)
    for i in range(MAX_KEYS - 1):
        ring.install(bytes([i]) * 32)
    with pytest.raises(ConfigError, match="full"):
        ring.install(K3)


def test_list_hides_keys() -> None:
    ring = Keyring([K1, K2])
    rows = ring.list()
    assert [r.primary for r in rows] == [True, False]
    assert rows[0].key_id == key_id(K1)
    assert len(rows[0].key_id) == 8
    assert K1.hex()[:8] not in {r.key_id for r in rows}


def test_bad_keys_refused() -> None:
    with pytest.raises(ConfigError):
        Keyring([])
    with pytest.raises(ConfigError):
        Keyring([b"short"])
    with pytest.raises(LocalProtocolError):
        Keyring([K1]).seal(b"x", LABEL, b"short", NOW)


@given(key=keys)
def test_key_text_roundtrip(key: bytes) -> None:
    assert decode_key(encode_key(key)) == key


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA", encode_key(K1) + "AAAA"])
def test_key_text_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="gossip key"):
        decode_key(text)


@pytest.mark.parametrize("age_s", [-301, 301, 86_400])
def test_replay_outside_window_refused(age_s: int) -> None:
    ring = Keyring([K1], replay_window_s=300)
    sealed = ring.seal(b"dead n3 inc 4", LABEL, NONCE, NOW)
    with pytest.raises(RemoteProtocolError, match="replay window"):
        ring.open(sealed, LABEL, NOW + age_s)
    assert ring.statistics().rejected_stale == 1


@pytest.mark.parametrize("age_s", [-300, 0, 299])
def test_inside_window_accepted(age_s: int) -> None:
    ring = Keyring([K1], replay_window_s=300)
    sealed = ring.seal(b"x", LABEL, NONCE, NOW)
    assert ring.open(sealed, LABEL, NOW + age_s) == b"x"


def test_window_off() -> None:
    ring = Keyring([K1], replay_window_s=None)
    assert ring.open(ring.seal(b"x", LABEL, NONCE, 0.0), LABEL, NOW) == b"x"


@given(ring_keys=st.lists(keys, min_size=1, max_size=MAX_KEYS, unique=True))
def test_persistence_roundtrip(ring_keys: list[bytes]) -> None:
    ring = Keyring(ring_keys)
    again = Keyring.from_bytes(ring.to_bytes())
    assert again.keys == ring.keys
    assert again.primary == ring_keys[0]


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x80", b"\x82\xa1v\x01\xa4keys\x90"])
def test_damaged_file(data: bytes) -> None:
    with pytest.raises(StorageError):
        Keyring.from_bytes(data)


def test_codec_seals_with_fresh_nonces_and_opens() -> None:
    nonces = iter([b"\x01" * 12, b"\x02" * 12])
    clock = [NOW]
    codec = KeyringCodec(Keyring([K1]), "prod", lambda: clock[0], lambda n: next(nonces))
    a, b = codec.seal(b"ping"), codec.seal(b"ping")
    assert a[1:13] == b"\x01" * 12
    assert b[1:13] == b"\x02" * 12
    assert codec.open(a) == b"ping"
    other_cluster = KeyringCodec(Keyring([K1]), "staging", lambda: clock[0], lambda n: b"\x03" * n)
    with pytest.raises(RemoteProtocolError):
        other_cluster.open(a)
    clock[0] += 3600  # an hour later, the same bytes are a replay
    with pytest.raises(RemoteProtocolError, match="replay window"):
        codec.open(b)
