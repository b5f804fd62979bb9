"""What a run leaves behind: per-spec results and the live state file of each project.

The project flow keeps `<home>/state/<project>.json` current while it runs, so that `dispatch status`
and `dispatch report` answer from disk in milliseconds instead of starting Prefect's temporary API
server (6-10 s in embedded mode). Every write is atomic (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from dispatch.core.errors import ConfigError
from dispatch.core.paths import check_name, local_path, name_problem
from dispatch.core.safeload import load_json, loads_json
from dispatch.core.usage import Usage, agent_ran, total_figure

# Final spec statuses written by the node runner, plus the dispatcher's own.
SUCCEEDED = "succeeded"
RUNNER_FAILURES = ("failed", "timeout", "stalled", "killed", "acceptance_failed", "rejected")


class Attempt(BaseModel):
    """One model tried within one run of a spec."""

    model: str = ""
    verdict: str = ""
    reason: str = ""
    reset_at: float | None = None
    retry_after: float | None = None
    exit_code: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    role: str = Field(default="", description="verify: a verifier's review; shell: a shell step; else the agent run")
    usage: Usage | None = Field(default=None, description="what the agent reported using; None: it said nothing")


class AcceptanceCheck(BaseModel):
    command: str
    passed: bool
    exit_code: int | None = None
    output_tail: str = ""
    duration: float | None = Field(default=None, description="seconds the command took on the node")


class Verification(BaseModel):
    """What the spec's verifier (`verify:`) said of the change: approve, reject, or none (no verdict)."""

    model: str = ""
    verdict: str = ""
    review: str = Field(default="", description="the verifier's answer (its end), handed to a retry's prompt")


class SpecResult(BaseModel):
    """The outcome of one run of one spec on one node (the node runner's `result.json`, extended)."""

    project: str
    task_id: str
    status: str = Field(description="succeeded, failed, timeout, stalled, killed, acceptance_failed, rejected "
                                    "(by the verifier), lost")
    node: str = ""
    model: str = ""
    attempts: list[Attempt] = Field(default_factory=list)
    exit_code: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    duration: float | None = None
    files_changed: list[str] = Field(default_factory=list)
    acceptance: list[AcceptanceCheck] = Field(default_factory=list)
    verification: Verification | None = None
    log_tail: str = ""
    log_path: str = ""
    run_dir: str = ""
    cache_key: str = ""
    run_id: str = Field(default="", description="The dispatcher run that produced this result.")
    attempt: int = 1
    reason: str = ""
    retryable: bool = True
    node_fault: bool = False
    branch: str = Field(default="", description="git mode: the spec's branch")
    commit: str = Field(default="", description="git mode: the commit pushed to it")
    skipped_models: list[str] = Field(default_factory=list, description="models of the chain the runner passed "
                                                                        "over without running them (cool-down)")
    runner_version: str = Field(default="", description="the node runner's sha256 that ran it")
    hostname: str = Field(default="", description="the node's host name, as the node itself says")
    workdir: str = Field(default="", description="where the spec worked on the node")

    @classmethod
    def from_runner(cls, data: dict, *, project: str, task_id: str, **overrides) -> SpecResult:
        """A node runner's `result.json` as a SpecResult: unknown keys and nulls dropped (defaults apply),
        `project`/`task_id` filled in when the runner could not know them (a task.json it refused), then
        `overrides` (what the dispatcher knows better: node, run directory, cache key, ...)."""
        known = {k: v for k, v in data.items() if k in cls.model_fields and v is not None}
        return cls.model_validate({"project": project, "task_id": task_id} | known | overrides)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def fallback(self) -> str:
        """Which models of the chain were passed over and why, and which one did the work ('' when the first
        model ran alone), e.g. `glm: quota until 14:05; minimax: CLI missing -> claude`."""
        agents = [a for a in self.attempts if not a.role]
        passed = [f"{model}: on cool-down" for model in self.skipped_models]
        passed += [f"{a.model}: {_passed_over(a)}" for a in agents[:-1] if a.verdict != "ok"]
        if not passed:
            return ""
        last = agents[-1].model if agents else ""
        done = f" -> {last}" if last and self.succeeded else (f" -> {last} ({_passed_over(agents[-1])})" if last
                                                              else "")
        return "; ".join(passed) + done

    def usage(self) -> Usage | None:
        """The summed usage of its attempts that reported one (None when none did)."""
        total = None
        for attempt in self.attempts:
            if attempt.usage is not None:
                total = attempt.usage if total is None else total.plus(attempt.usage)
        return total


def _passed_over(attempt: Attempt) -> str:
    """Why a model's attempt did not do the work, in a few words (`dispatch status`, the report)."""
    reason = attempt.reason.strip()
    if attempt.verdict == "quota":
        until = time.strftime("%H:%M", time.localtime(attempt.reset_at)) if attempt.reset_at else "its reset"
        return f"quota until {until}"
    if attempt.verdict == "billing":
        return "billing (blocked until `dispatch models reset`)"
    if attempt.verdict == "transient":
        lowered = reason.lower()
        if "refused" in lowered or "unable to connect" in lowered or "unreachable" in lowered:
            return "connection refused"
        return f"limited ({reason[:60] or 'rate limit'})"
    if attempt.verdict == "failure" and "on PATH" in reason:
        return "CLI missing"
    if attempt.verdict in ("auth", "config"):
        return f"{attempt.verdict}: {reason[:80]}"
    return f"{attempt.verdict or 'failed'}" + (f": {reason[:60]}" if reason else "")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing, unreadable (a run may be writing it), over 64 MiB or
    nested too deep (dispatch/core/safeload.py: nodes and agents write some of these files)."""
    try:
        return load_json(path, max_bytes=64 << 20)
    except ConfigError:
        return None


class SpecRow(BaseModel):
    """One spec's line in the project state file."""

    state: str
    node: str = ""
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    duration: float | None = None
    model: str = ""
    reason: str = ""
    cached: bool = False
    exit_code: int | None = None
    log_path: str = ""
    ready_at: float | None = Field(default=None, description="when its dependencies were all done")
    dispatched_at: float | None = Field(default=None, description="when the dispatcher submitted it")
    task_run_id: str | None = Field(default=None, description="the Prefect task run of its latest attempt")
    cost_usd: float | None = Field(default=None, description="what its agents reported costing, all attempts")
    input_tokens: int | None = None
    output_tokens: int | None = None
    attempts_without_cost: int = Field(default=0, description="agent attempts that reported no cost (unknown)")
    fallback: str = Field(default="", description="the models passed over and why, then the one that did the work "
                                                  "(SpecResult.fallback); '' when the first model ran alone")

    @field_validator("cost_usd", "input_tokens", "output_tokens", mode="before")
    @classmethod
    def _sum(cls, value: Any, info: ValidationInfo) -> float | int | None:
        # a state file of an older dispatcher may hold inf (its sums of unchecked figures): unknown, never a crash
        return total_figure(value, whole=info.field_name != "cost_usd")

    def add_usage(self, attempts: list[Attempt]) -> None:
        """Count one result's agent attempts in (figures no agent reported stay None)."""
        total = Usage.model_construct(cost_usd=self.cost_usd, input_tokens=self.input_tokens,
                                      output_tokens=self.output_tokens)
        for attempt in attempts:
            if not agent_ran(attempt):
                continue
            total = total.plus(attempt.usage)
            self.attempts_without_cost += attempt.usage is None or attempt.usage.cost_usd is None
        self.cost_usd, self.input_tokens, self.output_tokens = total.cost_usd, total.input_tokens, total.output_tokens


class ProjectState(BaseModel):
    """The live state of a project's latest run, as `status`, `report`, `stop` read it."""

    project: str
    state: str = "running"
    run_id: str = ""
    flow_run_id: str | None = None
    api_url: str | None = None
    pid: int = 0
    user: str = ""
    host: str = ""
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    ended_at: float | None = None
    nodes: dict[str, dict[str, int]] = Field(default_factory=dict)
    specs: dict[str, SpecRow] = Field(default_factory=dict)
    message: str = ""
    ssh_connections: int = Field(default=0, description="SSH connections this run opened")

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for row in self.specs.values():
            result[row.state] = result.get(row.state, 0) + 1
        return result


def state_path(state_dir: Path, project: str) -> Path:
    """`<state_dir>/<project>.json`, the name checked and the path proven inside `state_dir`.

    Raises:
        UnsafePath: `project` is no valid name.
    """
    return local_path(state_dir, f"{check_name(project, 'project name')}.json", what="state file")


def save_state(state_dir: Path, state: ProjectState) -> None:
    state.updated_at = time.time()
    write_json(state_path(state_dir, state.project), state.model_dump(mode="json"))


def load_state(state_dir: Path, project: str) -> ProjectState | None:
    data = read_json(state_path(state_dir, project))
    return ProjectState.model_validate(data) if data else None


def load_all_states(state_dir: Path) -> list[ProjectState]:
    if not state_dir.is_dir():
        return []
    states = [load_state(state_dir, p.stem) for p in sorted(state_dir.glob("*.json")) if not name_problem(p.stem)]
    return [s for s in states if s is not None]


def cached_results(cache_dir: Path, project: str) -> list[Path]:
    """The files of Prefect's result cache (`cache_dir`) that hold a result of `project`.

    Cache keys start `<project>--`, but a name may hold `--` itself (`a` and `a--b`), so each candidate's
    record is read and kept only when the `SpecResult` in it names this project.
    """
    found = []
    for path in sorted(cache_dir.glob(f"{check_name(project, 'project name')}--*")):
        record = read_json(path) if path.is_file() and not path.is_symlink() else None
        result = record.get("result") if isinstance(record, dict) else None
        if isinstance(result, str):  # the serializer's JSON text of the SpecResult
            try:
                result = loads_json(result, str(path))
            except ConfigError:
                continue
        if isinstance(result, dict) and isinstance(result.get("data"), dict):  # {"__class__": ..., "data": {...}}
            result = result["data"]
        if isinstance(result, dict) and result.get("project") == project:
            found.append(path)
    return found
