"""Server file locks asked ahead: taken for the specs next in line while the specs they wait on still run.

In team mode a spec with `modifies` pays two round trips to the server's lock table before it starts (write,
then read: dispatch/prefect/server_locks.py). When a spec starts, the specs that wait on it and on nothing else
still to run (`Scheduler.next_up`) will be ready when it ends; asking for their locks now takes those round
trips off their start. Only while the run is alone in its lock table (`LockServer.alone`): then a lock set
asked ahead keeps nobody waiting. A set not used within `HOLD` seconds, or once another run shows up, goes
back (`sweep`), so another user's spec waits for one at most that long. Inside the run the lock sets asked
ahead hold nothing back: the run's own lock table keeps its specs apart, and the server table passes over a
run's own locks.

Prefect-free: the lock table is anything with `try_acquire`, `release` and `alone` (admission.py's LockServer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from dispatch.core.spec_state import READY, WAITING

if TYPE_CHECKING:
    from dispatch.core.scheduler import Scheduler
    from dispatch.core.specs import Spec

logger = logging.getLogger(__name__)

MOST = 16  # lock sets asked ahead and not yet used, at most
HOLD = 5.0  # seconds a lock set asked ahead waits for its spec to be picked before it goes back
ASKERS = 2  # helper threads of their own (a pick's own request never queues behind one asked ahead); no request
# waits for them either: asked late, a set is more often asked twice than early


class LocksAhead:
    """The lock sets asked ahead for one project run.

    Args:
        locks: the server's lock table.
        scheduler: the run's scheduler (which specs are next in line, which will not start).
        specs: the project's specs by id.
        clock: monotonic time, injectable for tests.
    """

    def __init__(self, locks: Any, scheduler: Scheduler, specs: Mapping[str, Spec],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.locks, self.scheduler, self.specs, self._clock = locks, scheduler, specs, clock
        self._sets: dict[str, tuple[str | None, float]] = {}  # task id -> (token, None while asked; when granted)
        self._lock = threading.Lock()  # `_sets` is answered from the helper threads
        self._tried: set[str] = set()  # asked ahead once: never again (a refusal waits its turn as usual)
        self._askers = ThreadPoolExecutor(max_workers=ASKERS, thread_name_prefix="server-locks-ahead")

    def started(self, task_id: str) -> None:
        """`task_id` started: ask for the locks of the specs next in line behind it (on the dispatch loop)."""
        if not self.locks.alone():
            return
        for child in self.scheduler.next_up(task_id):
            patterns = list(self.specs[child].modifies)
            if not patterns or child in self._tried or len(self._sets) >= MOST:
                continue
            if sum(token is None for token, _ in list(self._sets.values())) >= ASKERS:
                return  # both askers busy: a queued request would answer too late to help (and load the server)
            self._tried.add(child)
            with self._lock:
                self._sets[child] = (None, 0.0)
            self._askers.submit(self._ask, child, patterns)

    def _ask(self, task_id: str, patterns: list[str]) -> None:
        """In a helper thread: the table's answer, kept when still wanted (the spec was not picked meanwhile),
        else given back at once."""
        try:
            answer = self.locks.try_acquire(task_id, patterns)
            token = answer.token if answer else None
        except Exception:  # the table answers its errors itself: this is a bug, said with its stack
            logger.exception("asking ahead for the locks of %s failed; it asks when it is picked", task_id)
            token = None
        with self._lock:
            wanted = task_id in self._sets
            if wanted and token:
                self._sets[task_id] = (token, self._clock())
            else:
                self._sets.pop(task_id, None)
        if token and not wanted:
            self.locks.release(token)

    def take(self, task_id: str) -> str | None:
        """A picked spec's lock set asked ahead, now its own (None: none granted; one still being asked goes back
        when it is answered, and the spec asks the usual way)."""
        if not self._sets:
            return None
        with self._lock:
            token, _ = self._sets.pop(task_id, (None, 0.0))
        return token

    def sweep(self, everything: bool = False) -> None:
        """Give back the sets that waited `HOLD` seconds, whose spec will not start (skipped, cancelled), or all
        of them once another run is in the table (or `everything`). On the dispatch loop."""
        if not self._sets:
            return
        now, alone = self._clock(), not everything and self.locks.alone()
        with self._lock:
            stale = [(task_id, token) for task_id, (token, at) in self._sets.items() if token is not None and (
                not alone or now - at > HOLD or self.scheduler.state(task_id) not in (WAITING, READY))]
            for task_id, _ in stale:
                del self._sets[task_id]
        for _, token in stale:
            self.locks.release(token)

    def pending(self) -> dict[str, str | None]:
        """Task id -> its token (None while asked): what is out now."""
        with self._lock:
            return {task_id: token for task_id, (token, _) in self._sets.items()}

    def close(self) -> None:
        """Wait for the requests still out, then give every set back."""
        self._askers.shutdown(wait=True)
        self.sweep(everything=True)
