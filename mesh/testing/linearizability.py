"""A linearizability checker for key-value histories (Wing & Gong, Lowe; porcupine).

Theory of operation
===================

A *history* is what clients saw: each :class:`Operation` was invoked at one
time and returned at a later one with an output. An operation that never
returned (the client timed out, its node crashed) has an *unknown outcome*:
it may or may not have taken effect, at any time after its invocation. The
history is *linearizable* (Herlihy & Wing 1990) if every operation can be
given one instant inside its [invoke, return] interval such that running the
operations one at a time in that order, against a sequential model, produces
exactly the outputs the clients saw.

The search is Wing & Gong's (1993) as improved by Lowe (2017, "Testing for
linearizability", the "WGL" algorithm that porcupine and Knossos implement):
a depth-first search that repeatedly picks a *minimal* operation (one that no
pending operation precedes in real time, i.e. none returned before it was
invoked), steps the model with it and backtracks when the model rejects the
output. Lowe's cache remembers every (set of linearized operations, model
state) already explored, which turns the exponential search into one bounded
by the number of distinct configurations; here a configuration is also
skipped when a seen one with the same completed operations and state had
linearized a subset of its unknown-outcome operations (it can do no more).

Two reductions keep it small:

* **P-compositionality** (Herlihy & Wing, Theorem 1; Horn & Kroening 2015):
  a history is linearizable iff each per-object sub-history is, and every key
  of a key-value store is an independent register. :func:`check_kv` checks
  each key on its own, so the cost grows with the concurrency per key, not
  with the length of the run.
* **Unknown outcomes** are given an infinite return time (porcupine's rule).
  A put, delete or compare-and-swap is legal in every state, so an unknown
  one can always be placed after everything else, where it changes nothing
  observable: the search therefore succeeds as soon as every *completed*
  operation is linearized, and an unknown operation is linearized earlier
  only when some read needs its effect. An unknown read constrains nothing
  and is ignored.
* A read that is minimal and legal in the current state is linearized at once
  without branching: reads do not change the state, every operation that must
  precede it is already placed, and moving it earlier in any successful order
  keeps that order successful.

The search is bounded (``max_steps`` per key): past the bound the verdict is
:attr:`Outcome.UNKNOWN`, never a hang. On failure, the counterexample is the
earliest *culprit*: the operation whose return first makes a prefix of the
key's history non-linearizable (found by bisection over return times;
truncating a history at a time keeps it linearizable if it was), together
with the operations concurrent with it and the last few that completed
before it was invoked.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NewType, TypeAlias

ClientId = NewType("ClientId", str)
"""Who issued an operation (a simulated client)."""

Value: TypeAlias = bytes | str | int | None
"""A register value; ``None`` means the key is absent."""

DEFAULT_MAX_STEPS: Final = 1_000_000
"""Search steps allowed per key before the verdict is :attr:`Outcome.UNKNOWN`."""

_CONTEXT_BEFORE: Final = 3
"""Operations completed before the culprit's invocation shown in a counterexample."""


class OpKind(enum.Enum):
    """What an operation does to its key's register."""

    PUT = "put"
    """Set the value (``input``); output unchecked."""
    GET = "get"
    """Read; ``output`` is the value seen (``None``: absent)."""
    DELETE = "delete"
    """Remove the key; output unchecked."""
    CAS = "cas"
    """Compare-and-swap: ``input`` is a :class:`CasInput`; ``output`` is True
    if the swap happened, False if the current value differed."""


@dataclass(frozen=True, slots=True)
class CasInput:
    """Arguments of a compare-and-swap."""

    expected: Value
    """Swap only if the current value equals this (``None``: only if absent)."""
    new: Value
    """The value written on success."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation as observed from outside the system."""

    client: ClientId
    kind: OpKind
    key: str
    input: Value | CasInput
    """PUT: the value; CAS: a :class:`CasInput`; GET/DELETE: ``None``."""
    output: Value | bool
    """GET: the value read; CAS: whether it swapped; PUT/DELETE: ignored.
    Ignored for unknown outcomes."""
    invoke: float
    """When the client called (any consistent logical time)."""
    ret: float | None
    """When the client got the answer; ``None``: unknown outcome."""

    def __post_init__(self) -> None:
        if self.ret is not None and self.ret < self.invoke:
            raise ValueError(f"operation returns before it is invoked: {self}")
        if (self.kind is OpKind.CAS) != isinstance(self.input, CasInput):
            raise ValueError(f"CAS and only CAS takes a CasInput: {self}")

    @property
    def unknown(self) -> bool:
        """The operation never returned: it may or may not have taken effect."""
        return self.ret is None

    def describe(self) -> str:
        """A one-line rendering for counterexamples."""
        end = "?" if self.ret is None else f"{self.ret:g}"
        if self.kind is OpKind.GET:
            what = f"get({self.key!r}) -> {'?' if self.ret is None else repr(self.output)}"
        elif self.kind is OpKind.PUT:
            what = f"put({self.key!r}, {self.input!r})"
        elif self.kind is OpKind.DELETE:
            what = f"delete({self.key!r})"
        else:
            assert isinstance(self.input, CasInput)
            out = "?" if self.ret is None else repr(self.output)
            what = f"cas({self.key!r}, {self.input.expected!r} -> {self.input.new!r}) -> {out}"
        return f"[{self.invoke:g}, {end}] {self.client}: {what}"


class History:
    """Records operations as a test's clients invoke them and get answers.

    Operations still open when :meth:`operations` is called have unknown
    outcomes.
    """

    def __init__(self) -> None:
        self._open: dict[int, Operation] = {}
        self._ops: list[Operation | None] = []

    def invoke(
        self, client: ClientId, kind: OpKind, key: str, input: Value | CasInput, now: float
    ) -> int:
        """Record a call; returns a handle for :meth:`complete` or :meth:`fail`."""
        op = Operation(client, kind, key, input, None, now, None)
        self._ops.append(op)
        handle = len(self._ops) - 1
        self._open[handle] = op
        return handle

    def complete(self, handle: int, output: Value | bool, now: float) -> None:
        """Record the answer of an open operation."""
        op = self._open.pop(handle)
        self._ops[handle] = Operation(op.client, op.kind, op.key, op.input, output, op.invoke, now)

    def fail(self, handle: int) -> None:
        """Forget an operation known *not* to have taken effect (e.g. refused)."""
        del self._open[handle]
        self._ops[handle] = None

    def operations(self) -> list[Operation]:
        """Every recorded operation that may have taken effect, in invoke order."""
        return [op for op in self._ops if op is not None]


class Outcome(enum.Enum):
    """The checker's verdict."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"
    """The step limit was reached before a verdict."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict, and on failure a counterexample."""

    outcome: Outcome
    key: str | None = None
    """FAILED/UNKNOWN: the (first) key whose sub-history is the problem."""
    culprit: Operation | None = None
    """FAILED: the operation whose return first makes the history non-linearizable."""
    operations: tuple[Operation, ...] = ()
    """FAILED: the culprit, the operations concurrent with it and the last few
    completed before it was invoked, in invoke order."""
    steps: int = 0
    """Search steps spent, over all keys."""
    keys_checked: int = 0

    @property
    def ok(self) -> bool:
        """The history is linearizable."""
        return self.outcome is Outcome.OK

    def describe(self) -> str:
        """A human-readable report (for assertion messages)."""
        if self.outcome is Outcome.OK:
            return f"linearizable ({self.keys_checked} keys, {self.steps} steps)"
        if self.outcome is Outcome.UNKNOWN:
            return f"unknown: step limit reached on key {self.key!r} ({self.steps} steps)"
        lines = [f"not linearizable: key {self.key!r}"]
        if self.culprit is not None:
            lines.append(f"  culprit: {self.culprit.describe()}")
        lines.extend(f"  {op.describe()}" for op in self.operations)
        return "\n".join(lines)


def _step(op: Operation, state: Value) -> tuple[bool, Value]:
    """The sequential register model: (output legal?, next state)."""
    if op.kind is OpKind.PUT:
        assert not isinstance(op.input, CasInput)
        return True, op.input
    if op.kind is OpKind.DELETE:
        return True, None
    if op.kind is OpKind.GET:
        return op.unknown or op.output == state, state
    assert isinstance(op.input, CasInput)
    swapped = state == op.input.expected
    if op.unknown:
        return True, op.input.new if swapped else state
    if op.output is not swapped:
        return False, state
    return True, op.input.new if swapped else state


@dataclass(slots=True)
class _Search:
    """One key's WGL search (ops sorted by invoke; unknown ones return at +inf)."""

    ops: Sequence[Operation]
    initial: Value
    max_steps: int
    steps: int = 0
    _rets: list[float] = field(default_factory=list)

    def run(self) -> Outcome:
        """Search for a linearization of every completed operation."""
        ops = self.ops
        n = len(ops)
        self._rets = [math.inf if op.ret is None else op.ret for op in ops]
        done_mask = 0
        for i, op in enumerate(ops):
            if op.ret is not None:
                done_mask |= 1 << i
        if done_mask == 0:
            return Outcome.OK
        # Lowe's cache with subsumption: per (completed ops linearized, state),
        # the sets of unknown-outcome ops linearized so far. A configuration
        # whose set contains one already seen is dominated (it has fewer
        # options left: unknown ops never constrain the frontier), so it is
        # skipped. Without this every unknown write doubles the search.
        seen: dict[tuple[int, Value], list[int]] = {}
        start = self._close_reads(0, self.initial)
        seen[(start[0], start[1])] = [0]
        stack: list[tuple[int, Value]] = [start]
        while stack:
            mask, state = stack.pop()
            if mask & done_mask == done_mask:
                return Outcome.OK
            self.steps += 1
            if self.steps > self.max_steps:
                return Outcome.UNKNOWN
            # Minimal operations: invoked no later than the earliest return
            # among the operations not yet linearized.
            frontier = min(self._rets[i] for i in range(n) if not mask >> i & 1)
            for i in range(n - 1, -1, -1):
                if mask >> i & 1 or ops[i].invoke > frontier:
                    continue
                legal, nxt = _step(ops[i], state)
                if not legal:
                    continue
                cfg = self._close_reads(mask | 1 << i, nxt)
                unknown = cfg[0] & ~done_mask
                known = seen.setdefault((cfg[0] & done_mask, cfg[1]), [])
                if any(u & ~unknown == 0 for u in known):
                    continue
                known[:] = [u for u in known if unknown & ~u != 0]
                known.append(unknown)
                stack.append(cfg)
        return Outcome.FAILED

    def _close_reads(self, mask: int, state: Value) -> tuple[int, Value]:
        """Linearize every minimal read that is legal in ``state`` (see module doc)."""
        ops = self.ops
        n = len(ops)
        changed = True
        while changed:
            changed = False
            open_rets = [self._rets[i] for i in range(n) if not mask >> i & 1]
            if not open_rets:
                break
            frontier = min(open_rets)
            for i in range(n):
                op = ops[i]
                if mask >> i & 1 or op.invoke > frontier or op.kind is not OpKind.GET:
                    continue
                if op.output == state and op.ret is not None:
                    mask |= 1 << i
                    changed = True
        return mask, state


def _truncate(ops: Sequence[Operation], t: float) -> list[Operation]:
    """The history as it stood at time ``t``: later invocations dropped, later
    returns turned into unknown outcomes."""
    out = []
    for op in ops:
        if op.invoke > t:
            continue
        if op.ret is not None and op.ret > t:
            op = Operation(op.client, op.kind, op.key, op.input, None, op.invoke, None)
        out.append(op)
    return out


def _counterexample(
    ops: Sequence[Operation], initial: Value, max_steps: int
) -> tuple[Operation | None, tuple[Operation, ...], int]:
    """Bisect for the earliest return time at which the history fails."""
    times = sorted({op.ret for op in ops if op.ret is not None})
    lo, hi = 0, len(times) - 1  # the full history (times[hi]) fails
    steps = 0
    while lo < hi:
        mid = (lo + hi) // 2
        search = _Search(_truncate(ops, times[mid]), initial, max_steps)
        verdict = search.run()
        steps += search.steps
        if verdict is Outcome.FAILED:
            hi = mid
        else:
            lo = mid + 1  # UNKNOWN counts as passing: the culprit is then later
    t = times[hi]
    culprit = next(op for op in ops if op.ret == t)
    related = [op for op in ops if op.invoke <= t and (op.ret is None or op.ret >= culprit.invoke)]
    before = [op for op in ops if op.ret is not None and op.ret < culprit.invoke]
    before.sort(key=lambda op: (op.ret or 0.0, op.invoke))
    shown = before[-_CONTEXT_BEFORE:] + related
    shown.sort(key=lambda op: (op.invoke, op.ret if op.ret is not None else math.inf))
    return culprit, tuple(shown), steps


def check_kv(
    operations: Iterable[Operation],
    *,
    initial: Value = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> CheckResult:
    """Check a key-value history for linearizability, one key at a time.

    Args:
        operations: the history, in any order.
        initial: every key's value before the history (``None``: absent).
        max_steps: search steps allowed per key.

    Returns:
        OK, FAILED with a counterexample (the first failing key in sorted
        order), or UNKNOWN if some key hit the step limit and none failed.
    """
    by_key: dict[str, list[Operation]] = {}
    for op in operations:
        if op.kind is OpKind.GET and op.ret is None:
            continue  # an unanswered read constrains nothing
        by_key.setdefault(op.key, []).append(op)
    steps = 0
    unknown_key: str | None = None
    for key in sorted(by_key):
        ops = sorted(
            by_key[key], key=lambda op: (op.invoke, op.ret if op.ret is not None else math.inf)
        )
        search = _Search(ops, initial, max_steps)
        verdict = search.run()
        steps += search.steps
        if verdict is Outcome.FAILED:
            culprit, shown, extra = _counterexample(ops, initial, max_steps)
            return CheckResult(Outcome.FAILED, key, culprit, shown, steps + extra, len(by_key))
        if verdict is Outcome.UNKNOWN and unknown_key is None:
            unknown_key = key
    if unknown_key is not None:
        return CheckResult(Outcome.UNKNOWN, unknown_key, steps=steps, keys_checked=len(by_key))
    return CheckResult(Outcome.OK, steps=steps, keys_checked=len(by_key))
