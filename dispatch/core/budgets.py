"""Daily budgets per model and per user (USD per UTC day), against the usage ledger (dispatch/core/usage.py) and, in
team mode, the other machines' spend, which each machine publishes on a `SpendBoard` (its whole day's sums:
idempotent writes, no two writers of one entry): the Prefect server's, `dispatch.prefect.spend`. Without a board
(one machine) the ledger, which every dispatcher of the machine appends to, is the whole spend.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from dispatch.core.usage import LEDGER_NAME, figure, ledger_path, next_utc_midnight, parse_ledger, total_figure, utc_day

_ESTIMATE_SAMPLES = 20  # a model's cost estimate: the mean of its last this many attempts that reported one
_REREAD_SECONDS = 5.0  # Budgets re-reads a ledger that other dispatchers append to at most this often
_TEAM_REFRESH = 10.0  # seconds the other machines' spend is reused
_TEAM_PUBLISH = 5.0  # seconds between two publications of this machine's spend (one HTTP call, in a thread)
logger = logging.getLogger(__name__)


def machine_key(settings: Any) -> str:
    """This ledger's name among the team's: the host and a hash of DISPATCH_HOME (two homes, two ledgers)."""
    host = re.sub(r"[^a-z0-9]", "_", socket.gethostname().lower())[:40]
    return f"{host}_{hashlib.sha256(str(settings.home).encode()).hexdigest()[:8]}"


class SpendBoard(Protocol):
    """Where the machines of a team publish their spend of a UTC day (team mode; see `dispatch.prefect.spend`).

    `errors`: what its calls raise when the board, not our code, fails (the dispatcher then counts what it knew).
    """

    errors: tuple[type[Exception], ...]

    def publish(self, day: str, spent: dict[tuple[str, str, str], float]) -> None:
        """Publish this machine's spend of `day` (its whole ledger's: writes are idempotent)."""

    def prune(self, today: str) -> list[str]:
        """Delete this machine's publications older than a week; their names."""

    def read(self, day: str) -> dict[str, dict]:
        """Every machine's published spend of `day`: machine -> {"model": {name: USD}, "user": {...}, "at"}."""


def spend_value(settings: Any, day: str, spent: dict[tuple[str, str, str], float]) -> dict:
    """What this machine publishes of its spend of `day`: `{"day", "machine", "at", "model", "user"}`."""
    return {"day": day, "machine": machine_key(settings), "at": time.time(),
            "model": {n: round(c, 6) for (k, n, d), c in spent.items() if k == "model" and d == day},
            "user": {n: round(c, 6) for (k, n, d), c in spent.items() if k == "user" and d == day}}


class Budgets:
    """The daily budgets (USD per UTC day) per model and per user, against this machine's ledger.

    A spec would start past a budget when the spend today plus the estimated cost of it and of the specs
    this dispatcher has running on the same model or for the same user passes the limit; the estimate is the
    mean cost of the model's recent attempts (0 while none reported a cost, so the first spec of a fresh
    model always starts). A model over its budget is left out of a spec's chain (its next model runs, as for
    a cool-down); a spec with no model left, or whose user is over budget, waits.

    Args:
        settings: the process settings (budgets, results directory).
        clock: wall clock (Unix time), injectable for tests.
        team: the team's spend board (team mode), or None: this machine's ledger is the whole spend.
    """

    def __init__(self, settings: Any, clock: Callable[[], float] = time.time, team: SpendBoard | None = None,
                 ) -> None:
        self.model_limits: dict[str, float] = dict(settings.budget_model)
        self.user_limits: dict[str, float] = dict(settings.budget_user)
        self._settings = settings
        self._board = team  # team mode: other machines' spend comes from the board
        self._others: dict[tuple[str, str, str], float] = {}
        self._others_at = float("-inf")
        self._published_at = float("-inf")
        self._pruned = False
        # the figures the other machines have (None: unknown, a publication failed); nothing spent needs no word
        self._published: dict[tuple[str, str, str], float] | None = {}
        self._path = ledger_path(settings.results_dir)
        self._clock = clock
        self._read_at = float("-inf")
        self._inode: int | None = None
        self._offset = 0  # bytes of the ledger already counted: only what others append is read again
        self._spent: dict[tuple[str, str, str], float] = {}  # ("model"|"user", name, UTC day) -> USD
        self._costs: dict[str, collections.deque[float]] = {}  # model -> its latest reported costs
        self._publisher: ThreadPoolExecutor | None = None  # team mode: publications off the dispatch loop
        self._publishing: Future | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.model_limits or self.user_limits)

    def _count(self, records: list[dict]) -> None:
        for record in records:
            cost = figure(record.get("cost_usd"))
            if cost is None:
                continue
            for key in ("model", "user"):
                slot = (key, str(record.get(key) or ""), str(record.get("day") or ""))
                self._spent[slot] = self._spent.get(slot, 0.0) + cost
            self._costs.setdefault(str(record.get("model") or ""),
                                   collections.deque(maxlen=_ESTIMATE_SAMPLES)).append(cost)

    def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._read_at < _REREAD_SECONDS:
            return
        self._read_at = time.monotonic()
        try:
            with open(self._path, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                if inode != self._inode or os.fstat(handle.fileno()).st_size < self._offset:  # new or rotated
                    self._inode, self._offset, self._spent, self._costs = inode, 0, {}, {}
                    rotated = self._path.with_name(LEDGER_NAME + ".1")
                    self._count(parse_ledger(rotated.read_text("utf-8", "replace")) if rotated.exists() else [])
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        whole = data[:data.rfind(b"\n") + 1]  # a line being appended is read once it is complete
        self._offset += len(whole)
        self._count(parse_ledger(whole.decode("utf-8", "replace")))

    def refresh(self) -> None:
        """Count what was appended to the ledger since the last read (this dispatcher's lines, and others'),
        and in team mode publish this machine's spend today for the other machines' budgets when it changed since
        the last publication (in a background thread: the dispatch loop never waits on the server for it; a run
        that spends nothing publishes nothing). Nothing to do without budgets or a team."""
        if not (self.enabled or self._board is not None):
            return
        self._refresh(force=True)
        if self._board is None or self._spent == self._published:  # the others know these figures already
            return
        if time.monotonic() - self._published_at < _TEAM_PUBLISH:
            return
        if self._publishing is not None and not self._publishing.done():
            return  # the last publication is still out; the next refresh sends the newer figures
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-publish")
        self._publishing = self._publisher.submit(self.flush, dict(self._spent))  # a copy made on this thread

    def flush(self, spent: dict[tuple[str, str, str], float] | None = None) -> None:
        """Team mode: publish this machine's spend today (`spent`, default the current figures) now, if it
        changed since the last publication."""
        board = self._board
        figures = dict(self._spent if spent is None else spent)
        if board is None or figures == self._published:
            return
        self._published_at, self._published = time.monotonic(), figures
        try:
            board.publish(utc_day(self._clock()), figures)
            if not self._pruned:
                self._pruned = True
                board.prune(utc_day(self._clock()))
        except board.errors as exc:  # the others count it late; this machine's budgets still hold
            self._published = None  # not sent: the next refresh tries again
            logger.warning("could not publish this machine's usage to the server: %s", exc)

    def close(self) -> None:
        """At the run's end: wait for a publication still out, then publish what is left."""
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None
        self.flush()  # what was counted after the last publication went out

    def _other_machines(self, day: str) -> dict[tuple[str, str, str], float]:
        board = self._board
        if board is None or time.monotonic() - self._others_at < _TEAM_REFRESH:
            return self._others
        self._others_at = time.monotonic()
        try:
            published = board.read(day)
        except board.errors as exc:  # no server: count what we knew
            logger.warning("could not read the team's usage: %s", exc)
            return self._others
        others: dict[tuple[str, str, str], float] = {}
        for machine, value in published.items():
            if machine == machine_key(self._settings):
                continue  # this machine's own spend is its ledger's, always current
            for key in ("model", "user"):
                group = value.get(key) if isinstance(value, dict) else None
                if not isinstance(group, dict):  # another machine's value is hostile input too: skip what is no map
                    continue
                for name, cost in group.items():
                    if (cost := total_figure(cost)) is not None:  # finite and bound: never inf
                        others[(key, str(name), day)] = others.get((key, str(name), day), 0.0) + cost
        self._others = others
        return others

    def _spent_on(self, key: str, value: str, day: str) -> float:
        return self._spent.get((key, value, day), 0.0) + self._other_machines(day).get((key, value, day), 0.0)

    def estimate(self, model: str) -> float:
        costs = self._costs.get(model)
        return sum(costs) / len(costs) if costs else 0.0

    def _over(self, spent: float, estimate: float, running: int, limit: float) -> bool:
        return spent >= limit or spent + estimate * (running + 1) > limit

    def check(self, chain: list[str], user: str, running: list[str]) -> tuple[list[str], str]:
        """The models of `chain` within their budgets, and why the spec must wait ('' when it may start).

        Args:
            chain: the spec's usable models, in order.
            user: who the spec runs for.
            running: the model each spec this dispatcher has running started with.
        """
        if not self.enabled or not chain:
            return chain, ""
        self._refresh()
        now = self._clock()
        day = utc_day(now)
        allowed, spent_models = [], []
        for model in chain:
            limit = self.model_limits.get(model)
            spent = self._spent_on("model", model, day) if limit is not None else 0.0
            if limit is not None and self._over(spent, self.estimate(model), running.count(model), limit):
                spent_models.append(f"{model} ${spent:.2f} of ${limit:g}")
            else:
                allowed.append(model)
        until = dt.datetime.fromtimestamp(next_utc_midnight(now), dt.UTC).strftime("%Y-%m-%d 00:00 UTC")
        if not allowed:
            return [], (f"budget reached: {', '.join(spent_models)} today (UTC); waits until {until} "
                        "or a raised DISPATCH_BUDGET_MODEL")
        limit = self.user_limits.get(user)
        if limit is not None:
            spent = self._spent_on("user", user, day)
            if self._over(spent, self.estimate(allowed[0]), len(running), limit):
                return [], (f"budget reached: user {user} ${spent:.2f} of ${limit:g} today (UTC); waits until "
                            f"{until} or a raised DISPATCH_BUDGET_USER")
        return allowed, ""
