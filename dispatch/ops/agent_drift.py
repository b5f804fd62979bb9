"""The agent CLI drift check: the contract scenarios against the pinned CLIs and the newest published ones.

The CLIs change their flags every few weeks (codex-cli dropped `--full-auto`), so a nightly run
(`flows/agent_cli_drift.py`, deployment `agent-cli-drift`) runs each scenario with the argv and environment
dispatch gives a model (`dispatch.core.agents.build_steps`) against the contract provider on 127.0.0.1:

    claude-success  Claude Code writes hello.txt through the Write tool round trip and exits 0
    claude-429      Claude Code answered 429 is classified transient (dispatch.runner.ratelimits.classify)
    codex-success   Codex writes hello.txt through a shell call round trip and exits 0
    codex-429       Codex answered 429 is classified transient

first with the pinned CLIs (agents/node_modules/.bin, `npm ci --prefix agents`), then with the newest version of
each package (`npm view <package> version`), installed into a throwaway prefix under
`DISPATCH_HOME/agent-drift/` (never globally; bounded in time; removed afterwards). A newer CLI failing a
scenario the pinned one passes is an alert through the guardian's notification block (`DISPATCH_ALERT_BLOCK`,
or the flow's `notify`), naming the CLI, its version and the scenario; the versions that passed every scenario
are recorded (dispatch/core/agent_versions.py) for `dispatch nodes check` and the guardian.

The contract provider is the test double tests/fixtures/fake_provider.py, started as a subprocess of the repo
checkout the deployment runs from (dispatch/ops/contract_provider.py): it stays a test fixture, and this module
never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dispatch.core.agent_versions import AGENTS_DIR, PACKAGES, parse_version, pinned_versions, record_results
from dispatch.core.agents import build_steps
from dispatch.core.errors import DispatchError
from dispatch.core.model_catalog import BUILTIN_MODELS, cli_environment, endpoint_settings
from dispatch.core.settings import DispatchSettings
from dispatch.core.specs import Spec
from dispatch.ops.contract_provider import ContractProvider
from dispatch.prefect.versions import passed_store
from dispatch.runner.ratelimits import classify

logger = logging.getLogger(__name__)

PINNED_BIN = AGENTS_DIR / "node_modules" / ".bin"
PROMPT = "Create the file hello.txt in the working directory, then say you are done.\n"
SCENARIO_TIMEOUT = 90.0  # seconds one CLI run may take (a success takes 2-5 s)
NPM_TIMEOUT = 600.0  # seconds `npm install` of one newest CLI may take
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_QUIET = {"DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "NO_COLOR": "1", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Scenario:
    """One contract scenario: `cli` against the provider's `provider` scenario must end as `expect` ("ok": exit
    0 with the file written through the tool round trip; else the kind `classify` must give)."""

    name: str
    cli: str
    provider: str
    expect: str


SCENARIOS = (Scenario("claude-success", "claude", "success", "ok"),
             Scenario("claude-429", "claude", "429", "transient"),
             Scenario("codex-success", "codex", "success", "ok"),
             Scenario("codex-429", "codex", "429", "transient"))


@dataclass
class ScenarioResult:
    scenario: str
    passed: bool
    detail: str
    seconds: float = 0.0


@dataclass
class CliRun:
    """One CLI at one version through its scenarios ("pinned" or "newest")."""

    cli: str
    source: str
    version: str | None = None
    results: list[ScenarioResult] = field(default_factory=list)
    error: str = ""
    same_as_pinned: bool = False

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.results) and all(r.passed for r in self.results)

    def result(self, scenario: str) -> ScenarioResult | None:
        return next((r for r in self.results if r.scenario == scenario), None)


@dataclass
class DriftReport:
    runs: list[CliRun]

    def run(self, cli: str, source: str) -> CliRun | None:
        return next((r for r in self.runs if r.cli == cli and r.source == source), None)

    def breaks(self) -> list[tuple[CliRun, ScenarioResult]]:
        """The scenarios a newest CLI fails that its pinned version passes."""
        found = []
        for newest in (r for r in self.runs if r.source == "newest"):
            pinned = self.run(newest.cli, "pinned")
            for result in newest.results:
                before = pinned.result(result.scenario) if pinned else None
                if not result.passed and before is not None and before.passed:
                    found.append((newest, result))
        return found

    def outcomes(self) -> dict[str, dict[str, bool]]:
        """`{cli: {version: passed every scenario}}` of the runs that ran."""
        found: dict[str, dict[str, bool]] = {}
        for run in self.runs:
            if run.version and run.results and not run.error:
                found.setdefault(run.cli, {})[run.version] = run.passed
        return found

    def to_json(self) -> dict:
        return {"runs": [{"cli": r.cli, "source": r.source, "version": r.version, "passed": r.passed,
                          "error": r.error, "same_as_pinned": r.same_as_pinned,
                          "results": [vars(x) for x in r.results]} for r in self.runs],
                "breaks": [{"cli": r.cli, "version": r.version, "scenario": x.scenario} for r, x in self.breaks()]}

    def markdown(self) -> str:
        rows = ["| CLI | source | version | scenario | result | detail |", "|---|---|---|---|---|---|"]
        for run in self.runs:
            if run.error or run.same_as_pinned:
                note = run.error or "same version as the pinned one: not run again"
                rows.append(f"| {run.cli} | {run.source} | {run.version or '-'} | - | - | {_cell(note)} |")
            for x in run.results:
                rows.append(f"| {run.cli} | {run.source} | {run.version or '-'} | {x.scenario} | "
                            f"{'pass' if x.passed else '**FAIL**'} | {_cell(x.detail)} |")
        broken = [f"- **{r.cli} {r.version} breaks {x.scenario}** (the pinned version passes it)"
                  for r, x in self.breaks()]
        return "# Agent CLI drift\n\n" + "\n".join(broken or ["No newer CLI breaks a scenario."]) + "\n\n" + \
            "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def _run(argv: list[str], env: dict[str, str], cwd: Path, stdin: str, timeout: float) -> tuple[int | None, str]:
    """Run `argv` with `stdin`, stdout and stderr merged in arrival order; its process group killed at
    `timeout` (exit code None)."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(stdin.encode(), timeout=timeout)
        return process.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=10)
        return None, out.decode(errors="replace")


def cli_version(bin_dir: Path, cli: str, timeout: float = 30.0) -> str | None:
    """The version `bin_dir/cli --version` answers, or None."""
    try:
        code, out = _run([str(bin_dir / cli), "--version"], {"PATH": f"{bin_dir}:{_SYSTEM_PATH}", **_QUIET},
                         bin_dir, "", timeout)
    except OSError:
        return None
    return parse_version(out) if code == 0 else None


def run_scenario(scenario: Scenario, bin_dir: Path, provider: ContractProvider, work: Path,
                 timeout: float = SCENARIO_TIMEOUT) -> ScenarioResult:
    """Run one scenario with `bin_dir`'s CLI, argv and environment as dispatch gives them (`build_steps`; the
    CLI's own retries off, as for a model with another after it)."""
    model = BUILTIN_MODELS[scenario.cli]
    url = provider.url(scenario.provider) + ("/v1" if model.family == "codex" else "")
    env, base_url = endpoint_settings(model.argv, model.env, url)
    catalog = {model.name: replace(model, env=env, base_url=base_url)}
    step = build_steps(Spec(task_id="drift", path=Path("drift.md"), body="", models=[model.name]), PROMPT,
                       catalog=catalog)[0]
    home, cwd = Path(tempfile.mkdtemp(prefix="home-", dir=work)), Path(tempfile.mkdtemp(prefix="project-", dir=work))
    key = f"sk-drift-{scenario.name}-{secrets.token_hex(6)}"
    run_env = {"PATH": f"{bin_dir}:{_SYSTEM_PATH}", "HOME": str(home), "CODEX_HOME": str(home / ".codex"), **_QUIET,
               **step["env"], **cli_environment(model.argv, last=False), model.key_env or "API_KEY": key}
    (home / ".codex").mkdir()
    began = time.monotonic()
    try:
        code, output = _run([str(bin_dir / step["argv"][0]), *step["argv"][1:]], run_env, cwd, step["stdin"], timeout)
    except OSError as exc:
        return ScenarioResult(scenario.name, False, f"cannot start {bin_dir / scenario.cli}: {exc}")
    seconds = round(time.monotonic() - began, 1)
    verdict = classify(output, code)
    tail = " ".join(output.strip().splitlines()[-3:])[-300:]
    said = f"exit {code if code is not None else f'none (killed after {timeout:.0f} s)'}, {verdict.kind}: " \
           f"{verdict.reason}"
    if scenario.expect != "ok":
        ok = verdict.kind == scenario.expect
        return ScenarioResult(scenario.name, ok, said if ok else f"expected {scenario.expect}; {said}; {tail}", seconds)
    written = (cwd / "hello.txt").is_file() and (cwd / "hello.txt").stat().st_size > 0
    round_trip = [bool(r.get("tool_result")) for r in provider.asked_with(key, at_least=2 if written else 0)]
    ok = code == 0 and verdict.kind == "ok" and written and False in round_trip and True in round_trip
    detail = f"{said}; hello.txt {'written' if written else 'NOT written'}; tool round trip " \
             f"{'done' if False in round_trip and True in round_trip else f'not done ({len(round_trip)} requests)'}"
    return ScenarioResult(scenario.name, ok, detail if ok else f"{detail}; {tail}", seconds)


def npm_latest(package: str, timeout: float = 60.0) -> str:
    """The newest published version of `package` (`npm view <package> version`)."""
    try:
        done = subprocess.run(["npm", "view", package, "version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DispatchError(f"`npm view {package} version` failed: {exc}") from exc
    version = parse_version(done.stdout)
    if done.returncode != 0 or version is None:
        raise DispatchError(f"`npm view {package} version` failed (exit {done.returncode}): {done.stderr[-300:]}")
    return version


def npm_install(package: str, version: str, prefix: Path, timeout: float = NPM_TIMEOUT) -> Path:
    """Install `package@version` into `prefix` (never globally); its `node_modules/.bin`."""
    try:
        done = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save",
                               f"{package}@{version}"], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DispatchError(f"`npm install {package}@{version}` into {prefix} failed: {exc}") from exc
    if done.returncode != 0:
        raise DispatchError(f"`npm install {package}@{version}` failed (exit {done.returncode}): {done.stderr[-300:]}")
    return prefix / "node_modules" / ".bin"


Latest = Callable[[str], str]
Install = Callable[[str, str, Path], Path]


def _run_cli(cli: str, source: str, bin_dir: Path, provider: ContractProvider, work: Path, timeout: float,
             version: str | None = None) -> CliRun:
    run = CliRun(cli, source, version=cli_version(bin_dir, cli) or version)
    if not (bin_dir / cli).exists():
        run.error = f"{bin_dir / cli} is missing" + (": run `npm ci --prefix agents`" if source == "pinned" else "")
        return run
    run.results = [run_scenario(s, bin_dir, provider, work, timeout) for s in SCENARIOS if s.cli == cli]
    return run


def check_drift(settings: DispatchSettings, *, clis: list[str] | None = None, latest: Latest | None = None,
                install: Install | None = None, pinned_bin: Path = PINNED_BIN,
                timeout: float = SCENARIO_TIMEOUT) -> DriftReport:
    """Run the scenarios against the pinned CLIs and the newest published ones.

    Args:
        settings: the process settings (the throwaway prefixes go under `home`).
        clis: the CLIs to check (default: every one of `PACKAGES`).
        latest: the newest version of a package (default `npm_latest`).
        install: installs `(package, version, prefix)`, returning its bin directory (default `npm_install`).
        pinned_bin: where the pinned CLIs are.
        timeout: seconds per scenario.
    """
    latest, install = latest or npm_latest, install or npm_install
    unknown = sorted(set(clis or ()) - set(PACKAGES))
    if unknown:
        raise DispatchError(f"no drift check for {', '.join(unknown)}; known CLIs: {', '.join(PACKAGES)}")
    pinned = pinned_versions()
    root = settings.home / "agent-drift"
    root.mkdir(parents=True, exist_ok=True)
    runs: list[CliRun] = []
    with ContractProvider() as provider, tempfile.TemporaryDirectory(prefix="work-", dir=root) as work:
        for cli in clis or list(PACKAGES):
            first = _run_cli(cli, "pinned", pinned_bin, provider, Path(work), timeout, pinned.get(cli))
            runs.append(first)
            try:
                newest = latest(PACKAGES[cli])
            except DispatchError as exc:
                runs.append(CliRun(cli, "newest", error=str(exc)))
                continue
            if newest == first.version:
                runs.append(CliRun(cli, "newest", version=newest, same_as_pinned=True))
                continue
            prefix = root / f"{cli}-{newest}"
            try:
                runs.append(_run_cli(cli, "newest", install(PACKAGES[cli], newest, prefix), provider, Path(work),
                                     timeout, newest))
            except DispatchError as exc:
                runs.append(CliRun(cli, "newest", version=newest, error=str(exc)))
            finally:
                shutil.rmtree(prefix, ignore_errors=True)
    return DriftReport(runs)


def drift_alerts(report: DriftReport) -> list:
    """The alerts of a drift check: each newest CLI breaking a scenario its pinned version passes, and each
    pinned CLI failing (then newer versions cannot be judged)."""
    from dispatch.ops.guardian.policy import Alert

    alerts = []
    for run, result in report.breaks():
        alerts.append(Alert(run.cli, "drift", f"[dispatch agent-cli-drift] {run.cli} {run.version} breaks "
                                              f"{result.scenario}",
                            f"{run.cli} {run.version} (newest published) fails the contract scenario "
                            f"{result.scenario}, which the pinned version passes: {result.detail}\nKeep nodes on "
                            f"the pinned version (agents/package.json) until dispatch supports it."))
    for run in report.runs:
        failed = [r.scenario for r in run.results if not r.passed]
        if run.source == "pinned" and (run.error or failed):
            alerts.append(Alert(run.cli, "pinned-failing", f"[dispatch agent-cli-drift] pinned {run.cli} "
                                                           f"{run.version or '?'} fails",
                                f"the pinned {run.cli} fails {', '.join(failed) or run.error}: newer versions "
                                "cannot be judged against it"))
    return alerts


def run_drift(settings: DispatchSettings, *, clis: list[str] | None = None, notify: str | None = None,
              latest: Latest | None = None, install: Install | None = None, pinned_bin: Path = PINNED_BIN,
              log: logging.Logger | logging.LoggerAdapter = logger) -> tuple[DriftReport, list, list[str]]:
    """`check_drift`, then record the versions that passed and send the alerts through the notification block
    `notify` (default: the guardian's, `DISPATCH_ALERT_BLOCK`).

    Returns:
        (the report, the alerts, the errors of alerts not sent).
    """
    from dispatch.ops.guardian.policy import send_alerts

    report = check_drift(settings, clis=clis, latest=latest, install=install, pinned_bin=pinned_bin)
    passed = record_results(passed_store(settings), report.outcomes())
    log.info("agent CLI versions passed: %s", json.dumps(passed))
    alerts = drift_alerts(report)
    for alert in alerts:
        log.warning("%s: %s", alert.subject, alert.body.replace("\n", " | "))
    where, errors = send_alerts(settings, alerts, block_name=notify)
    log.info("drift alerts go to %s", where)
    return report, alerts, errors
