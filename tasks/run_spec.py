"""The `run_spec` task: one attempt of one spec on one node, as a Prefect task run named by its id.

Its cache key is the spec's key (content, dependencies' keys, project revision), and its result (a
`SpecResult`) is persisted as JSON, so a later run of an unchanged spec is a cache hit that never
touches a node. A failed attempt returns a `Failed` state that still carries its `SpecResult`, so
the dispatcher sees the log tail, exit code and model attempts of failures too.

Its only parameter is the `RunRequest` (plain data: what the UI shows and the task run stores). What cannot
be a parameter (the transports, secrets, a slot descriptor, the note callback, the run's masker) the project
run registers as one `RunInputs` under its run id (tasks/run_inputs.py), and the task finds it by
`request.run_id`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.states import Failed, State

from dispatch.cluster.transports import RunRequest, Transport
from dispatch.core.results import SpecResult
from dispatch.core.secrets import Masker
from tasks.run_inputs import inputs_of

# The runner's line while an agent CLI retries by itself ("=== runner: glm: 429, retrying 2/10 in 30s ===") and the
# lines that start a step: what a running spec's row shows (its reason) comes and goes with them.
_RETRY_LINE = re.compile(r"^=== runner: (?P<note>[\w.-]+: .*?\b(?:retrying|reconnecting)\b.*?)"
                         r"(?: in [\d.e+]+m?s)? ===$")
_STEP_LINES = ("=== step ", "=== acceptance ", "=== verify: ")


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["request"].cache_key


def retry_note(line: str, shown: str) -> str | None:
    """What a running spec's row should say after this line of its log, when that changes, else None.

    The runner's retry line sets it ("glm: 429, retrying 2/10"); a step starting, or a line of the agent's own
    output (it makes progress again), clears a note `shown` before.

    Examples:
        >>> retry_note("=== runner: glm: 429, retrying 2/10 in 30s ===", "")
        'glm: 429, retrying 2/10'
        >>> retry_note("=== step claude (attempt 2) ===", "glm: 429, retrying 2/10")
        ''
        >>> retry_note("=== runner: WARNING: no rate-limit classifier ===", "") is None
        True
    """
    found = _RETRY_LINE.match(line)
    if found is not None:
        return found.group("note") if found.group("note") != shown else None
    if shown and (line.startswith(_STEP_LINES) or (line.strip() and not line.startswith("==="))):
        return ""
    return None


def _line_sink(logger, prefix: str, masker: Masker,
               on_note: Callable[[str], None] | None) -> Callable[[str], None]:
    """Each line of the attempt's log to the task's log (masked), and its retry notes to `on_note`."""
    shown = ""

    def sink(line: str) -> None:
        nonlocal shown
        line = masker.mask(line)
        logger.info("%s %s", prefix, line)
        if on_note is not None and (note := retry_note(line, shown)) is not None:
            shown = note
            on_note(note)

    return sink


def missing_agent_clis(request: RunRequest) -> str | None:
    """On the local node: why no step of the model chain (or of the verifier chain) can start, or None. CLIs
    are looked up as the runner will: on the node's configured PATH (nodes.json `env`), else this process's."""
    path = request.node_env.get("PATH", os.environ.get("PATH", os.defpath))
    problems = []
    for role, steps in (("agent", request.steps), ("verifier", request.verify)):
        hints = []
        for step in steps:
            argv = step.get("argv")
            if not argv or shutil.which(argv[0], path=path):
                hints = []
                break
            hints.append(f"no {role} CLI '{argv[0]}' on PATH for model {step['name']}: "
                         f"{step.get('install_hint') or 'install it'}")
        problems += hints
    if not problems:
        return None
    return "; ".join(problems) + ", or set the spec's model/executor (verify) to one that is installed"


@task(persist_result=True, result_serializer="json", cache_key_fn=_cache_key, log_prints=False,
      task_run_name="{request.run_name}")
def run_spec(request: RunRequest) -> SpecResult | State:
    """Run one attempt of a spec on its node and return the node runner's result.

    Args:
        request: what to run, where, with which limits. Secrets and other process-local options
            travel beside it in its run's `RunInputs` (found by `request.run_id`), never as task parameters.
    """
    logger = get_run_logger()
    inputs = inputs_of(request.run_id)
    transport = inputs.transports[request.node]
    prefix = f"{request.node} {request.task_id}:"
    from dispatch.cluster.transports.local import LocalTransport

    if isinstance(transport, LocalTransport) and (missing := missing_agent_clis(request)):
        result = request.failure(missing, retryable=False)
        logger.error("%s %s", prefix, missing)
        return Failed(message=missing, data=result)
    logger.info("%s attempt %d started", prefix, request.attempt)
    # a worker node's spec-run flow prepares and pushes the branch on the node itself
    git_here = bool(request.git) and not getattr(transport, "runs_git_on_node", False)
    if git_here and (failure := prepare_branch(request, transport, logger, prefix)):
        return Failed(message=f"{request.task_id}: {failure.reason}", data=failure)
    options, on_note = inputs.options(request.task_id, request.attempt)  # on_note: what the row says meanwhile
    result = transport.run(request, _line_sink(logger, prefix, inputs.masker, on_note), **options)
    if inputs.masker:  # every secret the run knows, masked in what this task writes to Prefect
        result = SpecResult.model_validate(inputs.masker.mask_data(result.model_dump()))
    if result.succeeded and git_here:
        push_branch(request, transport, result, logger, prefix)
    if result.succeeded:
        logger.info("%s succeeded in %.1fs (model %s)", prefix, result.duration or 0.0, result.model or "-")
        return result
    logger.error("%s %s", prefix, result.reason or result.status)
    return Failed(message=f"{request.task_id}: {result.reason or result.status}", data=result)


def _git_failure(request: RunRequest, reason: str, retryable: bool, node_fault: bool = False) -> SpecResult:
    return request.failure(reason, retryable=retryable, node_fault=node_fault)


def prepare_branch(request: RunRequest, transport: Transport, logger, prefix: str) -> SpecResult | None:
    """git mode: the spec's worktree on branch dispatch/<project>/<task_id>, with its dependencies merged."""
    from dispatch.cluster import gitsync
    from dispatch.core.errors import NodeError

    script = gitsync.prepare_script(project=request.project, task_id=request.task_id,
                                    repo_url=request.git["repo_url"], main_branch=request.git["main_branch"],
                                    root=transport.root_path, dependencies=request.git["dependencies"])
    try:
        code, out, err = transport.exec(script, timeout=900)
    except NodeError as exc:
        return _git_failure(request, f"node {request.node} failed preparing the branch: {exc}", True, True)
    if code == 0:
        logger.info("%s worktree %s on %s", prefix, out.strip().splitlines()[-1],
                    gitsync.branch_name(request.project, request.task_id))
        return None
    tail = " | ".join(err.strip().splitlines()[-8:])
    if code == gitsync.CONFLICT_EXIT_CODE:  # the dependencies' branches conflict: a retry cannot fix it
        return _git_failure(request, f"its dependencies' branches conflict: {tail}", retryable=False)
    return _git_failure(request, f"preparing the git worktree failed ({code}): {tail}", retryable=True)


def push_branch(request: RunRequest, transport: Transport, result: SpecResult, logger, prefix: str) -> None:
    """git mode: commit the spec's changes and push its branch; a failure fails the attempt (retryable)."""
    from dispatch.cluster import gitsync
    from dispatch.core.errors import NodeError

    script = gitsync.finish_script(project=request.project, task_id=request.task_id, root=transport.root_path,
                                   message=f"{request.task_id}: {result.model or 'dispatch'} (oyster dispatch)")
    try:
        code, out, err = transport.exec(script, timeout=900)
    except NodeError as exc:
        code, out, err = -1, "", str(exc)
        result.node_fault = True
    if code != 0:
        result.status, result.retryable = "failed", True
        result.reason = f"pushing the branch failed ({code}): {err.strip()[-500:]}"
        return
    result.branch = gitsync.branch_name(request.project, request.task_id)
    result.commit = out.strip().splitlines()[-1] if out.strip() else ""
    logger.info("%s pushed %s at %s", prefix, result.branch, result.commit[:12])


@task(log_prints=False)
def skip_spec(task_id: str, reason: str) -> State:
    """A placeholder task run for a spec that will not run, so the UI's graph stays whole."""
    from prefect.states import Cancelled

    return Cancelled(name="NotRun", message=f"{task_id} not run: {reason}")
