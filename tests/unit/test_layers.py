"""The core (`dispatch/core/`) imports no Prefect and no outer layer: the Prefect wing sits behind core interfaces.

Every module of the core is parsed, imports inside functions included, so a lazy `from prefect... import` counts
as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "dispatch" / "core"
FORBIDDEN = ("prefect", "dispatch.cluster", "dispatch.prefect", "dispatch.ops", "dispatch.cli", "dispatch.pipeline",
             "flows", "tasks")
"""Modules the core must not import (each with everything under it)."""


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `tree`; `from a import b` also counts `a.b`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return sorted(found)


def _forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def layer_violations(root: Path = CORE) -> list[str]:
    """`path:line imports module` for each forbidden import of a module under `root`."""
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        seen: set[tuple[int, str]] = set()
        for line, module in _imported(tree):
            if _forbidden(module) and (line, module.split(".")[0]) not in seen:
                seen.add((line, module.split(".")[0]))
                problems.append(f"{path.relative_to(root.parents[1])}:{line} imports {module}")
    return problems


def test_the_core_imports_no_prefect_and_no_outer_layer() -> None:
    problems = layer_violations()
    assert not problems, ("dispatch/core must import neither Prefect nor dispatch.cluster/prefect/ops/cli/pipeline, "
                          "flows or tasks; put the server half in dispatch/prefect/ behind a core interface:\n"
                          + "\n".join(problems))


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    core = tmp_path / "dispatch" / "core"
    core.mkdir(parents=True)
    (core / "clean.py").write_text("import json\nfrom dispatch.core.locks import LockTable\n")
    (core / "lazy.py").write_text("def f():\n    from prefect.variables import Variable\n    return Variable\n")
    (core / "outer.py").write_text("from dispatch import cluster\nimport flows.dispatch_project\n")
    assert layer_violations(core) == [
        "dispatch/core/lazy.py:2 imports prefect.variables",
        "dispatch/core/outer.py:1 imports dispatch.cluster",
        "dispatch/core/outer.py:2 imports flows.dispatch_project",
    ]
