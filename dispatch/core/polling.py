"""Bounded polling, written once: every dispatcher-side wait for a condition and every retry loop uses it.

- `attempts(timeout, interval)`: the loop itself. It yields at once, then after each `interval` seconds,
  and a last time when `timeout` has passed (a final try at the deadline), so a loop body only says what
  one try is: `for _ in attempts(30, 0.1): if done(): return ...`, then what to do when time ran out.
- `wait_until(predicate, timeout=, interval=, what=)`: the common case, raising `WaitTimeout` (a
  `TimeoutError`) that names what was awaited and how long it waited.
- `retry(call, retry_if=, timeout=, interval=)`: call until it returns, retrying the exceptions
  `retry_if` accepts until `timeout` passes; the last one is raised.

The node runner (`dispatch/runner/`) is standard-library code shipped to nodes and keeps its own loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A condition did not come true in time (the message names it and the time waited)."""


def attempts(timeout: float, interval: float) -> Iterator[int]:
    """Yield the try's number (0, 1, ...) at once, then every `interval` seconds until `timeout` has passed.

    The sleep before the last try is cut short so that it falls at the deadline; the whole loop takes at
    most `timeout` seconds plus the time of its tries.
    """
    deadline = time.monotonic() + timeout
    number = 0
    while True:
        yield number
        number += 1
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval, left))


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float, what: str) -> T:
    """Call `predicate` every `interval` seconds until it returns a true value, and return that value.

    Raises:
        WaitTimeout: it was still false after `timeout` seconds (`what` says what was awaited, e.g.
            "the local Prefect server's start lock").
    """
    started = time.monotonic()
    for _ in attempts(timeout, interval):
        if result := predicate():
            return result
    raise WaitTimeout(f"gave up waiting for {what} after {time.monotonic() - started:.1f}s "
                      f"(the limit is {timeout:g}s)")


def retry(call: Callable[[], T], *, retry_if: Callable[[Exception], bool], timeout: float, interval: float) -> T:
    """`call()`'s value, calling again every `interval` seconds while it raises an exception `retry_if` accepts.

    Raises:
        Exception: what `call` raised, at once when `retry_if` refuses it, else the last one after `timeout`.
    """
    failure: Exception | None = None
    for _ in attempts(timeout, interval):
        try:
            return call()
        except Exception as exc:
            if not retry_if(exc):
                raise
            failure = exc
    assert failure is not None  # attempts() yields at least once
    raise failure
