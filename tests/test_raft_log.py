"""RaftLog unit tests and single-core edge cases (restart, limits, unreachable peers)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mesh.raft.config import RaftConfig
from mesh.raft.core import ProgressState, RaftCore, Role
from mesh.raft.log import RaftLog
from mesh.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    RaftMessage,
    SnapshotMeta,
)
from mesh.raft.storage import Compacted, MemoryStorage, bootstrap
from mesh.raft.testing import Network
from mesh.types import NodeId

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def _log(terms: list[int]) -> RaftLog:
    s = MemoryStorage()
    s.save(HardState(max(terms, default=0)), [Entry(t, i) for i, t in enumerate(terms, 1)], None)
    return RaftLog(s)


def test_find_conflict_by_term_skips_whole_terms() -> None:
    log = _log([1, 1, 2, 2, 2, 5, 5, 5])
    assert log.find_conflict_by_term(8, 5) == (8, 5)
    assert log.find_conflict_by_term(8, 4) == (5, 2)
    assert log.find_conflict_by_term(8, 1) == (2, 1)
    assert log.find_conflict_by_term(8, 0) == (0, 0)
    assert log.find_conflict_by_term(20, 5) == (20, 0)  # beyond the log: unknown


def test_maybe_append_truncates_conflicting_suffix() -> None:
    log = _log([1, 1, 1, 1])
    assert log.maybe_append(2, 1, 3, [Entry(2, 3), Entry(2, 4), Entry(2, 5)]) == 5
    assert [log.term(i) for i in range(1, 6)] == [1, 1, 2, 2, 2]
    assert log.committed == 3
    assert log.maybe_append(5, 9, 5, []) is None  # consistency check fails
    assert log.maybe_append(5, 2, 10, []) == 5  # commit capped at the last new index
    assert log.committed == 5
    # Entries already present are not re-appended.
    log.storage.save(None, list(log.unstable.entries), None)
    log.stable_to(5, 2)
    assert log.maybe_append(3, 2, 5, [Entry(2, 4)]) == 4
    assert log.unstable.entries == []


def test_slice_spans_storage_and_unstable_parts() -> None:
    log = _log([1, 1, 1])
    log.append([Entry(2, 4, b"xx"), Entry(2, 5, b"yy")])
    assert [e.index for e in log.slice(2, 6, None)] == [2, 3, 4, 5]
    assert [e.index for e in log.slice(3, 6, 2)] == [3, 4]  # index 3 is empty
    log.storage.save(None, [], None)
    s = log.storage
    assert isinstance(s, MemoryStorage)
    s.create_snapshot(2, s.initial_state()[1], b"")
    s.compact(2)
    with pytest.raises(Compacted):
        log.slice(2, 4, None)


def _cfg(**kw: object) -> RaftConfig:
    return dataclasses.replace(RaftConfig(election_ticks=10, heartbeat_ticks=1), **kw)  # type: ignore[arg-type]


def test_restart_with_applied_replays_membership_without_redelivery() -> None:
    s = MemoryStorage()
    bootstrap(s, [A, B, C])
    core = RaftCore(_cfg(), A, s, random.Random(1), applied=3)
    assert core.conf_state.voters == (A, B, C)
    rd = core.ready()
    assert rd is None or rd.committed_entries == ()
    core2 = RaftCore(_cfg(), A, s, random.Random(1))
    rd2 = core2.ready()
    assert rd2 is not None
    assert [e.kind for e in rd2.committed_entries] == [EntryKind.CONF_CHANGE] * 3


def test_oversized_snapshot_is_rejected_without_harm() -> None:
    net = Network(["a", "b", "c"], seed=3, config=_cfg(max_snapshot_bytes=16))
    lead = net.wait_leader()
    lagger = next(n for n in "abc" if n != lead)
    net.crash(lagger)
    for i in range(20):
        net.propose(lead, b"entry-%d" % i)
    net.deliver_all()
    net.tick(2)
    net.compact(lead)
    net.restart(lagger)
    net.tick(30)
    assert net.core(lagger).commit_index < net.core(lead).commit_index
    assert net.core(lead).role is Role.LEADER


def test_report_unreachable_moves_peer_to_probe() -> None:
    net = Network(["a", "b", "c"], seed=4)
    lead = net.wait_leader()
    net.tick(2)
    peer = next(n for n in "abc" if n != lead)
    core = net.core(lead)
    assert core.status().progress[NodeId(peer)].state is ProgressState.REPLICATE
    core.report_unreachable(NodeId(peer))
    assert core.status().progress[NodeId(peer)].state is ProgressState.PROBE
    net.tick(2)
    assert core.status().progress[NodeId(peer)].state is ProgressState.REPLICATE


def test_misrouted_and_bogus_messages_are_ignored() -> None:
    net = Network(["a", "b", "c"], seed=5)
    lead = net.wait_leader()
    core = net.core(lead)
    term, last = core.term, core.last_index
    peer = next(n for n in "abc" if n != lead)
    bogus: list[RaftMessage] = [
        AppendEntriesResponse(NodeId(peer), NodeId("zz"), term, 5),  # not for us
        AppendEntriesResponse(NodeId(peer), NodeId(lead), term, last + 100),  # beyond our log
        AppendEntriesResponse(NodeId("stranger"), NodeId(lead), term, 1),
        AppendEntries(NodeId(peer), NodeId(lead), term, 0, 0, 0),  # a second leader?
        InstallSnapshot(NodeId("stranger"), NodeId(lead), term - 1, _meta(), 1, 0, b"x", True),
    ]
    for m in bogus:
        core.step(m)
    assert core.role is Role.LEADER
    assert core.commit_index <= core.last_index == last


def _meta() -> SnapshotMeta:
    return SnapshotMeta(1, 1, ConfState.of([A]))


def test_add_learner_on_voter_is_refused() -> None:
    net = Network(["a", "b", "c"], seed=6)
    lead = net.wait_leader()
    net.tick(2)
    from mesh.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, NodeId(lead)))
    with pytest.raises(LocalProtocolError):
        net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.PROMOTE, NodeId("zz")))
    with pytest.raises(LocalProtocolError):
        net.core(lead).propose_conf_change(ConfChange(ConfChangeKind.REMOVE, NodeId("zz")))
