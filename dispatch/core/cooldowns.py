"""Model cool-downs and billing blocks, shared by every dispatcher so that all users' runs skip a limited model.

A quota verdict (dispatch/runner/ratelimits.py) puts its model on cool-down until the provider's reset time (at
least `MIN_COOLDOWN_SECONDS`, even when the reset has passed); a billing verdict blocks it for a year, in
practice until a person fixes the account and runs `dispatch models reset <model>`; a transient limit (a
429 or 529 that passes in seconds, or an endpoint that cannot be reached) cools it for the provider's
retry-after, at least `TRANSIENT_COOLDOWN_SECONDS`, so that the next spec starts on the next model at once
instead of paying the same limit again. A cool-down is {"model", "kind": "quota"|"billing"|"transient",
"until": <unix time>, "since", "reason", "by": <user@host>}. Auth and config errors (a key or a command to
fix) put no model on cool-down.

Where they are kept is a `CooldownStore`: `FileCooldowns` (one JSON file, this machine's dispatchers) or the
Prefect API's Variables `dispatch_cooldown_<model>` (`dispatch.prefect.cooldowns`, what every dispatcher
against the same API reads: the team's server, or this machine's embedded database). `Cooldowns` reads the
store at most every `refresh` seconds and leaves cooling models out of a spec's chain.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from dispatch.core.errors import ConfigError
from dispatch.core.results import write_json
from dispatch.core.safeload import load_json
from dispatch.runner.ratelimits import Verdict, cooldown_until

logger = logging.getLogger(__name__)
COOLING_KINDS = ("quota", "billing", "transient")  # verdicts that put their model on cool-down


class CooldownStore(Protocol):
    """Where the cool-downs are kept. `errors`: what its calls raise when the store, not our code, fails."""

    errors: tuple[type[Exception], ...]

    def load(self) -> dict[str, dict]:
        """Every cool-down held, current or expired: model -> value (``kind`` defaults to quota)."""

    def save(self, model: str, value: dict) -> None:
        """Keep `value` as `model`'s cool-down (replacing any)."""

    def remove(self, model: str) -> bool:
        """Drop `model`'s cool-down; whether it had one (even an expired one)."""


class FileCooldowns:
    """The cool-downs of one machine's dispatchers: `{model: value}` in one JSON file, rewritten atomically.

    A change is a read, then a write of the whole file: two dispatchers cooling different models in the same
    instant may lose one (its next limit cools it again).
    """

    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict]:
        try:
            raw = load_json(self.path, max_bytes=1 << 20)
        except ConfigError:  # missing, unreadable, or no (bounded) JSON: no cool-down
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(model): {"kind": "quota", **value} for model, value in raw.items() if isinstance(value, dict)}

    def save(self, model: str, value: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**self.load(), model: value})

    def remove(self, model: str) -> bool:
        held = self.load()
        if held.pop(model, None) is None:
            return False
        write_json(self.path, held)
        return True


class Cooldowns:
    """Read and set model cool-downs in a store.

    Args:
        store: where the cool-downs are kept.
        refresh: seconds a read of the store is reused.
        clock: wall clock (Unix time), injectable for tests.
    """

    def __init__(self, store: CooldownStore, refresh: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._refresh = refresh
        self._clock = clock
        self._cache: dict[str, dict] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        """Every cool-down the store holds, current or expired: model -> value (``kind`` defaults to quota).

        Raises:
            Exception: one of the store's `errors` (the Prefect API cannot be reached or refused the request).
        """
        return self.store.load()

    def active(self) -> dict[str, dict]:
        """Models on cool-down or blocked now: model -> {"until", "kind", "reason", "by", ...}."""
        with self._lock:
            if time.monotonic() - self._read_at >= self._refresh:
                try:
                    self._cache = self.load()
                except self.store.errors as exc:  # no store: keep what we knew, never block dispatching
                    logger.warning("could not read model cool-downs: %s", exc)
                self._read_at = time.monotonic()
            now = self._clock()
            return {m: v for m, v in self._cache.items() if float(v.get("until", 0)) > now}

    def usable(self, chain: list[str]) -> tuple[list[str], float | None]:
        """The models of `chain` not cooling down; when none is left, when the first quota one frees (None when
        every model is blocked for billing: waiting will not help)."""
        cooling = self.active()
        usable = [m for m in chain if m not in cooling]
        if usable:
            return usable, None
        resets = [float(cooling[m]["until"]) for m in chain if cooling[m].get("kind") != "billing"]
        return [], min(resets) if resets else None

    def blocked_reason(self, chain: list[str]) -> str:
        """Why a spec whose every model is blocked for billing cannot run, naming the command that clears each."""
        active = self.active()
        return "every model is blocked for billing: " + "; ".join(
            f"{m} ({active.get(m, {}).get('reason', 'billing')}): fix the account, then run "
            f"`dispatch models reset {m}`" for m in dict.fromkeys(chain))

    def record_attempts(self, attempts: list, task_id: str, by: str, log: logging.Logger | logging.LoggerAdapter,
                        ) -> None:
        """Cool down the models of `attempts` (a result's) that hit their quota, until their reset (at least a
        few minutes, even when it has passed), or a transient limit (its retry-after, at least 30 s), and block
        those with a billing error until a person clears them; said loudly on `log`. A server that cannot be
        told is a warning: the spec's fallback happened."""
        for attempt in attempts:
            if attempt.verdict not in COOLING_KINDS or not attempt.model:
                continue
            reason = attempt.reason or attempt.verdict
            try:
                self.record(attempt.model, attempt.verdict, attempt.reset_at, reason, by,
                            retry_after=getattr(attempt, "retry_after", None))
            except self.store.errors as exc:
                log.warning("could not record the cool-down of %s: %s", attempt.model, exc)
            if attempt.verdict == "billing":
                log.error("model %s is blocked for billing (%s, seen by spec %s): no spec of any user of this "
                          "Prefect API will use it until a person fixes the account and runs `dispatch models "
                          "reset %s`", attempt.model, reason, task_id, attempt.model)

    def record(self, model: str, kind: str, reset_at: float | None, reason: str, by: str, *,
               retry_after: float | None = None) -> float | None:
        """Cool `model` down after a "quota" or "transient" verdict, or block it after a "billing" one.

        Args:
            model: the model's name.
            kind: the verdict's kind; others than `COOLING_KINDS` change nothing.
            reset_at: the quota's reset time, if the provider gave one (past ones still cool down).
            retry_after: a transient limit's retry-after, if the provider gave one.
            reason: the verdict's reason, kept (cut to 200 characters) for `dispatch models`.
            by: who saw it, "user@host".

        Returns:
            Until when the model now waits, or None when the verdict sets no cool-down.

        Raises:
            Exception: one of the store's `errors` (the Prefect API cannot be reached or refused the request).
        """
        until = cooldown_until(Verdict(kind, reason, reset_at, retry_after), self._clock())
        if until is not None:
            self.set(model, until, reason, by, kind=kind)
        return until

    def set(self, model: str, until: float, reason: str, by: str, *, kind: str = "quota") -> None:
        """Put `model` on cool-down until `until` (keeps a later cool-down, or a billing block, already set)."""
        current = self.active().get(model)
        if current and float(current["until"]) >= until:
            return
        value = {"model": model, "kind": kind, "until": until, "since": self._clock(), "reason": reason[:200],
                 "by": by}
        self.store.save(model, value)
        with self._lock:
            self._cache[model] = value
        logger.log(logging.INFO if kind == "transient" else logging.WARNING, "model %s %s until %s: %s", model,
                   "blocked for billing" if kind == "billing" else "on cool-down",
                   time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)), reason)

    def clear(self, model: str) -> bool:
        """End `model`'s cool-down or billing block; returns whether it had one (even an expired one)."""
        existed = self.store.remove(model)
        with self._lock:
            self._cache.pop(model, None)
        return existed


def model_state(model: str, cooldown: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """One row of `dispatch models`: the model's state from its cool-down (None: none set).

    Args:
        model: the model's name.
        cooldown: its cool-down as kept in the store, if any.
        now: the current Unix time.

    Returns:
        {"model", "state": "available" | "cooling" | "blocked", "kind", "until", "reason", "by", "since"}.
    """
    row: dict[str, Any] = {"model": model, "state": "available", "kind": None, "until": None, "reason": None,
                           "by": None, "since": None}
    if cooldown is None or float(cooldown.get("until", 0)) <= now:
        return row
    kind = str(cooldown.get("kind") or "quota")
    row.update(state="blocked" if kind == "billing" else "cooling", kind=kind, until=float(cooldown["until"]),
               reason=cooldown.get("reason"), by=cooldown.get("by"), since=cooldown.get("since"))
    return row
