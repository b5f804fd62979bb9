"""Transports are built in one place: dispatch/cluster/transports/build.py.

Every module of the runtime (dispatch/, flows/, tasks/) is parsed; a call of a class named `...Transport` anywhere
else (`LocalTransport(root)`, `SSHTransport(node, pool)`) is a second way of making a node's transport.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIME = ("dispatch", "flows", "tasks")
BUILDER = REPO / "dispatch" / "cluster" / "transports" / "build.py"


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def transports_built_outside(repo: Path = REPO) -> list[str]:
    """`path:line Name(...)` for each transport constructed outside build.py."""
    found: list[str] = []
    for folder in RUNTIME:
        for path in sorted((repo / folder).rglob("*.py")):
            if path == BUILDER:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and _called_name(node).endswith("Transport"):
                    found.append(f"{path.relative_to(repo)}:{node.lineno} {_called_name(node)}(...)")
    return found


def test_transports_are_built_only_in_build_py():
    assert transports_built_outside() == []


def test_the_check_sees_a_transport_built_elsewhere(tmp_path: Path):
    (tmp_path / "dispatch").mkdir()
    (tmp_path / "dispatch" / "clean.py").write_text("live = local_transport(root).adoptable_runs('demo')\n")
    (tmp_path / "dispatch" / "stray.py").write_text("from x import LocalTransport\nt = LocalTransport(root)\n")
    assert transports_built_outside(tmp_path) == ["dispatch/stray.py:2 LocalTransport(...)"]
