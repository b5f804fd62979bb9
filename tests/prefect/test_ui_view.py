"""A project's run as the Prefect UI shows it, read through Prefect's real API: task runs named by spec id (and
`S02 (attempt 2)`), the DAG's edges, each spec's log lines in its own task run (secrets masked), and the
report artifact with the table of specs linking to their task runs' logs. A pipeline run's page in the real UI,
in headless Chromium: the failed layer shown failed, a layer that did not run not shown as done, and L4b's
screenshots shown as images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.local_server import LocalHome, headless_page
from tests.fixtures.projects import shell_spec
from tests.fixtures.shop import Shop

pytestmark = pytest.mark.prefect

_SECRET = "uiview-Secret-4f9c2e7a1b"


def _flow_run_view(flow_run_id: str) -> tuple[dict, dict[str, list[str]], list]:
    """(task runs by name, log messages by task run name, artifacts) of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log lines are shipped in batches: send every one still queued, as the UI would
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_id = {run.id: run for run in task_runs}
    lines: dict[str, list[str]] = {}
    for log in logs:
        if log.task_run_id in by_id:
            lines.setdefault(by_id[log.task_run_id].name, []).append(log.message)
    return {run.name: run for run in task_runs}, lines, artifacts


def test_a_run_reads_well_in_the_prefect_ui(run_project, isolated_home: Path, monkeypatch):
    monkeypatch.setenv("UIVIEW_API_TOKEN", _SECRET)  # a credential of the dispatcher's environment: masked
    specs, timeline = isolated_home / "specs" / "uiview", isolated_home / "timeline"
    marker = isolated_home / "failed-once"
    shell_spec(specs, "S01-base", timeline, seconds=0.1, extra=f"echo 'base says {_SECRET}'")
    shell_spec(specs, "S02-flaky", timeline, seconds=0.1, depends_on=["S01"],
               extra=f"if [ ! -e {marker} ]; then touch {marker}; echo 'first try fails'; exit 3; fi")
    shell_spec(specs, "S03-last", timeline, seconds=0.1, depends_on=["S02"])
    state, summary = run_project("uiview", slots=2)
    assert state.is_completed(), state.message

    task_runs, lines, artifacts = _flow_run_view(summary.flow_run_id)
    assert set(task_runs) == {"S01-base", "S02-flaky", "S02-flaky (attempt 2)", "S03-last"}
    edges = {name: {i.id for i in run.task_inputs.get("wait_for", [])} for name, run in task_runs.items()}
    assert task_runs["S01-base"].id in edges["S02-flaky (attempt 2)"], "the DAG's edge S01 -> S02 is missing"
    assert task_runs["S02-flaky (attempt 2)"].id in edges["S03-last"], "S03 waits on S02's last attempt"

    assert any("base says ***" in line for line in lines["S01-base"]), lines["S01-base"]
    assert any("first try fails" in line for line in lines["S02-flaky"]), "the failed attempt keeps its own log"
    assert not any(_SECRET in line for task_lines in lines.values() for line in task_lines), "a secret leaked"

    report = next(a for a in artifacts if a.key == "report-uiview")
    links = dict(re.findall(r"\[([A-Za-z0-9_.-]+)\]\(/runs/task-run/([0-9a-f-]{36})\)", report.data))
    assert links == {"S01-base": str(task_runs["S01-base"].id),
                     "S02-flaky": str(task_runs["S02-flaky (attempt 2)"].id),
                     "S03-last": str(task_runs["S03-last"].id)}, report.data
    assert any(a.key == "specs-uiview" and a.type == "table" for a in artifacts)


def _badge(page, run_name: str) -> str:
    """The state shown beside the subflow run `run_name` on a flow run's Subflow Runs tab."""
    item = page.locator(".state-list-item", has_text=run_name).first
    item.wait_for(timeout=30_000)
    return item.locator(".state-badge").first.inner_text().strip()


def test_a_pipeline_runs_page_shows_the_failed_layer_failed_and_the_screenshots(local_home: LocalHome):
    shop = Shop(local_home.root)  # the example, in this home's DISPATCH_SPECS; L4 fails on its defects
    shop.save(layers={"L4a": {"enabled": False}, "L4d": {"enabled": False}})  # L4b alone fails it, sooner
    done = local_home.run("pipeline", "run", "shop", "--from", "L3", "--to", "L4", timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    url = re.search(r"http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}", done.stdout)
    assert url, f"no UI address printed:\n{done.stdout}"
    with headless_page() as page:
        page.goto(url.group(0))
        page.get_by_text("Subflow Runs", exact=True).first.click()
        assert _badge(page, "shop L4 test") == "Failed"
        assert _badge(page, "shop L3 build") == "Completed"
        assert "Can't connect" not in page.inner_text("body")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("shop-screenshots", exact=True).first.click()
        images = page.locator("img[src^='data:image/jpeg;base64,']")
        images.first.wait_for(timeout=30_000)
        sizes = [image.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]") for image in images.all()]
        assert len(sizes) == 4 and all(ok and 0 < w <= 480 and 0 < h <= 960 for ok, w, h in sizes), sizes
        assert "file://" not in page.content()
        page.go_back()  # the L4 subflow's own page: the sub-layer that failed, and the one that did not run
        page.get_by_text("Subflow Runs", exact=True).first.click()
        page.locator(".state-list-item", has_text="shop L4 test").first.get_by_text("shop L4 test").click()
        page.get_by_text("Subflow Runs", exact=True).first.click()
        assert _badge(page, "shop L4b browser_qa") == "Failed"
        assert _badge(page, "shop L4c ui_review") == "NotRun"
