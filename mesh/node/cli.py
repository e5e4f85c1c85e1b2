"""``meshctl``: talk to the local meshd over its API socket.

Output is a table for people and, with ``--json``, a stable document for tools.
Errors are one line on stderr saying what to do, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

import mesh
from mesh.errors import MeshError
from mesh.node import api

DEFAULT_SOCKET = "/var/lib/meshd/meshd.sock"


def format_age(seconds: float) -> str:
    """``42s``, ``3m12s``, ``5h03m``, ``2d04h``: short and sortable by eye."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces (docker/kubectl style)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [list(headers), *rows]]
    return "\n".join(lines)


def members_table(members: list[dict[str, Any]]) -> str:
    """The ``meshctl members`` table."""
    rows = []
    for m in members:
        labels = ",".join(f"{k}={v}" for k, v in sorted(m["labels"].items())) or "-"
        name = m["name"] + (" *" if m.get("self") else "")
        rows.append([name, m["address"], m["status"], str(m["incarnation"]), labels,
                     format_age(m["age"])])
    return format_table(["NAME", "ADDRESS", "STATUS", "INCARNATION", "LABELS", "AGE"], rows)


def build_parser() -> argparse.ArgumentParser:
    """The ``meshctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="meshctl", description="Control a meshd cluster.")
    parser.add_argument("--socket", default=None,
                        help=f"meshd API socket (default $MESH_SOCKET or {DEFAULT_SOCKET})")
    sub = parser.add_subparsers(dest="command", required=True)
    members = sub.add_parser("members", help="list the cluster's members")
    members.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info = sub.add_parser("info", help="show this node's identity and health")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("version", help="print the version")
    return parser


def socket_path(args: argparse.Namespace) -> Path:
    """Where the daemon's API socket is: ``--socket``, ``$MESH_SOCKET`` or the default."""
    return Path(args.socket or os.environ.get("MESH_SOCKET") or DEFAULT_SOCKET)


async def _run(args: argparse.Namespace) -> str:
    path = socket_path(args)
    if args.command == "members":
        result = await api.call(path, "members")
        return json.dumps(result, indent=2) if args.json else members_table(result)
    if args.command == "info":
        result = await api.call(path, "info")
        if args.json:
            return json.dumps(result, indent=2)
        counts = ", ".join(f"{v} {k}" for k, v in result["members"].items())
        return (f"name:          {result['name']}\naddress:       {result['address']}\n"
                f"version:       {result['version']}\nincarnation:   {result['incarnation']}\n"
                f"health score:  {result['health_score']}\nuptime:        "
                f"{format_age(result['uptime'])}\nmembers:       {counts}")
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``meshctl`` entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"meshctl {mesh.__version__}")
        return 0
    try:
        print(trio.run(_run, args))
    except MeshError as exc:
        print(f"meshctl: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
