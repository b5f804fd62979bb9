"""The built-in models' commands and environment as the pinned CLIs take them (AGENT_CLIS.md): codex flags, each
CLI's endpoint, Claude Code as root, and the CLIs' own retries kept low so that the chain moves on."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.core.agents import build_steps, build_verify_steps
from dispatch.core.model_catalog import BUILTIN_MODELS, ModelSpec
from dispatch.core.specs import parse_spec


def _spec(tmp_path: Path, models: str, verify: str = "") -> object:
    path = tmp_path / "S01-x.md"
    path.write_text(f"---\nmodel: [{models}]\n{verify}---\n## Goal\nx\n", encoding="utf-8")
    spec, errors = parse_spec(path)
    assert spec is not None, errors
    return spec


def test_codex_takes_the_flags_its_pinned_version_has(tmp_path: Path) -> None:
    step = build_steps(_spec(tmp_path, "codex"), "do it")[0]
    assert "--full-auto" not in step["argv"]  # codex-cli 0.171: "unexpected argument", exit 2
    assert step["argv"] == ["codex", "exec", "--json", "--sandbox", "workspace-write", "--skip-git-repo-check", "-"]


def test_a_codex_endpoint_is_a_provider_in_its_argv_not_a_variable_it_ignores(tmp_path: Path) -> None:
    codex = BUILTIN_MODELS["codex"]
    catalog = {"codex": ModelSpec("codex", codex.argv, key_env="OPENAI_API_KEY", prompt_arg="-",
                                  base_url="http://127.0.0.1:9/v1")}
    step = build_steps(_spec(tmp_path, "codex"), "do it", catalog=catalog)[0]
    argv = step["argv"]
    tail = [*codex.argv[1:-1], "-"]
    assert argv[0] == "codex" and argv[-len(tail):] == tail  # `-c` options before `exec`
    settings = [argv[i + 1] for i, part in enumerate(argv) if part == "-c"]
    assert 'model_provider="dispatch"' in settings
    assert 'model_providers.dispatch.base_url="http://127.0.0.1:9/v1"' in settings
    assert 'model_providers.dispatch.wire_api="responses"' in settings
    assert 'model_providers.dispatch.env_key="OPENAI_API_KEY"' in settings
    assert {"model_providers.dispatch.request_max_retries=0", "model_providers.dispatch.stream_max_retries=0"} <= set(
        settings)
    assert "OPENAI_BASE_URL" not in step["env"] and "ANTHROPIC_BASE_URL" not in step["env"]


def test_an_agent_model_block_gives_its_base_url_to_each_cli_the_way_it_reads_one() -> None:
    from blocks.agent_model import AgentModel

    codex = AgentModel(name="gpt", command=["codex", "exec", "--json", "{prompt}"], base_url="http://127.0.0.1:9/v1",
                       key_env="OPENAI_API_KEY").to_model_spec()
    assert codex.base_url == "http://127.0.0.1:9/v1" and "ANTHROPIC_BASE_URL" not in codex.env
    claude = AgentModel(name="z", command=["claude", "-p", "{prompt}"], base_url="http://127.0.0.1:9").to_model_spec()
    assert claude.env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9" and claude.base_url is None
    for name, spec in BUILTIN_MODELS.items():  # a built-in's block still gives back the built-in
        assert AgentModel.builtin(name).to_model_spec() == spec


@pytest.mark.parametrize("name", ["glm", "minimax", "claude"])
def test_claude_code_runs_as_root_and_leaves_retries_to_the_runner(tmp_path: Path, name: str) -> None:
    other = "codex" if name == "claude" else "claude"
    first, last = build_steps(_spec(tmp_path, f"{name}, {other}"), "do it")
    assert first["env"]["IS_SANDBOX"] == "1"  # it refuses --dangerously-skip-permissions as root without it
    assert first["env"]["CLAUDE_CODE_MAX_RETRIES"] == "0"  # another model follows: move on at once
    alone = build_steps(_spec(tmp_path, name), "do it")[0]
    assert 0 < int(alone["env"]["CLAUDE_CODE_MAX_RETRIES"]) <= 3  # the last model: a few retries, not 10
    assert "IS_SANDBOX" not in last["env"] or other == "claude"


def test_a_models_own_env_wins_over_the_cli_defaults(tmp_path: Path) -> None:
    catalog = {"glm": ModelSpec("glm", BUILTIN_MODELS["glm"].argv, {"CLAUDE_CODE_MAX_RETRIES": "5"})}
    step = build_steps(_spec(tmp_path, "glm"), "x", catalog=catalog)[0]
    assert step["env"]["CLAUDE_CODE_MAX_RETRIES"] == "5" and step["env"]["IS_SANDBOX"] == "1"


def test_verifier_steps_get_the_same_cli_environment(tmp_path: Path) -> None:
    steps = build_verify_steps(_spec(tmp_path, "glm", "verify: [glm, claude]\n"))
    assert [s["env"]["CLAUDE_CODE_MAX_RETRIES"] for s in steps] == ["0", "2"]
    assert all(s["env"]["IS_SANDBOX"] == "1" and s["env"]["DISPATCH_STEP_KIND"] == "verify" for s in steps)
