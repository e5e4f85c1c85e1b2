"""The replicated state machine: commands, CAS, dedup, watches, snapshots.

Plain synchronous tests plus Hypothesis properties: replicas that apply the
same entries agree byte for byte, whether or not they went through a snapshot,
and the key-value store matches a dict model.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError, StorageError
from mesh.raft.messages import ConfChange, ConfChangeKind, Entry, EntryKind
from mesh.raft.state import (
    DEDUP_ENTRIES,
    CaSet,
    CertIssued,
    ClusterCa,
    ClusterConfig,
    Command,
    CommandKind,
    ConfigSet,
    DenyAdd,
    DenyRemove,
    IssuedCert,
    KvDelete,
    KvPut,
    MeshState,
    NodeClear,
    NodeSet,
    Result,
    ResultCode,
    Table,
    TokenSet,
    carries_secrets,
    decode_command,
    iter_records,
    redact,
)
from mesh.raft.storage import Compacted
from mesh.types import NodeId


class Replica:
    """A MeshState fed entries with consecutive indexes."""

    def __init__(self, max_events: int = 10_000) -> None:
        self.sm = MeshState(max_events=max_events)

    def apply(self, cmd: Command | bytes) -> Result:
        data = cmd if isinstance(cmd, bytes) else cmd.encode()
        result = self.sm.apply(Entry(2, self.sm.applied_index + 1, data))
        assert result is not None
        return result


# ------------------------------------------------------------------ key-value


def test_put_get_and_indexes() -> None:
    r = Replica()
    first = r.apply(KvPut("a/x", b"1"))
    assert first.ok
    assert first.index == 1
    assert first.mod_index == 1
    second = r.apply(KvPut("a/x", b"2"))
    entry = r.sm.get("a/x")
    assert entry is not None
    assert (entry.value, entry.create_index, entry.mod_index) == (b"2", 1, 2)
    assert second.mod_index == 2
    assert r.sm.get("missing") is None


def test_cas_put_and_delete() -> None:
    r = Replica()
    assert r.apply(KvPut("k", b"new", cas=0)).ok  # create only if absent
    failed = r.apply(KvPut("k", b"again", cas=0))
    assert failed.code is ResultCode.CAS_FAILED
    assert failed.mod_index == 1
    assert "exists" in failed.message
    stale = r.apply(KvPut("k", b"x", cas=7))
    assert stale.code is ResultCode.CAS_FAILED
    assert "not 7" in stale.message
    ok = r.apply(KvPut("k", b"x", cas=1))
    assert ok.ok
    assert ok.mod_index == 4
    assert r.apply(KvDelete("k", cas=1)).code is ResultCode.CAS_FAILED
    assert r.apply(KvDelete("k", cas=4)).ok
    assert r.sm.get("k") is None
    absent = r.apply(KvDelete("k"))
    assert absent.ok
    assert absent.mod_index == 0
    assert r.apply(KvDelete("k", cas=3)).code is ResultCode.CAS_FAILED
    assert r.apply(KvDelete("k", cas=0)).ok


def test_prefix_listing_is_sorted_and_limited() -> None:
    r = Replica()
    for key in ["b", "a/2", "a/1", "a", "ab", "a/3"]:
        r.apply(KvPut(key, key.encode()))
    assert [e.key for e in r.sm.items("a/")] == ["a/1", "a/2", "a/3"]
    assert [e.key for e in r.sm.items("a")] == ["a", "a/1", "a/2", "a/3", "ab"]
    assert [e.key for e in r.sm.items("a/", limit=2)] == ["a/1", "a/2"]
    assert [e.key for e in r.sm.items()] == ["a", "a/1", "a/2", "a/3", "ab", "b"]
    r.apply(KvDelete("a/2"))
    assert [e.key for e in r.sm.items("a/")] == ["a/1", "a/3"]
    assert len(r.sm) == 5


def test_request_ids_make_commands_idempotent() -> None:
    r = Replica()
    first = r.apply(KvPut("counter", b"1", request_id=b"req-1"))
    r.apply(KvPut("counter", b"2"))
    retry = r.apply(KvPut("counter", b"1", request_id=b"req-1"))
    assert retry.duplicate
    assert retry.index == first.index
    assert retry.code is first.code
    entry = r.sm.get("counter")
    assert entry is not None
    assert entry.value == b"2"
    # A failed CAS is remembered too: the retry gets the same answer.
    bad = r.apply(KvPut("counter", b"x", cas=99, request_id=b"req-2"))
    r.apply(KvPut("counter", b"y", request_id=b"req-3"))
    assert r.apply(KvPut("counter", b"x", cas=99, request_id=b"req-2")).message == bad.message


def test_dedup_table_is_bounded_oldest_first() -> None:
    r = Replica()
    r.apply(KvPut("k", b"0", request_id=b"oldest"))
    for i in range(DEDUP_ENTRIES):
        r.apply(KvDelete(f"none{i}", request_id=f"r{i}".encode()))
    again = r.apply(KvPut("k", b"0", request_id=b"oldest"))
    assert not again.duplicate  # forgotten: applied again
    assert r.apply(KvDelete("none5", request_id=b"r5")).duplicate


# ------------------------------------------------------------------ other tables


def test_node_overrides_and_deny_list() -> None:
    r = Replica()
    n1 = NodeId("n1")
    assert r.apply(NodeSet.build(n1, drain=True)).ok
    r.apply(NodeSet.build(n1, labels={"zone": "b", "disk": "ssd"}))
    override = r.sm.node_override(n1)
    assert override is not None
    assert override.drain is True  # kept: drain was not given the second time
    assert override.labels == (("disk", "ssd"), ("zone", "b"))
    assert override.as_dict()["labels"] == {"disk": "ssd", "zone": "b"}
    r.apply(NodeClear(n1))
    assert r.sm.node_override(n1) is None
    assert r.sm.node_overrides() == []

    r.apply(DenyAdd("0af3", NodeId("n9"), "decommissioned"))
    assert r.sm.is_denied("0AF3")
    assert r.sm.is_denied("0af3")
    assert [d.serial for d in r.sm.deny_list()] == ["0af3"]
    r.apply(DenyRemove("0af3"))
    assert not r.sm.is_denied("0af3")


def test_commands_validate_locally() -> None:
    with pytest.raises(LocalProtocolError):
        KvPut("", b"x")
    with pytest.raises(LocalProtocolError):
        KvPut("bad\nkey", b"x")
    with pytest.raises(LocalProtocolError):
        KvPut("k", b"x" * (512 * 1024 + 1))
    with pytest.raises(LocalProtocolError):
        KvPut("k", b"x", cas=-1)
    with pytest.raises(LocalProtocolError):
        KvPut("k", b"x", request_id=b"r" * 65)
    with pytest.raises(LocalProtocolError):
        DenyAdd("XYZ", NodeId("n1"))
    with pytest.raises(LocalProtocolError):
        NodeSet(NodeId("n1"), labels=(("z", "1"), ("a", "2")))  # unsorted


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # not msgpack
        wire.pack_body({"not": "a list"}),
        wire.pack_body([2, 1, b"", "k", b"v", None]),  # future format
        wire.pack_body([1, 99, b"", "k"]),  # unknown kind (a newer meshd's command)
        wire.pack_body([1, True, b"", "k", b"v", None]),  # bool is not a kind
        wire.pack_body([1, 1, b"", "k", b"v"]),  # missing field
        wire.pack_body([1, 1, b"", "", b"v", None]),  # empty key
        wire.pack_body([1, 1, "rid", "k", b"v", None]),  # request id not bytes
        wire.pack_body([1, 16, b"", "n1", "yes", None]),  # drain not a bool
        wire.pack_body([1, 24, b"", "ZZ", "n1", ""]),  # serial not hex
    ],
)
def test_bad_commands_fail_the_same_way_on_every_replica(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_command(data)
    a, b = Replica(), Replica()
    ra, rb = a.apply(data), b.apply(data)
    assert ra == rb
    assert ra.code is ResultCode.INVALID
    assert ra.index == 1
    assert a.sm.digest() == b.sm.digest()
    assert a.sm.applied_index == 1


def test_non_command_entries_only_move_the_index() -> None:
    sm = MeshState()
    assert (
        sm.apply(
            Entry(
                1,
                1,
                ConfChange(ConfChangeKind.ADD_VOTER, NodeId("a")).encode(),
                EntryKind.CONF_CHANGE,
            )
        )
        is None
    )
    assert sm.apply(Entry(2, 2)) is None  # a new leader's empty entry
    assert sm.applied_index == 2
    assert len(sm) == 0
    with pytest.raises(AssertionError):
        sm.apply(Entry(2, 4, KvPut("k", b"v").encode()))  # a gap is a bug


# ------------------------------------------------------------------ watches


def test_changes_since_resumes_and_filters() -> None:
    r = Replica()
    r.apply(KvPut("app/a", b"1"))  # 1
    r.apply(NodeSet.build(NodeId("n1"), drain=True))  # 2
    r.apply(KvPut("other", b"x"))  # 3
    r.apply(KvDelete("app/a"))  # 4
    all_changes = r.sm.changes_since(0)
    assert [c.index for c in all_changes] == [1, 2, 3, 4]
    assert all_changes[3].record is None  # a deletion
    assert [c.index for c in r.sm.changes_since(2)] == [3, 4]
    assert [c.index for c in r.sm.changes_since(0, table=Table.KV, prefix="app/")] == [1, 4]
    assert [c.table for c in r.sm.changes_since(0, table=Table.NODE)] == [Table.NODE]
    assert [c.index for c in r.sm.changes_since(0, limit=2)] == [1, 2]
    assert r.sm.changes_since(4) == []
    assert r.sm.changes_since(10) == []


def test_last_change_per_table_tells_followers_what_moved() -> None:
    r = Replica(max_events=2)
    assert r.sm.last_change(Table.KV) == 0
    r.apply(KvPut("a", b"1"))  # 1
    r.apply(NodeSet.build(NodeId("n1"), drain=True))  # 2
    r.apply(KvPut("b", b"2"))  # 3
    r.apply(KvDelete("missing"))  # 4: no change recorded
    assert r.sm.last_change(Table.KV) == 3
    assert r.sm.last_change(Table.NODE) == 2
    assert r.sm.last_change(Table.ALLOC) == 0
    # A restored snapshot may have changed anything.
    other = MeshState()
    other.restore(r.sm.snapshot(), 4)
    assert {other.last_change(t) for t in Table} == {4}


def test_expected_commands_are_applied_without_decoding_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mesh.raft.state as state_module

    r = Replica()
    noted = KvPut("a", b"1", request_id=b"r1")
    data = noted.encode()
    r.sm.expect(data, noted)
    reference = Replica()
    expected_result = reference.apply(data)

    def no_decoding(raw: bytes) -> Command:
        raise AssertionError("decoded again")

    monkeypatch.setattr(state_module, "decode_command", no_decoding)
    assert r.apply(data) == expected_result
    assert r.sm.get("a") == reference.sm.get("a")
    with pytest.raises(AssertionError, match="decoded again"):  # only once per noting
        r.apply(data)
    monkeypatch.undo()
    for i in range(state_module.EXPECTED_COMMANDS + 10):  # the cache stays bounded
        r.sm.expect(KvPut(f"k{i}", b"").encode(), KvPut(f"k{i}", b""))
    assert len(r.sm._expected) == state_module.EXPECTED_COMMANDS


def test_changes_since_a_dropped_index_raises_compacted() -> None:
    r = Replica(max_events=3)
    for i in range(6):
        r.apply(KvPut(f"k{i}", b""))
    assert r.sm.first_change_index == 3
    assert [c.index for c in r.sm.changes_since(3)] == [4, 5, 6]
    with pytest.raises(Compacted):
        r.sm.changes_since(2)
    # After a restore, changes are available from the snapshot's index.
    other = MeshState()
    other.restore(r.sm.snapshot(), 6)
    assert other.first_change_index == 6
    assert other.changes_since(6) == []
    with pytest.raises(Compacted):
        other.changes_since(5)
    records = list(iter_records(other))
    assert [key for _, key, _ in records] == [f"k{i}" for i in range(6)]


# ------------------------------------------------------------------ snapshots


def test_snapshot_round_trip_is_exact() -> None:
    r = Replica()
    r.apply(KvPut("k", b"v", request_id=b"id"))
    r.apply(NodeSet.build(NodeId("n2"), drain=False, labels={"zone": "a"}))
    r.apply(DenyAdd("ff", NodeId("n3"), "stolen laptop"))
    copy = MeshState()
    copy.restore(r.sm.snapshot(), r.sm.applied_index)
    assert copy.snapshot() == r.sm.snapshot()
    assert copy.get("k") == r.sm.get("k")
    # The dedup table travels with the snapshot.
    dup = copy.apply(Entry(2, 4, KvPut("k", b"v", request_id=b"id").encode()))
    assert dup is not None
    assert dup.duplicate


def test_cluster_config_is_set_with_cas_and_travels_in_snapshots() -> None:
    r = Replica()
    r.apply(KvPut("k", b"v"))
    old_image = r.sm.snapshot()
    assert r.sm.cluster_config() == ClusterConfig()
    assert len(wire.unpack_body(old_image, 1 << 20)) == 9  # unset: what older versions read
    set5 = r.apply(ConfigSet(raft_voters=5, cas=0))
    assert (set5.ok, set5.index, set5.mod_index) == (True, 2, 2)
    assert r.sm.cluster_config() == ClusterConfig(5, 2)
    assert [(c.table, c.key, c.record) for c in r.sm.changes_since(1)] == [
        (Table.CONFIG, "cluster", ClusterConfig(5, 2))]
    stale = r.apply(ConfigSet(raft_voters=3, cas=0))
    assert stale.code is ResultCode.CAS_FAILED
    assert "at index 2, not 0" in stale.message
    same = r.apply(ConfigSet(raft_voters=5))  # no change: the config keeps its index
    assert (same.ok, same.mod_index) == (True, 2)
    keep = r.apply(ConfigSet(raft_voters=None, cas=2))  # None keeps the value
    assert (keep.ok, r.sm.cluster_config()) == (True, ClusterConfig(5, 2))
    copy = MeshState()
    copy.restore(r.sm.snapshot(), r.sm.applied_index)
    assert copy.cluster_config() == ClusterConfig(5, 2)
    assert copy.snapshot() == r.sm.snapshot()
    older = MeshState()
    older.restore(old_image, 1)  # an image without the field: never set
    assert older.cluster_config() == ClusterConfig()


def test_issued_certificates_are_recorded_once_and_travel_in_snapshots() -> None:
    r = Replica()
    n2 = NodeId("n2")
    first = r.apply(CertIssued("ab12", n2))
    assert (first.ok, first.mod_index) == (True, 1)
    again = r.apply(CertIssued("ab12", n2))  # a retry, or another issuer's echo
    assert (again.ok, again.mod_index) == (True, 1)
    r.apply(CertIssued("cd34", n2))
    r.apply(CertIssued("ef56", NodeId("n3")))
    assert r.sm.issued_to(n2) == [IssuedCert("ab12", n2, 1), IssuedCert("cd34", n2, 3)]
    assert [(c.table, c.key) for c in r.sm.changes_since(0)] == [
        (Table.CERT, "ab12"), (Table.CERT, "cd34"), (Table.CERT, "ef56")]
    r.apply(ConfigSet(raft_voters=3))
    copy = MeshState()
    copy.restore(r.sm.snapshot(), r.sm.applied_index)
    assert copy.issued_to(n2) == r.sm.issued_to(n2)
    assert copy.cluster_config() == r.sm.cluster_config()
    assert copy.snapshot() == r.sm.snapshot()
    assert [(t, k) for t, k, _ in iter_records(copy)] == [
        (Table.CONFIG, "cluster"), (Table.CERT, "ab12"), (Table.CERT, "cd34"),
        (Table.CERT, "ef56")]
    with pytest.raises(LocalProtocolError, match="serial"):
        CertIssued("AB12", n2)  # upper case: not how serials are written


def test_the_ca_is_recorded_once_and_a_token_needs_it() -> None:
    r = Replica()
    early = r.apply(TokenSet(bytes(32), cas=0))
    assert early.code is ResultCode.CAS_FAILED
    assert "no cluster CA" in early.message
    first = r.apply(CaSet(b"CERT", b"KEY"))
    assert (first.ok, first.mod_index) == (True, 2)
    again = r.apply(CaSet(b"CERT"))  # the same certificate (a retry, a redacted copy)
    assert (again.ok, again.mod_index) == (True, 2)
    other = r.apply(CaSet(b"OTHER", b"KEY2"))
    assert other.code is ResultCode.CAS_FAILED
    assert "does not replace its CA" in other.message
    token = r.apply(TokenSet(bytes(32), cas=0))
    assert (token.ok, token.mod_index) == (True, 5)
    stale = r.apply(TokenSet(bytes(range(32)), cas=0))  # a migration after a rotation
    assert stale.code is ResultCode.CAS_FAILED
    rotated = r.apply(TokenSet(bytes(range(32))))
    assert rotated.ok
    assert r.sm.cluster_ca() == ClusterCa(b"CERT", 2, 7)
    assert [(c.table, c.index) for c in r.sm.changes_since(0)] == [
        (Table.CA, 2), (Table.CA, 5), (Table.CA, 7)]
    # The record travels in snapshots; the secrets are not in the state at all.
    image = r.sm.snapshot()
    assert b"KEY" not in image
    assert bytes(range(32)) not in image
    copy = MeshState()
    assert copy.restore(image, r.sm.applied_index) is None  # no vault section
    assert copy.cluster_ca() == r.sm.cluster_ca()
    assert [t for t, _, _ in iter_records(copy)] == [Table.CA]
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        TokenSet(bytes(31))
    with pytest.raises(LocalProtocolError, match="empty"):
        CaSet(b"")


def test_a_snapshot_carries_a_vault_section_only_when_given() -> None:
    r = Replica()
    r.apply(CaSet(b"CERT", b"KEY"))
    vault = [b"CERT", b"KEY", bytes(32)]
    image = r.sm.snapshot(vault)
    assert image != r.sm.snapshot()
    copy = MeshState()
    assert copy.restore(image, 1) == vault
    assert copy.snapshot() == r.sm.snapshot()  # the state itself never holds it
    bad = r.sm.snapshot([b"CERT", b"KEY", bytes(64)])  # a secret of the wrong size
    with pytest.raises(StorageError):
        MeshState().restore(bad, 1)


def test_redaction_leaves_secrets_out_and_other_entries_alone() -> None:
    put = Entry(1, 1, KvPut("k", b"KEY").encode())
    assert not carries_secrets(put)
    assert redact(put) is put
    ca = Entry(1, 2, CaSet(b"CERT", b"KEY", request_id=b"r").encode())
    assert carries_secrets(ca)
    assert decode_command(redact(ca).data) == CaSet(b"CERT", b"", request_id=b"r")
    # A malformed command of a secret kind stays malformed, without its bytes.
    junk = Entry(1, 3, wire.pack_body([1, int(CommandKind.TOKEN_SET), b"", b"KEY" * 20, None]))
    assert carries_secrets(junk)
    hidden = redact(junk)
    assert b"KEY" not in hidden.data
    a, b = MeshState(), MeshState()
    for e, e2 in ((put, put), (ca, redact(ca)), (junk, hidden)):
        ra, rb = a.apply(e), b.apply(e2)
        assert ra is not None
        assert rb is not None
        assert ra.code == rb.code
    assert a.snapshot() == b.snapshot()


@pytest.mark.parametrize("voters", [0, 2, 17, True, "3", -1])
def test_a_config_with_a_bad_voter_count_is_refused(voters: object) -> None:
    with pytest.raises(LocalProtocolError, match="raft_voters"):
        ConfigSet(raft_voters=voters)  # type: ignore[arg-type]
    data = wire.pack_body([1, int(CommandKind.CONFIG_SET), b"", voters, None])
    with pytest.raises(RemoteProtocolError, match="raft_voters"):
        decode_command(data)


@pytest.mark.parametrize(
    "image",
    [
        b"",
        b"\xc1",
        wire.pack_body([1, 1, [], [], []]),  # missing dedup table
        wire.pack_body([9, 1, [], [], [], []]),  # another format
        wire.pack_body([1, 1, [["k", "not-bytes", 1, 1]], [], [], []]),
        wire.pack_body([1, 1, [], [["n1", 1, {}, 1]], [], []]),
    ],
)
def test_bad_snapshot_images_are_refused_and_change_nothing(image: bytes) -> None:
    r = Replica()
    r.apply(KvPut("keep", b"me"))
    before = r.sm.snapshot()
    with pytest.raises(StorageError):
        r.sm.restore(image, 1)
    assert r.sm.snapshot() == before


def test_snapshot_taken_at_another_index_is_refused() -> None:
    r = Replica()
    r.apply(KvPut("k", b"v"))
    with pytest.raises(StorageError, match="index 1"):
        MeshState().restore(r.sm.snapshot(), 5)


# ------------------------------------------------------------------ properties

KEYS = st.sampled_from(["a", "a/b", "a/c", "b", "zz"])
NODES = st.sampled_from([NodeId("n1"), NodeId("n2")])
RIDS = st.sampled_from([b"", b"", b"r1", b"r2", b"r3"])
CAS = st.one_of(st.none(), st.integers(0, 12))

COMMANDS = st.one_of(
    st.builds(KvPut, KEYS, st.binary(max_size=4), CAS, RIDS),
    st.builds(KvDelete, KEYS, CAS, RIDS),
    st.builds(
        NodeSet.build,
        NODES,
        drain=st.one_of(st.none(), st.booleans()),
        labels=st.one_of(st.none(), st.dictionaries(st.sampled_from(["zone", "rack"]), KEYS)),
        request_id=RIDS,
    ),
    st.builds(NodeClear, NODES, RIDS),
    st.builds(DenyAdd, st.sampled_from(["01", "ab"]), NODES, st.just("r"), RIDS),
    st.builds(DenyRemove, st.sampled_from(["01", "ab"]), RIDS),
    st.builds(ConfigSet, st.sampled_from([None, 1, 3, 5]), CAS, RIDS),
    st.builds(CertIssued, st.sampled_from(["01", "ab"]), NODES, RIDS),
    st.builds(CaSet, st.sampled_from([b"CERT-A", b"CERT-B"]), st.sampled_from([b"", b"KEY"]),
              RIDS),
    st.builds(TokenSet, st.sampled_from([b"", bytes(32), bytes(range(32))]), CAS, RIDS),
)


@given(st.lists(COMMANDS, max_size=40), st.integers(0, 40))
def test_replicas_agree_with_and_without_a_snapshot(cmds: list[Command], cut: int) -> None:
    """State machine safety at this layer: same entries, same bytes, same results,
    even when one replica restores from the other's snapshot half way."""
    a, b = Replica(), Replica()
    cut = min(cut, len(cmds))
    results_a, results_b = [], []
    for i, cmd in enumerate([*cmds, None]):
        if i == cut:
            b = Replica()
            b.sm.restore(a.sm.snapshot(), a.sm.applied_index)
        if cmd is None:
            break
        results_a.append(a.apply(cmd))
        if i >= cut:
            results_b.append(b.apply(cmd))
    assert a.sm.snapshot() == b.sm.snapshot()
    assert results_a[len(results_a) - len(results_b) :] == results_b


@given(st.lists(COMMANDS, max_size=40))
def test_a_replica_fed_redacted_entries_agrees(cmds: list[Command]) -> None:
    """What a watcher receives (secrets left out) has the same effect and results."""
    full, redacted = MeshState(), MeshState()
    for i, cmd in enumerate(cmds, start=1):
        entry = Entry(1, i, cmd.encode())
        seen = redact(entry)
        assert b"KEY" not in seen.data
        assert bytes(range(32)) not in seen.data
        assert full.apply(entry) == redacted.apply(seen)
    assert full.snapshot() == redacted.snapshot()


@given(st.lists(COMMANDS, max_size=40))
def test_kv_matches_a_dict_model(cmds: list[Command]) -> None:
    r = Replica()
    model: dict[str, tuple[bytes, int]] = {}
    seen: set[bytes] = set()
    for cmd in cmds:
        result = r.apply(cmd)
        if cmd.request_id and cmd.request_id in seen:
            assert result.duplicate
            continue
        if cmd.request_id:
            seen.add(cmd.request_id)
        if not isinstance(cmd, KvPut | KvDelete):
            continue
        cur = model.get(cmd.key)
        if cmd.cas is not None and (
            (cmd.cas == 0 and cur is not None)
            or (cmd.cas > 0 and (cur is None or cur[1] != cmd.cas))
        ):
            assert result.code is ResultCode.CAS_FAILED
            continue
        assert result.ok
        if isinstance(cmd, KvPut):
            model[cmd.key] = (cmd.value, result.index)
        else:
            model.pop(cmd.key, None)
    assert {e.key: (e.value, e.mod_index) for e in r.sm.items()} == model
    assert [e.key for e in r.sm.items()] == sorted(model)


@given(COMMANDS)
def test_commands_round_trip(cmd: Command) -> None:
    assert decode_command(cmd.encode()) == cmd
    assert cmd.KIND in set(CommandKind)
