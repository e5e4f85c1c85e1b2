"""One meshd process under the harness's control, and the calls the harness makes to it.

A :class:`NodeProc` starts ``python -m mesh.node.daemon start`` (inside the node's
namespace with ``ip netns exec``, which execs, so the PID is meshd's own), sends
it signals by PID, and remembers whether an exit was the harness's doing. The API
is reached through the node's unix socket (the file system is shared), so a
partitioned node can still be asked what it sees; a frozen one cannot, and is not
asked.

Daemons are spawned with ``subprocess.Popen`` from the trio thread, not with
``trio.open_process`` (which forks from a worker thread): their parent-death
signal (``PR_SET_PDEATHSIG``) fires when the *thread* that forked them ends, and
trio's worker threads end when idle.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import trio
from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from chaos.topology import Topology
from mesh.errors import MeshError
from mesh.node import api

DNS_PORT: Final = 8600
"""Every node's DNS server port (on its own address)."""

NETNS_GOSSIP_PORT: Final = 7946
LOOPBACK_GOSSIP_PORT: Final = 27946
"""Loopback mode avoids 7946 and the integration tests' 17946."""

_PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn``: SIGKILL this child when the thread that forked it ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn_helper(topo: Topology, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a helper program in node ``name``'s namespace, stdout and stderr piped
    (from the trio thread, for the parent-death signal: see the module doc)."""
    return subprocess.Popen(topo.wrap(name, argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=die_with_parent)


class Unreachable(MeshError):
    """The API socket is absent or refuses connections: the request was never sent."""


class NodeProc:
    """One node: name, address, data dir, and its current process (if any).

    Args:
        topo: the run's topology (addresses, namespaces, data dirs).
        name: the node's name.
        profile: ``--gossip-profile``.
    """

    def __init__(self, topo: Topology, name: str, profile: str) -> None:
        self.topo = topo
        self.name = name
        self.ip = topo.ips[name]
        self.port = NETNS_GOSSIP_PORT if topo.mode == "netns" else LOOPBACK_GOSSIP_PORT
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.expected_exit = False
        """Set before the harness kills it: its exit is not a crash."""
        self.starts = 0

    @property
    def data_dir(self) -> Path:
        """Its data dir."""
        return self.topo.data_dir(self.name)

    @property
    def socket_path(self) -> Path:
        """Its API socket."""
        return self.data_dir / "meshd.sock"

    @property
    def log_path(self) -> Path:
        """Its stderr, appended across restarts."""
        return self.topo.run_dir / f"{self.name}.log"

    @property
    def addr(self) -> str:
        """``ip:port`` of its gossip port."""
        return f"{self.ip}:{self.port}"

    def running(self) -> bool:
        """The process runs (frozen counts as running)."""
        return self.proc is not None and self.proc.poll() is None

    def responsive(self) -> bool:
        """Running and not frozen: its API can answer."""
        return self.running() and not self.frozen

    def spawn(self, join: Sequence[str], token: str | None) -> None:
        """Start the daemon (do not wait); ``token`` only for its first join."""
        assert not self.running(), f"{self.name} already runs"
        cmd = [sys.executable, "-m", "mesh.node.daemon", "start",
               "--data-dir", str(self.data_dir), "--bind", self.addr, "--name", self.name,
               "--gossip-profile", self.profile, "--dns-bind", f"{self.ip}:{DNS_PORT}",
               "--metrics-bind", "off", "--driver", "process"]
        if join:
            cmd += ["--join", ",".join(join)]
            if token and not (self.data_dir / "tls" / "node.crt").exists():
                cmd += ["--token", token]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.topo.wrap(self.name, cmd),
                                         stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=die_with_parent)
        self.topo.remember_pid(self.proc.pid, self.name)
        self.frozen = False
        self.expected_exit = False
        self.starts += 1

    def exit_status(self) -> int | None:
        """The exit status if the process has ended."""
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL and reap (an expected exit)."""
        if not self.running():
            return
        assert self.proc is not None
        self.expected_exit = True
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT."""
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return ""
        return "\n".join(text)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float = 2.0) -> Any:
        """One API call.

        Raises:
            Unreachable: nothing listens on its socket (the request was not sent).
            MeshError: the node answered with an error.
            trio.TooSlowError: no answer within ``timeout_s`` (outcome unknown).
            trio.BrokenResourceError: the connection broke (outcome unknown).
        """
        with trio.fail_after(timeout_s):
            try:
                stream = await trio.open_unix_socket(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise Unreachable(f"{self.name}: {exc}") from None
            async with stream:
                return await api.call_stream(stream, method, params)

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the API answers ``info``.

        Raises:
            MeshError: it exited or did not answer in time (with its log tail).
        """
        with trio.move_on_after(timeout_s):
            while True:
                if not self.running():
                    raise MeshError(f"meshd {self.name} exited with status "
                                    f"{self.exit_status()} while starting:\n{self.log_tail()}")
                with contextlib.suppress(MeshError, OSError, trio.TooSlowError,
                                         trio.BrokenResourceError):
                    await self.call("info", timeout_s=1.0)
                    return
                await trio.sleep(0.1)
        raise MeshError(f"meshd {self.name} did not answer within {timeout_s:g}s:\n"
                        f"{self.log_tail()}")


async def query_a(server_ip: str, name: str, *, port: int = DNS_PORT, timeout_s: float = 1.0,
                  source_ip: str | None = None) -> tuple[str, ...] | None:
    """Ask a node's DNS server for ``name``'s A records.

    Returns:
        The addresses (empty for NXDOMAIN or no A record), or ``None`` if the
        server did not answer.
    """
    query = DNSRecord.question(name, "A")
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        if source_ip:
            await sock.bind((source_ip, 0))
        with trio.move_on_after(timeout_s):
            await sock.sendto(query.pack(), (server_ip, port))
            while True:
                data, _ = await sock.recvfrom(4096)
                try:
                    reply = DNSRecord.parse(data)
                except DNSError:
                    continue
                if reply.header.id != query.header.id:
                    continue
                if reply.header.rcode == RCODE.NXDOMAIN:
                    return ()
                return tuple(sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A))
    return None
