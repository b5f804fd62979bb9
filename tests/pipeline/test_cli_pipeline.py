"""`dispatch pipeline run|status` as a user runs them: real subprocesses, the real example, the test server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect

DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def _dispatch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def test_invalid_config_exits_2_naming_file_and_field_and_runs_nothing(shop):
    (shop.specs / "pipeline.yaml").write_text("backend:\n  start: 42\n  timeout: soon\nmax_cycles: 0\n")
    done = _dispatch("pipeline", "run", "shop")
    assert done.returncode == 2, done.stdout + done.stderr
    for field in ("backend.timeout", "max_cycles"):
        assert f"{shop.specs / 'pipeline.yaml'}: {field}:" in done.stderr
    assert not (shop.home / "pipeline").exists()


@pytest.mark.parametrize("args, message", [
    (["--from", "L7"], "--from 'L7': not a layer"),
    (["--only", "L4b", "--to", "L4"], "do not combine"),
    (["--from", "L4", "--to", "L2"], "comes after"),
])
def test_a_bad_layer_selection_exits_2(shop, args, message):
    done = _dispatch("pipeline", "run", "shop", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_run_then_status_on_the_example(shop, prefect_api):
    done = _dispatch("pipeline", "run", "shop", "--from", "L3", "--to", "L4", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    record = json.loads(done.stdout)
    assert [(r["layer"], r["status"]) for r in record["layers"]] == [
        ("L3", "PASS"), ("L4", "FAIL"), ("L4a", "FAIL"), ("L4b", "FAIL"), ("L4c", "NOT RUN"), ("L4d", "PASS")]
    assert "FAIL L4 test" in done.stderr  # live progress, on stderr with --json
    assert "... L3 build" in done.stderr and "... L4 test" in done.stderr  # each layer as it starts

    status = _dispatch("pipeline", "status", "shop", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["run_id"] == record["run_id"]
    table = _dispatch("pipeline", "status", "shop")
    assert "L4a api_qa" in table.stdout and "FAIL" in table.stdout and record["run_id"] in table.stdout


def test_status_without_a_run_says_how_to_start_one(shop):
    done = _dispatch("pipeline", "status", "shop")
    assert done.returncode == 1 and "dispatch pipeline run shop" in done.stderr


def test_sigterm_during_l4_stops_the_app_group(shop, prefect_api):
    from tests.fixtures.shop import group_alive

    shop.save(regression={"command": "sleep 120"}, layers={"L4a": {"enabled": False}, "L4b": {"enabled": False},
                                                            "L4c": {"enabled": False}})
    run = subprocess.Popen([DISPATCH, "pipeline", "run", "shop", "--from", "L3", "--to", "L4"], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        seen = []
        for line in run.stdout:
            seen.append(line)
            if "... L4 test" in line:
                break
        run_dir = shop.home / "pipeline" / "shop" / (shop.home / "pipeline" / "shop" / "latest").read_text().strip()
        pgid = json.loads((run_dir / "L3.json").read_text())["evidence"]["backend_pgid"]
        assert group_alive(pgid), "".join(seen)
        run.terminate()
        rest = run.communicate(timeout=60)[0]
    finally:
        run.kill()
    assert run.returncode != 0
    assert not group_alive(pgid), "".join(seen) + rest
    assert json.loads((run_dir / "run.json").read_text())["state"] in ("crashed", "failed")
