"""``python -m chaos``: run a scenario, list scenarios, print a schedule, clean up.

    python -m chaos run smoke [--nodes 5] [--duration 90] [--seed 1]
    python -m chaos list
    python -m chaos schedule random --nodes 10 --duration 1800 --seed 7
    python -m chaos cleanup

``run`` exits 0 when every invariant held, 1 on any violation, 2 when the harness
itself failed (a node never started...), 130 when interrupted; its last line on
stdout is the report's directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import trio
import yaml

from chaos import report as rep
from chaos import topology
from chaos.runner import HarnessError, Interrupted, Runner, RunOptions, copy_logs
from chaos.scenario import Scenario, ScenarioError, build_schedule, parse_scenario
from mesh.errors import MeshError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_REPORT_ROOT = Path("/tmp/chaos-reports")


def load_scenario(name_or_path: str) -> Scenario:
    """A scenario by name (``chaos/scenarios/NAME.yaml``) or by path.

    Raises:
        ScenarioError: not found or malformed.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
        raise ScenarioError(f"no scenario {name_or_path!r}: give a path or one of {known}") \
            from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse_scenario(raw, str(path))


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m chaos`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m chaos",
                                     description="Break a real meshd cluster and check it heals.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run a scenario and write a report"),
                        ("schedule", "print the fault schedule a run would use")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("scenario", help="a name from `list`, or a YAML file")
        p.add_argument("--nodes", type=int, default=None, help="cluster size (default: "
                       "the scenario's)")
        p.add_argument("--duration", type=float, default=None,
                       help="seconds of faults for random scenarios (default: the scenario's)")
        p.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, "
                       "printed)")
    run = sub.choices["run"]
    run.add_argument("--mode", choices=["auto", "netns", "loopback"], default="auto",
                     help="network namespaces per node, or loopback addresses (default: "
                     "namespaces when possible)")
    run.add_argument("--report-dir", type=Path, default=None,
                     help=f"where to write the report (default {DEFAULT_REPORT_ROOT}/"
                     "SCENARIO-TIME-sSEED)")
    run.add_argument("--json", action="store_true", help="print the JSON report, not the "
                     "summary")
    sub.add_parser("list", help="list the scenarios")
    cleanup = sub.add_parser("cleanup", help="remove namespaces, links, mounts, processes "
                             "and directories left by interrupted runs")
    cleanup.add_argument("--force", action="store_true",
                         help="also remove those of runs whose harness still runs")
    return parser


def _schedule(args: argparse.Namespace) -> tuple[Scenario, RunOptions]:
    scenario = load_scenario(args.scenario)
    nodes = args.nodes or scenario.nodes
    if not 3 <= nodes <= 50:
        raise ScenarioError("--nodes must be from 3 to 50")
    duration = args.duration or scenario.duration_s
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    schedule = tuple(build_schedule(scenario, nodes, duration, seed))
    return scenario, RunOptions(scenario, schedule, nodes, duration, seed)


def _print_schedule(opts: RunOptions) -> None:
    print(f"schedule of {opts.scenario.name} (seed {opts.seed}, {opts.nodes} nodes, "
          f"{len(opts.schedule)} faults):")
    for i, f in enumerate(opts.schedule):
        print(f"  #{i:<2} {f.describe()}")
    sys.stdout.flush()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


_EXPECTED = (KeyboardInterrupt, Interrupted, HarnessError, MeshError, OSError)
"""Ways a run ends without a report; anything else is a bug and shows its traceback."""


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a nursery's exception group if every leaf is expected."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if leaves and all(isinstance(e, _EXPECTED) for e in leaves) else group


def _run(args: argparse.Namespace) -> int:
    _, opts = _schedule(args)
    _print_schedule(opts)
    # Ctrl-C must clean up even when started from a shell that ignores SIGINT (`&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = args.report_dir or DEFAULT_REPORT_ROOT / f"{opts.scenario.name}-{stamp}-s{opts.seed}"
    topo: topology.Topology | None = None
    try:
        topo, why = topology.create([f"n{i}" for i in range(1, opts.nodes + 1)], args.mode)
        print(f"mode: {topo.mode}" + (f" (namespaces unavailable: {why})" if why else
                                      f" (subnet {topo.subnet}, run dir {topo.run_dir})"))
        sys.stdout.flush()
        runner = Runner(opts, topo)
        try:
            report = trio.run(runner.run)
        except BaseExceptionGroup as group:
            leaf = _unwrap(group)
            if leaf is group:
                raise
            raise leaf from None
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    except (HarnessError, MeshError, OSError) as exc:
        print(f"chaos: harness error: {exc}", file=sys.stderr)
        return 2
    finally:
        if topo is not None:
            copy_logs(topo, out_dir / "logs")
            for problem in topo.teardown():
                print(f"chaos: cleanup: {problem}; run `python -m chaos cleanup`",
                      file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    text = rep.summary(report)
    (out_dir / "summary.txt").write_text(text + "\n")
    (out_dir / "timeline.png").write_bytes(rep.timeline_png(report))
    print(json.dumps(report, indent=1) if args.json else text)
    print(out_dir)
    return 0 if report["passed"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    logging.Formatter.converter = time.gmtime
    try:
        if args.command == "list":
            for path in sorted(SCENARIO_DIR.glob("*.yaml")):
                sc = load_scenario(str(path))
                print(f"{sc.name:<14} {sc.nodes} nodes  {sc.description}")
            return 0
        if args.command == "schedule":
            _print_schedule(_schedule(args)[1])
            return 0
        if args.command == "cleanup":
            removed = topology.cleanup_leftovers(force=args.force)
            print("\n".join(removed) if removed else "nothing to clean up")
            return 0
        return _run(args)
    except ScenarioError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
