"""The agent CLI drift check with the pinned real CLIs (agents/) and a "newer codex" that dropped a flag.

The newest versions are injected (no npm registry in tests): claude's newest is the pinned one, codex's is a
small script in a throwaway prefix that exits 2 with `unexpected argument`, as codex-cli did when it removed
`--full-auto`. The pinned CLIs run every scenario for real against the contract provider on 127.0.0.1.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dispatch.core.agent_versions import pinned_versions
from dispatch.core.settings import get_settings
from dispatch.ops.agent_drift import PINNED_BIN, check_drift
from tests.integration.test_guardian import Receiver

pytestmark = pytest.mark.integration

NEWER = "0.999.0"
_NEWER_CODEX = f"""#!/bin/sh
case "$1" in --version) echo "codex-cli {NEWER}"; exit 0;; esac
echo "error: unexpected argument '--skip-git-repo-check' found" >&2
echo "Usage: codex exec [OPTIONS] [PROMPT]" >&2
exit 2
"""


@pytest.fixture
def pinned() -> dict[str, str]:
    """The pinned versions, failing (never skipping) when the pinned CLIs are not installed."""
    missing = [cli for cli in ("claude", "codex") if not (PINNED_BIN / cli).exists()]
    if missing:
        pytest.fail(f"the pinned agent CLIs {', '.join(missing)} are not in {PINNED_BIN}: run "
                    "`npm ci --prefix agents` (bash .ci/run does this)")
    return pinned_versions()


def _latest(pinned: dict[str, str]):
    versions = {"@anthropic-ai/claude-code": pinned["claude"], "@openai/codex": NEWER}
    return lambda package: versions[package]


def _install_newer_codex(prefixes: list[Path]):
    def install(package: str, version: str, prefix: Path) -> Path:
        assert (package, version) == ("@openai/codex", NEWER), "only codex has a newer version here"
        prefixes.append(prefix)
        bin_dir = prefix / "node_modules" / ".bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "codex").write_text(_NEWER_CODEX)
        (bin_dir / "codex").chmod(0o755)
        return bin_dir

    return install


def test_a_newer_codex_that_dropped_a_flag_breaks_the_scenarios_the_pinned_clis_pass(pinned, isolated_home,
                                                                                      monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    settings = get_settings()
    prefixes: list[Path] = []
    report = check_drift(settings, latest=_latest(pinned), install=_install_newer_codex(prefixes))
    runs = {(r.cli, r.source): r for r in report.runs}
    for cli in ("claude", "codex"):
        first = runs[(cli, "pinned")]
        assert first.version == pinned[cli]
        assert first.passed and [r.scenario for r in first.results] == [f"{cli}-success", f"{cli}-429"], \
            report.markdown()
    assert "tool round trip done" in runs[("claude", "pinned")].result("claude-success").detail
    assert runs[("claude", "newest")].same_as_pinned and not runs[("claude", "newest")].results
    assert [(r.cli, r.version, x.scenario) for r, x in report.breaks()] == [
        ("codex", NEWER, "codex-success"), ("codex", NEWER, "codex-429")], report.markdown()
    assert "--skip-git-repo-check" in runs[("codex", "newest")].result("codex-success").detail
    assert prefixes and all(p.parent == settings.home / "agent-drift" and not p.exists() for p in prefixes), \
        "the newest CLI goes into a throwaway prefix under DISPATCH_HOME, removed afterwards"
    assert report.outcomes() == {"claude": {pinned["claude"]: True}, "codex": {pinned["codex"]: True, NEWER: False}}


@pytest.fixture
def webhook_block(prefect_api):
    """A notification block posting {subject, body} to a live receiver on 127.0.0.1 (as the guardian's tests)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    receiver = Receiver()
    name = f"drift-{uuid.uuid4().hex[:8]}"
    CustomWebhookNotificationBlock(name="drift", url=receiver.url,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(name)
    try:
        yield receiver, f"custom-webhook/{name}"
    finally:
        receiver.server.shutdown()


def test_the_drift_flow_alerts_through_the_guardians_block_and_records_the_versions_that_passed(
        pinned, webhook_block, monkeypatch):
    from prefect.variables import Variable

    from dispatch.ops import agent_drift
    from dispatch.prefect.versions import VARIABLE
    from flows.agent_cli_drift import agent_cli_drift

    receiver, block = webhook_block
    monkeypatch.setenv("DISPATCH_ALERT_BLOCK", block)
    get_settings.cache_clear()
    Variable.set(VARIABLE, {"codex": [NEWER, "0.100.0"]}, overwrite=True)  # a version that passed once
    monkeypatch.setattr(agent_drift, "npm_latest", _latest(pinned))
    monkeypatch.setattr(agent_drift, "npm_install", _install_newer_codex([]))
    try:
        result = agent_cli_drift(clis=["codex"])
        passed = Variable.get(VARIABLE)
    finally:
        Variable.unset(VARIABLE)
    assert result["breaks"] == [{"cli": "codex", "version": NEWER, "scenario": "codex-success"},
                                {"cli": "codex", "version": NEWER, "scenario": "codex-429"}], json.dumps(result)
    subjects = sorted(r["subject"] for r in receiver.received)
    assert subjects == [f"[dispatch agent-cli-drift] codex {NEWER} breaks codex-429",
                        f"[dispatch agent-cli-drift] codex {NEWER} breaks codex-success"], receiver.received
    assert "unexpected argument" in receiver.received[0]["body"]
    assert passed == {"codex": ["0.100.0", pinned["codex"]]}, "the pinned version passed; the newer one failed"
