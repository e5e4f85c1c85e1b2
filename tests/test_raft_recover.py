"""Recovery from the loss of a majority of voters: one survivor becomes the only
voter (etcd's --force-new-cluster), keeps every write it has, and serves again."""

from __future__ import annotations

import pytest

from mesh.errors import LocalProtocolError
from mesh.raft.storage import MemoryStorage, force_new_configuration
from mesh.raft.testing import Network
from mesh.types import NodeId


def test_a_survivor_becomes_the_only_voter_and_keeps_its_writes() -> None:
    net = Network(["a", "b", "c"], seed=7)
    lead = net.wait_leader()
    for i in range(5):
        net.propose_until_committed(b"w%d" % i)
    survivor = next(n for n in ("a", "b", "c") if n != lead)
    net.tick(3)
    net.deliver_all()
    for n in ("a", "b", "c"):
        net.crash(n)
    storage = net.nodes[NodeId(survivor)].storage
    dry = force_new_configuration(storage, NodeId(survivor), apply=False)
    assert dry.voters == ("a", "b", "c")
    assert storage.last_index() == dry.last_index  # a dry run writes nothing
    done = force_new_configuration(storage, NodeId(survivor), apply=True)
    assert done.new_last_index == done.last_index + 2  # two members removed
    assert done.term == dry.term

    net.restart(survivor)
    assert net.wait_leader() == survivor
    core = net.core(survivor)
    assert core.conf_state.voters == (survivor,)
    assert core.conf_state.learners == ()
    net.propose_until_committed(b"after")
    applied = net.nodes[NodeId(survivor)].sm.commands()
    assert [c for c in applied if c.startswith(b"w")] == [b"w%d" % i for i in range(5)]
    assert applied[-1] == b"after"


def test_entries_never_committed_become_committed_and_are_counted() -> None:
    net = Network(["a", "b", "c"], seed=3)
    lead = net.wait_leader()
    net.propose_until_committed(b"acked")
    others = [n for n in ("a", "b", "c") if n != lead]
    net.isolate(lead)
    net.core(lead).propose(b"never-acked")  # cannot commit without the others
    net.process(lead)
    for n in others:
        net.crash(n)
    net.crash(lead)
    storage = net.nodes[NodeId(lead)].storage
    rec = force_new_configuration(storage, NodeId(lead), apply=True)
    assert rec.uncommitted >= 1
    net.recover()
    net.restart(lead)
    assert net.wait_leader() == lead
    assert b"never-acked" in net.nodes[NodeId(lead)].sm.commands()


def test_nothing_to_recover_in_an_empty_storage() -> None:
    with pytest.raises(LocalProtocolError, match="nothing to recover"):
        force_new_configuration(MemoryStorage(), NodeId("a"), apply=False)


def test_a_follower_restored_from_an_old_copy_catches_up_without_a_leader_change() -> None:
    import copy

    net = Network(["a", "b", "c"], seed=11)
    lead = net.wait_leader()
    stale = next(n for n in ("a", "b", "c") if n != lead)
    net.propose_until_committed(b"early")
    net.tick(3)
    net.deliver_all()
    old_copy = copy.deepcopy(net.nodes[NodeId(stale)].storage)
    for i in range(30):
        net.propose_until_committed(b"late%d" % i)
    net.tick(3)
    net.deliver_all()
    term = net.core(lead).term
    net.crash(stale)
    net._mem[NodeId(stale)] = old_copy  # the node comes back from an old backup
    net.restart(stale)
    for _ in range(100):
        net.tick(1)
        net.deliver_all()
        if net.core(stale).applied_index >= net.core(lead).commit_index:
            break
    assert net.leader() == lead
    assert net.core(lead).term == term  # no election was needed
    assert net.core(stale).applied_index >= net.core(lead).commit_index
    assert net.nodes[NodeId(stale)].sm.commands()[-1] == b"late29"
