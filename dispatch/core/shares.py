"""Fair share of the cluster's slots between project runs that want them at the same time (any users).

Without it, the run whose specs end most often takes every slot that frees up: a user who starts 5 specs
while another's 500 are queued waits for the 500. So every run publishes its demand (specs running or
ready to start) and weight, reads the others', and holds at most its share: the slots are divided evenly
by weight (water-filling: a run that wants fewer than its share keeps only what it wants, and the rest is
divided among the others). A run above its share starts nothing new until it is back under; running
specs are never stopped, so a newcomer waits at most for the first of them to end.

Where the demands meet:
- `MachineShares`: one small JSON file per run under `DISPATCH_HOME/locks/shares/`, beside a file the run
  holds `flock`ed while it lives (the embedded default: every dispatcher of this machine, like the slot
  files; a dead run's share is gone with its lock).
- team mode (other users on other machines): the Prefect server's `dispatch.prefect.shares.ServerShares`,
  chosen where the run is composed (dispatch/prefect/run_setup.py).

A project's `weight` in projects.json (default 1) scales its share.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from pathlib import Path
from typing import Protocol

from dispatch.core.locks import held_by_a_process
from dispatch.core.paths import local_path
from dispatch.core.results import read_json, write_json

logger = logging.getLogger(__name__)

MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0
"""The bounds of a project's fair-share weight (projects.json's `weight`)."""
_MACHINE_INTERVAL = 0.1  # seconds between two reads (or writes) of the machine's share files


def fair_shares(wants: dict[str, tuple[int, float]], slots: int) -> dict[str, int]:
    """Slots per run: each run's demand capped by an equal (weighted) share, whole slots.

    Args:
        wants: run id -> (slots it could use now, its weight > 0).
        slots: the slots to divide.

    Returns:
        Whole slots per run, summing to at most `slots`; a run never gets more than it wants. Left-over slots
        of the rounding go to the largest fractional shares (ties: the smaller demand, then the run id, so every
        dispatcher agrees).

    Examples:
        >>> fair_shares({"big": (300, 1.0), "small": (5, 1.0)}, 9)
        {'big': 4, 'small': 5}
        >>> fair_shares({"big": (300, 1.0), "small": (5, 1.0)}, 20)
        {'big': 15, 'small': 5}
    """
    share = {run: 0.0 for run in wants}
    pending = {run: (demand, weight) for run, (demand, weight) in wants.items() if demand > 0 and weight > 0}
    left = float(slots)
    while pending and left > 0:
        level = left / sum(weight for _, weight in pending.values())
        capped = {run for run, (demand, weight) in pending.items() if demand <= level * weight}
        if not capped:
            for run, (_, weight) in pending.items():
                share[run] = level * weight
            break
        for run in capped:
            share[run] = float(pending.pop(run)[0])
            left -= share[run]
    whole = {run: math.floor(value + 1e-9) for run, value in share.items()}
    spare = slots - sum(whole.values())
    for run in sorted(share, key=lambda r: (-round(share[r] - whole[r], 9), wants[r][0], r)):
        if spare <= 0:
            break
        if share[run] - whole[run] > 1e-9 and whole[run] < wants[run][0]:
            whole[run] += 1
            spare -= 1
    return whole


class ShareBoard(Protocol):
    def publish(self, demand: int, held: int) -> None:
        """Say what this run wants (running + ready) and holds."""

    def others(self) -> dict[str, tuple[int, float]]:
        """The other live runs' (demand, weight), by run id."""

    def close(self) -> None:
        """Withdraw this run's entry."""


class FairShare:
    """This run's share of `slots`, from its own demand and what the board says of the others.

    Args:
        board: where the runs' demands meet.
        run_id: this run's id.
        slots: the slots shared (the cluster's).
        weight: this run's weight.
    """

    def __init__(self, board: ShareBoard, run_id: str, slots: int, weight: float = 1.0) -> None:
        self.board, self.run_id, self.slots, self.weight = board, run_id, slots, weight

    def allowed(self, demand: int, held: int, releasing: int = 0) -> int:
        """How many slots this run may hold now (its demand when no one else wants any).

        `releasing`: slots this run gave back that are not free yet for the others (a release still on its
        way to the server, or a slot parked for this run's next spec). While others want slots they count
        against this run's share, as far as the slots no run wants cannot hold them: else it would take slots
        beyond its share while the run entitled to them finds the nodes full. (So every run holds at most
        its share plus some of the slack: the sum stays within the slots.)"""
        self.board.publish(demand, held)
        wants = self.board.others()
        if not wants:
            return min(demand, self.slots)
        wants[self.run_id] = (demand, self.weight)
        shares = fair_shares(wants, self.slots)
        slack = self.slots - sum(shares.values())  # slots no run wants now
        return max(shares[self.run_id] - max(releasing - slack, 0), 0)

    def close(self) -> None:
        self.board.close()


class MachineShares:
    """The share board of one machine: a JSON file per run, valid while its run holds the run's lock file.

    Args:
        directory: `DISPATCH_HOME/locks/shares`.
        run_id: this run's id (a plain name).
        project, user: shown to whoever reads the board.
        weight: this run's weight.
    """

    def __init__(self, directory: Path, run_id: str, *, project: str, user: str, weight: float = 1.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.run_id = directory, run_id
        self._entry = {"project": project, "user": user, "weight": weight, "pid": os.getpid()}
        self._lock_path = local_path(directory, f"{run_id}.lock", what="share lock")
        self._path = local_path(directory, f"{run_id}.json", what="share file")
        self._fd: int | None = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # our own new file: never held by another
        self._published: tuple[int, int] | None = None
        self._written_at = self._read_at = 0.0
        self._others: dict[str, tuple[int, float]] = {}

    def publish(self, demand: int, held: int) -> None:
        now = time.monotonic()
        if (demand, held) == self._published or (self._published is not None and now - self._written_at
                                                  < _MACHINE_INTERVAL and demand > 0):
            return  # unchanged, or written a moment ago (a drop to no demand is written at once)
        try:
            write_json(self._path, {**self._entry, "demand": demand, "held": held, "at": time.time()})
        except OSError as exc:  # the others then do not see this run's demand: it still runs, unfairly
            logger.warning("cannot publish this run's share in %s: %s", self._path, exc)
        self._published, self._written_at = (demand, held), now

    def others(self) -> dict[str, tuple[int, float]]:
        now = time.monotonic()
        if now - self._read_at < _MACHINE_INTERVAL:
            return dict(self._others)
        found: dict[str, tuple[int, float]] = {}
        for path in sorted(self.directory.glob("*.json")):
            run = path.stem
            if run == self.run_id or not self._alive(run):
                continue
            data = read_json(path)
            if isinstance(data, dict) and isinstance(data.get("demand"), int) and data["demand"] > 0:
                found[run] = (data["demand"], weight_of(data.get("weight")))
        self._others, self._read_at = found, now
        return dict(found)

    def _alive(self, run: str) -> bool:
        """Whether the run's lock file is held (its dispatcher lives); a dead run's files are removed."""
        lock = self.directory / f"{run}.lock"
        if held_by_a_process(lock):
            return True
        for stale in (self.directory / f"{run}.json", lock):
            stale.unlink(missing_ok=True)
        return False

    def close(self) -> None:
        self._path.unlink(missing_ok=True)
        self._lock_path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def weight_of(value: object) -> float:
    """A weight read from another run's entry, held to projects.json's bounds (nobody takes every slot by it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return 1.0
    return min(max(float(value), MIN_WEIGHT), MAX_WEIGHT)
