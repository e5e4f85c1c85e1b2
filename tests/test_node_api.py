"""The local API (unix socket), metrics rendering, and meshctl/meshd helpers."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mesh import wire
from mesh.errors import ConfigError, MeshError, StartupError
from mesh.node import api
from mesh.node.cli import format_age, format_table, members_table
from mesh.node.config import choose_advertise, default_route_interfaces, parse_label
from mesh.node.daemon import (
    build_parser,
    config_from_args,
    detect_advertise_host,
    parse_size,
    prepare_data_dir,
)
from mesh.node.messages import MAX_API_FRAME_BYTES, Request, Response
from mesh.node.metrics import Metric, counter, render
from mesh.streams import read_frame
from mesh.types import Addr


async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return {"echo": params}


async def slow(params: dict[str, Any]) -> int:
    """Answers ``params["s"]`` after sleeping that many seconds."""
    await trio.sleep(params["s"])
    return int(params["s"])


async def refuse(params: dict[str, Any]) -> None:
    raise api.ApiError("no such service 'web': list services with meshctl ps")


async def test_api_roundtrip_errors_and_permissions(tmp_path: Path) -> None:
    sock = tmp_path / "meshd.sock"
    listener = await api.bind_unix_socket(sock)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve_api, listener, {"echo": echo, "refuse": refuse}, "n1")
        assert await api.call(sock, "echo", {"x": 1}) == {"echo": {"x": 1}}
        with pytest.raises(MeshError, match="list services with meshctl ps"):
            await api.call(sock, "refuse")
        with pytest.raises(MeshError, match="unknown method 'nope'"):
            await api.call(sock, "nope")
        # Garbage on the socket gets an error answer; the server keeps serving.
        stream = await trio.open_unix_socket(str(sock))
        async with stream:
            await stream.send_all(wire.frame(b"\x01\x00\x50garbage"))
            reply = await stream.receive_some(4096)
            assert b"malformed" in reply or b"not an API request" in reply
        assert await api.call(sock, "echo") == {"echo": {}}
        with pytest.raises(StartupError, match="another meshd is running"):
            await api.bind_unix_socket(sock)
        nursery.cancel_scope.cancel()


async def test_a_daemon_that_closes_mid_call_is_named_not_a_traceback(tmp_path: Path) -> None:
    sock = tmp_path / "meshd.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(sock))
    listener.listen()

    async def hang_up() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(4096)  # the request, never answered

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        with pytest.raises(MeshError, match="closed the connection before answering: did it "
                                            "stop"):
            await api.call(sock, "echo")
    listener.close()


async def test_an_answer_over_the_frame_limit_is_an_error_not_a_crash(tmp_path: Path) -> None:
    sock = tmp_path / "meshd.sock"
    listener = await api.bind_unix_socket(sock)

    async def huge(params: dict[str, Any]) -> bytes:
        await trio.lowlevel.checkpoint()
        return b"x" * (MAX_API_FRAME_BYTES + 1)

    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve_api, listener, {"huge": huge, "echo": echo}, "n1")
        with pytest.raises(MeshError, match="answer is too large to send.*narrower prefix"):
            await api.call(sock, "huge")
        assert await api.call(sock, "echo", {"x": 1}) == {"echo": {"x": 1}}
        nursery.cancel_scope.cancel()


async def test_pipelined_requests_run_together_and_answer_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {"slow": slow, "echo": echo}, "n1")
        t0 = trio.current_time()
        await client.send_all(b"".join(wire.frame(Request("slow", {"s": s}).encode())
                                       for s in (3, 1, 2)))
        decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
        answers: list[Any] = []
        while len(answers) < 3:
            decoder.receive_data(bytes(await client.receive_some()))
            while isinstance(payload := decoder.next_payload(), bytes):
                answers.append(Response.decode(payload).result)
        assert answers == [3, 1, 2]
        assert trio.current_time() - t0 == pytest.approx(3)  # together, not one by one
        # Back to one request at a time on the same connection.
        assert await api.call_stream(client, "echo", {"y": 2}) == {"echo": {"y": 2}}
        await client.aclose()
    assert trio.current_time() - t0 < api.API_TIMEOUT_S  # closed because the client did


class Later:
    """A :class:`api.Pending` resolved by the test."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None

    @property
    def done(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()

    def outcome(self) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def resolve(self, value: Any) -> None:
        self.value = value
        self.event.set()


async def test_started_calls_answer_in_order_without_tasks_and_fall_back_to_handlers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    begun: list[Later] = []

    def start(params: dict[str, Any]) -> api.Pending | None:
        if params.get("bad"):
            raise api.ApiError("bad write")
        if params.get("elsewhere"):
            return None  # e.g. not the leader: the handler takes it
        later = Later()
        begun.append(later)
        return later

    async def handler(params: dict[str, Any]) -> str:
        await trio.sleep(1)
        return "handled"

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {"w": handler}, "n1", {"w": start})
        await client.send_all(b"".join(wire.frame(Request("w", params).encode()) for params in (
            {}, {"bad": True}, {"elsewhere": True}, {}, {})))
        await trio.sleep(5)
        assert len(begun) == 3  # begun at once; nothing answered before the first resolves
        begun[2].resolve("third")
        begun[1].resolve(api.ApiError("not committed"))
        begun[0].resolve("first")
        decoder = wire.FrameDecoder(MAX_API_FRAME_BYTES)
        answers: list[Response] = []
        while len(answers) < 5:
            decoder.receive_data(bytes(await client.receive_some()))
            while isinstance(payload := decoder.next_payload(), bytes):
                answers.append(Response.decode(payload))
        assert [(a.ok, a.result or a.error) for a in answers] == [
            (True, "first"), (False, "bad write"), (True, "handled"),
            (False, "not committed"), (True, "third")]
        # One at a time: a started call is answered inline.
        await client.send_all(wire.frame(Request("w", {}).encode()))
        await trio.sleep(1)
        assert len(begun) == 4
        begun[3].resolve({"index": 7})
        assert Response.decode(await read_frame(client, MAX_API_FRAME_BYTES)).result == \
            {"index": 7}
        await client.aclose()


async def test_rpc_link_carries_concurrent_calls_and_fails_them_when_it_breaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    link = api.RpcLink(client)
    results: dict[int, Any] = {}

    async def one(s: int) -> None:
        results[s] = await link.call("slow", {"s": s})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {"slow": slow, "refuse": refuse}, "n1")
        await nursery.start(link.run)
        t0 = trio.current_time()
        async with trio.open_nursery() as calls:
            for s in (3, 1, 2):
                calls.start_soon(one, s)
        assert results == {1: 1, 2: 2, 3: 3}
        assert trio.current_time() - t0 == pytest.approx(3)  # one link, calls together
        with pytest.raises(MeshError, match="list services"):
            await link.call("refuse")
        assert link.in_flight == 0
        # The server goes away while a call waits: the call fails, the link is broken.
        failed: list[str] = []

        async def waiting() -> None:
            with pytest.raises(trio.BrokenResourceError) as info:
                await link.call("slow", {"s": 50})
            failed.append(str(info.value))

        nursery.start_soon(waiting)
        await trio.sleep(1)
        await server.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await link.call("slow", {"s": 1})
    assert link.broken
    assert failed == ["the server closed the link"]


async def test_rpc_link_gives_up_a_call_without_an_answer_and_keeps_the_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    link = api.RpcLink(client, call_timeout_s=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(api.serve_api_stream, server, {"slow": slow}, "n1")
        await nursery.start(link.run)
        t0 = trio.current_time()
        late = link.start_call("slow", {"s": 30})
        quick = link.start_call("slow", {"s": 1})
        assert not late.done
        await late.wait()
        assert trio.current_time() - t0 == pytest.approx(10)
        with pytest.raises(trio.BrokenResourceError, match="no answer within 10s"):
            late.outcome()
        # Answers come in request order: the quick call is answered with the late one,
        # which also gave up (10 s after it was made), and the link stays up.
        await quick.wait()
        with pytest.raises(trio.BrokenResourceError, match="no answer within 10s"):
            quick.outcome()
        await trio.sleep(25)  # the late answers arrive and are dropped
        assert link.in_flight == 0
        assert not link.broken
        assert await link.call("slow", {"s": 2}) == 2
        link.close()


async def test_stale_socket_is_replaced_and_missing_socket_is_explained(tmp_path: Path
                                                                         ) -> None:
    sock = tmp_path / "meshd.sock"
    listener = await api.bind_unix_socket(sock)
    listener.close()  # the file stays, nobody listens: a killed daemon
    assert sock.exists()
    listener = await api.bind_unix_socket(sock)
    listener.close()
    with pytest.raises(MeshError, match="is meshd running"):
        await api.call(tmp_path / "absent.sock", "members")


def test_metrics_text_format() -> None:
    text = render([counter("meshd_x_total", "Things.", 3),
                   Metric("meshd_members", "gauge", "By status.",
                          (((("status", "alive"),), 2.0), ((("status", "dead"),), 0.5)))],
                  {"node": 'a"b'})
    assert text.splitlines() == [
        "# HELP meshd_x_total Things.",
        "# TYPE meshd_x_total counter",
        'meshd_x_total{node="a\\"b"} 3',
        "# HELP meshd_members By status.",
        "# TYPE meshd_members gauge",
        'meshd_members{node="a\\"b",status="alive"} 2',
        'meshd_members{node="a\\"b",status="dead"} 0.5',
    ]


@pytest.mark.parametrize(("text", "expected"), [("512M", 512 << 20), ("4G", 4 << 30),
                                                ("1.5GiB", int(1.5 * (1 << 30))), ("100", 100)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_and_label_errors_are_explained() -> None:
    with pytest.raises(ConfigError, match="like 512M"):
        parse_size("lots")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_label("zone")
    assert parse_label(" zone = a ") == ("zone", "a")


def test_cli_formatting() -> None:
    assert [format_age(s) for s in (5, 75, 3 * 3600 + 120, 2 * 86400 + 3600)] == [
        "5s", "1m15s", "3h02m", "2d01h"]
    assert format_table(["A", "BB"], [["xxx", "y"]]) == "A    BB\nxxx  y"
    table = members_table([{"name": "n1", "address": "127.0.0.2:7946", "status": "alive",
                            "incarnation": 3, "labels": {"zone": "a"}, "age": 61, "self": True}])
    assert table.splitlines()[1].split() == ["n1", "*", "127.0.0.2:7946", "alive", "3",
                                             "zone=a", "1m01s"]


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["start", "--data-dir", str(tmp_path / "d"), *extra])


def test_config_from_flags(tmp_path: Path) -> None:
    cfg = config_from_args(_args(tmp_path, "--bind", "127.0.0.5", "--name", "web1",
                                 "--join", "127.0.0.2:7946,127.0.0.3", "--label", "zone=b",
                                 "--cpu", "2", "--memory", "1G"))
    assert cfg.bind == Addr("127.0.0.5", 7946)
    assert cfg.advertise == cfg.bind
    assert cfg.join == (Addr("127.0.0.2", 7946), Addr("127.0.0.3", 7946))
    assert cfg.labels == (("zone", "b"),)
    assert cfg.cpu_millis == 2000
    assert cfg.metrics_bind == Addr("127.0.0.5", 9946)
    assert cfg.socket_path == tmp_path / "d" / "meshd.sock"


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        config_from_args(_args(tmp_path, "--bind", "127.0.0.1:99999"))
    with pytest.raises(ConfigError, match="wildcard"):
        config_from_args(_args(tmp_path, "--bind", "127.0.0.1", "--advertise", "0.0.0.0",
                               "--name", "x"))


ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
down0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0
garbage
"""


def test_the_default_route_names_the_interface_to_advertise() -> None:
    assert default_route_interfaces(ROUTES) == ["eth0", "wlan0"]  # lowest metric first
    addresses = {"lo": "127.0.0.1", "eth0": "192.0.2.7", "wlan0": "192.168.1.9"}
    assert choose_advertise(["eth0", "wlan0"], addresses) == "192.0.2.7"
    assert choose_advertise(["tun9", "wlan0"], addresses) == "192.168.1.9"
    # No default route: the only address that is not loopback, else refuse.
    assert choose_advertise([], {"lo": "127.0.0.1", "eth1": "10.0.0.4"}) == "10.0.0.4"
    with pytest.raises(ConfigError, match="among 10.0.0.4, 10.0.0.5 .*--advertise"):
        choose_advertise([], {"eth1": "10.0.0.4", "eth2": "10.0.0.5"})
    with pytest.raises(ConfigError, match="no address to advertise.*--advertise"):
        choose_advertise([], {"lo": "127.0.0.1"})


def test_a_wildcard_bind_advertises_a_detected_address(tmp_path: Path) -> None:
    # meshd start --join peer:7946 on a host: nothing else to give.
    try:
        expected = detect_advertise_host()
    except ConfigError:  # e.g. a container with several addresses and no route
        with pytest.raises(ConfigError, match="--advertise"):
            config_from_args(_args(tmp_path, "--name", "x"))
        return
    cfg = config_from_args(_args(tmp_path, "--name", "x"))
    assert cfg.bind == Addr("0.0.0.0", 7946)
    assert cfg.advertise == Addr(expected, 7946)


def test_data_dir_keeps_its_node_name(tmp_path: Path) -> None:
    assert prepare_data_dir(tmp_path / "d", "alpha") == "alpha"
    assert prepare_data_dir(tmp_path / "d", None) == "alpha"
    with pytest.raises(StartupError, match="belongs to node 'alpha'"):
        prepare_data_dir(tmp_path / "d", "beta")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StartupError, match="not writable"):
        prepare_data_dir(blocker / "sub", "x")
