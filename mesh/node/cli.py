"""``meshctl``: talk to the local meshd over its API socket.

Output is a table for people and, with ``--json``, a stable document for tools
(``kv watch`` prints a line per change as it comes, until Ctrl-C: exit status 0).
Errors are one line on stderr saying what to do, with exit status 1. Ctrl-C
anywhere else exits 130 without a word (the console script,
:func:`mesh.node.entry.meshctl`, sees to it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

import mesh
from mesh.errors import MeshError, RemoteProtocolError, StreamClosed
from mesh.node import api, cli_workloads
from mesh.node.entry import run_interruptible
from mesh.types import Addr

DEFAULT_SOCKET = "/var/lib/meshd/meshd.sock"

WATCH_WAIT_S = 30.0
"""The long poll ``kv watch`` asks for in each call (meshd cuts it to its own
limit); the call's timeout adds :data:`mesh.node.api.API_TIMEOUT_S` to it, room
for a linearizable read point."""


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
    parser.add_argument("--addr", default=os.environ.get("MESH_ADDR"),
                        help="talk to a remote meshd at HOST:PORT over mutual TLS instead of "
                        "the local socket (default $MESH_ADDR)")
    parser.add_argument("--cert-dir", default=os.environ.get("MESH_CERT_DIR"),
                        help="admin credentials (ca.pem, cert.pem, key.pem) for --addr; the "
                        "first node writes them to DIR/admin (default $MESH_CERT_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    members = sub.add_parser("members", help="list the cluster's members")
    members.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info = sub.add_parser("info", help="show this node's identity and health")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    token = sub.add_parser("token", help="show the join token")
    token.add_argument("action", nargs="?", choices=["show", "rotate"], default="show",
                       help="rotate: issue a new token; the old one stops working (the "
                       "command waits until every issuer serves the new one)")
    token.add_argument("--json", action="store_true", help="print JSON")
    keys = sub.add_parser("keys", help="gossip encryption keys, on every member at once")
    keys.add_argument("action", choices=["list", "install", "use", "remove"])
    keys.add_argument("key", nargs="?", help="base64 key, or its id from `keys list`; "
                      "install without a key generates one")
    keys.add_argument("--json", action="store_true", help="print JSON")
    node = sub.add_parser("node", help="manage nodes")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    rm = node_sub.add_parser("rm", help="remove a node for good: revoke its certificates "
                             "and rotate the gossip key without it")
    rm.add_argument("name")
    rm.add_argument("--json", action="store_true", help="print JSON")
    admin = sub.add_parser("admin", help="admin credentials for meshctl --addr")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    cert = admin_sub.add_parser(
        "cert", help="issue a new admin certificate (90 days) for a key made here, and write "
        "ca.pem, cert.pem and key.pem to --out (renew the credentials before they expire)")
    cert.add_argument("--out", required=True, type=Path,
                      help="directory to write the credentials to (created 0700)")
    cert.add_argument("--name", default="admin",
                      help="the certificate's name (`meshctl node rm NAME` revokes it)")
    cert.add_argument("--json", action="store_true", help="print JSON")
    kv = sub.add_parser("kv", help="the replicated key-value store")
    kv_sub = kv.add_subparsers(dest="kv_command", required=True)
    put = kv_sub.add_parser("put", help="set a key (exit 1 if not committed)")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--cas", type=int, default=None,
                     help="only if the key's modify index is this (0: only if absent)")
    get = kv_sub.add_parser("get", help="read a key (linearizable unless --stale)")
    get.add_argument("key")
    delete = kv_sub.add_parser("del", help="delete a key")
    delete.add_argument("key")
    delete.add_argument("--cas", type=int, default=None, help="as for put")
    ls = kv_sub.add_parser("ls", help="list keys under a prefix")
    ls.add_argument("prefix", nargs="?", default="")
    watch = kv_sub.add_parser(
        "watch", help="print each change of the keys under a prefix as it is committed, "
        "one line each (`put KEY=VALUE (index N)`, `del KEY (index N)`), until Ctrl-C")
    watch.add_argument("prefix", nargs="?", default="",
                       help="watch the keys that start with this (default: every key)")
    watch.add_argument("--after", type=int, default=None, metavar="INDEX",
                       help="start with the changes after this log index (default: from "
                       "now); an index printed earlier resumes a watch without a gap")
    for p in (put, get, delete, ls):
        p.add_argument("--json", action="store_true", help="print JSON")
    watch.add_argument("--json", action="store_true", help="print one JSON object per line")
    for p in (get, ls, watch):
        p.add_argument("--stale", action="store_true",
                       help="read this node's replica without asking the leader")
    raft = sub.add_parser("raft", help="the Raft group that holds the desired state")
    raft_sub = raft.add_subparsers(dest="raft_command", required=True)
    status = raft_sub.add_parser("status", help="term, leader, voters, this node's role "
                                 "(voter, learner, watcher), indexes, lag, watchers")
    status.add_argument("--json", action="store_true", help="print JSON")
    recover = raft_sub.add_parser(
        "recover", help="after losing a majority of voters for good: make this STOPPED "
        "node the only voter, from its own data (writes beyond its log are lost)")
    recover.add_argument("--data-dir", required=True, help="the stopped node's data dir")
    recover.add_argument("--yes", action="store_true",
                         help="do it (without it: only say what would happen)")
    transfer = raft_sub.add_parser("transfer", help="hand leadership to another voter")
    transfer.add_argument("--to", default=None, help="the voter (default: any other)")
    transfer.add_argument("--json", action="store_true", help="print JSON")
    config = raft_sub.add_parser(
        "config", help="the cluster-wide Raft settings, held by Raft itself; set the voter "
        "count for every node (it overrides each node's --raft-voters)")
    config.add_argument("--voters", type=int, default=None,
                        help="voters the leader keeps: 1, 3, 5 or 7 (fewer while fewer "
                        "members qualify)")
    config.add_argument("--cas", type=int, default=None,
                        help="only if the configuration is at this modify index (0: never set)")
    config.add_argument("--stale", action="store_true",
                        help="read this node's replica without asking the leader")
    config.add_argument("--json", action="store_true", help="print JSON")
    cli_workloads.add_commands(sub, node_sub)
    sub.add_parser("version", help="print the version")
    return parser


def socket_path(args: argparse.Namespace) -> Path:
    """Where the daemon's API socket is: ``--socket``, ``$MESH_SOCKET`` or the default."""
    return Path(args.socket or os.environ.get("MESH_SOCKET") or DEFAULT_SOCKET)


class Client:
    """Calls the daemon: over the local unix socket, or with ``--addr`` over a
    ``mesh-rpc/1`` mutual-TLS link using the admin certificate."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout_s: float | None = None) -> Any:
        """Call ``method``; ``timeout_s`` bounds the call (default: the local API's
        usual bound, none over ``--addr``).

        Raises:
            MeshError: unreachable, timed out, or the call failed.
        """
        if not self._args.addr:
            if timeout_s is None:
                return await api.call(socket_path(self._args), method, params)
            return await api.call(socket_path(self._args), method, params, timeout_s=timeout_s)
        if timeout_s is None:
            return await self._call_remote(method, params)
        try:
            with trio.fail_after(timeout_s):
                return await self._call_remote(method, params)
        except trio.TooSlowError:
            raise MeshError(f"meshd at {self._args.addr} did not answer within "
                            f"{timeout_s:g}s") from None

    async def _call_remote(self, method: str, params: dict[str, Any] | None) -> Any:
        try:
            addr = Addr.parse(self._args.addr, 7946)
        except ValueError as exc:
            raise MeshError(f"--addr: {exc}") from None
        if not self._args.cert_dir:
            raise MeshError("--addr needs admin credentials: pass --cert-dir DIR (the first "
                            "node wrote them to its DATA_DIR/admin) or set MESH_CERT_DIR")
        from mesh import tls  # only for --addr: keeps the local path light

        identity = tls.TlsIdentity.admin(Path(self._args.cert_dir))
        if not identity.exists():
            raise MeshError(f"no admin credentials in {self._args.cert_dir}: it needs "
                            "ca.pem, cert.pem and key.pem (from DATA_DIR/admin on the first node)")
        try:
            ctx = tls.client_context(identity)
            stream, _ = await tls.open_tls_stream(addr, ctx, tls.ALPN_RPC)
            async with stream:
                return await api.call_stream(stream, method, params)
        except (OSError, trio.TooSlowError) as exc:
            raise MeshError(f"cannot reach meshd at {addr}: {exc}; check --addr and that "
                            "TCP port is open") from None
        except (StreamClosed, trio.BrokenResourceError):
            raise MeshError(f"meshd at {addr} closed the connection before answering: did it "
                            "stop, or does it refuse these credentials? (see its log)") from None
        except RemoteProtocolError as exc:
            raise MeshError(str(exc)) from None


def per_node_table(nodes: dict[str, dict[str, Any]], describe: Any) -> str:
    """One row per node of a cluster-wide operation."""
    rows = []
    for name, outcome in nodes.items():
        rows.append([name, "ok" if outcome["ok"] else "FAILED",
                     describe(outcome["result"]) if outcome["ok"] else outcome["error"]])
    return format_table(["NODE", "RESULT", "DETAIL"], rows)


def _keys_detail(result: list[dict[str, Any]]) -> str:
    return ", ".join(k["id"] + (" (primary)" if k["primary"] else "") for k in result)


async def _run(args: argparse.Namespace) -> str | None:
    """Run the command; returns what to print, or ``None`` if it printed already."""
    client = Client(args)
    if args.command in cli_workloads.WORKLOAD_COMMANDS or (
            args.command == "node" and args.node_command in cli_workloads.NODE_COMMANDS):
        return await cli_workloads.run_command(client.call, args)
    if args.command == "members":
        result = await client.call("members")
        return json.dumps(result, indent=2) if args.json else members_table(result)
    if args.command == "info":
        result = await client.call("info")
        if args.json:
            return json.dumps(result, indent=2)
        counts = ", ".join(f"{v} {k}" for k, v in result["members"].items())
        return (f"name:          {result['name']}\naddress:       {result['address']}\n"
                f"version:       {result['version']}\nincarnation:   {result['incarnation']}\n"
                f"health score:  {result['health_score']}\nuptime:        "
                f"{format_age(result['uptime'])}\nmembers:       {counts}\n"
                f"dns:           {result.get('dns') or 'off'}")
    if args.command == "token":
        result = await client.call("token_rotate" if args.action == "rotate" else "token")
        if args.json:
            return json.dumps(result, indent=2)
        lead = "new join token (the old one no longer works):" if args.action == "rotate" \
            else "join token:"
        text = f"{lead}\n  {result['token']}\njoin a node with:\n  {result['join_command']}"
        issuers = result.get("issuers", {})
        unreachable = sorted(n for n, st in issuers.items() if st == "unreachable")
        if unreachable:
            text += f"\nissuers not reachable (they admit nobody now): {', '.join(unreachable)}"
        behind = sorted(n for n, st in issuers.items() if st == "old token")
        if behind:
            raise PartialFailure(text + f"\nstill serving the old token: {', '.join(behind)} "
                                 "(until they apply the rotation; see `meshctl raft status` "
                                 "there)", "some issuers do not serve the new token yet")
        return text
    if args.command == "keys":
        params = {"key": args.key} if args.key else {}
        if args.action in ("use", "remove") and not args.key:
            raise MeshError(f"keys {args.action} needs a KEY (base64, or its id from keys list)")
        result = await client.call(f"keys_{args.action}", params)
        failed = [n for n, o in result["nodes"].items() if not o["ok"]]
        if args.json:
            text = json.dumps(result, indent=2)
        else:
            text = per_node_table(result["nodes"], _keys_detail)
            if "key" in result:
                text = f"installed key {result['key']}\n" + text
        if failed:
            raise PartialFailure(text, f"{len(failed)} node(s) failed: {', '.join(failed)}; "
                                 "re-run the command once they are reachable")
        return text
    if args.command == "admin":
        return await admin_cert(client, args.out, args.name, args.json)
    if args.command == "node" and args.node_command == "rm":
        result = await client.call("node_rm", {"name": args.name})
        if args.json:
            return json.dumps(result, indent=2)
        lines = [f"removed {result['name']}: serials {', '.join(result['serials'])} are on "
                 "the replicated deny list (log index "
                 f"{', '.join(map(str, result['deny_indexes']))}); every node refuses them",
                 "gossip key rotated without it:",
                 per_node_table(result["key_rotation"]["remove"], _keys_detail)]
        return "\n".join(lines)
    if args.command == "kv" and args.kv_command == "watch":
        await kv_watch_until_interrupted(client, args, sys.stdout, sys.stderr)
        return None
    if args.command == "kv":
        return await _kv(client, args)
    if args.command == "raft" and args.raft_command == "recover":
        data_dir = Path(args.data_dir)
        try:
            await api.call(data_dir / "meshd.sock", "info")
        except (OSError, MeshError):
            pass  # nobody answers there: the node is stopped, as it must be
        else:
            raise MeshError(f"meshd is running on {data_dir}: stop it first (recovery "
                            "rewrites its Raft log)")
        return await trio.to_thread.run_sync(raft_recover, data_dir, args.yes)
    if args.command == "raft" and args.raft_command == "config":
        settings: dict[str, Any] = {"stale": args.stale}
        if args.voters is not None:
            settings.update(voters=args.voters, request_id=os.urandom(16))
            if args.cas is not None:
                settings["cas"] = args.cas
        config = await client.call("raft_config", settings)
        return json.dumps(config, indent=2) if args.json else raft_config_text(config)
    if args.command == "raft":
        method = "raft_status" if args.raft_command == "status" else "raft_transfer"
        params = {"to": args.to} if args.raft_command == "transfer" and args.to else {}
        result = await client.call(method, params)
        return json.dumps(result, indent=2) if args.json else raft_text(result)
    raise AssertionError(args.command)


def _printable(entry: dict[str, Any]) -> dict[str, Any]:
    value = entry.get("value")
    if isinstance(value, bytes):
        entry = {**entry, "value": value.decode("utf-8", "replace")}
    return entry


async def _kv(client: Client, args: argparse.Namespace) -> str:
    cmd = args.kv_command
    if cmd in ("put", "del"):
        params: dict[str, Any] = {"key": args.key, "request_id": os.urandom(16)}
        if args.cas is not None:
            params["cas"] = args.cas
        if cmd == "put":
            params["value"] = args.value
        result = await client.call(f"kv_{cmd}", params)
        return json.dumps(result, indent=2) if args.json else \
            f"{'set' if cmd == 'put' else 'deleted'} {args.key} (index {result['index']})"
    if cmd == "get":
        entry = _printable(await client.call("kv_get", {"key": args.key,
                                                         "stale": args.stale}))
        return json.dumps(entry, indent=2) if args.json else str(entry["value"])
    entries = [_printable(e) for e in await client.call(
        "kv_ls", {"prefix": args.prefix, "stale": args.stale})]
    if args.json:
        return json.dumps(entries, indent=2)
    return format_table(["KEY", "VALUE", "MODIFY INDEX"],
                        [[e["key"], str(e["value"])[:60], str(e["mod_index"])] for e in entries])


async def kv_watch_until_interrupted(client: Client, args: argparse.Namespace, out: TextIO,
                                     err: TextIO) -> None:
    """``meshctl kv watch`` until Ctrl-C (then it returns: exit status 0).

    Raises:
        MeshError: see :func:`kv_watch`.
    """
    failure: MeshError | None = None
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:

            async def stop_on_interrupt() -> None:
                async for _ in interrupts:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_interrupt)
            try:
                await kv_watch(client, args, out, err)
            except MeshError as exc:  # raised below, outside the nursery: not in a group
                failure = exc
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def kv_watch(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    """Call ``kv_watch`` in a loop, each time after the index of the last answer,
    and print every event on ``out`` as it arrives, one flushed line each (see
    :func:`watch_line`). A compacted answer (the watch fell too far behind) is
    announced on ``err``. Returns only if ``out`` is closed by its reader.

    Raises:
        MeshError: meshd is unreachable or refused the watch; the message says
            which index to resume after.
    """
    after: int | None = args.after
    while True:
        params: dict[str, Any] = {"prefix": args.prefix, "wait_s": WATCH_WAIT_S,
                                  "stale": args.stale}
        if after is not None:
            params["after"] = after
        try:
            answer = await client.call("kv_watch", params,
                                       timeout_s=WATCH_WAIT_S + api.API_TIMEOUT_S)
        except (MeshError, trio.BrokenResourceError) as exc:
            where = "" if after is None else f" after index {after} (resume with --after {after})"
            raise MeshError(f"kv watch stopped{where}: {exc}") from None
        try:
            if answer["compacted"]:
                print(f"meshctl: changes under {args.prefix!r} after index {after} were "
                      "compacted away (this watch fell too far behind); the current values "
                      "follow, and keys deleted meanwhile are not shown", file=err, flush=True)
            for event in answer["events"]:
                if answer["compacted"]:
                    event = {**event, "resync": True}
                print(watch_line(event, as_json=args.json), file=out, flush=True)
        except BrokenPipeError:
            # `meshctl kv watch | head`: the reader left; that is not an error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return
        after = answer["index"]


def watch_line(event: dict[str, Any], *, as_json: bool) -> str:
    """One ``kv watch`` event as a line: ``put KEY=VALUE (index N)`` or ``del KEY
    (index N)`` (a value that is not printable text is shown JSON-quoted), or with
    ``as_json`` the event as a JSON object, its value decoded as by ``kv get``. The
    current entries sent again after a compacted answer carry ``"resync": true``
    (in text, stderr says so before them)."""
    event = _printable(event)
    if as_json:
        return json.dumps(event)
    if event["op"] == "del":
        return f"del {event['key']} (index {event['index']})"
    value = str(event["value"])
    if not value.isprintable():
        value = json.dumps(value, ensure_ascii=False)
    return f"put {event['key']}={value} (index {event['index']})"


def raft_recover(data_dir: Path, yes: bool) -> str:
    """``meshctl raft recover``: rewrite a stopped node's Raft configuration so that
    it is the only voter (see :func:`mesh.raft.storage.force_new_configuration`).

    Raises:
        MeshError: the data dir holds no Raft state.
    """
    import json as json_

    from mesh.raft.storage import FileStorage, force_new_configuration
    from mesh.types import NodeId

    try:
        name = NodeId(json_.loads((data_dir / "node.json").read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MeshError(f"{data_dir} is not a meshd data dir ({exc})") from None
    storage = FileStorage(data_dir / "raft")
    try:
        rec = force_new_configuration(storage, name, apply=yes)
    finally:
        storage.close()
    lost = [n for n in (*rec.voters, *rec.learners) if n != name]
    lines = [
        f"{'recovered' if yes else 'would recover'} {name} as the only Raft voter (term "
        f"{rec.term}); voters before: {', '.join(rec.voters) or '-'}",
        f"kept: every entry of this node's log, up to index {rec.last_index}; "
        f"{rec.uncommitted} of them were not known committed and now are",
        "lost: any write the cluster acknowledged after index "
        f"{rec.last_index} (it never reached this node)",
        f"removed from the group: {', '.join(lost) or '-'}; do NOT restart them on their "
        "old data dirs: wipe those and join again (`meshd start --join ... --token ...`)",
    ]
    if not yes:
        lines.append("nothing was changed: re-run with --yes to do it, then start meshd")
        raise PartialFailure("\n".join(lines), "dry run: re-run with --yes")
    lines.append("start meshd on this data dir: it leads alone, and adds members back "
                 "as they join")
    return "\n".join(lines)


async def admin_cert(client: Client, out: Path, name: str, as_json: bool) -> str:
    """``meshctl admin cert``: the key is made here and never leaves this machine;
    an issuing node signs its CSR; the three files are written atomically."""
    from mesh import tls  # only for this command: keeps the common path light
    from mesh.security import pki

    key = pki.generate_key()
    csr = pki.create_csr(key, name)
    result = await client.call("admin_cert", {"csr": pki.csr_to_pem(csr), "name": name})
    cert, ca = pki.load_cert_pem(result["cert_pem"]), pki.load_cert_pem(result["ca_pem"])
    if cert.public_key() != key.public_key():
        raise MeshError("the node answered with a certificate for another key; nothing was "
                        "written")
    await trio.to_thread.run_sync(tls.TlsIdentity.admin(out).save, cert, key, ca)
    summary = {"dir": str(out), "name": result["name"], "serial": result["serial"],
               "not_after": result["not_after"], "issuer": result["issuer"]}
    if as_json:
        return json.dumps(summary, indent=2)
    return (f"admin certificate {result['serial']} for {result['name']}, valid until "
            f"{result['not_after']} (signed by {result['issuer']}), written to {out}\n"
            f"use it with: meshctl --addr HOST:7946 --cert-dir {out} ...")


def raft_text(st: dict[str, Any]) -> str:
    """``meshctl raft status`` for people."""
    membership = st.get("membership", "voter")
    this = f"{st['id']} ({membership}, {st['role']})"
    watch = st.get("watch") or {}
    if st.get("feed") == "watch":
        this = f"{st['id']} (watcher of {watch.get('source') or 'no voter yet'})"
    lines = [f"leader:   {st.get('leader') or 'none'} (term {st['term']})",
             f"this:     {this}",
             f"voters:   {', '.join(st['voters']) or '-'}",
             f"learners: {', '.join(st['learners']) or '-'}"]
    if st.get("feed") == "watch":
        lines.append(f"indexes:  applied {st['applied_index']} of leader commit "
                     f"{watch.get('leader_commit', 0)} (lag {st.get('apply_lag', 0)}); "
                     f"snapshots {watch.get('snapshots', 0)}, voter switches "
                     f"{watch.get('switches', 0)}")
    else:
        lines.append(f"indexes:  commit {st['commit_index']}, applied {st['applied_index']}, "
                     f"last {st['last_index']}")
    if st.get("watchers"):
        lines.append(f"watchers: {', '.join(st['watchers'])}")
    if st.get("peers"):
        rows = [[n, "learner" if p["learner"] else "voter", str(p["match"]), str(p["lag"]),
                 "yes" if p["active"] else "no"] for n, p in sorted(st["peers"].items())]
        lines.append(format_table(["PEER", "ROLE", "MATCH", "LAG", "ACTIVE"], rows))
    if st.get("config"):
        lines.append(f"config:   {raft_config_text(st['config'])}")
    if st.get("ca"):
        lines.append(f"ca:       {ca_text(st['ca'])}")
    if st.get("storage_error"):
        lines.append(f"STORAGE FAILING: {st['storage_error']}")
    return "\n".join(lines)


def ca_text(ca: dict[str, Any]) -> str:
    """The ``ca`` line of ``meshctl raft status``."""
    if not ca.get("ca_index"):
        return "not recorded in Raft yet (the node that created the cluster issues)"
    token = f"join token set at index {ca['token_index']}" if ca.get("token_index") \
        else "no join token recorded yet"
    key = "this node's Raft log holds the CA key" if ca.get("holds_key") \
        else "this node does not hold the CA key"
    return f"recorded at index {ca['ca_index']}, {token}; {key}"


def raft_config_text(config: dict[str, Any]) -> str:
    """``meshctl raft config`` for people."""
    if config.get("raft_voters") is None:
        return (f"voters {config['desired_voters']} (not set cluster-wide: the leader's "
                "--raft-voters)")
    return f"voters {config['raft_voters']} (set at index {config['mod_index']})"


class PartialFailure(MeshError):
    """A cluster-wide command that failed on some nodes: print the table, exit 1."""

    def __init__(self, output: str, message: str) -> None:
        super().__init__(message)
        self.output = output


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``meshctl``; returns the exit status. Ctrl-C raises KeyboardInterrupt
    (in a group if it interrupted a nursery): :func:`mesh.node.entry.run_interruptible`
    turns it into exit status 130."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"meshctl {mesh.__version__}")
        return 0
    try:
        output = trio.run(_run, args)
        if output is None:
            return 0
        try:
            print(output)
            sys.stdout.flush()
        except BrokenPipeError:
            # `meshctl members | head`: the reader left; that is not an error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except PartialFailure as exc:
        print(exc.output)
        print(f"meshctl: error: {exc}", file=sys.stderr)
        return 1
    except MeshError as exc:
        print(f"meshctl: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_interruptible(main))
