"""What a project run's results leave for later runs and other dispatchers: measured durations (the estimates
the scheduler orders by and the time left, dispatch/core/durations.py), the models' cool-downs (cooldowns.py) and
the usage ledger that totals and budgets read (usage.py, budgets.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from dispatch.core.durations import DurationHistory, first_model
from dispatch.core.results import SpecResult
from dispatch.core.specs import Spec
from dispatch.core.usage import append_ledger, ledger_records

if TYPE_CHECKING:
    from dispatch.core.budgets import Budgets
    from dispatch.core.cooldowns import Cooldowns
    from dispatch.core.settings import DispatchSettings

_ESTIMATE_INTERVAL = 0.5  # seconds between two estimates of the time left (one is O(specs + dependencies))


class _Scheduler(Protocol):
    def set_estimates(self, estimates: dict[str, float]) -> None: ...

    def remaining(self) -> float: ...


class RunEstimates:
    """The estimates of a run's selected specs, and the time left by them.

    Args:
        history: the project's duration history.
        specs: the selected specs by id.
        clock: monotonic clock.
    """

    def __init__(self, history: DurationHistory, specs: Mapping[str, Spec],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.history, self._specs, self._clock = history, dict(specs), clock
        self.initial = history.estimates(self._specs)
        self.measured = bool(self.initial)  # False: nothing measured yet, ranks count specs
        self._since = 0
        self._remaining: tuple[float, float | None] = (0.0, None)  # (when computed, seconds left then)

    def record(self, result: SpecResult, scheduler: _Scheduler, log: logging.Logger | logging.LoggerAdapter) -> None:
        """Keep a run's measured duration for later estimates; refresh the estimates now and then (a spec's
        first run is estimated by the project's median, which this run moves)."""
        if result.duration is None or result.status == "lost":
            return
        self.history.record(result.task_id, result.duration, succeeded=result.succeeded,
                            model=result.model or first_model(self._specs[result.task_id]))
        self._since += 1
        if self._since >= max(1, len(self._specs) // 50):
            self._since = 0
            estimates = self.history.estimates(self._specs)
            self.measured = self.measured or bool(estimates)
            scheduler.set_estimates(estimates)
            self.save(log)

    def seconds_left(self, scheduler: _Scheduler) -> float | None:
        """The critical path of what is left through dependencies and locks, by the estimates (None until
        something was measured), counted down between two computations."""
        now = self._clock()
        at, left = self._remaining
        if self.measured and (left is None or now - at >= _ESTIMATE_INTERVAL):
            self._remaining = at, left = now, scheduler.remaining()
        return max(left - (now - at), 0.0) if left is not None else None

    def save(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        try:
            self.history.save()
        except OSError as exc:  # only a hint for later runs' order
            log.warning("could not save the duration history %s: %s", self.history.path, exc)


class RunRecords:
    """Where a run's results are recorded as they come.

    Args:
        estimates: the run's duration estimates.
        settings: the process settings (the ledger's place and bound).
        cooldowns: the models' cool-downs.
        budgets: the daily budgets (they re-read the ledger after each write).
        run_id: the run's id; user: who the run spends for; who: "user@host" named with a cool-down.
        log: the run's logger.
    """

    def __init__(self, estimates: RunEstimates, settings: DispatchSettings, cooldowns: Cooldowns, budgets: Budgets,
                 *, run_id: str, user: str, who: str, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.estimates, self.settings, self.cooldowns, self.budgets = estimates, settings, cooldowns, budgets
        self.run_id, self.user, self.who, self.log = run_id, user, who, log

    def record(self, result: SpecResult, scheduler: _Scheduler, *, cached: bool, stopped: bool) -> None:
        """Record an attempt's result: its models' limits always; what a fresh one used; its duration unless the
        run is stopping (a stopped attempt's duration says nothing of the spec's)."""
        self.cooldowns.record_attempts(result.attempts, result.task_id, self.who, self.log)
        if cached:
            return
        try:
            append_ledger(self.settings.results_dir, ledger_records(result, user=self.user, run_id=self.run_id),
                          self.settings.usage_ledger_bytes)
        except OSError as exc:  # the run goes on; only totals and budgets miss these attempts
            self.log.warning("could not write the usage ledger: %s", exc)
        self.budgets.refresh()
        if not stopped:
            self.estimates.record(result, scheduler, self.log)
        if result.fallback():
            self.log.info("%s: models passed over: %s", result.task_id, result.fallback())
