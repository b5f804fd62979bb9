"""`dispatch guardian`: check the cluster's health, repair what is safe, drain sick nodes, alert on changes.

    dispatch guardian --once [--json]   one cycle; exit 0 only when every check is ok or REPAIRED
    dispatch guardian                   a cycle every DISPATCH_GUARDIAN_INTERVAL seconds (default 300)

FAIL and NOT RUN exit 1, with the reason printed; a bad nodes.json exits 2. The `guardian` deployment
(prefect.yaml) runs the same cycle every 5 minutes in team mode.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dispatch.cli.common import EXIT_FAILED, console, err, invalid
from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings

_STYLE = {"ok": "green", "REPAIRED": "cyan", "FAIL": "red", "NOT RUN": "yellow"}


def _print(report) -> None:  # noqa: ANN001 - dispatch.ops.guardian.CycleReport, imported late
    table = Table("target", "check", "status", "detail", "repair", title="guardian cycle")
    for check in report.checks:
        style = _STYLE[check.status]
        table.add_row(escape(check.target), check.name, f"[{style}]{check.status}[/]", escape(check.detail),
                      escape(check.repair or "-"))
    console.print(table)
    for check in report.problems:  # whole reasons below the table: they say what to do
        err.print(f"[{_STYLE[check.status]}]{check.status}[/] {escape(check.target)} {check.name}: "
                  f"{escape(check.detail)}", soft_wrap=True)
    for name in report.drained:
        console.print(f"drained {escape(name)} (failing {get_settings().guardian_drain_after} cycles in a row)")
    for name in report.undrained:
        console.print(f"undrained {escape(name)} (healthy again)")
    console.print(f"{len(report.alerts)} alert(s); alerts go to {escape(report.alerts_to)}", soft_wrap=True)
    for error in report.alert_errors:
        err.print(f"[yellow]warning:[/] {escape(error)}", soft_wrap=True)
    console.print(f"[dim]{len(report.checks)} checks in {report.duration:.1f} s[/]")


def guardian(
    once: Annotated[bool, typer.Option("--once", help="Run one cycle and exit (else loop every interval).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (one object per cycle).")] = False,
    no_repair: Annotated[bool, typer.Option("--no-repair", help="Only look: try no repair.")] = False,
    interval: Annotated[float | None, typer.Option(
        help="Seconds between cycles (default DISPATCH_GUARDIAN_INTERVAL, 300).", min=10)] = None,
) -> None:
    """Check every node and the Prefect server, repair what is safe, drain failing nodes, alert on changes."""
    settings = get_settings()
    if not settings.embedded or settings.alert_block:
        from dispatch.cli.server import connect_prefect

        connect_prefect(settings)
    from dispatch.ops.guardian import run_cycle

    code = 0
    try:
        while True:
            try:
                report = run_cycle(settings, repair=not no_repair)
            except ConfigError as exc:
                raise invalid(exc) from None
            code = report.exit_code
            if as_json:
                console.print_json(data=report.to_json())
            else:
                _print(report)
            if once:
                break
            time.sleep(interval or settings.guardian_interval)
    except KeyboardInterrupt:  # Ctrl-C ends the loop; the exit code is the last whole cycle's
        err.print("stopped")
    if code:
        raise typer.Exit(EXIT_FAILED)
