"""`dispatch usage`: what the agents reported using (cost, tokens) per model, user, project and UTC day, from
this machine's usage ledger (dispatch/core/usage.py), and the daily budgets against today's spend. No Prefect import."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated

import typer
from rich.table import Table

from dispatch.cli.common import EXIT_INVALID, console, err
from dispatch.core.report import money
from dispatch.core.settings import get_settings
from dispatch.core.usage import budget_use, totals, utc_day


def _day_start(day: str) -> float:
    """Unix time of 00:00 UTC on `day` (YYYY-MM-DD), or exit 2 naming the option and the fix."""
    try:
        return dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        err.print(f"[red]error:[/] --since {day!r} is no UTC day: give it as YYYY-MM-DD, e.g. --since "
                  f"{utc_day(time.time())}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None


def _table(title: str, groups: dict[str, dict]) -> Table:
    table = Table(title, "attempts", "cost", "tokens in", "tokens out", "cache read", "no cost reported",
                  title_justify="left")
    for name, group in sorted(groups.items()):
        known = group["attempts"] - group["attempts_without_cost"]
        table.add_row(name, str(group["attempts"]), money(group["cost_usd"] if known else None),
                      f"{group['input_tokens']:,}", f"{group['output_tokens']:,}", f"{group['cache_read_tokens']:,}",
                      str(group["attempts_without_cost"]))
    return table


def usage(
    since: Annotated[str | None, typer.Option("--since", help="First UTC day counted, YYYY-MM-DD (default: today).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Show what the agents reported using (cost, tokens) per model, user, project and day, and the budgets.

    Only figures an agent printed are counted: Codex reports no cost, plain `opencode run` nothing, so those
    attempts are listed as "no cost reported", never as $0.
    """
    settings = get_settings()
    start = _day_start(since) if since else None
    found = totals(settings, since=start)
    today = totals(settings) if start is not None else found
    budgets = budget_use(settings, today)
    if as_json:
        console.print_json(data={**found, "budgets": budgets}, allow_nan=False)  # strict JSON
        return
    first = utc_day(found["since"])
    console.print(f"usage since {first} (UTC): {money(found['cost_usd'])} reported over {found['attempts']} "
                  f"attempt(s), {found['input_tokens']:,} tokens in / {found['output_tokens']:,} out"
                  + (f"; {found['attempts_without_cost']} attempt(s) reported no cost"
                     if found["attempts_without_cost"] else ""), soft_wrap=True)
    if not found["attempts"]:
        return
    for title, key in (("model", "by_model"), ("user", "by_user"), ("project", "by_project"), ("day", "by_day")):
        console.print(_table(title, found[key]))
    for kind, entries in budgets.items():
        for name, entry in entries.items():
            console.print(f"budget {kind} {name}: {money(entry['spent_usd'])} of ${entry['limit_usd']:g} today (UTC)")
