"""L1 Analyze on Prefect's real API: the scan, the specs it writes (which validate and pass the gate), the gate
failing a bad spec, the OpenAPI inventory from a served schema, and the optional plan by a (fake) agent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.results import Status
from tests.fixtures.projects import write_tree

pytestmark = pytest.mark.prefect

CODE = {
    "app/main.py": "from app.store import load\n\ndef items():\n    return load()  # TODO: paginate\n",
    "app/store.py": "def load():\n    raise NotImplementedError\n",
    "web/index.html": "<p>Lorem ipsum</p>\n",
}


def _layout(isolated_home: Path, code_files: dict[str, str] = CODE) -> tuple[Path, Path, Path]:
    (isolated_home / "specs" / "shop").mkdir(parents=True, exist_ok=True)
    code, run_dir = isolated_home / "code", isolated_home / "home" / "pipeline" / "shop" / "run1"
    write_tree(code, code_files)
    return isolated_home / "specs" / "shop" / "generated", code, run_dir


def test_the_scan_writes_specs_that_validate_and_pass_the_gate(prefect_api, isolated_home: Path, monkeypatch):
    from dispatch.core.dag import load_project
    from flows.layers.analyze import analyze

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no analyze model: the scan alone is the layer's work
    generated, code, run_dir = _layout(isolated_home)
    result = analyze("shop", str(code), str(run_dir), PipelineConfig())
    assert result.layer == "L1" and result.status is Status.PASS, result.reason
    assert "no plan: no model can run: claude: no CLI 'claude' on PATH" in result.reason
    assert result.evidence["specs"] == [str(generated / "S01-main-store.md"), str(generated / "S02-index.md")]
    project = load_project("shop.pipeline", generated)
    assert project.specs["S01-main-store"].modifies == ["app/main.py", "app/store.py"]
    assert {c.name for c in result.checks} >= {"todo app/main.py:4", "not-implemented app/store.py:2",
                                               "placeholder web/index.html:1", "spec S01-main-store"}
    findings = json.loads((run_dir / "L1" / "findings.json").read_text())
    assert len(findings) == 3 and result.evidence["findings_by_kind"] == {
        "not-implemented": 1, "placeholder": 1, "todo": 1}
    assert result.evidence["routes"] == [] and result.evidence["pages"] == ["/"]
    assert result.evidence["html_files"] == ["web/index.html"]


def test_the_gate_fails_a_spec_under_the_minimum_naming_the_rules(prefect_api, isolated_home: Path, monkeypatch):
    from flows.layers.analyze import analyze

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    generated, code, run_dir = _layout(isolated_home)
    assert analyze("shop", str(code), str(run_dir), PipelineConfig()).status is Status.PASS
    (generated / "S02-index.md").write_text("---\ntask_id: S02-index\n---\nFix stuff.\n")  # a person's edit
    result = analyze("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.FAIL
    assert "the quality gate stops L2: S02-index.md scored" in result.reason
    assert "modifies (" in result.reason and "acceptance (" in result.reason
    assert (generated / "S02-index.md").read_text().endswith("Fix stuff.\n"), "a person's edit is kept"
    assert any("kept as edited by hand" in note for note in result.evidence["notes"])


def test_an_average_under_the_warning_line_warns_but_passes(prefect_api, isolated_home: Path, monkeypatch):
    from flows.layers.analyze import analyze

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    generated, code, run_dir = _layout(isolated_home)
    analyze("shop", str(code), str(run_dir), PipelineConfig())
    (generated / "S02-index.md").write_text(  # a person's edit: no modifies, no acceptance criteria (65 points)
        "---\ntask_id: S02-index\n---\n## Goal\nReplace the lorem ipsum of web/index.html with the shop's real "
        "welcome text, taken from the product brief in docs/brief.md, in two short paragraphs that a visitor reads "
        "first.\n")
    config = PipelineConfig.model_validate({"thresholds": {"spec_warn_average": 90}})
    result = analyze("shop", str(code), str(run_dir), config)
    assert result.status is Status.PASS, result.reason
    assert "WARNING: average spec score 82 < 90" in result.reason


def test_no_gap_is_a_pass_with_no_spec(prefect_api, isolated_home: Path, monkeypatch):
    from flows.layers.analyze import analyze

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    generated, code, run_dir = _layout(isolated_home, {"app/main.py": "def items():\n    return [1]\n"})
    result = analyze("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.PASS and result.evidence["specs"] == []
    assert "no plan: no gap to plan for" in result.reason


def test_routes_come_from_the_apps_openapi_schema(prefect_api, isolated_home: Path, monkeypatch):
    from flows.layers.analyze import analyze

    schema = {"openapi": "3.1.0", "paths": {"/api/items": {"get": {}}, "/api/cart": {"post": {}, "get": {}}}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps(schema).encode())

        def log_message(self, *args):
            pass

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _, code, run_dir = _layout(isolated_home)
        url = f"http://127.0.0.1:{server.server_port}"
        result = analyze("shop", str(code), str(run_dir), PipelineConfig(), app_url=url)
    finally:
        server.shutdown()
    assert result.evidence["routes"] == ["GET /api/cart", "POST /api/cart", "GET /api/items"]
    assert result.evidence["route_source"] == f"the OpenAPI schema at {url}/openapi.json"


def test_an_analyze_model_makes_a_plan_that_becomes_context_for_l2(fake_agents, isolated_home: Path):
    from dispatch.core.settings import get_settings
    from dispatch.pipeline.generated import load_specs
    from flows.layers.analyze import analyze

    generated, code, run_dir = _layout(isolated_home)
    result = analyze("shop", str(code), str(run_dir), PipelineConfig())
    assert result.status is Status.PASS and "plan by claude" in result.reason
    assert (run_dir / "L1" / "plan.md").read_text() == "Done.\n", "the fake agent's final answer"
    context = [p.name for p in load_specs(get_settings(), "shop", generated=True).context]
    assert "PLAN.md" in context
