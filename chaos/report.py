"""The record of one chaos run: JSON, a human summary and a timeline PNG.

:func:`build_report` turns what the runner collected into one JSON-ready mapping
(the contract other tools read); :func:`summary` and :func:`timeline_png` render
that mapping, so a stored report can be re-rendered without re-running.

Pure: the caller writes the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from chaos.invariants import Violation, distribution
from chaos.png import Canvas, Color
from chaos.scenario import Fault

REPORT_VERSION: Final = 1

KIND_COLORS: Final[dict[str, Color]] = {
    "kill": (214, 39, 40), "leader_kill": (140, 20, 20), "voters_kill": (255, 120, 90),
    "freeze": (31, 119, 180), "starve": (120, 170, 230), "stale_rejoin": (148, 103, 189),
    "partition": (255, 127, 14), "isolate": (200, 150, 20), "oneway": (240, 200, 60),
    "loss": (44, 160, 44), "disk_full": (140, 86, 75), "delay": (23, 190, 207),
    "reorder": (188, 189, 34), "duplicate": (227, 119, 194),
}
"""The colour of each fault kind in the timeline (and its legend)."""
_NODE_COLORS: Final[list[Color]] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
_GRID: Final[Color] = (225, 225, 225)
_ALIVE: Final[Color] = (31, 119, 180)
_REPLICAS: Final[Color] = (217, 95, 2)
_INK: Final[Color] = (40, 40, 40)


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """What happened to one scheduled fault.

    Attributes:
        index: its position in the schedule.
        fault: the scheduled fault.
        targets: the nodes it hit (resolved at run time).
        injected_t: when it was injected (run clock); ``None`` if skipped.
        healed_t: when it was healed.
        skipped: why it was not injected (empty if it was).
        detect_s: killing faults: time until every survivor saw the victim dead.
        heal_s: time from the heal until membership converged and a leader was agreed.
        notes: what the fault did, as measured (bytes written, packets held...).
        recover_s: faults that take nodes away: time from the (last) victim's loss
            until the others converged without it and agreed on a leader, while the
            fault was still held.
    """

    index: int
    fault: Fault
    targets: tuple[str, ...]
    injected_t: float | None
    healed_t: float | None
    skipped: str = ""
    detect_s: float | None = None
    heal_s: float | None = None
    notes: str = ""
    recover_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)
        return {"index": self.index, **self.fault.to_json(), "targets": list(self.targets),
                "injected_t": r(self.injected_t), "healed_t": r(self.healed_t),
                "skipped": self.skipped, "detect_s": r(self.detect_s),
                "heal_s": r(self.heal_s), "recover_s": r(self.recover_s),
                "notes": self.notes}


@dataclass(frozen=True, slots=True)
class InvariantResult:
    """The verdict on one invariant.

    Attributes:
        name: the invariant.
        status: ``ok``, ``violated`` or ``skipped``.
        checks: how many times it was evaluated.
        detail: a line for people (why skipped, what was checked).
    """

    name: str
    status: str
    checks: int
    detail: str = ""


def build_report(meta: Mapping[str, Any], faults: Sequence[FaultRecord],
                 invariants: Sequence[InvariantResult], violations: Sequence[Violation],
                 kv: Mapping[str, Any], leader_changes: Sequence[tuple[float, int, str]],
                 member_counts: Sequence[tuple[float, int]],
                 replica_counts: Sequence[tuple[float, int]] = ()) -> dict[str, Any]:
    """Assemble the JSON record of a run.

    Args:
        meta: scenario, seed, mode, node count, durations, paths...
        faults: one record per scheduled fault.
        invariants: one verdict per invariant.
        violations: every violation, any order.
        kv: the KV workload's counts and verdict.
        leader_changes: ``(t, term, leader)`` as first observed.
        member_counts: ``(t, n)``: the fewest members any live node saw alive.
        replica_counts: ``(t, n)``: healthy replicas of the declared services.
    """
    ok = not violations and all(i.status != "violated" for i in invariants)
    return {
        "version": REPORT_VERSION,
        **meta,
        "passed": ok,
        "faults": [f.to_json() for f in faults],
        "invariants": [{"name": i.name, "status": i.status, "checks": i.checks,
                        "detail": i.detail} for i in invariants],
        "violations": [v.to_json() for v in sorted(violations, key=lambda v: v.t)],
        "kv": dict(kv),
        "time_to_detect_s": distribution(f.detect_s for f in faults if f.detect_s is not None),
        "time_to_recover_s": distribution(
            f.recover_s for f in faults if f.recover_s is not None),
        "time_to_heal_s": distribution(f.heal_s for f in faults if f.heal_s is not None),
        "time_to_heal_after_kill_s": distribution(
            f.heal_s for f in faults if f.heal_s is not None
            and f.fault.kind.value in ("kill", "leader_kill", "voters_kill")),
        "timeline": {"leader_changes": [[round(t, 3), term, leader]
                                        for t, term, leader in leader_changes],
                     "member_counts": [[round(t, 3), n] for t, n in member_counts],
                     "replica_counts": [[round(t, 3), n] for t, n in replica_counts]},
    }


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.2f}s" if isinstance(v, float) else str(v)


def summary(report: Mapping[str, Any]) -> str:
    """The report for people: verdict, faults, invariants, violations, distributions."""
    lines = [f"chaos run {report['scenario']}: "
             f"{'PASSED' if report['passed'] else 'FAILED'}  (seed {report['seed']}, "
             f"{report['nodes']} nodes, {report['mode']} mode, {report['elapsed_s']:.0f}s)"]
    lines.append("")
    lines.append("faults (t = seconds since start):")
    for f in report["faults"]:
        if f["skipped"]:
            lines.append(f"  #{f['index']:<2} {f['kind']:<12} SKIPPED: {f['skipped']}")
            continue
        lines.append(f"  #{f['index']:<2} {f['kind']:<12} {','.join(f['targets']):<10} "
                     f"t={_fmt(f['injected_t'])}..{_fmt(f['healed_t'])}  "
                     f"detect {_fmt(f['detect_s'])}  recover {_fmt(f.get('recover_s'))}  "
                     f"heal {_fmt(f['heal_s'])}"
                     + (f"  ({f['notes']})" if f.get("notes") else ""))
    lines.append("")
    lines.append("invariants:")
    for i in report["invariants"]:
        lines.append(f"  {i['status'].upper():<9} {i['name']:<26} checks={i['checks']:<6} "
                     f"{i['detail']}")
    kv = report["kv"]
    lines.append("")
    lines.append(f"kv workload: {kv.get('ops', 0)} ops ({kv.get('ok', 0)} ok, "
                 f"{kv.get('failed', 0)} failed, {kv.get('unknown', 0)} unknown) on "
                 f"{kv.get('keys', 0)} keys: {kv.get('verdict', '-')}")
    for name in ("time_to_detect_s", "time_to_recover_s", "time_to_heal_s",
                 "time_to_heal_after_kill_s"):
        d = report[name]
        lines.append(f"{name}: n={d['count']} min={_fmt(d['min'])} median={_fmt(d['median'])}"
                     f" p90={_fmt(d['p90'])} max={_fmt(d['max'])}")
    if report["violations"]:
        lines.append("")
        lines.append(f"VIOLATIONS ({len(report['violations'])}):")
        for v in report["violations"]:
            lines.append(f"  t={v['t']:.2f}s {v['invariant']}: {v['message']}")
    return "\n".join(lines)


def timeline_png(report: Mapping[str, Any], width: int = 1200) -> bytes:
    """The run as a picture: one row of fault bars per node, the leader over time
    (a colour per node, a tick per new term), the fewest members any live node
    saw alive and, with services, their healthy replicas."""
    names: list[str] = list(report["node_names"])
    row_h, left, top = 18, 70, 28
    plot_h = 90
    legend_rows = 1 + (8 * sum(len(k) + 4 for k in KIND_COLORS)) // (width - 16)
    height = top + row_h * (len(names) + 1) + 20 + plot_h + 26 + 18 * legend_rows
    c = Canvas(width, height)
    end = max(1.0, float(report["elapsed_s"]))
    span = width - left - 20

    def x_of(t: float) -> int:
        return left + int(span * max(0.0, min(t, end)) / end)

    c.text(8, 6, f"{report['scenario']} seed {report['seed']} "
           f"{'PASSED' if report['passed'] else 'FAILED'}", _INK)
    bottom = top + row_h * (len(names) + 1) + 20 + plot_h
    step = 10 if end <= 200 else 60
    for s in range(0, int(end) + 1, step):
        c.vline(x_of(s), top, bottom, _GRID)
        c.text(x_of(s) - 4, bottom + 4, str(s), _INK)
    for i, name in enumerate(names):
        y = top + i * row_h
        c.rect(8, y + 5, 16, y + 13, _NODE_COLORS[i % len(_NODE_COLORS)])
        c.text(20, y + 4, name, _INK)
        c.hline(left, width - 20, y + row_h - 1, _GRID)
    for f in report["faults"]:
        if f["injected_t"] is None:
            continue
        color = KIND_COLORS.get(f["kind"], _INK)
        t1 = f["healed_t"] if f["healed_t"] is not None else end
        for target in f["targets"]:
            if target in names:
                y = top + names.index(target) * row_h
                c.rect(x_of(f["injected_t"]), y + 3, max(x_of(t1), x_of(f["injected_t"]) + 2),
                       y + row_h - 3, color)
    y_lead = top + len(names) * row_h
    c.text(8, y_lead + 4, "LEADER", _INK)
    changes = report["timeline"]["leader_changes"]
    for k, (t, _term, leader) in enumerate(changes):
        t_next = changes[k + 1][0] if k + 1 < len(changes) else end
        color = _NODE_COLORS[names.index(leader) % len(_NODE_COLORS)] if leader in names \
            else _INK
        c.rect(x_of(t), y_lead + 4, x_of(t_next), y_lead + row_h - 4, color)
        c.vline(x_of(t), y_lead, y_lead + row_h, _INK)
    y0 = top + row_h * (len(names) + 1) + 20
    replicas = report["timeline"].get("replica_counts", [])
    top_n = max([len(names), *(n for _, n in replicas)])
    c.text(8, y0 + plot_h // 2 - 5, "ALIVE", _ALIVE)
    if replicas:
        c.text(8, y0 + plot_h // 2 + 9, "REPLICAS", _REPLICAS)
    c.text(left - 12, y0 + plot_h - 10, "0", _INK)
    c.text(left - 8 * len(str(top_n)) - 4, y0, str(top_n), _INK)
    c.hline(left, width - 20, y0 + plot_h, _INK)

    def y_of(n: int) -> int:
        return y0 + plot_h - int(plot_h * n / max(1, top_n))

    for series, color in ((report["timeline"]["member_counts"], _ALIVE),
                          (replicas, _REPLICAS)):
        for k, (t, n) in enumerate(series):
            t_next = series[k + 1][0] if k + 1 < len(series) else end
            c.hline(x_of(t), x_of(t_next), y_of(n), color)
            if k + 1 < len(series):
                c.vline(x_of(t_next), y_of(n), y_of(series[k + 1][1]), color)
    for v in report["violations"]:
        c.vline(x_of(v["t"]), top, bottom, (255, 0, 0))
    x, y = 8, bottom + 22
    for kind, color in KIND_COLORS.items():
        label = kind.replace("_", " ")
        if x + 16 + 8 * len(label) > width:
            x, y = 8, y + 18
        c.rect(x, y, x + 12, y + 10, color)
        x = c.text(x + 16, y, label, _INK) + 12
    return c.png()
