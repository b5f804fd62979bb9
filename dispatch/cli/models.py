"""`dispatch models`: each agent model's state, and clearing a cool-down or billing block by hand.

    dispatch models [--json]      every model (built-ins and AgentModel blocks): its CLI and the version found
                                  here, its endpoint, and its state: available, cooling until <time> (reason,
                                  by whom), or blocked for billing
    dispatch models set NAME ...  save NAME's AgentModel block: command, endpoint, env, key
    dispatch models reset NAME    clear NAME's cool-down or billing block

Models and cool-downs live in the Prefect API (AgentModel blocks, dispatch/core/cooldowns.py): the team's server, or in
embedded mode the local server of DISPATCH_HOME. A key is never an argument (it would show in `ps` and the shell's
history): `--key-env VAR` reads it from this shell's variable VAR, `--key-stdin` from standard input. Exit codes:
0 success, 1 the Prefect API failed, 2 an unknown model or invalid input.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatch.core.errors import ConfigError, UnsafePath
from dispatch.core.model_catalog import BUILTIN_MODELS
from dispatch.core.paths import check_name
from dispatch.core.settings import DispatchSettings, get_settings

models_app = typer.Typer(help="Show each agent model's state (no subcommand): available, cooling down after a "
                               "quota, or blocked for billing; `reset` clears one.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED, EXIT_INVALID = 1, 2


def _connect(settings: DispatchSettings) -> None:
    """Point Prefect at the configured server (embedded: this home's local server) before it is imported."""
    from dispatch.cli.server import connect_prefect

    connect_prefect(settings)


def _api_failed(settings: DispatchSettings, exc: Exception) -> typer.Exit:
    where = "embedded Prefect (SQLite under DISPATCH_HOME)" if settings.embedded else settings.prefect_api_url
    err.print(f"[red]error:[/] the Prefect API at {escape(str(where))} failed: {escape(str(exc))} "
              "(is the server up, and PREFECT_API_URL right?)", soft_wrap=True)
    return typer.Exit(EXIT_FAILED)


def _block_documents() -> dict[str, dict[str, Any]]:
    """The models saved as AgentModel blocks: name -> the block's fields, its key obfuscated (never read)."""
    import httpx
    from prefect.client.orchestration import get_client

    from blocks.agent_model import AgentModel

    with get_client(sync_client=True) as client:
        try:
            documents = client.read_block_documents_by_type(AgentModel.get_block_type_slug(), offset=0, limit=200,
                                                            include_secrets=False)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:  # the block type was never registered: no blocks
                return {}
            raise
    return {str(doc.data.get("name") or doc.name): dict(doc.data) for doc in documents}


def _block_models() -> set[str]:
    """Names of the models saved as AgentModel blocks (their `name` field; no secret is read)."""
    return set(_block_documents())


def _version(cli: str) -> str:
    """What `<cli> --version` prints here (first line), "not found" when it is not on PATH."""
    path = shutil.which(cli)
    if path is None:
        return "not found"
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return (lines[0][:60] if lines else "?") if done.returncode == 0 else f"unknown (exit {done.returncode})"


def _describe_cli(name: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """A model's command, its CLI and endpoint, and whether a key is saved, from its block or the built-in."""
    builtin = BUILTIN_MODELS.get(name)
    if block:
        command = list(block.get("command") or [])
        env = dict(block.get("env") or {})
        endpoint = block.get("base_url") or env.get("ANTHROPIC_BASE_URL") or env.get("OPENAI_BASE_URL")
        has_key = block.get("api_key") is not None
    else:
        command = list(builtin.argv) if builtin else []
        endpoint = builtin.env.get("ANTHROPIC_BASE_URL") if builtin else None
        has_key = False
    return {"command": command, "cli": command[0] if command else None,
            "endpoint": endpoint or ("the CLI's default" if command else None),
            "source": "block" if block else "built-in", "key_saved": has_key}


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
    from dispatch.core.cooldowns import model_state
    from dispatch.prefect.cooldowns import server_cooldowns
    from dispatch.prefect.errors import API_ERRORS

    try:
        blocks = _block_documents()
        cooling = server_cooldowns(refresh=0).load()
    except API_ERRORS as exc:
        raise _api_failed(settings, exc) from None
    now = time.time()
    names = sorted(set(BUILTIN_MODELS) | set(blocks) | set(cooling))
    rows = [{**model_state(name, cooling.get(name), now), **_describe_cli(name, blocks.get(name))} for name in names]
    clis = sorted({row["cli"] for row in rows if row["cli"]})
    with ThreadPoolExecutor(max_workers=max(1, len(clis))) as pool:  # each CLI once, at the same time
        versions = dict(zip(clis, pool.map(_version, clis), strict=True))
    for row in rows:
        row["version"] = versions.get(row["cli"]) if row["cli"] else None
    if as_json:
        console.print_json(data={"models": rows, "now": now})
        return
    table = Table("model", "CLI", "version here", "endpoint", "key", "state")
    for row in rows:
        table.add_row(escape(row["model"]), escape(str(row["cli"] or "-")), escape(str(row["version"] or "-")),
                      escape(str(row["endpoint"] or "-")), "saved" if row["key_saved"] else "-", _describe(row))
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
    from dispatch.prefect.cooldowns import server_cooldowns
    from dispatch.prefect.errors import API_ERRORS

    keeper = server_cooldowns(refresh=0)
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


@models_app.command("set")
def set_model(
    model: Annotated[str, typer.Argument(help="The model's name as specs use it, e.g. glm, or a new one.")],
    command: Annotated[str | None, typer.Option(
        "--command", help='The CLI command, with the word {prompt} where the prompt goes (it is read on stdin), '
                          'e.g. "claude -p --output-format stream-json --verbose {prompt}". Default: the '
                          "saved or built-in one.")] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="The model's endpoint, passed to its CLI the way that CLI reads it.")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="A non-secret variable for the CLI, K=V (repeat the option; K= removes K).")] = None,
    key_env: Annotated[str | None, typer.Option(
        "--key-env", help="Read the API key from this variable of your shell (never give a key as an argument).")
    ] = None,
    key_stdin: Annotated[bool, typer.Option("--key-stdin", help="Read the API key from standard input.")] = False,
    key_var: Annotated[str | None, typer.Option(
        "--key-var", help="The variable the CLI reads its key from (default: the built-in model's, e.g. "
                          "ANTHROPIC_AUTH_TOKEN for glm).")] = None,
) -> None:
    """Save a model's AgentModel block (the team's server, or the embedded default's): command, endpoint, env,
    key. Fields not given keep their saved (or built-in) value."""
    from dispatch.cli.common import invalid

    try:
        check_name(model, "model name")
        if key_env and key_stdin:
            raise ConfigError("give the key one way: --key-env VAR or --key-stdin, not both")
        key = _read_key(key_env, key_stdin)
        updates = _env_updates(env or [])
    except (ConfigError, UnsafePath) as exc:
        raise invalid(exc) from None
    settings = get_settings()
    _connect(settings)
    from pydantic import SecretStr, ValidationError

    from blocks.agent_model import AgentModel
    from blocks.cluster_node import block_name
    from dispatch.prefect.errors import API_ERRORS

    try:
        saved = model in _block_documents()
        fields = AgentModel.load(block_name(model)).model_dump() if saved else _new_fields(model, command)
    except API_ERRORS as exc:
        raise _api_failed(settings, exc) from None
    except ConfigError as exc:
        raise invalid(exc) from None
    try:
        if command is not None:
            fields["command"] = shlex.split(command)
        if base_url is not None:
            fields["base_url"] = base_url or None
        if updates:
            fields["env"] = {k: v for k, v in {**fields.get("env", {}), **updates}.items() if v != ""}
        if key_var is not None:
            fields["key_env"] = key_var or None
        if key is not None:
            fields["api_key"] = SecretStr(key)
            fields["key_env"] = fields.get("key_env") or _default_key_var(model)
        current = AgentModel(**fields)
    except ValueError as exc:  # ValidationError, or shlex's "No closing quotation"
        message = "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
        raise invalid(ConfigError(f"model {model}: {message}")) from None
    except ConfigError as exc:
        raise invalid(exc) from None
    try:
        current.save(block_name(model), overwrite=True)
    except API_ERRORS as exc:
        raise _api_failed(settings, exc) from None
    described = _describe_cli(model, {**current.model_dump(), "api_key": current.api_key})
    key_note = f"key saved (read by the CLI as {current.key_env})" if current.api_key else "no key saved"
    console.print(f"{escape(model)}: saved block {AgentModel.get_block_type_slug()}/{escape(block_name(model))}: "
                  f"{escape(shlex.join(current.command))}; endpoint {escape(str(described['endpoint']))}; "
                  f"{escape(key_note)}", soft_wrap=True)


def _read_key(key_env: str | None, key_stdin: bool) -> str | None:
    """The key from the caller's variable or stdin (one line), or None when neither is asked for."""
    if key_env:
        value = os.environ.get(key_env, "")
        if not value:
            raise ConfigError(f"--key-env {key_env}: that variable is not set (or empty) in this shell; export it "
                              "first, or pipe the key to --key-stdin")
        return value
    if key_stdin:
        value = sys.stdin.readline(16384).strip()
        if not value:
            raise ConfigError("--key-stdin: nothing was read from standard input; pipe the key in, e.g. "
                              "`pass show glm | dispatch models set glm --key-stdin`")
        return value
    return None


def _env_updates(pairs: list[str]) -> dict[str, str]:
    """`--env K=V` options as a mapping (V empty: remove K)."""
    updates = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ConfigError(f"--env {pair!r}: give NAME=VALUE with a variable name (letters, digits, _)")
        updates[name] = value
    return updates


def _default_key_var(model: str) -> str | None:
    builtin = BUILTIN_MODELS.get(model)
    if builtin is None or not builtin.key_env:
        raise ConfigError(f"model {model}: a key needs --key-var, the variable its CLI reads the key from "
                          "(e.g. ANTHROPIC_API_KEY)")
    return builtin.key_env


def _new_fields(model: str, command: str | None) -> dict[str, Any]:
    """A model without a block: the built-in one's fields, else a new one's (which needs `--command`)."""
    from blocks.agent_model import AgentModel

    if model in BUILTIN_MODELS:
        return AgentModel.builtin(model).model_dump()
    if command is None:
        raise ConfigError(f"model {model} is new: give its CLI command with --command (built-in models: "
                          f"{', '.join(sorted(BUILTIN_MODELS))})")
    return {"name": model, "command": shlex.split(command)}
