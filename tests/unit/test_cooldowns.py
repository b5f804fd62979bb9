"""Which verdicts cool a model down team-wide, and for how long (the Prefect Variable write is stubbed)."""

from __future__ import annotations

import logging

from dispatch.core.cooldowns import Cooldowns
from dispatch.core.results import Attempt
from dispatch.ratelimits import TRANSIENT_COOLDOWN_SECONDS

NOW = 1_800_000_000.0


def _recorded(attempts: list[Attempt], monkeypatch) -> dict[str, tuple[float, str]]:
    keeper = Cooldowns(clock=lambda: NOW)
    saved: dict[str, tuple[float, str]] = {}
    monkeypatch.setattr(keeper, "set", lambda model, until, reason, by, kind="quota": saved.update(
        {model: (until, kind)}))
    keeper.record_attempts(attempts, "S01", "me@host", logging.getLogger("test"))
    return saved


def test_a_model_that_answered_a_transient_limit_is_cooled_for_its_retry_after_at_least_a_floor(monkeypatch):
    saved = _recorded([Attempt(model="glm", verdict="transient", reason="rate limited (429)", retry_after=1),
                       Attempt(model="minimax", verdict="transient", reason="429", retry_after=120),
                       Attempt(model="claude", verdict="ok")], monkeypatch)
    assert saved == {"glm": (NOW + TRANSIENT_COOLDOWN_SECONDS, "transient"), "minimax": (NOW + 120, "transient")}


def test_auth_config_and_failures_cool_nothing_and_quota_billing_still_do(monkeypatch):
    saved = _recorded([Attempt(model="a", verdict="auth"), Attempt(model="b", verdict="config"),
                       Attempt(model="c", verdict="failure"), Attempt(model="d", verdict="quota", reset_at=NOW + 3600),
                       Attempt(model="e", verdict="billing")], monkeypatch)
    assert set(saved) == {"d", "e"} and saved["d"] == (NOW + 3600, "quota") and saved["e"][1] == "billing"
