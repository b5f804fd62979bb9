"""The contract tier's set-up: the pinned real agent CLIs (agents/), the fake model API, models pointed at it.

The CLIs come from `npm ci --prefix agents` (bash .ci/run does it); a missing one fails the test with that
advice, never skips it. Each model is an `AgentModel` block whose `base_url` names a fake-provider scenario
(`http://127.0.0.1:PORT/s/<scenario>`), with a fake key of its own, so a test can tell from the provider's
records which model asked, with which key, and how the tool round trip went.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatch.core.net import free_port
from dispatch.core.results import ProjectState, load_state
from tests.fixtures.fake_provider import FakeProvider
from tests.fixtures.projects import DISPATCH, write_spec

ROOT = Path(__file__).resolve().parents[2]
AGENT_BIN = ROOT / "agents" / "node_modules" / ".bin"
CLIS = ("claude", "codex")
MODELS = ("glm", "minimax", "claude", "codex")
KEYS = {model: f"sk-contract-{model}-0000" for model in MODELS}
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def require_clis() -> Path:
    """agents/node_modules/.bin, failing the test when a pinned CLI is not installed there."""
    missing = [cli for cli in CLIS if not (AGENT_BIN / cli).exists()]
    if missing:
        pytest.fail(f"the pinned agent CLIs {', '.join(missing)} are not installed in {AGENT_BIN}: run "
                    "`npm ci --prefix agents` (bash .ci/run does this)")
    return AGENT_BIN


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    """The fake model API on 127.0.0.1, one for the test."""
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def refused_url() -> str:
    """A base URL on a port of 127.0.0.1 nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def real_agents(prefect_api: str, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The pinned CLIs first on PATH, and no model block or cool-down before or after the test (both live in
    the session's Prefect server)."""
    bin_dir = require_clis()
    monkeypatch.setenv("PATH", f"{bin_dir}:{SYSTEM_PATH}")
    _forget_models()
    try:
        yield bin_dir
    finally:
        _forget_models()


def _forget_models() -> None:
    from prefect.variables import Variable

    from blocks.agent_model import AgentModel

    for model in MODELS:
        Variable.unset(f"dispatch_cooldown_{model}")
        try:
            AgentModel.delete(model)
        except ValueError:  # Prefect's answer for a block never saved
            pass


@pytest.fixture
def point_models(real_agents: Path) -> Callable[..., None]:
    """`point_models(glm="http://...", claude="http://...")`: save each built-in model's block with that
    endpoint and its own fake key (KEYS)."""
    from blocks.agent_model import AgentModel

    def point(**urls: str) -> None:
        for model, url in urls.items():
            block = AgentModel.builtin(model)
            block.base_url = url
            block.api_key = KEYS[model]
            block.save(model, overwrite=True)

    return point


def agent_spec(specs: Path, task_id: str, models: list[str], **front) -> Path:
    """An agent spec asking for hello.txt (the fake provider's tool call writes it whatever the prompt)."""
    return write_spec(specs, f"{task_id}.md", {"task_id": task_id, "model": models, **front},
                      "## Goal\nCreate the file hello.txt in the working directory.\n\n"
                      "## Acceptance criteria\n- [ ] `test -s hello.txt`\n")


@dataclass
class Started:
    """What `dispatch start` did: its exit code and output, the project's state after it, its wall time."""

    returncode: int
    output: str
    state: ProjectState | None
    seconds: float

    def row(self, task_id: str):
        assert self.state is not None, self.output[-4000:]
        assert task_id in self.state.specs, self.output[-4000:]
        return self.state.specs[task_id]


def dispatch_start(project: str, *, timeout: float = 300, env: dict[str, str] | None = None) -> Started:
    """Run `dispatch start <project>` to its end (bounded), as a user would."""
    from dispatch.core.settings import get_settings

    began = time.monotonic()
    try:
        done = subprocess.run([DISPATCH, "start", project], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"dispatch start {project} did not end within {timeout} s; its output:\n"
                    f"{(exc.stdout or '')[-4000:]}{(exc.stderr or '')[-4000:]}")
    get_settings.cache_clear()
    return Started(done.returncode, done.stdout + done.stderr, load_state(get_settings().state_dir, project),
                   time.monotonic() - began)


def task_log(row) -> str:
    """The spec's task.log (merged agent output), or a note that there is none."""
    path = Path(row.log_path) if row.log_path else None
    return path.read_text(errors="replace")[-6000:] if path and path.is_file() else f"(no task.log at {path})"


def result_attempts(row) -> list[dict]:
    """The spec's result.json attempts (model, verdict, reason, times), beside its task.log."""
    path = Path(row.log_path).with_name("result.json") if row.log_path else None
    if not path or not path.is_file():
        return []
    return json.loads(path.read_text()).get("attempts", [])


@pytest.fixture(scope="session")
def node_agents(loopback_cluster) -> Path:
    """A directory with the pinned CLIs that the loopback nodes' login users can run, made once a session:
    links to them when every directory above them can be entered by other users, else links into a copy of
    agents/node_modules (a checkout in a 0700 `mktemp -d` cannot be entered)."""
    bin_dir = require_clis()
    modules = bin_dir.parent.resolve()
    directory = loopback_cluster.base_dir / "agents"
    if directory.exists():
        return directory
    directory.mkdir(mode=0o755)
    for cli in CLIS:
        target = (bin_dir / cli).resolve()
        if not all(os.stat(parent).st_mode & 0o001 for parent in target.parents):
            copy = directory / "node_modules"
            if not copy.exists():
                shutil.copytree(modules, copy, symlinks=True, copy_function=_link_or_copy)
            target = copy / target.relative_to(modules)
        (directory / cli).symlink_to(target)
    return directory


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (the same file system: instant, no space), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
