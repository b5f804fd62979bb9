"""The `pipeline` flow on the real example app: layer order, caching by content, reports and artifacts, L6
after L4 PASS, the app stopped when the pipeline leaves L4. The L4-L5 loop with the real fix layer (fake agent
as every model) is tests/pipeline/test_pipeline_agents.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from dispatch.core.net import free_port
from dispatch.pipeline import app as apps
from tests.fixtures.shop import group_alive

pytestmark = pytest.mark.prefect

def _run(project: str = "shop", **options):
    from dispatch.core.settings import get_settings
    from dispatch.pipeline.runs import latest_run
    from flows.pipeline import pipeline

    get_settings.cache_clear()
    state = pipeline(project, return_state=True, **options)
    record = latest_run(get_settings().home / "pipeline" / project)
    return state, record


def _rows(record):
    return [(row.layer, row.cycle, row.status.value, row.cached) for row in _top(record)]


def _top(record):
    """The rows of L1..L6 (the run's summary also has a row per L4 sub-layer)."""
    return [row for row in record.layers if len(row.layer) == 2]


@pytest.fixture
def deployed(shop):
    """A local deploy section for the shop (the example's restart script on a free port); the live app
    it starts is stopped after the test through its pid file."""
    port = free_port()
    deploy_dir = shop.home / "deploy" / "shop"
    shop.save(deploy={"target": "local", "dir": "${DISPATCH_HOME}/deploy/shop", "restart": "sh deploy/restart.sh",
                      "health": f"http://127.0.0.1:{port}/healthz", "keep": 2, "timeout": "20s"},
              backend={"env": {"SHOP_PORT": str(port)}})
    yield deploy_dir
    pid_file = deploy_dir / "shop.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_l3_l4_on_the_example_fails_with_its_bugs_reports_and_artifacts_and_stops_the_app(shop, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    state, record = _run(from_layer="L3", to_layer="L4")

    assert state.is_failed()
    assert _rows(record) == [("L3", 0, "PASS", False), ("L4", 0, "FAIL", False)]
    assert record.exit_code == 1 and record.state == "failed"
    assert {b["title"].split(":")[0] for b in record.open_bugs} >= {"empty body", "script payload in query"}
    run_dir = Path(record.layers[0].report).parent
    for name in ("L3", "L4", "L4a", "L4b", "L4c", "L4d"):
        assert json.loads((run_dir / f"{name}.json").read_text())["layer"] == name
    built = json.loads((run_dir / "L3.json").read_text())
    assert not group_alive(built["evidence"]["backend_pgid"]) and not (run_dir / "L3" / "app.pid").exists()
    assert apps.running(str(run_dir)) == []
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["shop-l3", "shop-l4", "shop-l4a", "shop-l4b", "shop-bugs",
                                        "shop-screenshots"])))}
    assert keys == {"shop-l3", "shop-l4", "shop-l4a", "shop-l4b", "shop-bugs", "shop-screenshots"}


def test_cached_second_run_redoes_nothing_and_an_edited_file_redoes_l3_onward(shop, deployed, prefect_api):
    shop.repair()
    shop.save(layers={"L4c": {"enabled": False}})

    state, first = _run(from_layer="L3")
    assert state.is_completed(), first.message
    assert [(r.layer, r.status.value, r.cached) for r in _top(first) if r.counted] == [
        ("L3", "PASS", False), ("L4", "PASS", False), ("L6", "PASS", False)]
    releases = sorted(p.name for p in (deployed / "releases").iterdir())
    assert len(releases) == 1 and (deployed / "current").resolve().name == releases[0]

    state, second = _run(from_layer="L3")
    assert state.is_completed(), second.message
    assert [(r.layer, r.cached) for r in _top(second) if r.counted] == [("L3", True), ("L4", True), ("L6", True)]
    second_dir = shop.home / "pipeline" / "shop" / second.run_id
    assert not (second_dir / "L3").exists() and not (second_dir / "L4b").exists()  # no app, no browser

    catalog = shop.code / "app" / "catalog.py"
    catalog.write_text(catalog.read_text() + "\n# an edit\n")
    first_app = int((deployed / "shop.pid").read_text())
    state, third = _run(from_layer="L3")
    assert state.is_completed(), third.message
    assert [(r.layer, r.cached) for r in _top(third) if r.counted] == [("L3", False), ("L4", False), ("L6", False)]
    assert len(list((deployed / "releases").iterdir())) == 2
    assert not Path(f"/proc/{first_app}").exists(), "the redeploy stopped the previous release's app"

    state, forced = _run(from_layer="L3", to_layer="L4", force=True)
    assert [(r.layer, r.cached) for r in _top(forced)] == [("L3", False), ("L4", False)]


def test_app_never_healthy_fails_l3_with_its_log_tail_after_its_attempts(shop, prefect_api):
    shop.save(backend={"start": "sh -c 'echo still booting; sleep 600'", "timeout": "2s", "install": None},
              layers={"L3": {"attempts": 2}})
    state, record = _run(from_layer="L3", to_layer="L4")

    assert state.is_failed()
    assert _rows(record) == [("L3", 0, "FAIL", False), ("L4", 0, "NOT RUN", False)]
    assert record.layers[0].attempts == 2 and "within 2s" in record.layers[0].reason
    report = json.loads(Path(record.layers[0].report).read_text())
    assert "still booting" in report["evidence"]["log_tail"]
    assert record.layers[1].reason == "not run: L3 FAIL"


def test_deploy_needs_an_l4_pass_of_the_same_code(shop, deployed, prefect_api):
    state, record = _run(only="L6")
    assert state.is_failed()
    assert _rows(record) == [("L6", 0, "NOT RUN", False)]
    assert "no L4 PASS for this code" in record.layers[0].reason
    assert not (deployed / "releases").exists()


def test_fix_alone_is_not_run_since_it_takes_l4s_bugs(shop, prefect_api):
    state, record = _run(only="L5")
    assert state.is_failed()
    assert _rows(record) == [("L5", 0, "NOT RUN", False)] and "run it with L4" in record.layers[0].reason
