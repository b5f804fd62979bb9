"""Fair share between two runs on one machine: a small project beside a large one is not starved.

Judged by the order of starts the specs record themselves, never by seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.projects import read_timeline, shell_spec, start_in_background, wait_for_starts

pytestmark = pytest.mark.prefect


def _starts(timeline: Path) -> list[float]:
    return sorted(start for runs in read_timeline(timeline).values() for start, _ in runs)


def test_a_small_project_beside_a_large_one_gets_its_share_at_once(prefect_api, isolated_home: Path):
    big_timeline, small_timeline = isolated_home / "big.timeline", isolated_home / "small.timeline"
    # specs long beside a dispatcher's reaction (~0.1 s, up to ~1 s on a loaded machine), so the count of starts
    # below measures the share, not the latency of two dispatchers on two busy cores
    for i in range(60):
        shell_spec(isolated_home / "specs" / "big", f"S{i:03d}", big_timeline, seconds=1.5)
    for i in range(5):
        shell_spec(isolated_home / "specs" / "small", f"S{i:02d}", small_timeline, seconds=1.0)
    env = {**os.environ, "DISPATCH_LOCAL_SLOTS": "3"}

    big = start_in_background("big", isolated_home / "big.log", env)
    try:
        wait_for_starts(big_timeline, 6, isolated_home / "big.log")
        small = subprocess.run([str(Path(sys.executable).with_name("dispatch")), "start", "small"], env=env,
                               capture_output=True, text=True, timeout=240)
        assert small.returncode == 0, small.stdout + small.stderr
        assert big.wait(timeout=240) == 0, (isolated_home / "big.log").read_text()
    finally:
        if big.poll() is None:
            big.kill()

    small_starts, big_starts = _starts(small_timeline), _starts(big_timeline)
    assert len(small_starts) == 5 and len(big_starts) == 60
    first, last = small_starts[0], small_starts[-1]
    interleaved = sum(1 for start in big_starts if first <= start <= last)
    after = sum(1 for start in big_starts if start > last)
    # its share of 3 slots is 2 (5 wanted against 60): all 5 start within ~3 of its rounds, while the big
    # one, down to one slot, starts a few; and the big one still had most of its work left
    assert interleaved <= 6, (interleaved, after)
    assert after >= 20, (interleaved, after)


def test_a_run_alone_uses_every_slot(prefect_api, isolated_home: Path, run_project):
    timeline = isolated_home / "timeline"
    for i in range(6):
        shell_spec(isolated_home / "specs" / "alone", f"S{i:02d}", timeline, seconds=0.5)

    state, _ = run_project("alone", slots=3)

    assert state.is_completed(), state.message
    starts = _starts(timeline)
    runs = read_timeline(timeline)
    ends = sorted(end for r in runs.values() for _, end in r)
    assert sum(1 for s in starts if s < ends[0]) == 3  # three at once before the first ended
    assert not list((isolated_home / "home" / "locks" / "shares").glob("*.json"))  # its entry withdrawn


def _eventually(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_team_runs_meet_on_the_servers_share_board(prefect_api):
    from prefect.client.orchestration import get_client

    from dispatch.core.shares import FairShare
    from dispatch.prefect.shares import ServerShares

    with get_client(sync_client=True) as client:
        big = ServerShares("bigrun", project="big", user="alice@a", client=client, interval=0.05)
        small = ServerShares("smallrun", project="small", user="bob@b", weight=1.0, interval=0.05)
        try:
            big_share, small_share = FairShare(big, "bigrun", 9), FairShare(small, "smallrun", 9)
            big_share.allowed(300, 9)
            small_share.allowed(5, 0)
            _eventually(lambda: big_share.allowed(300, 9) == 4, "the big run to see the small one")
            assert small_share.allowed(5, 0) == 5
            small.close()
            _eventually(lambda: big_share.allowed(300, 4) == 9, "the small run's share to be withdrawn")
        finally:
            small.close()
            big.close()
        names = [v.name for v in client.read_variables() if v.name.startswith("dispatch_share_")]
    assert names == []
