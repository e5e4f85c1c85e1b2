"""The watch stream's pure parts: buffer, server, client and the two-feed gate.

Examples first, then Hypothesis properties over a reference history (the
committed entries of one group, with the state image at every index): any
interleaving of Raft deliveries, watch answers, snapshots, voter switches and
failures leaves the readers' state equal to the reference at its index, never
moving backwards, never applying an index twice, and the Raft adapter's view
(its snapshots and results) exact at the adapter's own index.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, RemoteProtocolError, StorageError
from mesh.raft.messages import ConfChange, ConfChangeKind, Entry, EntryKind
from mesh.raft.state import CaSet, KvDelete, KvPut, MeshState, Result, TokenSet, redact
from mesh.raft.vault import Vault
from mesh.raft.watch import (
    AnswerKind,
    ApplyEntries,
    ClusterView,
    RestoreSnapshot,
    SnapshotCursor,
    SnapshotImage,
    StateGate,
    WatchAnswer,
    WatchBuffer,
    WatchClient,
    WatchConfig,
    WatchRequest,
    WatchServer,
    rendezvous_score,
)
from mesh.types import NodeId

N = NodeId
SMALL = WatchConfig(buffer_entries=6, buffer_bytes=10_000, max_answer_bytes=40,
                    snapshot_chunk_bytes=16)


@dataclass(frozen=True)
class History:
    """The committed entries 1..n of one group and the reference state at each index."""

    entries: tuple[Entry, ...]
    images: tuple[bytes, ...]
    """``images[i]``: the state image after applying entries 1..i."""
    results: tuple[Result | None, ...]
    """``results[i - 1]``: what applying entry i returned."""
    raft_images: tuple[bytes, ...]
    """``raft_images[i]``: the Raft snapshot after entries 1..i (with the vault)."""
    vaults: tuple[list[bytes] | None, ...]
    """``vaults[i]``: the vault section a Raft member holds after entries 1..i."""

    @property
    def last(self) -> int:
        return len(self.entries)

    def digest(self, index: int) -> bytes:
        return self.images[index]


CA_KEY = b"-----CA KEY-----"
SECRET = bytes(range(32))
CA_AT, TOKEN_AT = 9, 23
"""Where the history records the CA and the join token (secrets a watcher must not get)."""


def make_history(n: int, seed: int = 0) -> History:
    sm = MeshState()
    vault = Vault()
    images = [sm.snapshot()]
    raft_images, vaults = [sm.snapshot()], [None]
    entries, results = [], []
    term = 1
    for i in range(1, n + 1):
        if (i + seed) % 7 == 0:
            term += 1
        secret: CaSet | TokenSet | None = None
        if i == CA_AT:
            secret = CaSet(b"CA CERT", CA_KEY)
        elif i == TOKEN_AT:
            secret = TokenSet(SECRET, cas=0)
        if secret is not None:
            entry = Entry(term, i, secret.encode())
        elif i % 5 == 0:
            entry = Entry(term, i, ConfChange(ConfChangeKind.ADD_LEARNER, N(f"n{i}")).encode(),
                          EntryKind.CONF_CHANGE)
        elif i % 4 == 0:
            entry = Entry(term, i, KvDelete(f"k{(i + seed) % 3}").encode())
        else:
            entry = Entry(term, i, KvPut(f"k{(i + seed) % 3}", f"v{i}".encode() * (i % 3),
                                         cas=i if i % 6 == 0 else None,
                                         request_id=f"r{i % 4}".encode()).encode())
        entries.append(entry)
        results.append(sm.apply(entry))
        if secret is not None:
            vault.take(secret, results[-1])
        images.append(sm.snapshot())
        vaults.append(vault.section())
        raft_images.append(sm.snapshot(vault.section()))
    return History(tuple(entries), tuple(images), tuple(results), tuple(raft_images),
                   tuple(vaults))


HISTORY = make_history(40)


def view(node: str, *, voters: tuple[str, ...] = ("v1", "v2", "v3"), leader: str | None = "v1",
         term: int = 3, commit: int = 0) -> ClusterView:
    return ClusterView(N(node), term, N(leader) if leader else None,
                       tuple(N(v) for v in voters), (), commit)


def fed_buffer(upto: int, config: WatchConfig = SMALL) -> WatchBuffer:
    buf = WatchBuffer(config)
    for e in HISTORY.entries[:upto]:
        buf.append(e)
    return buf


def no_image() -> SnapshotImage:
    pytest.fail("no snapshot image should be needed")


def image_at(index: int) -> SnapshotImage:
    term = HISTORY.entries[index - 1].term if index else 0
    return SnapshotImage(index, term, HISTORY.images[index])


# ------------------------------------------------------------------ config and wire


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError):
        WatchConfig(buffer_entries=0)
    with pytest.raises(ConfigError):
        WatchConfig(long_poll_s=0)
    with pytest.raises(ConfigError):
        WatchConfig(backoff_min_s=2, backoff_max_s=1)


def test_request_and_answer_round_trip() -> None:
    req = WatchRequest(N("w1"), 12, 3, SnapshotCursor(20, 4, 64), 5.0)
    assert WatchRequest.from_params(req.to_params()) == req
    ans = WatchAnswer(AnswerKind.ENTRIES, view("v2", commit=9), HISTORY.entries[2:5])
    assert WatchAnswer.from_wire(ans.to_wire()) == ans
    snap = WatchServer(SMALL, fed_buffer(30)).answer(
        WatchRequest(N("w"), 0), view("v2"), lambda: image_at(30), 0.0)
    assert snap is not None
    assert WatchAnswer.from_wire(snap.to_wire()) == snap


@pytest.mark.parametrize("raw", [
    None, {}, {"kind": "bogus", "view": view("v").to_wire()},
    {"kind": "entries", "view": view("v").to_wire(), "entries": []},
    {"kind": "entries", "view": view("v").to_wire(), "entries": [[1, 3, 0, b""], [1, 5, 0, b""]]},
    {"kind": "entries", "view": view("v").to_wire(), "entries": [[2, 3, 0, b""], [1, 4, 0, b""]]},
    {"kind": "snapshot", "view": view("v").to_wire(), "chunk": [1, 1, 8, 4, b"xx"]},
    {"kind": "nothing", "view": ["v", -1, "", [], [], 0]},
])
def test_bad_answers_are_remote_errors(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        WatchAnswer.from_wire(raw)


def test_bad_requests_are_remote_errors() -> None:
    with pytest.raises(RemoteProtocolError):
        WatchRequest.from_params({"node": "w", "after": -1})
    with pytest.raises(RemoteProtocolError):
        WatchRequest.from_params({"node": "", "after": 1})
    with pytest.raises(RemoteProtocolError):
        WatchRequest.from_params({"node": "w", "after": 1, "wait_s": 600})


# ------------------------------------------------------------------ buffer and server


def test_buffer_keeps_the_newest_within_bounds() -> None:
    buf = fed_buffer(10)
    assert len(buf) == 6
    assert (buf.base_index, buf.last_index) == (4, 10)
    assert buf.term_at(4) == HISTORY.entries[3].term
    assert buf.term_at(3) is None
    assert [e.index for e in buf.entries_after(7, 10_000)] == [8, 9, 10]
    tiny = WatchBuffer(WatchConfig(buffer_bytes=1))
    for e in HISTORY.entries[:3]:
        tiny.append(e)
    assert len(tiny) == 1  # the newest entry stays whatever its size


def test_server_serves_entries_bounded_in_bytes() -> None:
    server = WatchServer(SMALL, fed_buffer(10))
    ans = server.answer(WatchRequest(N("w"), 5, HISTORY.entries[4].term), view("v2"),
                        no_image, 0.0)
    assert ans is not None
    assert ans.kind is AnswerKind.ENTRIES
    assert ans.entries[0].index == 6
    assert sum(e.size for e in ans.entries[1:]) <= SMALL.max_answer_bytes
    assert server.watchers(0.0, 1.0) == [N("w")]


def test_server_waits_when_nothing_is_new_or_it_is_behind() -> None:
    server = WatchServer(SMALL, fed_buffer(10))
    term = HISTORY.entries[9].term
    assert server.answer(WatchRequest(N("w"), 10, term), view("v"), no_image, 0.0) is None
    assert server.answer(WatchRequest(N("w"), 12, 9), view("v"), no_image, 0.0) is None


def test_server_sends_a_snapshot_to_a_watcher_behind_its_buffer_and_reuses_it() -> None:
    server = WatchServer(WatchConfig(buffer_entries=6, snapshot_chunk_bytes=16), fed_buffer(30))
    taken: list[int] = []

    def take() -> SnapshotImage:
        taken.append(30)
        return image_at(30)

    first = server.answer(WatchRequest(N("a"), 3, HISTORY.entries[2].term), view("v"), take, 0)
    second = server.answer(WatchRequest(N("b"), 0), view("v"), take, 0)
    assert first is not None
    assert second is not None
    assert first.kind is second.kind is AnswerKind.SNAPSHOT
    assert taken == [30]
    assert first.chunk is not None
    nxt = server.answer(WatchRequest(N("a"), 3, 1, SnapshotCursor(30, first.chunk.term, 16)),
                        view("v"), take, 0)
    assert nxt is not None
    assert nxt.chunk is not None
    assert nxt.chunk.offset == 16


def test_server_answers_another_history_with_a_snapshot_once_past_it() -> None:
    server = WatchServer(SMALL, fed_buffer(10))
    wrong = HISTORY.entries[8].term + 5
    assert server.answer(WatchRequest(N("w"), 10, wrong), view("v"), no_image, 0) is None
    ans = server.answer(WatchRequest(N("w"), 9, wrong), view("v"), lambda: image_at(10), 0)
    assert ans is not None
    assert ans.kind is AnswerKind.SNAPSHOT


# ------------------------------------------------------------------ client


def test_client_spreads_watchers_and_prefers_followers() -> None:
    live = {N(n) for n in ("v1", "v2", "v3", "w1")}
    picks = {}
    for i in range(40):
        c = WatchClient(N(f"w{i}"), SMALL)
        c.handle_answer(N("v2"), WatchRequest(N(f"w{i}"), 0),
                        WatchAnswer(AnswerKind.REDIRECT, view("x")), 0.0)
        picks[i] = c.choose(live | {N(f"w{i}")}, 0.0)
    assert set(picks.values()) == {N("v2"), N("v3")}   # never the leader v1
    lone = WatchClient(N("w1"), SMALL)
    lone.handle_answer(N("x"), WatchRequest(N("w1"), 0),
                       WatchAnswer(AnswerKind.REDIRECT, view("x")), 0.0)
    assert lone.choose({N("v1"), N("w1")}, 0.0) == N("v1")   # the leader if nobody else


def test_client_asks_anyone_first_and_learns_voters_from_a_redirect() -> None:
    c = WatchClient(N("w"), SMALL)
    live = {N("a"), N("b"), N("v1"), N("w")}
    first = c.choose(live, 0.0)
    assert first is not None
    assert first != N("w")
    c.handle_answer(first, WatchRequest(N("w"), 0),
                    WatchAnswer(AnswerKind.REDIRECT, view(str(first), voters=("v1",))), 0.0)
    assert c.choose(live, 0.0) == N("v1")


def test_client_backs_off_a_failed_voter_and_a_leaderless_one() -> None:
    c = WatchClient(N("w"), SMALL)
    ok = WatchAnswer(AnswerKind.NOTHING, view("v2"))
    c.handle_answer(N("v2"), WatchRequest(N("w"), 0), ok, 0.0)
    live = {N("v1"), N("v2"), N("v3")}
    chosen = c.choose(live, 0.0)
    assert chosen is not None
    c.handle_failure(chosen, 1.0)
    other = c.choose(live, 1.0)
    assert other not in (chosen, None)
    assert c.choose(live, 1.0 + SMALL.backoff_max_s) == chosen   # backed off, not banned
    fresh = WatchClient(N("w"), SMALL)
    fresh.handle_answer(N("v2"), WatchRequest(N("w"), 0), ok, 0.0)
    mine = fresh.choose(live, 0.0)
    assert mine is not None
    lonely = WatchAnswer(AnswerKind.NOTHING, view(str(mine), leader=None))
    fresh.handle_answer(mine, WatchRequest(N("w"), 0), lonely, 2.0)
    assert fresh.choose(live, 2.0) == mine   # an election is no reason to leave
    fresh.handle_answer(mine, WatchRequest(N("w"), 0), lonely, 2.0 + SMALL.no_leader_switch_s)
    assert fresh.choose(live, 2.0 + SMALL.no_leader_switch_s) not in (mine, None)


def test_client_leader_goes_stale_without_answers() -> None:
    c = WatchClient(N("w"), SMALL)
    c.handle_answer(N("v2"), WatchRequest(N("w"), 0),
                    WatchAnswer(AnswerKind.NOTHING, view("v2")), 0.0)
    assert c.leader(1.0) == N("v1")
    assert c.leader(SMALL.leader_stale_s + 1) is None


def test_client_refuses_entries_that_do_not_follow_the_request() -> None:
    c = WatchClient(N("w"), SMALL)
    req = WatchRequest(N("w"), 3)
    with pytest.raises(RemoteProtocolError):
        c.handle_answer(N("v2"), req, WatchAnswer(AnswerKind.ENTRIES, view("v2"),
                                                  HISTORY.entries[5:7]), 0.0)


def test_client_assembles_a_chunked_snapshot() -> None:
    server = WatchServer(SMALL, fed_buffer(30))
    c = WatchClient(N("w"), SMALL)
    outputs = []
    for _ in range(100):
        req = c.request(N("v2"), 0, 0)
        ans = server.answer(req, view("v2"), lambda: image_at(30), 0.0)
        assert ans is not None
        outputs += c.handle_answer(N("v2"), req, ans, 0.0)
        if outputs:
            break
    assert outputs == [RestoreSnapshot(30, HISTORY.entries[29].term, HISTORY.images[30])]
    assert c.snapshots == 1


# ------------------------------------------------------------------ gate


def gate_at(index: int) -> tuple[StateGate, WatchBuffer]:
    sm = MeshState()
    buf = WatchBuffer(SMALL)
    gate = StateGate(sm, buf)
    for e in HISTORY.entries[:index]:
        gate.apply(e)
    return gate, buf


def test_gate_in_step_passes_raft_through() -> None:
    gate, buf = gate_at(5)
    assert gate.state.snapshot() == HISTORY.images[5]
    assert gate.snapshot() == HISTORY.images[5]
    assert buf.last_index == 5
    assert gate.statistics().raft_applied == 5


def test_gate_hand_over_from_watch_to_raft() -> None:
    gate, _ = gate_at(3)
    gate.watch_apply(HISTORY.entries[3:12])
    assert gate.readers_index == 12
    assert gate.raft_behind == 9
    assert gate.snapshot() == HISTORY.images[3]      # the adapter's own index
    for e in HISTORY.entries[3:8]:
        assert gate.apply(e) == HISTORY.results[e.index - 1]
    assert gate.snapshot() == HISTORY.images[8]
    assert gate.state.snapshot() == HISTORY.images[12]   # readers untouched
    for e in HISTORY.entries[8:15]:
        gate.apply(e)
    assert gate.raft_behind == 0
    assert gate.state.snapshot() == HISTORY.images[15]
    stats = gate.statistics()
    assert (stats.watch_applied, stats.shadow_applied, stats.raft_applied) == (9, 9, 6)


def test_gate_raft_snapshot_behind_the_readers_becomes_the_shadow() -> None:
    gate, _ = gate_at(0)
    gate.watch_restore(HISTORY.images[20], 20, HISTORY.entries[19].term)
    gate.restore(HISTORY.images[10], 10)
    assert gate.readers_index == 20
    assert gate.applied_index == 10
    assert gate.snapshot() == HISTORY.images[10]
    gate.restore(HISTORY.images[25], 25)
    assert gate.raft_behind == 0
    assert gate.state.snapshot() == HISTORY.images[25]


def test_gate_refuses_a_bad_image_and_never_moves_back() -> None:
    gate, _ = gate_at(8)
    with pytest.raises(StorageError):
        gate.watch_restore(b"junk", 12, 1)
    assert gate.state.snapshot() == HISTORY.images[8]
    assert not gate.watch_restore(HISTORY.images[6], 6, 1)
    assert gate.readers_index == 8


# ------------------------------------------------------------------ properties

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("raft"), st.integers(1, 6)),          # adapter applies k entries
        st.tuples(st.just("raft_snap"), st.integers(0, 40)),     # adapter restores a snapshot
        st.tuples(st.just("raft_take"), st.just(0)),             # adapter snapshots
        st.tuples(st.just("voter"), st.integers(1, 8)),          # voters commit more
        st.tuples(st.just("voter_snap"), st.integers(0, 1)),     # a voter restores (buffer reset)
        st.tuples(st.just("ask"), st.integers(0, 2)),            # watcher asks voter i
        st.tuples(st.just("fail"), st.integers(0, 2)),           # a call to voter i fails
    ),
    max_size=60,
)


@given(OPS)
def test_any_interleaving_keeps_the_readers_exact_and_monotonic(ops: list[tuple[str, int]]
                                                                ) -> None:
    voters = [N("v1"), N("v2"), N("v3")]
    bounds = [WatchConfig(buffer_entries=3, buffer_bytes=10_000, max_answer_bytes=20,
                          snapshot_chunk_bytes=50),
              SMALL, WatchConfig(snapshot_chunk_bytes=1 << 20)]
    # Each voter: a buffer over the history up to its own index.
    vbufs = [WatchBuffer(b) for b in bounds]
    vstate = [0, 0, 0]
    servers = [WatchServer(b, buf) for b, buf in zip(bounds, vbufs, strict=True)]
    committed = 0
    gate, _ = gate_at(0)
    client = WatchClient(N("w"), SMALL)
    raft_commit = 0   # how far the adapter may go (what the leader sends it)
    seen = 0
    now = 0.0

    def voter_catch_up(i: int) -> None:
        while vstate[i] < committed:
            vstate[i] += 1
            vbufs[i].append(redact(HISTORY.entries[vstate[i] - 1]))  # as their gates keep

    for op, arg in ops:
        now += 0.1
        if op == "voter":
            committed = min(HISTORY.last, committed + arg)
            raft_commit = committed
            for i in range(3):
                if (i + arg) % 3:
                    voter_catch_up(i)
        elif op == "voter_snap":
            i = arg
            voter_catch_up(i)
            vbufs[i].reset(vstate[i], HISTORY.entries[vstate[i] - 1].term if vstate[i] else 0)
        elif op == "raft":
            for _ in range(arg):
                nxt = gate.applied_index + 1
                if nxt > raft_commit:
                    break
                result = gate.apply(HISTORY.entries[nxt - 1])
                assert result == HISTORY.results[nxt - 1]
        elif op == "raft_snap":
            index = min(arg, raft_commit)
            if index > gate.applied_index:
                gate.restore(HISTORY.raft_images[index], index)
        elif op == "raft_take":
            assert gate.snapshot() == HISTORY.raft_images[gate.applied_index]
        elif op == "ask":
            i = arg
            req = client.request(voters[i], gate.readers_index, gate.readers_term)
            v = vstate[i]
            ans = servers[i].answer(
                req, view(str(voters[i]), commit=v), functools.partial(image_at, v), now)
            if ans is None:
                continue
            try:
                outs = client.handle_answer(voters[i], req, ans, now)
            except RemoteProtocolError:
                pytest.fail("a correct voter's answer was refused")
            for out in outs:
                if isinstance(out, ApplyEntries):
                    gate.watch_apply(out.entries)
                else:
                    gate.watch_restore(out.data, out.index, out.term)
        else:
            client.handle_failure(voters[arg], now)
        idx = gate.readers_index
        assert idx >= seen, "the readers' state went backwards"
        seen = idx
        assert idx <= committed
        assert gate.state.snapshot() == HISTORY.images[idx]
        assert gate.applied_index <= idx
        # The vault is what the Raft feed gave, whatever the watch stream did.
        assert gate.vault.section() == HISTORY.vaults[gate.applied_index]
        kept = gate.buffer.entries_after(gate.buffer.base_index, 1 << 30) \
            if len(gate.buffer) else []
        assert not any(CA_KEY in e.data or SECRET in e.data for e in kept)
    stats = gate.statistics()
    assert stats.raft_applied + stats.watch_applied + (
        gate.readers_index - stats.raft_applied - stats.watch_applied) == gate.readers_index


@given(st.lists(st.integers(0, 40), min_size=1, max_size=12))
def test_watching_one_voter_reaches_its_state(commits: list[int]) -> None:
    """A watcher that keeps asking reaches the voter's index with the voter's state,
    whatever the voter's buffer dropped in between (entries or snapshots)."""
    buf = WatchBuffer(SMALL)
    server = WatchServer(SMALL, buf)
    gate, _ = gate_at(0)
    client = WatchClient(N("w"), SMALL)
    voter = 0
    for c in commits:
        while voter < max(voter, c):
            voter += 1
            buf.append(HISTORY.entries[voter - 1])
        for _ in range(200):
            req = client.request(N("v2"), gate.readers_index, gate.readers_term)
            ans = server.answer(req, view("v2"), functools.partial(image_at, voter), 0.0)
            if ans is None:
                break
            for out in client.handle_answer(N("v2"), req, ans, 0.0):
                if isinstance(out, ApplyEntries):
                    gate.watch_apply(out.entries)
                else:
                    gate.watch_restore(out.data, out.index, out.term)
        assert gate.readers_index == voter
        assert gate.state.snapshot() == HISTORY.images[voter]


def test_rendezvous_is_stable_and_spread() -> None:
    assert rendezvous_score(N("a"), N("b")) == rendezvous_score(N("a"), N("b"))
    firsts = {max(("v1", "v2", "v3"), key=lambda v: rendezvous_score(N(f"w{i}"), N(v)))
              for i in range(30)}
    assert firsts == {"v1", "v2", "v3"}


# ------------------------------------------------------------------ secrets


def secret_entries(start: int) -> list[Entry]:
    """A CA and a token recorded at ``start`` and ``start + 1`` (term 9)."""
    return [Entry(9, start, CaSet(b"CA CERT", CA_KEY).encode()),
            Entry(9, start + 1, TokenSet(SECRET, cas=0).encode())]


def test_gate_keeps_secrets_for_raft_and_out_of_everything_watchers_get() -> None:
    gate, buf = gate_at(5)
    for e in secret_entries(6):
        gate.apply(e)
    assert gate.vault.complete
    assert (gate.vault.key_pem, gate.vault.token_secret) == (CA_KEY, SECRET)
    # The watch buffer and the watch image hold the public part only ...
    served = buf.entries_after(5, 1 << 20)
    assert [e.index for e in served] == [6, 7]
    assert all(CA_KEY not in e.data and SECRET not in e.data for e in served)
    assert CA_KEY not in gate.state.snapshot()
    assert SECRET not in gate.state.snapshot()
    # ... a watcher that applies them has the same state and no secrets ...
    watcher, _ = gate_at(5)
    watcher.watch_apply(served)
    assert watcher.state.snapshot() == gate.state.snapshot()
    assert not watcher.vault.complete
    assert watcher.vault.version == 0
    # ... while Raft's snapshot carries the vault to a member it catches up.
    member, _ = gate_at(0)
    member.restore(gate.snapshot(), 7)
    assert (member.vault.key_pem, member.vault.token_secret) == (CA_KEY, SECRET)
    assert member.state.snapshot() == gate.state.snapshot()


def test_gate_fills_the_vault_from_raft_when_the_watch_stream_was_first() -> None:
    """A watcher promoted to learner: the readers have the entries (redacted, from
    the watch stream); Raft delivers them again, to the shadow, and the vault."""
    voter, buf = gate_at(5)
    for e in secret_entries(6):
        voter.apply(e)
    learner, _ = gate_at(5)
    learner.watch_apply(buf.entries_after(5, 1 << 20))
    assert learner.raft_behind == 2
    assert not learner.vault.complete
    behind = learner.snapshot()  # the adapter's own index, before the secrets
    assert CA_KEY not in behind
    for e in secret_entries(6):
        learner.apply(e)
    assert learner.raft_behind == 0
    assert learner.vault.complete
    assert learner.snapshot() == voter.snapshot()


def test_a_raft_snapshot_without_a_vault_empties_it() -> None:
    gate, _ = gate_at(5)
    for e in secret_entries(6):
        gate.apply(e)
    version = gate.vault.version
    gate.restore(HISTORY.images[30], 30)  # a history that never recorded a CA
    assert not gate.vault.complete
    assert gate.vault.version > version
