"""`dispatch models`: each agent model's state, and clearing a cool-down or billing block by hand.

    dispatch models [--json]      every model (built-ins and AgentModel blocks): available, cooling until
                                  <time> (reason, by whom), or blocked for billing
    dispatch models reset NAME    clear NAME's cool-down or billing block

Cool-downs live in the Prefect API (dispatch/cooldowns.py): the team's server, or in embedded mode the
database under DISPATCH_HOME (Prefect then starts a temporary local server: a few seconds). Exit codes:
0 success, 1 the Prefect API failed, 2 an unknown model.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatch.agents import BUILTIN_MODELS
from dispatch.settings import DispatchSettings, get_settings

models_app = typer.Typer(help="Show each agent model's state (no subcommand): available, cooling down after a "
                               "quota, or blocked for billing; `reset` clears one.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED, EXIT_INVALID = 1, 2


def _connect(settings: DispatchSettings) -> None:
    """Point Prefect at the configured server (embedded: this home's local server) before it is imported."""
    from dispatch.cli_server import connect_prefect

    connect_prefect(settings)


def _api_failed(settings: DispatchSettings, exc: Exception) -> typer.Exit:
    where = "embedded Prefect (SQLite under DISPATCH_HOME)" if settings.embedded else settings.prefect_api_url
    err.print(f"[red]error:[/] the Prefect API at {escape(str(where))} failed: {escape(str(exc))} "
              "(is the server up, and PREFECT_API_URL right?)", soft_wrap=True)
    return typer.Exit(EXIT_FAILED)


def _block_models() -> set[str]:
    """Names of the models saved as AgentModel blocks (their `name` field; no secret is read)."""
    import httpx
    from prefect.client.orchestration import get_client

    from blocks.agent_model import AgentModel

    with get_client(sync_client=True) as client:
        try:
            documents = client.read_block_documents_by_type(AgentModel.get_block_type_slug(), offset=0, limit=200,
                                                            include_secrets=False)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:  # the block type was never registered: no blocks
                return set()
            raise
    return {str(doc.data.get("name") or doc.name) for doc in documents}


def _when(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment))


def _describe(row: dict[str, Any]) -> str:
    if row["state"] == "available":
        return "[green]available[/]"
    who = f"{escape(str(row['reason'] or ''))}, seen by {escape(str(row['by'] or '?'))}"
    if row["state"] == "blocked":
        return f"[red]blocked for billing[/] ({who})"
    return f"[yellow]cooling until {_when(row['until'])}[/] ({who})"


@models_app.callback(invoke_without_command=True)
def list_models(ctx: typer.Context,
                as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Every model with its state: available, cooling until <time> (reason, by whom), or blocked for billing."""
    if ctx.invoked_subcommand is not None:
        return
    settings = get_settings()
    _connect(settings)
    from dispatch.cooldowns import API_ERRORS, Cooldowns, model_state

    try:
        names = set(BUILTIN_MODELS) | _block_models()
        cooling = Cooldowns(refresh=0).load()
    except API_ERRORS as exc:
        raise _api_failed(settings, exc) from None
    now = time.time()
    rows = [model_state(name, cooling.get(name), now) for name in sorted(names | set(cooling))]
    if as_json:
        console.print_json(data={"models": rows, "now": now})
        return
    table = Table("model", "state")
    for row in rows:
        table.add_row(escape(row["model"]), _describe(row))
    console.print(table)
    for row in rows:
        if row["state"] == "blocked":
            console.print(f"{escape(row['model'])} is blocked for billing: fix the account, then run "
                          f"`dispatch models reset {escape(row['model'])}`", soft_wrap=True)


@models_app.command("reset")
def reset_model(model: Annotated[str, typer.Argument(help="The model to make available again, e.g. glm.")]) -> None:
    """Clear a model's cool-down or billing block (after fixing its account), for every user of this API."""
    settings = get_settings()
    _connect(settings)
    from dispatch.cooldowns import API_ERRORS, Cooldowns

    keeper = Cooldowns(refresh=0)
    try:
        known = set(BUILTIN_MODELS) | _block_models() | set(keeper.load())
    except API_ERRORS as exc:
        raise _api_failed(settings, exc) from None
    if model not in known:
        err.print(f"[red]error:[/] unknown model {escape(repr(model))}; known models: "
                  f"{escape(', '.join(sorted(known)))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    try:
        had = keeper.clear(model)
    except API_ERRORS as exc:
        raise _api_failed(settings, exc) from None
    if had:
        console.print(f"{escape(model)}: cool-down cleared; specs use it again")
    else:
        console.print(f"{escape(model)} was not cooling down or blocked; nothing to clear")
