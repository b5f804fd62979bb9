"""`dispatch server`: run the team's Prefect server for a test or a small team, and check that it answers.

    dispatch server start [--host H] [--port P] [--postgres-url URL]   a Prefect server, in the foreground
    dispatch server check [--url URL]                                  is PREFECT_API_URL up, and are we let in?

`start` is `prefect server start` with team-mode settings: the database (PostgreSQL with `--postgres-url`,
else SQLite under `DISPATCH_HOME/prefect-server`), concurrency leases kept on disk so a restart keeps the
slots, telemetry off; `PREFECT_SERVER_API_AUTH_STRING` from the environment turns on basic auth. For a
permanent server use `infra/prefect-server.service` (docs/team-mode.md).

`check` never imports Prefect: one GET of `<api>/health` (reachable?) and one of `<api>/admin/version` with
`PREFECT_API_AUTH_STRING` (let in?). Exit codes: 0 up and let in, 2 not configured, unreachable or refused.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dispatch.settings import DispatchSettings, get_settings

server_app = typer.Typer(help="Start a Prefect server for team mode (tests, small teams) and check the configured "
                              "one.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_INVALID = 2
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
"""Prefect 3.9's filesystem lease storage: leases under `$PREFECT_HOME/concurrency_leases` survive a restart."""
_TIMEOUT = 5.0


def _auth_string(settings: DispatchSettings) -> str | None:
    """The client's basic-auth string (`user:password`), or None; unwrapped only here, to send it."""
    value = settings.prefect_api_auth_string
    return value.get_secret_value() if value is not None else None


def server_environment(settings: DispatchSettings, postgres_url: str | None) -> dict[str, str]:
    """The environment of a team-mode `prefect server start` (without the caller's PREFECT_API_URL)."""
    env = {**os.environ, **settings.prefect_environment(verbose=True),
           "PREFECT_HOME": str(settings.prefect_home or settings.home / "prefect-server"),
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # a server does not talk to another one
    if postgres_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_url
    return env


@server_app.command()
def start(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for the team (set an auth string).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 4200,
    postgres_url: Annotated[str | None, typer.Option(
        "--postgres-url", help="postgresql+asyncpg://user:password@host:port/db; default SQLite under "
                               "DISPATCH_HOME (fine for one user, not for a team's concurrency limits).")] = None,
):
    """Run a Prefect server in the foreground (Ctrl-C stops it) and print the PREFECT_API_URL to set."""
    settings = get_settings()
    if postgres_url and not postgres_url.startswith("postgresql+asyncpg://"):
        err.print(f"[red]error:[/] --postgres-url must start with postgresql+asyncpg:// (Prefect's async driver), "
                  f"got {escape(postgres_url.split('://')[0])}://...", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    env = server_environment(settings, postgres_url)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    database = "PostgreSQL" if postgres_url else f"SQLite under {env['PREFECT_HOME']}"
    console.print(f"Prefect server on {host}:{port} ({database}); members and workers set:\n"
                  f"  export PREFECT_API_URL=http://{shown}:{port}/api", soft_wrap=True)
    if env.get("PREFECT_SERVER_API_AUTH_STRING"):
        console.print("  export PREFECT_API_AUTH_STRING=<the server's user:password>")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        err.print("[yellow]warning:[/] listening beyond loopback without PREFECT_SERVER_API_AUTH_STRING: "
                  "anyone who can reach the port can run code on your workers")
    sys.stdout.flush()
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    os.execve(sys.executable, argv, env)  # the foreground server replaces this process: signals go straight to it


def _get(url: str, auth: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@server_app.command()
def check(url: Annotated[str | None, typer.Option(help="API URL to check; default PREFECT_API_URL.")] = None):
    """Check that the Prefect server answers and accepts our credentials (PREFECT_API_AUTH_STRING)."""
    settings = get_settings()
    api = (url or settings.prefect_api_url or "").rstrip("/")
    if not api:
        err.print("[red]error:[/] no Prefect server configured: set PREFECT_API_URL (e.g. "
                  "http://gateway:4200/api) or pass --url; without it dispatch runs embedded on SQLite", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    try:
        status, _ = _get(f"{api}/health", None)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        err.print(f"[red]error:[/] cannot reach the Prefect server at {escape(api)} (tried {escape(api)}/health: "
                  f"{escape(str(reason))}); is the server running and PREFECT_API_URL right?", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    if status != 200:
        err.print(f"[red]error:[/] {escape(api)}/health answered HTTP {status}: is this a Prefect API URL "
                  f"(it ends in /api)?", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    auth = _auth_string(settings)
    try:
        status, body = _get(f"{api}/admin/version", auth)
    except OSError as exc:
        err.print(f"[red]error:[/] {escape(api)} stopped answering: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    if status == 401:
        hint = ("PREFECT_API_AUTH_STRING does not match the server's PREFECT_SERVER_API_AUTH_STRING" if auth
                else "the server requires basic auth: set PREFECT_API_AUTH_STRING=user:password")
        err.print(f"[red]error:[/] the Prefect server at {escape(api)} refused us (HTTP 401): {hint}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    if status != 200:
        err.print(f"[red]error:[/] {escape(api)}/admin/version answered HTTP {status}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    try:
        version = json.loads(body)
    except ValueError:
        version = body.decode(errors="replace")
    console.print(f"[green]ok[/]: {escape(api)} (Prefect {escape(str(version))}"
                  f"{', basic auth' if auth else ''})")
