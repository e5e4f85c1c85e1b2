"""``meshctl kv watch``: its loop against a scripted ``kv_watch`` method on a real
API socket, its line format, and Ctrl-C (the end-to-end run against real daemons
is in ``test_integration_raft.py``)."""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh.errors import MeshError
from mesh.node import api
from mesh.node.cli import (
    WATCH_WAIT_S,
    Client,
    build_parser,
    kv_watch,
    kv_watch_until_interrupted,
    watch_line,
)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def put(index: int, key: str, value: bytes, create: int | None = None) -> dict[str, Any]:
    return {"index": index, "op": "put", "key": key, "value": value,
            "create_index": create or index, "mod_index": index}


def delete(index: int, key: str) -> dict[str, Any]:
    return {"index": index, "op": "del", "key": key, "create_index": 0, "mod_index": index}


def scripted(answers: list[dict[str, Any]], calls: list[dict[str, Any]]) -> Handler:
    """``kv_watch`` answering ``answers`` in turn, then failing as a daemon would."""
    async def kv_watch_method(params: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        calls.append(params)
        if not answers:
            raise api.ApiError("meshd is shutting down")
        return answers.pop(0)
    return kv_watch_method


async def run_watch(tmp_path: Path, handler: Handler, *argv: str) -> tuple[str, str, MeshError]:
    sock = tmp_path / "meshd.sock"
    listener = await api.bind_unix_socket(sock)
    args = build_parser().parse_args(["--socket", str(sock), "kv", "watch", *argv])
    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve_api, listener, {"kv_watch": handler}, "n1")
        with pytest.raises(MeshError) as failed:
            await kv_watch(Client(args), args, out, err)
        nursery.cancel_scope.cancel()
    return out.getvalue(), err.getvalue(), failed.value


async def test_prints_each_event_and_asks_again_after_each_answer_index(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    answers = [
        {"index": 7, "compacted": False, "events": []},        # a long poll that timed out
        {"index": 9, "compacted": False, "events": [put(8, "app/b", b"x"), delete(9, "app/a")]},
        {"index": 12, "compacted": False, "events": [put(12, "app/c", b"two\nlines")]},
    ]
    out, err, failed = await run_watch(tmp_path, scripted(answers, calls), "app/", "--after", "3")
    assert out.splitlines() == ["put app/b=x (index 8)", "del app/a (index 9)",
                                'put app/c="two\\nlines" (index 12)']
    assert err == ""
    assert [c.get("after") for c in calls] == [3, 7, 9, 12]
    assert all(c["prefix"] == "app/" and c["wait_s"] == WATCH_WAIT_S and c["stale"] is False
               for c in calls)
    assert str(failed) == ("kv watch stopped after index 12 (resume with --after 12): "
                           "meshd is shutting down")


async def test_json_lines_and_the_compacted_notice(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    answers = [
        {"index": 20, "compacted": False, "events": [put(20, "k", b"1")]},
        {"index": 90, "compacted": True, "events": [put(40, "k", b"\xff2", create=20)]},
    ]
    out, err, _ = await run_watch(tmp_path, scripted(answers, calls), "--json", "--stale")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"index": 20, "op": "put", "key": "k", "value": "1", "create_index": 20,
         "mod_index": 20},
        {"index": 40, "op": "put", "key": "k", "value": "\ufffd2", "create_index": 20,
         "mod_index": 40, "resync": True},
    ]
    assert "after index 20 were compacted away" in err
    assert "current values follow" in err
    assert "after" not in calls[0]                   # from now
    assert calls[0]["stale"] is True
    assert calls[0]["prefix"] == ""


def test_line_format() -> None:
    assert watch_line(put(3, "a/b", b"blue"), as_json=False) == "put a/b=blue (index 3)"
    assert watch_line(put(3, "a/b", b""), as_json=False) == "put a/b= (index 3)"
    assert watch_line(put(3, "a", "é\t".encode()), as_json=False) == 'put a="é\\t" (index 3)'
    assert watch_line(delete(4, "a/b"), as_json=False) == "del a/b (index 4)"
    assert json.loads(watch_line(delete(4, "a/b"), as_json=True)) == delete(4, "a/b")


async def test_ctrl_c_ends_the_watch_quietly(tmp_path: Path) -> None:
    sock = tmp_path / "meshd.sock"
    listener = await api.bind_unix_socket(sock)
    asked = trio.Event()

    async def never_answers(params: dict[str, Any]) -> None:
        asked.set()
        await trio.sleep_forever()

    args = build_parser().parse_args(["--socket", str(sock), "kv", "watch", "app/"])
    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve_api, listener, {"kv_watch": never_answers}, "n1")

        async def interrupt() -> None:
            await asked.wait()   # the receiver is open while a call is in progress
            os.kill(os.getpid(), signal.SIGINT)

        nursery.start_soon(interrupt)
        await kv_watch_until_interrupted(Client(args), args, out, err)
        nursery.cancel_scope.cancel()
    assert (out.getvalue(), err.getvalue()) == ("", "")
