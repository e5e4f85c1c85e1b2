"""Ctrl-C at any moment of ``meshctl`` and ``meshd``: exit status 130 and no
traceback, while Python still imports their modules too (``kv watch`` keeps its
exit status 0 once it watches).

Each test runs, as a real process, the console script pip generates from
``pyproject.toml`` (``from MODULE import FUNCTION; sys.exit(FUNCTION())``) on this
checkout. The moment of the SIGINT is chosen without timing: an import hook that
sends it as a given module starts to import, or the test's own socket seeing the
command connect. (Sending it right after the spawn tests Python rather than meshd:
it lands before the interpreter installs its handler, or in ``site``, where no
code of ours runs yet.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mesh.node.entry import INTERRUPTED_STATUS
from mesh.security.token import SECRET_BYTES, JoinToken

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0
"""Bound on a child's start-up (Python imports meshd in seconds on a loaded host)."""

INTERRUPT_ON_IMPORT = """\
import os, signal, sys
class InterruptOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            print("interrupting the import of", name, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, InterruptOnImport())
"""


def console_script(name: str) -> str:
    """The code of the ``name`` console script, as pip writes it from pyproject.toml."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts[name].split(":")
    return f"import re\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"


def spawn(name: str, args: Sequence[str], preamble: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", preamble + console_script(name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def finish(child: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    return child.returncode, out, err


def wait_for_connection(listener: socket.socket, child: subprocess.Popen[str]) -> socket.socket:
    """The child's connection to ``listener``, accepted and never answered."""
    deadline = time.monotonic() + DEADLINE_S
    listener.settimeout(0.1)
    while True:
        try:
            return listener.accept()[0]
        except TimeoutError:
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the child never connected: {finish(child)}") from None


def wait_for_mapping(child: subprocess.Popen[str], library: str) -> None:
    """Return once ``library`` is mapped in the child: it is importing that far."""
    deadline = time.monotonic() + DEADLINE_S
    while library not in Path(f"/proc/{child.pid}/maps").read_text():
        if child.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{library} never loaded: {finish(child)}")
        time.sleep(0.001)


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A unix socket that accepts meshctl's calls and never answers them."""
    path = tmp_path / "meshd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        yield path, listener


@pytest.fixture
def silent_seed() -> Iterator[socket.socket]:
    """A TCP join address that accepts meshd's join and never answers it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener


def free_gossip_port() -> int:
    """A loopback port free for both UDP and TCP, as meshd's gossip needs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        port: int = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))
    return port


def meshd_start_args(data_dir: Path, seed: socket.socket) -> list[str]:
    host, port = seed.getsockname()
    token = JoinToken("0" * 64, bytes(SECRET_BYTES))
    return ["start", "--data-dir", str(data_dir), "--name", "n1",
            "--bind", f"127.0.0.1:{free_gossip_port()}",
            "--dns-bind", "off", "--metrics-bind", "off", "--driver", "process",
            "--join", f"{host}:{port}", "--token", str(token), "--log-level", "error"]


def assert_quiet_interrupt(result: tuple[int, str, str], status: int = INTERRUPTED_STATUS) -> None:
    returncode, _, err = result
    assert "Traceback" not in err
    assert err == ""
    assert returncode == status


@pytest.mark.slow
@pytest.mark.parametrize("module", ["mesh.node.cli", "trio", "msgpack", "mesh.node.cli_workloads"])
def test_meshctl_interrupted_while_it_imports(
        silent_socket: tuple[Path, socket.socket], module: str) -> None:
    path, _ = silent_socket
    child = spawn("meshctl", ["--socket", str(path), "kv", "watch", "app/"],
                  INTERRUPT_ON_IMPORT.format(module=module))
    result = finish(child)
    assert result[1] == f"interrupting the import of {module}\n"
    assert_quiet_interrupt(result)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["mesh.node.daemon", "trio", "cryptography", "mesh.node.driver"])
def test_meshd_interrupted_while_it_imports(tmp_path: Path, silent_seed: socket.socket,
                                            module: str) -> None:
    child = spawn("meshd", meshd_start_args(tmp_path / "n1", silent_seed),
                  INTERRUPT_ON_IMPORT.format(module=module))
    result = finish(child)
    assert result[1] == f"interrupting the import of {module}\n"
    assert_quiet_interrupt(result)


@pytest.mark.slow
def test_meshctl_interrupted_once_it_imports(silent_socket: tuple[Path, socket.socket]) -> None:
    path, _ = silent_socket
    child = spawn("meshctl", ["--socket", str(path), "members"])
    wait_for_mapping(child, "/_socket.cpython")    # trio's import is under way
    child.send_signal(signal.SIGINT)
    assert_quiet_interrupt(finish(child))


@pytest.mark.slow
def test_meshctl_interrupted_while_it_waits_for_meshd(
        silent_socket: tuple[Path, socket.socket]) -> None:
    path, listener = silent_socket
    child = spawn("meshctl", ["--socket", str(path), "members"])
    with wait_for_connection(listener, child):
        child.send_signal(signal.SIGINT)
        assert_quiet_interrupt(finish(child))


@pytest.mark.slow
def test_kv_watch_interrupted_while_it_watches_exits_0(
        silent_socket: tuple[Path, socket.socket]) -> None:
    path, listener = silent_socket
    child = spawn("meshctl", ["--socket", str(path), "kv", "watch", "app/"])
    with wait_for_connection(listener, child):
        child.send_signal(signal.SIGINT)
        result = finish(child)
    assert_quiet_interrupt(result, status=0)
    assert result[1] == ""


@pytest.mark.slow
def test_meshd_interrupted_once_it_imports(tmp_path: Path, silent_seed: socket.socket) -> None:
    child = spawn("meshd", meshd_start_args(tmp_path / "n1", silent_seed))
    wait_for_mapping(child, "/_socket.cpython")
    child.send_signal(signal.SIGINT)
    assert_quiet_interrupt(finish(child))


@pytest.mark.slow
def test_meshd_interrupted_while_it_joins(tmp_path: Path, silent_seed: socket.socket) -> None:
    child = spawn("meshd", meshd_start_args(tmp_path / "n1", silent_seed))
    with wait_for_connection(silent_seed, child):
        child.send_signal(signal.SIGINT)
        assert_quiet_interrupt(finish(child))
