"""``meshctl`` workload commands: run, apply, stack, ls, ps, inspect, scale, update,
rollback, rm, logs, nodes, node drain/activate/label, explain.

Commands that change state wait until the change has converged (every replica
running, healthy and at the new version, or gone) and show progress: a bar per
service on a terminal, a plain line per change otherwise. ``--detach`` returns at
once. A change that does not converge within ``--timeout`` exits non-zero with the
reason the cluster gives (a pending placement, a failing replica, a paused update).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mesh.errors import ConfigError, MeshError

if TYPE_CHECKING:
    from mesh.node.spec import WorkloadSpec

Call = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
"""How a command reaches meshd: ``(method, params)`` to the result."""

WORKLOAD_COMMANDS = frozenset({"run", "apply", "stack", "ls", "ps", "inspect", "scale",
                               "update", "rollback", "rm", "logs", "nodes", "explain",
                               "events"})
"""Top-level commands handled here (plus ``node drain|activate|label``)."""

NODE_COMMANDS = frozenset({"drain", "activate", "label"})

POLL_S = 0.1
"""How often a waiting command asks for progress."""

MOVED_GRACE_S = 2.0
"""How long to wait for the reason once a service moved past the generation asked for."""




def add_commands(sub: Any, node_sub: Any) -> None:
    """Add the workload commands to ``meshctl``'s parser."""
    run = sub.add_parser("run", help="run a service (placed, started, health-checked)",
                         description="meshctl run IMAGE [CMD...], or with --driver process: "
                         "meshctl run --driver process --name web -- CMD ARGS...")
    run.add_argument("args", nargs=argparse.REMAINDER,
                     help="IMAGE [CMD...] (docker), or the command (--driver process)")
    run.add_argument("--name", required=True, help="service name (a DNS label)")
    run.add_argument("--replicas", type=int, default=None, help="how many (default 1)")
    run.add_argument("--global", dest="global_", action="store_true",
                     help="one replica on every eligible node")
    run.add_argument("-p", "--publish", action="append", default=[],
                     help="HOST:CONTAINER[/udp] or CONTAINER: a port; repeatable")
    run.add_argument("--port", action="append", default=[],
                     help="NAME: a named port the node picks (handed in as $PORT and "
                     "$MESH_PORT_<NAME>); repeatable")
    run.add_argument("-e", "--env", action="append", default=[], help="K=V; repeatable")
    run.add_argument("--constraint", action="append", default=[],
                     help="placement constraint, e.g. zone==a; repeatable")
    run.add_argument("--label", action="append", default=[], help="K=V service label")
    run.add_argument("--tag", action="append", default=[],
                     help="DNS tag (<tag>.<name>.service.mesh); repeatable")
    run.add_argument("--cpu", default=None, help="cpu reserved per replica (0.5, 500m)")
    run.add_argument("--memory", default=None, help="memory reserved per replica (256M)")
    run.add_argument("--health-cmd", default=None, help="exec health check (shell text)")
    run.add_argument("--health-http", default=None, metavar="PATH",
                     help="http health check of PATH on the first port")
    run.add_argument("--health-tcp", action="store_true",
                     help="tcp health check of the first port")
    run.add_argument("--health-interval", default=None, help="e.g. 2s")
    run.add_argument("--restart", default=None, choices=["always", "on-failure", "never"])
    run.add_argument("--driver", default=None, choices=["docker", "process"])
    run.add_argument("--job", action="store_true", help="run to completion (a job)")
    _wait_flags(run)

    apply = sub.add_parser("apply", help="create or change services from a YAML/JSON file")
    apply.add_argument("-f", "--file", required=True, help="spec file ('-' for stdin)")
    _wait_flags(apply)

    stack = sub.add_parser("stack", help="deploy a docker-compose file as a stack")
    stack_sub = stack.add_subparsers(dest="stack_command", required=True)
    deploy = stack_sub.add_parser("deploy", help="create or update the stack's services")
    deploy.add_argument("-c", "--compose-file", required=True)
    deploy.add_argument("stack")
    _wait_flags(deploy)
    stack_rm = stack_sub.add_parser("rm", help="remove the stack's services")
    stack_rm.add_argument("stack")
    _wait_flags(stack_rm)
    stack_ls = stack_sub.add_parser("ls", help="list stacks")
    stack_ls.add_argument("--json", action="store_true")

    ls = sub.add_parser("ls", help="services: desired, running, healthy")
    ps = sub.add_parser("ps", help="allocations: node, state, health, since")
    ps.add_argument("service", nargs="?")
    nodes = sub.add_parser("nodes", help="members with roles, drain state and allocations")
    for p in (ls, ps, nodes):
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--stale", action="store_true",
                       help="read this node's replica without asking the leader")
    inspect = sub.add_parser("inspect", help="a service's spec, versions and allocations")
    inspect.add_argument("name")
    explain = sub.add_parser("explain", help="why replicas run where they do, or wait")
    explain.add_argument("name")
    explain.add_argument("--json", action="store_true")
    scale = sub.add_parser("scale", help="NAME=N ...: set replica counts")
    scale.add_argument("pairs", nargs="+", metavar="NAME=N")
    _wait_flags(scale)
    update = sub.add_parser("update", help="change a service (a rolling update)")
    update.add_argument("name")
    update.add_argument("--image", default=None)
    update.add_argument("--command", dest="new_command", default=None,
                        help="new command (shell words)")
    update.add_argument("--replicas", type=int, default=None)
    update.add_argument("-e", "--env-add", action="append", default=[], help="K=V")
    update.add_argument("--env-rm", action="append", default=[], help="K")
    update.add_argument("--constraint-add", action="append", default=[])
    update.add_argument("--constraint-rm", action="append", default=[])
    _wait_flags(update)
    rollback = sub.add_parser("rollback", help="return a service to its previous spec")
    rollback.add_argument("name")
    _wait_flags(rollback)
    rm = sub.add_parser("rm", help="remove services (their replicas stop)")
    rm.add_argument("names", nargs="+")
    _wait_flags(rm)
    logs = sub.add_parser("logs", help="output of a service's or an allocation's workloads")
    logs.add_argument("target", help="service name or allocation id")
    logs.add_argument("--tail", type=int, default=100, help="lines per allocation")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new output (of allocations that come and go too)")

    events = sub.add_parser("events", help="membership, leader, placement, start/stop/"
                            "restart/health events seen by this node")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new ones")
    events.add_argument("--since", type=int, default=0, help="after this sequence number")
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    drain = node_sub.add_parser("drain", help="move work off a node; place nothing new")
    drain.add_argument("name")
    activate = node_sub.add_parser("activate", help="let a drained node take work")
    activate.add_argument("name")
    label = node_sub.add_parser("label", help="set or remove a node's labels")
    label.add_argument("name")
    label.add_argument("labels", nargs="*", metavar="K=V")
    label.add_argument("--rm", action="append", default=[], metavar="K")
    for p in (drain, activate, label, inspect):
        p.add_argument("--json", action="store_true")


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--detach", action="store_true",
                   help="return once committed; do not wait for convergence")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for convergence (default 120)")
    p.add_argument("--json", action="store_true", help="print JSON")


# --------------------------------------------------------------------------- specs


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def run_spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    """The spec ``meshctl run`` describes.

    Raises:
        ConfigError: a flag is malformed (the message names it).
    """
    words = list(args.args)
    if words[:1] == ["--"]:
        words = words[1:]
    doc: dict[str, Any] = {"name": args.name}
    if args.driver:
        doc["driver"] = args.driver
    if args.driver == "process":
        if not words:
            raise ConfigError("--driver process needs the command: meshctl run --driver "
                              "process --name web -- python3 -m http.server $PORT")
        doc["command"] = words
    else:
        if not words:
            raise ConfigError("give an IMAGE [CMD...], or --driver process and a command")
        doc["image"] = words[0]
        if words[1:]:
            doc["command"] = words[1:]
    if args.global_:
        doc["mode"] = "global"
    if args.replicas is not None:
        doc["replicas"] = args.replicas
    ports: list[Any] = list(args.publish) + [{"name": n} for n in args.port]
    if ports:
        doc["ports"] = ports
    if args.env:
        doc["env"] = list(args.env)
    if args.constraint:
        doc["constraints"] = list(args.constraint)
    if args.label:
        doc["labels"] = _pairs(args.label, "--label")
    if args.tag:
        doc["tags"] = list(args.tag)
    if args.cpu is not None:
        doc["cpu"] = args.cpu
    if args.memory is not None:
        doc["memory"] = args.memory
    health: dict[str, Any] = {}
    if args.health_cmd:
        health["cmd"] = args.health_cmd
    elif args.health_http:
        health["http"] = args.health_http
    elif args.health_tcp:
        health["tcp"] = ""
    if health and args.health_interval:
        health["interval"] = args.health_interval
    if health:
        doc["health"] = health
    if args.restart:
        doc["restart"] = args.restart
    if args.job:
        doc["kind"] = "job"
    from mesh.node.spec import parse_spec  # the spec layer (and YAML) only when needed

    return parse_spec(doc, source="meshctl run")


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


# --------------------------------------------------------------------------- waiting


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = width if total == 0 else min(width, done * width // max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


async def wait_converged(call: Call, names: Sequence[str], timeout_s: float, *,
                         gone: bool = False, generations: dict[str, int] | None = None
                         ) -> list[dict[str, Any]]:
    """Wait until every named service has converged (or, with ``gone``, has no
    allocation left); show progress on stderr. ``generations``: the generation each
    service must converge at (a rollback to another one is a failure).

    Raises:
        MeshError: it did not converge in time; the message carries the cluster's
            reasons.
    """
    tty = sys.stderr.isatty()
    last: dict[str, str] = {}
    moved_polls: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    trouble = ""

    async def poll(method: str) -> Any:
        # a poll that fails (an election under way) is retried until the deadline
        nonlocal trouble
        while True:
            try:
                return await call(method, {})
            except MeshError as exc:
                trouble = str(exc)
                await trio.sleep(POLL_S)

    with trio.move_on_after(timeout_s) as scope:
        while True:
            if gone:
                allocs = await poll("service_ps")
                left = {n: sum(1 for a in allocs if a["service"] == n) for n in names}
                for name in names:
                    line = f"{name}: {left[name]} replicas still stopping"
                    if last.get(name) != line:
                        last[name] = line
                        _progress(line, tty)
                if not any(left.values()):
                    break
            else:
                rows = [r for r in await poll("service_ls") if r["name"] in names]
                missing = set(names) - {r["name"] for r in rows}
                if missing:
                    raise MeshError(f"service {', '.join(sorted(missing))} disappeared")
                for r in rows:
                    done, what = (r["complete"], "complete") if r["kind"] == "job" else \
                        (r["updated"], "up to date")
                    line = (f"{r['name']}: {_bar(done, r['desired']) + ' ' if tty else ''}"
                            f"{done}/{r['desired']} {what}, {r['running']} running, "
                            f"{r['healthy']} healthy")
                    want = (generations or {}).get(r["name"])
                    moved = want is not None and r["generation"] != want
                    if moved and not r["rollout"]:
                        # the leader commits a rollback's spec, then its rollout state:
                        # wait a little for the reason before saying anything
                        moved_polls[r["name"]] = moved_polls.get(r["name"], 0) + 1
                        moved = moved_polls[r["name"]] * POLL_S >= MOVED_GRACE_S
                    if r["rollout"] == "paused" or moved:
                        state = r["rollout"] or f"replaced by generation {r['generation']}"
                        raise MeshError(f"{r['name']}: update {state}: "
                                        f"{r['rollout_message']}")
                    if last.get(r["name"]) != line:
                        last[r["name"]] = line
                        _progress(line, tty)
                if all(r["converged"] for r in rows):
                    break
            await trio.sleep(POLL_S)
    if tty:
        print(file=sys.stderr)
    if scope.cancelled_caught:
        try:
            why = await _why_not(call, names, gone, timeout_s)
        except MeshError as exc:
            why = f"not converged after {timeout_s:g}s; meshd answers: {exc}"
        raise MeshError(why + (f" (last error: {trouble})" if trouble else ""))
    return rows


def _progress(line: str, tty: bool) -> None:
    if tty:
        print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


async def _why_not(call: Call, names: Sequence[str], gone: bool, timeout_s: float) -> str:
    if gone:
        return (f"replicas of {', '.join(names)} still run after {timeout_s:g}s; their nodes "
                "may be unreachable (`meshctl ps`)")
    reasons = []
    for r in await call("service_ls", {}):
        if r["name"] not in names or r["converged"]:
            continue
        why = r["pending"] or "; ".join(r["failures"]) or r["rollout_message"] or \
            f"{r['healthy']} of {r['desired']} healthy"
        reasons.append(f"{r['name']}: {why}")
    return (f"not converged after {timeout_s:g}s: " + " | ".join(reasons) +
            " (see `meshctl ps` and `meshctl explain`)")


# --------------------------------------------------------------------------- commands


async def run_command(call: Call, args: argparse.Namespace) -> str:
    """Run one workload command; returns what to print."""
    cmd = args.command
    if cmd == "node":
        return await _node(call, args)
    if cmd == "run":
        return await _apply(call, [run_spec_from_args(args)], args)
    if cmd == "apply":
        from mesh.node.spec import load_specs

        specs = load_specs(_read(args.file), source=args.file)
        return await _apply(call, specs, args)
    if cmd == "stack":
        return await _stack(call, args)
    if cmd == "ls":
        rows = await call("service_ls", {"stale": args.stale})
        return json.dumps(rows, indent=2) if args.json else ls_table(rows)
    if cmd == "ps":
        params: dict[str, Any] = {"stale": args.stale}
        if args.service:
            params["service"] = args.service
        allocs = await call("service_ps", params)
        if args.json:
            return json.dumps([_jsonable(a) for a in allocs], indent=2)
        return ps_table(allocs, time.time())
    if cmd == "nodes":
        rows = await call("nodes", {})
        return json.dumps(rows, indent=2) if args.json else nodes_table(rows)
    if cmd == "inspect":
        return json.dumps(_jsonable(await call("service_inspect", {"name": args.name})),
                          indent=2)
    if cmd == "explain":
        result = await call("service_explain", {"name": args.name})
        if args.json:
            return json.dumps(result, indent=2)
        lines = list(result["lines"])
        if result["pending"]:
            lines.append(f"pending: {result['pending']}")
        if result["rollout"]:
            lines.append(f"update: {result['rollout']} ({result['rollout_message']})")
        return "\n".join(lines)
    if cmd == "scale":
        results = []
        for pair in args.pairs:
            name, sep, count = pair.partition("=")
            if not sep or not count.isdigit():
                raise MeshError(f"scale takes NAME=N, got {pair!r}")
            results.append(await call("service_scale", {"name": name, "replicas": int(count)}))
        return await _finish(call, results, args)
    if cmd == "update":
        return await _update(call, args)
    if cmd == "rollback":
        result = await call("service_rollback", {"name": args.name})
        return await _finish(call, [result], args)
    if cmd == "rm":
        for name in args.names:
            await call("service_rm", {"name": name})
        if not args.detach:
            await wait_converged(call, args.names, args.timeout, gone=True)
        return json.dumps({"removed": args.names}) if args.json else \
            "\n".join(f"removed {n}" for n in args.names)
    if cmd == "events":
        return await _events(call, args)
    if cmd == "logs":
        if args.follow:
            return await _follow_logs(call, args.target, args.tail)
        parts = await call("service_logs", {"target": args.target, "tail": args.tail})
        out: list[str] = []
        for p in parts:
            lines = _lines(p["output"])
            if len(parts) > 1:
                lines = [f"{p['alloc']} | {line}" for line in lines]
            out.extend(lines if not p["error"] else [f"{p['alloc']}: error: {p['error']}"])
        return "\n".join(out)
    raise AssertionError(cmd)


def _lines(output: Any) -> list[str]:
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else str(output)
    return text.splitlines()


def new_lines(before: Sequence[str], after: Sequence[str]) -> list[str]:
    """The lines of ``after`` (a later tail of the same output) that ``before`` did
    not have: found by where ``before``'s last lines reappear in ``after``."""
    if not before:
        return list(after)
    for anchor in (3, 2, 1):
        tail = list(before[-anchor:])
        if len(tail) < anchor:
            continue
        for i in range(len(after) - anchor, -1, -1):
            if list(after[i:i + anchor]) == tail:
                return list(after[i + anchor:])
    return list(after)  # rotated or too much new output: print the whole tail


async def _follow_logs(call: Call, target: str, tail: int) -> str:
    """``logs -f``: poll the tails and print what is new, until interrupted."""
    seen: dict[str, list[str]] = {}
    while True:
        for p in await call("service_logs", {"target": target, "tail": max(tail, 200)}):
            if p["error"]:
                continue  # its node is unreachable right now: try again next round
            lines = _lines(p["output"])
            fresh = new_lines(seen.get(p["alloc"], []), lines) if p["alloc"] in seen \
                else lines[-tail:]
            for line in fresh:
                print(f"{p['alloc']} | {line}", flush=True)
            seen[p["alloc"]] = lines
        await trio.sleep(1.0)


def event_line(e: dict[str, Any], as_json: bool) -> str:
    """One event, for people or (``--json``) tools."""
    if as_json:
        return json.dumps(e)
    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] % 1 * 1000):03d}"
    return f"{stamp}  {e['kind']:<7} {e['subject']:<16} {e['action']:<12} {e['detail']}".rstrip()


async def _events(call: Call, args: argparse.Namespace) -> str:
    since = args.since
    result = await call("events", {"since": since})
    lines = [event_line(e, args.json) for e in result["events"]]
    if not args.follow:
        return "\n".join(lines)
    for line in lines:
        print(line, flush=True)
    since = result["last"]
    while True:
        result = await call("events", {"since": since, "wait_s": 25})
        for e in result["events"]:
            print(event_line(e, args.json), flush=True)
        since = result["last"]


async def _apply(call: Call, specs: list[WorkloadSpec], args: argparse.Namespace) -> str:
    results = await call("service_apply", {"specs": [s.to_dict() for s in specs]})
    return await _finish(call, results, args)


async def _finish(call: Call, results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    for r in results:
        if r["created"]:
            lines.append(f"created {r['name']} (version {r['version']})")
        elif r["changed"]:
            lines.append(f"updated {r['name']} (version {r['version']}"
                         + (", rolling update" if r.get("restart") else "") + ")")
            lines.extend(f"  {d}" for d in r["diff"])
        else:
            lines.append(f"{r['name']} unchanged (version {r['version']})")
    rows: list[dict[str, Any]] = []
    if not args.detach:
        rows = await wait_converged(call, [r["name"] for r in results], args.timeout,
                                    generations={r["name"]: r["generation"] for r in results})
        lines.extend(f"{r['name']}: {r['complete']}/{r['desired']} complete"
                     if r["kind"] == "job" else
                     f"{r['name']}: {r['healthy']}/{r['desired']} healthy" for r in rows)
    if args.json:
        return json.dumps({"results": results, "services": rows}, indent=2)
    return "\n".join(lines)


async def _update(call: Call, args: argparse.Namespace) -> str:
    current = (await call("service_inspect", {"name": args.name}))["spec"]
    doc = dict(current)
    if args.image is not None:
        doc["image"] = args.image
    if args.new_command is not None:
        doc["command"] = shlex.split(args.new_command)
    if args.replicas is not None:
        doc["replicas"] = args.replicas
    env = dict(doc.get("env", {}))
    env.update(_pairs(args.env_add, "--env-add"))
    for key in args.env_rm:
        env.pop(key, None)
    doc["env"] = env
    constraints = [c for c in doc.get("constraints", []) if c not in args.constraint_rm]
    doc["constraints"] = constraints + list(args.constraint_add)
    from mesh.node.spec import parse_spec

    spec = parse_spec(doc, source="meshctl update")
    return await _apply(call, [spec], args)


async def _stack(call: Call, args: argparse.Namespace) -> str:
    from mesh.node.compose import STACK_LABEL, from_compose

    if args.stack_command == "deploy":
        specs, warnings = from_compose(_read(args.compose_file), args.stack,
                                       source=args.compose_file)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        return await _apply(call, specs, args)
    members: dict[str, list[str]] = {}
    for s in await call("service_ls", {}):
        stack = s["labels"].get(STACK_LABEL)
        if stack:
            members.setdefault(stack, []).append(s["name"])
    if args.stack_command == "ls":
        if args.json:
            return json.dumps([{"name": k, "services": len(v)}
                               for k, v in sorted(members.items())], indent=2)
        return format_table(["NAME", "SERVICES"],
                            [[k, str(len(v))] for k, v in sorted(members.items())])
    names = members.get(args.stack, [])
    if not names:
        raise MeshError(f"no stack {args.stack!r}; `meshctl stack ls` lists them")
    for name in names:
        await call("service_rm", {"name": name})
    if not args.detach:
        await wait_converged(call, names, args.timeout, gone=True)
    return "\n".join(f"removed {n}" for n in names)


async def _node(call: Call, args: argparse.Namespace) -> str:
    sub = args.node_command
    if sub == "label":
        result = await call("node_label", {"name": args.name,
                                           "set": _pairs(args.labels, "label"),
                                           "rm": list(args.rm)})
        text = f"{args.name}: labels " + (", ".join(f"{k}={v}" for k, v in
                                                    sorted(result["labels"].items())) or "-")
    else:
        result = await call(f"node_{sub}", {"name": args.name})
        text = (f"{args.name} is draining: its replicas move to other nodes" if sub == "drain"
                else f"{args.name} is active: it takes work again")
    return json.dumps(result, indent=2) if args.json else text


# --------------------------------------------------------------------------- tables


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces (docker/kubectl style)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [list(headers), *rows])


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def ls_table(rows: list[dict[str, Any]]) -> str:
    """``meshctl ls``."""
    out = []
    for r in rows:
        what = r["image"] or " ".join(r["command"])
        note = r["pending"] or (f"update {r['rollout']}" if r["rollout"] in
                                ("updating", "paused", "rolling_back") else "")
        if not note and r["failures"]:
            note = r["failures"][0]
        out.append([r["name"], r["mode"], f"{r['healthy']}/{r['desired']}", str(r["running"]),
                    f"v{r['version']}", r["driver"], what[:40], note[:80]])
    return format_table(["NAME", "MODE", "HEALTHY", "RUNNING", "VERSION", "DRIVER",
                         "IMAGE/COMMAND", "NOTE"], out)


def ps_table(allocs: list[dict[str, Any]], now: float) -> str:
    """``meshctl ps``."""
    out = []
    for a in allocs:
        ports = ",".join(f"{k}:{v}" for k, v in sorted(a["ports"].items())) or "-"
        health = a["health"] if a["health"] != "none" else "-"
        state = a["state"] if a["desired"] == "run" else f"{a['state']} (stopping)"
        out.append([a["id"], a["service"], a["node"], state, health,
                    _age(now - a["since"]) if a["since"] else "-", ports,
                    a["message"][:60]])
    return format_table(["ID", "SERVICE", "NODE", "STATE", "HEALTH", "SINCE", "PORTS",
                         "MESSAGE"], out)


def nodes_table(rows: list[dict[str, Any]]) -> str:
    """``meshctl nodes``."""
    out = []
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"
        out.append([r["name"], r["address"], r["status"], r["availability"], r["raft"],
                    r["driver"] or "-", str(r["allocations"]), labels])
    return format_table(["NAME", "ADDRESS", "STATUS", "AVAILABILITY", "RAFT", "DRIVER",
                         "ALLOCATIONS", "LABELS"], out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
