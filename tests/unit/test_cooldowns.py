"""Which verdicts cool a model down team-wide and for how long, and the machine-local store of cool-downs."""

from __future__ import annotations

import logging

from dispatch.core.cooldowns import Cooldowns, FileCooldowns
from dispatch.core.results import Attempt
from dispatch.runner.ratelimits import TRANSIENT_COOLDOWN_SECONDS

NOW = 1_800_000_000.0


def _recorded(attempts: list[Attempt], monkeypatch, tmp_path) -> dict[str, tuple[float, str]]:
    keeper = Cooldowns(FileCooldowns(tmp_path / "cooldowns.json"), clock=lambda: NOW)
    saved: dict[str, tuple[float, str]] = {}
    monkeypatch.setattr(keeper, "set", lambda model, until, reason, by, kind="quota": saved.update(
        {model: (until, kind)}))
    keeper.record_attempts(attempts, "S01", "me@host", logging.getLogger("test"))
    return saved


def test_a_model_that_answered_a_transient_limit_is_cooled_for_its_retry_after_at_least_a_floor(monkeypatch, tmp_path):
    saved = _recorded([Attempt(model="glm", verdict="transient", reason="rate limited (429)", retry_after=1),
                       Attempt(model="minimax", verdict="transient", reason="429", retry_after=120),
                       Attempt(model="claude", verdict="ok")], monkeypatch, tmp_path)
    assert saved == {"glm": (NOW + TRANSIENT_COOLDOWN_SECONDS, "transient"), "minimax": (NOW + 120, "transient")}


def test_auth_config_and_failures_cool_nothing_and_quota_billing_still_do(monkeypatch, tmp_path):
    saved = _recorded([Attempt(model="a", verdict="auth"), Attempt(model="b", verdict="config"),
                       Attempt(model="c", verdict="failure"), Attempt(model="d", verdict="quota", reset_at=NOW + 3600),
                       Attempt(model="e", verdict="billing")], monkeypatch, tmp_path)
    assert set(saved) == {"d", "e"} and saved["d"] == (NOW + 3600, "quota") and saved["e"][1] == "billing"


def test_cool_downs_kept_in_a_machine_file_skip_a_model_until_cleared(tmp_path):
    path = tmp_path / "cooldowns.json"
    keeper = Cooldowns(FileCooldowns(path), refresh=0, clock=lambda: NOW)
    assert keeper.record("glm", "quota", NOW + 600, "usage limit", "me@host") == NOW + 600
    keeper.set("minimax", NOW + 60, "429", "me@host", kind="transient")
    other = Cooldowns(FileCooldowns(path), refresh=0, clock=lambda: NOW)  # another dispatcher of this machine
    assert other.usable(["glm", "minimax", "claude"]) == (["claude"], None)
    assert other.usable(["glm", "minimax"]) == ([], NOW + 60)
    assert other.active()["glm"]["kind"] == "quota" and other.clear("glm") and not other.clear("glm")
    assert set(Cooldowns(FileCooldowns(path), refresh=0, clock=lambda: NOW).active()) == {"minimax"}


def test_a_store_that_fails_keeps_the_last_cool_downs_and_never_stops_dispatching(tmp_path, caplog):
    store = FileCooldowns(tmp_path / "cooldowns.json")
    keeper = Cooldowns(store, refresh=0, clock=lambda: NOW)
    keeper.set("glm", NOW + 600, "usage limit", "me@host")

    def fail() -> dict:
        raise OSError("disk gone")

    store.load = fail  # type: ignore[method-assign]
    assert list(keeper.active()) == ["glm"] and "could not read model cool-downs: disk gone" in caplog.text
