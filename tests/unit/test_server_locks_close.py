"""Closing the server's lock table (dispatch/prefect/server_locks.py) without a server: a client of our own records
calls.

A run hung forever in CI (issue 19): the garbage collector ran the table's finalizer on a thread that was
inside the Prefect client's connection pool, and the finalizer's delete waited for that same pool. The table is
now closed explicitly; one that is collected unclosed only stops renewing (its locks expire by their lease).
"""

from __future__ import annotations

import gc
import threading
import time

from dispatch.prefect.server_locks import ServerLocks


class _Client:
    """Stands in for a SyncPrefectClient: every call needs the `pool` lock, as httpx's pool does."""

    def __init__(self) -> None:
        self.pool = threading.Lock()
        self.calls: list[str] = []
        self.stuck = threading.Event()  # a call could not get the pool: in the product that is a deadlock

    def _call(self, what: str) -> None:
        if not self.pool.acquire(timeout=2):
            self.stuck.set()
            return
        try:
            self.calls.append(what)
        finally:
            self.pool.release()

    def delete_variable_by_name(self, name: str) -> None:
        self._call(f"delete {name}")

    def update_variable(self, update: object) -> None:
        self._call("update")

    def __exit__(self, *exc_info: object) -> None:
        self.calls.append("exit")


def _holding(client: _Client, lease: float = 30.0) -> ServerLocks:
    locks = ServerLocks("scope", project="p", run_id="r", holder="alice@host", lease_seconds=lease, client=client)
    locks._table.hold("dispatch_lock_scope__one", {"patterns": ["a.py"], "task_id": "S01"})
    return locks


def test_a_collected_table_sends_nothing_and_joins_nothing_even_inside_the_clients_pool() -> None:
    client = _Client()
    locks = _holding(client)
    table = locks._table
    with client.pool:  # the main thread is inside a client call when the collector runs (the CI hang)
        del locks
        gc.collect()
    assert not client.stuck.is_set(), "the finalizer waited for the client's pool: the run would hang"
    assert client.calls == [], "a finalizer must not talk to the server"
    assert table.abandoned, "a collected table stops renewing, so its locks expire by their lease"


def test_the_renewer_of_a_collected_table_ends_and_renews_no_more() -> None:
    client = _Client()
    locks = _holding(client, lease=0.3)
    renewer = locks._table.renewer
    assert renewer is not None and renewer.is_alive()
    del locks
    gc.collect()
    renewer.join(timeout=5)
    assert not renewer.is_alive()
    renewed = client.calls.count("update")
    time.sleep(0.3)
    assert client.calls.count("update") == renewed
    assert not any(call.startswith("delete") for call in client.calls)


def test_close_gives_the_locks_back_and_closes_the_client_once() -> None:
    client = _Client()
    with _holding(client) as locks:
        locks._table.hold("dispatch_lock_scope__two", {"patterns": ["b.py"], "task_id": "S02"})
    assert sorted(client.calls) == ["delete dispatch_lock_scope__one", "delete dispatch_lock_scope__two", "exit"]
    assert locks.held == {}
    locks.close()  # a second close does nothing
    assert client.calls.count("exit") == 1
