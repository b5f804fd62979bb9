"""The protocol between the dispatcher and its node runner, written once for both sides.

Standard library only, Python 3.8 or newer: it is shipped to every node inside the runner's zipapp, and the
dispatcher's side (the transports, the guardian's probe) imports it as ``dispatch.runner.protocol``. It holds:

- a run directory's files (``<root>/<project>/tasks/<task_id>/``) and the fields of each: the task the
  dispatcher writes, the status and result the runner writes, the events ``serve`` answers with;
- ``result_record``: the one shape of a ``result.json``, whoever writes it (the runner, a refused task,
  ``kill`` closing the books of a runner that died);
- the liveness test: a runner lives exactly while it holds its run directory's ``flock`` (the kernel drops
  it when the runner exits, even as a zombie or after SIGKILL);
- the runner's version: the sha256 of its zipapp, and where a node keeps that version
  (``<root>/.runner/<first 16 hex digits>/runner.pyz``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Any

# -- a run directory ------------------------------------------------------------------------------------------

TASK_FILE = "task.json"
"""Written by the dispatcher before the runner starts (no secrets: those travel on the runner's stdin)."""
STATUS_FILE = "status.json"
"""The runner's state and heartbeat, rewritten atomically at each change and every `heartbeat` seconds."""
RESULT_FILE = "result.json"
"""The outcome, written atomically once, before the final status.json."""
LOG_FILE = "task.log"
"""Merged stdout and stderr of every step and acceptance command, secrets masked."""
EVENTS_FILE = "events.jsonl"
"""An agent step's JSON events, whole and masked."""
LOCK_FILE = ".runner.lock"
"""Held (``flock``) by the live runner for its whole run; it holds the runner's pid as text."""

TASK_FIELDS = (
    "project", "task_id", "workdir", "timeout", "stall_timeout", "retry_limit", "heartbeat", "env", "node_env",
    "steps", "skip_models", "acceptance", "acceptance_timeout", "verify", "cache_key", "run_id", "attempt", "fresh",
)  # fmt: skip
"""task.json's keys. The runner reads the first 14; the last 4 tell the dispatcher's agents which attempt it is."""

STATUS_FIELDS = (
    "state", "runner_pid", "step", "step_pid", "started_at", "heartbeat", "project", "task_id", "heartbeat_at",
    "log_bytes", "attempt", "retrying", "ended_at",
)  # fmt: skip
"""status.json's keys. `state` is "running" until the run ends, then one of `FINAL_STATES`."""

FINAL_STATES = ("succeeded", "failed", "timeout", "stalled", "killed", "acceptance_failed", "rejected")
"""How a run ends: the final `state` of status.json and the `status` of result.json."""

RESULT_FIELDS = (
    "project", "task_id", "status", "reason", "model", "attempts", "skipped_models", "exit_code", "started_at",
    "ended_at", "duration", "workdir", "files_changed", "acceptance", "verification", "log_tail", "runner_version",
    "runner_pid", "hostname",
)  # fmt: skip
"""result.json's keys, in the order `result_record` writes them."""

SERVE_EVENTS = ("started", "attached", "log", "result", "recovered", "earlier", "full", "error")
"""The events `runner.pyz serve` answers a request with (`serve._Agent` says what each carries)."""


def result_record(
    *,
    project: str | None,
    task_id: str | None,
    status: str,
    reason: str,
    runner_version: str,
    started_at: float | None,
    ended_at: float,
    duration: float | None,
    **fields: Any,
) -> dict[str, Any]:
    """A result.json: every key of `RESULT_FIELDS`, in that order; a key not given is empty (None or []).

    Raises:
        TypeError: a key that is no field of result.json (a typo would otherwise never reach the dispatcher).
    """
    unknown = sorted(set(fields) - set(RESULT_FIELDS))
    if unknown:
        raise TypeError(f"result_record: {', '.join(unknown)} is no field of {RESULT_FILE}")
    given = dict(fields, project=project, task_id=task_id, status=status, reason=reason,
                 runner_version=runner_version, started_at=started_at, ended_at=ended_at, duration=duration)
    lists = ("attempts", "skipped_models", "files_changed", "acceptance")
    defaults = {"log_tail": ""}
    return {key: given[key] if key in given else [] if key in lists else defaults.get(key)
            for key in RESULT_FIELDS}


# -- liveness: the run directory's flock ---------------------------------------------------------------------


def runner_alive(run_dir: str) -> bool:
    """Whether a runner holds `run_dir`'s lock: a probe that takes a shared lock and drops it at once."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK); any other failure is taken for alive too: never judged dead unseen
        return True
    finally:
        os.close(fd)
    return False


def wait_runner_gone(run_dir: str) -> None:
    """Block until no runner holds `run_dir`'s lock (at once when there is no lock file).

    No polling, and no waiting for anyone to reap the runner: the kernel frees the lock at its exit. Unbounded
    by design: call it from a thread the caller stops waiting for (e.g. `threading.Event.wait(timeout)`).
    """
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def lock_holder(run_dir: str) -> int | None:
    """The pid the runner holding (or last holding) `run_dir`'s lock wrote into it; None if none is written."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE), encoding="ascii") as handle:
            return int(handle.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


# -- the runner's version and where a node keeps it -----------------------------------------------------------

RUNNER_FILE = "runner.pyz"
"""The runner as shipped: one zipapp (`dispatch/runner/zipapp.py`), run as ``python3 runner.pyz <command>``."""

RUNNER_DIR = ".runner"
"""Under a node's run root: one directory per runner version, `.runner/<version_dir(version)>/runner.pyz`."""


def checksum(path: str) -> str:
    """sha256 of a file's bytes: of the runner's zipapp, the runner's version (`runner_version`).

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def version_dir(runner_version: str) -> tuple[str, str]:
    """The parts of a runner version's directory under a node's run root: (".runner", first 16 hex digits)."""
    return RUNNER_DIR, runner_version[:16]
