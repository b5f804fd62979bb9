"""The team's spend board: each machine's spend of a UTC day in its own Prefect Variable.

`dispatch_usage_<yyyymmdd>_<machine>` holds one machine's (one ledger's) whole day's sums, so writes are
idempotent and no two writers share a Variable; every dispatcher's budgets read the others'. `TeamSpend` is
the `SpendBoard` of `dispatch.core.budgets` in team mode, and `budgets_for()` the `Budgets` of this process.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from dispatch.core.budgets import Budgets, machine_key, spend_value
from dispatch.prefect.errors import API_ERRORS

_TEAM_PREFIX = "dispatch_usage_"  # one Prefect Variable per machine (ledger) and UTC day
_TEAM_KEEP_DAYS = 7  # a machine's spend Variables of older days are deleted when it first publishes


def _team_prefix(day: str) -> str:
    return f"{_TEAM_PREFIX}{day.replace('-', '')}_"


def publish_spend(settings: Any, day: str, spent: dict[tuple[str, str, str], float]) -> None:
    """Team mode: put this machine's spend of `day` (its whole ledger's, so writes are idempotent) in its Prefect
    Variable `dispatch_usage_<yyyymmdd>_<machine>`, where every dispatcher's budgets read it.

    Raises:
        httpx.HTTPError: the Prefect API cannot be reached or refused the request.
    """
    from prefect.variables import Variable

    Variable.set(_team_prefix(day) + machine_key(settings), spend_value(settings, day, spent), overwrite=True)


def prune_spend(settings: Any, today: str) -> list[str]:
    """Team mode: delete this machine's spend Variables older than a week (one per machine and day would pile
    up on the server); returns their names.

    Raises:
        httpx.HTTPError: the Prefect API cannot be reached or refused the request.
    """
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    oldest = (dt.date.fromisoformat(today) - dt.timedelta(days=_TEAM_KEEP_DAYS)).strftime("%Y%m%d")
    suffix, old = "_" + machine_key(settings), []
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": suffix}}, "limit": 200})
        response.raise_for_status()
        for variable in response.json():
            name = str(variable.get("name", ""))
            day = name[len(_TEAM_PREFIX):len(_TEAM_PREFIX) + 8]
            if name.startswith(_TEAM_PREFIX) and name.endswith(suffix) and day.isdigit() and day < oldest:
                old.append(name)
    for name in old:
        Variable.unset(name)
    return old


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


class TeamSpend:
    """The `SpendBoard` of the Prefect server this process talks to; its calls raise `API_ERRORS` (`errors`)."""

    errors: tuple[type[Exception], ...] = API_ERRORS

    def __init__(self, settings: Any) -> None:
        self._settings = settings

    def publish(self, day: str, spent: dict[tuple[str, str, str], float]) -> None:
        publish_spend(self._settings, day, spent)

    def prune(self, today: str) -> list[str]:
        return prune_spend(self._settings, today)

    def read(self, day: str) -> dict[str, dict]:
        return team_spend(day)


def budgets_for(settings: Any, clock: Callable[[], float] = time.time) -> Budgets:
    """The budgets of this process: counting the team's spend when a Prefect server is set (team mode), else
    this machine's ledger alone."""
    return Budgets(settings, clock, team=TeamSpend(settings) if settings.prefect_api_url else None)
