"""The WGL linearizability checker on hand-written and generated histories."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.testing.linearizability import (
    CasInput,
    ClientId,
    History,
    Operation,
    OpKind,
    Outcome,
    Value,
    check_kv,
)

A, B, C = ClientId("a"), ClientId("b"), ClientId("c")


def put(c: ClientId, key: str, v: Value, t0: float, t1: float | None) -> Operation:
    return Operation(c, OpKind.PUT, key, v, None, t0, t1)


def get(c: ClientId, key: str, out: Value, t0: float, t1: float | None) -> Operation:
    return Operation(c, OpKind.GET, key, None, out, t0, t1)


def delete(c: ClientId, key: str, t0: float, t1: float | None) -> Operation:
    return Operation(c, OpKind.DELETE, key, None, None, t0, t1)


def cas(
    c: ClientId, key: str, old: Value, new: Value, ok: bool, t0: float, t1: float | None
) -> Operation:
    return Operation(c, OpKind.CAS, key, CasInput(old, new), ok, t0, t1)


# ---------------------------------------------------------------- hand-written


def test_empty_and_sequential_histories_are_linearizable() -> None:
    assert check_kv([]).ok
    h = [
        get(A, "k", None, 0, 1),
        put(A, "k", 1, 2, 3),
        get(B, "k", 1, 4, 5),
        delete(A, "k", 6, 7),
        get(B, "k", None, 8, 9),
    ]
    res = check_kv(h)
    assert res.outcome is Outcome.OK, res.describe()
    assert res.keys_checked == 1


def test_concurrent_operations_linearize_in_some_order() -> None:
    # Two overlapping writes; readers after both see one of them, consistently.
    h = [
        put(A, "k", 1, 0, 10),
        put(B, "k", 2, 1, 9),
        get(C, "k", 1, 11, 12),
        get(C, "k", 1, 13, 14),
    ]
    assert check_kv(h).ok
    # A read overlapping a write may see the old or the new value.
    h2 = [put(A, "k", 1, 0, 1), put(B, "k", 2, 2, 10), get(C, "k", 1, 3, 4), get(C, "k", 2, 5, 6)]
    assert check_kv(h2).ok


def test_stale_read_after_completed_write_is_not_linearizable() -> None:
    h = [
        put(A, "k", 1, 0, 1),
        put(A, "k", 2, 2, 3),
        get(B, "k", 1, 4, 5),  # 2 was acknowledged before this read began
    ]
    res = check_kv(h)
    assert res.outcome is Outcome.FAILED
    assert res.key == "k"
    assert res.culprit == h[2]
    assert h[1] in res.operations
    assert "not linearizable" in res.describe()


def test_reads_going_back_in_time_are_not_linearizable() -> None:
    # Both reads overlap the write, but once one saw 2 a later one cannot see 1.
    h = [put(A, "k", 1, 0, 1), put(A, "k", 2, 2, 20), get(B, "k", 2, 3, 4), get(C, "k", 1, 5, 6)]
    assert check_kv(h).outcome is Outcome.FAILED


def test_lost_acknowledged_write_is_not_linearizable() -> None:
    h = [put(A, "k", 1, 0, 1), get(B, "k", None, 2, 3)]
    res = check_kv(h)
    assert res.outcome is Outcome.FAILED
    assert res.culprit == h[1]


def test_unknown_outcome_write_may_or_may_not_apply() -> None:
    w = put(A, "k", 1, 0, None)
    assert check_kv([w, get(B, "k", None, 5, 6)]).ok
    assert check_kv([w, get(B, "k", 1, 5, 6)]).ok
    # ...but once it is seen it stays applied, and it cannot apply before it was invoked.
    assert not check_kv([w, get(B, "k", 1, 5, 6), get(B, "k", None, 7, 8)]).ok
    late = put(A, "k", 1, 10, None)
    assert not check_kv([late, get(B, "k", 1, 5, 6)]).ok
    # An unknown read constrains nothing.
    assert check_kv([put(A, "k", 1, 0, 1), get(B, "k", 7, 2, None)]).ok


def test_unknown_delete_may_take_effect_late() -> None:
    h = [
        put(A, "k", 1, 0, 1),
        delete(B, "k", 2, None),
        get(C, "k", 1, 10, 11),
        get(C, "k", None, 100, 101),
    ]
    assert check_kv(h).ok


def test_compare_and_swap() -> None:
    ok = [
        put(A, "k", 1, 0, 1),
        cas(B, "k", 1, 2, True, 2, 3),
        cas(C, "k", 1, 3, False, 4, 5),
        get(A, "k", 2, 6, 7),
        cas(A, "k", None, 9, False, 8, 9),
        cas(B, "j", None, 9, True, 0, 1),  # CAS on an absent key
        get(B, "j", 9, 2, 3),
    ]
    assert check_kv(ok).ok
    # Two concurrent CASes from the same value cannot both succeed.
    both = [put(A, "k", 1, 0, 1), cas(B, "k", 1, 2, True, 2, 5), cas(C, "k", 1, 3, True, 2, 5)]
    assert check_kv(both).outcome is Outcome.FAILED
    # A failed CAS must have seen a different value.
    bad = [put(A, "k", 1, 0, 1), cas(B, "k", 1, 2, False, 2, 3)]
    assert check_kv(bad).outcome is Outcome.FAILED
    # An unknown CAS applies only if its expectation held.
    unk = [put(A, "k", 1, 0, 1), cas(B, "k", 5, 2, False, 2, None), get(C, "k", 2, 3, 4)]
    assert check_kv(unk).outcome is Outcome.FAILED
    unk_ok = [put(A, "k", 1, 0, 1), cas(B, "k", 1, 2, False, 2, None), get(C, "k", 2, 3, 4)]
    assert check_kv(unk_ok).ok


def test_keys_are_checked_independently_and_failure_names_the_key() -> None:
    h = [
        put(A, "x", 1, 0, 1),
        put(A, "y", 1, 0, 1),
        get(B, "x", 1, 2, 3),
        get(B, "y", 2, 2, 3),
    ]
    res = check_kv(h)
    assert res.outcome is Outcome.FAILED
    assert res.key == "y"
    assert all(op.key == "y" for op in res.operations)


def test_step_limit_reports_unknown() -> None:
    # Many concurrent writes and a read of a value nobody wrote: the search has
    # to explore every order before failing, which the limit cuts short.
    h = [put(ClientId(f"c{i}"), "k", i, 0, 100) for i in range(16)]
    h.append(get(A, "k", -1, 101, 102))
    res = check_kv(h, max_steps=50)
    assert res.outcome is Outcome.UNKNOWN
    assert res.key == "k"
    assert not res.ok


def test_many_concurrent_writes_check_quickly() -> None:
    # The cache keeps this polynomial: 14 overlapping writes then a read of one.
    h = [put(ClientId(f"c{i}"), "k", i, 0, 100) for i in range(14)]
    h.append(get(A, "k", 5, 101, 102))
    res = check_kv(h)
    assert res.ok
    assert res.steps < 100_000


def test_history_recorder() -> None:
    h = History()
    h.invoke(A, OpKind.PUT, "k", 1, 0)
    r = h.invoke(B, OpKind.GET, "k", None, 1)
    refused = h.invoke(C, OpKind.PUT, "k", 9, 1)
    h.complete(r, 1, 2)
    h.fail(refused)
    ops = h.operations()
    assert [op.kind for op in ops] == [OpKind.PUT, OpKind.GET]
    assert ops[0].unknown
    assert not ops[1].unknown
    assert check_kv(ops).ok


def test_invalid_operations_are_rejected() -> None:
    with pytest.raises(ValueError, match="returns before"):
        put(A, "k", 1, 5, 4)
    with pytest.raises(ValueError, match="CasInput"):
        Operation(A, OpKind.CAS, "k", 1, True, 0, 1)


# ---------------------------------------------------------------- generated


@st.composite
def atomic_histories(draw: st.DrawFn) -> list[Operation]:
    """Run ops atomically against a dict at a random point inside their interval."""
    n = draw(st.integers(1, 14))
    keys = ["k1", "k2"]
    specs = []
    for i in range(n):
        t0 = draw(st.integers(0, 40))
        length = draw(st.integers(0, 15))
        point = t0 + draw(st.floats(0, 1)) * length
        kind = draw(st.sampled_from(list(OpKind)))
        key = draw(st.sampled_from(keys))
        unknown = kind is not OpKind.GET and draw(st.integers(0, 5)) == 0
        applies = not unknown or draw(st.booleans())
        specs.append((point, i, t0, t0 + length, kind, key, unknown, applies))
    state: dict[str, Value] = {}
    ops: list[Operation] = []
    for point, i, t0, t1, kind, key, unknown, applies in sorted(specs, key=lambda s: s[:2]):
        del point
        client = ClientId(f"c{i}")
        ret = None if unknown else float(t1)
        cur = state.get(key)
        if kind is OpKind.PUT:
            if applies:
                state[key] = i
            ops.append(Operation(client, kind, key, i, None, t0, ret))
        elif kind is OpKind.DELETE:
            if applies:
                state.pop(key, None)
            ops.append(Operation(client, kind, key, None, None, t0, ret))
        elif kind is OpKind.GET:
            ops.append(Operation(client, kind, key, None, cur, t0, ret))
        else:
            expected = draw(st.sampled_from([cur, None, 0, 1, 2]))
            swapped = cur == expected
            if applies and swapped:
                state[key] = i
            ops.append(Operation(client, kind, key, CasInput(expected, i), swapped, t0, ret))
    return ops


@given(atomic_histories())
@settings(max_examples=300, deadline=None)
def test_atomic_executions_are_linearizable(ops: list[Operation]) -> None:
    res = check_kv(ops)
    assert res.ok, res.describe()


@given(atomic_histories(), st.data())
@settings(max_examples=300, deadline=None)
def test_reading_a_value_never_written_is_not_linearizable(
    ops: list[Operation], data: st.DataObject
) -> None:
    reads = [i for i, op in enumerate(ops) if op.kind is OpKind.GET and op.ret is not None]
    if not reads:
        ops = [*ops, get(A, "k1", None, 0, 0)]
        reads = [len(ops) - 1]
    i = data.draw(st.sampled_from(reads))
    r = ops[i]
    ops[i] = Operation(r.client, r.kind, r.key, r.input, "never written", r.invoke, r.ret)
    res = check_kv(ops)
    assert res.outcome is Outcome.FAILED
    assert res.key == r.key
    assert res.culprit is not None
    assert res.culprit.key == r.key


# ---------------------------------------------------------------- reference


def _brute_force(ops: list[Operation]) -> bool:
    """Try every subset of unknown ops and every order: the definition, slowly."""
    done = [op for op in ops if op.ret is not None]
    maybe = [op for op in ops if op.ret is None and op.kind is not OpKind.GET]
    for r in range(len(maybe) + 1):
        for extra in itertools.combinations(maybe, r):
            chosen = done + list(extra)
            for order in itertools.permutations(chosen):
                if _legal(order):
                    return True
    return False


def _legal(order: tuple[Operation, ...]) -> bool:
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            if (b.ret if b.ret is not None else math.inf) < a.invoke:
                return False  # b finished before a started but comes after it
    state: dict[str, Value] = {}
    for op in order:
        cur = state.get(op.key)
        if op.kind is OpKind.PUT:
            assert not isinstance(op.input, CasInput)
            state[op.key] = op.input
        elif op.kind is OpKind.DELETE:
            state.pop(op.key, None)
        elif op.kind is OpKind.GET:
            if op.output != cur:
                return False
        else:
            assert isinstance(op.input, CasInput)
            swapped = cur == op.input.expected
            if op.ret is not None and op.output is not swapped:
                return False
            if swapped:
                state[op.key] = op.input.new
    return True


@st.composite
def arbitrary_histories(draw: st.DrawFn) -> list[Operation]:
    """Small histories with arbitrary (mostly wrong) outputs on one key."""
    ops = []
    for i in range(draw(st.integers(1, 5))):
        t0 = draw(st.integers(0, 6))
        ret: float | None = None if draw(st.integers(0, 4)) == 0 else t0 + draw(st.integers(0, 4))
        kind = draw(st.sampled_from(list(OpKind)))
        client = ClientId(f"c{i}")
        val = st.sampled_from([None, 0, 1, 2])
        if kind is OpKind.CAS:
            ops.append(
                Operation(
                    client, kind, "k", CasInput(draw(val), draw(val)), draw(st.booleans()), t0, ret
                )
            )
        elif kind is OpKind.PUT:
            ops.append(Operation(client, kind, "k", draw(val), None, t0, ret))
        else:
            out = draw(val) if kind is OpKind.GET else None
            ops.append(Operation(client, kind, "k", None, out, t0, ret))
    return ops


@given(arbitrary_histories())
@settings(max_examples=500, deadline=None)
def test_checker_agrees_with_brute_force(ops: list[Operation]) -> None:
    assert check_kv(ops).ok == _brute_force(ops)
