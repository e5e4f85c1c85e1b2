"""Protocol cores stay sans-I/O: only adapters and a few node modules may import I/O.

Walks the AST of every module under ``mesh/`` (as trio's ``test_exports.py`` does)
and fails if a module outside the allowed list imports trio, socket, ssl, docker,
time, or the module-level functions of ``random``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mesh"
IO_MODULES = {"trio", "socket", "ssl", "docker", "time", "asyncio", "selectors", "subprocess"}
ALLOWED = {
    "tls.py",
    "streams.py",
    "node/agent.py",
    "node/driver.py",
    "node/probes.py",
    "node/api.py",
    "node/daemon.py",
    "node/trust.py",
    "node/replica.py",
    "node/cli.py",
    "node/cli_workloads.py",
}


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _is_allowed(rel: str) -> bool:
    return rel in ALLOWED or rel.endswith("/adapter.py")


def _io_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in IO_MODULES:
                    found.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top in IO_MODULES:
                found.append(node.module)
            if top == "random" and any(a.name != "Random" for a in node.names):
                found.append(f"random.{','.join(a.name for a in node.names)}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
            and node.attr != "Random"
        ):
            found.append(f"random.{node.attr}")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_cores_do_no_io(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    if _is_allowed(rel):
        return
    found = _io_imports(ast.parse(path.read_text(), filename=str(path)))
    assert not found, f"{rel} is a core module but uses {found}; move the I/O into an adapter"


def test_layering_checker_catches_io() -> None:
    bad = ast.parse("import trio\nfrom socket import socket\nx = random.random()\n")
    assert _io_imports(bad) == ["trio", "socket", "random.random"]
