"""Processes on the node: a step's process group and session, the runner's leftovers, pids read from /proc.

Linux first (/proc, prctl through ctypes), with a fallback where there is no /proc. Standard library only,
Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Any

from . import protocol
from .rundir import read_json

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL to a process group
POLL = 0.1
RUNNER_PROCESS_NAME = b"dispatch-runner"  # a detached runner's process name (`ps -e`, /proc/<pid>/comm)
# what a runner's command line holds: the zipapp (nodes, the local node), the package run in place, or the
# single-file runner of the versions before the zipapp (a node may still run one when the dispatcher upgrades)
_RUNNER_MARKS = (protocol.RUNNER_FILE.encode(), b"dispatch.runner", b"node_runner.py")


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, session) of a live pid from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def session_members(pgid: int) -> list[tuple[int, str]] | None:
    """(pid, state) of every process in process group or session ``pgid``; None without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    if "self" not in names:
        return None
    members = []
    for name in names:
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and pgid in (stat[1], stat[2]):
                members.append((int(name), stat[0]))
    return members


def signal_group(pgid: int, sig: int) -> None:
    """Signal a step's process group, plus any process that moved to another group of its session."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid, _state in session_members(pgid) or []:
        stat = proc_stat(pid)
        if stat is not None and stat[1] != pgid:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def group_alive(pgid: int, proc: subprocess.Popen | None = None) -> bool:
    """Whether any non-zombie process of the group (or its session) remains; reaps zombies we own.

    For our own step (`proc`, reaped) on a subreaper runner, no child at all means nothing of its session is
    left: every member descends from the step, and an orphan comes back to us. That answer costs one read of
    /proc/self instead of a scan of every process on the node."""
    if proc is not None:
        proc.poll()
        if proc.returncode is not None and _SUBREAPER[0] and not _has_children():
            return False
    members = session_members(pgid)
    if members is None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    alive = False
    for pid, state in members:
        if state == "Z":
            if proc is None or pid != proc.pid:  # an orphan re-parented to us (subreaper)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        else:
            alive = True
    return alive


def terminate_group(pgid: int, proc: subprocess.Popen | None = None) -> bool:
    """SIGTERM the group, SIGKILL it after the grace; True if nothing of it survives."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 2.0)):
        if not group_alive(pgid, proc):
            return True
        signal_group(pgid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not group_alive(pgid, proc):
                return True
            time.sleep(POLL)
    return not group_alive(pgid, proc)


def pid_alive(pid: Any) -> bool:
    """Whether ``pid`` is a live (not zombie) process of ours running a runner (`_RUNNER_MARKS`)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command_line = handle.read()
    except OSError:
        return stat is None  # no /proc (not Linux): trust kill(pid, 0)
    return any(mark in command_line for mark in _RUNNER_MARKS)


def become_subreaper() -> None:
    """Linux: adopt orphaned descendants, so that killed background children are reaped by us, and children
    that detach (`setsid`, a double fork) come back to us to be killed when their step ends."""
    _SUBREAPER[0] = _prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER


_LIBC: list = []  # [(ctypes, libc)] once loaded, [None] where there is no C library to load


def load_libc() -> Any:
    """(ctypes, the C library), loaded once per process; None where they cannot be. `serve` loads them before
    it forks any runner, so a runner does not pay ~4 ms to load them again."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append((ctypes, ctypes.CDLL(None, use_errno=True)))
        except (OSError, ImportError):
            _LIBC.append(None)
    return _LIBC[0]


def _prctl(option: int, value: Any) -> int | None:
    """Linux prctl(2); None where there is none."""
    loaded = load_libc()
    if loaded is None:
        return None
    ctypes, libc = loaded
    try:
        return libc.prctl(option, ctypes.c_char_p(value) if isinstance(value, bytes) else value, 0, 0, 0)
    except AttributeError:
        return None


_SUBREAPER = [False]  # whether this process is a child subreaper (set by `become_subreaper`)


def _has_children() -> bool:
    """Whether this process has any child (cheap: /proc/self/task/*/children; True when that cannot be read)."""
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as handle:
                if handle.read().strip():
                    return True
    except OSError:
        return True
    return False


def _descendants(root: int) -> dict[int, str]:
    """Live (not zombie) descendants of `root`, pid -> state, read from /proc; our zombie children are reaped."""
    children: dict[int, list[tuple[int, str]]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read().decode("ascii", "replace")
            fields = raw[raw.rfind(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append((int(name), fields[0]))
        except (OSError, IndexError, ValueError):
            continue
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for pid, state in children.get(stack.pop(), []):
            if state == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # not ours (a grandchild): its parent reaps it
                    pass
                continue
            found[pid] = state
            stack.append(pid)
    return found


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            text = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"
    return text[:200] or "?"


def kill_leftovers() -> tuple[str, bool]:
    """Kill every process still descending from this runner (SIGTERM, SIGKILL after the grace).

    Run when a step has ended and been reaped, so whatever is left escaped its process group and session:
    a daemon that double-forked with `setsid`, re-parented to us by `become_subreaper`. Returns the report
    ("killed N leftover processes: pid cmd, ...", or "") and whether any outlived SIGKILL.
    """
    found = _descendants(os.getpid()) if _has_children() else {}
    if not found:
        return "", False
    described = [f"{pid} {_command_line(pid)}" for pid in sorted(found)]
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 2.0)):
        for pid in found:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + wait
        while found and time.monotonic() < end:
            time.sleep(POLL)
            found = _descendants(os.getpid())
        if not found:
            break
    return f"killed {len(described)} leftover processes: {', '.join(described)}", bool(found)


def set_process_name(name: bytes) -> None:
    """Linux: the name `ps -e` and `top` show (a runner forked by `serve` would otherwise look like it)."""
    _prctl(15, name[:15])  # PR_SET_NAME


def find_executable(exe: str, path: str, cwd: str) -> str | None:
    if os.sep in exe:
        full = exe if os.path.isabs(exe) else os.path.join(cwd, exe)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    return shutil.which(exe, path=path)


def belongs_to_run(pgid: int, run_dir: str) -> bool:
    """Whether the group's processes carry this run's DISPATCH_RUN_DIR (guards against pid reuse)."""
    marker = f"DISPATCH_RUN_DIR={run_dir}\0".encode()
    members = session_members(pgid)
    if members is None:
        return True
    for pid, _state in members:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker in handle.read():
                    return True
        except OSError:
            continue
    return False


def orphan_step(run_dir: str) -> int | None:
    """The process group of this run's step if it outlived its runner, else None."""
    step_pid = (read_json(os.path.join(run_dir, protocol.STATUS_FILE)) or {}).get("step_pid")
    if isinstance(step_pid, int) and step_pid > 0 and group_alive(step_pid) and belongs_to_run(step_pid, run_dir):
        return step_pid
    return None


def close_inherited(keep: tuple[int, ...]) -> None:
    """Close every descriptor above stderr but `keep` (a runner forked by `serve` must not hold its channel)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def reap_children() -> None:
    """Reap the runners `serve` forked that have ended (their results are read from their run directories)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
