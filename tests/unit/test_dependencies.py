"""pyproject.toml declares exactly the third-party distributions the package imports (no more, no fewer).

A distribution of the `pipeline` extra (Playwright, coverage.py) may be imported only inside functions: without
it the package still imports, and the layer that needs it says NOT RUN with the install command.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dispatch", "flows", "tasks", "blocks")
_OURS = {*PACKAGES, "__future__"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {_normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]) for requirement in requirements}


def _imported(module_level: bool = False) -> dict[str, set[str]]:
    """Top-level third-party module -> the files that import it (with `module_level`, at import time)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body if module_level else ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in _OURS:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared_and_every_declared_one_is_imported():
    providers = packages_distributions()
    imported = _imported()
    needed = {}
    for module, files in imported.items():
        distributions = {_normalise(d) for d in providers.get(module, [])}
        assert distributions, f"{module} (imported by {sorted(files)}) is not installed"
        needed[module] = distributions
    declared, optional = _declared(), _declared("pipeline")
    at_import = _imported(module_level=True)
    undeclared = {m: sorted(f) for m, f in imported.items()
                  if not needed[m] & declared and not (needed[m] & optional and m not in at_import)}
    assert not undeclared, f"imported but not declared in pyproject.toml (an optional one at import time): {undeclared}"
    used = set().union(*needed.values())
    assert declared | optional <= used, f"declared but never imported: {sorted((declared | optional) - used)}"
