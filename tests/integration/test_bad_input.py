"""Bad input through the real `dispatch` command, one table row per case.

Each case runs `python -m dispatch.cli.main ...` in a subprocess (DISPATCH_HOME, DISPATCH_SPECS and
DISPATCH_PROJECTS in a temporary tree, no Prefect server) under a 1 GiB address-space cap, so a resource
bomb that comes back fails its case instead of eating the machine. Every case checks: the exit code, that
the output names the file (or the argument) and the field, that nothing changed in the tree outside
DISPATCH_HOME, that the canaries beside the home are still there, and that nothing was scheduled.

Layout of the tree (`root`):

    home/           DISPATCH_HOME (HOME is home/user)
    specs/shop/     the project under test, in DISPATCH_SPECS
    projects/       DISPATCH_PROJECTS
    other/specs/    another project's specs, outside DISPATCH_SPECS
    outside/        a secret spec-shaped file, the target of escapes
    canary.txt      and outside/canary.txt: must survive every case
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_MEMORY_CAP = 1 << 30  # bytes of address space per `dispatch` process
_TIMEOUT = 120.0
_SECRET = "TOPSECRET-7f3a"
_GOOD = "## Goal\nDo it.\n"


def _spec(front: str, body: str = _GOOD) -> str:
    return f"---\n{front}---\n{body}"


def _billion_laughs() -> str:
    """Nine levels of nine aliases: 9**9 strings once expanded (the issue's 8 GB `labels:`)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return _spec("\n".join(lines) + "\nlabels: *a8\n")


def _sparse_spec(path: Path) -> None:
    """A 2 GiB spec (sparse: no disk used) whose start is a valid spec: read whole, it breaks the cap."""
    path.write_text(_spec("task_id: S01-huge\n"), encoding="utf-8")
    with open(path, "r+b") as handle:
        handle.truncate(2 << 30)


def _link(name: str, target: str) -> Callable[[Path], None]:
    """Set-up: `specs/shop/<name>` is a symbolic link to `target` (`{root}` is the tree's root)."""
    def setup(root: Path) -> None:
        (root / "specs" / "shop" / name).symlink_to(target.format(root=root))
    return setup


def _other_project(root: Path) -> None:
    (root / "other" / "specs").mkdir(parents=True)
    (root / "other" / "specs" / "S01-other.md").write_text(_spec(""), encoding="utf-8")


def _linked_project(root: Path) -> None:
    _other_project(root)
    (root / "specs" / "linked").symlink_to(root / "other" / "specs")


def _previous_run(root: Path) -> None:
    """A run of `shop` left its directories under the home, as after any `dispatch start`."""
    run_dir = root / "home" / "runs" / "shop" / "tasks" / "S01-a"
    run_dir.mkdir(parents=True)
    (run_dir / "task.log").write_text("done\n", encoding="utf-8")
    (root / "home" / "results" / "shop").mkdir(parents=True)


def _huge_spec(root: Path) -> None:
    _sparse_spec(root / "specs" / "shop" / "S01-huge.md")


def _home_file(name: str, text: str) -> Callable[[Path], None]:
    """Set-up: `home/<name>` holds `text`."""
    def setup(root: Path) -> None:
        (root / "home" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "home" / name).write_text(text, encoding="utf-8")
    return setup


def _nodes(**fields: object) -> Callable[[Path], None]:
    """Set-up: a nodes.json of one ssh node, with `fields` over its defaults."""
    node = {"name": "gpu1", "ssh_host": "127.0.0.1", "slots": 2, **fields}
    return _home_file("nodes.json", json.dumps({"nodes": [node]}))


def _pipeline_yaml(text: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / "specs" / "shop" / "pipeline.yaml").write_text(text, encoding="utf-8")
    return setup


_DEEP_NODES = _home_file("nodes.json", '{"nodes": ' + "[" * 100_000 + "]" * 100_000 + "}")


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: the case's name.
        argv: the `dispatch` arguments.
        specs: files of `specs/shop/` (text or bytes); `{root}` in text is the tree's root.
        expect: what the output must contain (the file or argument, and the field).
        exit_code: the expected exit status.
        setup: more set-up, given the tree's root.
        forbid: what the output must not contain.
    """

    id: str
    argv: tuple[str, ...]
    specs: dict[str, str | bytes] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    exit_code: int = 2
    setup: Callable[[Path], None] | None = None
    forbid: tuple[str, ...] = ()


_OK_SPEC = {"S01-a.md": _spec("")}
_VALIDATE, _START = ("validate", "shop"), ("start", "shop")

CASES = [
    # -- project names on the command line: refused before anything is read or written
    Case("cleanup-parent-of-home", ("cleanup", "../.."), _OK_SPEC, ("project name", "'../..'"),
         setup=_previous_run),
    Case("cleanup-all-parent-of-home", ("cleanup", "../..", "--all"), _OK_SPEC, ("project name", "'../..'"),
         setup=_previous_run),
    Case("cleanup-runs-dir-itself", ("cleanup", "."), _OK_SPEC, ("project name", "'.'"), setup=_previous_run),
    Case("validate-project-outside-specs", ("validate", "../other/specs"), _OK_SPEC,
         ("project name", "'../other/specs'"), setup=_other_project),
    Case("start-project-outside-specs", ("start", "../other/specs"), _OK_SPEC,
         ("project name", "'../other/specs'"), setup=_other_project),
    Case("validate-absolute-project", ("validate", "{root}/other/specs"), _OK_SPEC, ("project name",),
         setup=_other_project),
    Case("report-project-escape", ("report", "../../x"), _OK_SPEC, ("project name", "'../../x'")),
    Case("collect-project-escape", ("collect", "../x"), _OK_SPEC, ("project name", "'../x'")),
    Case("stop-project-escape", ("stop", "../x"), _OK_SPEC, ("project name", "'../x'")),
    Case("status-project-escape", ("status", "../x"), _OK_SPEC, ("project name", "'../x'")),
    Case("project-leading-dash", ("validate", "--", "-rf"), _OK_SPEC, ("project name", "'-rf'")),
    Case("project-300-chars", ("validate", "p" * 300), _OK_SPEC, ("project name", "100 characters")),
    # -- task ids
    Case("task-id-absolute-validate", _VALIDATE, {"S01-a.md": _spec("task_id: {root}/outside/x\n")},
         ("S01-a.md", "task_id")),
    Case("task-id-absolute-start", _START, {"S01-a.md": _spec("task_id: {root}/outside/x\nkind: shell\n",
                                                              "```bash\ntrue\n```\n")},
         ("S01-a.md", "task_id")),
    Case("task-id-relative-escape", _START,
         {"S01-a.md": _spec("task_id: ../../../../outside/x\nkind: shell\n", "```bash\ntrue\n```\n")},
         ("S01-a.md", "task_id")),
    Case("task-id-300-chars", _VALIDATE, {"S01-a.md": _spec(f"task_id: {'x' * 300}\n")},
         ("S01-a.md", "task_id", "100 characters")),
    Case("task-id-dot", _VALIDATE, {"S01-a.md": _spec("task_id: '.'\n")}, ("S01-a.md", "task_id")),
    Case("task-id-dot-dot", _VALIDATE, {"S01-a.md": _spec("task_id: '..'\n")}, ("S01-a.md", "task_id")),
    Case("task-id-leading-dot", _VALIDATE, {"S01-a.md": _spec("task_id: .hidden\n")}, ("S01-a.md", "task_id")),
    Case("task-id-leading-dash", _VALIDATE, {"S01-a.md": _spec("task_id: -rf\n")}, ("S01-a.md", "task_id")),
    Case("task-id-newline", _VALIDATE, {"S01-a.md": _spec('task_id: "S01\\nS02"\n')}, ("S01-a.md", "task_id")),
    Case("task-id-from-a-file-name-with-spaces", _VALIDATE, {"S01 a b.md": _spec("")},
         ("S01 a b.md", "task_id")),
    Case("task-ids-differing-in-case", _VALIDATE,
         {"S01-a.md": _spec("task_id: Build\n"), "S02-b.md": _spec("task_id: build\n")},
         ("S02-b.md", "task_id", "S01-a.md")),
    # -- modifies
    Case("modifies-etc-shadow", _VALIDATE, {"S01-a.md": _spec("modifies: [/etc/shadow]\n")},
         ("S01-a.md", "modifies", "/etc/shadow")),
    Case("modifies-dot-dot-etc", _VALIDATE, {"S01-a.md": _spec("modifies: [../../etc]\n")},
         ("S01-a.md", "modifies", "../../etc")),
    Case("modifies-root", _VALIDATE, {"S01-a.md": _spec("modifies: [/]\n")}, ("S01-a.md", "modifies")),
    Case("modifies-home", _VALIDATE, {"S01-a.md": _spec("modifies: ['~/.ssh']\n")}, ("S01-a.md", "modifies")),
    Case("modifies-escape-after-a-dir", _VALIDATE, {"S01-a.md": _spec("modifies: [src/../../x]\n")},
         ("S01-a.md", "modifies")),
    Case("modifies-empty-entry", _VALIDATE, {"S01-a.md": _spec("modifies: [src/a.py, '']\n")},
         ("S01-a.md", "modifies")),
    # -- symbolic links out of the spec directory
    Case("spec-linked-outside", _VALIDATE, {**_OK_SPEC}, ("S02-link.md", "file", "symbolic link"),
         setup=_link("S02-link.md", "{root}/outside/secret.md"), forbid=(_SECRET,)),
    Case("spec-linked-to-etc-shadow", _VALIDATE, {**_OK_SPEC}, ("S02-shadow.md", "file", "symbolic link"),
         setup=_link("S02-shadow.md", "/etc/shadow")),
    Case("shared-context-linked-outside", _VALIDATE, {**_OK_SPEC}, ("SHARED_CONTEXT.md", "file", "symbolic link"),
         setup=_link("SHARED_CONTEXT.md", "{root}/outside/secret.md"), forbid=(_SECRET,)),
    Case("claude-md-linked-to-etc-shadow", _VALIDATE, {**_OK_SPEC}, ("CLAUDE.md", "file", "symbolic link"),
         setup=_link("CLAUDE.md", "/etc/shadow")),
    Case("linked-project-directory-is-allowed", ("validate", "linked"), {}, ("linked", "1 specs valid"),
         exit_code=0, setup=_linked_project),
    # -- resource bombs and sizes
    Case("billion-laughs-in-labels", _VALIDATE, {"S01-a.md": _billion_laughs()},
         ("S01-a.md", "front matter", "alias")),
    Case("front-matter-over-64-kib", _VALIDATE, {"S01-a.md": _spec(f"notes: {'x' * 70_000}\n")},
         ("S01-a.md", "front matter", "64 KiB")),
    Case("spec-over-1-mib", _VALIDATE, {}, ("S01-huge.md", "file", "1 MiB"), setup=_huge_spec),
    Case("long-bad-value-is-cut", _VALIDATE, {"S01-a.md": _spec(f"executor: [{'y' * 60_000}]\n")},
         ("S01-a.md", "executor", "…"), forbid=("y" * 200,)),
    # -- plain bad input
    Case("not-utf8", _VALIDATE, {"S01-a.md": "---\ntask_id: S01\n---\nCafé\n".encode("latin-1")},
         ("S01-a.md", "file", "UTF-8")),
    Case("bad-yaml", _VALIDATE, {"S01-a.md": _spec("depends_on: [S00\n")}, ("S01-a.md", "front matter")),
    # -- a spec's env may not redirect an agent or its key (issue 19)
    Case("env-redirects-the-agent-validate", _VALIDATE, {"S01-a.md": _spec(
        "executor: claude\nenv: {ANTHROPIC_BASE_URL: 'http://169.254.169.254/steal', NODE_OPTIONS: '-r ./x.js'}\n")},
        ("S01-a.md", "env", "ANTHROPIC_BASE_URL, NODE_OPTIONS", "AgentModel"), forbid=("169.254",)),
    Case("env-path-start", _START, {"S01-a.md": _spec("kind: shell\nenv: {PATH: '/some/dir:/usr/bin:/bin'}\n",
                                                      "```bash\ntrue\n```\n")}, ("S01-a.md", "env", "PATH")),
    # -- nodes.json: bounded, and checked as `dispatch nodes add` checks its arguments
    Case("nodes-json-nested-100000-nodes", ("nodes",), _OK_SPEC, ("nodes.json", "nests deeper"), setup=_DEEP_NODES),
    Case("nodes-json-nested-100000-guardian", ("guardian", "--once"), _OK_SPEC, ("nodes.json", "nests deeper"),
         setup=_DEEP_NODES),
    Case("nodes-json-nested-100000-monitor", ("monitor", "--once"), _OK_SPEC, ("nodes.json", "nests deeper"),
         setup=_DEEP_NODES),
    Case("node-name-dot-dot", ("nodes",), _OK_SPEC, ("nodes.json", "name", "'../../x'"), setup=_nodes(name="../../x")),
    Case("node-name-newline", ("nodes",), _OK_SPEC, ("nodes.json", "name"), setup=_nodes(name="a\nb")),
    Case("node-name-command", ("nodes",), _OK_SPEC, ("nodes.json", "name", "$(touch x)"),
         setup=_nodes(name="$(touch x)")),
    Case("node-trust-on-first-use-string", ("nodes",), _OK_SPEC, ("nodes.json", "trust_on_first_use", "'false'"),
         setup=_nodes(trust_on_first_use="false")),
    Case("node-user-number", ("nodes",), _OK_SPEC, ("nodes.json", "gpu1", "user", "a string"), setup=_nodes(user=5)),
    Case("local-node-without-slots-uses-the-cpu-count", ("nodes", "--json"), _OK_SPEC, ('"box"', '"slots"'),
         exit_code=0, setup=_home_file("nodes.json", json.dumps({"nodes": [{"name": "box", "transport": "local"}]}))),
    # -- files of ours in the home that nodes, the guardian or a snapshot write: damaged ones are ignored
    Case("drained-json-nested-100000-is-ignored", ("nodes",), _OK_SPEC, ("local",), exit_code=0,
         setup=_home_file("drained.json", "[" * 100_000 + "]" * 100_000)),
    Case("guardian-state-nested-100000-is-ignored", ("guardian", "--once"), _OK_SPEC, ("checks in",), exit_code=0,
         setup=_home_file("guardian/state.json", "[" * 100_000 + "]" * 100_000)),
    # -- pipeline.yaml
    Case("pipeline-yaml-nested-20000", ("pipeline", "run", "shop"), _OK_SPEC, ("pipeline.yaml", "nest"),
         setup=_pipeline_yaml("[" * 20_000 + "]" * 20_000 + "\n")),
    Case("pipeline-yaml-block-nested-700", ("pipeline", "run", "shop"), _OK_SPEC, ("pipeline.yaml", "nest"),
         setup=_pipeline_yaml("".join(f"{' ' * i}a:\n" for i in range(700)) + "\n")),
    Case("pipeline-layer-timeout-overflows", ("pipeline", "run", "shop"), _OK_SPEC,
         ("pipeline.yaml", "layers.L3.timeout", "168h"),
         setup=_pipeline_yaml("layers: {L3: {timeout: 99999999999999999999h}}\n")),
    Case("spec-timeout-overflows", _VALIDATE, {"S01-a.md": _spec("timeout: 99999999999999999999h\n")},
         ("S01-a.md", "timeout", "168h")),
    Case("cycle", _START, {"S01-a.md": _spec("depends_on: [S02-b]\n"), "S02-b.md": _spec("depends_on: [S01-a]\n")},
         ("S01-a.md", "depends_on", "S01-a -> S02-b -> S01-a")),
]


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under `root` but `skip`: its type, size, mtime and link target."""
    entries: dict[str, tuple] = {}
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            info = path.lstat()
            target = os.readlink(path) if path.is_symlink() else None
            entries[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, target)
    return entries


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_CAP, _MEMORY_CAP))


def _dispatch(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m dispatch.cli.main argv` under the memory cap; its whole process group is killed on timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "dispatch.cli.main", *argv], env=env, cwd=cwd, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_cap_memory, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"dispatch {' '.join(argv)} ran past {_TIMEOUT:.0f} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for name in ("home/user", "specs/shop", "projects", "outside"):
        (root / name).mkdir(parents=True)
    (root / "canary.txt").write_text("still here\n", encoding="utf-8")
    (root / "outside" / "canary.txt").write_text("still here\n", encoding="utf-8")
    (root / "outside" / "secret.md").write_text(_spec("task_id: S09-secret\n", f"{_SECRET}\n"), encoding="utf-8")
    return root


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_naming_file_and_field_and_nothing_escapes(case: Case, tree: Path) -> None:
    home = tree / "home"
    for name, content in case.specs.items():
        path = tree / "specs" / "shop" / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{root}", str(tree)), encoding="utf-8")
    if case.setup is not None:
        case.setup(tree)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "PREFECT_"))}
    env.update(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(tree / "specs"), DISPATCH_PROJECTS=str(tree / "projects"),
               HOME=str(home / "user"), COLUMNS="200")
    before, home_before = _snapshot(tree, skip=home), _snapshot(home, skip=home / "user")

    done = _dispatch([arg.replace("{root}", str(tree)) for arg in case.argv], env, cwd=home)

    output = done.stdout + done.stderr
    assert done.returncode == case.exit_code, output[-3000:]
    for text in case.expect:
        assert text in output, f"{text!r} not in the output:\n{output[-3000:]}"
    for text in case.forbid:
        assert text not in output
    assert "Traceback" not in output, output[-3000:]
    assert len(output) < 4000, f"{len(output)} characters of output"
    assert (tree / "canary.txt").exists() and (tree / "outside" / "canary.txt").exists()
    assert _snapshot(tree, skip=home) == before, "something outside DISPATCH_HOME changed"
    if case.exit_code == 2:  # nothing half-done: the home is as it was too
        assert _snapshot(home, skip=home / "user") == home_before


# -- cleanup while running, and what --all takes ---------------------------------------------------------------


def _home_env(home: Path, specs: Path, projects: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "PREFECT_"))}
    env.update(DISPATCH_HOME=str(home), DISPATCH_SPECS=str(specs), DISPATCH_PROJECTS=str(projects),
               HOME=str(home / "user"), COLUMNS="200")
    return env


def test_cleanup_refuses_while_a_runner_of_the_project_lives(tree: Path) -> None:
    from dispatch.cluster.transports.local import live_runner
    from tests.fixtures.runner import RUNNER_PATH

    home = tree / "home"
    run_dir = home / "runs" / "shop" / "tasks" / "S01-a"
    run_dir.mkdir(parents=True)
    task = {"project": "shop", "task_id": "S01-a", "workdir": str(run_dir / "work"), "timeout": 60,
            "stall_timeout": 60, "heartbeat": 0.5, "steps": [{"name": "sh", "argv": ["sleep", "60"]}]}
    (run_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")
    subprocess.run([sys.executable, str(RUNNER_PATH), "run", str(run_dir), "--detach"], check=True,
                   capture_output=True, timeout=30)
    try:
        for _ in range(200):  # the detached runner writes its status.json at once
            if live_runner(run_dir, stale_after=float("inf")):
                break
            time.sleep(0.05)
        assert live_runner(run_dir, stale_after=float("inf")), "the runner did not start"

        done = _dispatch(["cleanup", "shop", "--all"], _home_env(home, tree / "specs", tree / "projects"), home)

        assert done.returncode == 1, done.stdout + done.stderr
        assert "live runner" in done.stderr and "dispatch stop shop" in done.stderr
        assert (run_dir / "task.json").exists()
    finally:
        subprocess.run([sys.executable, str(RUNNER_PATH), "kill", str(run_dir)], capture_output=True, timeout=30)


def test_cleanup_all_removes_only_the_cached_results_of_its_own_project(tree: Path, run_project) -> None:
    """Project `a`'s cache keys start `a--`, and so do those of project `a--b`: only `a`'s go."""
    from dispatch.core.settings import get_settings
    from tests.fixtures.projects import shell_spec

    settings = get_settings()  # the isolated home of conftest: the flows run in this process
    for project in ("a", "a--b"):
        shell_spec(settings.specs / project, "S01-one", settings.home / "timeline", seconds=0.1)
        state, _ = run_project(project)
        assert state.is_completed(), state.message
    storage = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])  # the test session's result storage
    home = tree / "home"
    (home / "cache").mkdir()
    for name in ("a", "a--b"):
        [record] = [p for p in storage.glob(f"{name}--S01-one--*")]
        shutil.copy2(record, home / "cache" / record.name)
    kept = next((home / "cache").glob("a--b--*")).name

    done = _dispatch(["cleanup", "a", "--all"], _home_env(home, tree / "specs", tree / "projects"), home)

    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in (home / "cache").iterdir()] == [kept]


# -- paths on ssh nodes: rm -rf and the copy-back of a node's files_changed ------------------------------------


@pytest.fixture
def loop1(loopback_cluster, ssh_pool):
    """An `SSHTransport` to the loopback node loop1 whose run root is `<root>/sandbox-<id>/a/b/root`: a
    regression that lets `..` through removes at most the sandbox, never the node's home."""
    from dispatch.cluster.config import parse_node
    from dispatch.cluster.transports.ssh import SSHTransport
    from dispatch.core.paths import remote_arg
    from dispatch.core.settings import get_settings

    node = parse_node(loopback_cluster.nodes_json, 0, loopback_cluster.node("loop1"), get_settings())
    sandbox = f"{node.remote_root.rstrip('/')}/sandbox-{uuid.uuid4().hex[:8]}"
    transport = SSHTransport(node.model_copy(update={"remote_root": f"{sandbox}/a/b/root"}), ssh_pool)
    quoted = remote_arg(sandbox.removeprefix("~/"))
    _on_node(transport, f"mkdir -p {quoted}/a/b/root && touch {quoted}/canary {quoted}/a/canary {quoted}/a/b/canary")
    yield transport
    try:
        assert _on_node(transport, f"cd {quoted} && ls canary a/canary a/b/canary") == "a/b/canary\na/canary\ncanary\n"
    finally:
        _on_node(transport, f"rm -rf {quoted}")
        transport.close()


def _on_node(transport, script: str) -> str:
    code, out, err = transport.exec(script, timeout=30)
    assert code == 0, err
    return out


def test_remote_cleanup_removes_only_its_project_and_refuses_names_that_are_no_names(loop1) -> None:
    from dispatch.core.errors import UnsafePath
    from dispatch.core.paths import remote_arg

    shop, keep = remote_arg(loop1.root, "shop", "tasks", "S01"), remote_arg(loop1.root, "other", "tasks", "S01")
    _on_node(loop1, f"mkdir -p {shop} {keep} && touch {shop}/task.log {keep}/task.log")
    for bad in ("../..", "..", ".", "../other", "-rf"):
        with pytest.raises(UnsafePath):
            loop1.cleanup(bad)
    assert _on_node(loop1, f"test -e {keep}/task.log && test -e {shop}/task.log && echo both") == "both\n"

    loop1.cleanup("shop")

    assert _on_node(loop1, f"test -e {shop} || echo gone; test -e {keep}/task.log && echo kept") == "gone\nkept\n"


def test_copy_back_takes_no_files_changed_entry_out_of_the_code_directory(loop1, tmp_path: Path) -> None:
    from dispatch.core.paths import remote_arg

    workdir = loop1.workdir("shop", "S01")
    quoted = remote_arg(loop1.root, "shop", "tasks", "S01", "work")
    _on_node(loop1, f"mkdir -p {quoted}/docs && echo ok > {quoted}/ok.txt && echo doc > {quoted}/docs/x.md")
    code, outside = tmp_path / "code", tmp_path / "outside"
    code.mkdir()
    outside.mkdir()
    (code / "docs").symlink_to(outside)  # a link in the dispatcher's code directory

    loop1._copy_back(workdir, ["ok.txt", "docs/x.md", "../../../../x", "/etc/hostname", "a/../../b"], code)

    assert (code / "ok.txt").read_text() == "ok\n"
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "home", "outside", "projects", "specs",
                                                         "user-home"]
