"""L3 Build on the real example app: a venv in the workspace, shell steps, a real server process on
loopback in its own process group, stopped as a group; failures carry the log tail."""

from __future__ import annotations

import sys

import httpx
import pytest

from dispatch.pipeline import app as apps
from dispatch.pipeline.results import Status
from tests.fixtures.shop import group_alive

pytestmark = pytest.mark.prefect


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    yield str(path)
    apps.stop_all(str(path))


def test_build_serves_the_example_until_stopped_as_a_group(prefect_api, shop, run_dir):
    from flows.layers.build import build

    result = build("shop", str(shop.code), run_dir, shop.load())

    assert result.status is Status.PASS, result
    assert (shop.code / ".venv" / "bin" / "python").exists()
    assert [c.name for c in result.checks] == ["install", "compile", "start backend"]
    response = httpx.get(result.evidence["app_url"] + "/api/products", timeout=5)
    assert response.status_code == 200 and len(response.json()) == 3
    [app] = apps.running(run_dir)
    assert apps.stop_all(run_dir) == 1
    assert not group_alive(app.pgid)


def test_unchanged_code_skips_the_install_and_an_edit_redoes_it(prefect_api, shop, run_dir):
    from flows.layers.build import build

    assert build("shop", str(shop.code), run_dir, shop.load()).passed
    again = build("shop", str(shop.code), run_dir, shop.load())
    assert again.passed and [c.verdict for c in again.checks] == ["skip", "pass"]
    (shop.code / "app" / "catalog.py").write_text((shop.code / "app" / "catalog.py").read_text() + "\n# edited\n")
    edited = build("shop", str(shop.code), run_dir, shop.load())
    assert edited.passed and [c.name for c in edited.checks] == ["install", "compile", "start backend"]


def test_app_that_never_becomes_healthy_fails_within_its_timeout_with_its_log_tail(prefect_api, shop, run_dir):
    from flows.layers.build import build

    start = (f"{sys.executable} -c \"import os, time; print('booting on {{port}} in group', os.getpgrp(), "
             f"flush=True); time.sleep(600)\"")
    shop.save(backend={"start": start, "timeout": "3s", "install": None})
    result = build("shop", str(shop.code), run_dir, shop.load())

    assert result.status is Status.FAIL
    assert "did not answer 200 within 3s" in result.reason
    [booted] = [line for line in result.evidence["log_tail"] if line.startswith("booting on ")]
    assert apps.running(run_dir) == []
    assert not group_alive(int(booted.split()[-1]))


def test_a_failing_install_fails_with_its_output_and_steps_get_no_keys(prefect_api, shop, run_dir, monkeypatch):
    from flows.layers.build import build

    monkeypatch.setenv("ANTHROPIC_API_KEY", "fake-ant-test-0123456789")
    shop.save(backend={"install": 'echo "key=[$ANTHROPIC_API_KEY]"; echo "no such package" >&2; exit 4'})
    result = build("shop", str(shop.code), run_dir, shop.load())

    assert result.status is Status.FAIL
    assert result.reason.startswith("install: ") and "exited 4" in result.reason
    assert result.evidence["log_tail"] == ["key=[]", "no such package"]
    assert apps.running(run_dir) == []


def test_an_app_that_exits_fails_with_its_exit_code(prefect_api, shop, run_dir):
    from flows.layers.build import build

    shop.save(backend={"start": "sh -c 'echo cannot bind {port} >&2; exit 3'", "install": None})
    result = build("shop", str(shop.code), run_dir, shop.load())

    assert result.status is Status.FAIL and "exited with code 3" in result.reason
    assert any("cannot bind" in line for line in result.evidence["log_tail"])


def test_nothing_to_start_is_not_run(prefect_api, shop, run_dir):
    from flows.layers.build import build

    shop.save(backend={"start": None})
    result = build("shop", str(shop.code), run_dir, shop.load())
    assert result.status is Status.NOT_RUN and "backend.start" in result.reason
