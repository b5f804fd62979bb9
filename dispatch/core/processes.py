"""The dispatcher's view of this machine's processes, through psutil: environments, parents, marked ones.

The local Prefect server, the pipeline's apps and the test rigs mark the processes they start with an
environment variable (`DISPATCH_LOCAL_SERVER=<home>`, `DISPATCH_PIPELINE_APP=<run dir>`, ...), so that a
process found later is recognised as ours even when its pid was recycled. A process that is gone, a zombie,
or another user's that cannot be read has no environment here, so it is never taken for ours.

`pid_alive` answers whether a recorded pid (a run's state, a server's) still lives. The node runner
(`dispatch/runner/`) is standard-library code shipped to nodes and reads `/proc` itself.
"""

from __future__ import annotations

import os

import psutil


def environ_of(pid: int) -> dict[str, str]:
    """The environment of process `pid` ({} when it is gone, a zombie, or not ours to read)."""
    try:
        return psutil.Process(pid).environ()
    except (psutil.Error, ValueError):  # ValueError: a negative pid
        return {}


def carries(pid: int, name: str, value: str) -> bool:
    """Whether process `pid` runs with `name=value` in its environment."""
    return environ_of(pid).get(name) == value


def parent_of(pid: int) -> int | None:
    """The parent pid of process `pid` (None when it is gone or cannot be read)."""
    try:
        return psutil.Process(pid).ppid()
    except (psutil.Error, ValueError):
        return None


def carrying(name: str, value: str, *, cmdline_has: str | None = None) -> list[int]:
    """The pids of the processes other than this one that run with `name=value` in their environment.

    Args:
        name: the environment variable.
        value: its value, exactly.
        cmdline_has: also require this text in one argument of the command line (checked first: cheaper).
    """
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid == os.getpid():
            continue
        if cmdline_has is not None and not any(cmdline_has in arg for arg in process.info["cmdline"] or ()):
            continue
        if carries(process.pid, name, value):
            found.append(process.pid)
    return found


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie awaiting its parent counts as exited)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone (a ZombieProcess error is one too)
        return False
    except psutil.AccessDenied:  # another user's: it exists
        return True
