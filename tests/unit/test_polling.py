"""The one polling helper (dispatch/core/polling.py): bounded, prompt, and its timeout says what it waited for."""

from __future__ import annotations

import time

import pytest

from dispatch.core.polling import WaitTimeout, attempts, retry, wait_until


def test_wait_until_returns_the_predicates_value_as_soon_as_it_is_true():
    calls = []

    def third_time() -> str | None:
        calls.append(time.monotonic())
        return "ready" if len(calls) == 3 else None

    started = time.monotonic()
    assert wait_until(third_time, timeout=30, interval=0.05, what="the third call") == "ready"
    assert len(calls) == 3
    assert time.monotonic() - started < 5, "it kept sleeping after the predicate came true"


def test_wait_until_does_not_sleep_when_the_predicate_is_true_at_once():
    started = time.monotonic()
    assert wait_until(lambda: 42, timeout=30, interval=10, what="nothing") == 42
    assert time.monotonic() - started < 1


def test_wait_until_raises_a_timeout_naming_what_and_the_time_waited():
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        wait_until(lambda: False, timeout=0.3, interval=0.05, what="the local Prefect server's start lock")
    waited = time.monotonic() - started
    assert 0.3 <= waited < 3
    assert isinstance(caught.value, TimeoutError)
    message = str(caught.value)
    assert "the local Prefect server's start lock" in message
    assert "after 0.3s" in message and "0.3s)" in message, message


def test_attempts_makes_a_last_try_at_the_deadline_and_never_runs_over():
    stamps = []
    started = time.monotonic()
    for _ in attempts(0.25, 0.1):
        stamps.append(time.monotonic() - started)
    assert stamps[0] < 0.05, "the first try waits for nothing"
    assert len(stamps) == 4, stamps  # 0, 0.1, 0.2 and the deadline (the last sleep cut to 0.05)
    assert 0.25 <= stamps[-1] < 0.25 + 0.5, stamps


def test_attempts_with_no_time_tries_once():
    assert list(attempts(0, 1.0)) == [0]


def test_retry_retries_accepted_errors_and_returns_the_first_success():
    failures = [ConnectionError("refused"), ConnectionError("refused")]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "created"

    assert retry(flaky, retry_if=lambda exc: isinstance(exc, ConnectionError), timeout=30, interval=0.01) == "created"
    assert failures == []


def test_retry_raises_a_refused_error_at_once():
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(ValueError, match="bad request"):
        retry(broken, retry_if=lambda exc: isinstance(exc, ConnectionError), timeout=30, interval=0.01)
    assert calls == [1]


def test_retry_raises_the_last_accepted_error_when_time_runs_out():
    count = iter(range(1000))

    def always_busy() -> None:
        raise ConnectionError(f"busy #{next(count)}")

    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"busy #[1-9]"):
        retry(always_busy, retry_if=lambda exc: isinstance(exc, ConnectionError), timeout=0.2, interval=0.05)
    assert time.monotonic() - started < 3
