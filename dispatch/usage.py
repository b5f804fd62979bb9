"""Usage and cost per attempt, as the agents report it, and the daily budgets that hold specs back.

The node runner reads what each agent CLI prints (Claude Code's `result` event, Codex's `turn.completed`,
opencode's `step_finish`: `node_runner.UsageMeter`) into each attempt of `result.json`; a figure an agent did
not print stays unknown (None), never 0. The dispatcher appends one line per attempt to the ledger,
`<home>/results/usage.jsonl` (rotated to `usage.jsonl.1` past `DISPATCH_USAGE_LEDGER_BYTES`), from which
`totals()` sums cost and tokens per model, user, project and UTC day, and `Budgets` keeps a spec from
starting when its model's or its user's spend today (UTC) would pass `DISPATCH_BUDGET_MODEL` /
`DISPATCH_BUDGET_USER`.

Token counts are what each CLI calls them: Claude's `input_tokens` leave out cache reads, Codex's include
them. Claude Code prices GLM and MiniMax (through `ANTHROPIC_BASE_URL`) at Anthropic's list prices.
"""

from __future__ import annotations

import collections
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, field_validator

from dispatch.cooldowns import API_ERRORS

_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_ESTIMATE_SAMPLES = 20  # a model's cost estimate: the mean of its last this many attempts that reported one
_REREAD_SECONDS = 5.0  # Budgets re-reads a ledger that other dispatchers append to at most this often
LEDGER_NAME = "usage.jsonl"
_TEAM_PREFIX = "dispatch_usage_"  # team mode: one Prefect Variable per machine (ledger) and UTC day
_TEAM_REFRESH = 10.0  # seconds the other machines' spend is reused
_TEAM_PUBLISH = 5.0  # seconds between two publications of this machine's spend (one HTTP call in the loop)
logger = logging.getLogger(__name__)


def _figure(value: Any) -> float | None:
    """A usage figure: a finite, non-negative number; anything else is unknown (None)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return value


class Usage(BaseModel):
    """What one attempt's agent said it used; None where it said nothing."""

    source: str = ""
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    agent_model: str = ""

    @field_validator("cost_usd", *_TOKEN_FIELDS, mode="before")
    @classmethod
    def _figure(cls, value: Any) -> float | None:
        # a result.json from an older or odd runner must not fail the whole result: no figure is unknown
        return _figure(value)

    @field_validator(*_TOKEN_FIELDS, mode="after")
    @classmethod
    def _whole(cls, value: int | None) -> int | None:
        return None if value is None else int(value)

    def plus(self, other: Usage | None) -> Usage:
        """The sum of two usages; a figure unknown in both stays unknown."""
        if other is None:
            return self
        summed: dict[str, Any] = {}
        for name in ("cost_usd", *_TOKEN_FIELDS):
            mine, theirs = getattr(self, name), getattr(other, name)
            summed[name] = None if mine is None and theirs is None else (mine or 0) + (theirs or 0)
        return Usage(**summed)


def utc_day(ts: float) -> str:
    """`YYYY-MM-DD` of Unix time `ts` in UTC: the budgets' day."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def next_utc_midnight(ts: float) -> float:
    day = dt.datetime.fromtimestamp(ts, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + dt.timedelta(days=1)).timestamp()


def ledger_path(results_dir: Path) -> Path:
    return results_dir / LEDGER_NAME


def agent_ran(attempt: Any) -> bool:
    """Whether an attempt (results.Attempt) ran an agent: not a shell step, not a CLI that was missing or could
    not start (no exit code and nothing reported), so its usage, known or not, counts."""
    if not attempt.model or not attempt.verdict or attempt.role == "shell":
        return False
    return attempt.exit_code is not None or attempt.usage is not None


def ledger_records(result: Any, *, user: str, run_id: str, clock: Callable[[], float] = time.time) -> list[dict]:
    """One ledger line per agent attempt of `result` (a SpecResult), usage or not (unknown counts too)."""
    records = []
    for number, attempt in enumerate(result.attempts, 1):
        if not agent_ran(attempt):
            continue
        usage = attempt.usage.model_dump(exclude_none=True) if attempt.usage else {}
        ts = attempt.ended_at or attempt.started_at or clock()
        records.append({"ts": ts, "day": utc_day(ts), "project": result.project, "task_id": result.task_id,
                        "run_id": run_id, "attempt": f"{result.attempt}.{number}", "user": user,
                        "node": result.node, "model": attempt.model, "role": attempt.role or "agent",
                        "verdict": attempt.verdict, **usage})
    return records


def append_ledger(results_dir: Path, records: Iterable[dict], max_bytes: int) -> None:
    """Append `records` to the ledger under a lock (dispatchers on one machine share it); past `max_bytes`
    the ledger first becomes `usage.jsonl.1` (the one before that is dropped)."""
    lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if not lines:
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    path = ledger_path(results_dir)
    with open(results_dir / f".{LEDGER_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists() and path.stat().st_size + len(lines) > max_bytes:
                os.replace(path, path.with_name(LEDGER_NAME + ".1"))
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(lines)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _parse(text: str, contains: str = "") -> list[dict]:
    records = []
    for line in text.splitlines():
        if contains not in line:  # a cheap filter before the JSON parse
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("ts"), int | float):
            records.append(record)
    return records


def read_ledger(results_dir: Path, contains: str = "") -> list[dict]:
    """Every ledger record (whose line holds `contains`), the rotated file's first; a torn or foreign line is
    skipped."""
    records = []
    for path in (ledger_path(results_dir).with_name(LEDGER_NAME + ".1"), ledger_path(results_dir)):
        try:
            records += _parse(path.read_text(encoding="utf-8", errors="replace"), contains)
        except OSError:
            continue
    return records


def _empty() -> dict[str, Any]:
    return {"cost_usd": 0.0, **dict.fromkeys(_TOKEN_FIELDS, 0), "attempts": 0, "attempts_without_cost": 0}


def _add(group: dict[str, Any], cost: float | None, tokens: list[int]) -> None:
    group["attempts"] += 1
    if cost is None:
        group["attempts_without_cost"] += 1
    else:
        group["cost_usd"] = round(group["cost_usd"] + cost, 6)
    for name, count in zip(_TOKEN_FIELDS, tokens, strict=True):
        group[name] += count


def summarize(records: Iterable[dict], by: tuple[str, ...] = ("model", "user", "project", "day")) -> dict[str, Any]:
    """Totals of ledger `records`: overall and per each record field of `by` (`by_model`, `by_user`, ...)."""
    total = _empty()
    groups: dict[str, dict[str, dict[str, Any]]] = {f"by_{key}": {} for key in by}
    for record in records:
        cost = _figure(record.get("cost_usd"))
        tokens = [int(_figure(record.get(name)) or 0) for name in _TOKEN_FIELDS]
        _add(total, cost, tokens)
        for key in by:
            _add(groups[f"by_{key}"].setdefault(str(record.get(key) or "-"), _empty()), cost, tokens)
    return {**total, **groups}


def totals(settings: Any, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """What the agents reported using, from this machine's ledger, summed overall and per model, user, project
    and UTC day: `cost_usd` and the token counts (only figures the agents printed), `attempts`, and
    `attempts_without_cost` (attempts whose agent printed no cost: Codex, plain opencode, a killed run).

    Args:
        settings: the DispatchSettings (its `results_dir` holds the ledger).
        since: count attempts that ended at or after this Unix time (default: the start of today, UTC).
        until: and before this one (default: no end).

    Returns:
        {"since", "until", "cost_usd", "input_tokens", ..., "attempts", "attempts_without_cost",
        "by_model": {model: {...same figures}}, "by_user": ..., "by_project": ..., "by_day": ...}

    Examples:
        >>> totals(get_settings())["by_model"].get("claude", {}).get("cost_usd", 0.0)
    """
    now = time.time()
    since = next_utc_midnight(now) - 86400 if since is None else since
    chosen = [r for r in read_ledger(settings.results_dir) if r["ts"] >= since and (until is None or r["ts"] < until)]
    return {"since": since, "until": until, **summarize(chosen)}


def run_usage(settings: Any, run_id: str) -> dict[str, Any]:
    """The summary (`summarize`, per model and user) of one dispatcher run's attempts in the ledger: the report's
    usage table."""
    if not run_id:
        return summarize([])
    # the ledger is written compactly: its lines of this run hold this text (the filter skips the JSON parse of
    # the others; the exact match below decides)
    lines = read_ledger(settings.results_dir, contains=json.dumps({"run_id": run_id}, separators=(",", ":"))[1:-1])
    return summarize((r for r in lines if r.get("run_id") == run_id), by=("model", "user"))


def _team_prefix(day: str) -> str:
    return f"{_TEAM_PREFIX}{day.replace('-', '')}_"


def machine_key(settings: Any) -> str:
    """This ledger's name among the team's: the host and a hash of DISPATCH_HOME (two homes, two ledgers)."""
    host = re.sub(r"[^a-z0-9]", "_", socket.gethostname().lower())[:40]
    return f"{host}_{hashlib.sha256(str(settings.home).encode()).hexdigest()[:8]}"


def publish_spend(settings: Any, day: str, spent: dict[tuple[str, str, str], float]) -> None:
    """Team mode: put this machine's spend of `day` (its whole ledger's, so writes are idempotent) in its Prefect
    Variable `dispatch_usage_<yyyymmdd>_<machine>`, where every dispatcher's budgets read it.

    Raises:
        httpx.HTTPError: the Prefect API cannot be reached or refused the request.
    """
    from prefect.variables import Variable

    value = {"day": day, "machine": machine_key(settings), "at": time.time(),
             "model": {n: round(c, 6) for (k, n, d), c in spent.items() if k == "model" and d == day},
             "user": {n: round(c, 6) for (k, n, d), c in spent.items() if k == "user" and d == day}}
    Variable.set(_team_prefix(day) + machine_key(settings), value, overwrite=True)


def team_spend(day: str) -> dict[str, dict]:
    """Team mode: every machine's published spend of `day` (UTC, YYYY-MM-DD): machine -> {"model": {name: USD},
    "user": {name: USD}, "at"}. What a monitor shows as the team's cost today.

    Raises:
        httpx.HTTPError: the Prefect API cannot be reached or refused the request.
    """
    from prefect.client.orchestration import get_client

    prefix, found = _team_prefix(day), {}
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": prefix}}, "limit": 200})
        response.raise_for_status()
        for variable in response.json():  # `like_` treats `_` as a wildcard: checked exactly here
            name, value = str(variable.get("name", "")), variable.get("value")
            if name.startswith(prefix) and isinstance(value, dict):
                found[name[len(prefix):]] = value
    return found


class Budgets:
    """The daily budgets (USD per UTC day) per model and per user, against this machine's ledger.

    A spec would start past a budget when the spend today plus the estimated cost of it and of the specs
    this dispatcher has running on the same model or for the same user passes the limit; the estimate is the
    mean cost of the model's recent attempts (0 while none reported a cost, so the first spec of a fresh
    model always starts). A model over its budget is left out of a spec's chain (its next model runs, as for
    a cool-down); a spec with no model left, or whose user is over budget, waits.
    """

    def __init__(self, settings: Any, clock: Callable[[], float] = time.time) -> None:
        self.model_limits: dict[str, float] = dict(settings.budget_model)
        self.user_limits: dict[str, float] = dict(settings.budget_user)
        self._settings = settings
        self._team = bool(settings.prefect_api_url)  # team mode: other machines' spend comes from the server
        self._others: dict[tuple[str, str, str], float] = {}
        self._others_at = float("-inf")
        self._published_at = float("-inf")
        self._unpublished = False
        self._path = ledger_path(settings.results_dir)
        self._clock = clock
        self._read_at = float("-inf")
        self._inode: int | None = None
        self._offset = 0  # bytes of the ledger already counted: only what others append is read again
        self._spent: dict[tuple[str, str, str], float] = {}  # ("model"|"user", name, UTC day) -> USD
        self._costs: dict[str, collections.deque[float]] = {}  # model -> its latest reported costs

    @property
    def enabled(self) -> bool:
        return bool(self.model_limits or self.user_limits)

    def _count(self, records: list[dict]) -> None:
        for record in records:
            cost = _figure(record.get("cost_usd"))
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
                    self._count(_parse(rotated.read_text("utf-8", "replace")) if rotated.exists() else [])
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        whole = data[:data.rfind(b"\n") + 1]  # a line being appended is read once it is complete
        self._offset += len(whole)
        self._count(_parse(whole.decode("utf-8", "replace")))

    def refresh(self) -> None:
        """Count what was appended to the ledger since the last read (this dispatcher's lines, and others'),
        and in team mode publish this machine's spend today for the other machines' budgets."""
        self._refresh(force=True)
        self._unpublished = True
        if time.monotonic() - self._published_at >= _TEAM_PUBLISH:
            self.flush()

    def flush(self) -> None:
        """Team mode: publish this machine's spend today now, if it changed since the last publication."""
        if not self._team or not self._unpublished:
            return
        self._published_at, self._unpublished = time.monotonic(), False
        try:
            publish_spend(self._settings, utc_day(self._clock()), self._spent)
        except API_ERRORS as exc:  # the others count it late; this machine's budgets still hold
            logger.warning("could not publish this machine's usage to the server: %s", exc)

    def _other_machines(self, day: str) -> dict[tuple[str, str, str], float]:
        if not self._team or time.monotonic() - self._others_at < _TEAM_REFRESH:
            return self._others
        self._others_at = time.monotonic()
        try:
            published = team_spend(day)
        except API_ERRORS as exc:  # no server: count what we knew
            logger.warning("could not read the team's usage: %s", exc)
            return self._others
        others: dict[tuple[str, str, str], float] = {}
        for machine, value in published.items():
            if machine == machine_key(self._settings):
                continue  # this machine's own spend is its ledger's, always current
            for key in ("model", "user"):
                for name, cost in (value.get(key) or {}).items():
                    if (cost := _figure(cost)) is not None:
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
