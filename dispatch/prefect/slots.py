"""Node slots as leases on the Prefect server: the count two users on two machines share.

`ServerSlots` takes a slot of node `<name>` as a lease on the server's global concurrency limit `node-<name>`
(limit = slots, made by `dispatch nodes sync`, or by `server_limits` when a team-mode dispatcher finds it
missing); a background thread renews the leases, and a crashed holder's slots come back when its lease
expires. Each lease is also recorded as a Prefect Variable `dispatch_lease_<id>` (limit, host, pid, flow run)
while it is held, because Prefect's API cannot list a limit's leases: the guardian releases the lease of a
holder that died. It is the `SharedSlots` broker of `dispatch.core.brokers` in team mode.

Handoff: a spec that ends `park`s its slot instead of releasing it; the next spec this dispatcher starts on
the same node takes the parked lease (`try_acquire`) with no call to the server, so a run that keeps a node
busy pays for its slot once, not per spec (a take, a release, a record written and deleted: four calls). A
parked lease no spec took within `grace` seconds is released by the renewer thread, and the admission step
releases parked leases at once (`trim`) when its fair share needs the room (dispatch/core/admission.py): a
parked lease is held, and counted as held, exactly as a running spec's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

from dispatch.core.brokers import SHARED_TRANSPORTS
from dispatch.core.errors import ConfigError
from dispatch.prefect.errors import SERVER_ERRORS

if TYPE_CHECKING:
    from dispatch.core.nodes import Node

logger = logging.getLogger(__name__)

_RELEASERS = 4  # threads that record and release leases: releases must not queue behind each other
GRACE = 1.0  # seconds a parked slot waits for this dispatcher's next spec on its node before it is released


class ServerSlots:
    """Slots as leases on the Prefect server's global concurrency limits `node-<name>`.

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
        self._leases: dict[object, str] = {}  # held lease -> its node (parked ones included)
        self._parked: dict[str, list[tuple[object, float]]] = {}  # node -> (lease, parked at), oldest first
        self.handoffs = 0  # slots handed from an ended spec to the next without the server
        self._records: dict[object, Future] = {}  # lease -> the creation of its record, until released
        self._releasing = 0  # releases asked for that the server has not answered yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned_at = 0.0
        self._releaser = ThreadPoolExecutor(max_workers=_RELEASERS, thread_name_prefix="slot-lease-release")
        self._renewer = threading.Thread(target=self._renew, name="slot-lease-renewer", daemon=True)
        self._renewer.start()
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "flow_run_id": str(context.flow_run.id) if context and context.flow_run else None}

    def try_acquire(self, node: str) -> object | None:
        """A slot of `node`: a parked one of this dispatcher's if there is one (no server call), else a new
        lease from the server; None when the node is full or the server cannot be reached."""
        parked = self.take_parked(node)
        if parked is not None:
            return parked
        try:
            response = self._client.increment_concurrency_slots_with_lease(
                names=[self._limits[node]], slots=1, mode="concurrency", lease_duration=self._lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:  # the limit is full: another dispatcher holds the slots
                return None
            self._warn(f"cannot take a slot of {self._limits[node]} from the server ({exc}); trying again shortly")
            return None
        except SERVER_ERRORS as exc:  # never place without the shared count: wait for the server
            self._warn(f"cannot reach the server for a slot of {self._limits[node]} ({exc}); trying again shortly")
            return None
        lease_id = response.json()["lease_id"]
        with self._lock:
            self._leases[lease_id] = node
            self._records[lease_id] = self._releaser.submit(self._record, lease_id, node)
        return lease_id

    def _record(self, lease_id: str, node: str) -> None:
        from prefect.client.schemas.actions import VariableCreate

        value = {"lease_id": str(lease_id), "limit": self._limits[node], "node": node, "since": time.time(),
                 **self._holder}
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

    def releasing(self) -> int:
        """Slots given back that the server still counts as held (their release not answered yet)."""
        with self._lock:
            return self._releasing

    def take_parked(self, node: str) -> object | None:
        """A slot of `node` parked by an ended spec (a handoff: no server call), or None."""
        with self._lock:
            parked = self._parked.get(node)
            if not parked:
                return None
            self.handoffs += 1
            return parked.pop()[0]  # the newest: the oldest go back first

    def park(self, token: object) -> None:
        """Keep an ended spec's slot for this dispatcher's next spec on its node, for `grace` seconds."""
        with self._lock:
            node = self._leases.get(token)
            if node is not None:
                self._parked.setdefault(node, []).append((token, time.monotonic()))
                return
        self.release(token)  # not held (any more): nothing to keep

    def parked(self) -> dict[str, int]:
        """Parked slots by node (held on the server, waiting for a spec)."""
        with self._lock:
            return {node: len(leases) for node, leases in self._parked.items() if leases}

    def trim(self, count: int, keep: dict[str, int] | None = None) -> int:
        """Release up to `count` parked slots now, the oldest first, keeping `keep[node]` parked on each node
        (slots a pick of this round is about to take); returns how many were released."""
        keep = keep or {}
        with self._lock:
            spare = [(at, node) for node, leases in self._parked.items()
                     for _, at in leases[:max(len(leases) - keep.get(node, 0), 0)]]
        released = 0
        for _, node in sorted(spare)[:max(count, 0)]:
            with self._lock:
                leases = self._parked.get(node)
                if not leases or len(leases) <= keep.get(node, 0):
                    continue
                token = leases.pop(0)[0]
            self.release(token)
            released += 1
        return released

    def _release_stale(self) -> None:
        """Release the parked slots no spec took within the grace."""
        now = time.monotonic()
        with self._lock:
            stale = [lease for leases in self._parked.values() for lease, at in leases if now - at >= self._grace]
            for node, leases in self._parked.items():
                self._parked[node] = [(lease, at) for lease, at in leases if now - at < self._grace]
        for lease in stale:
            self.release(lease)

    def release(self, token: object) -> None:
        """Give the slot back in the background: the dispatch loop must not wait on the server.

        The lease goes first and its record after: a release never waits behind records of other leases
        (several threads), and a lease released before its record was written gets none."""
        with self._lock:
            self._leases.pop(token, None)
            record = self._records.pop(token, None)
            self._releasing += 1
        if record is not None and record.cancel():
            record = None  # never written: nothing to remove
        self._releaser.submit(self._release_now, token, record)

    def _release_now(self, token: object, record: Future | None) -> None:
        try:
            self._client.release_concurrency_slots_with_lease(lease_id=token)
        except SERVER_ERRORS as exc:  # the lease expires by itself; say so and carry on
            logger.warning("could not release slot lease %s: %s", token, exc)
            return
        finally:
            with self._lock:
                self._releasing -= 1
        if record is None:
            return
        from prefect.exceptions import ObjectNotFound

        record.result()  # being written by another thread (submitted first, so never still queued)
        try:
            self._client.delete_variable_by_name(lease_record(token))
        except (ObjectNotFound, *SERVER_ERRORS) as exc:  # the guardian removes a record left behind
            logger.debug("could not remove the record of slot lease %s: %s", token, exc)

    def _renew(self) -> None:
        """Release parked slots past their grace, and renew every held lease each third of its life."""
        tick = max(min(self._grace / 2, self._lease_seconds / 3), 0.05)
        renewed_at = time.monotonic()
        while not self._stop.wait(tick):
            self._release_stale()
            if time.monotonic() - renewed_at < self._lease_seconds / 3:
                continue
            renewed_at = time.monotonic()
            with self._lock:
                leases = list(self._leases)
            for lease_id in leases:
                try:
                    self._client.renew_concurrency_lease(lease_id=lease_id, lease_duration=self._lease_seconds)
                except SERVER_ERRORS as exc:
                    logger.warning("could not renew slot lease %s: %s", lease_id, exc)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            leases = list(self._leases)
            self._parked.clear()
        for lease_id in leases:
            self.release(lease_id)
        self._releaser.shutdown(wait=True)
        if self._own_client:
            self._client.__exit__(None, None, None)


def lease_record(lease_id: object) -> str:
    """The name of the Prefect Variable that records a held slot lease (`dispatch_lease_<uuid hex>`)."""
    return "dispatch_lease_" + str(lease_id).replace("-", "")


def server_limits(nodes: list[Node], log: logging.Logger | logging.LoggerAdapter = logger) -> dict[str, str]:
    """Node name -> limit name `node-<name>` on the Prefect server, for every node other dispatchers share
    (ssh, worker): a missing limit is created from the node's slots (and `log` says so), because a node
    placed on without it would be counted by this dispatcher alone.

    Args:
        nodes: the cluster's nodes.
        log: where to say which limits were created (the flow passes its run logger).

    Raises:
        ConfigError: a node's limit exists but is inactive (not enforced); the message says how to enable it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    found: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for node in nodes:
            if node.transport not in SHARED_TRANSPORTS:
                continue
            try:
                limit = client.read_global_concurrency_limit_by_name(node.pool)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=node.pool,
                                                                                        limit=node.slots))
                except ObjectAlreadyExists:  # another dispatcher made it a moment ago
                    limit = client.read_global_concurrency_limit_by_name(node.pool)
                else:
                    log.warning("node %s had no concurrency limit %s on the Prefect server, so other dispatchers "
                                "would not share its slot count: created it with limit %d (its slots); "
                                "`dispatch nodes sync` keeps pools and limits in step with nodes.json",
                                node.name, node.pool, node.slots)
                    found[node.name] = node.pool
                    continue
            if not limit.active:
                raise ConfigError(f"node {node.name}: its concurrency limit {node.pool} on the Prefect server is "
                                  f"inactive, so slots would not be shared; enable it with `prefect "
                                  f"global-concurrency-limit enable {node.pool}`")
            if limit.limit != node.slots:
                log.warning("node %s: concurrency limit %s allows %d at once but nodes.json says %d slots; "
                            "`dispatch nodes sync` sets it to the slots", node.name, node.pool, limit.limit,
                            node.slots)
            found[node.name] = limit.name
    return found
