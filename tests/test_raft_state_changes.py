"""``MeshState.changes_since`` with a ``limit``: pages never split one log index.

One entry may make several changes, all at its index (an allocation plan today,
several KV commands in one entry later). A watcher resumes with
``changes_since(last.index)``, so a page that stopped inside an index would lose
the rest of it. Plain tests with allocation plans, and a Hypothesis property:
paging through the changes with any limit and filter gives exactly the
unlimited list.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.raft.messages import Entry
from mesh.raft.state import (
    AllocPlan,
    Change,
    Command,
    KvDelete,
    KvPut,
    MeshState,
    NodeSet,
    RunOp,
    ServicePut,
    Table,
)
from mesh.raft.storage import Compacted
from mesh.types import NodeId, ServiceId

WEB, DB = ServiceId("web"), ServiceId("db")
N1 = NodeId("n1")


def apply_all(sm: MeshState, commands: list[Command]) -> None:
    for cmd in commands:
        sm.apply(Entry(2, sm.applied_index + 1, cmd.encode()))


def runs(*services: ServiceId) -> AllocPlan:
    """One plan starting a replica of each service given: one change per op,
    all at the plan's index."""
    return AllocPlan(tuple(RunOp(s, i, N1, 1) for i, s in enumerate(services)))


def indexes(changes: list[Change]) -> list[int]:
    return [c.index for c in changes]


def test_limit_runs_on_to_the_end_of_the_last_index() -> None:
    sm = MeshState()
    apply_all(sm, [ServicePut(WEB, b"spec"),   # 1
                   runs(WEB, WEB, WEB),        # 2: three changes
                   KvPut("k", b"v")])          # 3
    assert indexes(sm.changes_since(0)) == [1, 2, 2, 2, 3]
    assert indexes(sm.changes_since(0, limit=1)) == [1]
    assert indexes(sm.changes_since(0, limit=2)) == [1, 2, 2, 2]   # not [1, 2]
    assert indexes(sm.changes_since(0, limit=4)) == [1, 2, 2, 2]
    assert indexes(sm.changes_since(1, limit=1)) == [2, 2, 2]
    assert indexes(sm.changes_since(2, limit=1)) == [3]
    assert indexes(sm.changes_since(0, table=Table.ALLOC, limit=1)) == [2, 2, 2]


def test_the_rest_of_the_cut_index_is_filtered_too() -> None:
    sm = MeshState()
    apply_all(sm, [ServicePut(WEB, b"spec"), ServicePut(DB, b"spec"),   # 1, 2
                   runs(WEB, DB, WEB),                                   # 3
                   runs(WEB)])                                           # 4
    page = sm.changes_since(2, table=Table.ALLOC, prefix="web-", limit=1)
    assert indexes(page) == [3, 3]
    assert all(c.key.startswith("web-") for c in page)
    assert indexes(sm.changes_since(3, table=Table.ALLOC, prefix="web-", limit=1)) == [4]


def test_a_limit_below_one_is_a_bug() -> None:
    sm = MeshState()
    apply_all(sm, [KvPut("k", b"v")])
    with pytest.raises(AssertionError):
        sm.changes_since(0, limit=0)


def test_an_index_partly_dropped_from_the_event_list_counts_as_seen() -> None:
    sm = MeshState(max_events=2)
    apply_all(sm, [ServicePut(WEB, b"spec"), runs(WEB, WEB, WEB)])  # 1, then 2 x3
    assert sm.first_change_index == 2   # one change of index 2 dropped
    assert sm.changes_since(2) == []
    with pytest.raises(Compacted):
        sm.changes_since(1, limit=1)


# ------------------------------------------------------------------ property

_KEYS = st.sampled_from(["a/1", "a/2", "b/1", "web"])
_COMMANDS = st.lists(
    st.one_of(
        st.builds(KvPut, _KEYS, st.just(b"v")),
        st.builds(KvDelete, _KEYS),
        st.lists(st.sampled_from([WEB, DB]), min_size=1, max_size=4).map(
            lambda svcs: runs(*svcs)),
    ),
    max_size=30,
)
_FILTERS = st.sampled_from([(None, ""), (Table.KV, ""), (Table.KV, "a/"), (None, "web"),
                            (Table.ALLOC, "db-"), (Table.ALLOC, "")])


@given(commands=_COMMANDS, limit=st.integers(1, 5), where=_FILTERS,
       max_events=st.sampled_from([2, 5, 10, 1000]), data=st.data())
def test_paging_with_any_limit_gives_the_unlimited_list(
    commands: list[Command], limit: int, where: tuple[Table | None, str], max_events: int,
    data: st.DataObject,
) -> None:
    sm = MeshState(max_events=max_events)
    apply_all(sm, [ServicePut(WEB, b"spec"), ServicePut(DB, b"spec"), *commands])
    table, prefix = where
    start = data.draw(st.integers(sm.first_change_index, sm.applied_index), label="start")
    full = sm.changes_since(start, table=table, prefix=prefix)
    paged: list[Change] = []
    after = start
    while page := sm.changes_since(after, table=table, prefix=prefix, limit=limit):
        last = page[-1].index
        # cut only because of the limit, and only at the end of an index
        assert sum(c.index < last for c in page) < limit
        assert len(page) >= limit or page[-1] == full[-1]
        paged += page
        after = last
    assert paged == full


def test_a_table_filter_is_compacted_only_by_its_own_dropped_changes() -> None:
    sm = MeshState(max_events=3)
    apply_all(sm, [NodeSet(NodeId("n1"), True), *(KvPut(f"k{i}", b"v") for i in range(5))])
    # The node change (index 1) was dropped from the list, the last 3 puts kept.
    with pytest.raises(Compacted):
        sm.changes_since(0)
    with pytest.raises(Compacted):
        sm.changes_since(0, table=Table.NODE)
    assert sm.changes_since(1, table=Table.NODE) == []  # dropped puts do not matter
    assert sm.changes_since(1, table=(Table.ALLOC, Table.SERVICE)) == []
    with pytest.raises(Compacted):
        sm.changes_since(1, table=Table.KV)
    assert indexes(sm.changes_since(3, table=Table.KV)) == [4, 5, 6]
    sm.restore(sm.snapshot(), sm.applied_index)  # a restore drops every table's history
    with pytest.raises(Compacted):
        sm.changes_since(1, table=Table.NODE)
    assert sm.changes_since(6, table=Table.NODE) == []
