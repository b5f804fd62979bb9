"""`dispatch status` and `dispatch report`: what a run did, read from the state the project flow keeps under
DISPATCH_HOME (no Prefect import: they answer in milliseconds), plus, without a project in team mode, every
user's running projects on the server (dispatch/prefect/team.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dispatch.cli.common import EXIT_INVALID, MARK, checked, console, err
from dispatch.core.processes import pid_alive
from dispatch.core.report import model_text, money, render_markdown, table_rows, usage_line
from dispatch.core.results import load_all_states, load_state
from dispatch.core.settings import get_settings
from dispatch.core.usage import run_usage
from dispatch.ops.monitor import local_slot_use


def _node_load(settings) -> dict[str, dict[str, int]]:
    """Slots used / total per configured node, from this machine's live runs (as `dispatch nodes` counts)."""
    from dispatch.cluster.config import load_nodes

    used = local_slot_use(settings)
    return {n.name: {"slots": n.slots, "used": used.get(n.name, 0)} for n in load_nodes(settings)}


def _team_runs(settings) -> list | None:
    """Every user's unfinished project runs on the server; None (after a one-line warning) if it cannot say."""
    from dispatch.prefect.team import TeamServerError, list_team_runs

    try:
        auth = settings.prefect_api_auth_string
        return list_team_runs(settings.prefect_api_url, auth_string=auth.get_secret_value() if auth else None)
    except TeamServerError as exc:
        err.print(f"[yellow]warning:[/] {escape(str(exc))}; showing this machine's runs only", soft_wrap=True)
        return None


def _print_team_runs(settings, runs: list) -> None:
    """One line per run (as for this machine's projects above), then where to open it."""
    if not runs:
        console.print(f"no project is running on {settings.prefect_api_url}")
        return
    console.print(f"running on {settings.prefect_api_url} (every user):")
    for run in runs:
        state = run.state.lower() if run.state_name.upper() == run.state else f"{run.state.lower()} ({run.state_name})"
        since = time.strftime("%H:%M:%S", time.localtime(run.started_at)) if run.started_at else "-"
        elapsed = f", {run.elapsed:.0f}s" if run.elapsed is not None else ""
        console.print(f"  [bold]{escape(run.project)}[/] {state} (by {escape(run.user)}@{escape(run.host)}, "
                      f"since {since}{elapsed}): task runs {run.progress()}", soft_wrap=True)
        where = f" (deployment {run.deployment})" if run.deployment else ""
        console.print(f"    [dim]{run.url or 'flow run ' + run.flow_run_id}{where}[/]", soft_wrap=True)


def live_state(state):
    if state.state == "running" and not pid_alive(state.pid):
        state.state = "interrupted"
    return state


def status(
    project: Annotated[str | None, typer.Argument(help="A project; all projects when omitted.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Show each spec's state, node, attempts and duration, and the nodes' slot load.

    Without a project and with a Prefect server configured, also every user's running projects on it.
    """
    project = checked(project) if project is not None else None
    settings = get_settings()
    states = [load_state(settings.state_dir, project)] if project else load_all_states(settings.state_dir)
    states = [live_state(s) for s in states if s is not None]
    if project and not states:
        err.print(f"no run of {project!r} recorded under {settings.state_dir}; "
                  f"start one with `dispatch start {project}`")
        raise typer.Exit(EXIT_INVALID)
    nodes = _node_load(settings)
    team = _team_runs(settings) if not project and not settings.embedded else None
    if as_json:
        data = {"projects": [s.model_dump(mode="json") for s in states], "nodes": nodes}
        if not project and not settings.embedded:  # null: the server could not be asked (see stderr)
            data["team_runs"] = [run.model_dump(mode="json") for run in team] if team is not None else None
        console.print_json(data=data)
        return
    for state in states:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(state.counts().items()))
        console.print(f"[bold]{state.project}[/] {state.state} (run {state.run_id}, {state.user}@{state.host}, "
                      f"pid {state.pid}): {counts}")
        console.print(f"  usage: {usage_line(state)}", soft_wrap=True)
        if not project:
            continue
        table = Table("spec", "state", "node", "model", "attempts", "duration", "cost", "reason")
        for task_id, row in state.specs.items():
            duration = f"{row.duration:.1f}s" if row.duration is not None else (
                f"{time.time() - row.started_at:.0f}s…" if row.state == "running" and row.started_at else "-")
            label = f"{MARK.get(row.state, '')} {row.state}" + (" (cached)" if row.cached else "")
            table.add_row(task_id, label, row.node or "-", escape(model_text(row)), str(row.attempts), duration,
                          money(row.cost_usd), escape(row.reason[:80]))
        console.print(table)
    if team is not None:
        _print_team_runs(settings, team)
    load = Table("node", "slots used", "slots")
    for name, entry in nodes.items():
        load.add_row(name, str(entry["used"]), str(entry["slots"]))
    console.print(load)


def report(
    project: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the markdown to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Rows as JSON instead of markdown.")] = False,
):
    """Summarise the latest run: totals, success rate, per-spec rows, failures with their log tails."""
    project = checked(project)
    settings = get_settings()
    state = load_state(settings.state_dir, project)
    if state is None:
        err.print(f"no run of {project!r} recorded under {settings.state_dir}; "
                  f"start one with `dispatch start {project}`")
        raise typer.Exit(EXIT_INVALID)
    state = live_state(state)
    if as_json:
        console.print_json(data={"project": project, "state": state.state, "counts": state.counts(),
                                 "specs": table_rows(state), "usage": run_usage(settings, state.run_id)})
        return
    text = render_markdown(state, settings.runs_dir, usage=run_usage(settings, state.run_id))
    if output:
        output.write_text(text, encoding="utf-8")
        console.print(f"report written to {output}")
    else:
        sys.stdout.write(text)
