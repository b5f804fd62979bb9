"""How much the project waits on each spec: the rank the ready queue orders by.

A spec's rank is the longest remaining path that starts with it, through dependencies *and* file locks:

    rank(s) = d(s) + max(rank of each dependent of s, work behind s under each file it locks)

where d is the spec's estimated duration (dispatch/core/durations.py) and "work behind s under a file" is the
estimated work of every other spec not yet started whose `modifies` overlap that entry of s and that cannot
start before s: if s takes the file now, all of it runs after s, one spec at a time. A spec that holds a
contended file with much work waiting on it therefore goes before a spec with a longer chain of its own,
which keeps the busiest file (often the project's real bound) busy from the start. Two ready specs on one
file have the same lock term; between them the longer chain of dependents (`chain`) goes first, which is
Jackson's rule for one machine (longest tail first).

Prefect-free and pure: the scheduler recomputes ranks as specs start and estimates change.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby

from dispatch.core.dag import Project
from dispatch.core.locks import normalize, overlaps

ORDERS = ("path", "priority")
"""How a project's ready specs are ordered (projects.json's `order`): by how much the project waits on each, or
strictly by `priority` first."""


class LockGroups:
    """For each distinct `modifies` entry of a project, the specs whose entries overlap it.

    Built once per run: overlaps are tested between distinct entries only (a project's specs mostly
    share a handful of files), then mapped to specs.

    Args:
        project: the validated project.
        ids: the specs to consider (the run's selection).
    """

    def __init__(self, project: Project, ids: Iterable[str]) -> None:
        entries: dict[str, list[str]] = {}  # normalized entry -> specs listing it
        self.entries_of: dict[str, tuple[str, ...]] = {}
        for task_id in ids:
            own = tuple(dict.fromkeys(normalize(p) for p in project.specs[task_id].modifies))
            self.entries_of[task_id] = own
            for entry in own:
                entries.setdefault(entry, []).append(task_id)
        distinct = list(entries)
        self.members: dict[str, tuple[str, ...]] = {}
        for entry in distinct:
            found: dict[str, None] = {}
            for other in distinct:
                if other == entry or overlaps(entry, other):
                    found.update(dict.fromkeys(entries[other]))
            self.members[entry] = tuple(found)


def compute_ranks(project: Project, open_ids: set[str], not_started: set[str], estimates: dict[str, float],
                  groups: LockGroups) -> tuple[dict[str, float], dict[str, float]]:
    """Rank and chain of every open spec.

    The work behind a spec under one of its files counts only the other specs on that file that cannot start
    before it (their estimated earliest start, by their dependencies, is not earlier): a spec deep in the DAG
    does not get the credit for file work that will have run long before it is ready.

    Args:
        project: the project (its `order` is dependencies first).
        open_ids: specs not yet finished (waiting, ready or running).
        not_started: the open specs that have not started (their work is still to run under their files).
        estimates: estimated seconds per spec (running specs: what is left of it).
        groups: the project's lock groups.

    Returns:
        (rank, chain): rank as above; chain = d(s) + the largest rank among its dependents (no lock term).
    """
    head: dict[str, float] = {}  # earliest start from now, by the open dependencies' estimates
    for task_id in project.order:
        if task_id in open_ids:
            head[task_id] = max((head[d] + estimates[d] for d in project.specs[task_id].depends_on
                                 if d in head), default=0.0)
    behind: dict[str, float] = {}
    for members in groups.members.values():
        waiting = sorted(((head[t], t) for t in members if t in not_started), reverse=True)
        later = 0.0  # work of the specs on this file that start no earlier than the current one
        for _, level in groupby(waiting, key=lambda item: item[0]):
            same = [t for _, t in level]
            later += sum(estimates[t] for t in same)
            for t in same:
                behind[t] = max(behind.get(t, 0.0), later - estimates[t])
        for t in members:  # a running spec holds the file: all of it waits
            if t in open_ids and t not in not_started:
                behind[t] = max(behind.get(t, 0.0), later)
    dependents = project.dependents()
    rank: dict[str, float] = {}
    chain: dict[str, float] = {}
    for task_id in reversed(project.order):
        if task_id not in open_ids:
            continue
        own = estimates[task_id]
        after = max((rank[c] for c in dependents[task_id] if c in rank), default=0.0)
        chain[task_id] = own + after
        rank[task_id] = own + max(after, behind.get(task_id, 0.0))
    return rank, chain


def promote_by_priority(ordered: list[str], priority: dict[str, int], estimates: dict[str, float],
                        rank: dict[str, float], end: float, margin: float) -> list[str]:
    """Let a spec of better priority move ahead of specs whose slack covers its duration.

    Args:
        ordered: ready specs by rank (highest first).
        priority, estimates, rank: per spec.
        end: the project's estimated remaining length (the largest remaining path).
        margin: seconds by which a priority decision may lengthen the project.

    Returns:
        The new order: A moves ahead of B (worse priority) only while A's duration, the longest B could be
        delayed by it, is at most B's slack (`end - rank[B]`) plus `margin`.
    """
    result: list[str] = []
    for task_id in ordered:
        at = len(result)
        while at and goes_ahead(priority[task_id], estimates[task_id], priority[result[at - 1]],
                                rank[result[at - 1]], end, margin):
            at -= 1
        result.insert(at, task_id)
    return result


def goes_ahead(priority: int, own: float, other_priority: int, other_rank: float, end: float,
               margin: float) -> bool:
    """Whether a spec of better `priority` and duration `own` moves ahead of a higher-ranked other spec: when
    the other's slack (`end - other_rank`) plus `margin` covers `own`, the longest it can delay the other."""
    return priority < other_priority and own <= end - other_rank + margin


def hold_pays(now: float, own: float, rank: float, chain: float, other_at: float, other_own: float,
              other_rank: float, other_chain: float) -> bool:
    """Whether a ready spec should leave its file to a higher-ranked one that can start at `other_at`.

    Each spec's remaining path if it goes second on the file is its own chain, or what is behind it
    under its files without the one that went first; the project ends at the later of the two paths.

    Returns:
        True when the estimated end is earlier with the other spec first.
    """
    go = now + max(rank, own + max(other_chain, other_rank - own))
    hold = max(other_at + other_rank, other_at + other_own + max(chain, rank - other_own))
    return hold < go
