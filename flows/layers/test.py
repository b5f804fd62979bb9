"""L4 Test: L4a API QA, L4b Browser QA, L4c UI Review and L4d Regression, concurrently, against the one app
L3 started.

L4a, L4b and L4d start together; L4c (the agent side's `ui_review`, found by import path) starts as soon as
L4b hands it the pages it captured. Each runs as its own subflow under a task (Prefect's way to run sync
subflows concurrently), with its own timeout. Called by flows/pipeline.py, which caches and reports.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from dispatch.pipeline.api_qa import run_api_qa
from dispatch.pipeline.browser_qa import BrowserMissing, run_browser_qa
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.regression import (
    CoverageMissing,
    compare,
    load_baseline,
    page_times,
    run_regression,
    save_baseline,
)
from dispatch.pipeline.results import TEST_LAYERS, Bug, Check, LayerResult, PageCapture, Status, layer_run_name
from dispatch.pipeline.workspace import locate_source, step_environment
from flows.layers import resolve
from flows.layers.verdict import judged, result_of, verdict_state


def _summary(checks: list[Check]) -> tuple[int, int]:
    judged = [c for c in checks if c.verdict != "skip"]
    return sum(c.verdict == "pass" for c in judged), len(judged)


@flow(name="api_qa")
def api_qa(project: str, run_dir: str, config: PipelineConfig, app_url: str) -> LayerResult:
    """L4a: the normal and hostile cases of every endpoint, and the API flows, over real HTTP."""
    try:
        checks, bugs, source = run_api_qa(app_url, openapi=config.api.openapi, endpoints=config.api.endpoints,
                                          flows=[(f.name, f.steps) for f in config.api.flows])
    except ValueError as exc:
        return LayerResult(layer="L4a", status=Status.NOT_RUN, reason=str(exc))
    passed, total = _summary(checks)
    rate = passed / total if total else 0.0
    critical = [b for b in bugs if b.severity == "S1"]
    ok = total > 0 and rate >= config.thresholds.api_pass_rate and not critical
    reason = (f"{passed}/{total} cases passed ({rate:.0%}, needs {config.thresholds.api_pass_rate:.0%}), "
              f"{len(bugs)} bug(s), {len(critical)} S1; {source}")
    return LayerResult(layer="L4a", status=Status.PASS if ok else Status.FAIL, reason=reason, checks=checks,
                       bugs=bugs, evidence={"pass_rate": round(rate, 4), "cases": total})


@flow(name="browser_qa")
def browser_qa(project: str, run_dir: str, config: PipelineConfig, pages_url: str) -> LayerResult:
    """L4b: every page at 1920x1080 and 375x812 in headless Chromium, and the browser flows."""
    out_dir = Path(run_dir, "L4b")
    try:
        qa = run_browser_qa(pages_url, config.pages, [(f.name, f.steps) for f in config.browser_flows], out_dir,
                            config.thresholds.load_time_s)
    except BrowserMissing as exc:
        return LayerResult(layer="L4b", status=Status.NOT_RUN, reason=str(exc))
    passed, total = _summary(qa.checks)
    ok = passed == total
    shots = {f"{c.path} {size}": png for c in qa.captures for size, png in c.screenshots.items()}
    return LayerResult(layer="L4b", status=Status.PASS if ok else Status.FAIL,
                       reason=f"{passed}/{total} page loads and flows clean; {len(qa.bugs)} bug(s)", checks=qa.checks,
                       bugs=qa.bugs, evidence={"pages": [c.model_dump() for c in qa.captures], "screenshots": shots})


def _coverage_min(config: PipelineConfig) -> float:
    regression = config.regression
    return regression.coverage.min if "coverage" in regression.model_fields_set else config.thresholds.coverage_min


@flow(name="regression")
def regression(project: str, code_dir: str, run_dir: str, config: PipelineConfig, pages_url: str,
               run_id: str = "") -> LayerResult:
    """L4d: the project's tests with coverage, page load times, compared with the last passing baseline
    (`<project dir>/baseline.json`, beside the runs); a PASS becomes the new baseline."""
    command = config.regression.command
    if not command:
        return LayerResult(layer="L4d", status=Status.NOT_RUN,
                           reason="no regression.command in pipeline.yaml (e.g. `python -m pytest -q`)")
    code = Path(code_dir)
    try:
        run = run_regression(code, command, Path(run_dir, "L4d"), step_environment(code, config.backend.env),
                             config.layer("L4d").timeout or 1200.0)
    except CoverageMissing as exc:
        return LayerResult(layer="L4d", status=Status.NOT_RUN, reason=str(exc))
    run.pages = page_times(pages_url, config.pages)
    baseline_path = Path(run_dir).parent / "baseline.json"
    baseline = load_baseline(baseline_path)
    worse = compare(run, baseline)
    failing = sorted(t for t, outcome in run.tests.items() if outcome in ("failed", "error"))
    blamed = worse["new_failures"] if baseline else failing
    checks = [Check(name="test command", verdict="pass" if run.step.ok or (baseline and not blamed) else "fail",
                    detail=run.step.describe() + (f"; failing: {', '.join(failing[:10])}" if failing else ""),
                    duration=round(run.step.duration, 2))]
    bugs = [Bug.make(layer="L4d", where=test_id, title="test fails" + (" (passed in the baseline)" if baseline else ""),
                     severity="S2", reproduce=command, evidence="\n".join(run.step.tail[-15:])) for test_id in blamed]
    if not run.tests and not run.step.ok:
        bugs.append(Bug.make(layer="L4d", where=command, title="test command fails", severity="S2",
                             reproduce=command, evidence="\n".join(run.step.tail[-15:])))
    minimum = _coverage_min(config)
    covered = run.coverage is not None and run.coverage >= minimum
    drop = f"; {worse['coverage_drop']:.1f} points below the baseline" if worse["coverage_drop"] else ""
    checks.append(Check(name="coverage", verdict="pass" if covered else "fail",
                        detail=f"{run.coverage if run.coverage is not None else 'not measured'}% (min {minimum:g}%)"
                               + drop))
    for path, seconds in run.pages.items():
        slow = seconds is None or seconds > config.thresholds.load_time_s
        checks.append(Check(name=f"page {path}", verdict="fail" if slow else "pass",
                            detail="did not load" if seconds is None else f"{seconds:.2f}s", duration=seconds))
        if slow:
            bugs.append(Bug.make(layer="L4d", where=path, title="page slower than the limit or not loading",
                                 severity="S3", reproduce=f"GET {path}", evidence=f"{seconds}"))
    ok = all(c.verdict == "pass" for c in checks)
    if ok:
        save_baseline(baseline_path, run, run_id or Path(run_dir).name)
    reason = (f"{len(run.tests)} tests ({len(failing)} failing, {len(worse['new_failures'])} new), coverage "
              f"{run.coverage}%{drop}; " + ("new baseline" if ok else "baseline kept"))
    return LayerResult(layer="L4d", status=Status.PASS if ok else Status.FAIL, reason=reason, checks=checks,
                       bugs=bugs, evidence={"coverage": run.coverage, "coverage_report": run.report,
                                            "tests": run.tests, "pages": run.pages, "compared": worse,
                                            "baseline": str(baseline_path) if baseline else None})


_LOCAL = {"L4a": api_qa, "L4b": browser_qa, "L4d": regression}


def _sublayer_run_name() -> str:
    return layer_run_name(task_run.parameters["arguments"]["project"], task_run.parameters["layer"])


@task(name="sub-layer", task_run_name=_sublayer_run_name, cache_policy=NO_CACHE)
def run_sublayer(layer: str, arguments: dict, timeout: float | None) -> State:
    """Run one of L4a-d as a subflow; a crash or a timeout becomes its FAIL, a missing layer its NOT RUN.
    The subflow and this task end in the state of the verdict, whose data is the `LayerResult`."""
    if layer in _LOCAL:
        subflow = _LOCAL[layer]
    else:
        subflow, why = resolve(layer)
        if subflow is None:
            return verdict_state(LayerResult(layer=layer, status=Status.NOT_RUN,
                                             reason=f"no UI review available: {why}"))
    started = time.time()
    state = judged(subflow, layer_run_name(arguments["project"], layer), timeout)(**arguments, return_state=True)
    return verdict_state(result_of(state, layer).model_copy(update={"started_at": started, "ended_at": time.time()}))


def _locate(code_dir: Path, bugs: list[Bug]) -> list[Bug]:
    located = []
    for bug in bugs:
        if bug.file is None:
            route = bug.where.split(" ", 1)[1] if bug.layer == "L4a" and " " in bug.where else None
            file = locate_source(code_dir, literal=route, evidence=bug.evidence if bug.layer == "L4b" else "")
            bug = bug.model_copy(update={"file": file}) if file else bug
        located.append(bug)
    return located


def gate(children: list[LayerResult], config: PipelineConfig) -> Status:
    """L4's status from its enabled children: FAIL if one failed, else NOT RUN if one did not run, else PASS."""
    counted = [c for c in children if config.layer(c.layer).enabled]
    if any(c.status is Status.FAIL for c in counted):
        return Status.FAIL
    if any(c.status is Status.NOT_RUN for c in counted) or not counted:
        return Status.NOT_RUN
    return Status.PASS


@flow(name="test", task_runner=ThreadPoolTaskRunner(max_workers=4))
def run_tests(project: str, code_dir: str, run_dir: str, config: PipelineConfig, app_url: str | None,
              pages_url: str | None = None, only: list[str] | None = None, cycle: int = 0) -> LayerResult:
    """L4: run the selected (`only`, default all) of L4a-d against the app at `app_url`.

    Returns:
        PASS when every enabled sub-layer passed; its `children` are their results and its `bugs` all of
        theirs (with the source file when it can be told), S1 first.
    """
    pages_url = pages_url or app_url
    selected = [layer for layer in TEST_LAYERS if not only or layer in only]
    if not app_url and not pages_url:
        return LayerResult(layer="L4", status=Status.NOT_RUN, reason="no app is running (L3 did not start one)")
    base = {"project": project, "run_dir": run_dir, "config": config}
    arguments = {"L4a": {**base, "app_url": app_url}, "L4b": {**base, "pages_url": pages_url},
                 "L4d": {**base, "code_dir": code_dir, "pages_url": pages_url, "run_id": Path(run_dir).name}}
    results: dict[str, LayerResult] = {}
    futures = {}
    for layer in selected:
        if not config.layer(layer).enabled:
            results[layer] = LayerResult(layer=layer, status=Status.NOT_RUN,
                                         reason=f"turned off in pipeline.yaml (layers.{layer}.enabled: false)")
        elif layer != "L4c":
            futures[layer] = run_sublayer.submit(layer, arguments[layer], config.layer(layer).timeout)
    if "L4c" in selected and "L4c" not in results:
        pages: list[PageCapture] = []
        if "L4b" in futures:
            pages = [PageCapture.model_validate(p) for p in
                     futures["L4b"].result(raise_on_failure=False).evidence.get("pages", [])]
        futures["L4c"] = run_sublayer.submit("L4c", {**base, "pages": pages}, config.layer("L4c").timeout)
    for layer, future in futures.items():
        results[layer] = future.result(raise_on_failure=False).model_copy(update={"cycle": cycle})
    children = [results[layer] for layer in selected]
    bugs = sorted(_locate(Path(code_dir), [b for c in children for b in c.bugs]), key=lambda b: b.severity)
    status = gate(children, config)
    reason = "; ".join(f"{c.layer} {c.status.value}" for c in children)
    return LayerResult(layer="L4", status=status, reason=reason, bugs=bugs, children=children, cycle=cycle,
                       evidence={"app_url": app_url, "pages_url": pages_url})
