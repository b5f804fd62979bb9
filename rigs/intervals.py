"""Judging a schedule from what ran: how many runs overlapped at once, and whether two runs overlapped.

Used by the tests and the benchmarks on the `(start, end)` times specs record themselves.
"""

from __future__ import annotations


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an interval ending as another starts does not overlap it)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two runs overlap in time."""
    return a[0] < b[1] and b[0] < a[1]
