"""Team mode on the shared Prefect server: every user's running projects, and runs handed to a worker.

    list_team_runs(api_url)          the `dispatch-project` flow runs not yet finished, of every user
    submit_run(deployment, project)  a run of the `dispatch-project` deployment, for a worker to pick up

Who started a run travels with it twice: as the tags `dispatch-user:<user>` and `dispatch-host:<host>` (set
by `dispatch start` and `dispatch start --detach`), and as the flow's `started_by` parameter ("user@host"),
so that a run started from the UI or `prefect deployment run` with that parameter still names its user.
`list_team_runs` reads the tags first, then the parameter, else shows "-".

`list_team_runs` asks the server's REST API with httpx and never imports Prefect (its client alone takes ~3 s
to import); `submit_run` uses Prefect's public client, imported inside the function.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from base64 import b64encode
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from dispatch.core.errors import DispatchError
from dispatch.core.net import health_status

FLOW_NAME = "dispatch-project"
ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")
"""Flow-run state types of a project that has not finished yet."""
USER_TAG, HOST_TAG = "dispatch-user:", "dispatch-host:"
_MAX_RUNS = 200  # the server's default page size
_MAX_TASK_RUNS = 200


class TeamServerError(DispatchError):
    """The team's Prefect server cannot be reached, refused us, or lacks what we asked for."""


class DeploymentNotFound(TeamServerError):
    """The deployment `dispatch start --detach` submits to does not exist on the server."""


class TeamRun(BaseModel):
    """One unfinished `dispatch-project` flow run on the team's server, as `dispatch status` lists it."""

    project: str
    user: str = Field(description="who started it: its dispatch-user tag, else its started_by parameter, else -")
    host: str = Field(description="the machine it was started from, when known, else -")
    state: str = Field(description="the flow run's state type: SCHEDULED, PENDING, RUNNING, CANCELLING, PAUSED")
    state_name: str = Field(default="", description="Prefect's state name (Late, AwaitingRetry, ...)")
    started_at: float | None = Field(default=None, description="Unix time it started (scheduled: expected)")
    elapsed: float | None = Field(default=None, description="seconds since it started; None before it starts")
    flow_run_id: str
    flow_run_name: str = ""
    url: str | None = Field(default=None, description="the flow run in the Prefect UI")
    deployment: str | None = Field(default=None, description="flow/deployment, when submitted through one")
    tasks: dict[str, int] | None = Field(default=None, description="its task runs (spec attempts) by state type")

    def progress(self) -> str:
        """The task-run counts as `2 completed, 1 running`; "none yet", or "-" when not counted."""
        if self.tasks is None:
            return "-"
        if not self.tasks:
            return "none yet"
        return ", ".join(f"{count} {state.lower()}" for state, count in sorted(self.tasks.items()))


class SubmittedRun(BaseModel):
    """A flow run created from the deployment by `submit_run`."""

    flow_run_id: str
    flow_run_name: str
    deployment: str
    url: str | None = None
    started_by_dropped: bool = Field(default=False, description="the deployment predates the started_by parameter")


def whoami() -> tuple[str, str]:
    """This user and machine: `getpass.getuser()` (LOGNAME, USER, ...) and the host name."""
    return getpass.getuser(), socket.gethostname()


def user_tags(user: str, host: str) -> list[str]:
    """The tags that name who started a project run."""
    return [f"{USER_TAG}{user}", f"{HOST_TAG}{host}"]


def _check_reachable(api_url: str, timeout: float) -> None:
    """One GET of `<api>/health` (no auth needed): fail fast, before importing Prefect, when the server is away."""
    api = api_url.rstrip("/")
    try:
        status = health_status(api, timeout)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TeamServerError(f"cannot reach the Prefect server at {api} ({reason}); check PREFECT_API_URL or "
                              f"run `dispatch server check`") from exc
    if not 200 <= status < 300:
        raise TeamServerError(f"the Prefect server at {api} answered HTTP {status} on /health: is "
                              f"PREFECT_API_URL a Prefect API URL (it ends in /api)?")


def _http_failure(api_url: str, exc: Exception) -> TeamServerError:
    response = getattr(exc, "response", None)
    if response is not None and response.status_code == 401:
        return TeamServerError(f"the Prefect server at {api_url} refused us (HTTP 401): set PREFECT_API_AUTH_STRING "
                               f"to the server's user:password")
    if response is not None:
        return TeamServerError(f"the Prefect server at {api_url} answered HTTP {response.status_code}: "
                               f"{response.text[:200]}")
    return TeamServerError(f"lost the Prefect server at {api_url}: {exc}")


def _who(run: dict) -> tuple[str, str]:
    """User and host from the run's tags, else from its `started_by` parameter (never a mix of the two)."""
    tags = {tag.split(":", 1)[0] + ":": tag.split(":", 1)[1] for tag in run.get("tags") or [] if ":" in tag}
    if tags.get(USER_TAG):
        return tags[USER_TAG], tags.get(HOST_TAG) or "-"
    user, _, host = str((run.get("parameters") or {}).get("started_by") or "").partition("@")
    return user or "-", host or "-"


def _stamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def ui_base_url(api_url: str) -> str:
    """The UI's base URL: PREFECT_UI_URL, else the API URL without its `/api` (what Prefect's server serves)."""
    ui = os.environ.get("PREFECT_UI_URL") or api_url.rstrip("/").removesuffix("/api")
    return ui.rstrip("/")


def list_team_runs(api_url: str, *, auth_string: str | None = None, timeout: float = 5.0,
                   progress: bool = True) -> list[TeamRun]:
    """Every unfinished run of the project flow on the server, of every user, the oldest first.

    Asks the server's REST API with httpx directly: importing Prefect's client alone costs ~3 s, which a
    read-only command must not pay.

    Args:
        api_url: the server's API URL (`PREFECT_API_URL`).
        auth_string: `PREFECT_API_AUTH_STRING` (user:password), when the server wants basic auth.
        timeout: seconds to wait for the server on each request.
        progress: also count each run's task runs by state (one more request per run).

    Returns:
        One `TeamRun` per flow run of `dispatch-project` in a state of `ACTIVE_STATES`.

    Raises:
        TeamServerError: the server cannot be reached or refused us; the message names the URL.
    """
    import httpx

    api = api_url.rstrip("/")
    headers = {"Authorization": "Basic " + b64encode(auth_string.encode()).decode()} if auth_string else {}
    try:
        with httpx.Client(base_url=api, headers=headers, timeout=timeout) as client:
            def post(path: str, body: dict) -> list[dict]:
                response = client.post(path, json=body)
                response.raise_for_status()
                return response.json()

            runs = post("/flow_runs/filter", {
                "flows": {"name": {"any_": [FLOW_NAME]}},
                "flow_runs": {"state": {"type": {"any_": list(ACTIVE_STATES)}}}, "limit": _MAX_RUNS})
            ids = sorted({run["deployment_id"] for run in runs if run.get("deployment_id")})
            deployments = {d["id"]: f"{FLOW_NAME}/{d['name']}" for d in post(
                "/deployments/filter", {"deployments": {"id": {"any_": ids}}})} if ids else {}
            counts: dict[str, dict[str, int]] = {}
            for run in runs if progress else []:
                tally: dict[str, int] = {}
                for task_run in post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}},
                                                           "limit": _MAX_TASK_RUNS}):
                    state = task_run.get("state_type") or "UNKNOWN"
                    tally[state] = tally.get(state, 0) + 1
                counts[run["id"]] = tally
    except httpx.HTTPStatusError as exc:
        raise _http_failure(api, exc) from exc
    except httpx.HTTPError as exc:
        raise TeamServerError(f"cannot reach the Prefect server at {api} ({exc}); check PREFECT_API_URL or "
                              f"run `dispatch server check`") from exc

    now, ui = time.time(), ui_base_url(api)
    result = []
    for run in runs:
        user, host = _who(run)
        started = _stamp(run.get("start_time"))
        began = started or _stamp(run.get("expected_start_time"))
        result.append(TeamRun(
            project=str((run.get("parameters") or {}).get("project") or run["name"]), user=user, host=host,
            state=run.get("state_type") or "UNKNOWN", state_name=run.get("state_name") or "",
            started_at=began, elapsed=now - started if started else None, flow_run_id=run["id"],
            flow_run_name=run["name"], url=f"{ui}/runs/flow-run/{run['id']}",
            deployment=deployments.get(run.get("deployment_id")), tasks=counts.get(run["id"])))
    return sorted(result, key=lambda r: r.started_at or now)


def submit_run(api_url: str, deployment: str, *, project: str, only: list[str] | None = None,
               start_from: list[str] | None = None, force: bool = False) -> SubmittedRun:
    """Create a run of the project flow's deployment for a worker to pick up, and return at once.

    Args:
        api_url: the server's API URL, for messages.
        deployment: `flow/deployment`, e.g. `dispatch-project/dispatch-project`.
        project, only, start_from, force: the flow's parameters, as `dispatch start` takes them.

    Returns:
        The new flow run's id, name and UI URL.

    Raises:
        DeploymentNotFound: no such deployment; the message says how to create it.
        TeamServerError: the server cannot be reached or refused us.
    """
    _check_reachable(api_url, 5.0)
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.urls import url_for

    user, host = whoami()
    parameters: dict[str, Any] = {"project": project, "only": only, "start_from": start_from, "force": force}
    try:
        with get_client(sync_client=True) as client:
            try:
                found = client.read_deployment_by_name(deployment)
            except ObjectNotFound:
                raise DeploymentNotFound(
                    f"no deployment {deployment!r} on the Prefect server at {api_url}: create it with "
                    f"`prefect deploy --all` from the repo root (and serve its pool with a worker, "
                    f"docs/team-mode.md), or set DISPATCH_DEPLOYMENT to the right flow/deployment name") from None
        # A deployment made before the flow had `started_by` rejects it; the tags still name the user.
        accepted = (found.parameter_openapi_schema or {}).get("properties") or {}
        dropped = "started_by" not in accepted
        if not dropped:
            parameters["started_by"] = f"{user}@{host}"
        flow_run = run_deployment(found.id, parameters=parameters, flow_run_name=project, tags=user_tags(user, host),
                                  timeout=0, as_subflow=False)
    except httpx.HTTPError as exc:
        raise _http_failure(api_url, exc) from exc
    return SubmittedRun(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name, deployment=deployment,
                        url=url_for("flow-run", obj_id=flow_run.id), started_by_dropped=dropped)
