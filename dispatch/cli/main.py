"""`dispatch`: the command line of Oyster Dispatch.

Read-only commands (`status`, `report`, `validate`) never import Prefect: they read the state the
project flow keeps under `DISPATCH_HOME`, and answer in milliseconds. The one exception is `status` without
a project in team mode, which also asks the server for every user's running projects (dispatch/prefect/team.py).
Exit codes: 0 success, 1 a spec failed (or the run was stopped), 2 invalid input.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatch.cli.common import EXIT_FAILED, EXIT_INVALID, MARK, checked, console, err, flow_run_url, invalid
from dispatch.cli.guardian import guardian
from dispatch.cli.models import models_app
from dispatch.cli.monitor import monitor
from dispatch.cli.nodes import nodes_app
from dispatch.cli.nodes_add import add_node
from dispatch.cli.pipeline import pipeline_app
from dispatch.cli.server import connect_prefect, server_app, ui
from dispatch.cli.snapshot import restore, snapshot
from dispatch.cli.status import report, status
from dispatch.cli.usage import usage as usage_command
from dispatch.core.dag import load_project, select
from dispatch.core.errors import DispatchError, ProjectInvalid, cut
from dispatch.core.paths import local_path
from dispatch.core.polling import WaitTimeout, wait_until
from dispatch.core.processes import pid_alive
from dispatch.core.report import render_markdown
from dispatch.core.results import load_state
from dispatch.core.settings import get_settings

app = typer.Typer(help="Run AI coding-agent specs across a cluster, on Prefect.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
app.add_typer(nodes_app, name="nodes")
nodes_app.command("add")(add_node)  # here, not in cli_nodes: cli_nodes_add uses its probe
app.add_typer(server_app, name="server")
app.add_typer(models_app, name="models")
app.add_typer(pipeline_app, name="pipeline")
app.command()(guardian)  # dispatch/cli/guardian.py: health checks, repairs, drains, alerts
# Registered before Prefect is imported, so it runs after Prefect's own exit handlers (logs, events flushed):
# the interpreter's last collections would otherwise walk every object Prefect's import made (~0.4 s per command).
atexit.register(gc.freeze)
@app.command()
def validate(project: str, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
             score: Annotated[bool, typer.Option("--score", help="Also score each spec's quality (0-100) and list "
                                                  "the rules it broke.")] = False):
    """Check a project's specs (front matter, dependencies, cycles) without running anything."""
    project = checked(project)
    settings = get_settings()
    try:
        proj = load_project(project, settings.specs_root_for(project))
    except ProjectInvalid as exc:
        if as_json:
            console.print_json(data={"project": project, "valid": False, "errors": [
                {"file": e.path, "field": e.field, "message": e.message} for e in exc.errors]})
            raise typer.Exit(EXIT_INVALID) from None
        raise invalid(exc) from None
    scores = _scores(proj) if score else None
    if as_json:
        data = {"project": project, "valid": True, "specs": proj.order}
        if scores is not None:
            from dispatch.pipeline.quality import average

            data |= {"scores": [s.as_dict() for s in scores], "average": average(scores)}
        console.print_json(data=data)
        return
    console.print(f"[green]{project}[/]: {len(proj.specs)} specs valid ({proj.specs_dir})")
    if scores is not None:
        _print_scores(scores)


def _scores(proj) -> list:
    from dispatch.pipeline.quality import score_spec

    return [score_spec(proj.specs[task_id]) for task_id in proj.order]


def _print_scores(scores: list) -> None:
    """A table of spec, score and the rules broken (below the pipeline's default gate in red)."""
    from dispatch.pipeline.config import Thresholds
    from dispatch.pipeline.quality import average

    gate = Thresholds()
    table = Table("spec", "score", "rules broken (points lost: what to do)", box=None, pad_edge=False)
    for row in sorted(scores, key=lambda s: (s.score, s.task_id)):
        color = ("red" if row.score < gate.spec_min_score else
                 "yellow" if row.score < gate.spec_warn_average else "green")
        broken = "\n".join(f"{b.rule} (-{b.weight}): {b.message}" for b in row.broken) or "-"
        table.add_row(escape(row.task_id), f"[{color}]{row.score}[/]", escape(broken))
    console.print(table)
    mean = average(scores)
    note = f" (under {gate.spec_warn_average:g}: L1 would warn)" if mean < gate.spec_warn_average else ""
    console.print(f"average {mean:.1f}{note}; rules and weights: dispatch/pipeline/quality.py")


def _clock(seconds: float) -> str:
    """`1:02:03`, `2:05`: seconds as a clock reading."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _progress_listener(total: int, console: Console = console):
    """A live progress bar for `dispatch start` and the listener the flow calls on every spec event.

    The bar shows specs done / total, how many run and how many failed (or were not run), and the time left:
    the longest remaining path through dependencies and file locks by the duration estimates (counted down
    between events); "estimating" until some duration was measured (this run or earlier ones).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class TimeLeft(ProgressColumn):
        def render(self, task) -> Text:
            deadline = task.fields.get("deadline")
            if deadline is None:
                return Text("estimating time left", style="dim")
            return Text(f"~{_clock(max(deadline - time.monotonic(), 0.0))} left")

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[running]} running, {task.fields[failed]} failed"),
                        TimeElapsedColumn(), TimeLeft(), console=console, transient=True)
    bar = progress.add_task("dispatching", total=total, running=0, failed=0, deadline=None)

    def listener(event: str, task_id: str, details: dict) -> None:
        if (counts := details.get("progress")) is not None:
            left = counts.get("remaining_s")
            progress.update(bar, completed=counts["done"], running=counts["running"], failed=counts["failed"],
                            deadline=time.monotonic() + left if left is not None else None)
        if event == "started":
            return
        result = details.get("result")
        if event == "succeeded":
            cached = " [dim](cached)[/]" if details.get("cached") else ""
            progress.console.print(f"{MARK[event]} {task_id}  {result.node}  {result.duration or 0:.1f}s{cached}")
        elif event == "retry":
            progress.console.print(f"{MARK['retrying']} {task_id}  retry {details['attempt']}: {details['reason']}")
        else:
            reason = details.get("reason") or (result.reason if result else "")
            progress.console.print(f"{MARK.get(event, '?')} {task_id}  {event.replace('_', ' ')}: {reason}")

    return progress, listener


@app.command()
def start(
    project: str,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only these specs (and what they need).")]
    = None,
    start_from: Annotated[list[str] | None, typer.Option("--from", help="Re-run these specs and their dependents.")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Ignore cached results; re-run every selected spec.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs (spec output too).")] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", "-d", help="Return at once: team mode submits the run to the deployment's worker, embedded "
                               "mode runs it in the background with its output in DISPATCH_HOME/logs.")] = False,
):
    """Run a project: every spec on a node with a free slot, in dependency order, until all are done."""
    project = checked(project)
    settings = get_settings()
    try:
        proj = load_project(project, settings.specs_root_for(project))
        selected = select(proj, only, start_from)
    except DispatchError as exc:
        raise invalid(exc) from None
    if detach:
        if settings.embedded:
            _start_in_background(settings, project, only, start_from, force, verbose)
        else:
            _submit_to_deployment(settings, project, only, start_from, force)
        return
    # Prefect and the flow are imported while a local server that this command starts comes up (~1 s)
    ui = connect_prefect(settings, verbose=verbose, meanwhile=lambda: importlib.import_module("flows.dispatch_project"))
    if settings.embedded and ui is None and sys.platform == "linux" and os.environ.get("PREFECT_HOME"):
        from dispatch.prefect.embedded import reap_orphaned_servers

        if stopped := reap_orphaned_servers(os.environ["PREFECT_HOME"]):
            console.print(f"[dim]stopped {len(stopped)} temporary Prefect server(s) that killed dispatchers had "
                          f"left running (pids {', '.join(map(str, stopped))})[/]")
    from dispatch.core.watch import Watch, watching
    from dispatch.prefect.team import whoami
    from flows.dispatch_project import dispatch_project

    where = (settings.prefect_api_url if not settings.embedded else f"the local Prefect server ({ui})" if ui
             else "a temporary Prefect server (SQLite under DISPATCH_HOME)")
    console.print(f"dispatching [bold]{project}[/]: {len(selected)} specs on {where}", soft_wrap=True)
    progress, listener = _progress_listener(len(selected))

    def show_flow_run(flow_run_id: str) -> None:
        if ui:
            progress.console.print(f"  flow run in the Prefect UI: {flow_run_url(ui, flow_run_id)}", soft_wrap=True)

    started = time.monotonic()
    user, host = whoami()
    try:
        # the flow tags its own run with the user (a tags() context would tag every task run)
        with progress, _engine_settings(settings), watching(Watch(on_event=listener, on_flow_run=show_flow_run)):
            final = dispatch_project(project, only=only, start_from=start_from, force=force,
                                     started_by=f"{user}@{host}", return_state=True)
        # invalid input the flow found (a spec's env sets a configured model's variable): exit 2 as above
        if final.is_failed() and isinstance(found := final.result(raise_on_failure=False), ProjectInvalid):
            raise found
    except DispatchError as exc:
        raise invalid(exc) from None
    state = load_state(settings.state_dir, project)
    if state is None:
        err.print(f"[red]the run of {project} ended without writing its state[/]; see the Prefect logs")
        raise typer.Exit(EXIT_FAILED)
    colour = {"completed": "green", "failed": "red"}.get(state.state, "yellow")
    console.print(f"[{colour}]{project} {state.state}[/]: {state.message} in {time.monotonic() - started:.1f}s")
    if ui and state.flow_run_id:
        console.print(f"  in the Prefect UI: {flow_run_url(ui, state.flow_run_id)}", soft_wrap=True)
    raise typer.Exit(0 if state.state == "completed" else EXIT_FAILED)


def _engine_settings(settings):
    """Prefect settings for this process's flow run. Embedded: no flow-run heartbeats. Nothing watches them
    there (the state file's pid tells a dead dispatcher), and the engine's heartbeat thread, which sleeps in
    1 s steps, held every run's end up by 0.5-1 s."""
    from contextlib import nullcontext

    if not settings.embedded:
        return nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _start_in_background(settings, project: str, only: list[str] | None, start_from: list[str] | None,
                         force: bool, verbose: bool) -> None:
    """Embedded `--detach`: `dispatch start` (same options) in its own session, output to DISPATCH_HOME/logs."""
    argv = [sys.executable, "-m", "dispatch.cli.main", "start", project]
    argv += [arg for spec in only or [] for arg in ("--only", spec)]
    argv += [arg for spec in start_from or [] for arg in ("--from", spec)]
    argv += ["--force"] * force + ["--verbose"] * verbose
    logs = settings.home_path("logs")
    logs.mkdir(parents=True, exist_ok=True)
    log_path = local_path(logs, f"{project}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # outlives this terminal; `dispatch stop` ends it
    console.print(f"started [bold]{project}[/] in the background (pid {proc.pid}), "
                  f"output in {escape(str(log_path))}\n"
                  f"watch it with `dispatch status {project}`"
                  + (" or in the Prefect UI (`dispatch ui`)" if settings.server == "local" else "")
                  + f", stop it with `dispatch stop {project}`", soft_wrap=True)


def _submit_to_deployment(settings, project: str, only: list[str] | None, start_from: list[str] | None,
                          force: bool) -> None:
    """Team `--detach`: a run of the project flow's deployment, for a worker on its pool to pick up."""
    os.environ.update(settings.prefect_environment())
    from dispatch.prefect.team import TeamServerError, submit_run

    try:
        run = submit_run(settings.prefect_api_url, settings.deployment, project=project, only=only,
                         start_from=start_from, force=force)
    except TeamServerError as exc:
        raise invalid(exc) from None
    if run.started_by_dropped:
        err.print(f"[yellow]warning:[/] {run.deployment} has no started_by parameter yet (deployed before it "
                  f"existed); its user tag still names you. Run `prefect deploy --all` again to update it.",
                  soft_wrap=True)
    console.print(f"submitted [bold]{project}[/] to {run.deployment} on {settings.prefect_api_url}\n"
                  f"  flow run {run.flow_run_name} ({run.flow_run_id})\n"
                  f"  watch it with `dispatch status`, `prefect flow-run logs {run.flow_run_id}`"
                  + (f" or in the UI: {run.url}" if run.url else ""),
                  soft_wrap=True)


app.command()(status)  # dispatch/cli/status.py: read-only views of the state files
app.command()(report)
app.command(name="usage")(usage_command)  # cost and tokens, dispatch/core/usage.py


@app.command()
def collect(project: str):
    """Bring the work back: logs, results and changed files; in git mode merge every spec's branch."""
    from dispatch.cluster.collect import collect_outputs
    from dispatch.cluster.config import load_project_config

    project = checked(project)
    settings = get_settings()
    state = load_state(settings.state_dir, project)
    if state is None:
        err.print(f"no run of {project!r} recorded; start one with `dispatch start {project}`")
        raise typer.Exit(EXIT_INVALID)
    try:
        config = load_project_config(settings, project)
        code_dir = Path(config.repo_local) if config.repo_local else settings.code_dir_for(project)
        summary = collect_outputs(settings, state, config, code_dir)
    except DispatchError as exc:
        raise invalid(exc) from None
    target = settings.project_dir("results", project)
    target.mkdir(parents=True, exist_ok=True)
    local_path(target, "report.md").write_text(render_markdown(state, settings.runs_dir), encoding="utf-8")
    console.print(f"collected {len(summary.copied)} spec(s) of {project} into {target}")
    for task_id, why in summary.unreachable.items():
        err.print(f"[yellow]{escape(task_id)}: could not fetch its outputs: {escape(why)}[/]", soft_wrap=True)
    for task_id, refused in summary.refused.items():
        err.print(f"[yellow]{escape(task_id)}: files_changed entries left out (they lead out of the code or "
                  f"results directory): {escape(', '.join(cut(r) for r in refused[:10]))}[/]", soft_wrap=True)
    if summary.merge is not None:
        table = Table("spec", "merge", "files", title=f"merged into {summary.merge.integration_branch}")
        for outcome in summary.merge.outcomes:
            table.add_row(outcome.task_id, outcome.status, ", ".join(outcome.files) or outcome.message[:60])
        console.print(table)
        conflicts = summary.merge.conflicts()
        if conflicts:
            err.print(f"[red]{len(conflicts)} spec(s) conflict:[/] " + ", ".join(
                f"{c.task_id} ({', '.join(c.files)})" for c in conflicts))
            raise typer.Exit(EXIT_FAILED)


@app.command()
def stop(project: str, wait: Annotated[float, typer.Option(help="Seconds to wait for the run to end.")] = 30.0):
    """Stop a running project from another terminal: its running specs are killed, its locks released."""
    from dispatch.cluster.collect import kill_everywhere

    project = checked(project)
    settings = get_settings()
    state = load_state(settings.state_dir, project)
    stopped = False
    if state is not None and state.state == "running" and pid_alive(state.pid):
        os.kill(state.pid, signal.SIGTERM)
        stopped = True
        try:
            wait_until(lambda: not pid_alive(state.pid), timeout=wait, interval=0.1, what="the dispatcher to stop")
        except WaitTimeout:
            err.print(f"[red]the dispatcher (pid {state.pid}) did not stop within {wait:.0f}s[/]")
            raise typer.Exit(EXIT_FAILED) from None
    orphans = kill_everywhere(settings, project)
    if stopped or orphans:
        console.print(f"stopped {project}" + (f" ({orphans} orphaned runner(s) killed)" if orphans else ""))
    else:
        console.print(f"{project} is not running")


@app.command()
def cleanup(project: str,
            all_: Annotated[bool, typer.Option("--all", help="Also remove reports, results and the cache.")] = False):
    """Remove a project's run directories (and with --all its reports, results and cached results).

    Refused while the project runs: its dispatcher is alive, or runners of it still live under `runs/`.
    Every path removed is built by `dispatch.core.paths` and proven inside DISPATCH_HOME.
    """
    from dispatch.cluster.transports.build import local_transport

    project = checked(project)
    settings = get_settings()
    state = load_state(settings.state_dir, project)
    if state is not None and state.state == "running" and pid_alive(state.pid):
        err.print(f"{project} is running (pid {state.pid}); stop it first with `dispatch stop {project}`")
        raise typer.Exit(EXIT_FAILED)
    live, _ = local_transport(settings.runs_dir).adoptable_runs(project)
    if live:
        err.print(f"{project} still has {len(live)} live runner(s) here ({escape(', '.join(sorted(live)[:10]))}); "
                  f"stop them first with `dispatch stop {project}`", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    from dispatch.cluster.collect import cleanup_everywhere, cleanup_here

    removed = cleanup_here(settings, project, everything=all_)
    failed = cleanup_everywhere(settings, project)
    console.print(f"removed {len(removed)} local path(s) of {project} and its run directories on the nodes")
    for node, why in failed.items():
        err.print(f"[yellow]node {node}: not cleaned: {escape(why)}[/]", soft_wrap=True)


app.command()(ui)
app.command()(snapshot); app.command()(restore)  # noqa: E702 - dispatch/cli/snapshot.py
app.command()(monitor)  # dispatch/cli/monitor.py: the live view of the cluster


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
