"""The `worker` transport (pull): a spec attempt as a flow run of `spec-run/node-<name>` in the node's pool.

The dispatcher creates the flow run as a child of the spec's task run (so the UI shows it under the
project's run), the node's Prefect worker picks it up within the pool's concurrency limit (= slots) and
runs `flows/spec_run.py` there. One `FlowRunWatcher` thread per dispatcher reads the state of every
watched child in one API call per poll, instead of one poller per spec.

A child whose worker died is not left Running: the spec-run flow stamps the label `dispatch.heartbeat`
every few seconds; when it stops changing for `stale_after` seconds (this machine's clock, counting only
reads that reached the server) the child is set Crashed and the
attempt comes back `lost` with `node_fault`, so the scheduler retries it (Prefect's own flow-run
heartbeats come at most every 30 s, and need an automation to act on them). A child still waiting for
a worker while none of the pool's workers has sent a heartbeat for `pickup_timeout` seconds is
cancelled the same way: the node is down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime
from uuid import UUID

import httpx

from dispatch.cluster.transports import LineSink, RunRequest
from dispatch.core.errors import NodeError
from dispatch.core.nodes import Node
from dispatch.core.polling import retry
from dispatch.core.results import SpecResult
from dispatch.prefect.errors import SERVER_ERRORS

logger = logging.getLogger(__name__)
SPEC_RUN_FLOW = "spec-run"
_TAG = "oyster-dispatch"
_POLL = 0.5
_WORKER_CHECK = 5.0
_PARENT_WAIT = 15.0  # seconds to wait for the spec's task run to be recorded before its child is created


HEARTBEAT_LABEL = "dispatch.heartbeat"
"""The label a spec-run flow run stamps with the time every few seconds (flows/spec_run.py)."""
RESULT_ARTIFACT_DESCRIPTION = "Oyster Dispatch spec result"
"""The description of the table artifact that carries a spec-run's `SpecResult` back."""


def heartbeat_interval(request: RunRequest) -> float:
    """Seconds between two `dispatch.heartbeat` stamps of a spec-run flow run."""
    return max(1.0, 2 * request.heartbeat)


def deployment_name(node: Node) -> str:
    """`spec-run/node-<name>`: the deployment whose runs go to this node's pool."""
    return f"{SPEC_RUN_FLOW}/{node.pool}"


def _client():
    from prefect.client.orchestration import get_client

    client = get_client(sync_client=True)
    client.__enter__()
    return client


class FlowRunWatcher:
    """Reads the flow runs being watched, all in one call, every `poll` seconds.

    Args:
        poll: seconds between two reads.
    """

    def __init__(self, poll: float = _POLL) -> None:
        self.client = _client()
        self._poll = poll
        self._runs: dict[UUID, object | None] = {}
        self._errors = 0
        self.fresh_at = time.monotonic()  # when the server last answered a read
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spec-run-watcher", daemon=True)
        self._thread.start()

    def watch(self, flow_run_id: UUID) -> None:
        with self._cond:
            self._runs.setdefault(flow_run_id, None)

    def unwatch(self, flow_run_id: UUID) -> None:
        with self._cond:
            self._runs.pop(flow_run_id, None)

    def next(self, flow_run_id: UUID, timeout: float = 10.0):
        """The flow run as of the next read (None while the server has not answered)."""
        with self._cond:
            self._cond.wait(timeout)
            return self._runs.get(flow_run_id)

    def _loop(self) -> None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        while not self._stop.wait(self._poll):
            with self._cond:
                ids = list(self._runs)
            if not ids:
                continue
            try:
                runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                                  limit=len(ids))
            except SERVER_ERRORS as exc:  # a server restart: keep the last view, say so once in a while
                self._errors += 1
                if self._errors in (1, 10) or self._errors % 120 == 0:
                    logger.warning("cannot read the spec-run flow runs (%d tries): %s", self._errors, exc)
                continue
            self._errors = 0
            with self._cond:
                self.fresh_at = time.monotonic()
                for run in runs:
                    if run.id in self._runs:
                        self._runs[run.id] = run
                self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._cond:
            self._cond.notify_all()
        self.client.__exit__(None, None, None)


class WorkerTransport:
    """Run spec attempts as `spec-run` flow runs in a node's work pool.

    Args:
        node: the node (its pool is `node-<name>`).
        watcher: the dispatcher's flow-run watcher (its client is shared too).
        stale_after: seconds without a heartbeat stamp before a running child counts as lost.
        pickup_timeout: seconds a child may wait while no worker of the pool is alive.
    """

    runs_git_on_node = True

    def __init__(self, node: Node, watcher: FlowRunWatcher, stale_after: float | None = None,
                 pickup_timeout: float = 60.0) -> None:
        self.node = node
        self.watcher = watcher
        self.client = watcher.client
        self.deployment = deployment_name(node)
        self.stale_after = stale_after
        self.pickup_timeout = pickup_timeout
        self._children: dict[tuple[str, str], UUID] = {}
        self._adoptable: dict[tuple[str, str], object] = {}  # live children of an earlier dispatcher
        self._deployment_id: UUID | None = None
        self._lock = threading.Lock()
        self._workers_checked: tuple[float, bool, str] = (0.0, True, "")

    # -- paths ---------------------------------------------------------------------------------
    @property
    def root_path(self) -> str:
        """The run root on the node (relative roots are under the worker user's home)."""
        return self.node.remote_root

    def workdir(self, project: str, task_id: str) -> str:
        """scp mode has no copy on worker nodes: a spec works in its run directory's `work/`."""
        return f"{self.root_path}/{project}/tasks/{task_id}/work"

    def exec(self, script: str, timeout: float) -> tuple[int, str, str]:
        raise NodeError(self.node.name, "is a worker node: the gateway runs no commands on it; its worker does "
                                        "the work of each spec (collect its outputs with git mode)")

    # -- health --------------------------------------------------------------------------------
    def probe(self) -> None:
        """Raise NodeError unless a worker of the node's pool has sent a heartbeat lately."""
        if not self._worker_alive(force=True):
            raise NodeError(self.node.name, self._workers_checked[2])

    def _worker_alive(self, force: bool = False) -> bool:
        checked_at, alive, why = self._workers_checked
        if not force and time.monotonic() - checked_at < _WORKER_CHECK:
            return alive
        why = (f"no live Prefect worker on pool {self.node.pool}: start it on the node "
               f"(`systemctl start prefect-worker@{self.node.name}`, see infra/install-worker.sh)")
        try:
            workers = self.client.read_workers_for_work_pool(self.node.pool)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                logger.debug("cannot read the workers of %s: %s", self.node.pool, exc)
                return alive  # the server is what fails, not the node
            workers, why = [], (f"no work pool {self.node.pool} on the server: run `dispatch nodes sync` to create "
                                "it, then start the node's worker")
        except SERVER_ERRORS as exc:
            logger.debug("cannot read the workers of %s: %s", self.node.pool, exc)
            return alive  # the server is what is down, not the node
        now = datetime.now(UTC)
        alive = any(w.last_heartbeat_time is not None and (now - w.last_heartbeat_time).total_seconds()
                    < 3 * (w.heartbeat_interval_seconds or 30) + 5 for w in workers)
        self._workers_checked = (time.monotonic(), alive, why)
        return alive

    # -- runs ----------------------------------------------------------------------------------
    def _deployment(self) -> UUID:
        from prefect.exceptions import ObjectNotFound

        if self._deployment_id is None:
            try:
                self._deployment_id = self.client.read_deployment_by_name(self.deployment).id
            except ObjectNotFound:
                raise NodeError(self.node.name, f"no deployment {self.deployment} on the server; run "
                                                "`dispatch nodes sync` to create it") from None
        return self._deployment_id

    def _existing(self, request: RunRequest):
        """A child of the same attempt (same cache key) that an earlier dispatcher left live, as `adoptable_runs`
        found it when this run started (no API call per attempt)."""
        with self._lock:
            run = self._adoptable.pop((request.project, request.task_id), None)
        params = (run.parameters.get("request") or {}) if run is not None else {}
        return run if params.get("cache_key") == request.cache_key else None

    def _live_children(self, project: str) -> list:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType

        live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
        return self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live)),
                                          tags=FlowRunFilterTags(all_=[_TAG, f"project:{project}"])),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self._deployment()])))

    def adoptable_runs(self, project: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """Specs of `project` with a spec-run flow run still live on this node, as task id -> cache key; finished
        children are not adopted (not done here: a child that ended while no dispatcher watched runs again)."""
        try:
            runs = self._live_children(project)
        except SERVER_ERRORS as exc:
            raise NodeError(self.node.name, f"cannot list its spec-run flow runs: {exc}") from exc
        live: dict[str, str | None] = {}
        for run in runs:
            params = run.parameters.get("request") or {}
            live[params.get("task_id")] = params.get("cache_key")
            with self._lock:
                self._adoptable[(project, params.get("task_id"))] = run
        return live, {}

    def run(self, request: RunRequest, on_line: LineSink, **_: object) -> SpecResult:
        """Create (or re-attach to) the attempt's spec-run flow run and wait for its result."""
        from prefect.context import TaskRunContext

        key = (request.project, request.task_id)
        try:
            run = self._existing(request)
            if run is not None:
                on_line(f"re-attached to spec-run flow run {run.name} ({run.id}), {run.state_name}")
            else:
                run = self._create_child(request, TaskRunContext.get())
                on_line(f"spec-run flow run {run.name} ({run.id}) queued on pool {self.node.pool}")
        except NodeError as exc:
            return self._lost(request, str(exc), node_fault=True)
        except SERVER_ERRORS as exc:
            return self._lost(request, f"cannot create the spec-run flow run: {exc}", node_fault=False)
        with self._lock:
            self._children[key] = run.id
        self.watcher.watch(run.id)
        try:
            return self._wait(run, request, on_line)
        finally:
            self.watcher.unwatch(run.id)
            with self._lock:
                self._children.pop(key, None)

    def _create_child(self, request: RunRequest, task_run):
        """The attempt's flow run, child of the spec's task run.

        Prefect 3 records task runs from their events, so the parent's row can reach the database a moment
        after the task started: until then the server refuses the child (HTTP 409, a foreign key). Retry for
        up to `_PARENT_WAIT` seconds; the idempotency key makes a retry of a request that did land harmless.
        """
        from prefect.states import Scheduled

        return retry(lambda: self.client.create_flow_run_from_deployment(
            self._deployment(), parameters={"request": request.model_dump(mode="json")},
            state=Scheduled(), tags=[_TAG, f"project:{request.project}", f"spec:{request.task_id}"],
            parent_task_run_id=task_run.task_run.id if task_run else None,
            idempotency_key=f"{request.run_id}:{request.task_id}:{request.attempt}"),
            retry_if=lambda exc: isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 409,
            timeout=_PARENT_WAIT, interval=0.2)

    def _stale_after(self, request: RunRequest) -> float:
        return self.stale_after or max(10.0, 6 * heartbeat_interval(request))

    def _wait(self, run, request: RunRequest, on_line: LineSink) -> SpecResult:
        stale_after = self._stale_after(request)
        waiting_since = time.monotonic()
        seen_state = None
        # Silence is judged by this machine's clock, over reads that reached the server: the node's clock
        # may be off, and a server restart must not look like a dead worker.
        last_beat: object = object()
        beat_seen_at = 0.0
        while True:
            current = self.watcher.next(run.id) or run
            state = current.state
            if state is not None and state.name != seen_state:
                seen_state = state.name
                on_line(f"spec-run {current.name}: {state.name}" + (f" ({state.message})" if state.message else ""))
            if state is not None and state.is_final():
                return self._final(current, request)
            if state is not None and state.is_running():
                beat = current.labels.get(HEARTBEAT_LABEL)
                if beat != last_beat:
                    last_beat, beat_seen_at = beat, self.watcher.fresh_at
                silent = self.watcher.fresh_at - beat_seen_at
                if silent > stale_after:
                    reason = (f"its worker on {self.node.name} stopped: no heartbeat from spec-run flow run "
                              f"{current.name} for {silent:.0f}s")
                    self._abandon(current, reason)
                    return self._lost(request, reason, node_fault=True)
                waiting_since = time.monotonic()
            elif state is not None and (state.is_scheduled() or state.is_pending()):
                if self._worker_alive():
                    waiting_since = time.monotonic()
                elif time.monotonic() - waiting_since > self.pickup_timeout:
                    reason = (f"no live Prefect worker on pool {self.node.pool} picked up flow run "
                              f"{current.name} for {self.pickup_timeout:.0f}s")
                    self._abandon(current, reason, cancel=True)
                    return self._lost(request, reason, node_fault=True)

    def _abandon(self, run, reason: str, cancel: bool = False) -> None:
        """Mark a child whose worker is gone as Crashed (or a never-started one Cancelled), never left live."""
        from prefect.states import Cancelled, Crashed

        try:
            self.client.set_flow_run_state(run.id, (Cancelled if cancel else Crashed)(message=reason), force=True)
        except SERVER_ERRORS as exc:
            logger.warning("could not mark flow run %s: %s", run.id, exc)

    def _final(self, run, request: RunRequest) -> SpecResult:
        data = self._result_artifact(run.id)
        if data is None:
            state = run.state
            status = "killed" if state.is_cancelled() else "lost"
            return self._lost(request, f"spec-run flow run {run.name} ended {state.name} without a result: "
                              f"{state.message or ''}".strip(), node_fault=state.is_crashed(), status=status)
        return SpecResult.from_runner(data, project=request.project, task_id=request.task_id, node=self.node.name)

    def _result_artifact(self, flow_run_id: UUID) -> dict | None:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType, FlowRunFilter, FlowRunFilterId

        artifacts = self.client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        for artifact in artifacts:
            if artifact.description != RESULT_ARTIFACT_DESCRIPTION:
                continue
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            if rows:
                return rows[0]
        return None

    def _lost(self, request: RunRequest, reason: str, node_fault: bool, status: str = "lost") -> SpecResult:
        return request.failure(reason, status=status, retryable=status == "lost", node_fault=node_fault,
                               node=self.node.name)

    def cancel(self, project: str, task_id: str) -> None:
        """Ask the worker to cancel the attempt's flow run (its spec-run flow kills the runner)."""
        from prefect.states import Cancelling

        with self._lock:
            flow_run_id = self._children.get((project, task_id))
        if flow_run_id is None:
            return
        try:
            self.client.set_flow_run_state(flow_run_id, Cancelling(message="stopped by the dispatcher"), force=True)
        except SERVER_ERRORS as exc:
            logger.warning("could not cancel flow run %s: %s", flow_run_id, exc)

    def kill_project(self, project: str) -> int:
        """Cancel every live spec-run flow run of `project` on this node (also an earlier dispatcher's)."""
        from prefect.states import Cancelling

        killed = 0
        for run in self._live_children(project):
            self.client.set_flow_run_state(run.id, Cancelling(message="dispatch stop"), force=True)
            killed += 1
        return killed
