"""The API server's pipelining contract at its edges: bad input in the middle of
a pipeline, the per-connection limit, the idle timeout, and answers that are
byte for byte what :class:`~mesh.node.messages.Response` encodes."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing
from test_node_api import Later

from mesh import wire
from mesh.node import api
from mesh.node.messages import MAX_API_FRAME_BYTES, Request, Response


class Writes:
    """A starter whose calls wait for the test (``now`` ones are answered at once)."""

    def __init__(self) -> None:
        self.begun: list[Later] = []

    def start(self, params: dict[str, Any]) -> api.Pending:
        later = Later()
        if "now" in params:
            later.resolve(params["now"])
        else:
            self.begun.append(later)
        return later


def request(params: dict[str, Any], method: str = "w") -> bytes:
    return wire.frame(Request(method, params).encode())


async def read_until_closed(stream: trio.abc.ReceiveStream) -> list[bytes]:
    """Every answer's frame (prefix and envelope) until the server closes."""
    decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
    frames: list[bytes] = []
    while chunk := await stream.receive_some():
        decoder.receive_data(bytes(chunk))
        while isinstance(payload := decoder.next_payload(), bytes):
            frames.append(wire.frame(payload))
    assert decoder.buffered_bytes == 0
    return frames


def decoded(frames: list[bytes]) -> list[tuple[bool, Any]]:
    out = []
    for f in frames:
        response = Response.decode(f[wire.FRAME_PREFIX_BYTES:])
        out.append((response.ok, response.result if response.ok else response.error))
    return out


@pytest.mark.parametrize("bad", [
    wire.frame(b"\x01\x00\x50garbage"),                       # not msgpack
    wire.frame(wire.encode(81, ["w", {}])),                   # not a request
    wire.frame(wire.encode(80, ["", {}])),                    # no method
    wire.frame(b"\x02\x00\x50\x90"),                          # another major version
    (MAX_API_FRAME_BYTES + 1).to_bytes(4, "big") + b"\x00",   # oversized
])
async def test_bad_request_mid_pipeline_is_answered_in_order_then_the_connection_closes(
    autojump_clock: trio.testing.MockClock, bad: bytes,
) -> None:
    writes = Writes()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {}, "n1", {"w": writes.start})
        await client.send_all(request({}) + request({"now": 2}) + bad + request({"now": 3}))
        await trio.sleep(1)
        assert len(writes.begun) == 1  # nothing after the bad request was begun
        writes.begun[0].resolve(1)
        answers = decoded(await read_until_closed(client))
    assert answers[:2] == [(True, 1), (True, 2)]
    assert len(answers) == 3
    ok, error = answers[2]
    assert not ok
    assert any(word in error for word in (
        "malformed", "not an API request", "protocol 2.0", "too large"))


async def test_unknown_method_and_refused_call_keep_the_connection_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def refuse(params: dict[str, Any]) -> api.Pending:
        raise api.ApiError("bad write: give a key")

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {}, "n1", {"w": refuse})
        await client.send_all(request({}) + request({}, "nope") + request({}))
        await client.send_eof()
        answers = decoded(await read_until_closed(client))
    assert answers == [
        (False, "bad write: give a key"),
        (False, "unknown method 'nope': is meshctl newer than this meshd?"),
        (False, "bad write: give a key")]


async def test_answers_are_exactly_the_encoded_responses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writes = Writes()
    result = {"ok": True, "code": "ok", "index": 7, "mod_index": 7, "message": "",
              "duplicate": False, "value": os.urandom(100)}
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {}, "n1", {"w": writes.start})
        await client.send_all(request({"now": result}) + request({}) + request({}))
        await trio.sleep(1)
        writes.begun[0].resolve(api.ApiError("not committed: retry"))
        writes.begun[1].resolve(None)
        await client.send_eof()
        frames = await read_until_closed(client)
    assert frames == [wire.frame(r.encode()) for r in (
        Response(True, result=result), Response(False, error="not committed: retry"),
        Response(True))]


async def test_a_shared_result_answers_every_call_with_one_encoding(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writes = Writes()
    shared = api.SharedResult({"ok": True, "index": 9})
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {}, "n1", {"w": writes.start})
        await client.send_all(request({}) * 3 + request({"now": {"other": 1}}))
        await trio.sleep(1)
        for later in writes.begun:
            later.resolve(shared)
        await client.send_eof()
        frames = await read_until_closed(client)
    expected = wire.frame(Response(True, result={"ok": True, "index": 9}).encode())
    assert frames[:3] == [expected] * 3
    assert shared.frame == expected  # encoded once, kept for the next answer
    assert decoded(frames[3:]) == [(True, {"other": 1})]


async def test_a_connection_stops_reading_at_the_pipelining_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writes = Writes()
    client, server = trio.testing.memory_stream_pair()
    over = api.MAX_PIPELINED + 10
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {}, "n1", {"w": writes.start})
        await client.send_all(b"".join(request({}) for _ in range(over)))
        await trio.sleep(1)
        assert len(writes.begun) == over  # what arrived together is begun together
        await client.send_all(request({}))
        await trio.sleep(1)
        assert len(writes.begun) == over  # but nothing more is read
        for i in range(10):
            writes.begun[i].resolve(i)
        await trio.sleep(1)
        assert len(writes.begun) == over  # still at the limit
        writes.begun[10].resolve(10)
        await trio.sleep(1)
        assert len(writes.begun) == over + 1  # room again: read on
        for i, later in enumerate(writes.begun[11:], 11):
            later.resolve(i)
        await client.send_eof()
        answers = decoded(await read_until_closed(client))
    assert answers == [(True, i) for i in range(over + 1)]


async def test_an_idle_connection_is_closed_but_not_one_waiting_for_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writes = Writes()
    idle, idle_server = trio.testing.memory_stream_pair()
    busy, busy_server = trio.testing.memory_stream_pair()
    timeout_s = api.API_TIMEOUT_S
    with trio.fail_after(timeout_s * 10):
        async with trio.open_nursery() as nursery:
            for server in (idle_server, busy_server):
                nursery.start_soon(api.serve_api_stream, server, {}, "n1", {"w": writes.start})
            t0 = trio.current_time()
            await busy.send_all(request({}) + request({}))
            assert await read_until_closed(idle) == []
            assert trio.current_time() - t0 == pytest.approx(timeout_s)
            await trio.sleep(timeout_s)  # in progress: not idle
            writes.begun[0].resolve(1)
            writes.begun[1].resolve(2)
            answers = decoded(await read_until_closed(busy))
            # idle from the moment the last answer left
            assert trio.current_time() - t0 == pytest.approx(timeout_s * 3)
    assert answers == [(True, 1), (True, 2)]
