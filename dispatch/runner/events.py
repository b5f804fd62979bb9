"""An agent's JSON events (Claude Code `stream-json`, Codex `--json`, opencode): shown readably in task.log,
and what they say the attempt used (`UsageMeter`).

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import json
import math
from typing import Any

_SHOWN_CHARS = 2000  # characters of one text block an event shows in task.log (the event is whole in events.jsonl)


def _shown(text: Any, limit: int = _SHOWN_CHARS) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _tool_call(name: Any, arguments: Any) -> str:
    """`→ Bash: pytest -q`: a tool call in one line, by the argument that says most."""
    if isinstance(arguments, dict):
        for key in ("command", "file_path", "path", "pattern", "url", "query", "description"):
            if isinstance(arguments.get(key), str):
                return f"→ {name}: {_shown(arguments[key], 300)}"
    return f"→ {name}: {_shown(arguments, 300)}"


def _claude_blocks(content: Any) -> list[str]:
    shown: list[str] = []
    for block in content if isinstance(content, list) else [{"type": "text", "text": content}]:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            shown += _shown(block["text"]).splitlines() or [""]
        elif kind == "tool_use":
            shown.append(_tool_call(block.get("name"), block.get("input")))
        elif kind == "tool_result":
            body = block.get("content")
            if isinstance(body, list):
                body = "\n".join(b.get("text", "") for b in body if isinstance(b, dict))
            first = (str(body or "").strip().splitlines() or [""])[0]
            mark = "← error" if block.get("is_error") else "← result"
            shown.append(f"{mark} ({len(str(body or ''))} characters): {_shown(first, 200)}")
    return shown


def _codex_item(item: dict) -> list[str]:
    kind = item.get("type")
    if kind == "agent_message":
        return _shown(item.get("text") or "").splitlines() or [""]
    if kind == "reasoning":
        return [f"(thinking) {_shown(item.get('text') or '', 300)}"]
    if kind == "command_execution":
        output = (item.get("aggregated_output") or "").strip().splitlines()[-5:]
        return [f"$ {_shown(item.get('command') or '', 300)} → exit {item.get('exit_code')}", *output]
    if kind == "file_change":
        changes = item.get("changes") or []
        return ["changed: " + ", ".join(str(c.get("path")) for c in changes if isinstance(c, dict))]
    if kind == "error":
        return [f"error: {_shown(item.get('message') or '')}"]
    return [f"({kind})"]


def parse_event(line: str) -> dict | None:
    """One line an agent printed, as the JSON object it is; None when it is none."""
    if not line.startswith("{") or not line.rstrip().endswith("}"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def render_event(line: str, event: dict | None = None) -> list[str] | None:
    """The readable lines of one line an agent printed in its JSON output (Claude Code `stream-json`, Codex
    `--json`); None when it is no such event (printed as it is); [] for an event that says nothing.
    `event`: the line already parsed (`parse_event`)."""
    event = parse_event(line) if event is None else event
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str):
        return None
    if kind in ("assistant", "user"):
        return _claude_blocks((event.get("message") or {}).get("content"))
    if kind == "system":
        if event.get("subtype") == "init":
            return [f"=== agent session {str(event.get('session_id', ''))[:8]}, model {event.get('model', '?')} ==="]
        return []
    if kind == "result":
        cost, _ = usage_figure("cost_usd", event.get("total_cost_usd"))  # UsageMeter warns of a bad one
        figures = [f"{event.get('num_turns')} turns" if event.get("num_turns") is not None else "",
                   f"{event['duration_ms'] / 1000:.1f} s" if isinstance(event.get("duration_ms"), (int, float)) else "",
                   f"${cost:.4f}" if cost is not None else ""]
        head = "error" if event.get("is_error") else "result"
        summary = ", ".join([str(event.get("subtype", "")), *(f for f in figures if f)])
        return [f"=== agent {head}: {summary} ===", *_shown(event.get("result") or "").splitlines()]
    if kind == "rate_limit_event":
        info = event.get("rate_limit_info") or {}
        return [f"rate limit: {info.get('status')} ({info.get('rateLimitType')}), resets at {info.get('resetsAt')}"]
    if kind == "item.completed" and isinstance(event.get("item"), dict):
        return _codex_item(event["item"])
    if kind in ("thread.started", "turn.started", "item.started", "item.updated"):
        return []
    if kind == "turn.completed":
        usage = event.get("usage") or {}
        return [f"=== codex turn done: {usage.get('input_tokens')} tokens in, {usage.get('output_tokens')} out ==="]
    if kind in ("turn.failed", "error"):
        error = event.get("error") if isinstance(event.get("error"), dict) else event
        return [f"=== codex {kind}: {_shown(error.get('message') or '')} ==="]
    return None


# An agent's usage figures are its own output, so untrusted: past these bounds (one attempt) a figure is a bug
# or a forged event, recorded as unknown with a warning. Both sides check (dispatch/core/usage.py imports these).
USAGE_MAX_COST_USD = 10_000.0
USAGE_MAX_TOKENS = 10**10  # of one kind (input, output, cache...); a long session is ~10^7


def usage_figure(name: str, value: Any) -> tuple[float | int | None, str]:
    """A usage figure an agent printed, as recorded: `cost_usd` a finite number from 0 to USAGE_MAX_COST_USD,
    a token count a whole number from 0 to USAGE_MAX_TOKENS.

    Returns:
        (the figure, ""); (None, why it is no figure) for anything else, which is recorded as unknown;
        (None, "") when nothing was printed (None).
    """
    if value is None:
        return None, ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{name} is a {type(value).__name__}, not a number"
    cost = name == "cost_usd"
    bound = USAGE_MAX_COST_USD if cost else USAGE_MAX_TOKENS
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= bound:
        shown = f"{value:.6g}" if isinstance(value, float) or abs(value) < 10**15 else "a number of many digits"
        return None, f"{name} {shown} is not a finite number from 0 to {bound:,.0f}"
    if not cost and value != int(value):
        return None, f"{name} {value:g} is not a whole number"
    return (float(value) if cost else int(value)), ""


class UsageMeter:
    """What an agent said one attempt used, from its JSON events; never a guess.

    Claude Code's final `result` event (`total_cost_usd`, `usage`: the session's totals, which its per-message
    usage only repeats), Codex's `turn.completed.usage` (cumulative for the session; no cost) and opencode's
    `step_finish` parts (`run --format json`: per step, summed). A figure the agent did not print is absent.
    """

    _CLAUDE = {"input_tokens": "input_tokens", "output_tokens": "output_tokens",
               "cache_read_input_tokens": "cache_read_tokens", "cache_creation_input_tokens": "cache_write_tokens"}
    _CODEX = {"input_tokens": "input_tokens", "cached_input_tokens": "cache_read_tokens",
              "output_tokens": "output_tokens", "reasoning_output_tokens": "reasoning_tokens"}

    def __init__(self) -> None:
        self._usage: dict[str, Any] = {}
        self._unknown: set[str] = set()  # figures the agent printed that are no figures (`usage_figure`)
        self._agent_model = ""

    def _set(self, source: str, figures: dict[str, Any], add: bool = False) -> list[str]:
        checked = {key: usage_figure(key, value) for key, value in figures.items()}
        found = {key: value for key, (value, _) in checked.items() if value is not None}
        refused = {key: problem for key, (_, problem) in checked.items() if problem}
        warnings = [f"=== runner: WARNING: {source} reported {problem}; recorded as unknown ==="
                    for problem in refused.values()]
        fresh = not add or self._usage.get("source") != source
        if not found and (fresh or not refused):  # nothing believable: nothing recorded (or added to)
            return warnings
        if fresh:
            self._usage, self._unknown = {"source": source}, set()
        self._unknown |= set(refused)  # a sum with one bad step in it is unknown too
        for key, value in found.items():
            self._usage[key] = self._usage.get(key, 0) + value if add else value
        return warnings

    def add(self, event: Any) -> list[str]:
        """Take one parsed JSON event of the agent's output (others are ignored); returns the warnings for
        task.log about figures in it that are no figures (`usage_figure`: recorded as unknown)."""
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "system" and event.get("subtype") == "init" and isinstance(event.get("model"), str):
            self._agent_model = event["model"][:100]
        elif kind == "result":
            usage = event.get("usage") if isinstance(event.get("usage"), dict) else {}
            figures = {name: usage.get(key) for key, name in self._CLAUDE.items()}
            return self._set("claude", {"cost_usd": event.get("total_cost_usd"), **figures})
        elif kind == "turn.completed" and isinstance(event.get("usage"), dict):
            return self._set("codex", {name: event["usage"].get(key) for key, name in self._CODEX.items()})
        elif kind == "step_finish" and isinstance(event.get("part"), dict):
            part = event["part"]
            tokens = part.get("tokens") if isinstance(part.get("tokens"), dict) else {}
            cache = tokens.get("cache") if isinstance(tokens.get("cache"), dict) else {}
            return self._set("opencode", {
                "cost_usd": part.get("cost"), "input_tokens": tokens.get("input"),
                "output_tokens": tokens.get("output"), "reasoning_tokens": tokens.get("reasoning"),
                "cache_read_tokens": cache.get("read"), "cache_write_tokens": cache.get("write")}, add=True)
        return []

    def usage(self) -> dict[str, Any] | None:
        """The attempt's usage (`source`, `cost_usd`, `*_tokens`, `agent_model`: only what was printed, and
        believable), or None."""
        if not self._usage:
            return None
        usage = {key: value for key, value in self._usage.items() if key not in self._unknown}
        if self._agent_model and usage.get("source") == "claude":
            return {**usage, "agent_model": self._agent_model}
        return usage
