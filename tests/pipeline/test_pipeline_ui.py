"""A pipeline run as the Prefect UI shows it, read through Prefect's API: every layer's subflow (and L4's task
runs) ends in the state of its verdict (FAIL Failed, NOT RUN a non-success state with the reason as its
message, PASS Completed) under a name a person can read, and `dispatch pipeline run` prints the flow run's UI
address. The page itself in headless Chromium: tests/prefect/test_ui_view.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect

DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def _descendants(flow_run_id) -> list:
    """Every flow run under `flow_run_id` (subflows of subflows too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, parents = [], [flow_run_id]
    with get_client(sync_client=True) as client:
        for _ in range(5):  # the pipeline nests three deep: pipeline > L4 test > L4a..L4d
            if not parents:
                break
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents)))
            found += runs
            parents = [run.id for run in runs]
    return found


def _task_runs(flow_run_id) -> list:
    """The task runs of a flow run that its page lists (not the stand-ins Prefect makes for subflows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterSubFlowRuns,
    )

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(subflow_runs=TaskRunFilterSubFlowRuns(exists_=False)))


def test_each_layer_subflow_ends_in_the_state_of_its_verdict_under_a_readable_name(shop, prefect_api):
    from dispatch.core.settings import get_settings
    from dispatch.pipeline.runs import latest_run
    from flows.pipeline import pipeline

    get_settings.cache_clear()
    state = pipeline("shop", from_layer="L3", to_layer="L4", return_state=True)
    record = latest_run(get_settings().home / "pipeline" / "shop")
    verdicts = {row.layer: (row.status.value, row.reason) for row in record.layers}
    assert {layer: status for layer, (status, _) in verdicts.items()} == {
        "L3": "PASS", "L4": "FAIL", "L4a": "FAIL", "L4b": "FAIL", "L4c": "NOT RUN", "L4d": "PASS"}

    runs = {run.name: run for run in _descendants(state.state_details.flow_run_id)}
    names = {"L3": "shop L3 build", "L4": "shop L4 test", "L4a": "shop L4a api_qa", "L4b": "shop L4b browser_qa",
             "L4c": "shop L4c ui_review", "L4d": "shop L4d regression"}
    assert set(runs) == set(names.values()), sorted(runs)
    expected = {"PASS": ("COMPLETED", "Completed"), "FAIL": ("FAILED", "Failed"), "NOT RUN": ("CANCELLED", "NotRun")}
    for layer, name in names.items():
        status, reason = verdicts[layer]
        seen = runs[name].state
        assert (seen.type.value, seen.name) == expected[status], f"{name} is {seen.name}, its verdict {status}"
        if status != "PASS":
            assert seen.message == reason, f"{name}: {seen.message!r} is not its reason {reason!r}"

    tasks = {task.name: task for task in _task_runs(runs["shop L4 test"].id)}
    assert set(tasks) == {names[layer] for layer in ("L4a", "L4b", "L4c", "L4d")}, sorted(tasks)
    for layer in ("L4a", "L4b", "L4c", "L4d"):
        seen = tasks[names[layer]].state
        assert (seen.type.value, seen.name) == expected[verdicts[layer][0]], f"task {names[layer]}: {seen.name}"


def test_pipeline_run_prints_the_flow_runs_ui_address_when_it_starts_and_ends(shop, prefect_api):
    done = subprocess.run([DISPATCH, "pipeline", "run", "shop", "--only", "L6"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 1, done.stdout + done.stderr  # L6 without an L4 PASS: NOT RUN
    ui = prefect_api.removesuffix("/api")
    lines = done.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if re.search(rf"{re.escape(ui)}/runs/flow-run/[0-9a-f-]{{36}}\b", line)]
    assert len(at) == 2, f"the UI address is not printed at the start and the end:\n{done.stdout}"
    ids = {re.search(r"/runs/flow-run/([0-9a-f-]{36})", lines[i]).group(1) for i in at}
    layer_line = next(i for i, line in enumerate(lines) if "L6 deploy" in line)
    assert at[0] < layer_line < at[1], done.stdout
    run_dir = shop.home / "pipeline" / "shop" / (shop.home / "pipeline" / "shop" / "latest").read_text().strip()
    assert ids == {json.loads((run_dir / "run.json").read_text()).get("flow_run_id")}, done.stdout

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(ids.pop()).name == "shop"
