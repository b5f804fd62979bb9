"""The guardian's checks on the Prefect server (team mode): leaked slot leases, expired lock variables,
flow runs stuck Running with no live dispatcher; and which projects have a live dispatcher at all.

A dispatcher is known dead only by evidence: the state file it wrote on this machine
(`DISPATCH_HOME/state/<project>.json`, with its pid and flow run) names a pid that no longer runs, or its
flow run sent Prefect's own flow-run heartbeats (`prefect.flow-run.heartbeat` events, on when
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` is set) and the latest is older than `DISPATCH_GUARDIAN_STUCK_AFTER`.
A run with neither is taken as live (nothing here can prove otherwise), so the guardian never kills or
crashes what another machine may still be running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dispatch.core.processes import pid_alive
from dispatch.core.results import load_all_states
from dispatch.core.settings import DispatchSettings
from dispatch.ops.health import SERVER, Check
from dispatch.prefect.errors import SERVER_ERRORS

logger = logging.getLogger(__name__)

OUR_FLOWS = ("dispatch-project", "pipeline", "nightly-regression")
"""Flows whose runs are dispatchers (their pid and flow run are in this machine's state files)."""
LEASE_PREFIX = "dispatch_lease_"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"


@dataclass
class Dispatchers:
    """Which projects have a live dispatcher, and the flow runs proven dead while Running."""

    live: set[str] | None = None  # None: unknown (the server could not be read)
    dead_runs: dict[str, str] = field(default_factory=dict)  # flow run id -> project
    why: dict[str, str] = field(default_factory=dict)  # flow run id -> the evidence it is dead
    running: dict[str, str] = field(default_factory=dict)  # every Running flow run of our flows -> project
    error: str = ""


def _with_run_keys(projects: set[str]) -> set[str]:
    from dispatch.pipeline.generated import run_key

    return projects | {run_key(p) for p in projects}


def dispatchers(settings: DispatchSettings) -> Dispatchers:
    """The live projects (this machine's state files, and in team mode every unfinished run on the server),
    and the Running flow runs whose dispatcher is proven dead."""
    states = load_all_states(settings.state_dir)
    found = Dispatchers(live={s.project for s in states if s.state == "running" and pid_alive(s.pid)})
    dead_pids = {s.flow_run_id: s.project for s in states if s.flow_run_id and not pid_alive(s.pid)}
    if settings.embedded:
        found.live = _with_run_keys(found.live)
        return found
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from dispatch.prefect.team import ACTIVE_STATES

    local_live = {s.flow_run_id for s in states if s.flow_run_id and pid_alive(s.pid)}
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=list(OUR_FLOWS))),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType(s) for s in ACTIVE_STATES]))), limit=200)
            silent = {str(run.id): _silence(client, str(run.id)) for run in runs
                      if run.state_type == StateType.RUNNING and str(run.id) not in set(dead_pids) | local_live}
    except SERVER_ERRORS as exc:
        found.live, found.error = None, f"cannot read the flow runs from {settings.prefect_api_url}: {exc}"
        return found
    for run in runs:
        parameters = run.parameters or {}
        projects = parameters.get("projects") if isinstance(parameters.get("projects"), list) else None
        names = [str(p) for p in projects] if projects else [str(parameters.get("project") or run.name)]
        project, run_id = ",".join(names), str(run.id)
        if run.state_type == StateType.RUNNING:
            found.running[run_id] = project
            quiet = silent.get(run_id)
            if run_id in dead_pids or (quiet is not None and quiet > settings.guardian_stuck_after):
                found.dead_runs[run_id] = project
                found.why[run_id] = ("its dispatcher's pid is gone" if run_id in dead_pids
                                     else f"no flow-run heartbeat for {quiet:.0f} s")
                continue
        found.live.update(names)
    found.live = _with_run_keys(found.live)
    return found


def _silence(client: Any, flow_run_id: str) -> float | None:
    """Seconds since the flow run's latest `prefect.flow-run.heartbeat` event (the last day); None without one."""
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    response = client.request("POST", "/events/filter", json={"limit": 1, "filter": {
        "event": {"name": [HEARTBEAT_EVENT]}, "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        "occurred": {"since": (now - timedelta(days=1)).isoformat(), "until": now.isoformat()}, "order": "DESC"}})
    events = response.json().get("events") or []
    if not events:
        return None
    return (now - datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00"))).total_seconds()


def stuck_runs(who: Dispatchers, repair: bool) -> Check:
    """Flow runs of our flows Running whose dispatcher is dead; marked Crashed, then read back."""
    if who.live is None:
        return Check(SERVER, "stuck-runs", None, f"not checked: {who.error}")
    if not who.dead_runs:
        return Check(SERVER, "stuck-runs", True, f"{len(who.running)} Running flow run(s) of our flows, none "
                                                 "whose dispatcher is known dead")
    names = ", ".join(f"{project} ({run_id[:8]}: {who.why.get(run_id, '?')})"
                      for run_id, project in list(who.dead_runs.items())[:10])
    check = Check(SERVER, "stuck-runs", False, f"Running with a dead dispatcher: {names}")
    if not repair:
        return check
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    check.repair = "marked Crashed: " + names
    try:
        with get_client(sync_client=True) as client:
            for run_id in who.dead_runs:
                client.set_flow_run_state(run_id, Crashed(message=f"its dispatcher died (the guardian found "
                                                                  f"{who.why.get(run_id, 'it dead')})"), force=True)
            left = [r for r in who.dead_runs if client.read_flow_run(r).state_type != StateType.CRASHED]
    except SERVER_ERRORS as exc:
        return _settle(check, None, f"marking them Crashed failed: {exc}")
    return _settle(check, [r[:8] for r in left], "still not Crashed after the repair")


def _settle(check: Check, left: list[str] | None, why: str) -> Check:
    """Mark a repair by its re-check: repaired when nothing is `left`; None: the repair itself failed (`why`)."""
    check.repaired = left is not None and not left
    if not check.repaired:
        check.detail += f"; {why}" + (f": {', '.join(left)}" if left else "")
    return check


def expired_locks(repair: bool) -> Check:
    """Lock variables `dispatch_lock_*` not renewed within their lease (server_locks' rule); deleted."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from dispatch.prefect.server_locks import held_locks

    try:
        expired = [lock for lock in held_locks() if lock["expired"]]
    except SERVER_ERRORS as exc:
        return Check(SERVER, "locks", None, f"not checked: cannot read the lock variables: {exc}")
    if not expired:
        return Check(SERVER, "locks", True, "no expired file lock")
    what = ", ".join(f"{lock['name']} ({lock['holder']}, {lock['project']}/{lock['task_id']})" for lock in expired[:10])
    check = Check(SERVER, "locks", False, f"expired, not renewed by their holder: {what}")
    if not repair:
        return check
    check.repair = f"deleted {len(expired)} expired lock variable(s)"
    try:
        with get_client(sync_client=True) as client:
            for lock in expired:
                try:
                    client.delete_variable_by_name(lock["name"])
                except ObjectNotFound:  # a dispatcher saw it expired and removed it first
                    pass
        left = {lock["name"] for lock in held_locks()} & {lock["name"] for lock in expired}
    except SERVER_ERRORS as exc:
        return _settle(check, None, f"deleting failed: {exc}")
    return _settle(check, sorted(left), "still there after the repair")


def _lease_records(client: Any) -> list[Any]:
    from prefect.client.schemas.objects import Variable

    found, offset = [], 0
    while True:
        response = client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": LEASE_PREFIX}}, "limit": 200, "offset": offset})
        page = Variable.model_validate_list(response.json())
        found += [v for v in page if v.name.startswith(LEASE_PREFIX) and isinstance(v.value, dict)]
        if len(page) < 200:
            return found
        offset += 200


def _lease_gone(client: Any, lease_id: str) -> bool:
    """Whether the server no longer has the lease (renewing it answers 404); a live one is renewed briefly."""
    try:
        client.renew_concurrency_lease(lease_id=lease_id, lease_duration=60)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code in (404, 410):
            return True
        raise
    return False


def leaked_leases(settings: DispatchSettings, who: Dispatchers, repair: bool) -> Check:
    """Slot leases on the `node-<name>` limits whose holder is dead (its pid gone on this machine, or its
    flow run finished or stuck); released, their records removed, and the release proven by the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    states = load_all_states(settings.state_dir)
    finished: set[str] = set()
    try:
        with get_client(sync_client=True) as client:
            records = _lease_records(client)
            flow_runs = {str(r.value.get("flow_run_id")) for r in records if r.value.get("flow_run_id")}
            for run_id in flow_runs:
                try:
                    run = client.read_flow_run(run_id)
                except ObjectNotFound:
                    finished.add(run_id)
                    continue
                if run.state is not None and run.state.is_final():
                    finished.add(run_id)
    except SERVER_ERRORS as exc:
        return Check(SERVER, "leases", None, f"not checked: cannot read the lease records: {exc}")
    local_pids = {s.flow_run_id: s.pid for s in states if s.flow_run_id}
    leaked = []
    for record in records:
        value = record.value
        run_id = str(value.get("flow_run_id") or "")
        pid = int(value.get("pid") or 0)
        dead = (run_id in finished or run_id in who.dead_runs
                or (value.get("host") == _hostname() and pid and not pid_alive(pid))
                or (run_id in local_pids and not pid_alive(local_pids[run_id])))
        if dead:
            leaked.append(record)
    if not leaked:
        return Check(SERVER, "leases", True, f"{len(records)} slot lease(s) recorded, every holder alive")
    what = ", ".join(f"{r.value.get('limit')} held by {r.value.get('host')} pid {r.value.get('pid')}"
                     for r in leaked[:10])
    check = Check(SERVER, "leases", False, f"{len(leaked)} lease(s) of a dead holder: {what}")
    if not repair:
        return check
    check.repair = f"released {len(leaked)} lease(s) of dead holders"
    left = []
    try:
        with get_client(sync_client=True) as client:
            for record in leaked:
                lease_id = str(record.value.get("lease_id"))
                try:
                    client.release_concurrency_slots_with_lease(lease_id=lease_id)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 404:  # 404: it had expired and was revoked already
                        raise
                if _lease_gone(client, lease_id):
                    try:
                        client.delete_variable_by_name(record.name)
                    except ObjectNotFound:
                        pass
                else:
                    left.append(lease_id)
    except SERVER_ERRORS as exc:
        return _settle(check, None, f"releasing failed: {exc}")
    return _settle(check, left, "still held after the release")


def _hostname() -> str:
    import socket

    return socket.gethostname()


def server_checks(settings: DispatchSettings, who: Dispatchers, repair: bool) -> list[Check]:
    """leases, locks, stuck-runs (team mode only: embedded mode has no shared server)."""
    if who.live is None:  # the server does not answer: one FAIL that says so, the rest not run
        reason = f"not checked: the Prefect server does not answer ({who.error})"
        return [Check(SERVER, "api", False, f"{who.error}; is the server up and PREFECT_API_URL right?")] + [
            Check(SERVER, name, None, reason) for name in ("leases", "locks", "stuck-runs")]
    started = time.monotonic()
    checks = [leaked_leases(settings, who, repair), expired_locks(repair), stuck_runs(who, repair)]
    logger.debug("server checks took %.2f s", time.monotonic() - started)
    return checks
