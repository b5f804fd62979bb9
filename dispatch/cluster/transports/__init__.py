"""How a spec reaches a node: `local` (subprocesses here), `ssh` (paramiko, push), `worker` (pull).

Every transport runs the same node runner (the zipapp of dispatch/runner/) in a run directory
`<root>/<project>/tasks/<task_id>/` and hands back its `result.json` as a `SpecResult`.

An attempt that did not succeed and has no runner result of its own (lost, refused, a git step failed, the
task crashed) is built by `failure` (or `RunRequest.failure`), and every unsuccessful result gets its missing
reason from one rule, `explained`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field

from dispatch.core.results import SpecResult

LineSink = Callable[[str], None]


class RunRequest(BaseModel):
    """Everything a node needs to run one attempt of one spec."""

    project: str
    task_id: str
    node: str
    attempt: int = 1
    cache_key: str
    run_id: str
    workdir: str
    root: str = Field(default="", description="the node's run root (worker nodes resolve relative paths)")
    steps: list[dict]
    timeout: float
    stall_timeout: float
    heartbeat: float = 2.0
    acceptance: list[str] = Field(default_factory=list)
    acceptance_timeout: float = Field(default=300.0, description="seconds each acceptance command may take")
    verify: list[dict] = Field(default_factory=list, description="the verifier chain's steps (`verify:`)")
    env: dict[str, str] = Field(default_factory=dict, description="the spec's env (the runner drops what "
                                                                   "it may not set: runner.task.protected_env)")
    node_env: dict[str, str] = Field(default_factory=dict, description="the node's configured env (PATH...)")
    git: dict | None = Field(default=None, description="git mode: repo_url, main_branch, dependencies")
    fresh: bool = Field(default=False, description="run it even if a finished result of the same attempt is on "
                                                   "the node (--force, --from): never taken back")

    @property
    def run_name(self) -> str:
        """The attempt's task run name: the spec's id, with the attempt number after the first."""
        return self.task_id if self.attempt == 1 else f"{self.task_id} (attempt {self.attempt})"

    def longest(self, grace: float) -> float:
        """How long the attempt may take on its node at most, plus `grace`: the chain's and the verifiers' time
        (`timeout`) and each acceptance command's own, which runs outside that deadline."""
        return self.timeout + len(self.acceptance) * self.acceptance_timeout + grace

    def failure(self, reason: str, *, status: str = "failed", retryable: bool = True, node_fault: bool = False,
                **fields: Any) -> SpecResult:
        """This attempt's result when it did not succeed and the runner gave none (`failure`)."""
        return failure(self.project, self.task_id, reason, status=status, retryable=retryable,
                       node_fault=node_fault, **{"node": self.node, "cache_key": self.cache_key,
                                                 "run_id": self.run_id, "attempt": self.attempt, **fields})

    def task_json(self) -> dict:
        """The node runner's `task.json` (no secrets: those travel on the runner's stdin)."""
        return {
            "project": self.project, "task_id": self.task_id, "workdir": self.workdir,
            "timeout": self.timeout, "stall_timeout": self.stall_timeout, "heartbeat": self.heartbeat,
            "env": {**self.env, "DISPATCH_PROJECT": self.project, "DISPATCH_TASK_ID": self.task_id,
                    "DISPATCH_ATTEMPT": str(self.attempt), "DISPATCH_NODE": self.node},
            "node_env": self.node_env,
            "steps": self.steps, "acceptance": self.acceptance, "acceptance_timeout": self.acceptance_timeout,
            "verify": self.verify,
            "cache_key": self.cache_key, "run_id": self.run_id, "attempt": self.attempt, "fresh": self.fresh,
        }


class Transport(Protocol):
    """Runs spec attempts on one node."""

    def run(self, request: RunRequest, on_line: LineSink) -> SpecResult:
        """Run (or re-attach to) one attempt; block until it ends; never raise for a spec failure."""

    def cancel(self, project: str, task_id: str) -> None:
        """Kill a running attempt (its whole process group); its `run` then returns `killed`."""

    def exec(self, script: str, timeout: float) -> tuple[int, str, str]:
        """Run a POSIX sh script on the node: (exit code, stdout, stderr)."""

    @property
    def root_path(self) -> str:
        """The node's run root (where `<project>/tasks/` and `<project>/worktrees/` live)."""


def failure(project: str, task_id: str, reason: str, *, status: str = "failed", retryable: bool = True,
            node_fault: bool = False, **fields: Any) -> SpecResult:
    """The result of an attempt that did not succeed and has no runner result: `status` (failed, lost, ...)
    and why; `fields` are any other `SpecResult` fields (node, run_dir, exit_code, ...). An empty `reason`
    follows the rule of `explained`."""
    return explained(SpecResult(project=project, task_id=task_id, status=status, reason=reason,
                                retryable=retryable, node_fault=node_fault, **fields))


def explained(result: SpecResult) -> SpecResult:
    """`result`, with a reason when it did not succeed and has none: the status, with the last model
    attempt's reason or else the exit code when there is one (`failed: 429 quota`, `lost (exit code 3)`)."""
    if result.succeeded or result.reason:
        return result
    last = result.attempts[-1].reason if result.attempts else ""
    if last:
        result.reason = f"{result.status}: {last}"
    elif result.exit_code is not None:
        result.reason = f"{result.status} (exit code {result.exit_code})"
    else:
        result.reason = result.status
    return result
