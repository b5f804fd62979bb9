"""One run: the model chain, then the checks after it, then result.json (`Runner`).

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from . import protocol
from .checks import files_changed, final_message, run_acceptance, run_verify, tree_stamps
from .log import Log
from .procs import become_subreaper, find_executable
from .rundir import rotate_previous, unregister_live, write_json
from .supervise import Outcome, classify, load_classifier, run_process
from .task import MASK_ONLY, Step, Task, base_environment, protected_env
from .zipapp import runner_version

_ANSWER_CAP = 16384  # characters of an agent's final message kept in its attempt record

# the chain moves on to the next model at once ("config": its CLI refused to start, the reason names the fix)
_RATE_KINDS = ("quota", "billing", "transient", "auth", "config")


class Runner:
    """Runs one task: the model chain, acceptance, then result.json."""

    def __init__(self, run_dir: str, task: Task, secrets: dict[str, str], *, echo: bool = False) -> None:
        self.run_dir = run_dir
        self.task = task
        self.secrets = secrets
        self.echo = echo
        self.stop_requested = False
        self.attempts: list[dict] = []
        self.skipped: list[str] = []
        self.started_at = time.time()
        self._stamps: dict[str, tuple[int, int]] = {}  # the workdir's files when the run started (no git)
        self._deadline = None if task.timeout is None else time.monotonic() + task.timeout
        self._status: dict[str, Any] = {}
        self._status_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self.log: Log | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def start(self) -> None:
        """Keep the previous run's log and result as *.prev, open task.log, write the first status."""
        rotate_previous(self.run_dir)
        self.log = Log(self._path("task.log"), self.secrets, self.echo)
        self.write_status(
            state="running",
            runner_pid=os.getpid(),
            step=None,
            step_pid=None,
            started_at=self.started_at,
            heartbeat=self.task.heartbeat,
            project=self.task.project,
            task_id=self.task.task_id,
        )

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self.stop_requested = True

    # -- status ------------------------------------------------------------------------------------------

    def write_status(self, **changes: Any) -> None:
        with self._status_lock:
            self._status.update(changes)
            self._status["heartbeat_at"] = time.time()
            try:
                self._status["log_bytes"] = os.path.getsize(self._path("task.log"))
            except OSError:
                self._status["log_bytes"] = 0
            write_json(self._path(protocol.STATUS_FILE), self._status)

    def _heartbeat(self) -> None:
        while not self._beat_stop.wait(self.task.heartbeat):
            try:
                self.write_status()
            except OSError:
                pass

    # -- main --------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run the task to the end; returns the process exit code (0 only if it succeeded)."""
        assert self.log is not None, "call start() first"
        become_subreaper()
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, lambda *_: None)  # a dropped SSH session never stops a run
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        self._stamps = tree_stamps(self.task.workdir, self.run_dir)  # what "changed" is measured from (no git)
        if any(step.script is None for step in self.task.steps):  # shell specs are never classified
            classifier, error = load_classifier()
            if classifier is None:
                self.log.line(
                    f"=== runner: WARNING: no rate-limit classifier ({error}); "
                    "agent steps are judged by exit code alone ==="
                )
        model, exit_code, files, acceptance, verification = None, None, [], [], None
        try:
            os.makedirs(self.task.workdir, exist_ok=True)
            status, reason, model, exit_code = self._run_chain()
            self.write_status(step=None, step_pid=None)
            files = files_changed(self.task.workdir, self.run_dir, self._stamps)
            if status == "succeeded" and self.task.acceptance:
                status, reason, acceptance = run_acceptance(self)
            if status == "succeeded" and self.task.verify:
                status, reason, verification = run_verify(self, files)
        except Exception as exc:  # a bug or an unusable workdir: still leave a result behind
            status, reason = "failed", f"runner error: {exc.__class__.__name__}: {exc}"
            for line in traceback.format_exc().splitlines():
                self.log.line(line)
        self._beat_stop.set()
        beat.join(timeout=5)
        ended = time.time()
        self.log.line(f"=== runner: {status}: {reason} ===")
        result = protocol.result_record(
            project=self.task.project,
            task_id=self.task.task_id,
            status=status,
            reason=reason,
            model=model,
            attempts=self.attempts,
            skipped_models=self.skipped,
            exit_code=exit_code,
            started_at=self.started_at,
            ended_at=ended,
            duration=round(ended - self.started_at, 3),
            workdir=self.task.workdir,
            files_changed=files,
            acceptance=acceptance,
            verification=verification,
            log_tail=self.log.tail(),
            runner_version=runner_version(),
            runner_pid=os.getpid(),
            hostname=socket.gethostname(),
        )
        write_json(self._path(protocol.RESULT_FILE), self.log.mask_all(result), sync=True)
        self.write_status(state=status, step=None, step_pid=None, ended_at=ended)
        self.log.close()
        unregister_live(self.run_dir)
        if self.echo:
            print(f"runner: {status} ({reason}); result in {self._path('result.json')}", file=sys.stderr)
        return 0 if status == "succeeded" else 1

    def _run_chain(self) -> tuple[str, str, str | None, int | None]:
        """Run the steps in order; returns (status, reason, model, exit_code)."""
        if not self.task.steps:
            return "failed", "task.json has no steps: nothing to run", None, None
        model, exit_code, passed_over = None, None, []
        for step in self.task.steps:
            if step.name in self.task.skip_models:
                self.skipped.append(step.name)
                self.log.line(f"=== step {step.name} skipped (on cool-down) ===")
                continue
            if self.stop_requested:
                return "killed", "killed before the chain finished", model, exit_code
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return "timeout", f"hard timeout of {self.task.timeout:g}s reached", model, exit_code
            attempt, fall_through = self.run_step(step, len(self.attempts) + 1)
            self.attempts.append(attempt)
            model, exit_code = step.name, attempt["exit_code"]
            verdict, reason = attempt["verdict"], attempt["reason"]
            if verdict == "ok":
                return "succeeded", f"{step.name}: {reason}", model, exit_code
            if verdict == "stalled" and step is not self.task.steps[-1] and step.argv is not None:
                passed_over.append(f"{step.name}: {reason}")  # a hang with no progress: try the next model
                continue
            if verdict in ("timeout", "stalled", "killed"):
                return verdict, f"{step.name}: {reason}", model, exit_code
            if not fall_through:
                return "failed", f"{step.name}: {reason}", model, exit_code
            passed_over.append(f"{step.name}: {verdict}: {reason}")
        if not self.attempts:
            return "failed", "every model is skipped (on cool-down): " + ", ".join(self.skipped), None, None
        return "failed", "no model left to try; " + "; ".join(passed_over), model, exit_code

    def child_env(self, step: Step | None) -> dict[str, str]:
        """A step's environment: the allow-list of ours, the node's env, the task's env without what it may not
        set (`protected_env`: dropped, and named in task.log), then its model's own env and key.

        Shell steps and acceptance commands get no secret at all; an agent step gets `<model>:NAME` of its
        own model only (glm and minimax both take ANTHROPIC_AUTH_TOKEN, each its own), and a plain `NAME`
        (given by hand to `run --secrets-stdin`; the dispatcher always names the model). The DISPATCH_* of
        the task's env are the dispatcher's own (DISPATCH_ATTEMPT, DISPATCH_NODE, DISPATCH_SPEC_FILE).
        """
        env = base_environment(os.environ)
        env.update(self.task.node_env)
        dropped = sorted(k for k in self.task.env if protected_env(k) and not k.startswith("DISPATCH_"))
        if dropped:  # a spec's env that validation refused (an older or hostile dispatcher): names, no values
            self.log.line(f"=== runner: the task's env may not set {', '.join(dropped)} (which program runs, "
                          "where an agent sends its key): dropped; set them in the node's env or the model's "
                          "settings ===")
        env.update((k, v) for k, v in self.task.env.items() if k not in dropped)
        env["DISPATCH_RUN_DIR"] = self.run_dir
        env["DISPATCH_PROJECT"], env["DISPATCH_TASK_ID"] = self.task.project, self.task.task_id
        if step is not None:
            env.update(step.env)
            env["DISPATCH_MODEL"] = step.name
            if step.argv is not None:
                for key, value in self.secrets.items():
                    model, _, name = key.rpartition(":")
                    if (model == step.name or not model) and model != MASK_ONLY:
                        env[name] = value
        return env

    def run_step(self, step: Step, number: int) -> tuple[dict, bool]:
        """Run one step; returns its attempt record and whether the chain may go on to the next."""
        self.log.line(f"=== step {step.name} (attempt {number}) ===")
        attempt: dict[str, Any] = {
            "model": step.name,
            "verdict": "failure",
            "reason": "",
            "reset_at": None,
            "retry_after": None,
            "exit_code": None,
            "started_at": time.time(),
            "ended_at": None,
            "matched": "",
        }
        env = self.child_env(step)
        if step.script is not None:
            script = self._path("script.sh" if number == 1 else f"script-{number}.sh")
            with open(script, "w", encoding="utf-8") as handle:
                handle.write(step.script)
            argv = ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", script]
            attempt["role"] = "shell"  # no agent: no usage to count
        else:
            argv = list(step.argv or [])
        if find_executable(argv[0], env.get("PATH", os.defpath), self.task.workdir) is None:
            what = "bash" if step.script is not None else "agent CLI"
            attempt["reason"] = (
                f"no {what} {argv[0]!r} on PATH for model {step.name}: install it on {socket.gethostname()} "
                f"or fix the model's command (PATH={env.get('PATH', '')})"
            )
            attempt["ended_at"] = time.time()
            self.log.line(f"=== runner: {attempt['reason']} ===")
            return attempt, True
        self.write_status(step=step.name, step_pid=None, attempt=number, retrying=None)
        stdin_path = None
        if step.stdin is not None:  # a prompt in argv is capped at 128 KiB; a file is not
            stdin_path = self._path("prompt.txt")
            descriptor = os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as handle:
                os.fchmod(descriptor, 0o600)
                handle.write(step.stdin)
        outcome = self.process(
            argv,
            env,
            deadline=self._deadline,
            stall_timeout=self.task.stall_timeout,
            on_start=lambda pid: self.write_status(step_pid=pid),
            stdin_path=stdin_path,
            render=step.argv is not None,
            name=step.name,
        )
        attempt["started_at"], attempt["ended_at"] = outcome.started_at, outcome.ended_at
        if outcome.retries:
            attempt["retries"], attempt["last_retry"] = outcome.retries, self.log.mask(outcome.last_retry)
        attempt["exit_code"] = outcome.returncode
        if step.script is None:
            attempt["answer"] = final_message(outcome.output)[-_ANSWER_CAP:]
            attempt["usage"] = outcome.usage
        attempt, fall_through = self._judge(step, attempt, outcome, argv[0])
        if outcome.leftovers:
            attempt["reason"] += f"; {outcome.leftovers}"
        if outcome.survivors:
            attempt["reason"] += f"; WARNING: processes of group {outcome.pgid} survived SIGKILL"
        return attempt, fall_through

    def _judge(self, step: Step, attempt: dict, outcome: Outcome, exe: str) -> tuple[dict, bool]:
        """Fill in the attempt's verdict from how the process ended and what it printed."""
        if outcome.spawn_error is not None:
            attempt["reason"] = f"cannot start {exe!r} for model {step.name}: {outcome.spawn_error}"
            return attempt, True
        if outcome.reason == "timeout":
            attempt["verdict"] = "timeout"
            attempt["reason"] = f"hard timeout of {self.task.timeout:g}s reached; process group killed"
            return attempt, False
        if outcome.reason == "killed":
            attempt["verdict"], attempt["reason"] = "killed", "killed on request; process group killed"
            return attempt, False
        if step.script is not None:  # a shell spec's output is the user's: never a rate limit
            ok = outcome.returncode == 0 and outcome.reason is None
            attempt["verdict"] = "ok" if ok else ("stalled" if outcome.reason else "failure")
            attempt["reason"] = self._stall_reason() if outcome.reason else f"exit code {outcome.returncode}"
            return attempt, False
        verdict = classify(outcome.output, None if outcome.reason else outcome.returncode)
        for key in ("reset_at", "retry_after", "matched"):
            attempt[key] = getattr(verdict, key, attempt[key])
        attempt["verdict"], attempt["reason"] = verdict.kind, self.log.mask(str(verdict.reason))
        if outcome.reason == "retrying":  # it retried by itself past the limit: that model is done for now
            limit = f"gave up after {self.task.retry_limit:g}s of its own retries, last: {outcome.last_retry}"
            if verdict.kind not in _RATE_KINDS:
                attempt["verdict"], attempt["reason"] = "transient", self.log.mask(limit)
            else:
                attempt["reason"] += f" ({self.log.mask(limit)})"
            return attempt, True
        if outcome.reason == "stalled":
            if verdict.kind in _RATE_KINDS:  # it hung on a limit: that model is done, try the next
                attempt["reason"] += f" ({self._stall_reason()})"
                return attempt, True
            attempt["verdict"], attempt["reason"] = "stalled", self._stall_reason()
            return attempt, False
        return attempt, verdict.kind in _RATE_KINDS

    def _stall_reason(self) -> str:
        return f"stalled: no output for {self.task.stall_timeout:g}s; process group killed"

    def process(self, argv: list[str], env: dict[str, str], *, deadline: float | None, stall_timeout: float | None,
                **options: Any) -> Outcome:
        """`supervise.run_process` in this run's workdir, log and status (options: on_start, stdin_path, render,
        name)."""
        assert self.log is not None, "call start() first"
        return run_process(argv, env, cwd=self.task.workdir, log=self.log, write_status=self.write_status,
                           stopping=lambda: self.stop_requested, deadline=deadline, stall_timeout=stall_timeout,
                           retry_limit=self.task.retry_limit, **options)


