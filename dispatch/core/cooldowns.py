"""Model cool-downs and billing blocks, kept in Prefect Variables so every user's runs skip a limited model.

A quota verdict (dispatch/ratelimits.py) puts its model on cool-down until the provider's reset time (at
least `MIN_COOLDOWN_SECONDS`, even when the reset has passed); a billing verdict blocks it for a year, in
practice until a person fixes the account and runs `dispatch models reset <model>`; a transient limit (a
429 or 529 that passes in seconds, or an endpoint that cannot be reached) cools it for the provider's
retry-after, at least `TRANSIENT_COOLDOWN_SECONDS`, so that the next spec starts on the next model at once
instead of paying the same limit again. One Variable per model, `dispatch_cooldown_<model>` = {"model",
"kind": "quota"|"billing"|"transient", "until": <unix time>, "since", "reason", "by": <user@host>}. Every
dispatcher against the same Prefect API (the team's server, or this machine's embedded database) reads
them, at most every `refresh` seconds, and leaves cooling models out of a spec's chain. Auth and config
errors (a key or a command to fix) put no model on cool-down.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from dispatch.prefect.errors import API_ERRORS
from dispatch.ratelimits import Verdict, cooldown_until

logger = logging.getLogger(__name__)
COOLING_KINDS = ("quota", "billing", "transient")  # verdicts that put their model on cool-down
_PREFIX = "dispatch_cooldown_"


def variable_name(model: str) -> str:
    """The Prefect Variable that holds `model`'s cool-down."""
    return _PREFIX + re.sub(r"[^a-z0-9_]", "_", model.lower())


class Cooldowns:
    """Read and set model cool-downs through the Prefect API.

    Args:
        refresh: seconds a read of the server's cool-downs is reused.
        clock: wall clock (Unix time), injectable for tests.
    """

    def __init__(self, refresh: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self._refresh = refresh
        self._clock = clock
        self._cache: dict[str, dict] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        """Every cool-down the API holds, current or expired: model -> value (``kind`` defaults to quota).

        Raises:
            httpx.HTTPError: the Prefect API cannot be reached or refused the request.
        """
        from prefect.client.orchestration import get_client

        found: dict[str, dict] = {}
        with get_client(sync_client=True) as client:
            # only ours, by name (`like_` is a substring match, `_` a wildcard: checked exactly below); reading
            # every variable would page past them once the team's lock table grows
            response = client.request("POST", "/variables/filter", json={
                "variables": {"name": {"like_": _PREFIX}}, "limit": 200})
            response.raise_for_status()
            for variable in response.json():
                value, name = variable.get("value"), str(variable.get("name", ""))
                if name.startswith(_PREFIX) and isinstance(value, dict):
                    value = {"kind": "quota", **value}
                    found[str(value.get("model") or name[len(_PREFIX):])] = value
        return found

    def active(self) -> dict[str, dict]:
        """Models on cool-down or blocked now: model -> {"until", "kind", "reason", "by", ...}."""
        with self._lock:
            if time.monotonic() - self._read_at >= self._refresh:
                try:
                    self._cache = self.load()
                except API_ERRORS as exc:  # no API: keep what we knew, never block dispatching
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
            except API_ERRORS as exc:
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
            httpx.HTTPError: the Prefect API cannot be reached or refused the request.
        """
        until = cooldown_until(Verdict(kind, reason, reset_at, retry_after), self._clock())
        if until is not None:
            self.set(model, until, reason, by, kind=kind)
        return until

    def set(self, model: str, until: float, reason: str, by: str, *, kind: str = "quota") -> None:
        """Put `model` on cool-down until `until` (keeps a later cool-down, or a billing block, already set)."""
        from prefect.variables import Variable

        current = self.active().get(model)
        if current and float(current["until"]) >= until:
            return
        value = {"model": model, "kind": kind, "until": until, "since": self._clock(), "reason": reason[:200],
                 "by": by}
        Variable.set(variable_name(model), value, overwrite=True)
        with self._lock:
            self._cache[model] = value
        logger.log(logging.INFO if kind == "transient" else logging.WARNING, "model %s %s until %s: %s", model,
                   "blocked for billing" if kind == "billing" else "on cool-down",
                   time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)), reason)

    def clear(self, model: str) -> bool:
        """End `model`'s cool-down or billing block; returns whether it had one (even an expired one)."""
        from prefect.variables import Variable

        existed = Variable.get(variable_name(model)) is not None
        Variable.unset(variable_name(model))
        with self._lock:
            self._cache.pop(model, None)
        return existed


def model_state(model: str, cooldown: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """One row of `dispatch models`: the model's state from its cool-down Variable (None: none set).

    Args:
        model: the model's name.
        cooldown: the value of its `dispatch_cooldown_<model>` Variable, if any.
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
