"""What `dispatch monitor` shows: one snapshot of the cluster, from this machine's state files and the server.

No Prefect import: the state files under DISPATCH_HOME (kept current by every running dispatcher of this
machine), `drained.json`, and, where a Prefect API answers (the team's server, or in embedded mode this
home's local server when it runs), a few REST calls with httpx (one per kind of thing; ~3 s of Prefect client
import is what a refresh every 2 s cannot pay).

The snapshot (`take_snapshot(...).to_json()`, printed by `dispatch monitor --once --json`):

- `taken_at`: Unix time of the snapshot. `mode`: "embedded" or "team". `prefect_api_url`: the API asked, or null.
- `nodes`: one per node of nodes.json: `name`, `transport`, `slots`, `used` (slots in use: this machine's
  runs, and in team mode the server's `node-<name>` limit, whichever is more), `load` (the 1, 5 and 15 minute
  load averages when known: the local node's, and a remote node's once `LoadProbe` has read it over SSH; null
  otherwise), `drained` (null, or `{reason, by, since}`).
- `running`: every spec running in this machine's dispatchers: `project`, `task_id`, `user` ("user@host"),
  `node`, `model` (the first model of its chain when it started, "shell" for shell specs), `attempt`,
  `started_at`, `elapsed_s`, `cost_usd` (null: see below).
- `projects`: per project of this machine: `project`, `user`, `state` (running, completed, failed, cancelled,
  interrupted: its dispatcher died), `queued` (specs not started yet or waiting to retry), `running`,
  `succeeded`, `failed` (failed or not run), `total`, `cost_usd`.
- `team_runs`: team mode: every user's unfinished project runs on the server (`project`, `user`, `host`,
  `state`, `elapsed`, `tasks`: task runs by state), as `dispatch status` lists them; null in embedded mode
  or when the server does not answer.
- `cooldowns`: models cooling down or blocked now: `model`, `state` ("cooling" | "blocked"), `kind`, `until`
  (the reset, Unix time), `reason`, `by`; null when no Prefect API could be asked (see `notes`).
- `failures`: the most recent failed specs of this machine's latest runs, newest first: `project`,
  `task_id`, `node`, `model`, `attempts`, `ended_at`, `reason`, `cost_usd`.
- `usage_today`: what the agents of this machine reported since 00:00 UTC (`dispatch/core/usage.py`'s ledger):
  `cost_usd`, `input_tokens`, `output_tokens`, `attempts`, `attempts_without_cost`, `by_model` and `by_user`
  (the same figures each), and `budgets` (`{"model"|"user": {name: {"limit_usd", "spent_usd"}}}`).
- `notes`: what could not be read, for a person.

`cost_usd` is the place for the spend of the agent attempts: filled from a row's or result's `cost_usd` (or
the sum of its attempts' `cost_usd`, on them or on their `usage`) when the records carry it, null otherwise
(and for a figure that is no finite number: the JSON never holds `Infinity` or `NaN`); nothing is estimated here.
"""

from __future__ import annotations

import os
import threading
import time
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from dispatch.cluster.config import load_nodes
from dispatch.core.nodes import Node
from dispatch.core.processes import pid_alive
from dispatch.core.results import ProjectState, load_all_states
from dispatch.core.settings import DispatchSettings
from dispatch.core.usage import total_figure

QUEUED = ("waiting", "ready", "retrying")
_TIMEOUT = 5.0  # seconds per REST call (as `dispatch status`): the view keeps refreshing when the server is away
_PAGE = 200


@dataclass
class Snapshot:
    """One look at the cluster (fields: the module docstring)."""

    taken_at: float
    mode: str
    prefect_api_url: str | None
    nodes: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    projects: list[dict[str, Any]] = field(default_factory=list)
    team_runs: list[dict[str, Any]] | None = None
    cooldowns: list[dict[str, Any]] | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    usage_today: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cost_usd(record: Any) -> float | None:
    """The spend recorded on a row or result (`cost_usd`, else the sum of its attempts'), or None when none is."""
    direct = total_figure(getattr(record, "cost_usd", None))  # never inf or NaN: the JSON must stay JSON
    if direct is not None:
        return direct
    attempts = getattr(record, "attempts", None)  # a result's list of Attempt; a state row's is a count
    costs = [total_figure(_attempt_cost(a)) for a in attempts] if isinstance(attempts, list) else []
    return _sum_costs(costs)


def _attempt_cost(attempt: Any) -> Any:
    """An attempt's `cost_usd`, on it or on its `usage` (what the agent reported)."""
    direct = getattr(attempt, "cost_usd", None)
    return direct if direct is not None else getattr(getattr(attempt, "usage", None), "cost_usd", None)


def _sum_costs(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return total_figure(float(sum(known))) if known else None  # a sum past float's range is unknown


def _api(settings: DispatchSettings) -> str | None:
    """The Prefect API to ask: the team's server, or this home's local server if it runs (never started here)."""
    if not settings.embedded:
        return settings.prefect_api_url
    from dispatch.prefect.embedded import running_server

    server = running_server(settings)
    return server.api_url if server is not None else None


class _Rest:
    """A few JSON calls to the Prefect REST API (basic auth when the settings have it)."""

    def __init__(self, api_url: str, settings: DispatchSettings) -> None:
        import httpx

        auth = settings.prefect_api_auth_string
        headers = {"Authorization": "Basic " + b64encode(auth.get_secret_value().encode()).decode()} if auth else {}
        self.client = httpx.Client(base_url=api_url.rstrip("/"), headers=headers, timeout=_TIMEOUT)

    def post(self, path: str, body: dict) -> Any:
        response = self.client.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> Any | None:
        response = self.client.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.client.close()


def _server_limits(rest: _Rest) -> dict[str, dict[str, int]]:
    """Every global concurrency limit on the server: name -> {"slots", "used"}."""
    limits: dict[str, dict[str, int]] = {}
    offset = 0
    while True:
        page = rest.post("/v2/concurrency_limits/filter", {"limit": _PAGE, "offset": offset})
        for limit in page:
            limits[str(limit["name"])] = {"slots": int(limit["limit"]), "used": int(limit.get("active_slots") or 0)}
        if len(page) < _PAGE:
            return limits
        offset += _PAGE


def _cooldowns(rest: _Rest, now: float) -> list[dict[str, Any]]:
    """Models cooling down or blocked now, from their `dispatch_cooldown_<model>` Variables."""
    from dispatch.core.cooldowns import model_state
    from dispatch.prefect.cooldowns import variable_name

    prefix = variable_name("")
    rows = []
    for variable in rest.post("/variables/filter", {"variables": {"name": {"like_": prefix}}, "limit": _PAGE}):
        value, name = variable.get("value"), str(variable.get("name", ""))
        if not name.startswith(prefix) or not isinstance(value, dict):
            continue
        row = model_state(str(value.get("model") or name[len(prefix):]), value, now)
        if row["state"] != "available":
            rows.append({k: row[k] for k in ("model", "state", "kind", "until", "reason", "by")})
    return sorted(rows, key=lambda r: r["until"] or 0)


def _drained_on_server(rest: _Rest) -> dict[str, dict]:
    from dispatch.core.drain import parse_stored  # the store's own validation of a stored value
    from dispatch.prefect.drained import VARIABLE

    found = rest.get(f"/variables/name/{VARIABLE}")
    return parse_stored(found.get("value") if isinstance(found, dict) else None)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _live(states: list[ProjectState]) -> list[ProjectState]:
    for state in states:
        if state.state == "running" and not pid_alive(state.pid):
            state.state = "interrupted"
    return states


def _project_rows(states: list[ProjectState], now: float) -> tuple[list[dict], list[dict], list[dict]]:
    """(running specs, per-project counts, failed specs) of this machine's latest runs."""
    running, projects, failures = [], [], []
    for state in states:
        who = f"{state.user}@{state.host}"
        counts = state.counts()
        live = state.state == "running"
        costs = []
        for task_id, row in state.specs.items():
            cost = cost_usd(row)
            costs.append(cost)
            if row.state == "running" and live:
                running.append({"project": state.project, "task_id": task_id, "user": who, "node": row.node,
                                "model": row.model, "attempt": row.attempts, "started_at": row.started_at,
                                "elapsed_s": round(now - row.started_at, 1) if row.started_at else None,
                                "cost_usd": cost})
            elif row.state == "failed":
                failures.append({"project": state.project, "task_id": task_id, "node": row.node,
                                 "model": row.model, "attempts": row.attempts, "ended_at": row.ended_at,
                                 "reason": row.reason, "cost_usd": cost})
        projects.append({
            "project": state.project, "user": who, "state": state.state,
            "queued": sum(counts.get(s, 0) for s in QUEUED) if live else 0,
            "running": counts.get("running", 0) if live else 0, "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0) + counts.get("not_run", 0), "total": len(state.specs),
            "cost_usd": _sum_costs(costs)})
    failures.sort(key=lambda f: f["ended_at"] or 0, reverse=True)
    return running, projects, failures


def local_slot_use(settings: DispatchSettings) -> dict[str, int]:
    """Slots in use per node by the live runs of this machine (their state files), and its slot locks."""
    used: dict[str, int] = {}
    for state in load_all_states(settings.state_dir):
        if state.state != "running" or not pid_alive(state.pid):
            continue
        for name, load in state.nodes.items():
            used[name] = used.get(name, 0) + int(load.get("used", 0))
    local_dir = settings.locks_dir / "node-local"
    if local_dir.is_dir():
        from dispatch.core.locks import SlotLocks

        used["local"] = max(used.get("local", 0), SlotLocks(local_dir, settings.local_slots).in_use())
    return used


def _usage_today(settings: DispatchSettings) -> dict[str, Any]:
    from dispatch.core.usage import budget_use, totals

    today = totals(settings)
    keep = ("cost_usd", "input_tokens", "output_tokens", "attempts", "attempts_without_cost")
    return {**{key: today[key] for key in keep},
            "by_model": {name: {key: row.get(key) for key in keep} for name, row in today["by_model"].items()},
            "by_user": {name: {key: row.get(key) for key in keep} for name, row in today["by_user"].items()},
            "budgets": budget_use(settings, today)}


def take_snapshot(settings: DispatchSettings, *, failures: int | None = None,
                  loads: dict[str, list[float]] | None = None) -> Snapshot:
    """Look at the cluster once (fields: the module docstring).

    Args:
        settings: the process's settings (DISPATCH_HOME, PREFECT_API_URL).
        failures: how many recent failures to keep (default `settings.monitor_failures`).
        loads: remote nodes' load averages known so far (`LoadProbe.loads()`).

    Raises:
        ConfigError: nodes.json is invalid.
    """
    import httpx

    from dispatch.core.drain import drained_nodes
    from dispatch.prefect.drained import drained_store

    now = time.time()
    api = _api(settings)
    snapshot = Snapshot(taken_at=now, mode="embedded" if settings.embedded else "team", prefect_api_url=api)
    nodes = load_nodes(settings)
    states = _live(load_all_states(settings.state_dir))
    snapshot.running, snapshot.projects, recent = _project_rows(states, now)
    snapshot.failures = recent[:failures or settings.monitor_failures]
    snapshot.usage_today = _usage_today(settings)
    drained = drained_nodes(drained_store(settings)) if settings.embedded else {}
    limits: dict[str, dict[str, int]] = {}
    if api is None:
        snapshot.notes.append("cool-downs unknown: this home's local Prefect server is not running "
                              "(`dispatch models` starts it)")
    else:
        rest = _Rest(api, settings)
        try:
            snapshot.cooldowns = _cooldowns(rest, now)
            if not settings.embedded:
                drained = _drained_on_server(rest)
                limits = _server_limits(rest)
        except (httpx.HTTPError, ValueError) as exc:
            snapshot.notes.append(f"the Prefect API at {api} failed ({exc}); showing this machine's state only")
        finally:
            rest.close()
        if not settings.embedded:
            snapshot.team_runs = _team_runs(settings, snapshot.notes)
    local = local_slot_use(settings)
    for node in nodes:
        used = max(local.get(node.name, 0), limits.get(node.pool, {}).get("used", 0))
        snapshot.nodes.append({"name": node.name, "transport": node.transport, "slots": node.slots, "used": used,
                               "load": _load_average() if node.transport == "local" else (loads or {}).get(node.name),
                               "drained": drained.get(node.name)})
    return snapshot


def _team_runs(settings: DispatchSettings, notes: list[str]) -> list[dict[str, Any]] | None:
    from dispatch.prefect.team import TeamServerError, list_team_runs

    auth = settings.prefect_api_auth_string
    try:
        runs = list_team_runs(settings.prefect_api_url, auth_string=auth.get_secret_value() if auth else None,
                              timeout=_TIMEOUT)
    except TeamServerError as exc:
        notes.append(str(exc))
        return None
    return [run.model_dump(mode="json") for run in runs]


class LoadProbe:
    """The load averages of the remote nodes, read over SSH (`cat /proc/loadavg`, one command per node, in
    parallel) by a daemon thread every `interval` seconds; `loads()` never waits on it. A node that cannot be
    reached (or whose key lives only in a `ClusterNode` block: no Prefect here) has no load.

    Args:
        nodes: the cluster's nodes (local ones are skipped: their load is read directly).
        interval: seconds between two rounds.
        timeout: seconds to connect to a node.
    """

    def __init__(self, nodes: list[Node], interval: float = 30.0, timeout: float = 5.0) -> None:
        self._nodes = [n for n in nodes if n.transport != "local" and (n.ssh_host or n.host)]
        self._interval, self._timeout = interval, timeout
        self._loads: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._stopped, self._first_round = threading.Event(), threading.Event()
        threading.Thread(target=self._run, name="monitor-load", daemon=True).start()

    def _read(self, pool: Any, node: Node) -> list[float] | None:
        from dispatch.cluster.ssh_target import node_target
        from dispatch.core.errors import DispatchError

        try:
            run = pool.run(node_target(node, connect_timeout=self._timeout), "cat /proc/loadavg",
                           timeout=self._timeout + 5, check=False)
            loads = [round(float(x), 2) for x in run.stdout.split()[:3]] if run.exit_code == 0 else None
            return loads if loads and all(0 <= x < float("inf") for x in loads) else None  # never nan/inf in JSON
        except (DispatchError, ValueError):
            return None

    def _run(self) -> None:
        from dispatch.cluster.ssh import SSHPool

        if not self._nodes:
            self._first_round.set()
            return
        with SSHPool() as pool, ThreadPoolExecutor(max_workers=min(16, len(self._nodes))) as executor:
            while True:
                found = dict(executor.map(lambda n: (n.name, self._read(pool, n)), self._nodes))
                with self._lock:
                    self._loads = {name: load for name, load in found.items() if load}
                self._first_round.set()
                if self._stopped.wait(self._interval):
                    return

    def wait(self, timeout: float) -> bool:
        """Wait until the first round is done (at most `timeout` seconds); whether it is."""
        return self._first_round.wait(timeout)

    def loads(self) -> dict[str, list[float]]:
        """Node name -> [1, 5, 15 minute load] of the nodes read in the last round."""
        with self._lock:
            return dict(self._loads)

    def close(self) -> None:
        self._stopped.set()
