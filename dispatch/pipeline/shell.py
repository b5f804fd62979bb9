"""The pipeline's shell steps (install, build, test commands): exactly the environment given, output masked and
streamed into the run's logs, bounded by a timeout that ends the step's whole process group.

A step is a `bash -c` of ours in its own session, with `env` as its whole environment (never this process's
with names removed: a name a shell cannot `unset`, such as `MY-API-KEY`, would slip through). Callers build
that environment from the node runner's step allow-list (`workspace.step_environment`). Its stderr is merged
into its stdout, so the tail we report holds both in order; every line goes through the pipeline's `Masker`
(`masking.pipeline_masker`) before it is logged or kept.

prefect-shell's `ShellOperation` did this until it could not: it always starts from this process's
environment, and it logs each line before we can mask it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from contextvars import copy_context
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core.secrets import Masker
from dispatch.pipeline.masking import pipeline_masker

_TAIL_LINES = 40
_MAX_LINE = 64 * 1024
_STOP_GRACE = 5.0
logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one shell step did."""

    name: str
    command: str
    exit_code: int | None
    duration: float
    timed_out: bool = False
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line: what ran and how it ended."""
        if self.timed_out:
            return f"{self.name}: `{self.command}` timed out after {self.duration:.0f}s"
        return f"{self.name}: `{self.command}` exited {self.exit_code} in {self.duration:.1f}s"


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to process group `pgid`, if it still exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(process: subprocess.Popen, grace: float = _STOP_GRACE) -> None:
    """End `process`'s group (it leads its own session): TERM, then KILL after `grace` seconds. Safe twice."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_group(process.pid, signal.SIGKILL)  # children that ignored TERM or outlived the leader
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def masked_lines(stream, masker: Masker):
    """The lines of a binary `stream`, decoded, right-stripped and masked (empty ones skipped)."""
    for raw in iter(lambda: stream.readline(_MAX_LINE), b""):
        line = masker.mask(raw.decode(errors="replace").rstrip())
        if line:
            yield line


def run_step(name: str, command: str, *, cwd: Path, env: dict[str, str], timeout: float,
             masker: Masker | None = None) -> StepResult:
    """Run `command` under bash in `cwd` with exactly `env` (plus what bash sets), streaming its output.

    Args:
        name: what the step is, for the logs and the report ("install", "compile", ...).
        command: a bash command line.
        cwd: its working directory.
        env: its whole environment.
        timeout: seconds; past them the step's process group is ended.
        masker: what masks its output (default: the pipeline's).

    Returns:
        The exit code (None when killed by the timeout), the duration and the last lines of output, masked.
    """
    masker = masker if masker is not None else pipeline_masker()
    log = _run_logger()
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    process = subprocess.Popen(["bash", "-c", f"set -o pipefail\n{command}"], cwd=cwd, env=dict(env),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def pump() -> None:
        for line in masked_lines(process.stdout, masker):
            tail.append(line)
            log.info("%s: %s", name, line)

    reader = threading.Thread(target=copy_context().run, args=(pump,), daemon=True, name=f"step-{name}")
    reader.start()
    timed_out = False
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # the whole group, also after a normal exit: a background child must not outlive its step
        stop_group(process)
        reader.join(10)
        if not reader.is_alive():  # else a detached child still holds the pipe: closing would block on the read
            process.stdout.close()
    return StepResult(name=name, command=command, exit_code=None if timed_out else process.returncode,
                      duration=time.monotonic() - started, timed_out=timed_out, tail=list(tail))


def quote(value: str | Path) -> str:
    """`value` quoted for bash."""
    return shlex.quote(str(value))
