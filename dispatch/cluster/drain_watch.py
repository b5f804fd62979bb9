"""A running dispatcher's view of the drained nodes (dispatch/core/drain.py), refreshed off the dispatch loop.

The dispatcher reads the drained set once when it starts, then a daemon thread reads it again every
`drain_refresh` seconds (a file in embedded mode, one Prefect Variable in team mode) and hands a change to
the dispatch loop as an event, so the loop never waits on the server. A read that fails keeps the last
set known (a server that blinks neither drains nor undrains anything).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from dispatch.core.drain import drained_nodes
from dispatch.core.settings import DispatchSettings
from dispatch.prefect.client import kept_client
from dispatch.prefect.drained import drained_store
from dispatch.prefect.errors import API_ERRORS

logger = logging.getLogger(__name__)
DRAINED_WAIT = "waiting: node(s) drained"
_CHECK_INTERVAL = 0.5  # seconds between two looks for ready specs that wait only on drained nodes


def read_drained(settings: DispatchSettings, log: logging.Logger | logging.LoggerAdapter | None = None,
                 ) -> dict[str, dict] | None:
    """The drained nodes now, or None (said on `log`) when they cannot be read."""
    try:
        return drained_nodes(drained_store(settings))
    except API_ERRORS as exc:
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
        self._store = drained_store(settings)
        self._team = not settings.embedded  # the set is the server's: one client for every read
        self._names = set(known)
        self._on_change = on_change
        self._interval = interval
        self._stopped = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="drain-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with kept_client(self._team):
            self._watch()

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                drained = drained_nodes(self._store)
            except API_ERRORS as exc:
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


class _Scheduler(Protocol):
    def set_drained(self, names: set[str]) -> None: ...
    def drained_waiting(self) -> dict[str, list[str]]: ...


class RunDrain:
    """One project run's side of draining: the scheduler told of the drained set, changes logged, and the
    ready specs that wait only for drained nodes named in their rows (and once in the progress view).

    Args:
        settings: where the drained set lives.
        scheduler: places no spec on a drained node (`set_drained`) and names the specs that wait for one.
        nodes: this run's node names (only they are logged about).
        log: the run's logger.
        post: puts the new drained set on the dispatch loop's queue (called from the watcher thread).
        emit: the progress view's `emit(kind, task_id, reason=...)`.
    """

    def __init__(self, settings: DispatchSettings, scheduler: _Scheduler, nodes: set[str],
                 log: logging.Logger | logging.LoggerAdapter, post: Callable[[dict[str, dict]], None],
                 emit: Callable[..., None]) -> None:
        self._scheduler, self._nodes, self._log, self._emit = scheduler, nodes, log, emit
        self.drained: dict[str, dict] = read_drained(settings, log) or {}
        scheduler.set_drained(set(self.drained))
        for name in sorted(set(self.drained) & nodes):
            log.warning("node %s is drained (%s, by %s): no spec of this run is placed there until it is "
                        "undrained", name, self.drained[name]["reason"], self.drained[name]["by"])
        self._waits: dict[str, list[str]] = {}  # ready specs whose row says they wait for drained nodes
        self._checked = float("-inf")
        self._watch = DrainWatch(settings, self.drained, post, settings.drain_refresh)

    def changed(self, drained: dict[str, dict]) -> None:
        """The drained set changed: drained nodes get no new spec (their running specs finish), undrained
        ones are used again at once."""
        before, self.drained = set(self.drained), drained
        self._scheduler.set_drained(set(drained))
        for name in sorted((set(drained) - before) & self._nodes):
            self._log.warning("node %s drained (%s, by %s): no new spec goes there; its running specs finish",
                              name, drained[name]["reason"], drained[name]["by"])
        for name in sorted((before - set(drained)) & self._nodes):
            self._log.info("node %s undrained: back in service", name)
        self._checked = float("-inf")

    def note_waits(self, rows: dict[str, Any]) -> None:
        """Say in their `rows` (task id -> row with a `reason`) which ready specs wait only for drained nodes."""
        now = time.monotonic()
        if (not self.drained and not self._waits) or now - self._checked < _CHECK_INTERVAL:
            return
        self._checked = now
        waiting = self._scheduler.drained_waiting()
        for task_id in self._waits.keys() - waiting.keys():
            if rows[task_id].reason.startswith(DRAINED_WAIT):
                rows[task_id].reason = ""
        for task_id, names in waiting.items():
            rows[task_id].reason = f"{DRAINED_WAIT} ({', '.join(names)})"
        nodes = sorted({n for names in waiting.values() for n in names})
        if nodes and nodes != sorted({n for names in self._waits.values() for n in names}):
            self._log.warning("%d ready spec(s) wait: every node that fits them is drained (%s)", len(waiting),
                              ", ".join(nodes))
            self._emit("waiting", "", reason=f"node(s) drained ({', '.join(nodes)}): {len(waiting)} ready spec(s) "
                                             f"wait for them")
        self._waits = waiting

    def close(self) -> None:
        self._watch.close()
