"""`dispatch server`: the embedded default's local Prefect server, and the team's server for a test or a small team.

    dispatch server status [--json]                                    this home's local server (embedded mode)
    dispatch server stop                                               stop it (the next command starts it again)
    dispatch server start [--host H] [--port P] [--postgres-url URL]   a Prefect server, in the foreground
    dispatch server check [--url URL]                                  is PREFECT_API_URL up, and are we let in?
    dispatch ui [--open]                                               the Prefect UI (starting the local server)

`status`, `stop` and `ui` never import Prefect: the local server is a process with a state file
(dispatch/prefect/embedded.py).

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
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dispatch.core.net import health_status
from dispatch.core.settings import DispatchSettings, get_settings

server_app = typer.Typer(help="The local Prefect server of the embedded default (status, stop), and a server for "
                              "team mode (start, check).", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_NOT_RUNNING, EXIT_INVALID = 1, 2
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
    # the UI asks /ui-settings for its API: without these it names port 4200 whatever --port says
    env.update({"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)})
    ui_api_given = "PREFECT_UI_API_URL" in env
    env.setdefault("PREFECT_UI_API_URL", f"http://{shown}:{port}/api")
    database = "PostgreSQL" if postgres_url else f"SQLite under {env['PREFECT_HOME']}"
    console.print(f"Prefect server on {host}:{port} ({database}); members and workers set:\n"
                  f"  export PREFECT_API_URL=http://{shown}:{port}/api", soft_wrap=True)
    if env.get("PREFECT_SERVER_API_AUTH_STRING"):
        console.print("  export PREFECT_API_AUTH_STRING=<the server's user:password>")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        err.print("[yellow]warning:[/] listening beyond loopback without PREFECT_SERVER_API_AUTH_STRING: "
                  "anyone who can reach the port can run code on your workers")
    if shown != host and not ui_api_given:
        err.print(f"[yellow]note:[/] the UI tells browsers to find the API at {env['PREFECT_UI_API_URL']}; for "
                  f"browsers on other machines set PREFECT_UI_API_URL=http://<this machine's name>:{port}/api",
                  soft_wrap=True)
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
        status = health_status(api, _TIMEOUT)
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


def connect_prefect(settings: DispatchSettings, verbose: bool = False,
                    meanwhile: Callable[[], object] | None = None) -> str | None:
    """Set up Prefect for this command (embedded: start or reuse the local server, saying so when it starts;
    `meanwhile` runs while it starts, see `prepare_prefect`); returns the UI's base URL (None: a temporary
    server, no UI after the command). Exit 1 when the local server cannot start."""
    from dispatch.prefect.embedded import LocalServerError, prepare_prefect

    try:
        url, started = prepare_prefect(settings, verbose=verbose, meanwhile=meanwhile)
    except LocalServerError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_NOT_RUNNING) from None
    if started is not None:
        err.print(f"started the local Prefect server, UI {started.ui_url} (pid {started.pid}); it stays up for the "
                  "next commands, `dispatch server stop` ends it", soft_wrap=True)
    return url


def _local_server_line(server) -> str:
    return (f"local Prefect server: {server.ui_url} (pid {server.pid}, Prefect {server.prefect_version}, "
            f"since {time.strftime('%Y-%m-%d %H:%M', time.localtime(server.started_at))})")


@server_app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """This home's local Prefect server (embedded mode): running where, or not; exit 1 when not running."""
    from dispatch.prefect.embedded import log_path, running_server, state_path

    settings = get_settings()
    server = running_server(settings)
    data = {"running": server is not None, "home": str(settings.home), "state_file": str(state_path(settings)),
            "log": str(log_path(settings)), "mode": "team" if not settings.embedded else settings.server}
    if server is not None:
        data |= {"pid": server.pid, "port": server.port, "api_url": server.api_url, "ui_url": server.ui_url,
                 "prefect_version": server.prefect_version}
    if as_json:
        console.print_json(data=data)
    elif server is not None:
        console.print(_local_server_line(server) + f"\n  log {escape(data['log'])}; stop it with "
                      "`dispatch server stop`", soft_wrap=True)
    else:
        console.print(f"no local Prefect server runs for {escape(str(settings.home))}; the next command that needs "
                      "Prefect starts one (or `dispatch ui`)", soft_wrap=True)
    if not settings.embedded:
        console.print(f"[dim]team mode: this machine uses {escape(settings.prefect_api_url or '')} "
                      "(`dispatch server check`)[/]", soft_wrap=True)
    if server is None:
        raise typer.Exit(EXIT_NOT_RUNNING)


@server_app.command()
def stop():
    """Stop this home's local Prefect server; the next command that needs Prefect starts it again."""
    from dispatch.prefect.embedded import LocalServerError, stop_server

    settings = get_settings()
    try:
        stopped = stop_server(settings)
    except LocalServerError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_NOT_RUNNING) from None
    if stopped:
        console.print(f"stopped the local Prefect server (pid {', '.join(map(str, stopped))})")
    else:
        console.print(f"no local Prefect server was running for {escape(str(settings.home))}", soft_wrap=True)


def ui(open_: Annotated[bool, typer.Option("--open", help="Open it in a web browser.")] = False):
    """Print (--open: open) the Prefect UI, starting this home's local server if it is not running."""
    from dispatch.prefect.embedded import LocalServerError, ensure_server

    settings = get_settings()
    if not settings.embedded:
        from dispatch.prefect.team import ui_base_url

        url = ui_base_url(settings.prefect_api_url or "")
    elif settings.server == "ephemeral":
        err.print("[red]error:[/] DISPATCH_SERVER=ephemeral: each command's temporary Prefect server stops with it, "
                  "so there is no UI to open; unset DISPATCH_SERVER to keep a local server", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    else:
        try:
            server, started = ensure_server(settings)
        except LocalServerError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_NOT_RUNNING) from None
        if started:
            err.print(f"started the local Prefect server (pid {server.pid}); it stays up, "
                      "`dispatch server stop` ends it", soft_wrap=True)
        url = server.ui_url
    console.print(url, soft_wrap=True)
    if open_:
        import webbrowser

        if not webbrowser.open(url):
            err.print("[yellow]no web browser found here[/]: open the address above yourself", soft_wrap=True)
