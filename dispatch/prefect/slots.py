"""Node slots as leases on the Prefect server: the count two users on two machines share.

`ServerSlots` takes a slot of node `<name>` as a lease on the server's global concurrency limit `node-<name>`
(limit = slots, made by `dispatch nodes sync`, or by `server_limits` of dispatch/prefect/limits.py when a
team-mode dispatcher finds it missing); a background thread renews the leases, and a crashed holder's slots
come back when its lease expires. Each lease is also recorded as a Prefect Variable `dispatch_lease_<id>`
(limit, host, pid, flow run) while it is held, because Prefect's API cannot list a limit's leases: the
guardian releases the lease of a holder that died. It is the `SharedSlots` broker of `dispatch.core.brokers`
in team mode.

Handoff: a spec that ends `park`s its slot instead of releasing it; the next spec this dispatcher starts on
the same node takes the parked lease (`try_acquire`) with no call to the server, so a run that keeps a node
busy pays for its slot once, not per spec (a take, a release, a record written and deleted: four calls). A
parked lease no spec took within `grace` seconds is released by the renewer thread, and the admission step
releases parked leases at once (`trim`) when its fair share needs the room (dispatch/core/admission.py): a
parked lease is held, and counted as held, exactly as a running spec's.

Bursts: the new slots one round of the dispatch loop wants of a node are one lease of k slots
(`try_acquire_many`), so a run's first wave costs a round trip per node, not per spec. A spec's slot is then
a `Slot` of a `_Lease`; see `ServerSlots` for how the idle part of a lease goes back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from dispatch.prefect.errors import SERVER_ERRORS

logger = logging.getLogger(__name__)

_RELEASERS = 4  # threads that record, release and split leases: releases must not queue behind each other
GRACE = 1.0  # seconds a parked slot waits for this dispatcher's next spec on its node before it goes back
_SPLIT_EVERY = 1.0  # seconds between two tries to give back the idle part of a lease whose other slots run


class _Lease:
    """One lease on the server: `size` slots of `node`, each handed to a spec (a `Slot`) or parked (idle, the
    moment it was parked in `parked`, oldest first)."""

    __slots__ = ("lease_id", "node", "size", "slots", "parked", "record", "split_after")

    def __init__(self, lease_id: str, node: str, size: int) -> None:
        self.lease_id, self.node, self.size = lease_id, node, size
        self.slots: set[Slot] = set()  # handed to specs
        self.parked: list[float] = []
        self.record: Future | None = None  # the writing of its record, until released
        self.split_after = 0.0


class Slot:
    """A spec's slot: one of a lease's. The lease it belongs to changes when the idle rest of a lease is
    given back (the running specs' slots move to a smaller lease first)."""

    __slots__ = ("lease",)

    def __init__(self, lease: _Lease) -> None:
        self.lease: _Lease | None = lease

    @property
    def lease_id(self) -> str | None:
        return self.lease.lease_id if self.lease is not None else None

    def __repr__(self) -> str:
        return f"Slot({self.lease_id})"


class ServerSlots:
    """Slots as leases on the Prefect server's global concurrency limits `node-<name>`.

    A burst of starts on one node takes its slots in one lease (`try_acquire_many`: one round trip for k
    slots). A lease goes back whole (the server cannot shrink one), so when some of its slots idle past the
    grace while others run, the running ones move to a new lease of their number first, and the old one
    goes back after it (`_split`): a running spec is always counted on the server, and idle slots wait at
    most a grace (plus a second per try while the node is full) before another dispatcher can have them.

    Args:
        limits: node name -> limit name, for nodes whose limit exists on the server.
        lease_seconds: how long a lease lives without renewal (a dead dispatcher's slots return after it).
        grace: seconds a parked slot is kept for the next spec on its node before it is released.
        client: a Prefect sync client (default: a new one, closed by `close`).
    """

    def __init__(self, limits: dict[str, str], lease_seconds: float = 60.0, *, grace: float = GRACE,
                 client: object = None) -> None:
        from prefect.client.orchestration import get_client

        self._own_client = client is None
        self._client: Any = get_client(sync_client=True) if client is None else client
        if self._own_client:
            self._client.__enter__()
        self._limits = limits
        self._lease_seconds, self._grace = lease_seconds, grace
        self._leases: dict[str, list[_Lease]] = {}  # node -> its held leases
        self.handoffs = 0  # slots handed from an ended spec to the next without the server
        self._releasing = 0  # slots given back that the server has not answered for yet
        self._lock = threading.RLock()  # reentrant: once closed, a release runs in the thread that holds it
        self._stop = threading.Event()
        self._warned_at = 0.0
        self._releaser = ThreadPoolExecutor(max_workers=_RELEASERS, thread_name_prefix="slot-lease-release")
        self._renewer = threading.Thread(target=self._renew, name="slot-lease-renewer", daemon=True)
        self._renewer.start()
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "flow_run_id": str(context.flow_run.id) if context and context.flow_run else None}

    # -- taking --------------------------------------------------------------------------------------
    def try_acquire(self, node: str) -> Slot | None:
        """A slot of `node`: a parked one of this dispatcher's if there is one (no server call), else a new
        lease from the server; None when the node is full or the server cannot be reached."""
        parked = self.take_parked(node)
        if parked is not None:
            return parked
        taken = self.try_acquire_many(node, 1)
        return taken[0] if taken else None

    def try_acquire_many(self, node: str, count: int) -> list[Slot]:
        """Up to `count` new slots of `node` in one lease: one round trip when the node has room for all,
        else fewer (halving, a round trip each); [] when it has none or the server cannot be reached."""
        want = max(count, 0)
        while want > 0:
            lease_id = self._lease(node, want)
            if lease_id is None:
                return []
            if lease_id:
                lease = _Lease(lease_id, node, want)
                with self._lock:
                    taken = [Slot(lease) for _ in range(want)]
                    lease.slots.update(taken)
                    self._hold(lease)
                return taken
            want //= 2
        return []

    def _lease(self, node: str, slots: int) -> str | None:
        """A new lease of `slots` slots of `node`: its id, '' when the node has not that many free, None when
        the server cannot be asked."""
        try:
            response = self._client.increment_concurrency_slots_with_lease(
                names=[self._limits[node]], slots=slots, mode="concurrency", lease_duration=self._lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:  # not that many free: other dispatchers hold the slots
                return ""
            if exc.response.status_code == 422 and slots > 1:  # more than the limit (it shrank): ask for fewer
                return ""
            self._warn(f"cannot take a slot of {self._limits[node]} from the server ({exc}); trying again shortly")
            return None
        except SERVER_ERRORS as exc:  # never place without the shared count: wait for the server
            self._warn(f"cannot reach the server for a slot of {self._limits[node]} ({exc}); trying again shortly")
            return None
        return str(response.json()["lease_id"])

    def _hold(self, lease: _Lease) -> None:
        """(Under the lock.) Count `lease` as held, and record it in the background."""
        self._leases.setdefault(lease.node, []).append(lease)
        lease.record = self._submit(self._record, lease.lease_id, lease.node, lease.size)

    def _record(self, lease_id: str, node: str, size: int) -> None:
        from prefect.client.schemas.actions import VariableCreate

        value = {"lease_id": lease_id, "limit": self._limits[node], "node": node, "slots": size,
                 "since": time.time(), **self._holder}
        try:
            self._client.create_variable(VariableCreate(name=lease_record(lease_id), value=value,
                                                        tags=["dispatch-lease"]))
        except SERVER_ERRORS as exc:  # the lease still works; only the guardian cannot see it
            logger.warning("could not record slot lease %s: %s", lease_id, exc)

    def _warn(self, message: str) -> None:
        """Say it at most every 30 s: the dispatch loop asks again every 0.2 s while the server is away."""
        now = time.monotonic()
        if now - self._warned_at >= 30.0:
            self._warned_at = now
            logger.warning("%s", message)

    # -- handing over ------------------------------------------------------------------------------
    def releasing(self) -> int:
        """Slots given back that the server still counts as held (their release not answered yet)."""
        with self._lock:
            return self._releasing

    def take_parked(self, node: str) -> Slot | None:
        """A slot of `node` parked by an ended spec (a handoff: no server call), or None. From the lease with
        the most slots running, so that idle leases empty and go back whole."""
        with self._lock:
            leases = [lease for lease in self._leases.get(node, ()) if lease.parked]
            if not leases:
                return None
            lease = max(leases, key=lambda held: (len(held.slots), held.parked[-1]))
            lease.parked.pop()  # the newest: the oldest go back first
            slot = Slot(lease)
            lease.slots.add(slot)
            self.handoffs += 1
            return slot

    def park(self, token: object, at: float | None = None) -> None:
        """Keep an ended spec's slot for this dispatcher's next spec on its node, for `grace` seconds."""
        with self._lock:
            lease = token.lease if isinstance(token, Slot) else None
            if lease is None or token not in lease.slots:
                return  # not held (any more): nothing to keep
            lease.slots.discard(token)
            token.lease = None
            lease.parked.append(time.monotonic() if at is None else at)
            lease.parked.sort()

    def parked(self) -> dict[str, int]:
        """Parked slots by node (held on the server, waiting for a spec)."""
        with self._lock:
            counts = {node: sum(len(lease.parked) for lease in leases) for node, leases in self._leases.items()}
        return {node: count for node, count in counts.items() if count}

    # -- giving back -------------------------------------------------------------------------------
    def release(self, token: object) -> None:
        """Give the slot back now (in the background: the dispatch loop must not wait on the server)."""
        self.park(token, at=float("-inf"))
        for lease in self._sweep(time.monotonic()):
            self._submit(self._split, lease)

    def trim(self, count: int, keep: dict[str, int] | None = None) -> int:
        """Give back up to `count` parked slots now, the oldest first, keeping `keep[node]` parked on each node
        (slots a pick of this round is about to take); returns how many went back at once (the idle part of
        a lease with running slots goes back after those move to a new lease, in the background)."""
        keep = keep or {}
        released, splits = 0, []
        with self._lock:
            for node, leases in self._leases.items():
                spare = min(sum(len(lease.parked) for lease in leases) - keep.get(node, 0), count - released)
                for lease in sorted(leases, key=lambda held: held.parked[0] if held.parked else float("inf")):
                    if spare <= 0:
                        break
                    if not lease.parked:
                        continue
                    if not lease.slots and len(lease.parked) <= spare:
                        spare -= lease.size
                        released += lease.size
                        self._give_back(lease)
                        continue
                    stale = min(spare, len(lease.parked))
                    lease.parked[:stale] = [float("-inf")] * stale
                    spare -= stale
                    splits.append(lease)
        for lease in splits:
            self._submit(self._split, lease)
        return released

    def _submit(self, work: Any, *args: Any) -> Future | None:
        """Hand `work` to the releasing threads; once `close` has stopped them, do it here."""
        try:
            return self._releaser.submit(work, *args)
        except RuntimeError:  # shut down: a split or release finishing during close
            work(*args)
            return None

    def _give_back(self, lease: _Lease) -> None:
        """(Under the lock.) Release `lease` in the background; the lease first, its record after."""
        leases = self._leases.get(lease.node, [])
        if lease not in leases:
            return
        leases.remove(lease)
        for slot in lease.slots:
            slot.lease = None
        record, lease.record = lease.record, None
        self._releasing += lease.size
        if record is not None and record.cancel():
            record = None  # never written: nothing to remove
        self._submit(self._release_now, lease.lease_id, lease.size, record)

    def _release_now(self, lease_id: str, size: int, record: Future | None) -> None:
        try:
            self._client.release_concurrency_slots_with_lease(lease_id=lease_id)
        except SERVER_ERRORS as exc:  # the lease expires by itself; say so and carry on
            logger.warning("could not release slot lease %s: %s", lease_id, exc)
            return
        finally:
            with self._lock:
                self._releasing -= size
        if record is None:
            return
        from prefect.exceptions import ObjectNotFound

        record.result()  # being written by another thread (submitted first, so never still queued)
        try:
            self._client.delete_variable_by_name(lease_record(lease_id))
        except (ObjectNotFound, *SERVER_ERRORS) as exc:  # the guardian removes a record left behind
            logger.debug("could not remove the record of slot lease %s: %s", lease_id, exc)

    def _sweep(self, now: float) -> list[_Lease]:
        """Give back the leases whose every slot idled past the grace; returns the leases with slots past
        the grace and others still in use, due for a split."""
        due = []
        with self._lock:
            for leases in self._leases.values():
                for lease in list(leases):
                    stale = sum(1 for at in lease.parked if now - at >= self._grace)
                    if not stale:
                        continue
                    if not lease.slots and stale == len(lease.parked):
                        self._give_back(lease)
                    elif now >= lease.split_after:
                        lease.split_after = now + _SPLIT_EVERY
                        due.append(lease)
        return due

    def _split(self, lease: _Lease) -> None:
        """Give back the idle part of `lease`: its slots in use (running, or parked within the grace) move to
        a new lease of their number, then the old lease goes back whole. Tried again later when the node has
        no room for the new lease (the old one still counts every slot meanwhile)."""
        moment = time.monotonic()
        with self._lock:
            kept = len(lease.slots) + sum(1 for at in lease.parked if moment - at < self._grace)
            if lease not in self._leases.get(lease.node, ()) or kept >= lease.size:
                return
            if kept == 0:
                self._give_back(lease)
                return
        lease_id = self._lease(lease.node, kept)
        if not lease_id:
            return  # the node is full (or the server away): the sweep tries again in a second
        smaller = _Lease(lease_id, lease.node, kept)
        with self._lock:
            running = len(lease.slots)
            if lease not in self._leases.get(lease.node, ()) or running > kept:  # closed, or specs took more
                self._leases.setdefault(smaller.node, []).append(smaller)
                self._give_back(smaller)
                return
            smaller.slots, lease.slots = lease.slots, set()
            for slot in smaller.slots:
                slot.lease = smaller
            smaller.parked = lease.parked[len(lease.parked) - (kept - running):] if kept > running else []
            self._hold(smaller)
            self._give_back(lease)

    def _renew(self) -> None:
        """Give back parked slots past their grace, and renew every held lease each third of its life."""
        tick = max(min(self._grace / 2, self._lease_seconds / 3), 0.05)
        renewed_at = time.monotonic()
        while not self._stop.wait(tick):
            for lease in self._sweep(time.monotonic()):
                self._split(lease)
            if time.monotonic() - renewed_at < self._lease_seconds / 3:
                continue
            renewed_at = time.monotonic()
            with self._lock:
                lease_ids = [lease.lease_id for leases in self._leases.values() for lease in leases]
            for lease_id in lease_ids:
                try:
                    self._client.renew_concurrency_lease(lease_id=lease_id, lease_duration=self._lease_seconds)
                except SERVER_ERRORS as exc:
                    logger.warning("could not renew slot lease %s: %s", lease_id, exc)

    def close(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=30)
        with self._lock:
            for leases in list(self._leases.values()):
                for lease in list(leases):
                    self._give_back(lease)
        self._releaser.shutdown(wait=True)
        if self._own_client:
            self._client.__exit__(None, None, None)


def lease_record(lease_id: object) -> str:
    """The name of the Prefect Variable that records a held slot lease (`dispatch_lease_<uuid hex>`)."""
    return "dispatch_lease_" + str(lease_id).replace("-", "")
