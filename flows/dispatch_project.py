"""The project flow: one Prefect flow run per `dispatch start <project>`, one task run per spec.

Run it with `dispatch start demo` (embedded: no server, no keys), or deploy it with
`prefect deploy --all` and run `prefect deployment run 'dispatch-project/dispatch-project' --param project=demo`.

The flow keeps its own ready queue, slot and lock accounting (dispatch/core/scheduler.py) and submits a
spec's task run the moment its dependencies are done and a slot and its locks are free; Prefect's
tag or global concurrency limits are not used for this (on SQLite they stall, and waiters poll).
Each spec's task run is submitted with `wait_for=` its dependencies' task runs, so the UI's graph is
the spec DAG. Between a pick and its start stands the admission step (dispatch/core/admission.py); the state
file `dispatch status` reads is derived from the scheduler by the state view (dispatch/core/state_view.py).
"""

from __future__ import annotations

import getpass
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from dispatch.cluster.attempts import AttemptInputs
from dispatch.cluster.config import Node, ProjectConfig, load_nodes, load_project_config
from dispatch.cluster.drain_watch import RunDrain
from dispatch.cluster.runtime import ClusterRuntime
from dispatch.cluster.transports import failure
from dispatch.cluster.transports.agent import NODE_FULL
from dispatch.core.admission import Admission, Decision
from dispatch.core.agents import build_prompt
from dispatch.core.dag import Project, select
from dispatch.core.durations import DurationHistory, first_model
from dispatch.core.errors import DispatchError, ProjectInvalid
from dispatch.core.locks import ProcessLock
from dispatch.core.model_catalog import model_variables
from dispatch.core.report import render_markdown, table_rows
from dispatch.core.results import ProjectState, SpecResult, save_state
from dispatch.core.scheduler import Assignment, NodeSlots, Scheduler
from dispatch.core.settings import DispatchSettings, get_settings
from dispatch.core.shares import FairShare, MachineShares
from dispatch.core.specs import model_env_errors
from dispatch.core.state_view import StateView
from dispatch.core.usage import append_ledger, ledger_records, run_usage
from dispatch.pipeline.generated import load_specs, run_key
from dispatch.prefect.cooldowns import server_cooldowns
from dispatch.prefect.errors import SERVER_ERRORS
from dispatch.prefect.shares import ServerShares
from dispatch.prefect.spend import budgets_for
from tasks import run_inputs
from tasks.run_spec import run_spec, skip_spec

_STATE_WRITE_INTERVAL = 0.5  # a state write of 300 specs costs ~10 ms of the dispatch loop
_NODE_FULL_RETRY = 1.0  # seconds before retrying a spec the node itself refused (its own slot count is full)
_ESTIMATE_INTERVAL = 0.5  # seconds between two estimates of the time left (one is O(specs + dependencies))


@dataclass(frozen=True)
class Watch:
    """Who follows a project run in this process (the CLI's progress view).

    Args:
        on_event: called with (event, task_id, details) on every spec event; details["progress"] holds the
            counts and the estimated time left.
        on_flow_run: called with the flow run's id once it exists (the CLI prints where to see it in the UI).
    """

    on_event: Callable[[str, str, dict], None] | None = None
    on_flow_run: Callable[[str], None] | None = None


# A flow's parameters are serialized (the UI shows them, the server stores them): a callable cannot be one, so the
# caller hands its Watch over for the flow calls made inside `watching` (this context only, other threads and
# runs unaffected), and the flow passes it to its ProjectRun.
_WATCH: ContextVar[Watch | None] = ContextVar("dispatch_project_watch", default=None)


@contextmanager
def watching(watch: Watch) -> Iterator[Watch]:
    """Project runs started by `dispatch_project` in this block report to `watch`."""
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def _git_revision(code_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


class ProjectRun:
    """One run of a project: the dispatch loop between the scheduler and Prefect task runs."""

    def __init__(self, project: Project, settings: DispatchSettings, selected: set[str], *,
                 force: set[str], nodes: list[Node], config: ProjectConfig | None = None,
                 started_by: str | None = None, code_dir: Path | None = None, base: str | None = None,
                 watch: Watch | None = None) -> None:
        self.watch = watch or Watch()
        try:
            self._set_up(project, settings, selected, force=force, nodes=nodes, config=config,
                         started_by=started_by, code_dir=code_dir, base=base)
        except BaseException:  # refused part-way (an invalid model, a node key): give back what was taken
            self.close()
            raise

    def _set_up(self, project: Project, settings: DispatchSettings, selected: set[str], *,
                force: set[str], nodes: list[Node], config: ProjectConfig | None,
                started_by: str | None, code_dir: Path | None, base: str | None) -> None:
        self.project, self.settings, self.selected = project, settings, selected
        self.config = config or ProjectConfig()
        self.logger = get_run_logger()
        self.run_id = uuid.uuid4().hex[:12]
        base = base or project.name  # generated specs (<project>.pipeline) work on <project>'s code and locks
        code_dir = code_dir or (Path(self.config.repo_local) if self.config.repo_local
                                else settings.code_dir_for(base))
        code_dir.mkdir(parents=True, exist_ok=True)
        self.nodes = {node.name: node for node in nodes}
        from dispatch.prefect.nodes_admin import models_and_keys, ssh_key_secrets

        self.runtime = ClusterRuntime(settings, nodes, key_secrets=ssh_key_secrets(nodes, self.logger),
                                      log=self.logger)
        # what the attempts need that cannot be task parameters, found by run_spec under this run's id
        self.inputs = run_inputs.RunInputs(self.runtime.transports)
        run_inputs.register(self.run_id, self.inputs)
        # durations measured by earlier runs (and this one, as it goes): the order's and the progress view's
        self.history = DurationHistory.load(settings.results_dir, project.name)
        self._selected_specs = {t: project.specs[t] for t in project.order if t in selected}
        estimates = self.history.estimates(self._selected_specs)
        self.estimated = bool(estimates)  # False: nothing measured yet, ranks count specs
        self._since_estimates = 0
        self._remaining: tuple[float, float | None] = (0.0, None)  # (when computed, seconds left then)
        self.scheduler = Scheduler(
            project, selected,
            [NodeSlots(n.name, n.slots, n.labels, n.priority, n.models) for n in nodes],
            retries=settings.retries, retry_delay=settings.retry_delay, estimates=estimates,
            order=self.config.order)
        self.cooldowns = server_cooldowns()
        self.budgets = budgets_for(settings)
        self.events: queue.Queue = queue.Queue()
        self.futures: dict[str, PrefectFuture] = {}
        self.stop_reason = ""
        self._last_write = 0.0
        user, _, host = (started_by or "").partition("@")  # "alice@laptop": who asked, not who runs it
        user, host = user or getpass.getuser(), host or socket.gethostname()
        self.who = f"{user}@{host}"
        # Team mode: `modifies` locks also go through the server's table, shared with other users' runs.
        self.server_locks = None
        if settings.prefect_api_url and any(project.specs[t].modifies for t in selected):
            from dispatch.prefect.server_locks import ServerLocks, lock_scope

            self.server_locks = ServerLocks(lock_scope(base, self.config.repo_url), project=project.name,
                                            run_id=self.run_id, holder=self.who)
        self._run_spec_refresh = run_spec.with_options(refresh_cache=True)
        flow_run = get_run_context().flow_run
        if flow_run is not None and self.watch.on_flow_run is not None:
            self.watch.on_flow_run(str(flow_run.id))
        if flow_run is not None and started_by:
            self._tag_flow_run(flow_run, user, host)
        self.view = StateView(self.scheduler, ProjectState(
            project=project.name, run_id=self.run_id, flow_run_id=str(flow_run.id) if flow_run else None,
            api_url=settings.prefect_api_url, pid=os.getpid(), user=user, host=host,
            nodes={n.name: {"slots": n.slots, "used": 0} for n in nodes}))
        context = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in project.context]
        prompts = {t: build_prompt(project.specs[t], context) for t in selected if project.specs[t].kind == "agent"}
        models = sorted({m for t in prompts for m in project.specs[t].model_chain}
                        | {m for t in selected for m in project.specs[t].verify})
        catalog, model_secrets = models_and_keys(models, settings, self.logger)
        if errors := model_env_errors(self._selected_specs.values(), model_variables(catalog)):
            raise ProjectInvalid(project.name, errors)  # a spec's env: sets a configured model's variable
        # values to mask that no step is given: this process's credentials (the local node's steps could read
        # them from /proc; remote nodes never see them)
        mask_only = settings.secret_values()
        self.inputs.masker.add([*mask_only, *(v for keys in model_secrets.values() for v in keys.values())])
        # The same spec against another code directory or revision is other work: its own cache key.
        self.attempts = AttemptInputs(
            project, settings, self.config, self.run_id, code_dir,
            project.cache_keys(f"{code_dir}@{_git_revision(code_dir)}"), force, self.nodes, self.runtime.transports,
            catalog, model_secrets, mask_only, self.runtime.is_local, context, prompts)
        # drained nodes (dispatch/core/drain.py): read once now, then by a background thread
        self.drain = RunDrain(settings, self.scheduler, set(self.nodes), self.logger,
                              lambda drained: self.events.put(("drained", drained)), self._emit)
        self.share = self._fair_share(nodes)  # nothing after it can fail and leave its entry behind
        self.admission = Admission(self.scheduler, project.specs, cooldowns=self.cooldowns, budgets=self.budgets,
                                   brokers=self.runtime.brokers, share=self.share, locks=self.server_locks,
                                   user=user, post=lambda kind, data: self.events.put((kind, data)))

    def _tag_flow_run(self, flow_run, user: str, host: str) -> None:
        """Tag this flow run (only it: task runs stay untagged, so no tag-limit checks) with who started it."""
        from prefect.client.orchestration import get_client

        from dispatch.prefect.team import user_tags

        wanted = set(user_tags(user, host))
        if wanted <= set(flow_run.tags or []):
            return
        try:
            with get_client(sync_client=True) as client:
                client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags or []) | wanted))
        except SERVER_ERRORS as exc:  # `dispatch status` then shows the started_by parameter instead
            self.logger.warning("could not tag the flow run with its user: %s", exc)

    def _fair_share(self, nodes: list[Node]) -> FairShare:
        """This run's fair share of the cluster's slots against other runs (dispatch/core/shares.py): through the
        server in team mode when nodes are shared with other machines, else through this machine's files."""
        from dispatch.core.brokers import SHARED_TRANSPORTS

        details = {"project": self.project.name, "user": self.who, "weight": self.config.weight}
        if self.settings.prefect_api_url and any(n.transport in SHARED_TRANSPORTS for n in nodes):
            board = ServerShares(self.run_id, **details)
        else:
            board = MachineShares(self.settings.locks_dir / "shares", self.run_id, **details)
        return FairShare(board, self.run_id, sum(n.slots for n in nodes), self.config.weight)

    # -- events --------------------------------------------------------------------------------
    def _emit(self, event: str, task_id: str, **details) -> None:
        if self.watch.on_event is None:
            return
        details["progress"] = self._progress()
        try:
            self.watch.on_event(event, task_id, details)
        except Exception:  # a broken progress display must not break the run
            pass

    def _progress(self) -> dict:
        """Counts for the progress view, and the estimated seconds left (None until something was measured):
        the critical path of what is left through dependencies and locks, by the estimates."""
        counts = self.view.counts()
        done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "not_run", "cancelled"))
        now = time.monotonic()
        at, left = self._remaining
        if self.estimated and (left is None or now - at >= _ESTIMATE_INTERVAL):
            self._remaining = at, left = now, self.scheduler.remaining()
        return {"total": len(self.scheduler.entries), "done": done, "running": counts.get("running", 0),
                "failed": counts.get("failed", 0) + counts.get("not_run", 0),
                "remaining_s": max(left - (now - at), 0.0) if left is not None else None}

    def _record_duration(self, result: SpecResult) -> None:
        """Keep a run's measured duration for later estimates; refresh the estimates now and then (a spec's
        first run is estimated by the project's median, which this run moves)."""
        if result.duration is None or result.status == "lost":
            return
        spec = self.project.specs[result.task_id]
        self.history.record(result.task_id, result.duration, succeeded=result.succeeded,
                            model=result.model or first_model(spec))
        self._since_estimates += 1
        if self._since_estimates >= max(1, len(self._selected_specs) // 50):
            self._since_estimates = 0
            estimates = self.history.estimates(self._selected_specs)
            self.estimated = self.estimated or bool(estimates)
            self.scheduler.set_estimates(estimates)
            self._save_history()

    def _save_history(self) -> None:
        try:
            self.history.save()
        except OSError as exc:  # only a hint for later runs' order
            self.logger.warning("could not save the duration history %s: %s", self.history.path, exc)

    def _write_state(self, force: bool = False) -> ProjectState | None:
        now = time.monotonic()
        if not force and now - self._last_write < _STATE_WRITE_INTERVAL:
            return None
        for name, node in self.scheduler.nodes.items():
            self.view.header.nodes[name]["used"] = node.used
        self.view.header.ssh_connections = self.runtime.connections_opened
        save_state(self.settings.state_dir, state := self.view.snapshot())
        self._last_write = now
        return state

    def _record_usage(self, result: SpecResult) -> None:
        """Add what the attempts of a fresh result reported using to the usage ledger."""
        records = ledger_records(result, user=self.view.header.user, run_id=self.run_id)
        try:
            append_ledger(self.settings.results_dir, records, self.settings.usage_ledger_bytes)
        except OSError as exc:  # the run goes on; only totals and budgets miss these attempts
            self.logger.warning("could not write the usage ledger: %s", exc)
        self.budgets.refresh()

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.events.put(("stop", None))

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        for task_id in self.scheduler.unplaceable():  # no node can ever run it (`node:`/`labels:`): fail, no hang
            spec = self.project.specs[task_id]
            self._fail(task_id, f"no node fits: node={spec.node!r}, labels={spec.labels} (nodes: "
                                f"{', '.join(sorted(self.nodes))}); fix the spec's node/labels in {spec.path.name}")
        # A node another dispatcher filled is set aside for a moment and the specs refused there are picked
        # again at once for the other nodes: each round that repeats sets aside one more node.
        for _ in range(len(self.scheduler.nodes) + 1):
            decisions, refused = self.admission.admit(self.scheduler.pick())
            for decision in decisions:
                self._apply(decision)
            if not refused:
                break

    def _apply(self, decision: Decision) -> None:
        """Carry out what admission decided of a pick."""
        task_id = decision.assignment.task_id
        if decision.kind == "start":
            self._submit(decision.assignment, decision.chain)
        elif decision.kind == "fail":  # every model blocked for billing: the reason names what clears each
            self.logger.error("%s: %s", task_id, decision.reason)
            self._fail(task_id, decision.reason)
        elif decision.kind == "wait" and self.view.waiting(task_id, decision.reason) and decision.loud:
            # a budget: said once (it looks again each minute: another dispatcher's spend, the next UTC day)
            self.logger.warning("%s: %s", task_id, decision.reason)
            self._write_state(force=True)
            self._emit("waiting", task_id, reason=decision.reason)

    def _fail(self, task_id: str, reason: str) -> None:
        """Fail a spec that no attempt can help, and skip what depends on it."""
        skipped = self.scheduler.fail(task_id, reason, retryable=False)
        self._emit("failed", task_id, reason=reason)
        self._skip(skipped)

    def _submit(self, assignment: Assignment, chain: tuple[str, ...] | list[str]) -> None:
        task_id = assignment.task_id
        spec = self.project.specs[task_id]
        deps = [self.futures[d] for d in spec.depends_on if d in self.futures]
        note = lambda text, t=task_id: self.events.put(("note", (t, text)))  # noqa: E731
        self.inputs.set_options(task_id, assignment.attempt,
                                self.attempts.options(assignment, self.admission.slot(task_id), note))
        # one task for every spec, named per run by its request: a `with_options` copy per spec costs
        # 2-13 ms of this loop
        task = self._run_spec_refresh if task_id in self.attempts.force else run_spec
        request = self.attempts.request(assignment, chain, set(self.cooldowns.active()) if spec.verify else None)
        future = task.submit(request, wait_for=deps)
        self.futures[task_id] = future
        future.add_done_callback(lambda f, t=task_id: self.events.put(("done", t)))
        self.view.started(task_id, assignment.attempt, task_run_id=str(future.task_run_id), at=time.time(),
                          model=(chain[0] if chain else "") if spec.kind == "agent" else "shell")
        self._emit("started", task_id, node=assignment.node, attempt=assignment.attempt)

    def _finish(self, task_id: str) -> None:
        future = self.futures[task_id]
        try:
            result = future.result(raise_on_failure=False)
        except Exception as exc:  # the task itself crashed
            result = exc
        node = self.scheduler.entries[task_id].node or ""
        if not isinstance(result, SpecResult):
            result = failure(self.project.name, task_id, f"the task crashed: {result!r}", status="lost", node=node)
        attempt = self.scheduler.attempts(task_id)
        self.inputs.drop_options(task_id, attempt)
        if result.status == NODE_FULL and not self.stop_reason:  # nothing ran: not an attempt, not a fault
            self.logger.info("%s %s: %s", node, task_id, result.reason)
            self.admission.ended(task_id, requeue=Assignment(task_id, node, attempt), delay=_NODE_FULL_RETRY)
            self.view.refused(task_id, result.reason)
            return
        self.admission.ended(task_id)
        cached = result.run_id != self.run_id
        self.cooldowns.record_attempts(result.attempts, task_id, self.who, self.logger)
        if not cached:
            self._record_usage(result)
        if not cached and not self.stop_reason:
            self._record_duration(result)
        self.view.ended(task_id, result, cached=cached, at=time.time())
        if result.fallback() and not cached:
            self.logger.info("%s: models passed over: %s", task_id, result.fallback())
        if self.stop_reason and not result.succeeded:
            self.scheduler.cancel_running(task_id, self.stop_reason)
            self._emit("cancelled", task_id, reason=self.stop_reason)
            return
        if result.succeeded:
            self.scheduler.succeed(task_id)
            self._emit("succeeded", task_id, result=result, cached=cached)
            return
        if result.status == "rejected" and result.verification is not None:
            self.attempts.reviews[task_id] = result.verification.review
        if result.node_fault and result.node in self.runtime.nodes and not self.runtime.is_local(result.node):
            self._node_down(result.node, result.reason)
        acceptance = result.status == "acceptance_failed"
        skipped = self.scheduler.fail(task_id, result.reason or result.status, retryable=result.retryable,
                                      node_fault=result.node_fault, max_attempts=2 if acceptance else None)
        if self.view.state(task_id) == "retrying":
            self._emit("retry", task_id, reason=self.view.reason(task_id), attempt=self.scheduler.attempts(task_id))
            return
        self._emit("failed", task_id, result=result)
        self._skip(skipped)

    def _node_down(self, node: str, reason: str) -> None:
        """Take a failed node out of placement until a background probe reaches it again."""
        slots = self.scheduler.nodes[node]
        if slots.down:
            return
        slots.down = True
        self.logger.warning("node %s is down (%s); its specs move to other nodes", node, reason)
        self.runtime.probe_until_up(node, lambda name: self.events.put(("node_up", name)))

    def _skip(self, task_ids: list[str]) -> None:
        for child in task_ids:
            reason = self.scheduler.reason(child)
            if self.scheduler.state(child) == "not_run":
                deps = [self.futures[d] for d in self.project.specs[child].depends_on if d in self.futures]
                self.futures[child] = skip_spec.with_options(name=child, task_run_name=child).submit(
                    child, reason, wait_for=deps)
                self.view.skipped(child, str(self.futures[child].task_run_id))
            else:
                self.futures.pop(child, None)
            self._emit(self.view.state(child), child, reason=reason)

    def _reattach(self) -> None:
        """Adopt what a killed dispatcher left on the nodes instead of running it twice: runners still
        running, and attempts that succeeded while no dispatcher watched (their result is recovered)."""
        for node, transport in self.runtime.transports.items():
            try:
                live, finished = transport.adoptable_runs(self.project.name)
            except DispatchError as exc:
                self.logger.warning("node %s: cannot list live runs (%s); it is treated as down", node, exc)
                self._node_down(node, str(exc))
                continue
            if live:
                self.logger.info("node %s: %d live run(s) of %s from an earlier dispatcher", node, len(live),
                                 self.project.name)
            recovered: list[str] = []
            for task_id, key in [*live.items(), *finished.items()]:
                if (task_id not in self.selected or task_id in self.attempts.force
                        or key != self.attempts.keys.get(task_id)):
                    continue  # an edited spec's stale runner is killed when the spec is dispatched again
                if self.scheduler.state(task_id) not in ("waiting", "ready"):
                    continue
                self.scheduler.adopt(task_id, node, 1)
                chain = self.project.specs[task_id].model_chain
                if task_id in finished:  # the transport hands its result back without running it
                    recovered.append(task_id)
                    self.admission.adopt(task_id, chain, locks=False)
                else:
                    self.logger.info("%s %s: still running from an earlier dispatcher; re-attaching", node, task_id)
                    if why := self.admission.adopt(task_id, chain):  # they died with the old dispatcher's lease
                        self.logger.warning("%s: re-attached without its file locks (%s)", task_id, why)
                self._submit(Assignment(task_id, node, 1), chain)
            if recovered:
                names = ", ".join(recovered[:5]) + (", ..." if len(recovered) > 5 else "")
                self.logger.info("node %s: %d unchanged spec(s) of %s already succeeded there (%s); their "
                                 "results are taken, not run again", node, len(recovered), self.project.name, names)

    def execute(self) -> State:
        """Run the project to the end (or until stopped) and return the flow's final state."""
        self._reattach()
        self._dispatch()
        self.drain.note_waits(self.view.waits)
        self._write_state(force=True)
        while not self.scheduler.done:
            wakeup = self.scheduler.next_wakeup()
            timeout = max(0.01, wakeup - self.scheduler.clock()) if wakeup is not None else 1.0
            try:
                kind, data = self.events.get(timeout=timeout)
            except queue.Empty:
                kind, data = "tick", None
            if kind == "done":  # data: the task id
                self._finish(data)
            elif kind == "locks":  # data: (task id, the lock table's answer)
                self._apply(self.admission.locks_answered(*data, stop_reason=self.stop_reason))
            elif kind == "node_up":  # data: the node's name
                self.scheduler.nodes[data].down = False
                self.logger.info("node %s is back", data)
            elif kind == "drained":  # data: the drained nodes now
                self.drain.changed(data)
            elif kind == "note":  # data: (task id, note), e.g. "glm: 429, retrying 2/10", "" once it goes on
                self.view.note(*data)
            elif kind == "stop":
                self._stop()
            if not self.stop_reason:
                self._dispatch()
                self.drain.note_waits(self.view.waits)
            self._write_state()
        return self._conclude()

    def close(self) -> None:
        """Wait for lock requests still out (their answers go unread), give back the server's file locks, then
        close the nodes' connections. Closes what a run refused part-way has opened, too."""
        # explicitly: a collected lock table only stops renewing (server_locks.py)
        for part in ("admission", "server_locks", "drain", "share", "runtime"):
            if (opened := getattr(self, part, None)) is not None:
                opened.close()
        if getattr(self, "inputs", None) is not None:
            run_inputs.unregister(self.run_id)

    def _stop(self) -> None:
        self.logger.warning("stopping %s: %s", self.project.name, self.stop_reason)
        self.scheduler.cancel_all(self.stop_reason)
        for task_id in self.scheduler.running:
            transport = self.runtime.transports.get(self.scheduler.entries[task_id].node or "")
            if transport is not None:
                transport.cancel(self.project.name, task_id)

    def _conclude(self) -> State:
        state = self.view.header
        counts, total = self.view.counts(), len(self.scheduler.entries)
        failed = counts.get("failed", 0)
        summary = (f"{counts.get('succeeded', 0)}/{total} succeeded, {failed} failed, "
                   f"{counts.get('not_run', 0)} not run, {counts.get('cancelled', 0)} cancelled")
        if self.stop_reason:
            state.state = "cancelled"
        else:
            state.state = "failed" if failed or counts.get("not_run") else "completed"
        state.message, state.ended_at = summary, time.time()
        final = self._write_state(force=True)
        self._save_history()
        self.budgets.close()
        try:
            usage = run_usage(self.settings, self.run_id)
            create_markdown_artifact(markdown=render_markdown(final, self.settings.runs_dir, ui_links=True,
                                                              usage=usage),
                                     key=f"report-{_artifact_key(self.project.name)}",
                                     description=f"Oyster Dispatch report for {self.project.name}")
            create_table_artifact(table=table_rows(final), key=f"specs-{_artifact_key(self.project.name)}",
                                  description=f"Specs of {self.project.name}")
        except SERVER_ERRORS as exc:  # the run's results are on disk already; say so and carry on
            self.logger.warning("could not attach the report artifact: %s", exc)
        self.logger.info("%s: %s", self.project.name, summary)
        if self.stop_reason:
            return Cancelled(message=f"{summary}; {self.stop_reason}")
        if state.state == "failed":
            return Failed(message=summary)
        return Completed(message=summary)


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _install_signal_handlers(run: ProjectRun) -> Callable[[], None]:
    """Turn SIGTERM (from `dispatch stop`) and Ctrl-C into an orderly stop, when on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):  # noqa: ARG001
        run.request_stop("stopped by dispatch stop" if signum == signal.SIGTERM else "interrupted (Ctrl-C)")

    for sig in previous:
        signal.signal(sig, handler)
    return lambda: [signal.signal(sig, old) for sig, old in previous.items()]


def _run_name() -> str:
    """The flow run's name: the project, or `<project>.pipeline` for its generated specs."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    return run_key(parameters["project"]) if parameters.get("generated") else parameters["project"]


@flow(name="dispatch-project", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=256),
      log_prints=True)
def dispatch_project(project: str, only: list[str] | None = None, start_from: list[str] | None = None,
                     force: bool = False, started_by: str | None = None, generated: bool = False,
                     code_dir: str | None = None) -> State:
    """Dispatch every spec of a project over the cluster, honouring dependencies, slots and locks.

    Args:
        project: the project's name (a directory under `DISPATCH_SPECS`, or a bundled example).
        only: run only these specs (ids or unique prefixes) and what they depend on.
        start_from: run these specs and everything that depends on them, re-running them even if cached.
        force: re-run every selected spec, ignoring cached results.
        started_by: who started the run, as "user@host" (`dispatch start` sets it); default this process's
            user and host. Runs submitted through the deployment keep their user this way.
        generated: dispatch the project's generated specs (the pipeline's L2 and L5: its generated-spec
            directory, dispatch/pipeline/generated.py) under the run name `<project>.pipeline`, with the
            project's `projects.json` entry, code directory and file-lock scope.
        code_dir: the code directory the specs work in (default: `repo_local` of `projects.json`, else
            `DISPATCH_PROJECTS/<project>`).

    Called inside `watching(Watch(...))`, the run reports its events and flow run to that `Watch`.
    """
    settings = get_settings()
    proj = load_specs(settings, project, generated)
    selected = select(proj, only, start_from)
    forced = set(selected) if force else (proj.descendants(select(proj, None, start_from)) & selected
                                           if start_from else set())
    lock = ProcessLock(settings.locks_dir / f"project-{proj.name}.lock")
    if not lock.try_acquire():
        raise DispatchError(f"project {proj.name!r} is already being dispatched on this machine (pid "
                            f"{lock.holder_pid()}); watch it with `dispatch status {proj.name}` or stop it with "
                            f"`dispatch stop {proj.name}`")
    try:
        run = ProjectRun(proj, settings, selected, force=forced, nodes=load_nodes(settings),
                         config=load_project_config(settings, project), started_by=started_by,
                         code_dir=Path(code_dir) if code_dir else None, base=project, watch=_WATCH.get())
        restore = _install_signal_handlers(run)
        try:
            return run.execute()
        finally:
            restore()
            run.close()
    finally:
        lock.release()


if __name__ == "__main__":
    import sys

    dispatch_project(sys.argv[1] if len(sys.argv) > 1 else "demo")
