"""`dispatch monitor`: a live view of the cluster (nodes, running specs, queues, cool-downs, failures).

    dispatch monitor                  refreshes every DISPATCH_MONITOR_REFRESH seconds (2) until Ctrl-C
    dispatch monitor --once           the same tables, once
    dispatch monitor --once --json    one snapshot as JSON for scripts (fields: dispatch/ops/monitor.py)

Remote nodes' load is read over SSH (`cat /proc/loadavg`) in the background every 30 s in the live view
(`--no-load` skips it); `--once --load` reads it once first. Read-only and Prefect-free (dispatch/ops/monitor.py).
Exit codes: 0 success (Ctrl-C included), 2 a bad nodes.json.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from dispatch.cli.common import EXIT_INVALID, console, err
from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings
from dispatch.ops.monitor import LoadProbe, Snapshot, take_snapshot


def _clock(moment: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(moment)) if moment else "-"


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _cost(value: float | None) -> str:
    return f"${value:.2f}" if value is not None else "-"


def _table(title: str, *columns: str) -> Table:
    return Table(*columns, title=title, title_justify="left", expand=False)


def render(snapshot: Snapshot) -> Group:
    """The snapshot as rich tables: nodes, running specs, projects, cool-downs, recent failures, notes."""
    parts: list[Any] = [f"[bold]dispatch monitor[/] {_clock(snapshot.taken_at)}  {snapshot.mode} "
                        f"({escape(snapshot.prefect_api_url or 'no Prefect API')})"]
    nodes = _table("nodes", "node", "transport", "slots used", "load", "drained")
    for node in snapshot.nodes:
        load = " ".join(f"{x:.2f}" for x in node["load"]) if node["load"] else "-"
        drained = node["drained"]
        note = (f"[yellow]drained[/] since {_clock(drained['since'])} by {escape(drained['by'])}: "
                f"{escape(drained['reason'])}" if drained else "-")
        nodes.add_row(escape(node["name"]), node["transport"], f"{node['used']}/{node['slots']}", load, note)
    parts.append(nodes)
    running = _table(f"running ({len(snapshot.running)})", "project", "spec", "user", "node", "model", "elapsed",
                     "cost")
    for row in sorted(snapshot.running, key=lambda r: -(r["elapsed_s"] or 0)):
        running.add_row(escape(row["project"]), escape(row["task_id"]), escape(row["user"]), escape(row["node"]),
                        escape(row["model"] or "-"), _elapsed(row["elapsed_s"]), _cost(row["cost_usd"]))
    parts.append(running)
    projects = _table("projects", "project", "user", "state", "queued", "running", "succeeded", "failed", "cost")
    for row in snapshot.projects:
        projects.add_row(escape(row["project"]), escape(row["user"]), row["state"], str(row["queued"]),
                         str(row["running"]), f"{row['succeeded']}/{row['total']}", str(row["failed"]),
                         _cost(row["cost_usd"]))
    for run in snapshot.team_runs or []:
        tasks = ", ".join(f"{n} {s.lower()}" for s, n in sorted((run.get("tasks") or {}).items())) or "-"
        projects.add_row(escape(run["project"]), escape(f"{run['user']}@{run['host']}"),
                         f"{run['state'].lower()} (server)", "-", escape(tasks), "-", "-", "-")
    parts.append(projects)
    if snapshot.cooldowns is None:
        parts.append("[dim]model cool-downs: unknown[/]")
    elif snapshot.cooldowns:
        cooling = _table("model cool-downs", "model", "state", "until", "reason", "by")
        for row in snapshot.cooldowns:
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["until"])) if row["until"] else "-"
            cooling.add_row(escape(row["model"]), row["state"], until, escape(str(row["reason"] or "")[:80]),
                            escape(str(row["by"] or "-")))
        parts.append(cooling)
    else:
        parts.append("model cool-downs: none")
    if snapshot.failures:
        failed = _table("recent failures", "ended", "project", "spec", "node", "model", "reason")
        for row in snapshot.failures:
            failed.add_row(_clock(row["ended_at"]), escape(row["project"]), escape(row["task_id"]),
                           escape(row["node"] or "-"), escape(row["model"] or "-"), escape(row["reason"][:100]))
        parts.append(failed)
    parts.append(_usage(snapshot.usage_today))
    parts += [f"[yellow]note:[/] {escape(note)}" for note in snapshot.notes]
    return Group(*parts)


def _usage(today: dict) -> Table | str:
    """Today's reported spend per model and user, with the budget beside it where one is set."""
    if not today.get("attempts"):
        return "usage today (UTC): no agent attempt yet"
    table = _table(f"usage today (UTC): {_cost(today['cost_usd'])} over {today['attempts']} attempt(s)",
                   "by", "cost", "tokens in/out", "attempts", "budget")
    for kind, key in (("model", "by_model"), ("user", "by_user")):
        for name, row in sorted(today[key].items()):
            budget = today["budgets"][kind].get(name)
            known = row["attempts"] > row["attempts_without_cost"]  # an agent that printed no cost spent "-", not $0
            table.add_row(escape(f"{kind} {name}"), _cost(row["cost_usd"] if known else None),
                          f"{row['input_tokens'] or 0:,}/{row['output_tokens'] or 0:,}", str(row["attempts"]),
                          f"${budget['limit_usd']:g}" if budget else "-")
    return table


def _invalid(exc: ConfigError) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def _snapshot(probe: LoadProbe | None = None) -> Snapshot:
    try:
        return take_snapshot(get_settings(), loads=probe.loads() if probe is not None else None)
    except ConfigError as exc:
        raise _invalid(exc) from None


def _load_probe(interval: float) -> LoadProbe:
    from dispatch.cluster.config import load_nodes

    try:
        return LoadProbe(load_nodes(get_settings()), interval=interval)
    except ConfigError as exc:
        raise _invalid(exc) from None


def monitor(
    once: Annotated[bool, typer.Option("--once", help="Show one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: the snapshot as JSON for scripts.")] = False,
    interval: Annotated[float | None, typer.Option(
        help="Seconds between refreshes (default DISPATCH_MONITOR_REFRESH, 2).", min=0.2)] = None,
    load: Annotated[bool | None, typer.Option(
        "--load/--no-load", help="Read remote nodes' load over SSH (default: in the live view, not with --once).")]
    = None,
) -> None:
    """Watch the cluster: nodes (slots, load, drained), running specs, queues, model cool-downs, recent failures."""
    if as_json and not once:
        err.print("[red]error:[/] --json prints one snapshot: use `dispatch monitor --once --json`")
        raise typer.Exit(EXIT_INVALID)
    if once:
        probe = _load_probe(interval=3600) if load else None
        if probe is not None:
            probe.wait(timeout=30)
            probe.close()
        snapshot = _snapshot(probe)
        if as_json:
            console.print_json(data=snapshot.to_json(), allow_nan=False)  # strict JSON, never Infinity
        else:
            console.print(render(snapshot))
        return
    from rich.live import Live

    refresh = interval or get_settings().monitor_refresh
    first = _snapshot()
    probe = _load_probe(interval=30.0) if load is not False else None
    try:
        with Live(render(first), console=console, refresh_per_second=4, transient=False) as live:
            while True:
                time.sleep(refresh)
                live.update(render(_snapshot(probe)))
    except KeyboardInterrupt:  # Ctrl-C is how a person leaves the view: no traceback, exit 0
        return
    finally:
        if probe is not None:
            probe.close()
