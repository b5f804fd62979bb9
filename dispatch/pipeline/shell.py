"""The pipeline's shell steps (install, build, test commands) through prefect-shell, bounded by a timeout.

`ShellOperation` streams each line into the run's logs but has no timeout of its own: the step waits in a
thread and, past its time, `close()` ends the step's whole process group (TERM, then KILL). Its stderr is
merged into its stdout (`exec 2>&1`) so the tail we report holds both, in order.

The step's environment is built by us: `ShellOperation` starts from this process's environment, so the
step's script first unsets every variable outside the step allow-list (agent keys and tokens never reach
an install or a test command), then sets ours.
"""

from __future__ import annotations

import os
import re
import shlex
import threading
import time
from collections import deque
from contextvars import copy_context
from dataclasses import dataclass, field
from pathlib import Path

_TAIL_LINES = 40
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def _unset_line(env: dict[str, str]) -> str:
    names = sorted(n for n in os.environ if n not in env and _IDENTIFIER.fullmatch(n))
    return f"unset {' '.join(names)}" if names else ":"


def run_step(name: str, command: str, *, cwd: Path, env: dict[str, str], timeout: float) -> StepResult:
    """Run `command` under bash in `cwd` with exactly `env` (plus what bash sets), streaming its output.

    Args:
        name: what the step is, for the logs and the report ("install", "compile", ...).
        command: a bash command line.
        cwd: its working directory.
        env: its whole environment.
        timeout: seconds; past them the step's process group is ended.

    Returns:
        The exit code (None when killed by the timeout), the duration and the last lines of output.
    """
    from prefect_shell import ShellOperation

    started = time.monotonic()
    outcome: dict[str, object] = {}
    script = ["exec 2>&1", _unset_line(env), "set -o pipefail", command]
    operation = ShellOperation(commands=script, env=env, working_dir=cwd, log_prefix=f"{name}: ")
    with operation:
        process = operation.trigger()

        def wait() -> None:
            try:
                process.wait_for_completion()
            except RuntimeError as exc:  # prefect-shell's "failed with return code N"
                outcome["error"] = str(exc)

        waiter = threading.Thread(target=copy_context().run, args=(wait,), daemon=True, name=f"step-{name}")
        waiter.start()
        waiter.join(timeout)
        timed_out = waiter.is_alive()
        # leaving the block closes the operation: the step's process group gets TERM, then KILL
    waiter.join(10)
    lines = deque((line for line in process.fetch_result() if line), maxlen=_TAIL_LINES)
    return StepResult(name=name, command=command, exit_code=None if timed_out else process.return_code,
                      duration=time.monotonic() - started, timed_out=timed_out, tail=list(lines))


def quote(value: str | Path) -> str:
    """`value` quoted for bash."""
    return shlex.quote(str(value))
