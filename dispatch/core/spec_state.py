"""Where each selected spec stands in one project run: its state and the facts of its attempts.

A spec is waiting (on dependencies), ready, running, then final: succeeded, failed, not run (a dependency
failed) or cancelled. A failed attempt that may retry goes back to ready, after a delay. The scheduler
(dispatch/core/scheduler.py) moves specs between the states; its order (dispatch/core/ranking.py) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WAITING, READY, RUNNING = "waiting", "ready", "running"
SUCCEEDED, FAILED, NOT_RUN, CANCELLED = "succeeded", "failed", "not_run", "cancelled"
FINAL = (SUCCEEDED, FAILED, NOT_RUN, CANCELLED)


@dataclass
class Entry:
    """One spec of the run: its state, attempts, node and retry time."""

    state: str = WAITING
    attempts: int = 0
    node: str | None = None
    not_before: float = 0.0
    reason: str = ""
    avoid: set[str] = field(default_factory=set)
    ready_at: float | None = None  # wall-clock time it last became ready (for latency figures)
    started: float = 0.0  # clock time of the current attempt's start
