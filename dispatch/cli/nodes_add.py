"""`dispatch nodes add`: bootstrap a machine over SSH, check it, and add it to the cluster.

    dispatch nodes add NAME --ssh-host H --slots N [--worker] [--user U] [--port P] [--key PATH]
                            [--known-hosts PATH] [--agents claude,codex] [--skip-bootstrap]

In order, stopping at the first failure with nothing written: the name and options are checked (exit 2);
the node is reached over SSH with its host key checked; `infra/bootstrap-node.sh` runs there as root
(directly when the login is root, else through `sudo -n`) with the node runner beside it; the node is probed
as `dispatch nodes check` does and its runner's checksum compared; in team mode its `ClusterNode` block,
work pool and concurrency limit (and, for a worker node, its `spec-run` deployment) are made; last, the
entry is added to `DISPATCH_HOME/nodes.json` (atomically, under a lock). Exit codes: 0 added, 1 the node or
the Prefect server failed, 2 bad input (a bad or taken name, a missing key file, a bad nodes.json).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from dispatch.cluster.config import load_nodes, parse_node
from dispatch.cluster.shipping import node_runner
from dispatch.core.errors import ConfigError, DispatchError, NodeError, cut
from dispatch.core.nodes import Node, node_name_problem
from dispatch.core.safeload import load_json, loads_json
from dispatch.core.settings import DispatchSettings, get_settings
from dispatch.runner import protocol, zipapp

if TYPE_CHECKING:
    from dispatch.cluster.ssh import SSHPool, SSHTarget

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED, EXIT_INVALID = 1, 2
INFRA = Path(__file__).resolve().parents[2] / "infra"
AGENTS = ("claude", "codex", "opencode")
_BOOTSTRAP_TIMEOUT = 1800.0  # apt and npm on a fresh machine


class _Refused(Exception):
    """Adding the node stops here: the message, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def add_node(
    name: Annotated[str, typer.Argument(help="The node's name (letters, digits, '.', '_', '-').")],
    ssh_host: Annotated[str, typer.Option("--ssh-host", help="Host name, address, user@host or ssh config alias.")],
    slots: Annotated[int, typer.Option(min=1, help="How many specs the node runs at once.")],
    worker: Annotated[bool, typer.Option(
        "--worker", help="A worker node: bootstrap installs the Prefect worker unit prefect-worker@NAME.")] = False,
    user: Annotated[str | None, typer.Option(help="SSH login user: root, or one with passwordless sudo.")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="SSH port.")] = None,
    key: Annotated[Path | None, typer.Option(help="Private key file to log in with.")] = None,
    known_hosts: Annotated[Path | None, typer.Option(
        "--known-hosts", help="known_hosts file holding the node's host key (default ~/.ssh/known_hosts).")] = None,
    agents: Annotated[str, typer.Option(
        help="Agent CLIs to npm install on the node, comma-separated (claude, codex, opencode).")] = "",
    package: Annotated[str | None, typer.Option(
        help="--worker: what the node's worker venv pip installs (a checkout path or URL).")] = None,
    api_url: Annotated[str | None, typer.Option(
        "--api-url", help="--worker: the team server the worker talks to (default PREFECT_API_URL).")] = None,
    skip_bootstrap: Annotated[bool, typer.Option(
        "--skip-bootstrap", help="The node was bootstrapped by hand: only check it and add it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to connect to the node.")] = 10.0,
) -> None:
    """Bootstrap a machine over SSH, check it, then add it to nodes.json (and to Prefect in team mode)."""
    settings = get_settings()
    try:
        entry, node = _new_entry(settings, name, ssh_host, slots, worker, user, port, key, known_hosts)
        wanted = _agents(agents)
        worker_args = _worker_args(settings, name, package, api_url) if worker else []
        _check_node(node, None if skip_bootstrap else [*wanted, *worker_args], timeout)
        if not settings.embedded:
            _save_to_prefect(settings, node)
        _append_entry(settings, entry)
    except _Refused as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.code) from None
    console.print(f"node {escape(name)}: added to {settings.home / 'nodes.json'} ({slots} slots, "
                  f"{node.transport})", soft_wrap=True)
    if [n.name for n in load_nodes(settings)] == [name]:
        console.print("[dim]nodes.json lists only this node now: the embedded 'local' node is used only when "
                      'listed ({"name": "local", "transport": "local", "slots": N})[/]', soft_wrap=True)
    if settings.embedded:
        console.print("[dim]embedded mode: no block or work pool made (team mode, PREFECT_API_URL set, makes "
                      "them; `dispatch nodes import` and `dispatch nodes sync` do it later)[/]", soft_wrap=True)


# --- input ---------------------------------------------------------------------------------------------------
def _new_entry(settings: DispatchSettings, name: str, ssh_host: str, slots: int, worker: bool, user: str | None,
               port: int | None, key: Path | None, known_hosts: Path | None) -> tuple[dict[str, Any], Node]:
    """The nodes.json entry for the new node, checked as nodes.json itself is; refuses a bad or taken name."""
    path = settings.home / "nodes.json"
    if problem := node_name_problem(name):
        raise _Refused(f"node name {cut(name)}: {problem}", EXIT_INVALID)
    if name == "local":
        raise _Refused("node name 'local' is the dispatcher's own machine (the embedded node); pick another name",
                       EXIT_INVALID)
    try:
        taken = [node.name for node in load_nodes(settings)] if path.exists() else []
    except ConfigError as exc:
        raise _Refused(f"{exc} (fix nodes.json before adding a node)", EXIT_INVALID) from None
    if name in taken:
        raise _Refused(f"{path}: a node named {name!r} already exists (known: {', '.join(taken)}); pick another "
                       "name, or edit that entry", EXIT_INVALID)
    entry: dict[str, Any] = {"name": name, "ssh_host": ssh_host, "slots": slots,
                             "transport": "worker" if worker else "ssh"}
    for field, file in (("key_path", key), ("known_hosts", known_hosts)):
        if file is not None:
            if not file.expanduser().is_file():
                raise _Refused(f"--{field.replace('_path', '').replace('_', '-')} {file}: no such file", EXIT_INVALID)
            entry[field] = str(file.expanduser().resolve())
    if user is not None:
        entry["user"] = user
    if port is not None:
        entry["port"] = port
    try:
        return entry, parse_node(path, len(taken), entry, settings)
    except ConfigError as exc:
        raise _Refused(str(exc), EXIT_INVALID) from None


def _agents(agents: str) -> list[str]:
    names = [a.strip() for a in agents.split(",") if a.strip()]
    if unknown := sorted(set(names) - set(AGENTS)):
        raise _Refused(f"--agents: unknown {', '.join(unknown)} (known: {', '.join(AGENTS)})", EXIT_INVALID)
    return ["--agents", ",".join(names)] if names else []


def _worker_args(settings: DispatchSettings, name: str, package: str | None, api_url: str | None) -> list[str]:
    api_url = api_url or settings.prefect_api_url
    if not package or not api_url:
        raise _Refused("--worker: give --package (what the worker's venv installs: a checkout path on the node or "
                       "a URL) and --api-url (the team server; default PREFECT_API_URL)", EXIT_INVALID)
    if not re.fullmatch(r"https?://\S+", api_url) or re.search(r"\s", package):
        raise _Refused(f"--worker: --api-url {api_url!r} must be an http(s) URL and --package {package!r} a path "
                       "or URL, neither with spaces or line breaks (they go into the worker's env file)", EXIT_INVALID)
    return ["--worker", name, "--package", package, "--api-url", api_url]


# --- the node ------------------------------------------------------------------------------------------------
def _check_node(node: Node, bootstrap_args: list[str] | None, timeout: float) -> None:
    """Bootstrap the node with these arguments (None: not at all), then probe it; raises _Refused on failure.

    The bootstrap's `--user` is the SSH login: the user the dispatcher will connect as."""
    from dispatch.cli.nodes import _probe
    from dispatch.cluster.ssh import SSHPool
    from dispatch.cluster.ssh_target import node_target
    from dispatch.core.agent_versions import AcceptedVersions
    from dispatch.core.settings import get_settings
    from dispatch.prefect.versions import passed_store

    with SSHPool() as pool:
        try:
            target = node_target(node, connect_timeout=timeout)
            if bootstrap_args is not None:
                login = pool.run(target, "id -un", timeout=timeout + 20).stdout.strip()
                bootstrap(pool, target, ["--user", login, *bootstrap_args], worker=node.transport == "worker")
            probe = _probe(pool, node, timeout, AcceptedVersions.load(passed_store(get_settings())))
            runner = _runner_version(pool, target, node, timeout) if probe["reachable"] else None
        except ConfigError as exc:
            raise _Refused(str(exc), EXIT_INVALID) from None
        except DispatchError as exc:
            raise _Refused(f"{exc}\nnothing was written to nodes.json") from None
    problems = [probe["error"]] if probe["error"] else []
    wanted = zipapp.build().version
    if bootstrap_args is not None and runner != wanted:
        problems.append(f"its node runner reports version {runner or 'none'}, not {wanted[:16]}")
    if problems:
        raise _Refused(f"node {node.name} failed its check: {'; '.join(problems)}; nothing was written to nodes.json")
    console.print(f"node {escape(node.name)}: reachable, {escape(probe['python'] or '?')}, CLIs: "
                  f"{escape(', '.join(probe['clis']) or 'none')}", soft_wrap=True)


def bootstrap(pool: SSHPool, target: SSHTarget, args: list[str], *, worker: bool = False) -> None:
    """Run `infra/bootstrap-node.sh` on a node as root, with the node runner beside it; output streamed.

    The script and the runner are copied into a fresh temporary directory of the login user, run from
    there (as root when the login is root, else through `sudo -n`), and removed afterwards.

    Args:
        pool: the `SSHPool` to use.
        target: the node's `SSHTarget`.
        args: the script's arguments (e.g. `["--user", "dispatch"]`).
        worker: also copy the Prefect worker's systemd unit.

    Raises:
        NodeError: the login user cannot become root without a password, or the script failed.
    """
    files = [INFRA / "bootstrap-node.sh"] + ([INFRA / "prefect-worker@.service"] if worker else [])
    if missing := [str(f) for f in files if not f.is_file()]:
        raise ConfigError(f"cannot find {', '.join(missing)}: run `dispatch nodes add` from a checkout "
                          "(pip install -e .), which has infra/ beside dispatch/")
    as_root = pool.run(target, 'if [ "$(id -u)" -eq 0 ]; then echo root; elif sudo -n true; then echo sudo; fi',
                       timeout=60, check=False)
    how = as_root.stdout.strip()
    if how not in ("root", "sudo"):
        raise NodeError(target.name, f"login {target.user or 'user'} is not root and cannot use `sudo -n` (no "
                        f"passwordless sudo: {as_root.stderr.strip() or 'sudo failed'}): log in as root (--user "
                        "root), give the user passwordless sudo, or run infra/bootstrap-node.sh there as root "
                        "yourself and add the node with --skip-bootstrap")
    directory = pool.run(target, "mktemp -d", timeout=60).stdout.strip()
    try:
        for path in files:
            pool.put_file(target, path, f"{directory}/{path.name}", mode=0o755)
        pool.put_file(target, zipapp.build().data, f"{directory}/{protocol.RUNNER_FILE}", mode=0o644)
        sudo = "" if how == "root" else "sudo -n "
        command = f"{sudo}bash {shlex.quote(directory)}/bootstrap-node.sh {shlex.join(args)}"
        done = pool.run(target, command, timeout=_BOOTSTRAP_TIMEOUT, check=False,
                        on_line=lambda _stream, line: console.print(f"{escape(target.name)}: {escape(line)}",
                                                                    soft_wrap=True))
        if done.exit_code != 0:
            raise NodeError(target.name, f"infra/bootstrap-node.sh exited {done.exit_code} (its output is above)")
    finally:
        try:
            pool.run(target, f"rm -rf -- {shlex.quote(directory)}", timeout=60, check=False)
        except DispatchError as exc:  # the node went away: say so, but keep the error that ended the bootstrap
            err.print(f"[yellow]warning:[/] could not remove {escape(directory)} on {escape(target.name)}: "
                      f"{escape(str(exc))}", soft_wrap=True)


def _runner_version(pool: SSHPool, target: SSHTarget, node: Node, timeout: float) -> str | None:
    """The checksum the node's copy of this runner version reports, None when it has none."""
    runner = node_runner(node.remote_root.removeprefix("~/").rstrip("/") or ".", node.python)
    done = pool.run(target, f"{runner.command} version", timeout=timeout + 20, check=False)
    try:
        data = loads_json(done.stdout, f"node {node.name}: the runner's version output") if done.exit_code == 0 \
            else None
    except ConfigError:
        return None
    version = data.get("runner_version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


# --- writing -------------------------------------------------------------------------------------------------
def _save_to_prefect(settings: DispatchSettings, node: Node) -> None:
    """The node's ClusterNode block, work pool and concurrency limit (and worker deployment) on the server."""
    import httpx

    from dispatch.cli.server import connect_prefect

    connect_prefect(settings)
    from blocks.cluster_node import ClusterNode
    from dispatch.prefect.nodes_admin import sync_pools
    from flows.spec_run import sync_deployments

    try:
        block = ClusterNode.from_node(node)
        block.save(block.document_name, overwrite=True)
        lines = [f"saved block {ClusterNode.get_block_type_slug()}/{block.document_name}",
                 *sync_pools([node]), *sync_deployments([node])]
    except ConfigError as exc:
        raise _Refused(str(exc), EXIT_INVALID) from None
    except httpx.HTTPError as exc:
        raise _Refused(f"the Prefect API at {settings.prefect_api_url} failed: {exc}; nothing was written to "
                       "nodes.json (run the command again once the server answers)") from None
    for line in lines:
        console.print(f"node {escape(node.name)}: {escape(line)}", soft_wrap=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _append_entry(settings: DispatchSettings, entry: dict[str, Any]) -> None:
    """Add `entry` to nodes.json: re-read under a lock (another `add` may have run), written whole, replaced."""
    path = settings.home / "nodes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            data = load_json(path) if path.exists() else {"nodes": []}
        except ConfigError as exc:
            raise _Refused(f"{exc} (read again to add the node)", EXIT_INVALID) from None
        if not isinstance(data, dict) or not isinstance(data.get("nodes", []), list):
            raise _Refused(f'{path}: must be an object {{"nodes": [...]}}; nothing changed', EXIT_INVALID)
        if any(isinstance(n, dict) and n.get("name") == entry["name"] for n in data.get("nodes", [])):
            raise _Refused(f"{path}: a node named {entry['name']!r} was added meanwhile; nothing changed",
                           EXIT_INVALID)
        data["nodes"] = [*data.get("nodes", []), entry]
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        handle, temporary = tempfile.mkstemp(prefix=".nodes.json.", dir=path.parent)
        try:
            os.fchmod(handle, mode)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(json.dumps(data, indent=2) + "\n")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
