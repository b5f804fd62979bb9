"""L4d Regression: the project's test command with coverage, page load times, and the comparison with the
last passing baseline (`DISPATCH_HOME/pipeline/<project>/baseline.json`).

Coverage is measured whatever the command is (`pytest -q`, `make test`, `tox`): a directory put first on
the command's PYTHONPATH holds only `coverage` (the dispatcher's own) and a `sitecustomize` that starts it
in every Python process the command runs (coverage's documented subprocess support). pytest's per-test
outcomes come from `--junitxml`, added through PYTEST_ADDOPTS (the report keeps the tests' output: it is
masked like every file the pipeline keeps). The combined data becomes coverage.py's JSON report in the
layer's directory.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dispatch.pipeline.masking import mask_file
from dispatch.pipeline.shell import StepResult, run_step

_RC = """[run]
parallel = True
data_file = {data}
source = {source}
omit =
    */.venv/*
    */venv/*
    */tests/*
    */test_*.py
    */*_test.py
    */conftest.py
"""


class CoverageMissing(Exception):
    """The dispatcher has no coverage.py: L4d cannot measure, so it does not run."""


@dataclass
class RegressionRun:
    """What the test command did and what it covered."""

    step: StepResult
    tests: dict[str, str] = field(default_factory=dict)  # test id -> passed, failed, error, skipped
    coverage: float | None = None
    pages: dict[str, float | None] = field(default_factory=dict)  # path -> seconds (None: did not load)
    report: str | None = None


def _tools_dir(out_dir: Path) -> Path:
    try:
        import coverage
    except ImportError as exc:
        raise CoverageMissing("coverage.py is not installed: pip install 'oyster-dispatch[pipeline]'") from exc
    tools = out_dir / "pythonpath"
    tools.mkdir(parents=True, exist_ok=True)
    link = tools / "coverage"
    if not link.exists():
        link.symlink_to(Path(coverage.__file__).parent, target_is_directory=True)
    (tools / "sitecustomize.py").write_text("import coverage\ncoverage.process_startup()\n", encoding="utf-8")
    return tools


def read_junit(path: Path) -> dict[str, str]:
    """Per-test outcomes from a JUnit XML file (pytest's), by `classname::name`."""
    outcomes: dict[str, str] = {}
    if not path.is_file():
        return outcomes
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return outcomes
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        outcomes[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                          else "skipped" if "skipped" in kinds else "passed")
    return outcomes


def _combine(out_dir: Path, rcfile: Path) -> tuple[float | None, str | None]:
    import coverage

    cov = coverage.Coverage(config_file=str(rcfile), data_file=str(out_dir / ".coverage"))
    try:
        cov.combine([str(out_dir)], keep=False)
        cov.save()
        report = out_dir / "coverage.json"
        total = cov.json_report(outfile=str(report))
    except coverage.CoverageException:  # no data: the command ran no Python of the project
        return None, None
    return round(total, 2), str(report)


def page_times(base_url: str, pages: list[str], timeout: float = 10.0) -> dict[str, float | None]:
    """Seconds to fetch each page's HTML (None when it fails or answers >= 400)."""
    times: dict[str, float | None] = {}
    with httpx.Client(base_url=base_url, timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for path in pages:
            started = time.monotonic()
            try:
                ok = client.get(path).status_code < 400
            except httpx.HTTPError:
                ok = False
            times[path] = round(time.monotonic() - started, 3) if ok else None
    return times


def run_regression(code_dir: Path, command: str, out_dir: Path, env: dict[str, str], timeout: float) -> RegressionRun:
    """Run `command` in `code_dir` with coverage and JUnit output into `out_dir`.

    Raises:
        CoverageMissing: coverage.py is not installed with the dispatcher.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tools = _tools_dir(out_dir)
    rcfile = out_dir / "coveragerc"
    rcfile.write_text(_RC.format(data=out_dir / ".coverage", source=code_dir), encoding="utf-8")
    junit = out_dir / "junit.xml"
    junit.unlink(missing_ok=True)
    step_env = {**env, "COVERAGE_PROCESS_START": str(rcfile),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(tools), env.get("PYTHONPATH")])),
                "PYTEST_ADDOPTS": f"--junitxml={junit} -p no:cacheprovider {env.get('PYTEST_ADDOPTS', '')}".strip()}
    step = run_step("regression", command, cwd=code_dir, env=step_env, timeout=timeout)
    mask_file(junit)  # it holds the tests' output: kept as evidence, so masked like every other
    total, report = _combine(out_dir, rcfile)
    return RegressionRun(step=step, tests=read_junit(junit), coverage=total, report=report)


def load_baseline(path: Path) -> dict | None:
    """The last passing baseline, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_baseline(path: Path, run: RegressionRun, run_id: str) -> None:
    """Make `run` the baseline (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"run": run_id, "created": time.time(), "tests": run.tests,
                                     "coverage": run.coverage, "pages": run.pages}, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def compare(run: RegressionRun, baseline: dict | None) -> dict:
    """What got worse than `baseline`: tests that passed there and fail now, the coverage drop (points),
    pages slower than there."""
    if not baseline:
        return {"new_failures": [], "coverage_drop": 0.0, "slower_pages": {}}
    before = baseline.get("tests") or {}
    new_failures = sorted(t for t, outcome in run.tests.items()
                          if outcome in ("failed", "error") and before.get(t) == "passed")
    old_coverage = baseline.get("coverage")
    drop = round(old_coverage - run.coverage, 2) if old_coverage is not None and run.coverage is not None else 0.0
    old_pages = baseline.get("pages") or {}
    slower = {p: (old_pages[p], s) for p, s in run.pages.items()
              if s is not None and old_pages.get(p) is not None and s > old_pages[p] * 1.5 + 0.1}
    return {"new_failures": new_failures, "coverage_drop": max(drop, 0.0), "slower_pages": slower}
