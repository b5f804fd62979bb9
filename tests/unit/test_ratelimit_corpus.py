"""The classifier against a corpus: real provider messages that must classify as their kind, and near-miss
outputs (code, diffs, test names, logs, our own docs and tests printed whole) that must never be a limit.

Every output is judged in the forms the agents print it: plain text, Claude Code's stream-json (the
built-in glm, minimax and claude commands) and Codex's `exec --json` events. Run with `-s` for the line
`corpus: N limit / M near-miss, false positives X, false negatives Y`.

`near_miss_exit0/` holds outputs whose last lines are a provider's message verbatim at a line start (a
summary listing the messages, `cat` of a fixture): in plain text, a *failed* run ending so cannot be told
from the CLI printing it, so they are judged in every form but that one. This is why the built-in models
run with structured output, where only the CLI's own error result counts.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from dispatch.runner.ratelimits import classify

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fixtures" / "ratelimit_corpus"
NOW = datetime(2026, 5, 15, 12, 0, tzinfo=UTC).timestamp()
LIMIT_KINDS = ("quota", "transient", "billing", "auth")
# Printed whole as an agent's output: our own docs, tests and classifier, which quote every message.
OWN_FILES = [
    CORPUS / "provider_messages.md",
    CORPUS / "limits.jsonl",
    ROOT / "docs" / "design.md",
    ROOT / "README.md",
    ROOT / "tests" / "unit" / "test_ratelimits.py",
    ROOT / "tests" / "unit" / "test_ratelimit_corpus.py",
    ROOT / "dispatch" / "runner" / "ratelimits.py",
    ROOT / "tests" / "fixtures" / "fake_agent.py",
]
_MENTIONS = re.compile(r"(?i)limit|quota|429|529|401|billing|balance|欠费|余额|上限|速率|api key|overloaded")
_WORK = ["Reading the repository...", "Running tests: 12 passed", "Editing src/app.py"]


def _jsonl(*events: dict) -> str:
    return "\n".join(json.dumps(event, ensure_ascii=False) for event in events) + "\n"


def _claude(*events: dict) -> str:
    return _jsonl({"type": "system", "subtype": "init", "session_id": "s", "tools": []}, *events)


def _codex(*events: dict) -> str:
    return _jsonl({"type": "thread.started", "thread_id": "t"}, {"type": "turn.started"}, *events)


def _said(text: str) -> dict:
    return {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}


def _tool_result(text: str) -> dict:
    return {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1", "content": text}]}}


def _item(text: str) -> list[dict]:
    return [
        {"type": "item.completed", "item": {"id": "i0", "type": "agent_message", "text": text}},
        {"type": "item.completed", "item": {"id": "i1", "type": "command_execution", "command": "cat notes",
                                             "aggregated_output": text, "exit_code": 1, "status": "failed"}},
    ]


def near_miss_samples() -> dict[str, str]:
    """Every near-miss text: the hand-written samples, our own files whole, and those files cut right after
    each line that mentions a limit (so that line ends the output, where a CLI prints its error)."""
    samples = {f"{p.parent.name}/{p.name}": p.read_text(encoding="utf-8")
               for folder in ("near_miss", "near_miss_exit0") for p in sorted((CORPUS / folder).glob("*"))}
    for path in OWN_FILES:
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(ROOT))
        samples[name] = text
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if _MENTIONS.search(line):
                samples[f"{name}:{number}"] = "\n".join(lines[:number]) + "\n"
    return samples


def near_miss_outputs() -> list[tuple[str, str, int | None, str]]:
    """(id, output, exit code, the kind it must get) for each near-miss text in each form."""
    outputs = []
    for name, text in near_miss_samples().items():
        if not name.startswith("near_miss_exit0/"):
            outputs += [(f"{name} text exit 1", text, 1, "failure"), (f"{name} killed", text, None, "failure")]
        if ":" in name:  # the cut forms stress the final region of failed free-text runs only
            continue
        failed = {"type": "result", "subtype": "error_max_turns", "is_error": True, "session_id": "s"}
        outputs += [
            (f"{name} text exit 0", text, 0, "ok"),
            (f"{name} stream-json success", _claude(_said(text), _tool_result(text), {
                "type": "result", "subtype": "success", "is_error": False, "result": text}), 0, "ok"),
            (f"{name} stream-json error", _claude(_said(text), _tool_result(text), failed), 1, "failure"),
            (f"{name} codex completed", _codex(*_item(text), {"type": "turn.completed"}), 0, "ok"),
            (f"{name} codex failed", _codex(*_item(text), {
                "type": "turn.failed", "error": {"message": "stream disconnected before completion"}}), 1, "failure"),
        ]
    return outputs


def limit_messages() -> list[dict]:
    return [json.loads(line) for line in (CORPUS / "limits.jsonl").read_text(encoding="utf-8").splitlines()]


def limit_outputs() -> list[tuple[str, str, int | None, str]]:
    """(id, output, exit code, kind) for each real message in the forms its CLI prints it."""
    outputs = []
    for entry in limit_messages():
        name, text, kind = entry["id"], entry["text"], entry["kind"]
        if entry["family"] == "claude-event":  # a stream-json event itself
            limited = {"type": "result", "subtype": "success", "is_error": True, "result": "You've hit your limit"}
            outputs += [(f"{name} killed", _claude(_said("working"), json.loads(text)), None, kind),
                        (f"{name} with result", _claude(json.loads(text), limited), 1, kind)]
            continue
        outputs.append((f"{name} text exit 1", "\n".join([*_WORK, text]) + "\n", 1, kind))
        outputs.append((f"{name} text killed", "\n".join([*_WORK, text]) + "\n", None, kind))
        if entry["family"] == "claude":
            for code in (0, 1):
                outputs.append((f"{name} stream-json exit {code}", _claude(_said("working"), _tool_result("ok"), {
                    "type": "result", "subtype": "success", "is_error": True, "result": text}), code, kind))
        else:
            outputs.append((f"{name} codex json", _codex(*_item("working"), {"type": "error", "message": text},
                                                         {"type": "turn.failed", "error": {"message": text}}), 1, kind))
    return outputs


def test_every_row_of_provider_messages_is_in_the_corpus() -> None:
    rows = [line.split(" | ")[0][2:].strip() for line in (CORPUS / "provider_messages.md").read_text(
        encoding="utf-8").splitlines() if line.startswith(("| `", "| stream"))]
    covered = {entry.get("row") for entry in limit_messages()}
    assert len(rows) >= 16
    assert [row for row in rows if row not in covered] == []


def test_our_copy_of_provider_messages_is_current() -> None:
    shared = ROOT.parent / "shared" / "PROVIDER_MESSAGES.md"  # beside the repository, where the team keeps it
    if shared.exists():
        assert shared.read_text(encoding="utf-8") == (CORPUS / "provider_messages.md").read_text(encoding="utf-8")


def test_corpus_has_no_false_positives_and_no_false_negatives() -> None:
    limits, near_misses = limit_outputs(), near_miss_outputs()
    false_positives = [(name, classify(out, code, now=NOW)) for name, out, code, want in near_misses
                       if classify(out, code, now=NOW).kind != want]
    false_negatives = [(name, classify(out, code, now=NOW)) for name, out, code, want in limits
                       if classify(out, code, now=NOW).kind != want]
    print(f"\ncorpus: {len(limits)} limit / {len(near_misses)} near-miss, false positives {len(false_positives)}, "
          f"false negatives {len(false_negatives)} ({len(limit_messages())} messages, "
          f"{len(near_miss_samples())} near-miss texts)")
    assert len(limit_messages()) >= 40 and len(near_miss_samples()) >= 40
    assert false_positives == []
    assert false_negatives == []
