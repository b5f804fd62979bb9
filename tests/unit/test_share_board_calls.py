"""The team's share board costs the server a bounded number of calls (issue 22): this run's entry is rewritten
at most once per read interval however often its demand changes, and at once when it starts wanting slots."""

from __future__ import annotations

import threading
import time

from dispatch.prefect.shares import ServerShares


class _Board:
    headers: dict[str, str] = {}

    def json(self) -> list[object]:
        return []


class CountingClient:
    def __init__(self) -> None:
        self.writes: list[float] = []
        self.reads = 0
        self._lock = threading.Lock()

    def create_variable(self, variable: object) -> None:
        with self._lock:
            self.writes.append(time.monotonic())

    update_variable = create_variable

    def request(self, method: str, path: str, json: object = None) -> _Board:
        with self._lock:
            self.reads += 1
        return _Board()

    def delete_variable_by_name(self, name: str) -> None:
        pass


def test_a_busy_runs_entry_is_written_at_most_once_per_interval_and_a_new_demand_at_once() -> None:
    import prefect.client.schemas.actions  # noqa: F401  # imported by the board's first write: seconds on a busy box

    client = CountingClient()
    board = ServerShares("run1", project="p", user="alice@a", client=client, interval=1.0)
    try:
        assert _wait_for(lambda: len(client.writes) == 1)  # the first entry (nothing wanted yet)
        time.sleep(0.05)
        asked = time.monotonic()
        board.publish(5, 0)  # starts wanting slots: written without waiting for the next read (~1 s)
        assert _wait_for(lambda: len(client.writes) == 2), client.writes
        assert client.writes[1] - asked < 0.6, client.writes[1] - asked
        started = time.monotonic()
        for held in range(1, 61):  # a spec starts every 20 ms for 1.2 s
            board.publish(5 + held, held)
            time.sleep(0.02)
        time.sleep(1.1)
        during = [at for at in client.writes if at > started]
        elapsed = time.monotonic() - started
        assert 1 <= len(during) <= elapsed / 1.0 + 1, f"{len(during)} writes in {elapsed:.2f} s"
        assert client.reads <= elapsed / 1.0 + 4
    finally:
        board.close()


def _wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_slots_being_given_back_cost_a_run_nothing_while_the_slots_no_run_wants_can_hold_them(tmp_path) -> None:
    from dispatch.core.shares import FairShare, MachineShares

    big = MachineShares(tmp_path, "big", project="big", user="alice")
    big_share = FairShare(big, "big", 20)
    FairShare(MachineShares(tmp_path, "small", project="small", user="bob"), "small", 20).allowed(demand=5, held=0)
    big._read_at = 0.0
    # both want 5 + 10 of 20 slots: 5 are free for anyone, so 3 parked or on their way back take nobody's share
    assert big_share.allowed(demand=10, held=7, releasing=3) == 10
    big._read_at = 0.0
    assert big_share.allowed(demand=10, held=7, releasing=8) == 7  # only what the 5 free slots cannot hold
