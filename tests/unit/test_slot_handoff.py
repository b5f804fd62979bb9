"""Server slots handed from an ended spec to the next without a call to the server (issue 22), with a client
that counts the calls: the handoff, the grace after which a parked slot goes back, and the fair share (a parked
slot counts as held; it goes back at once when the share needs the room)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from pathlib import Path

import httpx

from dispatch.core.admission import Admission
from dispatch.core.brokers import Brokers, MachineSlots
from dispatch.core.placement import NodeSlots
from dispatch.core.scheduler import Scheduler
from dispatch.prefect.slots import ServerSlots
from tests.unit.test_admission import Budgets, Cooldowns, FakeClock, _project, _spec


class _Response:
    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id

    def json(self) -> dict[str, str]:
        return {"lease_id": self.lease_id}


class CountingClient:
    """The few calls `ServerSlots` makes, counted by name."""

    def __init__(self, free: int | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.free = free  # the limit's free slots (None: never full)
        self.sizes: list[object] = []  # slots of each lease taken
        self.held: dict[str, int] = {}  # lease -> slots, until released

    def _note(self, name: str, what: object) -> None:
        with self._lock:
            self.calls.append((name, what))

    def count(self, name: str) -> int:
        with self._lock:
            return sum(1 for called, _ in self.calls if called == name)

    def increment_concurrency_slots_with_lease(self, **kwargs: object) -> _Response:
        with self._lock:
            if self.free is not None:
                if self.free < kwargs["slots"]:  # type: ignore[operator]
                    self.calls.append(("refused", kwargs["slots"]))
                    raise httpx.HTTPStatusError("locked", request=httpx.Request("POST", "http://127.0.0.1/"),
                                                response=httpx.Response(423))
                self.free -= kwargs["slots"]  # type: ignore[operator]
            lease = f"lease-{next(self._ids)}"
            self.sizes.append(kwargs["slots"])
            self.held[lease] = kwargs["slots"]  # type: ignore[assignment]
        self._note("take", lease)
        return _Response(lease)

    def release_concurrency_slots_with_lease(self, lease_id: object) -> None:
        with self._lock:
            size = self.held.pop(str(lease_id))
            if self.free is not None:
                self.free += size
        self._note("release", lease_id)

    def renew_concurrency_lease(self, lease_id: object, lease_duration: float) -> None:
        self._note("renew", lease_id)

    def create_variable(self, variable: object) -> None:
        self._note("record", getattr(variable, "name", ""))

    def delete_variable_by_name(self, name: str) -> None:
        self._note("unrecord", name)


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


class ContestedShare:
    """Another run wants slots: this one may hold `fair`, less what it is giving back."""

    def __init__(self, fair: int) -> None:
        self.fair = fair

    def allowed(self, demand: int, held: int, releasing: int = 0) -> int:
        return max(self.fair - releasing, 0)


def _admission(tmp_path: Path, project, nodes: list[NodeSlots], fair: int, *, grace: float = 60.0):
    client = CountingClient()
    slots = ServerSlots({n.name: f"node-{n.name}" for n in nodes}, grace=grace, client=client)
    brokers = Brokers(MachineSlots(tmp_path / "locks", {}), slots, {n.name for n in nodes})
    scheduler = Scheduler(project, set(project.specs), nodes, clock=FakeClock())
    answers: queue.Queue = queue.Queue()
    admission = Admission(scheduler, project.specs, cooldowns=Cooldowns(), budgets=Budgets(), brokers=brokers,
                          share=ContestedShare(fair), locks=None, user="alice",
                          post=lambda kind, data: answers.put(data), clock=FakeClock())
    admission.budgets.enabled = False
    admission.answers = answers  # type: ignore[attr-defined]
    return admission, scheduler, slots, client


def _started(admission: Admission, scheduler: Scheduler) -> list[str]:
    """One round of the dispatch loop: the picks admitted, the slots asked of the server answered."""
    decisions, _ = admission.admit(scheduler.pick())
    for _ in range(len(admission._asking)):
        decisions.append(admission.locks_answered(*admission.answers.get(timeout=10)))  # type: ignore[attr-defined]
    return sorted(d.assignment.task_id for d in decisions if d.kind == "start")


def test_an_ended_spec_hands_its_slot_to_the_next_on_its_node_without_a_server_call(tmp_path: Path) -> None:
    project = _project(_spec("S01"), _spec("S02"), _spec("S03"))
    admission, scheduler, slots, client = _admission(tmp_path, project, [NodeSlots("n1", 2)], fair=2)
    try:
        assert sorted(_started(admission, scheduler)) == ["S01", "S02"]
        assert client.count("take") == 1 and client.sizes == [2]  # one lease for the burst
        admission.ended("S01")
        scheduler.succeed("S01")
        assert _started(admission, scheduler) == ["S03"]  # at its full share: the parked slot is its own
        time.sleep(0.1)  # anything sent to the server in the background would be counted by now
        assert (client.count("take"), client.count("release"), client.count("unrecord")) == (1, 0, 0)
        assert slots.handoffs == 1 and admission.slot("S03")[1].lease_id == "lease-1"
    finally:
        slots.close()


def test_a_parked_slot_no_spec_takes_is_released_after_its_grace(tmp_path: Path) -> None:
    client = CountingClient()
    slots = ServerSlots({"n1": "node-n1"}, grace=0.1, client=client)
    try:
        lease = slots.try_acquire("n1")
        slots.park(lease)
        assert slots.parked() == {"n1": 1} and client.count("release") == 0
        assert _wait_for(lambda: client.count("release") == 1), client.calls
        assert slots.parked() == {} and slots.try_acquire("n1") != lease  # a new lease: the old one went back
        assert _wait_for(lambda: client.count("unrecord") == 1)
    finally:
        slots.close()


def test_a_parked_slot_no_pick_takes_counts_against_the_share_until_its_grace_ends(tmp_path: Path) -> None:
    project = _project(_spec("S01", node="n1"), _spec("S02", node="n2", depends_on=["S01"]))
    admission, scheduler, slots, client = _admission(tmp_path, project, [NodeSlots("n1", 1), NodeSlots("n2", 1)],
                                                     fair=1, grace=0.5)
    try:
        assert _started(admission, scheduler) == ["S01"]
        admission.ended("S01")
        scheduler.succeed("S01")
        assert slots.parked() == {"n1": 1}
        assert _started(admission, scheduler) == []  # n2 needs a new slot: n1's parked one fills the share
        assert client.count("release") == 0
        assert _wait_for(lambda: client.count("release") == 1) and slots.parked() == {}  # after its grace
        assert _wait_for(lambda: slots.releasing() == 0)
        scheduler.clock.now += 1.0  # type: ignore[attr-defined]  # past the share's retry
        assert _started(admission, scheduler) == ["S02"]
    finally:
        slots.close()


class SlowClient(CountingClient):
    """A server that answers a slot request only when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()

    def increment_concurrency_slots_with_lease(self, **kwargs: object) -> _Response:
        assert self.answer.wait(10), "never told to answer"
        return super().increment_concurrency_slots_with_lease(**kwargs)


def test_the_dispatch_loop_never_waits_for_the_server_to_grant_a_new_slot(tmp_path: Path) -> None:
    project = _project(_spec("S01"))
    admission, scheduler, slots, _ = _admission(tmp_path, project, [NodeSlots("n1", 1)], fair=1)
    client = SlowClient()
    slots._client = client  # the same broker, its server slow to answer
    try:
        began = time.monotonic()
        decisions, refused = admission.admit(scheduler.pick())
        assert (decisions, refused) == ([], False) and time.monotonic() - began < 2.0  # asked, not waited for
        client.answer.set()
        decision = admission.locks_answered(*admission.answers.get(timeout=10))  # type: ignore[attr-defined]
        assert decision.kind == "start" and client.count("take") == 1
        assert admission.slot("S01")[1].lease_id == "lease-1"
    finally:
        client.answer.set()
        slots.close()


def test_a_run_over_its_share_hands_off_nothing_and_gives_the_parked_slot_back_at_once(tmp_path: Path) -> None:
    project = _project(_spec("S01"), _spec("S02"), _spec("S03"))
    admission, scheduler, slots, client = _admission(tmp_path, project, [NodeSlots("n1", 2)], fair=2)
    try:
        assert _started(admission, scheduler) == ["S01", "S02"]
        admission.share.fair = 1  # type: ignore[attr-defined]  # another user's run arrives: this one owes a slot
        admission.ended("S01")
        scheduler.succeed("S01")
        assert _started(admission, scheduler) == []  # S02 holds its whole share: S03 may not take S01's slot
        assert _wait_for(lambda: client.count("release") == 1) and slots.parked() == {}  # the other run's now
        assert slots.handoffs == 0
    finally:
        slots.close()


def test_the_next_spec_goes_to_the_node_where_a_slot_is_parked_rather_than_the_emptiest(tmp_path: Path) -> None:
    project = _project(_spec("S01", node="n1"), _spec("S02", depends_on=["S01"]))
    admission, scheduler, slots, client = _admission(tmp_path, project, [NodeSlots("n1", 2), NodeSlots("n2", 4)],
                                                     fair=6)
    try:
        assert _started(admission, scheduler) == ["S01"]
        admission.ended("S01")
        scheduler.succeed("S01")
        assert _started(admission, scheduler) == ["S02"]
        assert scheduler.entries["S02"].node == "n1"  # n2 has more free slots, but n1 has S01's, held already
        assert client.count("take") == 1 and slots.handoffs == 1
    finally:
        slots.close()


def test_a_burst_of_starts_on_a_node_takes_its_slots_in_one_lease_and_fewer_when_the_node_has_not_that_many(
        tmp_path: Path) -> None:
    project = _project(*[_spec(f"S{i:02}") for i in range(1, 8)])
    admission, scheduler, slots, client = _admission(tmp_path, project, [NodeSlots("n1", 8)], fair=8)
    client.free = 5  # another dispatcher holds 3 of the node's 8 slots
    try:
        first = _started(admission, scheduler)
        assert len(first) == 3 and client.sizes == [3]  # 7 asked of 5 free: refused, then 3 (halving)
        assert [called for called, _ in client.calls if called in ("take", "refused")] == ["refused", "take"]
        scheduler.clock.now += 1.0  # type: ignore[attr-defined]  # past the full node's retry
        second = _started(admission, scheduler)
        assert len(second) == 2 and client.sizes == [3, 2] and client.free == 0  # never more than the limit
        assert len({admission.slot(task_id)[1].lease_id for task_id in first}) == 1
    finally:
        slots.close()
    assert client.held == {}  # closing gave every lease back


def test_the_idle_part_of_a_lease_goes_back_after_the_grace_while_its_running_slot_moves_to_a_smaller_lease() -> None:
    client = CountingClient(free=4)
    slots = ServerSlots({"n1": "node-n1"}, grace=0.2, client=client)
    try:
        running, *ended = slots.try_acquire_many("n1", 3)
        assert client.held == {"lease-1": 3}
        for slot in ended:
            slots.park(slot)
        assert slots.parked() == {"n1": 2}
        assert _wait_for(lambda: client.held == {"lease-2": 1}), client.calls  # the new lease first, then the old
        assert running.lease_id == "lease-2" and slots.parked() == {}
        assert [called for called, _ in client.calls if called in ("take", "release")] == ["take", "take", "release"]
        slots.park(running)
        assert _wait_for(lambda: client.held == {}) and _wait_for(lambda: slots.releasing() == 0)
    finally:
        slots.close()


def test_a_lease_whose_node_is_full_keeps_counting_every_slot_until_its_running_one_ends() -> None:
    client = CountingClient(free=3)
    slots = ServerSlots({"n1": "node-n1"}, grace=0.1, client=client)
    try:
        running, *ended = slots.try_acquire_many("n1", 3)
        for slot in ended:
            slots.park(slot)
        assert _wait_for(lambda: client.count("refused") >= 2)  # no room for the smaller lease: tried again
        assert client.held == {"lease-1": 3} and running.lease_id == "lease-1"  # the running spec stays counted
        slots.park(running)
        assert _wait_for(lambda: client.held == {}), client.calls  # every slot idle: the lease goes back whole
    finally:
        slots.close()


def test_a_run_over_its_share_gives_back_the_idle_part_of_a_lease_at_once_not_after_the_grace(tmp_path: Path) -> None:
    project = _project(_spec("S01"), _spec("S02"), _spec("S03"), _spec("S04"))
    admission, scheduler, slots, client = _admission(tmp_path, project, [NodeSlots("n1", 4)], fair=3)
    try:
        assert len(_started(admission, scheduler)) == 3 and client.sizes == [3]
        admission.share.fair = 1  # type: ignore[attr-defined]  # another user's run arrives
        done = sorted(admission._held)[:2]
        for task_id in done:
            admission.ended(task_id)
            scheduler.succeed(task_id)
        scheduler.clock.now += 1.0  # type: ignore[attr-defined]  # past S04's wait for the share
        assert _started(admission, scheduler) == []  # over its share: S04 may not take a parked slot
        assert _wait_for(lambda: list(client.held.values()) == [1], seconds=2.0), client.calls  # grace is 60 s
        assert slots.parked() == {} and admission.slot(sorted(admission._held)[0])[1].lease_id in client.held
    finally:
        slots.close()
