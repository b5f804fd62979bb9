"""`dispatch nodes`: list the cluster's nodes, put them into Prefect, and probe them.

    dispatch nodes [--json]       nodes.json with transport, host, slots in use / total, labels
    dispatch nodes import         nodes.json -> ClusterNode blocks (+ AgentModel blocks for built-in models)
    dispatch nodes sync           a work pool and a global concurrency limit `node-<name>` per node
    dispatch nodes check [NAME]   connect to each node; report Python, the agent CLIs it has and their versions
                                  (flagging a version the contract tier has not passed)
    dispatch nodes drain NAME [--reason TEXT] / undrain NAME
                                  take a node out of service (running specs finish, no new one starts) / back

Listing and checking never import Prefect (listing asks the Prefect server for its slot counts only when
one is configured, `PREFECT_API_URL`); `import` and `sync` need a Prefect API (embedded: a temporary one
under DISPATCH_HOME). Exit codes: 0 success, 1 a node is unreachable (check) or Prefect failed, 2 a bad
nodes.json.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatch.cluster.config import load_nodes
from dispatch.core.agent_versions import AcceptedVersions, parse_version
from dispatch.core.errors import ConfigError, DispatchError
from dispatch.core.model_catalog import BUILTIN_MODELS
from dispatch.core.nodes import Node
from dispatch.core.settings import DispatchSettings, get_settings
from dispatch.ops.monitor import local_slot_use

nodes_app = typer.Typer(help="List the cluster's nodes (no subcommand), or import them into Prefect, sync their "
                              "work pools and concurrency limits, and check them.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED, EXIT_INVALID = 1, 2
AGENT_CLIS = ("claude", "codex", "opencode", "git")
"""The commands `check` looks for on each node."""
VERSIONED_CLIS = ("claude", "codex", "opencode")
"""The commands whose `--version` `check` reports (each bounded to 20 s on the node)."""

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _nodes(settings: DispatchSettings) -> list[Node]:
    """The nodes of nodes.json; a bad file ends the command with exit code 2, naming the field."""
    try:
        return load_nodes(settings)
    except ConfigError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None


def _where(settings: DispatchSettings) -> str:
    return "embedded Prefect (SQLite under DISPATCH_HOME)" if settings.embedded else str(settings.prefect_api_url)


def _use_prefect(settings: DispatchSettings) -> None:
    """Point Prefect at the configured server (embedded: this home's local server) before it is imported."""
    from dispatch.cli.server import connect_prefect

    connect_prefect(settings)


def _prefect_failed(settings: DispatchSettings, exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/] the Prefect API at {escape(_where(settings))} failed: {escape(str(exc))} "
              "(is the server up, and PREFECT_API_URL right?)", soft_wrap=True)
    return typer.Exit(EXIT_FAILED)


def _print_changes(settings: DispatchSettings, change: Callable[[], list[str]]) -> list[str]:
    """Run a change on the Prefect API and print its lines; bad config exits 2, a failing API 1."""
    import httpx

    try:
        lines = change()
    except ConfigError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    except httpx.HTTPError as exc:
        raise _prefect_failed(settings, exc) from None
    for line in lines:
        console.print(escape(line), soft_wrap=True)
    return lines


# --- listing -------------------------------------------------------------------------------------------------
def _server_load(settings: DispatchSettings, nodes: list[Node]) -> dict[str, dict[str, int]] | None:
    """Slots in use per node from the server's concurrency limits; None in embedded mode or on failure."""
    if settings.embedded:
        return None
    _use_prefect(settings)
    from dispatch.prefect.errors import SERVER_ERRORS
    from dispatch.prefect.nodes_admin import node_load

    try:
        return node_load(nodes)
    except SERVER_ERRORS as exc:  # a read-only listing still answers from the local state
        err.print(f"[yellow]warning:[/] cannot read slot usage from {escape(_where(settings))}: "
                  f"{escape(str(exc))}; showing this machine's runs only", soft_wrap=True)
        return None


def _host(node: Node) -> str:
    if node.transport == "local":
        return "localhost"
    host = node.host or node.ssh_host or "-"
    user = f"{node.user}@" if node.user and node.host else ""
    return f"{user}{host}" + (f":{node.port}" if node.port and node.host else "")


@nodes_app.callback(invoke_without_command=True)
def list_nodes(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the nodes (nodes.json): transport, host, slots in use / total, labels. Subcommands manage them."""
    if ctx.invoked_subcommand is not None:
        return
    settings = get_settings()
    nodes = _nodes(settings)
    local = local_slot_use(settings)
    server = _server_load(settings, nodes)
    drained = _drained(settings)
    rows = []
    for node in nodes:
        remote = server.get(node.name) if server is not None else None
        used_server = remote["used"] if remote else None
        rows.append({
            "name": node.name, "transport": node.transport, "host": _host(node), "slots": node.slots,
            "used": max(local.get(node.name, 0), used_server or 0), "used_local": local.get(node.name, 0),
            "used_server": used_server, "labels": sorted(node.labels), "priority": node.priority,
            "models": sorted(node.models) if node.models is not None else None, "pool": node.pool,
            "synced": None if server is None else remote is not None,
            "drained": drained.get(node.name),
        })
    if as_json:
        console.print_json(data={"nodes": rows, "prefect_api_url": settings.prefect_api_url})
        return
    table = Table("node", "transport", "host", "slots in use", "labels", "models", "priority")
    for row in rows:
        note = " [dim](no limit: run `dispatch nodes sync`)[/]" if row["synced"] is False else ""
        if row["drained"]:
            note += " [yellow]drained[/]"
        table.add_row(escape(row["name"]), row["transport"], escape(row["host"]),
                      f"{row['used']}/{row['slots']}{note}", escape(", ".join(row["labels"]) or "-"),
                      escape(", ".join(row["models"])) if row["models"] is not None else "any", str(row["priority"]))
    console.print(table)
    for row in rows:  # whole sentences below the table
        if row["drained"]:
            info = row["drained"]
            console.print(f"{escape(row['name'])} drained since {_when(info['since'])} by {escape(info['by'])}: "
                          f"{escape(info['reason'] or '-')}", soft_wrap=True)


# --- Prefect ---------------------------------------------------------------------------------------------
@nodes_app.command("import")
def import_nodes(
    embed_keys: Annotated[bool, typer.Option(
        "--embed-keys", help="Store each node's key_path file in its block as a secret.")] = False,
) -> None:
    """Save each node of nodes.json as a ClusterNode block, and the built-in models as AgentModel blocks."""
    settings = get_settings()
    _nodes(settings)  # a bad nodes.json fails fast, before Prefect starts
    _use_prefect(settings)
    from dispatch.prefect.nodes_admin import import_nodes as save_blocks

    console.print(f"importing nodes into {_where(settings)}")
    _print_changes(settings, lambda: save_blocks(settings, embed_keys=embed_keys))


@nodes_app.command()
def sync() -> None:
    """Create or update each node's work pool and global concurrency limit `node-<name>` (limit = slots)."""
    settings = get_settings()
    nodes = _nodes(settings)
    _use_prefect(settings)
    from dispatch.prefect.nodes_admin import sync_pools
    from flows.spec_run import sync_deployments

    changes = _print_changes(settings, lambda: sync_pools(nodes) + sync_deployments(nodes))
    if not changes:
        console.print(f"{len(nodes)} node(s): work pools and concurrency limits already match on {_where(settings)}")
    if settings.embedded:
        console.print("[dim]embedded mode counts slots in the flow; the pools and limits are used in team mode "
                      "(PREFECT_API_URL set)[/]")


# --- probing -------------------------------------------------------------------------------------------
def _probe_script(python: str) -> str:
    clis = " ".join(AGENT_CLIS)
    return (f"v=$({shlex.quote(python)} -V 2>&1) && printf 'python=%s\\n' \"$v\"; "
            f"for c in {clis}; do command -v \"$c\" >/dev/null 2>&1 && printf 'cli=%s\\n' \"$c\"; done; "
            "t=; command -v timeout >/dev/null 2>&1 && t='timeout 20'; "
            f"for c in {' '.join(VERSIONED_CLIS)}; do command -v \"$c\" >/dev/null 2>&1 || continue; "
            "v=$($t \"$c\" --version </dev/null 2>&1 | head -n 1); printf 'version=%s %s\\n' \"$c\" \"$v\"; done; true")


def _parse_probe(output: str) -> tuple[str | None, list[str], dict[str, str]]:
    python, clis, versions = None, [], {}
    for line in output.splitlines():
        key, _, value = line.partition("=")
        if key == "python" and value.strip():
            python = value.strip()
        elif key == "cli" and value.strip():
            clis.append(value.strip())
        elif key == "version" and value.strip():
            cli, _, answer = value.strip().partition(" ")
            if cli in VERSIONED_CLIS:
                versions[cli] = answer.strip()[:200]
    return python, clis, versions


def _local_version(path: str) -> str:
    try:
        done = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(--version failed: {exc})"
    return (done.stdout.strip().splitlines() or [""])[0][:200]


def _probe_local(node: Node) -> dict[str, Any]:
    try:
        done = subprocess.run([node.python, "-V"], capture_output=True, text=True, timeout=30)
        python = (done.stdout or done.stderr).strip() if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        python = None
    found = {c: path for c in AGENT_CLIS if (path := shutil.which(c, path=node.env.get("PATH")))}
    return {"reachable": True, "python": python, "clis": list(found),
            "versions": {c: _local_version(path) for c, path in found.items() if c in VERSIONED_CLIS}}


def _probe(pool: Any, node: Node, timeout: float, accepted: AcceptedVersions) -> dict[str, Any]:
    """Reachability, Python version, agent CLIs and their versions of one node (never raises); `unproved`
    names each CLI at a version the contract tier has not passed."""
    from dispatch.cluster.ssh_target import node_target

    result: dict[str, Any] = {"name": node.name, "transport": node.transport, "host": _host(node),
                              "reachable": None, "python": None, "clis": [], "missing": [], "versions": {},
                              "unproved": [], "error": ""}
    try:
        if node.transport == "local":
            result.update(_probe_local(node))
        elif node.transport == "worker" and not (node.ssh_host or node.host):
            result["error"] = "worker node without ssh_host: not probed (see its worker in the Prefect UI)"
        else:  # the node's env (its PATH) as its runner gets it: the CLIs found are the ones specs would run
            run = pool.run(node_target(node, connect_timeout=timeout), _probe_script(node.python),
                           timeout=timeout + 60, env=node.env or None, check=False)
            python, clis, versions = _parse_probe(run.stdout)
            result.update(reachable=True, python=python, clis=clis, versions=versions)
    except DispatchError as exc:
        result.update(reachable=False, error=str(exc))
    if result["reachable"]:
        needed = {BUILTIN_MODELS[m].cli: m for m in sorted(node.models or ()) if m in BUILTIN_MODELS}
        result["missing"] = [f"{cli} (for {model})" for cli, model in needed.items() if cli not in result["clis"]]
        result["unproved"] = accepted.flags(result["versions"])
        if result["python"] is None:
            result["error"] = f"no working {node.python} on the node: the node runner needs Python 3"
    return result


def _versions_cell(row: dict[str, Any]) -> str:
    flagged = {line.split(" ", 1)[0].rstrip(":") for line in row["unproved"]}
    cells = [escape(f"{cli} {parse_version(answer) or '?'}") + (" [yellow](not passed)[/]" if cli in flagged else "")
             for cli, answer in sorted(row["versions"].items())]
    return ", ".join(cells) or "-"


@nodes_app.command()
def check(
    name: Annotated[str | None, typer.Argument(help="One node; every node when omitted.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to connect to each node.")] = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Connect to each node and report whether it is reachable, its Python and the agent CLIs it has."""
    from dispatch.cluster.ssh import SSHPool

    settings = get_settings()
    nodes = _nodes(settings)
    if name is not None:
        nodes = [n for n in nodes if n.name == name]
        if not nodes:
            known = ", ".join(n.name for n in _nodes(settings))
            err.print(f"[red]error:[/] no node {escape(name)!r} in {settings.home / 'nodes.json'} (known: "
                      f"{escape(known)})", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID)
    from dispatch.prefect.versions import passed_store  # here, not at import: it brings httpx into every CLI start

    accepted = AcceptedVersions.load(passed_store(settings))  # pinned + the drift check's (team mode: the server's)
    with SSHPool() as pool, ThreadPoolExecutor(max_workers=min(16, len(nodes))) as executor:
        results = list(executor.map(lambda node: _probe(pool, node, timeout, accepted), nodes))
    unreachable = [r["name"] for r in results if r["reachable"] is False]
    if as_json:
        console.print_json(data={"nodes": results, "unreachable": unreachable})
    else:
        table = Table("node", "transport", "host", "reachable", "python", "CLIs found", "CLI versions", "missing")
        marks = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[yellow]skipped[/]"}
        for row in results:
            table.add_row(escape(row["name"]), row["transport"], escape(row["host"]), marks[row["reachable"]],
                          escape(row["python"] or "-"), escape(", ".join(row["clis"]) or "-"), _versions_cell(row),
                          escape(", ".join(row["missing"]) or "-"))
        console.print(table)
        for row in results:  # whole messages below the table: they say what to do, do not wrap them in a cell
            if row["error"]:
                (err if row["reachable"] is False else console).print(escape(row["error"]), soft_wrap=True)
            for line in row["unproved"]:
                console.print(f"[yellow]warning:[/] {escape(row['name'])}: {escape(line)}", soft_wrap=True)
    if unreachable:
        if not as_json:
            err.print(f"[red]{len(unreachable)} node(s) unreachable:[/] {escape(', '.join(unreachable))}")
        raise typer.Exit(EXIT_FAILED)



# --- draining ----------------------------------------------------------------------------------------------
def _when(moment: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment)) if moment else "?"


def _drained(settings: DispatchSettings) -> dict[str, dict]:
    """The drained nodes (dispatch/core/drain.py); team mode asks the server (a warning and none when it cannot)."""
    from dispatch.core.drain import drained_nodes
    from dispatch.prefect.drained import drained_store
    from dispatch.prefect.errors import SERVER_ERRORS

    if settings.embedded:
        return drained_nodes(drained_store(settings))
    _use_prefect(settings)
    try:
        return drained_nodes(drained_store(settings))
    except SERVER_ERRORS as exc:
        err.print(f"[yellow]warning:[/] cannot read the drained nodes from {escape(_where(settings))}: "
                  f"{escape(str(exc))}", soft_wrap=True)
        return {}


def _known_node(settings: DispatchSettings, name: str) -> None:
    """Exit 2 unless `name` is a node of nodes.json, naming the file and the known nodes."""
    known = [n.name for n in _nodes(settings)]
    if name not in known:
        err.print(f"[red]error:[/] no node {escape(name)!r} in {settings.home / 'nodes.json'} (known: "
                  f"{escape(', '.join(known))}); check the name with `dispatch nodes`", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)


def _change_drain(settings: DispatchSettings, change: Callable[[], bool]) -> bool:
    """Run a drain or undrain (team mode: on the server); a failing server exits 1."""
    from dispatch.prefect.errors import SERVER_ERRORS

    if not settings.embedded:
        _use_prefect(settings)
    try:
        return change()
    except SERVER_ERRORS as exc:
        raise _prefect_failed(settings, exc) from None


@nodes_app.command("drain")
def drain_node(
    name: Annotated[str, typer.Argument(help="The node (a name in nodes.json).")],
    reason: Annotated[str, typer.Option(help="Why, shown in `dispatch nodes` and the monitor.")] = "drained by hand",
) -> None:
    """Take a node out of service: every dispatcher stops placing specs on it; specs running there finish."""
    from dispatch.core.drain import drain
    from dispatch.prefect.drained import drained_store
    from dispatch.prefect.team import whoami

    settings = get_settings()
    _known_node(settings, name)
    user, host = whoami()
    if _change_drain(settings, lambda: drain(drained_store(settings), name, reason=reason, by=f"{user}@{host}")):
        console.print(f"{escape(name)} drained: no new spec goes there; its running specs finish "
                      f"(`dispatch nodes undrain {escape(name)}` puts it back)", soft_wrap=True)
    else:
        console.print(f"{escape(name)} was already drained (its first reason is kept)")


@nodes_app.command("undrain")
def undrain_node(name: Annotated[str, typer.Argument(help="The node (a name in nodes.json).")]) -> None:
    """Put a drained node back in service; running dispatchers use it again within a few seconds."""
    from dispatch.core.drain import undrain
    from dispatch.prefect.drained import drained_store

    settings = get_settings()
    _known_node(settings, name)
    if _change_drain(settings, lambda: undrain(drained_store(settings), name)):
        console.print(f"{escape(name)} undrained: back in service")
    else:
        console.print(f"{escape(name)} was not drained")


if __name__ == "__main__":  # pragma: no cover - `python -m dispatch.cli.nodes` before it is mounted
    nodes_app()

