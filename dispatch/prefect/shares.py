"""The fair-share board of a team: one Prefect Variable per run, `dispatch_share_<run id>`.

Renewed every few seconds and read by every dispatcher of the team (team mode: other users on other machines);
a variable not renewed for `_SERVER_STALE` seconds by the server's clock counts no more, and is deleted by
whoever sees it. It is the `ShareBoard` of `dispatch.core.shares` in team mode (`MachineShares` on one machine).

Staleness (issue 22: every call costs the server ~15 ms of CPU): the board is read every `_SERVER_INTERVAL`
(2 s); this run's entry is rewritten on that tick when its demand or holding changed, else renewed every
`_SERVER_STALE / 3` (5 s); a run that starts wanting slots or stops wanting any is written at once. So another
run sees a change at most ~4 s late (its read plus ours). The share only divides slots; it never guards a node
or a file: the server's concurrency limits keep nodes from overfilling and the lock table keeps files apart
whatever the board says, so a stale board can delay a fair split by those seconds but break no guarantee.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from dispatch.core.shares import weight_of
from dispatch.prefect.errors import SERVER_ERRORS

logger = logging.getLogger(__name__)

_SERVER_INTERVAL = 2.0  # seconds between two reads of the server's share variables (in the background)
_SERVER_STALE = 15.0  # a share variable not renewed for this long belongs to a dead dispatcher
_PREFIX = "dispatch_share_"


class ServerShares:
    """The share board of a team: a Prefect Variable per run, published and read by a background thread (the
    dispatch loop never waits on the server; it uses the last answer).

    Args:
        run_id: this run's id.
        project, user, weight: as for `MachineShares`.
        client: a Prefect sync client (default: a new one, closed by `close`).
        interval: seconds between two reads (and renewals) of the board.
    """

    def __init__(self, run_id: str, *, project: str, user: str, weight: float = 1.0, client: Any = None,
                 interval: float = _SERVER_INTERVAL) -> None:
        if client is None:
            from prefect.client.orchestration import get_client

            client = get_client(sync_client=True)
            client.__enter__()
            self._own_client = True
        else:
            self._own_client = False
        self.client, self.run_id, self.interval = client, run_id, interval
        self.name = f"{_PREFIX}{run_id}"
        self._entry = {"project": project, "user": user, "weight": weight, "run_id": run_id}
        self._state = (0, 0)
        self._written: tuple[int, int] | None = None
        self._written_at = 0.0
        self._others: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="share-board", daemon=True)
        self._thread.start()

    def publish(self, demand: int, held: int) -> None:
        with self._lock:
            if (demand, held) != self._state:
                if (demand > 0) != (self._state[0] > 0):  # starts or stops wanting slots: say so now
                    self._changed.set()
                self._state = (demand, held)

    def others(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return dict(self._others)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._changed.clear()  # before the sync: a change published during it wakes the next wait
            try:
                self._sync()
            except SERVER_ERRORS as exc:  # the last answer stands; say so at debug level (it retries)
                logger.debug("share board: %s", exc)
            self._changed.wait(self.interval)

    def _sync(self) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate

        with self._lock:
            state = self._state
        now = time.monotonic()
        if state != self._written or now - self._written_at >= _SERVER_STALE / 3:
            value = {**self._entry, "demand": state[0], "held": state[1]}
            if self._written is None:
                self.client.create_variable(VariableCreate(name=self.name, value=value, tags=["dispatch-share"]))
            else:
                self.client.update_variable(VariableUpdate(name=self.name, value=value))
            self._written, self._written_at = state, now
        response = self.client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": _PREFIX}}, "limit": 200})
        try:
            server_now = parsedate_to_datetime(response.headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            server_now = time.time()
        found: dict[str, tuple[int, float]] = {}
        for raw in response.json():
            name, value = raw.get("name", ""), raw.get("value")
            if not name.startswith(_PREFIX) or name == self.name or not isinstance(value, dict):
                continue
            renewed = raw.get("updated") or raw.get("created")
            try:
                age = server_now - _timestamp(renewed)
            except (TypeError, ValueError):
                continue
            if age > _SERVER_STALE:
                self._delete(name)
                continue
            demand = value.get("demand")
            if isinstance(demand, int) and not isinstance(demand, bool) and demand > 0:
                found[name[len(_PREFIX):]] = (demand, weight_of(value.get("weight")))
        with self._lock:
            self._others = found

    def _delete(self, name: str) -> None:
        try:
            self.client.delete_variable_by_name(name)
        except SERVER_ERRORS as exc:
            logger.debug("share board: could not delete %s: %s", name, exc)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=5)
        if self._written is not None:
            self._delete(self.name)
        if self._own_client:
            self.client.__exit__(None, None, None)


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
