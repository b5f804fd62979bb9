"""The real agent CLIs' fallback through `dispatch start`, against the fake model API (issue 20).

    .venv/bin/python bench/agent_fallback.py [--only limited,refused,codex] [--timeout 300] [--code DIR]
                                             [--model-env K=V]...

The pinned CLIs (agents/: `npm ci --prefix agents --no-audit --no-fund`; a missing one is a failure, never a
skip) run specs through `dispatch start` on the embedded default (the local node), each scenario in a
throwaway DISPATCH_HOME with no PREFECT_* variable, against tests/fixtures/fake_provider.py on 127.0.0.1. Each
model is configured as a user would: `dispatch models set NAME --base-url URL --key-env VAR` (a code without that
command: its AgentModel block saved from Python), with a fake key of its own, so the provider's records tell
which model asked.

1. `limited`: `model: [glm, claude]`, glm answers 429 with retry-after 1; S01, S02 after S01, S03 alone.
   The wall time of `dispatch start` (target 60 s; 363 s when the issue was filed), S01's seconds from its
   runner's start to the claude step's start (target 15 s), and S02's (target 1 s: glm is cooled down
   team-wide by then, so S02 starts on claude);
2. `refused`: glm's endpoint is a port of 127.0.0.1 nothing listens on: seconds to claude (target 15 s);
3. `codex`: `model: [codex]` answers: the spec succeeds, with its tokens from `dispatch report --json`.

The times come from each spec's result.json (the runner's start, each model step's start) and, as a check, from
the provider's records (glm's first request to claude's first). `--code DIR` runs `python -m dispatch.cli.main` from
another checkout (DIR first on PYTHONPATH, this virtualenv's packages), e.g. the code before a change:
`git archive <commit> | tar -x -C DIR`; each `dispatch start` is stopped after `--timeout` seconds.
`--model-env K=V` gives every model's CLI a variable (through its block's env), e.g. `IS_SANDBOX=1` for a code
that did not set it for Claude Code as root. Prints a
table of each figure and its target, writes bench/out/agent_fallback[-<DIR name>].json, and exits 1 when a run
fails outright (a command fails or times out, a spec does not succeed, a CLI is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from servers import stop_home_server  # noqa: E402

from dispatch.core.net import free_port  # noqa: E402
from tests.fixtures.fake_provider import FakeProvider, key_hash  # noqa: E402

DISPATCH = str(Path(sys.executable).with_name("dispatch"))
AGENT_BIN = ROOT / "agents" / "node_modules" / ".bin"
CLIS = ("claude", "codex")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
KEY_VARS = {model: f"BENCH_KEY_{model.upper()}" for model in ("glm", "claude", "codex")}
KEYS = {model: f"sk-bench-{model}-0000" for model in KEY_VARS}  # fake keys, one per model
SPEC_BODY = ("## Goal\nCreate the file hello.txt in the working directory.\n\n"
             "## Acceptance criteria\n- [ ] `test -s hello.txt`\n")
# a code without `dispatch models set` (before issue 20): the model's AgentModel block, saved from Python
_SAVE_BLOCKS = """
import json, os, sys
from dispatch.prefect.embedded import prepare_prefect
from dispatch.core.settings import get_settings
prepare_prefect(get_settings())
from blocks.agent_model import AgentModel
for name, (url, key_var) in json.loads(sys.argv[1]).items():
    block = AgentModel.builtin(name)
    block.base_url, block.api_key = url, os.environ[key_var]
    block.env = {**block.env, **json.loads(sys.argv[2])}
    block.save(name, overwrite=True)
"""


@dataclass
class Scenario:
    """One project: its models' endpoints, its specs (task id, model chain, dependencies)."""

    name: str
    models: dict[str, str]
    specs: list[tuple[str, list[str], list[str]]]
    figures: dict = field(default_factory=dict)


def require_clis() -> None:
    missing = [cli for cli in CLIS if not (AGENT_BIN / cli).exists()]
    if missing:
        raise SystemExit(f"the pinned agent CLIs {', '.join(missing)} are not installed in {AGENT_BIN}: run "
                         "`npm ci --prefix agents --no-audit --no-fund` (bash .ci/run does this)")


def environment(base: Path, code: Path | None) -> dict[str, str]:
    """A fresh embedded default: DISPATCH_HOME, specs, projects and HOME under `base`, the CLIs first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DISPATCH_", "BENCH_KEY_"))}
    for name in ("home", "specs", "projects", "user-home"):
        (base / name).mkdir(parents=True, exist_ok=True)
    env |= {"DISPATCH_HOME": str(base / "home"), "DISPATCH_SPECS": str(base / "specs"),
            "DISPATCH_PROJECTS": str(base / "projects"), "HOME": str(base / "user-home"),
            "PATH": f"{AGENT_BIN}:{SYSTEM_PATH}", "COLUMNS": "200"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env


def dispatch_argv(code: Path | None) -> list[str]:
    return [sys.executable, "-m", "dispatch.cli.main"] if code is not None else [DISPATCH]


def configure(models: dict[str, str], env: dict[str, str], code: Path | None, cwd: Path,
              model_env: dict[str, str]) -> str:
    """Save each model's endpoint, key and `model_env` as a user would; returns how ("dispatch models set" or
    "AgentModel blocks")."""
    keyed = {**env, **{KEY_VARS[m]: KEYS[m] for m in models}}
    dispatch = dispatch_argv(code)
    has_set = subprocess.run([*dispatch, "models", "set", "--help"], env=env, cwd=cwd, capture_output=True,
                             timeout=120).returncode == 0
    if not has_set:
        pairs = json.dumps({m: [url, KEY_VARS[m]] for m, url in models.items()})
        done = subprocess.run([sys.executable, "-c", _SAVE_BLOCKS, pairs, json.dumps(model_env)], env=keyed,
                              cwd=cwd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"saving the AgentModel blocks failed: {done.stderr[-2000:]}")
        return "AgentModel blocks"
    for model, url in models.items():
        extra = [arg for name, value in model_env.items() for arg in ("--env", f"{name}={value}")]
        done = subprocess.run([*dispatch, "models", "set", model, "--base-url", url, "--key-env", KEY_VARS[model],
                               *extra], env=keyed, cwd=cwd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"dispatch models set {model} exited {done.returncode}: "
                               f"{(done.stdout + done.stderr)[-2000:]}")
    return "dispatch models set"


def write_specs(scenario: Scenario, specs_dir: Path) -> None:
    project = specs_dir / scenario.name
    project.mkdir(parents=True, exist_ok=True)
    for task_id, chain, depends in scenario.specs:
        front = {"task_id": task_id, "model": chain, **({"depends_on": depends} if depends else {})}
        (project / f"{task_id}.md").write_text(f"---\n{json.dumps(front)}\n---\n{SPEC_BODY}")


def start(project: str, env: dict[str, str], code: Path | None, cwd: Path, timeout: float,
          ) -> tuple[int | None, float, str]:
    """`dispatch start <project>` to its end, or stopped after `timeout` s: (exit code or None, seconds, output)."""
    log = cwd / f"start-{project}.log"
    began = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*dispatch_argv(code), "start", project], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
        stop(proc, project, env, code, cwd)
    took = time.monotonic() - began
    return code, took, log.read_text(errors="replace")


def stop(proc: subprocess.Popen, project: str, env: dict[str, str], code: Path | None, cwd: Path) -> None:
    """Stop a `dispatch start` that ran out of time, and the runners it started (each in its own session)."""
    subprocess.run([*dispatch_argv(code), "stop", project],
                   env=env, cwd=cwd, capture_output=True, timeout=120, check=False)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    for status in (Path(env["DISPATCH_HOME"]) / "runs" / project / "tasks").glob("*/status.json"):
        pid = (json.loads(status.read_text() or "{}") or {}).get("runner_pid")
        if isinstance(pid, int):
            try:
                os.killpg(pid, signal.SIGKILL)  # the runner's own session: it and its step
            except (ProcessLookupError, PermissionError):
                pass


def spec_times(home: Path, project: str, task_id: str) -> dict:
    """From the spec's result.json: its state, the model that did the work, and seconds from the runner's
    start to each model step's start."""
    path = home / "runs" / project / "tasks" / task_id / "result.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    began = data.get("started_at")
    steps = {}
    for attempt in data.get("attempts") or []:
        if attempt.get("model") and attempt.get("started_at") and began and attempt["model"] not in steps:
            steps[attempt["model"]] = round(attempt["started_at"] - began, 2)
    reasons = {a.get("model"): a.get("reason") or a.get("verdict") for a in data.get("attempts") or []
               if a.get("model")}
    return {"status": data.get("status"), "model": data.get("model"), "exit_code": data.get("exit_code"),
            "reason": (data.get("reason") or "")[:300], "step_starts_s": steps, "model_reasons": reasons}


def asked(provider: FakeProvider, model: str) -> list[float]:
    """When `model` (its own key) asked the model API, in order."""
    return sorted(r["time"] for r in provider.seen()
                  if r["key"] == key_hash(KEYS[model]) and r["path"].endswith(("/messages", "/responses")))


def run(scenario: Scenario, base: Path, code: Path | None, provider: FakeProvider, timeout: float,
        model_env: dict[str, str]) -> dict:
    """Configure, start, and read one scenario in its own DISPATCH_HOME; the local server stopped after."""
    env = environment(base, code)
    write_specs(scenario, base / "specs")
    row: dict = {"scenario": scenario.name}
    try:
        row["configured_by"] = configure(scenario.models, env, code, base, model_env)
        began = time.time()
        row["exit_code"], row["wall_s"], output = start(scenario.name, env, code, base, timeout)
        row["wall_s"] = round(row["wall_s"], 2)
        row["timed_out"] = row["exit_code"] is None
        row["output_tail"] = output[-1500:]
        row["specs"] = {t: spec_times(base / "home", scenario.name, t) for t, _, _ in scenario.specs}
        row["requests"] = {m: [round(t - began, 2) for t in asked(provider, m)] for m in scenario.models}
        if scenario.name == "codex":
            report = subprocess.run([*dispatch_argv(code), "report", scenario.name, "--json"], env=env, cwd=base,
                                    capture_output=True, text=True, timeout=120)
            row["report"] = _report_rows(report.stdout) if report.returncode == 0 else report.stderr[-2000:]
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        row["error"] = str(exc)[-2000:]
    finally:
        stop_home_server(env)
    return row


def _report_rows(text: str) -> dict:
    try:
        return {r["spec"]: r for r in json.loads(text).get("specs", [])}
    except (ValueError, AttributeError, KeyError):
        return {"unreadable": text[-2000:]}


def scenarios(provider: FakeProvider) -> list[Scenario]:
    chain = ["glm", "claude"]
    return [
        Scenario("limited", {"glm": provider.url("429_retry_after"), "claude": provider.url("success")},
                 [("S01-first", chain, []), ("S02-after", chain, ["S01"]), ("S03-alone", chain, [])]),
        Scenario("refused", {"glm": f"http://127.0.0.1:{free_port()}", "claude": provider.url("success")},
                 [("S01-hello", chain, [])]),
        Scenario("codex", {"codex": provider.url("success") + "/v1"}, [("S01-hello", ["codex"], [])]),
    ]


def figures(row: dict) -> list[tuple[str, object, str, bool | None]]:
    """(figure, value, target, met) of one scenario's run."""
    specs, name = row.get("specs") or {}, row["scenario"]

    def to_claude(task_id: str) -> float | None:
        return (specs.get(task_id) or {}).get("step_starts_s", {}).get("claude")

    def ok(task_id: str, model: str) -> bool:
        spec = specs.get(task_id) or {}
        return spec.get("status") == "succeeded" and spec.get("model") == model

    out: list[tuple[str, object, str, bool | None]] = []
    if name == "limited":
        wall = row.get("wall_s")
        out.append(("(a) wall of 3 specs, s", wall, "<= 60",
                    wall is not None and wall <= 60 and failed_outright(row) is None))
        for task_id, target in (("S01-first", 15.0), ("S03-alone", 15.0), ("S02-after", 1.0)):
            seconds = to_claude(task_id)
            out.append((f"(a) {task_id}: runner start -> claude, s", seconds, f"<= {target:g}",
                        seconds is not None and seconds <= target and ok(task_id, "claude")))
        glm, claude = row.get("requests", {}).get("glm", []), row.get("requests", {}).get("claude", [])
        gap = round(claude[0] - glm[0], 2) if glm and claude else None
        out.append(("(a) provider: glm's 1st 429 -> claude's 1st request, s", gap, "<= 15",
                    gap is not None and gap <= 15))
        out.append(("(a) requests to glm (S01, S03; S02 skips it)", len(glm), "1-2", 1 <= len(glm) <= 2))
    elif name == "refused":
        seconds = to_claude("S01-hello")
        out.append(("(b) refused glm: runner start -> claude, s", seconds, "<= 15",
                    seconds is not None and seconds <= 15 and ok("S01-hello", "claude")))
    else:
        report = (row.get("report") or {}).get("S01-hello") if isinstance(row.get("report"), dict) else None
        tokens = (report or {}).get("input_tokens"), (report or {}).get("output_tokens")
        out.append(("(c) codex succeeds, tokens in/out", f"{tokens[0]}/{tokens[1]}", "succeeded, > 0",
                    ok("S01-hello", "codex") and all(isinstance(t, int) and t > 0 for t in tokens)))
    return out


def failed_outright(row: dict) -> str | None:
    """Why a scenario's run failed outright (not a missed target), else None."""
    if row.get("error"):
        return row["error"]
    if row.get("timed_out"):
        return f"dispatch start did not end within the timeout ({row['wall_s']} s)"
    if row.get("exit_code") != 0:
        return f"dispatch start exited {row.get('exit_code')}"
    bad = {t: s for t, s in (row.get("specs") or {}).items() if s.get("status") != "succeeded"}
    return f"specs not succeeded: {json.dumps(bad)[:600]}" if bad else None


def print_table(rows: list[dict], code: str) -> None:
    print(f"\nagent fallback with the real CLIs ({code})")
    print(f"| {'figure':<56} | {'value':>10} | {'target':<14} | met |")
    print(f"|{'-' * 58}|{'-' * 12}|{'-' * 16}|-----|")
    for row in rows:
        for label, value, target, met in figures(row):
            shown = "-" if value is None else value
            print(f"| {label:<56} | {shown!s:>10} | {target:<14} | {'yes' if met else 'NO'} |")
    for row in rows:
        if why := failed_outright(row):
            print(f"{row['scenario']}: FAILED: {why}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="limited,refused,codex", help="scenarios to run, comma-separated")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a dispatch start is stopped")
    parser.add_argument("--code", type=Path, default=None, help="run dispatch from this checkout (PYTHONPATH)")
    parser.add_argument("--model-env", action="append", default=[], metavar="K=V",
                        help="a variable every model's CLI gets (repeat), e.g. IS_SANDBOX=1 for a code that does not "
                             "set it for Claude Code as root")
    parser.add_argument("--out", type=Path, default=None, help="default bench/out/agent_fallback[-<code>].json")
    args = parser.parse_args()
    bad = [pair for pair in args.model_env if "=" not in pair or not pair.split("=", 1)[0]]
    if bad:
        parser.error(f"--model-env {bad[0]!r}: give NAME=VALUE, e.g. IS_SANDBOX=1")
    model_env = dict(pair.split("=", 1) for pair in args.model_env)
    require_clis()
    code = args.code.resolve() if args.code else None
    out = args.out or ROOT / "bench" / "out" / (f"agent_fallback-{code.name}.json" if code else "agent_fallback.json")
    wanted = args.only.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dispatch-agent-fallback-") as tmp:
        for number, name in enumerate(wanted):
            with FakeProvider() as provider:  # one per scenario: its records are that run's
                scenario = {s.name: s for s in scenarios(provider)}.get(name)
                if scenario is None:
                    raise SystemExit(f"--only: no scenario {name!r} (limited, refused, codex)")
                row = run(scenario, Path(tmp) / f"{number}-{name}", code, provider, args.timeout, model_env)
            rows.append(row)
            print(name, {k: v for k, v in row.items() if k != "output_tail"}, flush=True)
    result = {"code": str(code or ROOT), "timeout_s": args.timeout, "model_env": model_env, "runs": rows,
              "figures": [dict(zip(("figure", "value", "target", "met"), f, strict=True)) for r in rows
                          for f in figures(r)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(rows, str(code or ROOT))
    return 1 if any(failed_outright(r) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
