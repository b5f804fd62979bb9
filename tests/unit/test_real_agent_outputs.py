"""The classifier against what the pinned real CLIs printed in each fake-provider scenario.

The captures (tests/fixtures/agent_output/real/<cli>/<scenario>.*) come from
`python -m tests.fixtures.capture_real_outputs`: each `.json` holds the exit code and the kind the classifier
must give the run's `.output` (stdout and stderr merged, as the node runner's task.log has them). Run with `-s`
for the line `real outputs: N captures, false positives X, false negatives Y`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dispatch.runner.ratelimits import classify
from tests.fixtures.capture_real_outputs import CAPTURES, OUT
from tests.fixtures.fake_provider import RESET_SECONDS

ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}


def captures() -> list[dict]:
    """Every capture's record, with its merged output as `output`."""
    found = []
    for meta in sorted(OUT.glob("*/*.json")):
        record = json.loads(meta.read_text(encoding="utf-8"))
        found.append({**record, "output": meta.with_suffix(".output").read_text(encoding="utf-8")})
    return found


def test_every_scenario_of_each_pinned_cli_was_captured_with_that_version() -> None:
    pins = json.loads((ROOT / "agents" / "package.json").read_text(encoding="utf-8"))["dependencies"]
    records = {(r["cli"], r["scenario"]): r for r in captures()}
    wanted = {(cli, scenario) for cli, scenarios in CAPTURES.items() for scenario in scenarios}
    assert sorted(wanted - set(records)) == [], "re-capture: python -m tests.fixtures.capture_real_outputs"
    stale = [(cli, scenario, r["version"]) for (cli, scenario), r in records.items()
             if pins[_PACKAGES[cli]] not in r["version"]]
    assert stale == [], f"captured with another version than agents/package.json pins ({pins}): re-capture"


def test_the_success_captures_did_the_work() -> None:
    records = {(r["cli"], r["scenario"]): r for r in captures()}
    for cli in CAPTURES:
        success = records[(cli, "success")]
        assert (success["exit_code"], success["wrote_file"], success["requests"]) == (0, True, 2), success


def _verdict(record: dict):
    """The classifier's verdict on a capture, as of the time it was captured."""
    return classify(record["output"], record["exit_code"], now=record["captured_at"])


def test_real_outputs_classify_as_their_kind() -> None:
    records = captures()
    wrong = [(r["cli"], r["scenario"], r["kind"], _verdict(r)) for r in records if _verdict(r).kind != r["kind"]]
    positives = [w for w in wrong if w[2] in ("ok", "failure")]  # a limit where there was none
    print(f"\nreal outputs: {len(records)} captures, false positives {len(positives)}, "
          f"false negatives {len(wrong) - len(positives)}")
    assert [(cli, scenario, want, f"{got.kind}: {got.reason}") for cli, scenario, want, got in wrong] == []


def test_real_quota_outputs_give_the_reset_time_the_provider_answered() -> None:
    """The fake provider answers each quota scenario with a reset RESET_SECONDS after the request (GLM's in
    China time, MiniMax's in UTC, Codex's as a time of day the CLI prints in local time, to the minute)."""
    resets = {(r["cli"], r["scenario"]): _verdict(r).reset_at for r in captures() if r["kind"] == "quota"}
    expected = {key: round(r["captured_at"] + RESET_SECONDS) for r in captures()
                for key in [(r["cli"], r["scenario"])] if key in resets}
    assert resets and all(value is not None for value in resets.values()), resets
    off = {key: round(resets[key] - expected[key]) for key in resets if abs(resets[key] - expected[key]) > 120}
    assert off == {}, "seconds off the reset the provider gave"
