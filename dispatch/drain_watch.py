"""A running dispatcher's view of the drained nodes (dispatch/drain.py), refreshed off the dispatch loop.

The dispatcher reads the drained set once when it starts, then a daemon thread reads it again every
`drain_refresh` seconds (a file in embedded mode, one Prefect Variable in team mode) and hands a change to
the dispatch loop as an event, so the loop never waits on the server. A read that fails keeps the last
set known (a server that blinks neither drains nor undrains anything).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx

from dispatch.drain import drained_nodes
from dispatch.settings import DispatchSettings

logger = logging.getLogger(__name__)
# What a failed read raises: no server, a refused or failed request, a damaged answer.
_READ_ERRORS = (httpx.HTTPError, OSError, RuntimeError, ValueError)


def read_drained(settings: DispatchSettings, log: logging.Logger | logging.LoggerAdapter | None = None,
                 ) -> dict[str, dict] | None:
    """The drained nodes now, or None (said on `log`) when they cannot be read."""
    try:
        return drained_nodes(settings)
    except _READ_ERRORS as exc:
        (log or logger).warning("could not read the drained nodes: %s", exc)
        return None


class DrainWatch:
    """Reads the drained nodes every `interval` seconds in a daemon thread; calls `on_change` with the new
    `{node: {"reason", "by", "since"}}` when the set of drained names changes.

    Args:
        settings: where the drained set lives (embedded file or team server).
        known: the set already read (e.g. at the flow's start); only changes from it are reported.
        on_change: called from the watcher thread; it must not block (put an event on a queue).
        interval: seconds between reads.
    """

    def __init__(self, settings: DispatchSettings, known: dict[str, dict], on_change: Callable[[dict[str, dict]], None],
                 interval: float) -> None:
        self._settings = settings
        self._names = set(known)
        self._on_change = on_change
        self._interval = interval
        self._stopped = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="drain-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                drained = drained_nodes(self._settings)
            except _READ_ERRORS as exc:
                if not self._failing:  # once per outage, not every few seconds
                    logger.warning("could not read the drained nodes (keeping the last known): %s", exc)
                self._failing = True
                continue
            self._failing = False
            if set(drained) != self._names:
                self._names = set(drained)
                self._on_change(drained)

    def close(self) -> None:
        """Stop the thread (it ends within one interval; it is a daemon, so it never holds the process)."""
        self._stopped.set()
