"""What the `dispatch` commands share: the consoles, the exit codes, the state marks, and how bad input ends a
command (exit 2, naming the file and field, before anything is read or written)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from dispatch.core.errors import ProjectInvalid, UnsafePath, cut
from dispatch.core.paths import check_name

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED, EXIT_INVALID = 1, 2
MARK = {"succeeded": "[green]✓[/]", "failed": "[red]✗[/]", "not_run": "[yellow]⊘[/]", "cancelled": "[yellow]■[/]",
        "running": "[cyan]▶[/]", "retrying": "[magenta]↻[/]", "waiting": "·", "ready": "·"}


def invalid(exc: Exception) -> typer.Exit:
    """Say why the input is invalid (every file and field of an invalid project) and exit 2."""
    if isinstance(exc, ProjectInvalid):
        err.print(f"[red]project {escape(cut(exc.project))} is invalid[/] ({len(exc.errors)} error(s)); "
                  "nothing was scheduled:")
        for problem in exc.errors:
            err.print(f"  [bold]{escape(problem.path)}[/]: {escape(problem.field)}: {escape(problem.message)}",
                      soft_wrap=True)
    else:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def checked(project: str) -> str:
    """The project name from the command line, or exit 2 before anything is read or written."""
    try:
        return check_name(project, "project name")
    except UnsafePath as exc:
        raise invalid(exc) from None


def flow_run_url(ui: str, flow_run_id: str) -> str:
    """The flow run's page in the Prefect UI (the address Prefect's own `url_for` gives)."""
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
