"""Keys never leak: a run with keys in the caller's environment and in a block, printed by careless specs,
leaves no key in any file under DISPATCH_HOME, in the Prefect database, or in `dispatch report`."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tests.fixtures.projects import write_spec

FAKE_AGENT = Path(__file__).parent.parent / "fixtures" / "fake_agent.py"
CALLER_KEY = "fake-ant-caller-5b1e0c93d7aa"  # the dispatcher's own ANTHROPIC_API_KEY: for `claude` only
GLM_ENV_KEY = "zai-env-key-91c2f0e7b3d4"  # ZAI_API_KEY in the caller's environment: glm's key
BLOCK_KEY = "mm-block-key-4e8a2d6c1f0b"  # minimax's key, in its AgentModel block
GITHUB_TOKEN = "ghp_c0ffee1234deadbeef5678"  # a credential of the caller's environment no spec should ever see


def _split(value: str) -> str:
    """A shell expression printing `value` without the spec's own text holding it (specs are task parameters)."""
    half = len(value) // 2
    return f"$(printf '%s%s' '{value[:half]}' '{value[half:]}')"


def test_keys_reach_only_their_model_and_no_file_database_or_report_holds_them(
        run_project, isolated_home: Path, monkeypatch, prefect_database: list[Path]) -> None:
    from prefect.logging.handlers import APILogHandler

    from blocks.agent_model import AgentModel
    from dispatch.cli.main import app

    fakebin = isolated_home / "fakebin"
    fakebin.mkdir()
    (fakebin / "claude").symlink_to(FAKE_AGENT)
    monkeypatch.setenv("PATH", f"{fakebin}:/usr/bin:/bin")
    monkeypatch.setenv("ANTHROPIC_API_KEY", CALLER_KEY)
    monkeypatch.setenv("ZAI_API_KEY", GLM_ENV_KEY)
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
    block = AgentModel.builtin("minimax")
    block.api_key = BLOCK_KEY
    block.save("minimax", overwrite=True)
    specs = isolated_home / "specs" / "keys"
    long_line = f"python3 -c \"print('x' * 65530 + '{CALLER_KEY[:10]}' + '{CALLER_KEY[10:]}' + 'y' * 99)\""
    script = (f'env -0 > "$DISPATCH_RUN_DIR/shell-env.txt"\n'
              f'echo "caller key: {_split(CALLER_KEY)} token: {_split(GITHUB_TOKEN)}"\n{long_line}\n'
              f"echo \"failing on purpose {_split(GLM_ENV_KEY)}\" >&2\nexit 3\n")
    write_spec(specs, "S01-shell.md", {"task_id": "S01-shell", "kind": "shell", "retries": 0,
                                       "env": {"APP_MODE": "test"}},
               f"## Goal\nLeak what it can.\n\n```bash\n{script}```\n")
    write_spec(specs, "S02-glm.md", {"task_id": "S02-glm", "model": ["glm"]},
               "## Goal\nFAKE: print-env ANTHROPIC_AUTH_TOKEN\nFAKE: print-env ANTHROPIC_API_KEY\n")
    write_spec(specs, "S03-minimax.md", {"task_id": "S03-minimax", "model": ["minimax"]},
               "## Goal\nFAKE: print-env ANTHROPIC_AUTH_TOKEN\nFAKE: print-env ZAI_API_KEY\n")
    try:
        state, summary = run_project("keys")
        APILogHandler().flush()
        report = CliRunner().invoke(app, ["report", "keys"])
    finally:
        AgentModel.delete("minimax")

    assert summary.specs["S01-shell"].state == "failed"
    assert summary.specs["S02-glm"].state == "succeeded" and summary.specs["S03-minimax"].state == "succeeded"
    shell_env = (Path(summary.specs["S01-shell"].log_path).parent / "shell-env.txt").read_text()
    assert not [key for key in (CALLER_KEY, GLM_ENV_KEY, BLOCK_KEY, GITHUB_TOKEN) if key in shell_env]
    assert "APP_MODE=test\0" in shell_env, "the spec's own env reaches its step"
    glm_log = Path(summary.specs["S02-glm"].log_path).read_text()
    assert "ANTHROPIC_AUTH_TOKEN=***" in glm_log, "glm gets its key from ZAI_API_KEY, masked in its log"
    assert "ANTHROPIC_API_KEY=(unset)" in glm_log, "the caller's Anthropic key never reaches glm"
    minimax_log = Path(summary.specs["S03-minimax"].log_path).read_text()
    assert "ANTHROPIC_AUTH_TOKEN=***" in minimax_log and "ZAI_API_KEY=(unset)" in minimax_log
    shell_log = Path(summary.specs["S01-shell"].log_path).read_text()
    assert "caller key: *** token: ***" in shell_log and "x" * 100 in shell_log

    keys = {CALLER_KEY, GLM_ENV_KEY, BLOCK_KEY, GITHUB_TOKEN}
    assert report.exit_code == 0 and "S01-shell" in report.output
    assert not [key for key in keys if key in report.output]
    leaks = []
    for path in [*(p for p in isolated_home.rglob("*") if p.is_file()), *prefect_database]:
        if path.name == "shell-env.txt":  # the spec's own dump, checked above
            continue
        data = path.read_bytes()
        leaks += [f"{path}: {key[:6]}..." for key in keys if key.encode() in data]
    assert not leaks, f"keys leaked: {leaks}"
