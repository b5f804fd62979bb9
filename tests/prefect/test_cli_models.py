"""`dispatch models` and `dispatch models reset`, as users run them (real subprocesses) on the real Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.fixtures.projects import DISPATCH

pytestmark = pytest.mark.prefect


def dispatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCH, *args], capture_output=True, text=True, timeout=240, env=os.environ.copy())


@pytest.fixture
def cooldowns(prefect_api, monkeypatch):
    """Cool-downs set through the code the flow uses, on the session's server; removed afterwards."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    from dispatch.cooldowns import Cooldowns

    keeper = Cooldowns(refresh=0)
    yield keeper
    for model in ("glm", "minimax", "claude", "codex", "opencode"):
        keeper.clear(model)


def test_models_lists_every_model_with_its_state(cooldowns, isolated_home):
    now = time.time()
    cooldowns.record("glm", "quota", now + 3600, "GLM 1308: 5-hour cap", "alice@laptop")
    cooldowns.record("minimax", "billing", None, "MiniMax 1008: insufficient balance", "bob@desk")
    cooldowns.record("codex", "quota", now - 7200, "Codex usage limit", "carol@box")  # a reset already past
    done = dispatch("models", "--json")
    assert done.returncode == 0, done.stderr
    models = {row["model"]: row for row in json.loads(done.stdout)["models"]}
    assert {"glm", "minimax", "claude", "codex", "opencode"} <= set(models)
    assert models["claude"]["state"] == "available" and models["claude"]["until"] is None
    glm = models["glm"]
    assert glm["state"] == "cooling" and glm["until"] == pytest.approx(now + 3600, abs=5)
    assert (glm["reason"], glm["by"]) == ("GLM 1308: 5-hour cap", "alice@laptop")
    assert models["minimax"]["state"] == "blocked" and models["minimax"]["kind"] == "billing"
    assert models["codex"]["state"] == "cooling", "a reset in the past still cools down for a while"
    table = dispatch("models")
    assert table.returncode == 0, table.stderr
    assert "dispatch models reset minimax" in table.stdout and "alice@laptop" in table.stdout


def test_models_reset_clears_a_billing_block(cooldowns, isolated_home):
    cooldowns.record("minimax", "billing", None, "MiniMax 1008: insufficient balance", "bob@desk")
    done = dispatch("models", "reset", "minimax")
    assert done.returncode == 0, done.stderr
    assert "minimax" in done.stdout
    models = {row["model"]: row for row in json.loads(dispatch("models", "--json").stdout)["models"]}
    assert models["minimax"]["state"] == "available"
    again = dispatch("models", "reset", "minimax")
    assert again.returncode == 0 and "was not" in again.stdout


def test_models_reset_of_an_unknown_model_exits_2_naming_the_known_ones(cooldowns, isolated_home):
    done = dispatch("models", "reset", "gpt-9000")
    assert done.returncode == 2
    assert "gpt-9000" in done.stderr and "glm" in done.stderr and "minimax" in done.stderr
