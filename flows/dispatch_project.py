"""The project flow: one Prefect flow run per `dispatch start <project>`, one task run per spec.

Run it with `dispatch start demo` (embedded: no server, no keys), or deploy it with
`prefect deploy --all` and run `prefect deployment run 'dispatch-project/dispatch-project' --param project=demo`.

The flow keeps its own ready queue, slot and lock accounting (dispatch/core/scheduler.py) and submits a
spec's task run the moment its dependencies are done and a slot and its locks are free; Prefect's
tag or global concurrency limits are not used for this (on SQLite they stall, and waiters poll).
Each spec's task run is submitted with `wait_for=` its dependencies' task runs, so the UI's graph is
the spec DAG.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from dispatch.cluster.config import Node, ProjectConfig, load_nodes, load_project_config
from dispatch.cluster.drain_watch import RunDrain
from dispatch.cluster.gitsync import worktree_path
from dispatch.cluster.runtime import ClusterRuntime
from dispatch.cluster.transports import RunRequest, failure
from dispatch.cluster.transports.agent import NODE_FULL
from dispatch.core.agents import build_prompt, build_steps, build_verify_steps
from dispatch.core.dag import Project, select
from dispatch.core.durations import DurationHistory, first_model
from dispatch.core.errors import DispatchError, ProjectInvalid
from dispatch.core.locks import ProcessLock
from dispatch.core.model_catalog import model_variables
from dispatch.core.report import render_markdown, table_rows
from dispatch.core.results import ProjectState, SpecResult, SpecRow, save_state
from dispatch.core.scheduler import Assignment, NodeSlots, Scheduler
from dispatch.core.settings import DispatchSettings, get_settings
from dispatch.core.shares import FairShare, MachineShares
from dispatch.core.specs import model_env_errors
from dispatch.core.usage import append_ledger, ledger_records, next_utc_midnight, run_usage
from dispatch.pipeline.generated import load_specs, run_key
from dispatch.prefect.cooldowns import server_cooldowns
from dispatch.prefect.errors import SERVER_ERRORS
from dispatch.prefect.shares import ServerShares
from dispatch.prefect.spend import budgets_for
from tasks import run_inputs
from tasks.run_spec import run_spec, skip_spec

# Progress listeners of the CLI in this process: called with (event, task_id, details).
LISTENERS: list[Callable[[str, str, dict], None]] = []
# Called with the flow run's id once it exists (the CLI prints where to watch it in the UI).
ON_FLOW_RUN: list[Callable[[str], None]] = []
_STATE_WRITE_INTERVAL = 0.5  # a state write of 300 specs costs ~10 ms of the dispatch loop
_BUSY_RETRY = 0.2  # seconds before asking again for a node whose slots another dispatcher holds
_NODE_FULL_RETRY = 1.0  # seconds before retrying a spec the node itself refused (its own slot count is full)
_SHARE_RETRY = 0.2  # seconds before a run over its fair share of the slots looks again
_ESTIMATE_INTERVAL = 0.5  # seconds between two estimates of the time left (one is O(specs + dependencies))


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
                 started_by: str | None = None, code_dir: Path | None = None, base: str | None = None) -> None:
        try:
            self._set_up(project, settings, selected, force=force, nodes=nodes, config=config,
                         started_by=started_by, code_dir=code_dir, base=base)
        except BaseException:  # refused part-way (an invalid model, a node key): give back what was taken
            self.close()
            raise

    def _set_up(self, project: Project, settings: DispatchSettings, selected: set[str], *,
                force: set[str], nodes: list[Node], config: ProjectConfig | None,
                started_by: str | None, code_dir: Path | None, base: str | None) -> None:
        self.project = project
        self.settings = settings
        self.selected = selected
        self.force = force
        self.config = config or ProjectConfig()
        self.logger = get_run_logger()
        self.run_id = uuid.uuid4().hex[:12]
        base = base or project.name  # generated specs (<project>.pipeline) work on <project>'s code and locks
        self.code_dir = code_dir or (Path(self.config.repo_local) if self.config.repo_local
                                     else settings.code_dir_for(base))
        self.code_dir.mkdir(parents=True, exist_ok=True)
        # The same spec against another code directory or revision is other work: its own cache key.
        self.keys = project.cache_keys(f"{self.code_dir}@{_git_revision(self.code_dir)}")
        self.nodes = {node.name: node for node in nodes}
        self.runtime = ClusterRuntime(settings, nodes, key_secrets=self._node_keys(nodes), log=self.logger)
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
        self._running_models: dict[str, str] = {}  # task id -> the model it started with (budget estimates)
        self.events: queue.Queue = queue.Queue()
        self.futures: dict[str, PrefectFuture] = {}
        self.held_slots: dict[str, tuple[str, object]] = {}
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
        self.held_locks: dict[str, str] = {}
        # specs holding a slot while their server locks are asked for: task id -> (assignment, slot, chain)
        self._asking_locks: dict[str, tuple[Assignment, object, list[str]]] = {}
        self._lock_requests = ThreadPoolExecutor(max_workers=4, thread_name_prefix="server-locks")
        self._run_spec_refresh = run_spec.with_options(refresh_cache=True)
        flow_run = get_run_context().flow_run
        if flow_run is not None:
            for hook in ON_FLOW_RUN:
                hook(str(flow_run.id))
        if flow_run is not None and started_by:
            self._tag_flow_run(flow_run, user, host)
        self.state = ProjectState(
            project=project.name, run_id=self.run_id, flow_run_id=str(flow_run.id) if flow_run else None,
            api_url=settings.prefect_api_url, pid=os.getpid(), user=user, host=host,
            nodes={n.name: {"slots": n.slots, "used": 0} for n in nodes},
            specs={t: SpecRow(state="waiting") for t in project.order if t in selected})
        self.context = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in project.context]
        self.prompts = {t: build_prompt(project.specs[t], self.context) for t in selected
                        if project.specs[t].kind == "agent"}
        self.reviews: dict[str, str] = {}  # task id -> the review of the verifier that rejected its last attempt
        self.catalog, self.model_secrets = self._agent_models()
        if errors := model_env_errors(self._selected_specs.values(), model_variables(self.catalog)):
            raise ProjectInvalid(project.name, errors)  # a spec's env: sets a configured model's variable
        # values to mask that no step is given: this process's credentials (the local node's steps could read
        # them from /proc; remote nodes never see them)
        self.mask_only = settings.secret_values()
        self.inputs.masker.add([*self.mask_only, *(v for keys in self.model_secrets.values() for v in keys.values())])
        # drained nodes (dispatch/core/drain.py): read once now, then by a background thread
        self.drain = RunDrain(settings, self.scheduler, set(self.nodes), self.logger,
                              lambda drained: self.events.put(("drained", drained)), self._emit)
        self.share = self._fair_share(nodes)  # last: nothing after it can fail and leave its entry behind

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

    def _node_keys(self, nodes: list[Node]) -> dict[str, str]:
        """Private keys kept in `ClusterNode` blocks (for nodes whose key is no file here), unwrapped for paramiko."""
        from dispatch.prefect.nodes_admin import ssh_key_secrets

        return ssh_key_secrets(nodes, self.logger)

    def _agent_models(self) -> tuple[dict, dict[str, dict[str, str]]]:
        """Models (built-in, overridden by `AgentModel` blocks) and the keys of the agent specs' models."""
        from dispatch.prefect.nodes_admin import models_and_keys

        names = sorted({m for t in self.prompts for m in self.project.specs[t].model_chain}
                       | {m for t in self.selected for m in self.project.specs[t].verify})
        return models_and_keys(names, self.settings, self.logger)

    # -- events --------------------------------------------------------------------------------
    def _emit(self, event: str, task_id: str, **details) -> None:
        if not LISTENERS:
            return
        details["progress"] = self._progress()
        for listener in LISTENERS:
            try:
                listener(event, task_id, details)
            except Exception:  # a broken progress display must not break the run
                pass

    def _progress(self) -> dict:
        """Counts for the progress view, and the estimated seconds left (None until something was measured):
        the critical path of what is left through dependencies and locks, by the estimates."""
        counts = self.state.counts()
        done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "not_run", "cancelled"))
        now = time.monotonic()
        at, left = self._remaining
        if self.estimated and (left is None or now - at >= _ESTIMATE_INTERVAL):
            self._remaining = at, left = now, self.scheduler.remaining()
        return {"total": len(self.state.specs), "done": done, "running": counts.get("running", 0),
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

    def _write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= _STATE_WRITE_INTERVAL:
            for name, node in self.scheduler.nodes.items():
                self.state.nodes[name]["used"] = node.used
            self.state.ssh_connections = self.runtime.connections_opened
            save_state(self.settings.state_dir, self.state)
            self._last_write = now

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.events.put(("stop", None))

    # -- dispatch ------------------------------------------------------------------------------
    def _request(self, assignment: Assignment, chain: list[str]) -> RunRequest:
        spec = self.project.specs[assignment.task_id]
        transport = self.runtime.transports[assignment.node]
        git = None
        if self.config.sync_mode == "git":
            git = {"repo_url": self.config.repo_url, "main_branch": self.config.main_branch,
                   "dependencies": list(spec.depends_on)}
            workdir = worktree_path(transport.root_path, self.project.name, spec.task_id)
        else:
            workdir = transport.workdir(self.project.name, spec.task_id) or str(self.code_dir)
        prompt = self.prompts.get(spec.task_id, "")
        if spec.task_id in self.reviews and spec.kind == "agent":  # the verifier's review of the last attempt
            prompt = build_prompt(spec, self.context, self.reviews[spec.task_id])
        steps = build_steps(spec, prompt, skip=set(spec.model_chain) - set(chain), catalog=self.catalog)
        verify = build_verify_steps(spec, skip=set(self.cooldowns.active()) if spec.verify else None,
                                    catalog=self.catalog)
        return RunRequest(
            project=self.project.name, task_id=spec.task_id, node=assignment.node, attempt=assignment.attempt,
            cache_key=self.keys[spec.task_id], run_id=self.run_id, workdir=workdir, root=transport.root_path,
            fresh=spec.task_id in self.force,
            steps=steps, verify=verify,
            timeout=spec.timeout or self.settings.timeout, stall_timeout=self.settings.stall_timeout,
            heartbeat=self.settings.heartbeat, acceptance=spec.acceptance,
            env={**spec.env, "DISPATCH_SPEC_FILE": spec.path.name}, node_env=self.nodes[assignment.node].env,
            git=git)

    def _options(self, assignment: Assignment, held: tuple[str, object] | None) -> dict:
        """Process-local options of an attempt: the machine slot to inherit, scp-mode paths, where its retry notes
        go (the events queue: the row's reason while it runs)."""
        options: dict = {}
        spec = self.project.specs[assignment.task_id]
        models = [*(spec.model_chain if spec.kind == "agent" else []), *spec.verify]
        secrets = {f"{model}:{name}": value for model in models
                   for name, value in self.model_secrets.get(model, {}).items()}
        if self.runtime.is_local(assignment.node):
            secrets.update({f"mask:{number}": value for number, value in enumerate(self.mask_only)})
        if secrets:
            options["secrets"] = secrets
        options["on_note"] = lambda note, t=assignment.task_id: self.events.put(("note", (t, note)))
        if self.runtime.is_local(assignment.node):
            if held is not None and held[0] == "machine":
                options["slot_fd"] = held[1]
        elif self.config.sync_mode == "scp":
            options["sync_from"] = self.code_dir
            options["sync_back"] = self.code_dir
        return options

    def _submit(self, assignment: Assignment, held: tuple[str, object] | None, chain: list[str]) -> None:
        task_id = assignment.task_id
        spec = self.project.specs[task_id]
        deps = [self.futures[d] for d in spec.depends_on if d in self.futures]
        self.inputs.set_options(task_id, assignment.attempt, self._options(assignment, held))
        if held is not None:
            self.held_slots[task_id] = held
        # one task for every spec, named per run by its request: a `with_options` copy per spec costs
        # 2-13 ms of this loop
        task = self._run_spec_refresh if task_id in self.force else run_spec
        future = task.submit(self._request(assignment, chain), wait_for=deps)
        self.futures[task_id] = future
        future.add_done_callback(lambda f, t=task_id: self.events.put(("done", t)))
        row = self.state.specs[task_id]
        if spec.kind == "agent" and chain:
            self._running_models[task_id] = chain[0]
        if row.state != "retrying":  # why it waited (budget, cool-down, locks) is over; a retry keeps why it failed
            row.reason = ""
        row.task_run_id = str(future.task_run_id)
        row.state, row.node, row.attempts = "running", assignment.node, assignment.attempt
        row.model = (chain[0] if chain else "") if spec.kind == "agent" else "shell"  # what it starts with
        row.started_at = row.dispatched_at = time.time()
        row.ready_at = self.scheduler.entries[task_id].ready_at
        self._emit("started", task_id, node=assignment.node, attempt=assignment.attempt)

    def _usable_chain(self, task_id: str) -> tuple[list[str], float | None]:
        spec = self.project.specs[task_id]
        return self.cooldowns.usable(spec.model_chain) if spec.kind == "agent" else (spec.model_chain, None)

    def _fail_blocked(self, assignment: Assignment) -> None:
        """Fail a spec whose every model is blocked for billing, naming the command that clears each."""
        reason = self.cooldowns.blocked_reason(self.project.specs[assignment.task_id].model_chain)
        self.logger.error("%s: %s", assignment.task_id, reason)
        skipped = self.scheduler.fail(assignment.task_id, reason, retryable=False)
        row = self.state.specs[assignment.task_id]
        row.state, row.reason = "failed", reason
        self._emit("failed", assignment.task_id, reason=reason)
        self._skip(skipped)

    def _fail_unplaceable(self) -> None:
        """Fail ready specs that no node can ever run (`node:`/`labels:` match none), so nothing hangs."""
        for task_id in self.scheduler.unplaceable():
            spec = self.project.specs[task_id]
            known = ", ".join(sorted(self.nodes))
            reason = (f"no node fits: node={spec.node!r}, labels={spec.labels} (nodes: {known}); "
                      f"fix the spec's node/labels in {spec.path.name}")
            skipped = self.scheduler.fail(task_id, reason, retryable=False)
            row = self.state.specs[task_id]
            row.state, row.reason = "failed", reason
            self._emit("failed", task_id, reason=reason)
            self._skip(skipped)

    def _within_share(self, assignments: list[Assignment]) -> list[Assignment]:
        """The assignments this run may start within its fair share of the slots; the rest wait a moment."""
        running = len(self.scheduler.running)  # the new assignments included
        held = running - len(assignments)
        allowed = self.share.allowed(running + self.scheduler.due(), held, releasing=self.runtime.brokers.releasing())
        room = max(allowed - held, 0)
        for assignment in assignments[room:]:
            self.scheduler.unpick(assignment, delay=_SHARE_RETRY)
        return assignments[:room]

    def _dispatch(self) -> None:
        self._fail_unplaceable()
        # A node another dispatcher filled is set aside for a moment and the specs refused there are picked
        # again at once for the other nodes: each round that repeats sets aside one more node.
        for _ in range(len(self.scheduler.nodes) + 1):
            if not self._dispatch_round():
                break

    def _dispatch_round(self) -> bool:
        """Start what the order picks now; whether a node was found full by its broker (pick again)."""
        refused = False
        for assignment in self._within_share(self.scheduler.pick()):
            chain, free_at = self._usable_chain(assignment.task_id)
            if not chain and free_at is None:
                self._fail_blocked(assignment)
                continue
            if not chain:  # every model of the spec is out of quota: wait for the first reset
                delay = min(max(1.0, free_at - time.time()), 300.0)
                self.scheduler.unpick(assignment, delay=delay)
                row = self.state.specs[assignment.task_id]
                row.reason = f"every model is on cool-down until {time.strftime('%H:%M:%S', time.localtime(free_at))}"
                continue
            if self.budgets.enabled and self.project.specs[assignment.task_id].kind == "agent":
                chain, why = self.budgets.check(chain, self.state.user, list(self._running_models.values()))
                if why:
                    self._wait_for_budget(assignment, why)
                    continue
            if self.scheduler.set_aside(assignment.node):
                self.scheduler.unpick(assignment)  # placed before its node was found full in this round
                refused = True
                continue
            held = self.runtime.brokers.try_acquire(assignment.node)
            if held is None:  # another dispatcher holds this node's slots right now
                self.scheduler.node_full(assignment.node, _BUSY_RETRY)
                self.scheduler.unpick(assignment)
                refused = True
                continue
            modifies = self.project.specs[assignment.task_id].modifies
            if self.server_locks is not None and modifies:  # after the slot, asked off this loop (HTTP)
                self._asking_locks[assignment.task_id] = (assignment, held, chain)
                self._lock_requests.submit(self._ask_locks, assignment.task_id, modifies)
                continue
            self._submit(assignment, held, chain)
        return refused

    def _wait_for_budget(self, assignment: Assignment, why: str) -> None:
        """Hold a spec back that would start past a daily budget: it looks again each minute (another
        dispatcher's spend, the next UTC day); its row and the progress view say why."""
        delay = min(60.0, max(1.0, next_utc_midnight(time.time()) - time.time()))
        self.scheduler.unpick(assignment, delay=delay)
        row = self.state.specs[assignment.task_id]
        if row.reason != why:
            row.reason = why
            self.logger.warning("%s: %s", assignment.task_id, why)
            self._write_state(force=True)
            self._emit("waiting", assignment.task_id, reason=why)

    def _record_usage(self, result: SpecResult) -> None:
        """Add what the attempts of a fresh result reported using to its row and to the usage ledger."""
        self.state.specs[result.task_id].add_usage(result.attempts)
        records = ledger_records(result, user=self.state.user, run_id=self.run_id)
        try:
            append_ledger(self.settings.results_dir, records, self.settings.usage_ledger_bytes)
        except OSError as exc:  # the run goes on; only totals and budgets miss these attempts
            self.logger.warning("could not write the usage ledger: %s", exc)
        self.budgets.refresh()

    def _ask_locks(self, task_id: str, modifies: list[str]) -> None:
        """In a helper thread: ask the server's lock table; the dispatch loop gets the answer as an event
        (always: a lost answer would leave the spec holding its slot for ever)."""
        from dispatch.prefect.server_locks import Grant

        try:
            grant = self.server_locks.try_acquire(task_id, modifies)
        except Exception as exc:  # try_acquire answers errors itself; anything else: the spec waits and retries
            grant = Grant(None, error=f"{type(exc).__name__}: {exc}"[:300])
        self.events.put(("locks", (task_id, grant)))

    def _locks_answered(self, task_id: str, grant) -> None:
        """Start the spec with its locks; refused: give its slot back, it waits (no hold-and-wait)."""
        assignment, held, chain = self._asking_locks.pop(task_id)
        row = self.state.specs[task_id]
        if not grant or self.stop_reason:
            if grant:
                self.server_locks.release(grant.token)
            self.runtime.brokers.release(held)
            if self.stop_reason:
                self.scheduler.cancel_running(task_id, self.stop_reason)
                row.state, row.reason = "cancelled", self.stop_reason
            else:  # another user's overlapping spec runs
                self.scheduler.unpick(assignment, delay=grant.retry_after)
                row.reason = grant.reason
            return
        self.held_locks[task_id], row.reason = grant.token, ""
        self._submit(assignment, held, chain)

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
                if task_id not in self.selected or task_id in self.force or key != self.keys.get(task_id):
                    continue  # an edited spec's stale runner is killed when the spec is dispatched again
                if self.scheduler.state(task_id) not in ("waiting", "ready"):
                    continue
                self.scheduler.adopt(task_id, node, 1)
                if task_id in finished:  # the transport hands its result back without running it
                    recovered.append(task_id)
                else:
                    self.logger.info("%s %s: still running from an earlier dispatcher; re-attaching", node, task_id)
                    modifies = self.project.specs[task_id].modifies
                    if self.server_locks is not None and modifies:  # they died with the old dispatcher's lease
                        grant = self.server_locks.try_acquire(task_id, modifies)
                        if grant:
                            self.held_locks[task_id] = grant.token
                        else:
                            self.logger.warning("%s: re-attached without its file locks (%s)", task_id,
                                                grant.reason)
                self._submit(Assignment(task_id, node, 1), None, self.project.specs[task_id].model_chain)
            if recovered:
                names = ", ".join(recovered[:5]) + (", ..." if len(recovered) > 5 else "")
                self.logger.info("node %s: %d unchanged spec(s) of %s already succeeded there (%s); their "
                                 "results are taken, not run again", node, len(recovered), self.project.name, names)

    def _finish(self, task_id: str) -> None:
        future = self.futures[task_id]
        self._running_models.pop(task_id, None)
        held = self.held_slots.pop(task_id, None)
        if held is not None:
            self.runtime.brokers.release(held)
        if task_id in self.held_locks:
            self.server_locks.release(self.held_locks.pop(task_id))
        try:
            result = future.result(raise_on_failure=False)
        except Exception as exc:  # the task itself crashed
            result = exc
        row = self.state.specs[task_id]
        if not isinstance(result, SpecResult):
            result = failure(self.project.name, task_id, f"the task crashed: {result!r}", status="lost",
                             node=row.node)
        self.inputs.drop_options(task_id, self.scheduler.attempts(task_id))
        if result.status == NODE_FULL and not self.stop_reason:  # nothing ran: not an attempt, not a fault
            self.logger.info("%s %s: %s", row.node, task_id, result.reason)
            self.scheduler.unpick(Assignment(task_id, row.node, self.scheduler.attempts(task_id)),
                                  delay=_NODE_FULL_RETRY)
            row.state, row.reason = self.scheduler.state(task_id), result.reason
            return
        cached = result.run_id != self.run_id
        self.cooldowns.record_attempts(result.attempts, task_id, self.who, self.logger)
        if not cached:
            self._record_usage(result)
        if not cached and not self.stop_reason:
            self._record_duration(result)
        row.model, row.exit_code, row.log_path = result.model, result.exit_code, result.log_path
        row.fallback = result.fallback()
        if row.fallback and not cached:
            self.logger.info("%s: models passed over: %s", task_id, row.fallback)
        row.duration, row.cached = result.duration, cached
        if cached:
            row.started_at, row.ended_at, row.node = result.started_at, result.ended_at, result.node
        else:
            row.ended_at = time.time()
        if self.stop_reason and not result.succeeded:
            self.scheduler.cancel_running(task_id, self.stop_reason)
            row.state, row.reason = "cancelled", self.stop_reason
            self._emit("cancelled", task_id, reason=self.stop_reason)
            return
        if result.succeeded:
            self.scheduler.succeed(task_id)
            row.state, row.reason = "succeeded", ""
            self._emit("succeeded", task_id, result=result, cached=cached)
            return
        if result.status == "rejected" and result.verification is not None:
            self.reviews[task_id] = result.verification.review
        if result.node_fault and result.node in self.runtime.nodes and not self.runtime.is_local(result.node):
            self._node_down(result.node, result.reason)
        acceptance = result.status == "acceptance_failed"
        skipped = self.scheduler.fail(task_id, result.reason or result.status, retryable=result.retryable,
                                      node_fault=result.node_fault, max_attempts=2 if acceptance else None)
        row.state, row.reason = self.scheduler.state(task_id), result.reason or result.status
        if row.state == "ready":
            row.state = "retrying"
            self._emit("retry", task_id, reason=row.reason, attempt=self.scheduler.attempts(task_id))
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
            row = self.state.specs[child]
            row.state, row.reason = self.scheduler.state(child), self.scheduler.reason(child)
            deps = [self.futures[d] for d in self.project.specs[child].depends_on if d in self.futures]
            self.futures[child] = skip_spec.with_options(name=child, task_run_name=child).submit(
                child, row.reason, wait_for=deps) if row.state == "not_run" else None
            if self.futures[child] is not None:
                row.task_run_id = str(self.futures[child].task_run_id)
            self._emit(row.state, child, reason=row.reason)
        self.futures = {k: v for k, v in self.futures.items() if v is not None}

    def execute(self) -> State:
        """Run the project to the end (or until stopped) and return the flow's final state."""
        self._reattach()
        self._dispatch()
        self.drain.note_waits(self.state.specs)
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
            elif kind == "locks":  # data: (task id, grant)
                self._locks_answered(*data)
            elif kind == "node_up":  # data: the node's name
                self.scheduler.nodes[data].down = False
                self.logger.info("node %s is back", data)
            elif kind == "drained":  # data: the drained nodes now
                self.drain.changed(data)
            elif kind == "note" and self.state.specs[data[0]].state == "running":  # data: (task id, note)
                self.state.specs[data[0]].reason = data[1]  # e.g. "glm: 429, retrying 2/10", "" once it goes on
            elif kind == "stop":
                self._stop()
            if not self.stop_reason:
                self._dispatch()
                self.drain.note_waits(self.state.specs)
            self._write_state()
        return self._conclude()

    def close(self) -> None:
        """Wait for lock requests still out (their answers go unread), give back the server's file locks, then
        close the nodes' connections. Closes what a run refused part-way has opened, too."""
        if (requests := getattr(self, "_lock_requests", None)) is not None:
            requests.shutdown(wait=True)
        # explicitly: a collected lock table only stops renewing (server_locks.py)
        for part in ("server_locks", "drain", "share", "runtime"):
            if (opened := getattr(self, part, None)) is not None:
                opened.close()
        if getattr(self, "inputs", None) is not None:
            run_inputs.unregister(self.run_id)

    def _stop(self) -> None:
        self.logger.warning("stopping %s: %s", self.project.name, self.stop_reason)
        for task_id in self.scheduler.cancel_all(self.stop_reason):
            self.state.specs[task_id].state, self.state.specs[task_id].reason = "cancelled", self.stop_reason
        for task_id in self.scheduler.running:
            transport = self.runtime.transports.get(self.scheduler.entries[task_id].node or "")
            if transport is not None:
                transport.cancel(self.project.name, task_id)

    def _conclude(self) -> State:
        counts = self.state.counts()
        total = len(self.state.specs)
        failed = counts.get("failed", 0)
        summary = (f"{counts.get('succeeded', 0)}/{total} succeeded, {failed} failed, "
                   f"{counts.get('not_run', 0)} not run, {counts.get('cancelled', 0)} cancelled")
        if self.stop_reason:
            self.state.state = "cancelled"
        else:
            self.state.state = "failed" if failed or counts.get("not_run") else "completed"
        self.state.message, self.state.ended_at = summary, time.time()
        self._write_state(force=True)
        self._save_history()
        self.budgets.close()
        try:
            usage = run_usage(self.settings, self.run_id)
            create_markdown_artifact(markdown=render_markdown(self.state, self.settings.runs_dir, ui_links=True,
                                                              usage=usage),
                                     key=f"report-{_artifact_key(self.project.name)}",
                                     description=f"Oyster Dispatch report for {self.project.name}")
            create_table_artifact(table=table_rows(self.state), key=f"specs-{_artifact_key(self.project.name)}",
                                  description=f"Specs of {self.project.name}")
        except SERVER_ERRORS as exc:  # the run's results are on disk already; say so and carry on
            self.logger.warning("could not attach the report artifact: %s", exc)
        self.logger.info("%s: %s", self.project.name, summary)
        if self.stop_reason:
            return Cancelled(message=f"{summary}; {self.stop_reason}")
        if self.state.state == "failed":
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
                         code_dir=Path(code_dir) if code_dir else None, base=project)
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
