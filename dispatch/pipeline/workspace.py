"""The code a pipeline works on: safe paths inside it, its content digest (the cache key), its venv.

The digest is over the files' relative paths and bytes, never their absolute location, so a copy of the
same code has the same digest and an edit anywhere changes it. Build outputs, caches and environments
(`.venv`, `node_modules`, `__pycache__`, `dist`, ...) are not part of it: they are made from the code.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path, PurePosixPath

from dispatch.core.errors import ConfigError
from dispatch.core.paths import local_path
from dispatch.core.settings import BUNDLED_EXAMPLES
from dispatch.pipeline.config import Backend
from dispatch.pipeline.shell import StepResult, run_step
from dispatch.runner.task import base_environment

SKIP_DIRS = frozenset({".git", ".hg", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache",
                       ".mypy_cache", ".ruff_cache", "dist", "build", ".tox", ".dispatch"})
_SKIP_FILES = (".coverage", ".DS_Store")
_MAX_FILES = 50_000
VENV_DIR = ".venv"
_INHERIT_PTH = "_dispatch_inherit.pth"


def _walk(code_dir: Path):
    count = 0
    for directory, dirnames, filenames in os.walk(code_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if name.startswith(_SKIP_FILES) or name.endswith((".pyc", ".pyo")):
                continue
            count += 1
            if count > _MAX_FILES:
                raise ConfigError(f"{code_dir}: more than {_MAX_FILES} files; point `code` at the project itself")
            yield Path(directory, name)


def code_digest(code_dir: Path) -> str:
    """A sha256 over the code's relative paths, file modes and bytes (symlinks by their target text)."""
    digest = hashlib.sha256()
    for path in _walk(code_dir):
        relative = path.relative_to(code_dir).as_posix()
        digest.update(relative.encode() + b"\0")
        if path.is_symlink():
            digest.update(b"L" + os.readlink(path).encode() + b"\0")
            continue
        digest.update(b"X" if os.access(path, os.X_OK) else b"F")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def working_copy(code_dir: Path, home: Path, project: str) -> tuple[Path, bool]:
    """The code the pipeline may build and edit: `code_dir` itself, except for code bundled with the package
    (`examples/`), which is copied once to `<home>/workspaces/<project>` and worked on there, so that no run
    writes a venv into, or lets an agent edit, the installed package.

    Returns:
        The directory, and whether it is a copy made now.
    """
    if not code_dir.resolve().is_relative_to(BUNDLED_EXAMPLES.resolve()):
        return code_dir, False
    target = local_path(home, "workspaces", project, what="the example's working copy")
    if target.is_dir():
        return target, False
    partial = target.with_name(f".{project}.copying")
    shutil.rmtree(partial, ignore_errors=True)
    copy_code(code_dir, partial)
    partial.rename(target)  # whole or not at all: an interrupted copy is made again next time
    return target, True


def copy_code(code_dir: Path, destination: Path) -> int:
    """Copy the code (what `code_digest` covers, no environments or caches) into `destination`.

    Returns:
        The number of files copied.
    """
    copied = 0
    for path in _walk(code_dir):
        target = destination / path.relative_to(code_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        else:
            shutil.copy2(path, target)
        copied += 1
    return copied


def venv_python(code_dir: Path) -> Path:
    """The workspace venv's interpreter."""
    return code_dir / VENV_DIR / "bin" / "python"


def ensure_venv(code_dir: Path, *, inherit_packages: bool) -> Path:
    """Create `<code>/.venv` with this interpreter if it is missing; never touches any other environment.

    With `inherit_packages`, a `.pth` file appends the dispatcher's own site-packages to the venv's path
    (after the venv's own, so what the project installs wins; pip installs into the venv only).

    Returns:
        The venv's directory.
    """
    venv = code_dir / VENV_DIR
    if not venv_python(code_dir).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    pth = site / _INHERIT_PTH
    if inherit_packages:
        ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
        site.mkdir(parents=True, exist_ok=True)
        pth.write_text("".join(f"{p}\n" for p in ours), encoding="utf-8")
    elif pth.exists():
        pth.unlink()
    return venv


def in_venv(command: str) -> str:
    """`command` as a spec's acceptance item runs it: with the workspace venv (`$PWD/.venv`, the workdir being
    the code) first on PATH, so `python`, `pytest` and the project's packages are the project's. A node
    without that venv falls back to its own PATH."""
    return f'PATH="$PWD/{VENV_DIR}/bin:$PATH" {command}'


def build_environment(code_dir: Path, backend: Backend, timeout: float) -> StepResult | None:
    """Make the workspace venv and run `backend.install` in it, as L3 does, for the specs that run before L3
    (L2's): their acceptance commands (`in_venv`) need the project's packages.

    Returns:
        The install step; None when `backend.install` is not set (the venv alone, or nothing at all when the
        pipeline starts no app: then L3 makes no venv either).
    """
    if not (backend.install or backend.start):
        return None
    ensure_venv(code_dir, inherit_packages=backend.inherit_packages)
    if not backend.install:
        return None
    return run_step("install", backend.install, cwd=code_dir, env=step_environment(code_dir, backend.env),
                    timeout=timeout)


def step_environment(code_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the pipeline's shell steps and app: the step allow-list of the node runner (no
    keys), the workspace venv first on PATH, then `extra` (backend.env)."""
    venv = code_dir / VENV_DIR
    env = base_environment(dict(os.environ))
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra or {})
    return env


_SOURCE_SUFFIXES = (".py", ".js", ".ts", ".jsx", ".tsx", ".mjs", ".vue", ".svelte", ".html", ".css")
_TEST_FILE = re.compile(r"(^|/)(tests?/|test_[^/]*$|[^/]*_test\.py$|conftest\.py$)")
# where a route is declared: FastAPI/Flask/Express-style `.get("/api/cart"`, `route("/api/cart"`
_ROUTE = r"""(get|post|put|patch|delete|route|api_route|add_api_route)\(\s*['"]{}['"]"""
_URL_PATH = re.compile(r"https?://[^/\s]+(/[^\s:)?#]+)")


def locate_source(code_dir: Path, *, literal: str | None = None, evidence: str = "") -> str | None:
    """The one source file a defect points at, relative to the code, or None when unsure.

    Either the only non-test file that declares the route `literal` (`.post("/api/cart"`, `route("/x"`), or
    the file whose path ends like the first script URL in `evidence` (a browser stack: `.../static/app.js:37`).
    """
    url = _URL_PATH.search(evidence) if evidence else None
    wanted = PurePosixPath(url.group(1)).parts[-2:] if url else None
    hits = []
    for path in _walk(code_dir):
        if path.suffix not in _SOURCE_SUFFIXES:
            continue
        relative = path.relative_to(code_dir).as_posix()
        if wanted and tuple(PurePosixPath(relative).parts[-len(wanted):]) == wanted:
            hits.append(relative)
        elif literal and not wanted and path.stat().st_size < 1 << 20 and not _TEST_FILE.search(relative):
            if re.search(_ROUTE.format(re.escape(literal)), path.read_text(encoding="utf-8", errors="replace")):
                hits.append(relative)
    return hits[0] if len(hits) == 1 else None
