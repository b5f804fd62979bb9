"""A step's process, supervised: run in its own session, output streamed to task.log, limits enforced
(hard deadline, stall, an agent's own retries), its process group and leftovers killed and reaped.

Also the rate-limit classifier (`ratelimits`), loaded once and only where a run needs it.
Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .events import UsageMeter, parse_event, render_event
from .log import Log, Tail, cut
from .procs import KILL_GRACE, POLL, group_alive, kill_leftovers, signal_group, terminate_group
from .rundir import CHUNK

_LEFTOVER_GRACE = 1.0  # after a step exits, how long its background children may hold the output pipe
_EVENT_LINE_MAX = 4 << 20  # an agent's JSON event is kept whole up to this size (a shell line: CHUNK)
_CLASSIFY_TAIL = 1 << 20  # characters of a step's output kept for the rate-limit classifier


@dataclass
class Outcome:
    """How one process (step or acceptance command) ended."""

    returncode: int | None = None
    reason: str | None = None  # None, "timeout", "stalled" or "killed" (the runner killed it)
    output: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    spawn_error: str | None = None
    pgid: int = 0
    survivors: bool = False  # some process of its group outlived SIGKILL
    leftovers: str = ""  # "killed N leftover processes: pid cmd, ..." (detached descendants), or ""
    usage: dict | None = None  # what an agent step said it used (UsageMeter), None when it printed nothing
    retries: int = 0  # lines where the agent CLI said it retries by itself (ratelimits.retry_notice)
    last_retry: str = ""  # the last of them, e.g. "429, retrying 2/10"


@dataclass(frozen=True)
class ExitVerdict:
    """Stands in for ratelimits.Verdict when the classifier is missing or raised."""

    kind: str
    reason: str
    reset_at: float | None = None
    retry_after: float | None = None
    matched: str = ""


_LOADED: list[tuple[Any, str]] = []


def load_classifier() -> tuple[Any, str]:
    """The ratelimits module (or None) and why it did not import, loaded once: only `run` needs them.

    Never raises: under a node's python that cannot import it, agent steps are judged by exit code alone."""
    if not _LOADED:
        try:
            from . import ratelimits

            _LOADED.append((ratelimits, ""))
        except Exception as exc:  # also SyntaxError & co. from a copy written for a newer python
            _LOADED.append((None, f"{exc.__class__.__name__}: {exc}"))
    return _LOADED[0]


def retry_reader() -> Any:
    """The classifier's `retry_notice` (None when no classifier imports, or an older copy lacks it)."""
    classifier, _ = load_classifier()
    return getattr(classifier, "retry_notice", None)


def classify(output: str, exit_code: int | None) -> Any:
    """ratelimits.classify, or an exit-code verdict when the classifier is missing or broken."""
    classifier, error = load_classifier()
    if classifier is not None:
        try:
            return classifier.classify(output, exit_code)
        except Exception as exc:
            note = f"classifier error {exc.__class__.__name__}: {exc}"
    else:
        note = f"rate-limit classifier unavailable under python {sys.version.split()[0]}: {error}"
    if exit_code == 0:
        return ExitVerdict("ok", f"exit code 0 ({note})")
    return ExitVerdict("failure", f"exit code {exit_code} ({note})")


def _record(log: Log, meter: UsageMeter | None, text: str, render: bool) -> str:
    """Write one line of a step's output; returns it masked, as printed (what the classifier reads)."""
    event = parse_event(text) if render else None
    if event is not None and meter is not None:
        for warning in meter.add(event):
            log.line(warning)
    shown = render_event(text, event) if event is not None else None
    if shown is None:
        return log.line(text)
    return log.event(text, shown)


def run_process(
    argv: list[str],
    env: dict[str, str],
    *,
    cwd: str,
    log: Log,
    write_status: Callable[..., None],
    stopping: Callable[[], bool],
    deadline: float | None,
    retry_limit: float | None = None,
    stall_timeout: float | None,
    on_start: Any = None,
    stdin_path: str | None = None,
    render: bool = False,
    name: str = "",
) -> Outcome:
    """Run argv in its own session, stream its output to task.log, enforce the limits, reap it all.

    With `render` (agent steps), JSON events are written to task.log readably and to events.jsonl whole,
    and the lines where the CLI says it retries by itself (`retry_notice`) are shown as "=== runner:
    <name>: 429, retrying 2/10 ===" and in status.json (`retrying`), count as no progress for the stall
    check, and end the step once they have gone on for `retry_limit` seconds without progress.

    Args:
        cwd: where it runs (the task's workdir).
        log: task.log.
        write_status: updates status.json (`retrying`).
        stopping: whether a stop was asked for (the runner's SIGTERM): the process group is killed.
        deadline: `time.monotonic()` past which it is killed (hard timeout), if any.
        on_start: called with its pid once it runs.
        stdin_path: a file opened as its stdin (the prompt), else /dev/null.
    """
    outcome = Outcome(started_at=time.time())
    meter = UsageMeter() if render else None
    stdin = os.open(stdin_path, os.O_RDONLY) if stdin_path else subprocess.DEVNULL  # the prompt, if any
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        outcome.spawn_error, outcome.ended_at = str(exc), time.time()
        log.line(f"=== runner: cannot start {argv[0]!r}: {exc} ===")
        return outcome
    finally:
        if stdin_path:
            os.close(stdin)
    pgid = outcome.pgid = proc.pid
    if on_start is not None:
        on_start(proc.pid)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    tail = Tail(_CLASSIFY_TAIL)
    pending = b""
    longest = _EVENT_LINE_MAX if render else CHUNK
    last_output = time.monotonic()
    retrying_since: float | None = None  # when the CLI began retrying by itself, until its next progress
    notice_of = retry_reader() if render else None
    exited_at = term_at = gone_at = None
    eof = sent_kill = False
    while True:
        now = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if term_at is None:
            why = None
            if exited_at is None:
                if stopping():
                    outcome.reason, why = "killed", "kill requested"
                elif deadline is not None and now >= deadline:
                    outcome.reason, why = "timeout", "hard timeout reached"
                elif stall_timeout is not None and now - last_output >= stall_timeout:
                    outcome.reason, why = "stalled", f"no output for {stall_timeout:g}s"
                elif retrying_since is not None and retry_limit is not None and now - retrying_since >= retry_limit:
                    outcome.reason = "retrying"
                    why = f"{name} retried by itself for {retry_limit:g}s without progress; moving on"
            elif not eof and now - exited_at >= _LEFTOVER_GRACE:
                why = "step exited but its background processes hold its output"
            if why is not None:
                log.line(f"=== runner: {why}; killing process group {pgid} ===")
                signal_group(pgid, signal.SIGTERM)
                term_at = now
        if term_at is not None and not sent_kill and now - term_at >= KILL_GRACE:
            if group_alive(pgid, proc):
                signal_group(pgid, signal.SIGKILL)
            sent_kill = True
        if eof and exited_at is not None:
            break
        if exited_at is not None and term_at is not None and not eof:
            # the pipe is held by a process that left the session: do not wait for it forever
            if group_alive(pgid, proc):
                gone_at = None
            elif gone_at is None:
                gone_at = now
            elif now - gone_at >= 2.0:
                break
        ready, _, _ = select.select([fd], [], [], POLL)
        if not ready:
            continue
        data = os.read(fd, CHUNK)
        if not data:
            eof = True
            continue
        pending += data
        *lines, pending = pending.split(b"\n")
        if len(pending) >= longest:  # a long line goes in pieces; a secret across a cut is kept whole
            piece, pending = cut(log.mask_bytes(pending), log.overlap)
            lines.append(piece)
        progressed = not lines  # part of a line is output all the same
        for raw in lines:
            text = raw.decode("utf-8", "replace")
            notice = notice_of(text) if notice_of is not None else None
            tail.add(_record(log, meter, text, render))
            if notice is None:
                progressed = True
                continue
            outcome.retries += 1
            outcome.last_retry = notice
            retrying_since = retrying_since or time.monotonic()
            write_status(retrying=log.mask(f"{name}: {notice}"))
            log.line(f"=== runner: {name}: {notice} ===")
        if progressed:
            last_output = time.monotonic()
            if retrying_since is not None:
                retrying_since = None
                write_status(retrying=None)
    if pending:
        tail.add(_record(log, meter, pending.decode("utf-8", "replace"), render))
    proc.stdout.close()
    outcome.returncode = proc.wait()
    if group_alive(pgid, proc):
        if outcome.reason is None:
            log.line(f"=== runner: step left background processes in group {pgid}; killing them ===")
        if not terminate_group(pgid, proc):
            outcome.survivors = True
            log.line(f"=== runner: WARNING: processes of group {pgid} survived SIGKILL ===")
    outcome.leftovers, survived = kill_leftovers()
    if outcome.leftovers:
        log.line(f"=== runner: {outcome.leftovers} ===")
    if survived:
        outcome.survivors = True
        log.line("=== runner: WARNING: leftover processes survived SIGKILL ===")
    outcome.output, outcome.ended_at = tail.text(), time.time()
    outcome.usage = meter.usage() if meter is not None else None
    return outcome
