"""The rate-limit classifier against the providers' real messages (PROVIDER_MESSAGES.md), variants, and traps."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from dispatch.runner.ratelimits import (
    BILLING_BLOCK_SECONDS,
    MIN_COOLDOWN_SECONDS,
    TRANSIENT_COOLDOWN_SECONDS,
    Verdict,
    classify,
    cooldown_until,
    retry_notice,
)

NOW = datetime(2026, 5, 15, 12, 0, tzinfo=UTC).timestamp()  # a Friday, 12:00 UTC
FIVE_HOURS = 5 * 3600


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def local(*parts: int) -> float:
    return datetime(*parts).timestamp()  # naive: the machine's local time, as Codex means it


ANTHROPIC_429 = (
    '429 {"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your '
    "account's rate limit. Please try again later.\"}}"
)
MINIMAX = (
    'API Error: 429 {"type":"error","error":{"type":"rate_limit_error","message":"usage limit exceeded, '
    '5-hour usage limit reached for Token Plan Starter (0/0 used), resets at 2026-05-15T15:00:00Z (2056)"}}'
)
GLM_1308 = (
    'API Error: 429 {"error":{"code":"1308","message":"已达到 5 小时的使用上限。'
    '您的限额将在 2026-08-25 07:41:44 重置。"},"request_id":"20260824fake"}'
)
CODEX_RELATIVE = (
    "■ You've hit your usage limit. Upgrade to Pro (https://openai.com/chatgpt/pricing) or try again in "
    "5 days 22 hours 11 minutes."
)
OPENAI_TPM = (
    "Rate limit reached for o4-mini in organization org-abc123 on tokens per min (TPM): Limit 200000, "
    "Used 199410, Requested 3786. Please try again in 1.574s."
)

# (id, output, exit code, kind, reset_at, retry_after); reset_at None means "not checked here".
QUOTA_CASES = [
    ("claude_epoch", "Claude AI usage limit reached|1767225600", 1, utc("2026-01-01T00:00:00")),
    ("claude_epoch_in_milliseconds", "Claude AI usage limit reached|1767225600000", 1, utc("2026-01-01T00:00:00")),
    (
        "claude_reset_at_3pm_bogota",
        "Claude usage limit reached. Your limit will reset at 3pm (America/Bogota).",
        1,
        utc("2026-05-15T20:00:00"),
    ),
    (
        "claude_reset_wrapped_onto_next_line",
        "Claude usage limit reached. Your limit will reset at 10am \n     (America/Lima).",
        1,
        utc("2026-05-15T15:00:00"),
    ),
    ("claude_hit_limit_dhaka", "You've hit your limit · resets 1:30am (Asia/Dhaka)", 1, utc("2026-05-15T19:30:00")),
    (
        "claude_session_limit_new_york_exit_1",
        "You've hit your session limit · resets 8pm (America/New_York)",
        1,
        utc("2026-05-16T00:00:00"),
    ),
    (
        "claude_out_of_extra_usage_colombo",
        "You're out of extra usage · resets 11:30am (Asia/Colombo)",
        1,
        utc("2026-05-16T06:00:00"),
    ),
    ("claude_curly_apostrophe", "You’ve hit your limit · resets 12am (Europe/London)", 1, utc("2026-05-15T23:00:00")),
    ("claude_noon_tokyo", "You've hit your limit · resets 12pm (Asia/Tokyo)", 1, utc("2026-05-16T03:00:00")),
    (
        "claude_weekly_with_date",
        "You've hit your weekly limit · resets Jul 31, 2am (UTC)",
        1,
        utc("2026-07-31T02:00:00"),
    ),
    (
        "claude_with_date_and_at",
        "You've hit your limit · resets May 20 at 9am (Europe/Berlin)",
        1,
        utc("2026-05-20T07:00:00"),
    ),
    (
        "claude_weekly_limit_reached_tree_glyph",
        "  ⎿  Weekly limit reached · resets 10am (Asia/Seoul) · /upgrade to Max or turn on /extra-usage",
        1,
        utc("2026-05-16T01:00:00"),
    ),
    (
        "claude_5_hour_limit_reached",
        "5-hour limit reached · resets 2pm (Pacific/Auckland) · /upgrade to Max 20x or turn on /extra-usage",
        1,
        utc("2026-05-16T02:00:00"),
    ),
    (
        "claude_reset_right_now_means_tomorrow",
        "You've hit your limit · resets 12pm (UTC)",
        1,
        utc("2026-05-16T12:00:00"),
    ),
    (
        "claude_result_json_exit_0",
        '{"type":"result","subtype":"success","is_error":true,"result":"You\'ve hit your limit · resets 4pm (UTC)"}',
        0,
        utc("2026-05-15T16:00:00"),
    ),
    (
        "stream_json_rate_limit_event_rejected",
        '{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1778565600,'
        '"rateLimitType":"five_hour","overageStatus":"rejected"}}',
        1,
        1778565600.0,
    ),
    (
        "stream_json_rate_limit_event_spliced_mid_line",
        'partial assistant text{"type":"rate_limit_event","rate_limit_info":{"status":"rejected",'
        '"resetsAt":1778565600,"rateLimitType":"seven_day"}}',
        1,
        1778565600.0,
    ),
    ("codex_relative_days_hours_minutes", CODEX_RELATIVE, 1, utc("2026-05-21T10:11:00")),
    (
        "codex_relative_wrapped",
        CODEX_RELATIVE.replace(" 11 minutes.", " 11\nminutes."),
        1,
        utc("2026-05-21T10:11:00"),
    ),
    (
        "codex_relative_hours_only",
        "ERROR: You've hit your usage limit. Try again in 3 hours 5 minutes.",
        1,
        utc("2026-05-15T15:05:00"),
    ),
    (
        "codex_absolute_local_time",
        "You've hit your usage limit. Upgrade to Plus, or try again at Jul 5th, 2026 8:19 PM.",
        1,
        local(2026, 7, 5, 20, 19),
    ),
    (
        "codex_absolute_other_date",
        "[2026-05-15T12:00:00] ERROR: You've hit your usage limit. Visit the settings, or try again at "
        "Jan 2nd, 2027 9:05 AM.",
        1,
        local(2027, 1, 2, 9, 5),
    ),
    (
        "codex_remote_compact_task",
        "Error running remote compact task: You've hit your usage limit. Try again in 2 hours 0 minutes.",
        1,
        utc("2026-05-15T14:00:00"),
    ),
    (
        "codex_usage_limit_reached_json_resets_at",
        'ERROR: unexpected status 429 Too Many Requests: {"error":{"type":"usage_limit_reached",'
        '"message":"The usage limit has been reached","resets_at":1767225600,"resets_in_seconds":3600}}',
        1,
        1767225600.0,
    ),
    (
        "codex_usage_limit_reached_json_resets_in_seconds",
        '{"type":"error","error":{"type":"usage_limit_reached","resets_in_seconds":3600}}',
        1,
        NOW + 3600,
    ),
    ("glm_1308_chinese_china_time", GLM_1308, 1, utc("2026-08-24T23:41:44")),
    (
        "glm_1308_english",
        '{"error":{"code":"1308","message":"Usage limit reached for 5 hour. Your limit will reset at '
        '2026-09-09 05:38:28"}}',
        1,
        utc("2026-09-08T21:38:28"),
    ),
    (
        "glm_1308_wrapped_by_terminal",
        'HttpError: Invalid status code 429 Too Many Requests with message: {"error":{"code":"1308",'
        '"message":"已达到 5\n小时的使用上限。您的限额将在 2026-08-25 07:41:44 重置。"}}',
        1,
        utc("2026-08-24T23:41:44"),
    ),
    (
        "glm_1310_weekly_utc",
        'API Error: 429 {"error":{"code":"1310","message":"Weekly/Monthly Limit Exhausted. Your limit will '
        'reset at 2026-05-18T00:00:00Z"}}',
        1,
        utc("2026-05-18T00:00:00"),
    ),
    ("minimax_5_hour_utc", MINIMAX, 1, utc("2026-05-15T15:00:00")),
    (
        "minimax_other_plan_and_offset",
        MINIMAX.replace("Token Plan Starter", "Token Plan Max").replace(
            "2026-05-15T15:00:00Z", "2026-05-16T08:00:00+08:00"
        ),
        1,
        utc("2026-05-16T00:00:00"),
    ),
    (
        "minimax_plain_error_line",
        "📝 Error: HTTP 429: usage limit exceeded, weekly usage limit reached for Token Plan Plus (10/10 used), "
        "resets at 2026-05-18T00:00:00Z (2056)",
        1,
        utc("2026-05-18T00:00:00"),
    ),
]


@pytest.mark.parametrize(
    ("output", "exit_code", "reset_at"), [c[1:] for c in QUOTA_CASES], ids=[c[0] for c in QUOTA_CASES]
)
def test_quota_messages_give_quota_with_the_parsed_reset_time(output: str, exit_code: int, reset_at: float) -> None:
    verdict = classify(output, exit_code, now=NOW)
    assert verdict.kind == "quota", verdict
    assert verdict.reset_at == pytest.approx(reset_at)
    assert verdict.matched


TRANSIENT_CASES = [
    ("claude_api_rate_limit_exit_1", "API Error: Rate limit reached", 1, None),
    ("claude_api_rate_limit_tree_glyph", "❯ logout\n  ⎿  API Error: Rate limit reached", 1, None),
    (
        "claude_api_rate_limit_json_success_is_error",
        '{"type":"result","subtype":"success","is_error":true,"result":"API Error: Rate limit reached"}',
        0,
        None,
    ),
    (
        "claude_request_rejected_429",
        "API Error: Request rejected (429) · Rate limited. Please try again later.",
        1,
        None,
    ),
    ("anthropic_429_body", ANTHROPIC_429, 1, None),
    ("anthropic_429_body_after_api_error", "API Error: " + ANTHROPIC_429, 1, None),
    (
        "anthropic_429_escaped_inside_stream_json_result",
        '{"type":"result","is_error":true,"result":"API Error: 429 {\\"type\\":\\"error\\",\\"error\\":'
        '{\\"type\\":\\"rate_limit_error\\",\\"message\\":\\"Please try again later.\\"}}"}',
        1,
        None,
    ),
    ("openai_tpm_seconds", "ERROR: " + OPENAI_TPM, 1, 1.574),
    ("openai_rpm_milliseconds", OPENAI_TPM.replace("(TPM)", "(RPM)").replace("1.574s", "20ms"), 1, 0.02),
    ("openai_minutes_and_seconds", OPENAI_TPM.replace("1.574s", "6m0s"), 1, 360.0),
    ("codex_retry_limit_exceeded", "stream error: exceeded retry limit, last status: 429 Too Many Requests", 1, None),
    (
        "glm_1302_english",
        'API Error: 429 {"error":{"code":"1302","message":"Rate limit reached for requests"},"request_id":"x"}',
        1,
        None,
    ),
    (
        "glm_1302_chinese",
        'API Error: 429 {"error":{"code":"1302","message":"您的账户已达到速率限制，请您控制请求频率"}}',
        1,
        None,
    ),
    (
        "glm_1302_concurrency",
        '{"error":{"code":"1302","message":"High concurrency usage of this API, please reduce concurrency or '
        'contact customer service to increase limits"}}',
        1,
        None,
    ),
    (
        "glm_1305_overloaded",
        'API Error: 429 {"error":{"code":"1305","message":"该模型当前访问量过大，请您稍后再试"},"request_id":"x"}',
        1,
        None,
    ),
    (
        "overloaded_529_body",
        'API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        1,
        None,
    ),
    ("overloaded_repeated_529", "API Error: Repeated 529 Overloaded errors", 1, None),
]


@pytest.mark.parametrize(
    ("output", "exit_code", "retry_after"), [c[1:] for c in TRANSIENT_CASES], ids=[c[0] for c in TRANSIENT_CASES]
)
def test_transient_limits_are_transient_whatever_the_exit_code(
    output: str, exit_code: int, retry_after: float | None
) -> None:
    verdict = classify(output, exit_code, now=NOW)
    assert verdict.kind == "transient", verdict
    assert verdict.reset_at is None
    assert verdict.retry_after == (pytest.approx(retry_after) if retry_after is not None else None)


def test_glm_1302_is_never_a_five_hour_cooldown() -> None:
    verdict = classify('API Error: 429 {"error":{"code":"1302","message":"Rate limit reached for requests"}}', 1)
    assert verdict.kind == "transient"
    assert "1302" in verdict.reason
    assert cooldown_until(verdict, NOW) == NOW + TRANSIENT_COOLDOWN_SECONDS  # seconds, not 5 hours


def test_glm_1308_reason_names_the_five_hour_cap() -> None:
    assert classify(GLM_1308, 1, now=NOW).reason == "GLM 1308: 5-hour cap"


AUTH_CASES = [
    (
        "anthropic_authentication_error",
        'API Error: 401 {"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}',
    ),
    ("claude_invalid_api_key", "Invalid API key · Please run /login"),
    (
        "claude_invalid_bearer_token",
        'API Error: 401 {"type":"error","error":{"type":"authentication_error","message":"Invalid bearer token"}}',
    ),
    ("claude_oauth_expired", "API Error: 401 OAuth token has expired. Please obtain a new token or refresh it."),
    ("codex_unexpected_status_401", "ERROR: unexpected status 401 Unauthorized: Missing bearer authentication"),
    (
        "openai_invalid_api_key_code",
        '{"error":{"message":"Incorrect API key provided: sk-abc***xyz","code":"invalid_api_key"}}',
    ),
    ("glm_401", 'API Error: 401 {"error":{"code":"1000","message":"身份验证失败。"}}'),
]


@pytest.mark.parametrize("output", [c[1] for c in AUTH_CASES], ids=[c[0] for c in AUTH_CASES])
def test_authentication_failures_are_auth_not_limits(output: str) -> None:
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "auth", verdict
    assert verdict.reset_at is None and verdict.retry_after is None
    assert cooldown_until(verdict, NOW) is None


TRAPS = [
    ("pytest_assertion", "tests/test_api.py::test_rate_limit PASSED\n    assert resp.status == 429\n1 passed"),
    ("code_defining_check_quota", "def check_quota():\n    raise QuotaExceeded('quota exceeded')"),
    ("users_app_log_429_retrying", "2026-05-15 12:00:00 INFO HTTP 429 handled, retrying"),
    ("users_app_log_401", "GET /api/me 401 Unauthorized (3 ms)"),
    ("prose_about_rate_limits", "I added a rate limit of 100 requests per minute and a quota check."),
    ("prose_naming_a_message", "Summary: You've hit your limit · resets 3pm (UTC) is now shown to users."),
    ("python_tuple_quoting_message", '    ("You\'ve hit your limit · resets 1:30am (Asia/Dhaka)", "quota"),'),
    ("python_call_quoting_message", '        assert classify("API Error: Rate limit reached", 0).kind == "transient"'),
    ("python_string_with_error_body", 'body = \'{"type":"error","error":{"type":"rate_limit_error"}}\''),
    ("markdown_table_row", "| `Claude AI usage limit reached\\|1767225600` | quota | older `-p` output |"),
    (
        "diff_line_quoting_message",
        '+    "usage limit exceeded, 5-hour usage limit reached, resets at 2026-05-15T15:00:00Z",',
    ),
    ("users_json_with_code_1308", '{"code": 1308, "name": "widget", "quota": 429}'),
    (
        "escaped_test_code_inside_stream_json_tool_result",
        '{"type":"user","message":{"content":[{"type":"tool_result","content":"E   assert '
        '{\\"type\\":\\"rate_limit_error\\"} == body\\nYou\'ve hit your limit · resets 3pm (UTC)"}]}}',
    ),
    (
        "rate_limit_event_allowed_is_information",
        '{"type":"rate_limit_event","rate_limit_info":{"status":"allowed","resetsAt":1778565600,"rateLimitType":"five_hour"}}',
    ),
    (
        "rate_limit_event_allowed_warning_is_information",
        '{"type":"rate_limit_event","rate_limit_info":{"status":"allowed_warning","resetsAt":1778565600}}',
    ),
    (
        "cli_retrying_by_itself",
        "API Error (429 " + ANTHROPIC_429[4:] + ") · Retrying in 5 seconds… (attempt 1/10)\nDone.",
    ),
    (
        "jsonl_fixture_quoting_an_error_body",
        '{"id": "glm_1113", "text": "API Error: 429 {\\"error\\":{\\"code\\":\\"1113\\",'
        '\\"message\\":\\"余额不足\\"}}"}',
    ),
    ("json_fixture_message_value", '{"id": "case-8", "message": "usage limit exceeded, 5-hour usage limit reached"}'),
    (
        "python_dict_quoting_a_rate_limit_event",
        '        {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1778565600}},',
    ),
    ("app_log_insufficient_balance", "2026-05-15 12:00:06 ERROR payment webhook: insufficient balance on card 4242"),
    ("codex_reconnecting", "⚠ stream error: exceeded retry limit, last status: 429; retrying 1/5 in 206ms…\nDone."),
]


@pytest.mark.parametrize("output", [c[1] for c in TRAPS], ids=[c[0] for c in TRAPS])
def test_ordinary_output_mentioning_limits_is_not_a_limit(output: str) -> None:
    assert classify(output, 0, now=NOW).kind == "ok"
    assert classify(output, 1, now=NOW).kind == "failure"


def test_exit_code_decides_when_there_is_no_limit_message() -> None:
    assert classify("all tests passed", 0) == Verdict("ok", "exit code 0")
    assert classify("Traceback (most recent call last):", 2).kind == "failure"
    assert "exit code 2" in classify("boom", 2).reason
    assert classify("", None).kind == "failure"


def test_ansi_colour_codes_do_not_hide_a_message() -> None:
    output = "\x1b[2K\x1b[1G\x1b[31m\x1b[1mYou've hit your limit\x1b[22m · resets 3pm (America/Bogota)\x1b[0m\r\n"
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == utc("2026-05-15T20:00:00")
    assert "\x1b" not in verdict.matched


def test_message_at_the_end_of_megabytes_of_output_is_found_quickly() -> None:
    noise = "src/module.py:12: checking rate limit and quota for 429 handling\n" * 80_000
    output = noise + CODEX_RELATIVE + "\n"
    started = time.perf_counter()
    verdict = classify(output, 1, now=NOW)
    elapsed = time.perf_counter() - started
    assert len(output) > 5_000_000
    assert verdict.kind == "quota"
    assert elapsed < 2.0  # generous for loaded CI; reading all 5 MB line by line would take far longer


def test_message_in_the_first_kilobytes_of_long_output_is_ignored() -> None:
    output = "API Error: Rate limit reached\n" + "x = 1\n" * 200_000
    assert classify(output, 1, now=NOW).kind == "failure"


def test_message_in_the_unread_middle_of_long_output_is_ignored() -> None:
    output = "x = 1\n" * 10_000 + "API Error: Rate limit reached\n" + "x = 1\n" * 20_000
    assert classify(output, 0, now=NOW).kind == "ok"


def test_later_transient_wins_over_earlier_quota() -> None:
    output = "You've hit your limit · resets 3pm (UTC)\nworking...\nAPI Error: Rate limit reached\n"
    assert classify(output, 1, now=NOW).kind == "transient"


def test_later_quota_wins_over_earlier_transient() -> None:
    output = ANTHROPIC_429 + "\nretrying the turn\n" + "You've hit your session limit · resets 8pm (America/New_York)\n"
    assert classify(output, 1, now=NOW).kind == "quota"


def test_provider_quota_inside_a_generic_rate_limit_body_is_quota() -> None:
    verdict = classify(MINIMAX, 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reason.startswith("MiniMax")


def test_allowed_rate_limit_event_after_a_quota_does_not_hide_it() -> None:
    output = (
        "Claude AI usage limit reached|1767225600\n"
        '{"type":"rate_limit_event","rate_limit_info":{"status":"allowed","resetsAt":1778565600}}\n'
    )
    assert classify(output, 1, now=NOW).reset_at == 1767225600.0


def test_stream_json_error_result_carries_the_message() -> None:
    output = (
        '{"type":"system","subtype":"init","session_id":"abc"}\n'
        '{"type":"assistant","message":{"content":[{"type":"text","text":"You\'ve hit your limit · '
        'resets 2pm (Asia/Shanghai)"}]}}\n'
        '{"type":"result","subtype":"success","is_error":true,"result":"You\'ve hit your limit · '
        'resets 2pm (Asia/Shanghai)"}\n'
    )
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == utc("2026-05-16T06:00:00")


def test_final_quota_without_reset_takes_the_reset_an_earlier_message_gave() -> None:
    output = (
        '{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1778565600}}\n'
        '{"type":"result","subtype":"success","is_error":true,"result":"You\'ve hit your limit"}\n'
    )
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == 1778565600.0
    assert verdict.matched == "You've hit your limit"


def test_api_rate_limit_with_a_reset_time_is_quota() -> None:
    verdict = classify("API Error: Rate limit reached · resets 9pm (UTC)", 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == utc("2026-05-15T21:00:00")


def test_unknown_time_zone_falls_back_to_five_hours_and_says_so() -> None:
    verdict = classify("You've hit your limit · resets 3pm (Mars/Olympus_Mons)", 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == NOW + FIVE_HOURS
    assert "Mars/Olympus_Mons" in verdict.reason and "5 h" in verdict.reason


def test_quota_without_a_reset_time_assumes_five_hours() -> None:
    verdict = classify("You've hit your usage limit. Upgrade to Pro to continue.", 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == NOW + FIVE_HOURS
    assert "5 h" in verdict.reason


def test_localised_codex_date_falls_back_to_five_hours() -> None:
    output = "You've hit your usage limit. Upgrade your plan to continue, or try again at 10 de jul. de 2026, 11:52."
    assert classify(output, 1, now=NOW).reset_at == NOW + FIVE_HOURS


def test_utc_offset_zone_is_understood() -> None:
    verdict = classify("You've hit your limit · resets 9pm (UTC+8)", 1, now=NOW)
    assert verdict.reset_at == utc("2026-05-15T13:00:00")  # 21:00 at UTC+8 is 13:00 UTC


def test_reset_date_already_past_rolls_to_next_year() -> None:
    verdict = classify("You've hit your limit · resets Apr 23 at 3pm (America/New_York)", 1, now=NOW)
    assert verdict.reset_at == utc("2027-04-23T19:00:00")


def test_now_defaults_to_the_current_time() -> None:
    verdict = classify("You've hit your usage limit. Try again in 2 hours 0 minutes.", 1)
    assert verdict.reset_at == pytest.approx(time.time() + 7200, abs=5)


def test_matched_line_is_truncated_and_secrets_are_redacted() -> None:
    key = "sk-proj-" + "A1b2C3d4" * 6
    output = f"ERROR: unexpected status 401 Unauthorized: Incorrect API key provided: {key}" + " pad" * 100
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "auth"
    assert len(verdict.matched) <= 200
    assert key not in verdict.matched and "sk-proj-A1b2" not in verdict.matched
    assert key not in verdict.reason


def test_cooldown_lasts_until_the_quota_resets() -> None:
    verdict = classify("You've hit your limit · resets 3pm (America/Bogota)", 1, now=NOW)
    assert cooldown_until(verdict, NOW) == utc("2026-05-15T20:00:00")


def test_cooldown_is_at_least_the_minimum_when_the_reset_has_passed() -> None:
    verdict = classify("Claude AI usage limit reached|1767225600", 1, now=NOW)
    assert verdict.reset_at is not None and verdict.reset_at < NOW  # the message's reset lies in the past
    assert cooldown_until(verdict, NOW) == NOW + MIN_COOLDOWN_SECONDS


def test_a_transient_limit_cools_for_its_retry_after_at_least_a_short_floor_and_failures_not_at_all() -> None:
    assert cooldown_until(classify(OPENAI_TPM, 1, now=NOW), NOW) == NOW + TRANSIENT_COOLDOWN_SECONDS  # 1.574 s
    assert cooldown_until(Verdict("transient", "429", retry_after=90), NOW) == NOW + 90
    assert cooldown_until(Verdict("transient", "429", retry_after=10**9), NOW) <= NOW + 3600
    assert cooldown_until(classify("boom", 1, now=NOW), NOW) is None
    assert cooldown_until(Verdict("config", "unknown flag"), NOW) is None


def test_missing_reset_still_gives_at_least_the_minimum_cooldown() -> None:
    assert cooldown_until(Verdict("quota", "no reset given"), NOW) >= NOW + MIN_COOLDOWN_SECONDS
    assert cooldown_until(Verdict("quota", "reset long past", reset_at=NOW - 86400), NOW) == NOW + MIN_COOLDOWN_SECONDS


# -- a successful run is never reclassified; only the final error region of free text is read --------------


def stream(*events: dict) -> str:
    import json

    return "\n".join(json.dumps(e, ensure_ascii=False) for e in events) + "\n"


def result(text: str, *, is_error: bool, subtype: str = "success") -> dict:
    return {"type": "result", "subtype": subtype, "is_error": is_error, "result": text, "session_id": "s"}


def assistant(text: str) -> dict:
    return {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}


def test_successful_free_text_run_whose_summary_quotes_a_limit_is_ok() -> None:
    summary = "Done. Changes:\n- parse the reset of\n- You've hit your limit · resets 1:30am (Asia/Dhaka)\n"
    assert classify(summary, 0, now=NOW).kind == "ok"


def test_free_text_api_rate_limit_with_exit_0_is_ok() -> None:
    """Free text cannot tell Claude's exit-0 "API Error: Rate limit reached" from a summary that quotes it: the
    built-in models read stream-json instead, where `is_error` tells."""
    assert classify("API Error: Rate limit reached", 0, now=NOW).kind == "ok"


def test_stream_json_success_is_ok_whatever_the_agent_wrote() -> None:
    quote = "You've hit your limit · resets 1:30am (Asia/Dhaka)"
    output = stream(
        {"type": "system", "subtype": "init", "session_id": "s"},
        assistant(quote),
        {"type": "user", "message": {"content": [{"type": "tool_result", "content": "API Error: Rate limit reached"}]}},
        result(f"Done.\n- {quote}\nAPI Error: Rate limit reached", is_error=False),
    )
    assert classify(output, 0, now=NOW).kind == "ok"


def test_stream_json_is_error_with_exit_0_is_caught() -> None:
    output = stream(assistant("working"), result("API Error: Rate limit reached", is_error=True))
    verdict = classify(output, 0, now=NOW)
    assert verdict.kind == "transient"
    assert "API Error: Rate limit reached" in verdict.matched


def test_stream_json_is_error_without_a_provider_message_is_a_failure_even_with_exit_0() -> None:
    output = stream(result("", is_error=True, subtype="error_max_turns"))
    verdict = classify(output, 0, now=NOW)
    assert verdict.kind == "failure"
    assert "error_max_turns" in verdict.reason


def test_stream_json_assistant_text_quoting_a_limit_does_not_decide_a_failed_run() -> None:
    output = stream(assistant("You've hit your limit · resets 2pm (Asia/Shanghai)"), result("boom", is_error=True))
    assert classify(output, 1, now=NOW).kind == "failure"


def test_stream_json_killed_after_a_rejected_rate_limit_event_is_quota() -> None:
    output = stream(
        {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1778565600}},
        assistant("waiting"),
    )
    assert classify(output, None, now=NOW).reset_at == 1778565600.0


def test_message_before_the_final_region_is_ignored() -> None:
    steps = "".join(f"step {n}: ok\n" for n in range(30))
    output = "API Error: Rate limit reached\n" + steps + "error: 3 tests failed\n"
    assert classify(output, 1, now=NOW).kind == "failure"


def test_message_in_the_final_region_after_the_agent_stopped_is_found() -> None:
    output = "".join(f"step {n}: ok\n" for n in range(300)) + "API Error: Rate limit reached\n"
    assert classify(output, 1, now=NOW).kind == "transient"


def codex(*events: dict) -> str:
    return stream({"type": "thread.started", "thread_id": "t"}, {"type": "turn.started"}, *events)


def test_codex_json_turn_failed_with_usage_limit_is_quota() -> None:
    output = codex(
        {"type": "error", "message": CODEX_RELATIVE}, {"type": "turn.failed", "error": {"message": CODEX_RELATIVE}}
    )
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "quota"
    assert verdict.reset_at == utc("2026-05-21T10:11:00")


def test_codex_json_completed_turn_is_ok_whatever_the_items_say() -> None:
    output = codex(
        {"type": "item.completed", "item": {"id": "i0", "type": "agent_message", "text": CODEX_RELATIVE}},
        {"type": "item.completed", "item": {"id": "i1", "type": "command_execution", "command": "pytest",
                                             "aggregated_output": OPENAI_TPM, "exit_code": 1, "status": "failed"}},
        {"type": "turn.completed", "usage": {"input_tokens": 1, "cached_input_tokens": 0, "output_tokens": 1}},
    )
    assert classify(output, 0, now=NOW).kind == "ok"


def test_codex_json_failed_command_output_is_not_a_limit() -> None:
    output = codex(
        {"type": "item.completed", "item": {"id": "i1", "type": "command_execution", "command": "pytest",
                                             "aggregated_output": CODEX_RELATIVE, "exit_code": 1, "status": "failed"}},
        {"type": "turn.failed", "error": {"message": "stream disconnected before completion"}},
    )
    assert classify(output, 1, now=NOW).kind == "failure"


# -- billing: next model now, a block a person clears -------------------------------------------------------

BILLING_CASES = [
    ("codex_quota_exceeded", "ERROR: Quota exceeded. Check your plan and billing details."),
    (
        "codex_json_quota_exceeded",
        codex({"type": "turn.failed", "error": {"message": "Quota exceeded. Check your plan and billing details."}}),
    ),
    (
        "openai_insufficient_quota",
        'ERROR: unexpected status 429 Too Many Requests: {"error":{"message":"You exceeded your current quota, please '
        'check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}',
    ),
    (
        "glm_1113_arrears",
        'API Error: 429 {"error":{"code":"1113","message":"Your account is in arrears, please recharge and try '
        'again"}}',
    ),
    ("glm_1113_chinese", 'API Error: 429 {"error":{"code":"1113","message":"您的账户已欠费，请充值后重试"}}'),
    ("glm_1112_locked", 'API Error: 429 {"error":{"code":"1112","message":"Your account has been locked"}}'),
    (
        "glm_1113_in_stream_json_result",
        stream(result('API Error: 429 {"error":{"code":"1113","message":"余额不足或无可用资源包,请充值。"}}',
                      is_error=True)),
    ),
    (
        "minimax_base_resp_1008",
        'API Error: 400 {"base_resp":{"status_code":1008,"status_msg":"insufficient balance"}}',
    ),
    (
        "anthropic_credit_balance",
        'API Error: 400 {"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too '
        'low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}',
    ),
]


@pytest.mark.parametrize("output", [c[1] for c in BILLING_CASES], ids=[c[0] for c in BILLING_CASES])
def test_billing_and_balance_errors_are_billing(output: str) -> None:
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "billing", verdict
    assert cooldown_until(verdict, NOW) == NOW + BILLING_BLOCK_SECONDS


@pytest.mark.parametrize("code", ["1000", "1001", "1002", "1003", "1004"])
def test_glm_authentication_codes_are_auth_not_billing(code: str) -> None:
    output = f'API Error: 401 {{"error":{{"code":"{code}","message":"Authentication Token expired"}}}}'
    assert classify(output, 1, now=NOW).kind == "auth"


@pytest.mark.parametrize(
    ("code", "kind"), [("1002", "transient"), ("1004", "auth"), ("1008", "billing"), ("2049", "auth")]
)
def test_minimax_base_resp_codes(code: str, kind: str) -> None:
    output = f'API Error: 400 {{"id":"x","base_resp":{{"status_code":{code},"status_msg":"msg"}}}}'
    assert classify(output, 1, now=NOW).kind == kind


# --- what the real CLIs print (AGENT_CLIS.md): Claude Code's "API Error: Request rejected (429) · <message>" ---

REJECTED = "API Error: Request rejected (429) · "
GLM_1308_EN = "Usage limit reached for 5 hour. Your limit will reset at 2026-05-15 20:00:00"


def _claude_error(text: str) -> str:
    """Claude Code's stream-json output of a run that ended on an API error."""
    return "\n".join(json.dumps(event, ensure_ascii=False) for event in (
        {"type": "system", "subtype": "init", "session_id": "s", "tools": []},
        {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}},
        {"type": "result", "subtype": "success", "is_error": True, "result": text, "total_cost_usd": 0},
    )) + "\n"


@pytest.mark.parametrize(("message", "kind", "reset_at"), [
    ("已达到 5 小时的使用上限。您的限额将在 2026-05-15 23:00:00 重置。", "quota", utc("2026-05-15T15:00:00")),
    (GLM_1308_EN, "quota", utc("2026-05-15T12:00:00")),
    ("usage limit exceeded, 5-hour usage limit reached for Token Plan Starter (0/0 used), resets at "
     "2026-05-15T15:00:00Z (2056)", "quota", utc("2026-05-15T15:00:00")),
    ("您的账户已欠费，请充值后重试。", "billing", None),
    ("Insufficient balance or no resource package. Please recharge.", "billing", None),
    ("余额不足或无可用资源包,请充值。", "billing", None),
    ("Rate limit reached for requests", "transient", None),
    ("This request would exceed your account's rate limit. Please try again later.", "transient", None),
])
@pytest.mark.parametrize("form", ["text", "stream-json"])
def test_a_providers_message_behind_claude_codes_request_rejected_label_decides(
        message: str, kind: str, reset_at: float | None, form: str) -> None:
    text = REJECTED + message
    output = _claude_error(text) if form == "stream-json" else "\n".join(["Working...", text])
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == kind, verdict
    if reset_at is not None:
        assert verdict.reset_at == reset_at


def test_the_request_rejected_label_in_an_agents_own_output_is_not_a_limit() -> None:
    quoted = f'print("{REJECTED}已达到 5 小时的使用上限")'
    assert classify(_claude_error("x").replace('"is_error": true', '"is_error": false'), 0).kind == "ok"
    assert classify(f"Running tests\n{quoted}\nTraceback: boom", 1, now=NOW).kind == "failure"
    ok = json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": REJECTED + GLM_1308_EN})
    assert classify(ok, 0, now=NOW).kind == "ok"  # the agent summarised a log: its run finished


@pytest.mark.parametrize("form", ["text", "stream-json"])
def test_a_refused_connection_is_a_reason_to_move_on(form: str) -> None:
    text = "API Error: Unable to connect to API (ConnectionRefused)"
    verdict = classify(_claude_error(text) if form == "stream-json" else text, 1, now=NOW)
    assert verdict.kind == "transient" and "ConnectionRefused" in verdict.reason and "unreachable" in verdict.reason
    assert cooldown_until(verdict, NOW) == NOW + TRANSIENT_COOLDOWN_SECONDS


@pytest.mark.parametrize(("output", "fix"), [
    ("error: unexpected argument '--full-auto' found\n\n  tip: to pass '--full-auto' as a value, use "
     "'-- --full-auto'\n\nUsage: codex exec [OPTIONS] [PROMPT]\n\nFor more information, try '--help'.", "--full-auto"),
    ("Not inside a trusted directory and --skip-git-repo-check was not specified.", "--skip-git-repo-check"),
    ("--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons", "IS_SANDBOX=1"),
    ("error: unknown option '--bogus'", "--bogus"),
])
def test_a_cli_refusing_to_start_is_a_config_error_naming_the_fix(output: str, fix: str) -> None:
    verdict = classify(output, 1 if "--full-auto" not in output else 2, now=NOW)
    assert verdict.kind == "config" and fix in verdict.reason
    assert cooldown_until(verdict, NOW) is None


def test_codex_without_its_key_is_an_auth_error_naming_the_variable() -> None:
    output = ('{"type":"thread.started","thread_id":"t"}\n'
              '{"type":"error","message":"Missing environment variable: `OPENAI_API_KEY`."}\n')
    verdict = classify(output, 1, now=NOW)
    assert verdict.kind == "auth" and "OPENAI_API_KEY" in verdict.reason


def test_codex_json_error_events_carry_the_providers_answer() -> None:
    def run(message: str) -> str:
        return "\n".join(json.dumps(e) for e in (
            {"type": "thread.started", "thread_id": "t"}, {"type": "turn.started"},
            {"type": "error", "message": message}, {"type": "turn.failed", "error": {"message": message}})) + "\n"

    usage = ('unexpected status 429 Too Many Requests: {"error":{"type":"usage_limit_reached","message":"The usage '
             'limit has been reached","resets_in_seconds":3600}}')
    assert classify(run(usage), 1, now=NOW).kind == "quota"
    assert classify(run(usage), 1, now=NOW).reset_at == NOW + 3600
    quota = ('unexpected status 429 Too Many Requests: {"error":{"message":"You exceeded your current quota, please '
             'check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}')
    assert classify(run(quota), 1, now=NOW).kind == "billing"
    assert classify(run("unexpected status 429 Too Many Requests"), 1, now=NOW).kind == "transient"


@pytest.mark.parametrize(("line", "notice"), [
    ('{"type":"system","subtype":"api_retry","attempt":2,"max_retries":10,"retry_delay_ms":1000,'
     '"error_status":429,"error":"rate_limit"}', "429, retrying 2/10 in 1s"),
    ('{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"error_status":null,'
     '"error":"connection_error"}', "connection_error, retrying 1/10"),
    ('{"type":"error","message":"Reconnecting... 2/5 (stream disconnected before completion)"}',
     "reconnecting 2/5: stream disconnected before completion"),
    ("Reconnecting... waiting for network", "reconnecting: waiting for network"),
    ("  ⎿  API Error (429 rate limited) · Retrying in 5 seconds… (attempt 3/10)", "429, retrying 3/10"),
])
def test_a_clis_own_retry_lines_are_read_as_they_come(line: str, notice: str) -> None:
    assert retry_notice(line) == notice


@pytest.mark.parametrize("line", [
    '{"type":"item.completed","item":{"type":"agent_message","text":"Reconnecting... 1/5"}}',
    '{"type":"assistant","message":{"content":[{"type":"text","text":"the api_retry event"}]}}',
    "I am retrying the flaky test now", "def reconnect(): pass  # Reconnecting... 1/5",
])
def test_an_agent_talking_about_retries_is_not_a_retry(line: str) -> None:
    assert retry_notice(line) is None


def test_claude_code_2_1_332s_refused_connection_is_unreachable() -> None:
    text = "API Error: Connection refused — a firewall or proxy may be blocking it (ECONNREFUSED)"  # agent_facts
    verdict = classify(_claude_error(text), 1, now=NOW)
    assert verdict.kind == "transient" and "ECONNREFUSED" in verdict.reason


def test_codex_stopped_while_reconnecting_is_unreachable_or_what_its_retry_says() -> None:
    def stopped(message: str) -> str:  # codex 0.171 never exits on its own here: only these events, then a kill
        return "\n".join(json.dumps({"type": "error", "message": message}) for _ in range(3)) + "\n"

    waiting = "Reconnecting... waiting for network (Connection failed: error sending request)"
    verdict = classify(stopped(waiting), None, now=NOW)
    assert verdict.kind == "transient" and "unreachable" in verdict.reason
    limited = "Reconnecting... 1/5 (exceeded retry limit, last status: 429 Too Many Requests)"
    assert classify(stopped(limited), None, now=NOW).reason == "rate limited (429)"
    unauthorized = ("Reconnecting... 1/5 (unexpected status 401 Unauthorized: Incorrect API key provided: sk-abc***, "
                    "url: http://127.0.0.1:9/v1/responses)")
    assert classify(stopped(unauthorized), None, now=NOW).kind == "auth"
