"""Classify an agent run's output: finished, rate-limited, out of quota, misconfigured or failed.

Standard library only: this file is also copied to the nodes, which have nothing but ``python3``.

The classifier matches the providers' real message *shapes* (see ``PROVIDER_MESSAGES.md``), never a bare
"429", "quota" or "rate limit": agents print code and test output full of those words. A message counts
only where a CLI would put it: at the start of a line (after bullets, timestamps or an error label), at the
start of a JSON string value (``"result":"..."`` in ``--output-format json``), or as a JSON error body
that starts there. Lines where the CLI says it is retrying by itself are skipped. The last limit message in
the output wins.

Examples:
    >>> classify("API Error: Rate limit reached", 0).kind
    'transient'
    >>> classify("assert resp.status == 429", 0).kind
    'ok'
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
try:  # Python 3.9+; on an older node python3, named zones are unknown and fall back (see _zone)
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
except ImportError:  # pragma: no cover - exercised on nodes with python3.8
    ZoneInfo = None  # type: ignore[assignment,misc]
    ZoneInfoNotFoundError = KeyError  # type: ignore[assignment,misc]

__all__ = ["Verdict", "classify", "cooldown_until"]

_HEAD_CHARS = 8 * 1024
_TAIL_CHARS = 64 * 1024
_MATCHED_MAX = 200
_MAX_MATCHES_PER_LINE = 20
_DEFAULT_QUOTA_SECONDS = 5 * 3600
_MIN_QUOTA_COOLDOWN = 60.0
_CHINA = timezone(timedelta(hours=8))
_UTC = timezone.utc  # noqa: UP017 - nodes may run a Python older than 3.11 (3.9 at least, for zoneinfo)
_RANK = {"quota": 3, "auth": 2, "transient": 1}


@dataclass(frozen=True)
class Verdict:
    """What one agent run's output says about how it ended.

    Attributes:
        kind: "ok", "transient" (retry in seconds), "quota" (cool the model down until ``reset_at``),
            "auth" (the model is misconfigured: report it, do not retry) or "failure".
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
_JSON_KEY_BEFORE = re.compile(r'(?P<q>\\*)"[A-Za-z_][\w.-]{0,40}(?P=q)"\s*:\s*(?P=q)"$')  # ..."result":"

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
    """Decide how an agent run ended from its combined stdout and stderr.

    Only the first 8 KiB and the last 64 KiB are read. Provider limit messages win over the exit code
    (Claude Code prints "API Error: Rate limit reached" and exits 0); with none, exit code 0 is "ok" and
    anything else, or no exit code at all, is "failure".

    Args:
        output: the agent's combined stdout and stderr, any size.
        exit_code: its exit status, or None when it was killed or lost.
        now: the Unix time to resolve relative and wall-clock reset times against (default: now).

    Returns:
        The verdict; for "quota" ``reset_at`` is always set.

    Examples:
        >>> classify("Claude AI usage limit reached|1767225600", 1).reset_at
        1767225600.0
    """
    now = time.time() if now is None else now
    if len(output) > _HEAD_CHARS + _TAIL_CHARS:
        output = output[:_HEAD_CHARS] + "\n" + output[-_TAIL_CHARS:]
    if any(word in output.lower() for word in _TRIGGER_WORDS):
        lines = _ANSI.sub("", output).replace("\r", "\n").split("\n")
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
        if undated is not None:
            reason = f"{undated.reason}; assuming it resets in 5 h"
            return replace(undated, reason=reason, reset_at=now + _DEFAULT_QUOTA_SECONDS)
    if exit_code == 0:
        return Verdict("ok", "exit code 0, no limit message")
    if exit_code is None:
        return Verdict("failure", "no exit code (killed, timed out or lost)")
    return Verdict("failure", f"exit code {exit_code}")


def cooldown_until(verdict: Verdict, now: float) -> float | None:
    """When a model that produced this verdict may be used again.

    Args:
        verdict: the result of `classify`.
        now: the current Unix time.

    Returns:
        For "quota", its reset time, but at least a minute from ``now`` (a reset already passed still
        means the provider refused this run); None for every other kind: transient limits are retried
        after ``retry_after`` and auth errors are reported, neither cools the model down.
    """
    if verdict.kind != "quota":
        return None
    reset_at = verdict.reset_at if verdict.reset_at is not None else now + _DEFAULT_QUOTA_SECONDS
    return max(reset_at, now + _MIN_QUOTA_COOLDOWN)


# --- where a message may start -------------------------------------------------------------------------


def _plain(rest: str) -> bool:
    """Whether text before a message is decoration, a timestamp or an error label ("API Error: 429 ",
    "ERROR: ", "Error running remote compact task: "), not code or prose that mentions the message."""
    rest = rest[_LEAD.match(rest).end() :]  # type: ignore[union-attr]  # _LEAD matches the empty string
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
    return _JSON_KEY_BEFORE.search(prefix, max(0, quote - 100), quote + 1) is not None


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
    code = int(match.group("code"))
    if code == 1302:
        return _transient("GLM 1302: request rate limit", text)
    if code == 1305:
        return _transient("GLM 1305: model overloaded", text)
    if code == 1308:
        return _quota("GLM 1308: 5-hour cap", text, now, naive_zone=_CHINA)
    if code == 1310 or 1316 <= code <= 1321:
        return _quota(f"GLM {code}: usage cap", text, now, naive_zone=_CHINA)
    return None


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
    if match.group("code") == "invalid_api_key":
        return Verdict("auth", "invalid_api_key: check the model's API key")
    return _transient("OpenAI rate_limit_exceeded", text)


def _openai_rate_limit(match: re.Match[str], text: str, now: float) -> Verdict:
    unit = re.search(r"\((TPM|RPM|TPD|RPD|IPM)\)", text)
    return _transient(f"OpenAI rate limit ({unit.group(1) if unit else 'requests'})", text)


def _auth_text(match: re.Match[str], text: str, now: float) -> Verdict:
    said = match.group(0).strip()[:40]
    return Verdict("auth", f"authentication failed ({said}): check the model's API key or login")


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
_GLM_CODE_BODY = re.compile(  # {"error":{"code":"1308","message":...}}, the code a string
    _Q + r'error(?P=q)"\s*:\s*\{[^{}]*?(?P=q)"(?:code|type)(?P=q)"\s*:\s*(?P=q)"(?P<code>13\d\d)(?P=q)"'
)
_RATE_LIMIT_EVENT = re.compile(r'(?<!\\)"rate_limit_info"\s*:\s*\{(?P<info>[^{}]{0,2000})\}')
_ANTHROPIC_BODY = re.compile(
    _Q + r'type(?P=q)"\s*:\s*(?P=q)"(?P<etype>rate_limit_error|overloaded_error|authentication_error)(?P=q)"'
)
_OPENAI_CODE_BODY = re.compile(_Q + r'code(?P=q)"\s*:\s*(?P=q)"(?P<code>rate_limit_exceeded|invalid_api_key)(?P=q)"')
_AUTH = re.compile(
    r"invalid api key|incorrect api key provided|invalid bearer token|invalid x-api-key"
    r"|oauth token (?:has )?(?:expired|been revoked)|failed to authenticate|api error\s*:?\s*401\b"
    r"|unexpected status 401\b|not logged in\b.{0,20}/login|please run /login",
    re.I,
)
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
    (('"13',), _GLM_CODE_BODY, _BODY, _glm_code),
    (('"rate_limit_info"',), _RATE_LIMIT_EVENT, _ANYWHERE, _rate_limit_event),
    (("rate_limit_error", "overloaded_error", "authentication_error"), _ANTHROPIC_BODY, _BODY, _anthropic_body),
    (("rate_limit_exceeded", "invalid_api_key"), _OPENAI_CODE_BODY, _BODY, _openai_code),
    (
        ("api key", "bearer token", "x-api-key", "oauth token", "authenticate", "401", "/login"),
        _AUTH,
        _TEXT,
        _auth_text,
    ),
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
    """The strongest provider message on one line (quota, then auth, then transient), if any."""
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
