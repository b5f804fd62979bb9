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
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from dispatch.cluster.attempts import AttemptInputs, cache_keys
from dispatch.cluster.config import ProjectConfig, load_nodes, load_project_config
from dispatch.cluster.drain_watch import RunDrain
from dispatch.cluster.runtime import ClusterRuntime
from dispatch.cluster.transports import failure
from dispatch.cluster.transports.agent import NODE_FULL
from dispatch.core.admission import Admission, Decision
from dispatch.core.dag import Project, select
from dispatch.core.durations import DurationHistory
from dispatch.core.errors import DispatchError
from dispatch.core.locks import ProcessLock
from dispatch.core.nodes import Node
from dispatch.core.placement import NodeSlots
from dispatch.core.results import ProjectState, SpecResult, save_state
from dispatch.core.run_records import RunEstimates, RunRecords
from dispatch.core.scheduler import Assignment, Scheduler
from dispatch.core.settings import DispatchSettings, get_settings
from dispatch.core.state_view import StateView
from dispatch.core.watch import Watch, current_watch
from dispatch.pipeline.generated import load_specs, run_key
from dispatch.prefect.cooldowns import server_cooldowns
from dispatch.prefect.run_setup import attach_report, fair_share, server_locks, tag_flow_run
from dispatch.prefect.spend import budgets_for
from tasks import run_inputs
from tasks.run_spec import run_spec, skip_spec

_STATE_WRITE_INTERVAL = 0.5  # a state write of 300 specs costs ~10 ms of the dispatch loop
_NODE_FULL_RETRY = 1.0  # seconds before retrying a spec the node itself refused (its own slot count is full)


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
        selected_specs = {t: project.specs[t] for t in project.order if t in selected}
        self.estimates = RunEstimates(DurationHistory.load(settings.results_dir, project.name), selected_specs)
        self.scheduler = Scheduler(
            project, selected,
            [NodeSlots(n.name, n.slots, n.labels, n.priority, n.models) for n in nodes],
            retries=settings.retries, retry_delay=settings.retry_delay, estimates=self.estimates.initial,
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
        self.server_locks = server_locks(settings, project, selected, base, self.config.repo_url, run_id=self.run_id,
                                         holder=self.who)
        self._run_spec_refresh = run_spec.with_options(refresh_cache=True)
        flow_run = get_run_context().flow_run
        if flow_run is not None and self.watch.on_flow_run is not None:
            self.watch.on_flow_run(str(flow_run.id))
        if flow_run is not None and started_by:
            tag_flow_run(flow_run, user, host, self.logger)
        self.view = StateView(self.scheduler, ProjectState(
            project=project.name, run_id=self.run_id, flow_run_id=str(flow_run.id) if flow_run else None,
            api_url=settings.prefect_api_url, pid=os.getpid(), user=user, host=host,
            nodes={n.name: {"slots": n.slots, "used": 0} for n in nodes}))
        self.attempts = AttemptInputs.for_run(
            project, selected, models_and_keys=lambda names: models_and_keys(names, settings, self.logger),
            settings=settings, config=self.config, run_id=self.run_id, code_dir=code_dir,
            keys=cache_keys(project, code_dir), force=force, nodes=self.nodes, transports=self.runtime.transports,
            is_local=self.runtime.is_local)
        self.inputs.masker.add(self.attempts.secrets())
        # drained nodes (dispatch/core/drain.py): read once now, then by a background thread
        self.drain = RunDrain(settings, self.scheduler, set(self.nodes), self.logger,
                              lambda drained: self.events.put(("drained", drained)), self._emit)
        # nothing after it can fail and leave its entry behind
        self.share = fair_share(settings, nodes, self.run_id, project=project.name, user=self.who,
                                weight=self.config.weight)
        self.records = RunRecords(self.estimates, settings, self.cooldowns, self.budgets, run_id=self.run_id,
                                  user=user, who=self.who, log=self.logger)
        self.admission = Admission(self.scheduler, project.specs, cooldowns=self.cooldowns, budgets=self.budgets,
                                   brokers=self.runtime.brokers, share=self.share, locks=self.server_locks,
                                   user=user, post=lambda kind, data: self.events.put((kind, data)))

    # -- events --------------------------------------------------------------------------------
    def _emit(self, event: str, task_id: str, **details) -> None:
        if self.watch.on_event is None:
            return
        details["progress"] = self.view.progress(self.estimates.seconds_left(self.scheduler))
        try:
            self.watch.on_event(event, task_id, details)
        except Exception:  # a broken progress display must not break the run
            pass

    def _write_state(self, force: bool = False) -> ProjectState | None:
        now = time.monotonic()
        if not force and now - self._last_write < _STATE_WRITE_INTERVAL:
            return None
        state = self.view.snapshot(ssh_connections=self.runtime.connections_opened)
        save_state(self.settings.state_dir, state)
        self._last_write = now
        return state

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
        self.records.record(result, self.scheduler, cached=cached, stopped=bool(self.stop_reason))
        self.view.ended(task_id, result, cached=cached, at=time.time())
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
            adopted = self.admission.adopt_runs(node, live, finished, keys=self.attempts.keys,
                                                fresh=self.attempts.force)
            for task_id, done, why in adopted:
                if not done:
                    self.logger.info("%s %s: still running from an earlier dispatcher; re-attaching", node, task_id)
                if why:  # its locks died with the old dispatcher's lease, and another holds them now
                    self.logger.warning("%s: re-attached without its file locks (%s)", task_id, why)
                self._submit(Assignment(task_id, node, 1), self.project.specs[task_id].model_chain)
            recovered = [task_id for task_id, done, _ in adopted if done]
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
        summary = self.view.conclude(stopped=bool(self.stop_reason))
        final = self._write_state(force=True)
        self.estimates.save(self.logger)
        self.budgets.close()
        attach_report(final, self.settings, self.run_id, self.logger)
        self.logger.info("%s: %s", self.project.name, summary)
        if self.stop_reason:
            return Cancelled(message=f"{summary}; {self.stop_reason}")
        if self.view.header.state == "failed":
            return Failed(message=summary)
        return Completed(message=summary)


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

    Called inside `watching(Watch(...))` (dispatch/core/watch.py), the run reports its events and flow run
    to that `Watch`.
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
                         code_dir=Path(code_dir) if code_dir else None, base=project, watch=current_watch())
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
