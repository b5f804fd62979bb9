"""`dispatch pipeline run|status`: the six-layer pipeline from the command line.

`run` checks the configuration and the layer selection before Prefect is imported (exit 2, nothing run),
then runs the `pipeline` flow in this process with a line per layer as it ends, on the Prefect server
`dispatch start` uses (embedded: this home's local server), and prints the flow run's page in the Prefect UI
when it begins and in the summary. `status` reads the run's
report files only (no Prefect), so it answers at once. Exit codes: 0 every layer run passed, 1 a layer
FAIL or NOT RUN, 2 invalid configuration or options; `status` exits 1 only when there is no run to show.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatch.cli.common import flow_run_url
from dispatch.cli.server import connect_prefect
from dispatch.core.errors import ConfigError
from dispatch.core.processes import pid_alive
from dispatch.core.settings import get_settings
from dispatch.core.watch import Watch, watching
from dispatch.pipeline.config import CONFIG_NAME, load_pipeline_config
from dispatch.pipeline.results import LAYER_NAMES
from dispatch.pipeline.runs import RunRecord, final_rows, latest_run, project_dir, selection

pipeline_app = typer.Typer(help="The six-layer pipeline: analyze, implement, build, test, fix, deploy.",
                           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_COLOUR = {"PASS": "green", "FAIL": "red", "NOT RUN": "yellow"}


def _invalid(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(2)


def _row_line(row: dict) -> str:
    colour = _COLOUR.get(row["status"], "white")
    cycle = f" cycle {row['cycle']}" if row["cycle"] else ""
    took = f" {row['duration']:.1f}s" if row.get("duration") is not None else ""
    notes = " [dim](cached)[/]" * row["cached"] + (f" [dim]{row['attempts']} attempts[/]" if row["attempts"] > 1
                                                    else "") + " [dim](turned off)[/]" * (not row["counted"])
    name = LAYER_NAMES.get(row["layer"], "")
    return (f"[{colour}]{row['status']:>7}[/] {row['layer']} {name}{cycle}{took}{notes}: "
            f"{escape(row['reason'][:300])}")


def _flow_run_page(ui: str | None, flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, as `dispatch start` prints it (None: no UI to show it)."""
    return flow_run_url(ui, flow_run_id) if ui and flow_run_id else None


def _watch(stream: Console, ui: str | None) -> Watch:
    """The run's progress on `stream`: where to see it in the UI, then a line as each layer starts and ends."""
    def flow_run(flow_run_id: str) -> None:
        if page := _flow_run_page(ui, flow_run_id):
            stream.print(f"  flow run in the Prefect UI: {page}", soft_wrap=True)

    def event(kind: str, layer: str, data: dict) -> None:
        if kind == "start":
            cycle = f" (cycle {data['cycle']})" if data["cycle"] else ""
            stream.print(f"[cyan]    ...[/] {layer} {LAYER_NAMES.get(layer, '')}{cycle}")
        else:
            stream.print(_row_line(data), soft_wrap=True)

    return Watch(on_event=event, on_flow_run=flow_run)


def _summary(record: RunRecord, ui: str | None) -> None:
    colour = "green" if record.exit_code == 0 else "red"
    took = (record.ended_at or time.time()) - record.started_at
    console.print(f"[{colour}]{record.project} {record.state}[/] in {took:.1f}s (run {record.run_id}): "
                  f"{escape(record.message)}", soft_wrap=True)
    not_run = [row for row in final_rows(record.layers) if row.counted and row.status.value == "NOT RUN"]
    for row in not_run:
        console.print(f"  [yellow]NOT RUN[/] {row.layer}: {escape(row.reason)}", soft_wrap=True)
    for bug in record.open_bugs[:20]:
        console.print(f"  [red]{bug['severity']}[/] {bug['id']} {escape(bug['where'])}: {escape(bug['title'])}"
                      + (f" ({escape(bug['file'])})" if bug.get("file") else ""), soft_wrap=True)
    console.print(f"  reports: {escape(str(project_dir(get_settings().home, record.project) / record.run_id))}")
    if page := _flow_run_page(ui, record.flow_run_id):
        console.print(f"  in the Prefect UI: {page}", soft_wrap=True)


@pipeline_app.command("run")
def run(
    project: str,
    from_layer: Annotated[str | None, typer.Option("--from", help="First layer to run (L1..L6).")] = None,
    to_layer: Annotated[str | None, typer.Option("--to", help="Last layer to run (L1..L6).")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Just this layer (L1..L6, or L4a..L4d).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every layer, cached or not.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The run's summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
):
    """Run the pipeline over a project: PASS, FAIL or NOT RUN per layer, reports under DISPATCH_HOME/pipeline."""
    settings = get_settings()
    try:
        selection(from_layer, to_layer, only)
        project_dir(settings.home, project)
        load_pipeline_config(settings.specs_root_for(project) / CONFIG_NAME)
    except ConfigError as exc:
        raise _invalid(str(exc)) from None
    # as `dispatch start`: the flow is imported while a local server this command starts comes up
    ui = connect_prefect(settings, verbose=verbose, meanwhile=lambda: importlib.import_module("flows.pipeline"))
    if settings.embedded and ui is None and sys.platform == "linux" and os.environ.get("PREFECT_HOME"):
        from dispatch.prefect.embedded import reap_orphaned_servers

        reap_orphaned_servers(os.environ["PREFECT_HOME"])
    from flows.pipeline import pipeline

    stream = err if as_json else console
    stream.print(f"pipeline [bold]{escape(project)}[/] on "
                 + (settings.prefect_api_url if not settings.embedded else f"the local Prefect server ({ui})" if ui
                    else "a temporary Prefect server (SQLite under DISPATCH_HOME)"), soft_wrap=True)
    try:
        with watching(_watch(stream, ui)):
            pipeline(project, from_layer=from_layer, to_layer=to_layer, only=only, force=force, return_state=True)
    except ConfigError as exc:
        raise _invalid(str(exc)) from None
    record = latest_run(project_dir(settings.home, project))
    if record is None:
        err.print(f"[red]the pipeline of {escape(project)} ended without writing its summary[/]; see Prefect's logs")
        raise typer.Exit(1)
    if as_json:
        console.print_json(data=record.model_dump(mode="json"))
        if page := _flow_run_page(ui, record.flow_run_id):
            err.print(f"  in the Prefect UI: {page}", soft_wrap=True)
    else:
        _summary(record, ui)
    raise typer.Exit(record.exit_code if record.exit_code is not None else 1)


@pipeline_app.command("status")
def status(
    project: str,
    run_id: Annotated[str | None, typer.Option("--run", help="A run id (default: the newest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """The last pipeline run of a project, per layer: result, attempts, cycle, duration, reason, report."""
    settings = get_settings()
    try:
        record = latest_run(project_dir(settings.home, project), run_id)
    except ConfigError as exc:
        raise _invalid(str(exc)) from None
    if record is None:
        err.print(f"no pipeline run of {escape(project)} yet: dispatch pipeline run {escape(project)}")
        raise typer.Exit(1)
    if record.state == "running" and not pid_alive(record.pid):
        record.state, record.message = "interrupted", f"its dispatcher (pid {record.pid}) is gone"
    if as_json:
        console.print_json(data=record.model_dump(mode="json"))
        return
    table = Table(title=f"{record.project} pipeline run {record.run_id}: {record.state}")
    for column in ("layer", "cycle", "result", "attempts", "time", "reason", "report"):
        table.add_column(column, overflow="fold")
    for row in record.layers:
        colour = _COLOUR.get(row.status.value, "white")
        table.add_row(f"{row.layer} {LAYER_NAMES.get(row.layer, '')}", str(row.cycle),
                      f"[{colour}]{row.status.value}[/]" + " (cached)" * row.cached + " (off)" * (not row.counted),
                      str(row.attempts), "" if row.duration is None else f"{row.duration:.1f}s",
                      escape(row.reason[:200]), escape(row.report))
    console.print(table)
    if record.message:
        console.print(escape(record.message), soft_wrap=True)


def main() -> None:  # pragma: no cover - `python -m dispatch.cli.pipeline`
    pipeline_app(prog_name="dispatch pipeline")


if __name__ == "__main__":  # pragma: no cover
    main()
