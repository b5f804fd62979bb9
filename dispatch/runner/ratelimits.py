"""Classify an agent run's output: finished, rate-limited, out of quota, blocked for billing, misconfigured or failed.

Standard library only: this file is also copied to the nodes, which have nothing but ``python3``.

The rule, in this order (only the last 256 KiB of the output are read):

1. **Claude Code's structured output** (``--output-format stream-json --verbose``, or ``json``): its last
   ``{"type":"result"}`` event decides. ``"is_error": false`` is a finished run: "ok" with exit code 0
   (else "failure"), whatever the agent wrote. ``"is_error": true`` is an error: its ``result`` text (and
   ``errors``) is matched against the providers' messages, a rejected ``rate_limit_event`` of the run giving
   the reset time when the message has none; no known message is a "failure", even with exit code 0. That
   is how Claude Code's "API Error: Rate limit reached" with exit code 0 is caught.
2. **Codex's JSON events** (``codex exec --json``): a ``turn.failed`` after the last ``turn.completed`` (or,
   in a run that did not exit 0, the last ``error`` event) holds the message to match; a run that exits 0
   without a failed turn is "ok".
3. **Free text** (any other CLI, or a structured run that ended without its final event: a crash, a kill,
   a stall): exit code 0 is "ok", always. Otherwise only the **final error region** is read: the last 12
   non-blank lines that are not JSON events (what the CLI printed as it stopped). A rejected
   ``rate_limit_event`` of such a run is a quota.

Within a message, a provider's message counts only where a CLI prints one (``PROVIDER_MESSAGES.md``): at
the start of a line (after bullets, timestamps or an error label), at the start of a JSON string value, or
as a JSON error body that starts there; never a bare "429", "quota" or "rate limit". Lines where the CLI
says it is retrying by itself are skipped; the last message wins. So code, diffs, logs, test output and an
agent's summary quoting a limit never decide: they are neither an error result nor the final error region.

Claude Code prints a provider's answer behind its own label, ``API Error: Request rejected (429) · <message>``:
the label is decoration, so GLM's 5-hour cap (1308), arrears (1113) and MiniMax's 2056 behind it are a quota
or billing, not the bare 429 around them.

Kinds: "transient" (retry in seconds, next model now; also an endpoint that cannot be reached), "quota"
(cool down until the reset: at least `MIN_COOLDOWN_SECONDS`, 5 h when none is given), "billing" (balance,
plan or account: blocked until a person clears it), "auth" (report, next model), "config" (the CLI refused
to start: an unknown flag, root, an untrusted directory; report the fix, next model), "failure", "ok".

`retry_notice` reads one line of a running CLI: when it says the CLI is retrying by itself (Claude Code's
``system``/``api_retry`` event, Codex's "Reconnecting... 2/5"), a short text for the log ("429, retrying
2/10"); the node runner shows it and does not count it as progress.

Examples:
    >>> classify("API Error: Rate limit reached", 1).kind
    'transient'
    >>> classify("- You've hit your limit · resets 1:30am (Asia/Dhaka)", 0).kind
    'ok'
    >>> classify("assert resp.status == 429", 1).kind
    'failure'
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone, tzinfo

try:  # Python 3.9+; on an older node python3, named zones are unknown and fall back (see _zone)
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
except ImportError:  # pragma: no cover - exercised on nodes with python3.8
    ZoneInfo = None  # type: ignore[assignment,misc]
    ZoneInfoNotFoundError = KeyError  # type: ignore[assignment,misc]

__all__ = ["BILLING_BLOCK_SECONDS", "MIN_COOLDOWN_SECONDS", "TRANSIENT_COOLDOWN_SECONDS", "Verdict", "classify",
           "cooldown_until", "retry_notice"]

MIN_COOLDOWN_SECONDS = 300.0  # a quota whose reset has passed (or is a second away) still cools this long
BILLING_BLOCK_SECONDS = 365 * 86400.0  # "until a person clears it" (`dispatch models reset <model>`)
TRANSIENT_COOLDOWN_SECONDS = 30.0  # a transient limit cools its model team-wide this long, or its retry-after
_TRANSIENT_COOLDOWN_MAX = 3600.0
_TAIL_CHARS = 256 * 1024
_FINAL_LINES = 12
_MATCHED_MAX = 200
_MAX_MATCHES_PER_LINE = 20
_DEFAULT_QUOTA_SECONDS = 5 * 3600
_CHINA = timezone(timedelta(hours=8))
_UTC = timezone.utc  # noqa: UP017 - nodes may run a Python older than 3.11 (3.9 at least, for zoneinfo)
_RANK = {"billing": 4, "quota": 3, "auth": 2, "config": 2, "transient": 1}
_CODEX_EVENTS = ("thread.started", "turn.started", "turn.completed", "turn.failed", "item.started",
                 "item.updated", "item.completed", "error")


@dataclass(frozen=True)
class Verdict:
    """What one agent run's output says about how it ended.

    Attributes:
        kind: "ok", "transient" (retry in seconds), "quota" (cool the model down until ``reset_at``),
            "billing" (balance, plan or account: block the model until a person clears it), "auth" (the
            model is misconfigured: report it, do not retry), "config" (its CLI refused to start; the
            reason names the fix) or "failure".
        reason: short human text, e.g. "GLM 1308: 5-hour cap"; never contains secrets.
        reset_at: Unix time the quota resets (quota only; now + 5 h when the message gives none).
        retry_after: seconds to wait before retrying a transient limit, when the message says.
        matched: the line that decided the verdict, redacted and cut to 200 characters.
    """

    kind: str
    reason: str
    reset_at: float | None = None
    retry_after: float | None = None
    matched: str = ""


_Handler = "Callable[[re.Match[str], str, float], Verdict | None]"  # a string: nodes may run python3.8

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_SECRET = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{8,}|\bBearer\s+[A-Za-z0-9._~+/=\-]{8,}"
    r"|(?i:\b(?:x-api-key|api[_-]?key|auth[_-]?token|access[_-]?token)\W{1,4})[A-Za-z0-9._\-]{12,}"
)
# The CLI retries by itself on these lines ("API Error (429 ...) · Retrying in 5 seconds… (attempt 1/10)").
_RETRYING = re.compile(r"(?i)\bretrying\b\s*(?:in\b|\d|…|\.\.\.|\()|\(attempt \d+/\d+\)|\breconnecting\b")
_RETRYING_WORDS = ("retrying", "attempt", "reconnecting")
# What a CLI puts before its message on a line: blanks, bullets, box glyphs, "[timestamp]".
_LEAD = re.compile(r"(?:[\s>*•●○◆■□▪▸►✗✘×⚠⎿│┃|·:!\-]|\[[^\]\n]{0,64}\])*")
_CODE_CHARS = re.compile(r"[\"'`=(){}\\]")
_CODE_WORDS = re.compile(r"(?i)\b(?:assert|def|return|print|echo|raise|expect|const|let|var|elif)\b")
_ERROR_LABEL = re.compile(r"(?i)error|status|http|fail|exception|too many requests|\b[45]\d\d\b")
_LABEL_END = re.compile(r"(?::|\b[45]\d\d)\s*$")
_TIMESTAMP = re.compile(r"[\dTZ:.,+/ -]*")
_CLAUDE_API_LABEL = re.compile(r"(?i)api error\s*:?\s*(?:request rejected\s*)?\(\s*[45]\d\d\s*\)\s*[·•∙:\-–]?")
# ..."message":" (the keys that hold an error's text in the providers' bodies and Claude Code's result)
_JSON_KEY_BEFORE = re.compile(r'(?P<q>\\*)"(?:message|error|result|status_msg|msg|detail)(?P=q)"\s*:\s*(?P=q)"$', re.I)

_UNIT = r"(?:milliseconds?|ms|minutes?|mins?|m|days?|d|hours?|hrs?|h|seconds?|secs?|s)(?![a-z])"
_DURATION = rf"(?:\d+(?:\.\d+)?\s*{_UNIT}[\s,]*(?:and\s+)?)+"
_DURATION_PART = re.compile(rf"(\d+(?:\.\d+)?)\s*({_UNIT})", re.IGNORECASE)
_MONTH = r"(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_CLOCK = r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>[ap]\.?\s?m\b\.?)?"
_ZONE = r"(?:\s*\(\s*(?P<zone>[^()\s]{1,40})\s*\)|\s+(?P<zone2>UTC|GMT)\b)?"

_RESET_ISO = re.compile(
    r"(?:\breset(?:s|ting)?\s+(?:at|on)?|将在)\s*"
    r"(?P<ts>\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(?P<tz>Z|UTC|[+-]\d{2}:?\d{2})?",
    re.IGNORECASE,
)
_RESET_IN = re.compile(rf"(?:try again|resets?|retry) in\s+(?P<dur>{_DURATION})", re.IGNORECASE)
_RESET_DATE = re.compile(
    rf"(?:try again at|resets?(?: at)?)\s+{_MONTH}\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?,?\s+"
    rf"(?:(?P<year>\d{{4}}),?\s+)?(?:at\s+)?{_CLOCK}{_ZONE}",
    re.IGNORECASE,
)
_RESET_CLOCK = re.compile(rf"(?:try again at|\breset(?:s)?(?: at)?)\s+{_CLOCK}{_ZONE}", re.IGNORECASE)
_RETRY_AFTER = re.compile(r"(?i)retry[- ]after:?\s*(\d+(?:\.\d+)?)")
_BRACE = re.compile(r"\{")
_OFFSET_ZONE = re.compile(r"(?i)^(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?$")


def classify(output: str, exit_code: int | None, *, now: float | None = None) -> Verdict:
    """Decide how an agent run ended from its combined stdout and stderr (the rule is in the module doc).

    Args:
        output: the agent's combined stdout and stderr, any size (only the last 256 KiB are read).
        exit_code: its exit status, or None when it was killed or lost.
        now: the Unix time to resolve relative and wall-clock reset times against (default: now).

    Returns:
        The verdict; for "quota" ``reset_at`` is always set.

    Examples:
        >>> classify("Claude AI usage limit reached|1767225600", 1).reset_at
        1767225600.0
    """
    now = time.time() if now is None else now
    lines = _ANSI.sub("", output[-_TAIL_CHARS:]).replace("\r", "\n").split("\n")
    plain, events = _split(lines)
    verdict = None
    result = _last(events, "result")
    if result is not None:
        return _claude_result(result, events, exit_code, now)
    if any(event.get("type") in _CODEX_EVENTS for event in events):
        verdict = _codex(events, exit_code, now)
        if verdict is not None:
            return verdict
    if exit_code == 0:
        return Verdict("ok", "exit code 0")
    verdict = _scan(plain[-_FINAL_LINES:], now, _rejected_reset(events))
    if verdict is None:
        verdict = _rejected_event(events, now)
    if verdict is not None:
        return verdict
    if exit_code is None:
        return Verdict("failure", "no exit code (killed, timed out or lost)")
    return Verdict("failure", f"exit code {exit_code}")


def cooldown_until(verdict: Verdict, now: float) -> float | None:
    """When a model that produced this verdict may be used again.

    Args:
        verdict: the result of `classify` (only ``kind`` and ``reset_at`` are read).
        now: the current Unix time.

    Returns:
        For "quota", its reset time, but at least `MIN_COOLDOWN_SECONDS` from ``now`` (a reset already
        passed still means the provider refused this run; no reset at all means 5 h); for "billing",
        `BILLING_BLOCK_SECONDS` from now (a person clears it); for "transient", its ``retry_after`` but at
        least `TRANSIENT_COOLDOWN_SECONDS` (so the next spec starts on the next model at once, and no
        spec waits out the same limit again); None for every other kind (auth and config errors are
        reported, they cool nothing).
    """
    if verdict.kind == "billing":
        return now + BILLING_BLOCK_SECONDS
    if verdict.kind == "transient":
        wait = min(max(verdict.retry_after or 0.0, TRANSIENT_COOLDOWN_SECONDS), _TRANSIENT_COOLDOWN_MAX)
        return now + wait
    if verdict.kind != "quota":
        return None
    reset_at = verdict.reset_at if verdict.reset_at is not None else now + _DEFAULT_QUOTA_SECONDS
    return max(reset_at, now + MIN_COOLDOWN_SECONDS)


def retry_notice(line: str) -> str | None:
    """When one line of a running CLI says it is retrying by itself, a short text for the log, else None.

    Examples:
        >>> retry_notice('{"type":"system","subtype":"api_retry","attempt":2,"max_retries":10,"error_status":429}')
        '429, retrying 2/10'
        >>> retry_notice('{"type":"error","message":"Reconnecting... 1/5 (stream disconnected before completion)"}')
        'reconnecting 1/5: stream disconnected before completion'
        >>> retry_notice("Reading the retry logic in client.py") is None
        True
    """
    lowered = line.lower()
    if "api_retry" in lowered:
        event = _json_object(line)
        if event and event.get("type") == "system" and event.get("subtype") == "api_retry":
            status = event.get("error_status")
            what = str(status) if isinstance(status, int) else str(event.get("error") or "connection error")[:40]
            delay = event.get("retry_delay_ms")
            wait = f" in {delay / 1000:.3g}s" if isinstance(delay, (int, float)) and delay > 0 else ""
            return f"{what}, retrying {event.get('attempt', '?')}/{event.get('max_retries', '?')}{wait}"
        return None
    if "reconnecting" not in lowered and "retrying" not in lowered and "waiting for network" not in lowered:
        return None
    text = line
    if line.lstrip().startswith("{"):
        event = _json_object(line)
        if not event or event.get("type") != "error" or not isinstance(event.get("message"), str):
            return None  # an agent's message or a tool's output that mentions retrying is not the CLI's
        text = event["message"]
    text = _ANSI.sub("", text).strip()
    found = _RECONNECTING.match(text)
    if found is not None:
        count = f" {found.group('count')}" if found.group("count") else ""
        detail = _SECRET.sub("[redacted]", found.group("detail").strip(" ()….·-"))[:120]
        return f"reconnecting{count}{': ' + detail if detail else ''}"
    found = _CLAUDE_RETRYING.match(text)
    if found is not None:
        return f"{found.group('status') or 'API error'}, retrying {found.group('attempt') or ''}".rstrip()
    return None


def _json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --- structured output ---------------------------------------------------------------------------------


def _split(lines: list[str]) -> tuple[list[str], list[dict]]:
    """The non-blank lines that are not JSON events, and the JSON events (objects with a string "type")."""
    plain: list[str] = []
    events: list[dict] = []
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped[0] == "{" and stripped[-1] == "}" and '"type"' in stripped:
            try:
                event = json.loads(stripped)
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("msg"), dict):  # codex before 0.44: {"id","msg"}
                event = event["msg"]
            # an API error body ({"type":"error","error":{...}}) printed as text is not a codex error event
            if isinstance(event, dict) and isinstance(event.get("type"), str) and (
                event["type"] != "error" or isinstance(event.get("message"), str)
            ):
                events.append(event)
                continue
        plain.append(line)
    return plain, events


def _last(events: list[dict], kind: str) -> dict | None:
    for event in reversed(events):
        if event.get("type") == kind:
            return event
    return None


def _rejected_info(events: list[dict]) -> dict | None:
    for event in reversed(events):
        info = event.get("rate_limit_info") if event.get("type") == "rate_limit_event" else None
        if isinstance(info, dict):
            return info if info.get("status") == "rejected" else None
    return None


def _rejected_reset(events: list[dict]) -> float | None:
    info = _rejected_info(events) or {}
    value = info.get("resetsAt")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value / 1000 if value > 1e11 else float(value)


def _rejected_event(events: list[dict], now: float) -> Verdict | None:
    """A quota from the run's last rate_limit_event, when Claude Code said it was rejected."""
    info = _rejected_info(events)
    if info is None:
        return None
    reason = f"Claude rate_limit_event rejected ({info.get('rateLimitType') or 'unknown window'})"
    line = _SECRET.sub("[redacted]", json.dumps(info, ensure_ascii=False))[:_MATCHED_MAX]
    return _dated(Verdict("quota", reason, _rejected_reset(events), matched=line), now)


def _claude_result(result: dict, events: list[dict], exit_code: int | None, now: float) -> Verdict:
    subtype = str(result.get("subtype") or "result")[:40]
    if result.get("is_error") is not True:
        if exit_code == 0:
            return Verdict("ok", f"Claude Code result {subtype}, exit code 0")
        return Verdict("failure", f"Claude Code result {subtype}, exit code {exit_code}")
    texts = [result.get("result")] + list(result.get("errors") or [])
    message = "\n".join(t for t in texts if isinstance(t, str))
    verdict = _scan(message.split("\n"), now, _rejected_reset(events))
    if verdict is None:
        verdict = _rejected_event(events, now)
    if verdict is not None:
        return verdict
    said = _SECRET.sub("[redacted]", message.strip().split("\n")[0])[:120]
    return Verdict("failure", f"Claude Code ended with an error ({subtype}){': ' + said if said else ''}")


def _codex(events: list[dict], exit_code: int | None, now: float) -> Verdict | None:
    """Codex's verdict from its JSON events; None when they hold no final word (then free text decides)."""
    message = None
    for event in reversed(events):
        kind = event.get("type")
        if kind == "turn.completed":
            break
        if kind == "turn.failed" and isinstance(event.get("error"), dict):
            message = event["error"].get("message")
            break
        if kind == "error" and message is None and exit_code != 0:
            message = event.get("message")
    if not isinstance(message, str) or not message.strip():
        return Verdict("ok", "Codex turn completed, exit code 0") if exit_code == 0 else None
    retrying = _RECONNECTING.match(_ANSI.sub("", message).strip())
    if retrying is not None:  # it was stopped while retrying by itself: the retry says why
        return _codex_retrying(retrying.group("detail").strip(" ()….·-"), now)
    verdict = _scan(message.split("\n"), now, None)
    if verdict is not None:
        return verdict
    said = _SECRET.sub("[redacted]", message.strip().split("\n")[0])[:120]
    return Verdict("failure", f"Codex turn failed: {said}")


def _codex_retrying(detail: str, now: float) -> Verdict:
    """A Codex run stopped while it said "Reconnecting... <detail>": what the detail says, else unreachable."""
    verdict = _scan([detail], now, None)
    if verdict is not None:
        return verdict
    said = _SECRET.sub("[redacted]", detail)[:100]
    return Verdict("transient", f"endpoint unreachable (codex kept reconnecting: {said or 'waiting for network'}): "
                                "check the model's base URL and that its provider is up")


def _scan(lines: list[str], now: float, earlier_reset: float | None) -> Verdict | None:
    """The last provider message in ``lines`` (a quota without a reset borrows an earlier one), if any."""
    if not any(word in line.lower() for line in lines for word in _TRIGGER_WORDS):
        return None
    undated: Verdict | None = None  # the last message, a quota that gave no reset time
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        lowered = line.lower()
        if not any(word in lowered for word in _TRIGGER_WORDS):
            continue
        if any(word in lowered for word in _RETRYING_WORDS) and _RETRYING.search(line):
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        verdict = _classify_line(line, lowered, following, now)
        if verdict is None:
            continue
        if undated is None:
            verdict = replace(verdict, matched=_SECRET.sub("[redacted]", line.strip())[:_MATCHED_MAX])
            if verdict.kind != "quota" or verdict.reset_at is not None:
                return verdict
            undated = verdict  # keep looking: an earlier message of this run may say when (stream-json does)
        elif verdict.kind == "quota" and verdict.reset_at is not None:
            return replace(undated, reason=verdict.reason, reset_at=verdict.reset_at)
    if undated is not None and earlier_reset is not None:
        return replace(undated, reset_at=earlier_reset)
    return _dated(undated, now) if undated is not None else None


def _dated(verdict: Verdict, now: float) -> Verdict:
    """A quota verdict with a reset time: 5 h from now when the provider gave none."""
    if verdict.kind != "quota" or verdict.reset_at is not None:
        return verdict
    reason = f"{verdict.reason}; assuming it resets in 5 h"
    return replace(verdict, reason=reason, reset_at=now + _DEFAULT_QUOTA_SECONDS)


# --- where a message may start -------------------------------------------------------------------------


def _plain(rest: str) -> bool:
    """Whether text before a message is decoration, a timestamp or an error label ("API Error: 429 ",
    "ERROR: ", "Error running remote compact task: "), not code or prose that mentions the message."""
    rest = rest[_LEAD.match(rest).end() :]  # type: ignore[union-attr]  # _LEAD matches the empty string
    label = _CLAUDE_API_LABEL.match(rest)
    if label:  # "API Error: Request rejected (429) · ": Claude Code's label before the provider's message
        rest = rest[label.end() :]
        rest = rest[_LEAD.match(rest).end() :]  # type: ignore[union-attr]
    if not rest or _TIMESTAMP.fullmatch(rest):
        return True
    if len(rest) > 160 or _CODE_CHARS.search(rest) or _CODE_WORDS.search(rest):
        return False
    return bool(_ERROR_LABEL.search(rest) and _LABEL_END.search(rest))


def _starts_message(line: str, start: int) -> bool:
    """Whether a message beginning at ``start`` sits where a CLI prints one."""
    prefix = line[:start]
    if len(prefix) <= 400 and _plain(prefix):
        return True
    quote = prefix.rfind('"')  # or at the start of a JSON string value, after the same kind of decoration
    if quote < 0 or not _plain(prefix[quote + 1 :]):
        return False
    key = _JSON_KEY_BEFORE.search(prefix, max(0, quote - 100), quote + 1)
    if key is None:
        return False
    # ... of an error body that itself starts where a CLI prints one (not a fixture, a diff, code or a JSON
    # string quoting one: the body's keys are quoted as this one is, not escaped inside another string)
    opening = "{" + key.group("q") + '"'
    for brace in [m.start() for m in _BRACE.finditer(prefix, max(0, quote - 2000), quote)][:8]:
        if (prefix.startswith(opening, brace) and "error" in prefix[brace:quote].lower() and brace <= 400
                and _plain(prefix[:brace])):
            return True
    return False


def _in_error_body(line: str, match: re.Match[str]) -> bool:
    """Whether a JSON key/value match belongs to an error body printed where a CLI prints one."""
    key_quote = match.group("q") + '"'
    start = match.start()
    for brace in [m.start() for m in _BRACE.finditer(line, max(0, start - 2000), start)][-8:]:
        if line.startswith(key_quote, brace + 1) and _starts_message(line, brace):
            return True
    return False


# --- reset times ---------------------------------------------------------------------------------------


def _zone(name: str | None) -> tuple[tzinfo | None, bool]:
    """The time zone a message names: (None, True) for local time, (None, False) when unknown."""
    if not name:
        return None, True
    if name.upper() in ("UTC", "GMT", "Z"):
        return _UTC, True
    offset = _OFFSET_ZONE.match(name)
    if offset:
        sign = -1 if offset.group(1) == "-" else 1
        return timezone(sign * timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3) or 0))), True
    if ZoneInfo is None:
        return None, False
    try:
        return ZoneInfo(name), True
    except (ZoneInfoNotFoundError, ValueError):
        return None, False


def _clock(match: re.Match[str]) -> tuple[int, int] | None:
    """Hour and minute from a `_CLOCK` match; None when it is not clearly a time of day."""
    hour, minute, ampm = int(match.group("hour")), int(match.group("minute") or 0), match.group("ampm")
    if ampm:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if ampm.lower().startswith("p") else 0)
    elif match.group("minute") is None:
        return None
    return (hour, minute) if hour < 24 and minute < 60 else None


def _duration(text: str) -> float:
    """Seconds in "5 days 22 hours 11 minutes", "1.574s", "6m0s" or "20ms"."""
    total = 0.0
    for amount, unit in _DURATION_PART.findall(text):
        unit = unit.lower()
        if unit == "ms" or unit.startswith("milli"):
            scale = 0.001
        else:
            scale = {"d": 86400.0, "h": 3600.0, "m": 60.0}.get(unit[0], 1.0)
        total += float(amount) * scale
    return total


def _find_reset(text: str, now: float, naive_zone: tzinfo | None) -> tuple[float | None, str]:
    """The reset time a message gives, and a note when it names a zone we do not know."""
    iso = _RESET_ISO.search(text)
    if iso:
        zone, _ = _zone(iso.group("tz"))
        try:
            moment = datetime.fromisoformat(iso.group("ts").replace(" ", "T"))
        except ValueError:
            moment = None
        if moment is not None:
            return moment.replace(tzinfo=zone or naive_zone or _UTC).timestamp(), ""
    relative = _RESET_IN.search(text)
    if relative:
        return now + _duration(relative.group("dur")), ""
    for pattern in (_RESET_DATE, _RESET_CLOCK):
        found = pattern.search(text)
        clock = _clock(found) if found else None
        if found is None or clock is None:
            continue
        zone_name = found.group("zone") or found.group("zone2")
        zone, known = _zone(zone_name)
        if not known:
            return None, f"unknown time zone {zone_name!r}"
        try:
            return _wall_clock(found, clock, zone, now), ""
        except (ValueError, OverflowError):
            return None, ""
    return None, ""


def _wall_clock(found: re.Match[str], clock: tuple[int, int], zone: tzinfo | None, now: float) -> float:
    """The next time after ``now`` showing this wall clock (and date, when given) in ``zone``."""
    local_now = datetime.fromtimestamp(now, zone)
    if "month" in found.re.groupindex:
        month = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
        year = int(found.group("year") or local_now.year)
        when = local_now.replace(
            year=year,
            month=month.index(found.group("month").lower()[:3]) + 1,
            day=int(found.group("day")),
            hour=clock[0],
            minute=clock[1],
            second=0,
            microsecond=0,
        )
        if not found.group("year") and when.timestamp() < now - 86400:
            when = when.replace(year=year + 1)
        return when.timestamp()
    when = local_now.replace(hour=clock[0], minute=clock[1], second=0, microsecond=0)
    if when.timestamp() <= now:
        when += timedelta(days=1)
    return when.timestamp()


def _quota(reason: str, text: str, now: float, *, naive_zone: tzinfo | None = None) -> Verdict:
    """A quota verdict; ``reset_at`` stays None when the text gives none (`classify` then decides)."""
    reset_at, note = _find_reset(text, now, naive_zone)
    if reset_at is None:
        return Verdict("quota", f"{reason} ({note or 'no reset time given'})")
    return Verdict("quota", reason, reset_at)


def _transient(reason: str, text: str) -> Verdict:
    found = _RESET_IN.search(text)
    after = _RETRY_AFTER.search(text)
    retry = _duration(found.group("dur")) if found else float(after.group(1)) if after else None
    return Verdict("transient", reason, retry_after=retry)


# --- the providers' messages ---------------------------------------------------------------------------


def _codex_usage(match: re.Match[str], text: str, now: float) -> Verdict:
    return _quota("Codex usage limit", text, now)


def _claude_usage(match: re.Match[str], text: str, now: float) -> Verdict:
    epoch = re.match(r"\s*\|\s*(\d{9,13})", text[match.end() - match.start() :])
    if epoch:
        value = float(epoch.group(1))
        return Verdict("quota", "Claude usage limit", value / 1000 if value > 1e11 else value)
    return _quota("Claude usage limit", text, now)


def _claude_api_rate_limit(match: re.Match[str], text: str, now: float) -> Verdict:
    reset_at, _ = _find_reset(text, now, None)
    if reset_at is not None:
        return Verdict("quota", "Claude API rate limit with a reset time", reset_at)
    return _transient("Claude API Error: Rate limit reached", text)


def _glm_quota_text(match: re.Match[str], text: str, now: float) -> Verdict:
    reason = "GLM 1308: 5-hour cap" if "5" in match.group(0) else "GLM usage cap"
    return _quota(reason, text, now, naive_zone=_CHINA)


def _glm_code(match: re.Match[str], text: str, now: float) -> Verdict | None:
    """Z.ai's business codes (docs.z.ai/api-reference/api-code): 1000-1004 authentication, 1110-1121
    account (inactive, missing, locked, in arrears), 13xx rate limits and caps."""
    code = int(match.group("code") or match.group("num"))
    if 1000 <= code <= 1004:
        return Verdict("auth", f"GLM {code}: authentication failed: check the model's token")
    if code in _GLM_ACCOUNT:
        return Verdict("billing", f"GLM {code}: {_GLM_ACCOUNT[code]}")
    if code in (1302, 1303):
        return _transient(f"GLM {code}: request rate limit", text)
    if code == 1305:
        return _transient("GLM 1305: model overloaded", text)
    if code == 1308:
        return _quota("GLM 1308: 5-hour cap", text, now, naive_zone=_CHINA)
    if code in (1304, 1310) or 1316 <= code <= 1321:
        return _quota(f"GLM {code}: usage cap", text, now, naive_zone=_CHINA)
    return None


_GLM_ACCOUNT = {
    1110: "account inactive",
    1111: "account does not exist",
    1112: "account locked",
    1113: "account in arrears: recharge it",
    1121: "account locked for irregular activity",
}


def _glm_transient_text(match: re.Match[str], text: str, now: float) -> Verdict:
    overloaded = "访问量" in match.group(0)
    return _transient("GLM 1305: model overloaded" if overloaded else "GLM 1302: request rate limit", text)


def _minimax(match: re.Match[str], text: str, now: float) -> Verdict:
    window = re.search(r"(\d+-hour|weekly|daily) usage limit", text, re.IGNORECASE)
    reason = f"MiniMax {window.group(1).lower()} usage limit" if window else "MiniMax usage limit"
    return _quota(reason, text, now, naive_zone=_UTC)


def _codex_usage_body(match: re.Match[str], text: str, now: float) -> Verdict:
    at = re.search(r'resets_at\\*"\s*:\s*(\d{9,13})', text)
    within = re.search(r'resets_in_seconds\\*"\s*:\s*(\d+(?:\.\d+)?)', text)
    if at:
        return Verdict("quota", "Codex usage_limit_reached", float(at.group(1)))
    if within:
        return Verdict("quota", "Codex usage_limit_reached", now + float(within.group(1)))
    return _quota("Codex usage_limit_reached", text, now)


def _rate_limit_event(match: re.Match[str], text: str, now: float) -> Verdict | None:
    line = match.string
    start = line.rfind("{", 0, match.start())
    before = line[:start].rstrip()
    if start < 0 or (before and before[-1] in "\"'`=([,:") or not line.rstrip().endswith("}"):
        return None  # an event printed by the CLI ends its line; code quoting one does not, or is quoted
    info = match.group("info")
    status = re.search(r'"status"\s*:\s*"(\w+)"', info)
    if status is None or status.group(1) != "rejected":
        return None  # "allowed" / "allowed_warning": information, not a limit
    window = re.search(r'"rateLimitType"\s*:\s*"(\w+)"', info)
    reason = f"Claude rate_limit_event rejected ({window.group(1) if window else 'unknown window'})"
    resets = re.search(r'"resetsAt"\s*:\s*(\d{9,13})', info)
    if resets:
        value = float(resets.group(1))
        return Verdict("quota", reason, value / 1000 if value > 1e11 else value)
    return _quota(reason, "", now)


def _anthropic_body(match: re.Match[str], text: str, now: float) -> Verdict:
    kind = match.group("etype")
    if kind == "authentication_error":
        return Verdict("auth", "authentication_error: check the model's API key or token")
    if kind == "overloaded_error":
        return _transient("overloaded_error (529)", text)
    return _transient("rate_limit_error (429)", text)


def _openai_code(match: re.Match[str], text: str, now: float) -> Verdict:
    if match.group("code") == "insufficient_quota":
        return Verdict("billing", "OpenAI insufficient_quota: check the plan and billing details")
    if match.group("code") == "invalid_api_key":
        return Verdict("auth", "invalid_api_key: check the model's API key")
    return _transient("OpenAI rate_limit_exceeded", text)


def _openai_rate_limit(match: re.Match[str], text: str, now: float) -> Verdict:
    unit = re.search(r"\((TPM|RPM|TPD|RPD|IPM)\)", text)
    return _transient(f"OpenAI rate limit ({unit.group(1) if unit else 'requests'})", text)


def _minimax_base_resp(match: re.Match[str], text: str, now: float) -> Verdict | None:
    """MiniMax's ``base_resp.status_code`` (platform.minimax.io/docs/api-reference/errorcode)."""
    code = int(match.group("code"))
    if code == 1002:
        return _transient("MiniMax 1002: rate limit", text)
    if code in (1004, 2049):
        return Verdict("auth", f"MiniMax {code}: not authorized: check the model's API key")
    if code == 1008:
        return Verdict("billing", "MiniMax 1008: insufficient balance")
    if code == 2056:
        return _quota("MiniMax 2056: usage limit", text, now, naive_zone=_UTC)
    return None


def _billing_text(match: re.Match[str], text: str, now: float) -> Verdict:
    said = match.group(0).strip().rstrip(".")[:60]
    return Verdict("billing", f"billing: {said}")


def _auth_text(match: re.Match[str], text: str, now: float) -> Verdict:
    said = match.group(0).strip()[:40]
    return Verdict("auth", f"authentication failed ({said}): check the model's API key or login")


def _unreachable(match: re.Match[str], text: str, now: float) -> Verdict:
    cause = match.group("cause") or match.group("code") or "connection refused"
    return Verdict("transient", f"endpoint unreachable ({cause}): check the model's base URL and that its "
                                "provider is up")


_CLI_REFUSALS = (  # (words, fix) for the ways a CLI refuses to start at all (AGENT_CLIS.md)
    ("root/sudo", "Claude Code refuses --dangerously-skip-permissions as root: give the model IS_SANDBOX=1 "
                  "(`dispatch models set NAME --env IS_SANDBOX=1`; the built-in models have it) or run the "
                  "node's runner as an unprivileged user"),
    ("trusted directory", "codex refuses a working directory outside a git repository: add "
                          "--skip-git-repo-check to the model's command (the built-in codex has it)"),
)


def _cli_refused(match: re.Match[str], text: str, now: float) -> Verdict:
    found = match.group(0).lower()
    flag = match.group("flag")
    if flag:
        return Verdict("config", f"the CLI does not take {flag[:40]} (its flags changed with its version): fix "
                                 "the model's command (`dispatch models set NAME --command ...`) or install the "
                                 "version agents/package.json pins")
    for words, fix in _CLI_REFUSALS:
        if words in found:
            return Verdict("config", fix)
    return Verdict("config", "the CLI refused to start")


def _missing_key(match: re.Match[str], text: str, now: float) -> Verdict:
    return Verdict("auth", f"the model's key {match.group('var')[:40]} is not set: give it one "
                           "(`dispatch models set NAME --key-env VAR`)")


def _http_status(match: re.Match[str], text: str, now: float) -> Verdict:
    code = match.group("code") or match.group("code2")
    if code == "529" or match.group(0).lower().endswith("overloaded"):
        return _transient("overloaded (529)", text)
    return _transient("rate limited (429)", text)


_Q = r'(?P<q>\\*)"'  # a JSON quote at any escaping depth; the rest of the pattern repeats it
_CODEX_USAGE = re.compile(r"you['’]ve (?:hit|reached) your usage limit", re.I)
_CLAUDE_USAGE = re.compile(
    r"claude(?: ai)? usage limit reached"
    r"|you['’](?:ve|re) (?:hit|reached) your (?:[\w'’-]+ ){0,3}?limit"
    r"|you['’]re out of (?:extra )?usage"
    r"|(?<![\w-])(?:[\w-]{1,20} ){0,2}limit reached\s*[·•∙|\-–]\s*resets",
    re.I,
)
_GLM_QUOTA = re.compile(
    r"已达到\s*\d+\s*小时的使用上限"
    r"|usage limit reached for \d+\s*hours?\b|weekly/monthly limit exhausted",
    re.I,
)
_MINIMAX_QUOTA = re.compile(r"usage limit exceeded\b", re.I)
_CODEX_USAGE_BODY = re.compile(_Q + r'type(?P=q)"\s*:\s*(?P=q)"usage_limit_reached(?P=q)"')
_GLM_CODE_BODY = re.compile(  # {"error":{"code":"1308","message":...}}, the code a string (or a number)
    _Q + r'error(?P=q)"\s*:\s*\{[^{}]*?(?P=q)"(?:code|type)(?P=q)"\s*:\s*'
    r'(?:(?P=q)"(?P<code>1\d{3})(?P=q)"|(?P<num>1\d{3})\b)'
)
_MINIMAX_BASE_RESP = re.compile(_Q + r'base_resp(?P=q)"\s*:\s*\{[^{}]*?(?P=q)"status_code(?P=q)"\s*:\s*(?P<code>\d+)')
_BILLING = re.compile(
    r"quota exceeded\.?\s*check your plan and billing|you exceeded your current quota"
    r"|(?:your )?credit balance is too low|您的账户已欠费"
    r"|your account (?:is in arrears|has been locked|is currently inactive)"
    r"|insufficient balance or no resource package|余额不足或无可用资源包",
    re.I,
)
_RATE_LIMIT_EVENT = re.compile(r'(?<!\\)"rate_limit_info"\s*:\s*\{(?P<info>[^{}]{0,2000})\}')
_ANTHROPIC_BODY = re.compile(
    _Q + r'type(?P=q)"\s*:\s*(?P=q)"(?P<etype>rate_limit_error|overloaded_error|authentication_error)(?P=q)"'
)
_OPENAI_CODE_BODY = re.compile(
    _Q + r'(?:code|type)(?P=q)"\s*:\s*(?P=q)"(?P<code>rate_limit_exceeded|invalid_api_key|insufficient_quota)(?P=q)"'
)
_AUTH = re.compile(
    r"invalid api key|incorrect api key provided|invalid bearer token|invalid x-api-key"
    r"|oauth token (?:has )?(?:expired|been revoked)|failed to authenticate|api error\s*:?\s*401\b"
    r"|unexpected status 401\b|not logged in\b.{0,20}/login|please run /login",
    re.I,
)
# A CLI's own retry line, at the start of what it printed: Codex's "Reconnecting... 2/5 (<why>)" and its
# "waiting for network", Claude Code's "API Error (429 ...) · Retrying in 5 seconds… (attempt 1/10)".
_RECONNECTING = re.compile(r"(?i)[■⚠•●*>\s-]*(?:error\s*:\s*)?reconnecting\b[.…\s]*(?P<count>\d+/\d+)?(?P<detail>.*)")
_CLAUDE_RETRYING = re.compile(
    r"(?i)[■⚠•●⎿*>\s-]*api error\s*\(?\s*(?P<status>[45]\d\d)?\b.{0,300}?\bretrying in\b.*?"
    r"(?:\(attempt (?P<attempt>\d+/\d+)\))?\s*$"
)
_UNREACHABLE = re.compile(  # Claude Code 2.1.332: "API Error: Connection refused — a firewall ... (ECONNREFUSED)"
    r"api error\s*:\s*(?:unable to connect to api\b(?:\s*\((?P<cause>\w{1,40})\))?"
    r"|connection (?:refused|error)\b(?:.{0,160}?\((?P<code>E[A-Z]{2,20})\))?)",
    re.I,
)
_CLI_REFUSED = re.compile(
    r"--dangerously-skip-permissions cannot be used with root/sudo privileges"
    r"|not inside a trusted directory"
    r"|(?:unexpected argument|unknown option) '(?P<flag>-[^'\s]{1,60})'(?: found)?",
    re.I,
)
_MISSING_KEY = re.compile(r"(?i:missing environment variable):?\s*`?(?P<var>[A-Z][A-Z0-9_]{1,60})`?")
_CLAUDE_API_RATE_LIMIT = re.compile(r"api error\s*:\s*rate limit(?:ed| reached)", re.I)
_OPENAI_RATE_LIMIT = re.compile(r"rate limit reached for (?!requests\b)\S+ in organization\b", re.I)
_GLM_TRANSIENT = re.compile(
    r"您的账户已达到速率限制|该模型当前访问量过大"
    r"|high concurrency usage of this api|rate limit reached for requests\b",
    re.I,
)
_HTTP_STATUS = re.compile(
    r"api error\s*:?\s*(?:request rejected\s*\(\s*)?(?:repeated\s+)?(?P<code>429|529)\b"
    r"|(?:unexpected status|exceeded retry limit,?\s*last status:?)\s*(?P<code2>429|529)\b"
    r"|api error\s*:\s*overloaded",
    re.I,
)

# Where a match must sit: _TEXT at the start of a message, _BODY inside a JSON error body, or anywhere.
_TEXT, _BODY, _ANYWHERE = "text", "body", "anywhere"
# Each rule: words one of which the lowercased line must contain (a fast check before the regex), the
# pattern, where it must sit, and the handler that turns a match into a verdict.
_RULES: list[tuple[tuple[str, ...], re.Pattern[str], str, _Handler]] = [
    (("your usage limit",), _CODEX_USAGE, _TEXT, _codex_usage),
    (
        ("usage limit reached", "hit your", "reached your", "out of", "limit reached"),
        _CLAUDE_USAGE,
        _TEXT,
        _claude_usage,
    ),
    (("使用上限", "usage limit reached for", "limit exhausted"), _GLM_QUOTA, _TEXT, _glm_quota_text),
    (("usage limit exceeded",), _MINIMAX_QUOTA, _TEXT, _minimax),
    (("usage_limit_reached",), _CODEX_USAGE_BODY, _BODY, _codex_usage_body),
    (('"1',), _GLM_CODE_BODY, _BODY, _glm_code),
    (("base_resp",), _MINIMAX_BASE_RESP, _BODY, _minimax_base_resp),
    (
        ("quota exceeded", "current quota", "credit balance", "your account", "欠费", "insufficient balance",
         "余额不足"),
        _BILLING,
        _TEXT,
        _billing_text,
    ),
    (('"rate_limit_info"',), _RATE_LIMIT_EVENT, _ANYWHERE, _rate_limit_event),
    (("rate_limit_error", "overloaded_error", "authentication_error"), _ANTHROPIC_BODY, _BODY, _anthropic_body),
    (("rate_limit_exceeded", "invalid_api_key", "insufficient_quota"), _OPENAI_CODE_BODY, _BODY, _openai_code),
    (
        ("api key", "bearer token", "x-api-key", "oauth token", "authenticate", "401", "/login"),
        _AUTH,
        _TEXT,
        _auth_text,
    ),
    (("root/sudo", "trusted directory", "unexpected argument", "unknown option"), _CLI_REFUSED, _TEXT,
     _cli_refused),
    (("missing environment variable",), _MISSING_KEY, _TEXT, _missing_key),
    (("unable to connect", "connection error", "connection refused"), _UNREACHABLE, _TEXT, _unreachable),
    (("rate limit",), _CLAUDE_API_RATE_LIMIT, _TEXT, _claude_api_rate_limit),
    (("in organization",), _OPENAI_RATE_LIMIT, _TEXT, _openai_rate_limit),
    (
        ("速率限制", "访问量过大", "high concurrency", "rate limit reached for requests"),
        _GLM_TRANSIENT,
        _TEXT,
        _glm_transient_text,
    ),
    (("429", "529", "overloaded"), _HTTP_STATUS, _TEXT, _http_status),
]
_TRIGGER_WORDS = tuple(sorted({word for words, *_ in _RULES for word in words}))


def _classify_line(line: str, lowered: str, following: str, now: float) -> Verdict | None:
    """The strongest provider message on one line (billing, quota, auth, then transient), if any."""
    best: Verdict | None = None
    for words, pattern, anchor, handler in _RULES:
        if not any(word in lowered for word in words):
            continue
        for count, match in enumerate(pattern.finditer(line)):
            if count == _MAX_MATCHES_PER_LINE:
                break
            if anchor == _TEXT and not _starts_message(line, match.start()):
                continue
            if anchor == _BODY and not _in_error_body(line, match):
                continue
            text = (line if anchor != _TEXT else line[match.start() :]) + " " + following
            verdict = handler(match, text, now)
            if verdict is not None and (best is None or _RANK[verdict.kind] > _RANK[best.kind]):
                best = verdict
            if verdict is not None:
                break
    return best
