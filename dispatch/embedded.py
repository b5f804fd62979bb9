"""Temporary Prefect servers of the embedded default that a killed dispatcher left behind.

Embedded `dispatch start` talks to a temporary Prefect server that Prefect runs as a child process
(uvicorn on 127.0.0.1) and stops when the dispatcher exits. A dispatcher killed with SIGKILL, or by
the OOM killer, cannot stop it: the server lives on, re-parented to PID 1, holding ~100 MiB and a port
for nothing. The next `dispatch start` on the same `PREFECT_HOME` stops such orphans.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

_SERVER_MARK = b"prefect.server.api.server:create_app"


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def orphaned_servers(prefect_home: str) -> list[int]:
    """Pids of temporary Prefect servers under `prefect_home` whose dispatcher is gone (parent PID 1).

    A server whose parent lives (another dispatcher's, or one under a subreaper) is never listed.
    """
    marker = f"PREFECT_HOME={prefect_home}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if _SERVER_MARK not in handle.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker not in handle.read():
                    continue
        except OSError:  # gone, or not ours to read
            continue
        if _parent(pid) == 1:
            found.append(pid)
    return found


def reap_orphaned_servers(prefect_home: str) -> list[int]:
    """Stop (SIGTERM) the orphaned temporary servers under `prefect_home`; returns their pids."""
    stopped = []
    for pid in orphaned_servers(prefect_home):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as exc:
            logger.warning("could not stop the orphaned Prefect server %d: %s", pid, exc)
            continue
        stopped.append(pid)
    return stopped
