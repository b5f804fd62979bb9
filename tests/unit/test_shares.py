"""Fair share between concurrent runs: the division of slots, and the machine's share board."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.core.shares import FairShare, MachineShares, fair_shares


@pytest.mark.parametrize(("wants", "slots", "expected"), [
    ({"big": (300, 1.0)}, 9, {"big": 9}),                                     # alone: everything it wants
    ({"big": (300, 1.0), "small": (5, 1.0)}, 9, {"big": 4, "small": 5}),      # small needs 5, has 4.5: 5 by rounding
    ({"big": (300, 1.0), "small": (2, 1.0)}, 9, {"big": 7, "small": 2}),      # needs fewer than its share
    ({"a": (300, 1.0), "b": (300, 1.0), "c": (300, 1.0)}, 9, {"a": 3, "b": 3, "c": 3}),
    ({"a": (300, 2.0), "b": (300, 1.0)}, 9, {"a": 6, "b": 3}),                # weights
    ({"a": (300, 1.0), "idle": (0, 1.0)}, 9, {"a": 9, "idle": 0}),
    ({"a": (1, 1.0), "b": (1, 1.0)}, 9, {"a": 1, "b": 1}),                    # never more than wanted
])
def test_slots_are_divided_evenly_unless_a_run_needs_fewer(wants, slots, expected) -> None:
    assert fair_shares(wants, slots) == expected


def test_every_dispatcher_computes_the_same_division() -> None:
    wants = {f"run{i}": (10 + i, 1.0) for i in range(7)}

    shares = fair_shares(wants, 20)

    assert sum(shares.values()) == 20 and max(shares.values()) - min(shares.values()) <= 1
    assert fair_shares(dict(reversed(list(wants.items()))), 20) == shares


def test_two_runs_on_one_machine_see_each_others_demand(tmp_path: Path) -> None:
    big = MachineShares(tmp_path, "big", project="big", user="alice")
    small = MachineShares(tmp_path, "small", project="small", user="bob")
    big_share, small_share = FairShare(big, "big", 9), FairShare(small, "small", 9)

    assert big_share.allowed(demand=300, held=9) == 9  # alone so far
    assert small_share.allowed(demand=5, held=0) == 5
    big._read_at = 0.0  # the next read is due (reads are at most every 0.1 s)
    assert big_share.allowed(demand=300, held=9) == 4

    small_share.close()
    big._read_at = 0.0
    assert big_share.allowed(demand=300, held=4) == 9


def test_slots_still_being_released_count_against_the_share_only_while_others_want_slots(tmp_path: Path) -> None:
    big = MachineShares(tmp_path, "big", project="big", user="alice")
    big_share = FairShare(big, "big", 9)

    assert big_share.allowed(demand=300, held=8, releasing=1) == 9  # alone: a release on its way costs nothing
    small_share = FairShare(MachineShares(tmp_path, "small", project="small", user="bob"), "small", 9)
    small_share.allowed(demand=5, held=0)
    big._read_at = 0.0
    assert big_share.allowed(demand=300, held=4, releasing=1) == 3  # its share is 4, one of them not free yet
    big._read_at = 0.0
    assert big_share.allowed(demand=300, held=0, releasing=6) == 0


def test_a_dead_runs_share_no_longer_counts(tmp_path: Path) -> None:
    code = ("import sys, os; from pathlib import Path; from dispatch.core.shares import MachineShares;"
            "board = MachineShares(Path(sys.argv[1]), 'gone', project='p', user='u');"
            "board.publish(50, 3); os._exit(0)")  # dies without closing: its lock is released by the kernel
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env={**os.environ})
    assert (tmp_path / "gone.json").exists()

    mine = MachineShares(tmp_path, "mine", project="q", user="v")

    assert mine.others() == {}
    assert not (tmp_path / "gone.json").exists()


def test_a_weight_on_the_board_is_held_to_the_bounds_of_projects_json(tmp_path: Path) -> None:
    import json

    mine = MachineShares(tmp_path, "mine", project="q", user="v")
    greedy = MachineShares(tmp_path, "greedy", project="p", user="u")
    greedy.publish(300, 0)
    data = json.loads((tmp_path / "greedy.json").read_text())
    (tmp_path / "greedy.json").write_text(json.dumps({**data, "weight": 1e12}))

    assert mine.others() == {"greedy": (300, 100.0)}
    assert FairShare(mine, "mine", 101).allowed(300, 0) == 1  # 100 : 1, not everything
