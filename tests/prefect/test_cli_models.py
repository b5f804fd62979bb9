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
    from dispatch.prefect.cooldowns import server_cooldowns

    keeper = server_cooldowns(refresh=0)
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


@pytest.fixture
def saved_models(prefect_api, monkeypatch):
    """Names of AgentModel blocks a test saves; deleted afterwards (other tests read the built-ins)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    names: list[str] = []
    yield names
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from blocks.agent_model import AgentModel
    from blocks.cluster_node import block_name

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                document = client.read_block_document_by_name(block_name(name), AgentModel.get_block_type_slug())
                client.delete_block_document(document.id)
            except ObjectNotFound:
                pass


def _models_json() -> dict[str, dict]:
    done = dispatch("models", "--json")
    assert done.returncode == 0, done.stderr
    return {row["model"]: row for row in json.loads(done.stdout)["models"]}


def test_models_set_saves_a_block_with_its_key_from_a_variable_and_never_prints_the_key(saved_models,
                                                                                         isolated_home):
    from blocks.agent_model import AgentModel
    from blocks.cluster_node import block_name

    name = "glm-eu"
    saved_models.append(name)
    key = "fake-key-4c1b9e0d77"
    done = subprocess.run([DISPATCH, "models", "set", name, "--command", "claude -p --verbose {prompt}",
                           "--base-url", "http://127.0.0.1:9/eu", "--env", "APP_REGION=eu", "--key-env", "MY_GLM",
                           "--key-var", "ANTHROPIC_AUTH_TOKEN"],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "MY_GLM": key})
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout + done.stderr
    assert "ANTHROPIC_AUTH_TOKEN" in done.stdout
    row = _models_json()[name]
    assert (row["cli"], row["endpoint"], row["key_saved"], row["source"]) == (
        "claude", "http://127.0.0.1:9/eu", True, "block")
    model = AgentModel.load(block_name(name))
    assert model.secret_env() == {"ANTHROPIC_AUTH_TOKEN": key}
    assert model.env == {"APP_REGION": "eu"} and model.command == ["claude", "-p", "--verbose", "{prompt}"]

    # a later change keeps what it does not name, the key included; the key may come on stdin
    again = dispatch("models", "set", name, "--base-url", "http://127.0.0.1:9/eu2")
    assert again.returncode == 0, again.stderr
    assert AgentModel.load(block_name(name)).secret_env() == {"ANTHROPIC_AUTH_TOKEN": key}
    piped = subprocess.run([DISPATCH, "models", "set", name, "--key-stdin"], input="fake-key-second\n",
                           capture_output=True, text=True, timeout=240, env=os.environ.copy())
    assert piped.returncode == 0, piped.stderr
    model = AgentModel.load(block_name(name))
    assert model.secret_env() == {"ANTHROPIC_AUTH_TOKEN": "fake-key-second"}
    assert model.base_url == "http://127.0.0.1:9/eu2"


def test_models_set_of_a_built_in_starts_from_its_command_and_key_variable(saved_models, isolated_home):
    from blocks.agent_model import AgentModel
    from blocks.cluster_node import block_name
    from dispatch.core.model_catalog import BUILTIN_MODELS

    saved_models.append("minimax")
    done = subprocess.run([DISPATCH, "models", "set", "minimax", "--key-env", "MM"], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "MM": "fake-mm-key"})
    assert done.returncode == 0, done.stderr
    model = AgentModel.load(block_name("minimax"))
    assert tuple(model.command) == BUILTIN_MODELS["minimax"].argv
    assert model.secret_env() == {BUILTIN_MODELS["minimax"].key_env: "fake-mm-key"}
    assert _models_json()["minimax"]["endpoint"] == BUILTIN_MODELS["minimax"].env["ANTHROPIC_BASE_URL"]


@pytest.mark.parametrize(("args", "env", "said"), [
    (["brand-new"], {}, "--command"),
    (["claude", "--key-env", "NOT_SET_ANYWHERE"], {}, "NOT_SET_ANYWHERE"),
    (["claude", "--key-env", "K", "--key-stdin"], {"K": "x"}, "not both"),
    (["claude", "--env", "no-equals"], {}, "--env"),
    (["../x", "--command", "x {prompt}"], {}, "model name"),
    (["custom", "--command", "tool run"], {}, "{prompt}"),
])
def test_models_set_refuses_bad_input_with_exit_2_and_saves_nothing(saved_models, isolated_home, args, env, said):
    saved_models.append(args[0])
    done = subprocess.run([DISPATCH, "models", "set", *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert said in done.stderr
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from blocks.agent_model import AgentModel
    from blocks.cluster_node import block_name

    with get_client(sync_client=True) as client, pytest.raises((ObjectNotFound, ValueError)):
        client.read_block_document_by_name(block_name(args[0]), AgentModel.get_block_type_slug())
