"""The guardian's checks of one node, and the safe repairs proven by a re-check.

One probe command per node (`dispatch.ops.guardian.probe`) answers reachable, disk, load, memory, python,
runner, agents, agent_versions (a CLI at a version the contract tier has not passed: neither pinned nor passed
by the agent-cli-drift check; it alerts, it never drains) and the node's runs; a repair (re-ship the runner,
kill an orphan runner, close the books of a runner that died) is followed by a second probe, and
`Check.repaired` is True only when that second probe shows the check healthy. Worker nodes are also asked
about their Prefect worker.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dispatch.cluster.shipping import local_runner, node_runner, ship
from dispatch.core.agent_versions import PACKAGES, AcceptedVersions, parse_version
from dispatch.core.errors import DispatchError, NodeError, UnsafePath
from dispatch.core.model_catalog import BUILTIN_MODELS
from dispatch.core.nodes import Node
from dispatch.core.paths import check_name, remote_arg
from dispatch.core.polling import attempts
from dispatch.core.settings import DispatchSettings
from dispatch.ops.guardian.probe import parse_probe, probe_command
from dispatch.ops.health import Check
from dispatch.prefect.errors import SERVER_ERRORS

logger = logging.getLogger(__name__)

NODE_CHECKS = ("reachable", "disk", "load", "memory", "python", "runner", "agents", "agent_versions", "worker",
               "orphans", "heartbeats")
_PROBE_TIMEOUT = 60.0
_MIN_PYTHON = (3, 8)
_WORKER_UNIT = "prefect-worker@{name}.service"


@dataclass
class Limits:
    """What counts as healthy (the `DISPATCH_GUARDIAN_*` settings)."""

    min_disk_gb: float = 2.0
    max_load: float = 4.0
    min_memory_mb: float = 256.0
    worker_wait: float = 60.0

    @classmethod
    def from_settings(cls, settings: DispatchSettings) -> Limits:
        return cls(settings.guardian_min_disk_gb, settings.guardian_max_load, settings.guardian_min_memory_mb,
                   settings.guardian_worker_wait)


@dataclass
class NodeContext:
    """What every node check shares in one cycle.

    Attributes:
        live_projects: projects with a live dispatcher (their runners are no orphans); None when unknown,
            and then no runner is killed.
        repair: try the safe repairs (False: only look).
    """

    settings: DispatchSettings
    pool: Any  # dispatch.cluster.ssh.SSHPool, or None without ssh nodes
    limits: Limits
    live_projects: set[str] | None
    repair: bool = True
    prefect: bool = False  # the worker check asks the Prefect server (team mode)
    key_secrets: dict[str, str] = field(default_factory=dict)
    accepted: AcceptedVersions = field(default_factory=AcceptedVersions)  # the agent CLI versions proved


class _Shell:
    """Runs POSIX sh commands on a node: over SSH, or here for the `local` node."""

    def __init__(self, ctx: NodeContext, node: Node) -> None:
        self.node, self.ctx = node, ctx
        self.local = node.transport == "local"
        if self.local:
            self.root = str(ctx.settings.runs_dir)
            self.root_arg = shlex.quote(self.root)
            self.shipped = node_runner(self.root, node.python)
            self.target = None
        else:
            from dispatch.cluster.ssh_target import node_target

            self.root = node.remote_root.removeprefix("~/").rstrip("/") or "."
            self.root_arg = remote_arg(self.root)
            self.shipped = node_runner(self.root, node.python)
            self.target = node_target(node, key_secret=ctx.key_secrets.get(node.name), connect_timeout=10.0)

    def run(self, command: str, timeout: float = _PROBE_TIMEOUT) -> tuple[int, str, str]:
        if self.local:
            env = {**os.environ, **self.node.env}
            try:
                done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                                      env=env)
            except subprocess.TimeoutExpired as exc:
                raise NodeError(self.node.name, f"a local command ran past {timeout:.0f} s") from exc
            return done.returncode, done.stdout, done.stderr
        result = self.ctx.pool.run(self.target, command, timeout=timeout, env=self.node.env or None, check=False)
        return result.exit_code, result.stdout, result.stderr

    def probe(self) -> dict[str, Any]:
        clis = sorted({BUILTIN_MODELS[m].cli for m in (self.node.models or ()) if m in BUILTIN_MODELS} | set(PACKAGES))
        code, out, err = self.run(probe_command(self.node.python, self.root_arg, self.shipped.directory_arg, clis))
        if code != 0 and not out.strip():
            raise NodeError(self.node.name, f"the probe failed with {self.node.python} (exit {code}): "
                                            f"{err.strip()[-300:]}")
        return parse_probe(self.node.name, out)

    def ship_runner(self) -> None:
        """Put this runner version in place on the node (`shipping.ship`: a temporary name, then renamed)."""
        ship(self.ctx.pool, self.target, self.shipped)

    def kill_run(self, project: str, task_id: str) -> None:
        if self.local:
            run_dir = shlex.quote(str(self.ctx.settings.runs_dir / check_name(project, "project name") / "tasks"
                                      / check_name(task_id, "task_id")))
        else:
            run_dir = remote_arg(self.root, check_name(project, "project name"), "tasks",
                                 check_name(task_id, "task_id"))
        if self.local:
            local_runner(Path(self.root))
        code, _, err = self.run(f"{self.shipped.command} kill {run_dir}", timeout=60)
        if code != 0:
            raise NodeError(self.node.name, f"`runner.pyz kill` failed (exit {code}): {err.strip()[-300:]}")


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def _healthy_checks(node: Node, data: dict[str, Any], limits: Limits, shell: _Shell) -> dict[str, Check]:
    """reachable, disk, load, memory, python, runner, agents from one probe's answer."""
    name = node.name
    checks = {"reachable": Check(name, "reachable", True, f"answered over {'this machine' if shell.local else 'SSH'}")}
    free, total = data.get("disk_free"), data.get("disk_total")
    if isinstance(free, (int, float)) and isinstance(total, (int, float)):
        checks["disk"] = Check(name, "disk", free >= limits.min_disk_gb * 2**30,
                               f"{_gib(free)} free of {_gib(total)} under {shell.root} "
                               f"(needs {limits.min_disk_gb:g} GiB)")
    else:
        checks["disk"] = Check(name, "disk", None, f"not measured: {data.get('disk_error', 'no answer')}")
    load, cpus = data.get("load"), data.get("cpus") or 1
    if isinstance(load, list) and load and isinstance(load[0], (int, float)):
        per_cpu = load[0] / max(1, int(cpus))
        checks["load"] = Check(name, "load", per_cpu <= limits.max_load,
                               f"1-min load {load[0]:.2f} on {cpus} CPU(s) ({per_cpu:.2f} per CPU, at most "
                               f"{limits.max_load:g})")
    else:
        checks["load"] = Check(name, "load", None, "not measured: no load average on the node")
    available = data.get("mem_available")
    if isinstance(available, (int, float)):
        checks["memory"] = Check(name, "memory", available >= limits.min_memory_mb * 2**20,
                                 f"{available / 2**20:.0f} MiB available of {(data.get('mem_total') or 0) / 2**20:.0f}"
                                 f" (needs {limits.min_memory_mb:g} MiB)")
    else:
        checks["memory"] = Check(name, "memory", None, "not measured: no /proc/meminfo on the node")
    version = str(data.get("python", ""))
    try:
        parsed = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        parsed = ()
    checks["python"] = Check(name, "python", parsed >= _MIN_PYTHON,
                             f"{node.python} is Python {version or '?'} (the runner needs 3.8 or newer)")
    if shell.local:
        checks["runner"] = Check(name, "runner", True, f"{shell.shipped.path}: written by the dispatcher as it runs")
    else:
        found, wanted = data.get("runner"), shell.shipped.version
        detail = ("current copy" if found == wanted else "missing" if found is None
                  else f"checksum {str(found)[:16]}, expected {wanted[:16]} (tampered or damaged)")
        checks["runner"] = Check(name, "runner", found == wanted, f"{shell.shipped.path}: {detail}")
    clis = set(data.get("clis") or [])
    needed = {BUILTIN_MODELS[m].cli: m for m in sorted(node.models or ()) if m in BUILTIN_MODELS}
    missing = [f"{cli} (for {model})" for cli, model in needed.items() if cli not in clis]
    checks["agents"] = Check(name, "agents", not missing,
                             (f"missing on PATH: {', '.join(missing)}" if missing else
                              f"found {', '.join(sorted(clis)) or 'none needed'}"
                              + ("" if node.models is not None else " (models not listed: none required)")))
    checks["agent_versions"] = _versions_check(node, data.get("cli_versions") or {}, shell.ctx.accepted)
    return checks


def _versions_check(node: Node, versions: dict[str, str], accepted: AcceptedVersions) -> Check:
    """Each agent CLI's version on the node, failing for one the contract tier has not passed."""
    flags = accepted.flags(versions)
    shown = ", ".join(f"{cli} {parse_version(answer) or '?'}" for cli, answer in sorted(versions.items()))
    if flags:
        return Check(node.name, "agent_versions", False, "; ".join(flags))
    return Check(node.name, "agent_versions", True,
                 f"{shown}: claude and codex at versions the contract tier passed" if shown else "no agent CLI found")


def _age(seconds: float | None) -> str:
    return "never written" if seconds is None else f"{seconds:.0f} s old"


def _runs_checks(node: Node, data: dict[str, Any], ctx: NodeContext) -> tuple[Check, Check, list[dict], list[dict]]:
    """orphans and heartbeats; with the runs to kill (orphans) and the dead runners to close (stale)."""
    name = node.name
    orphans, stale_hung, stale_dead = [], [], []
    for run in data.get("runs", []):
        project, task_id = str(run.get("project", "")), str(run.get("task_id", ""))
        try:
            check_name(project, "project name")
            check_name(task_id, "task_id")
        except UnsafePath:
            continue  # not a run directory we made
        run = {**run, "project": project, "task_id": task_id}
        live = ctx.live_projects is not None and project in ctx.live_projects
        if run.get("alive") and ctx.live_projects is not None and not live:
            orphans.append(run)
        age, interval = run.get("heartbeat_age"), float(run.get("heartbeat") or 2.0)
        if run.get("state") == "running" and (age is None or age > 3 * interval + 5):
            (stale_hung if run.get("alive") else stale_dead).append(run)
    if ctx.live_projects is None:
        orphan_check = Check(name, "orphans", None, "not checked: which projects have a live dispatcher is unknown")
    else:
        orphan_check = Check(name, "orphans", not orphans,
                             "; ".join(f"{r['project']}/{r['task_id']} (pid {r.get('pid')}) runs with no live "
                                       "dispatcher" for r in orphans[:10]) or "no runner without a dispatcher")
    stale = stale_hung + stale_dead
    heartbeat = Check(name, "heartbeats", not stale, "; ".join(
        f"{r['project']}/{r['task_id']}: status.json says running, heartbeat {_age(r.get('heartbeat_age'))}, "
        f"runner {'alive but silent' if r.get('alive') else 'gone'}" for r in stale[:10])
        or "every running runner beats")
    dead_unwatched = [r for r in stale_dead if ctx.live_projects is not None and r["project"] not in ctx.live_projects]
    return orphan_check, heartbeat, orphans, dead_unwatched


def _worker_check(node: Node, ctx: NodeContext, shell: _Shell | None, systemd: bool | None) -> Check:
    """Whether a worker of the node's pool sent a heartbeat lately; restart its unit over SSH if not."""
    alive, detail = _worker_alive(node)
    check = Check(node.name, "worker", alive, detail)
    if alive or alive is None or not ctx.repair:
        return check
    unit = _WORKER_UNIT.format(name=node.name)
    check.repair = f"restart {unit} over SSH"
    if shell is None or shell.local:
        check.repair += ": NOT RUN (no ssh_host for the node: restart its worker by hand)"
        return check
    if not systemd:
        check.repair += ": NOT RUN (no systemd on the node: restart the worker by hand)"
        return check
    code, _, err = shell.run(f"systemctl restart {shlex.quote(unit)} 2>&1 || sudo -n systemctl restart "
                             f"{shlex.quote(unit)}", timeout=90)
    if code != 0:
        check.repaired = False
        check.repair += f": failed (exit {code}) {err.strip()[-200:]}"
        return check
    for _ in attempts(ctx.limits.worker_wait, 5.0):
        alive, detail = _worker_alive(node)
        if alive:
            break
    check.repaired, check.detail = bool(alive), f"{check.detail}; after the restart: {detail}"
    return check


def _worker_alive(node: Node) -> tuple[bool | None, str]:
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool(node.pool)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return False, f"no work pool {node.pool} on the server: run `dispatch nodes sync`, then start the worker"
        return None, f"not checked: the Prefect server failed ({exc})"
    except SERVER_ERRORS as exc:
        return None, f"not checked: the Prefect server cannot be reached ({exc})"
    now = datetime.now(UTC)
    ages = [(now - w.last_heartbeat_time).total_seconds() for w in workers if w.last_heartbeat_time is not None]
    fresh = [a for a in ages if a < 3 * 30 + 5]
    if fresh:
        return True, f"{len(fresh)} worker(s) of {node.pool} beat, the latest {min(fresh):.0f} s ago"
    return False, (f"no live worker on {node.pool}" + (f" (last heartbeat {min(ages):.0f} s ago)" if ages else "")
                   + f": start it (`systemctl start {_WORKER_UNIT.format(name=node.name)}`)")


def check_node(ctx: NodeContext, node: Node) -> list[Check]:
    """Every check of `node`, repairs tried and re-checked (never raises for the node's own faults)."""
    checks: dict[str, Check] = {}
    shell: _Shell | None = None
    data: dict[str, Any] | None = None
    probed = node.transport != "worker" or bool(node.ssh_host or node.host)
    if probed:
        try:
            shell = _Shell(ctx, node)
            data = shell.probe()
        except DispatchError as exc:
            checks["reachable"] = Check(node.name, "reachable", False, str(exc))
    if data is not None and shell is not None:
        checks.update(_healthy_checks(node, data, ctx.limits, shell))
        orphans_check, heartbeat, orphans, dead = _runs_checks(node, data, ctx)
        checks["orphans"], checks["heartbeats"] = orphans_check, heartbeat
        if ctx.repair:
            data = _repair(ctx, node, shell, checks, orphans, dead) or data
    if node.transport == "worker" and ctx.prefect:
        checks["worker"] = _worker_check(node, ctx, shell, data.get("systemd") if data else None)
    if not probed:  # a worker node without ssh_host: its worker's heartbeats are all there is to check
        return list(checks.values()) or [Check(node.name, "worker", None, "not checked: worker nodes need team mode")]
    reason = checks["reachable"].detail
    return [checks.get(name) or Check(node.name, name, None, f"not checked: {reason}")
            for name in NODE_CHECKS if name in checks or (name != "worker" and data is None)]


def _repair(ctx: NodeContext, node: Node, shell: _Shell, checks: dict[str, Check], orphans: list[dict],
            dead: list[dict]) -> dict[str, Any] | None:
    """Try the safe repairs, then probe again and mark each repaired only if the new answer is healthy."""
    tried = False
    runner = checks["runner"]
    if runner.ok is False:
        runner.repair = "re-shipped the runner"
        try:
            shell.ship_runner()
            tried = True
        except DispatchError as exc:
            runner.repaired, runner.repair = False, f"re-shipping the runner failed: {exc}"
    for kind, runs, what in (("orphans", orphans, "killed the orphan runner(s)"),
                             ("heartbeats", dead, "closed the books of the dead runner(s) (`runner.pyz kill`)")):
        if not runs:
            continue
        if checks["runner"].ok is False and not tried:
            checks[kind].repair, checks[kind].repaired = f"{what}: NOT RUN (no runner on the node)", None
            continue
        checks[kind].repair = f"{what}: " + ", ".join(f"{r['project']}/{r['task_id']}" for r in runs[:10])
        try:
            for run in runs:
                shell.kill_run(run["project"], run["task_id"])
            tried = True
        except DispatchError as exc:
            checks[kind].repaired, checks[kind].repair = False, f"{checks[kind].repair}; failed: {exc}"
    if not tried:
        return None
    try:
        again = shell.probe()
    except DispatchError as exc:
        for check in checks.values():
            if check.repair and check.repaired is None:
                check.repaired = False
                check.detail += f"; re-check failed: {exc}"
        return None
    recheck = _healthy_checks(node, again, ctx.limits, shell)
    orphans_after, heartbeats_after, left, dead_left = _runs_checks(node, again, ctx)
    after = {**recheck, "orphans": orphans_after, "heartbeats": heartbeats_after}
    killed = {(r["project"], r["task_id"]) for r in orphans + dead}
    for name, check in checks.items():
        if check.repair and check.repaired is None:
            if name in ("orphans", "heartbeats"):
                still = [r for r in left + dead_left if (r["project"], r["task_id"]) in killed]
                check.repaired = not still
            else:
                check.repaired = bool(after[name].ok)
            if not check.repaired:
                check.detail += f"; after the repair: {after[name].detail}"
    return again
