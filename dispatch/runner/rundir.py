"""A run directory's files as the runner writes and reads them, and the run root's registry of live runners.

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import json
import os

CHUNK = 65536
"""Bytes read from a log at once."""


def write_json(path: str, data: dict, *, sync: bool = False) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=1, sort_keys=True) + "\n")  # one write, not one per token
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rotate_previous(run_dir: str) -> None:
    """Keep the previous attempt's log and result as *.prev (before anything reads this attempt's)."""
    for name, prev in (("task.log", "task.prev.log"), ("result.json", "result.prev.json")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.replace(path, os.path.join(run_dir, prev))


LIVE_DIR = ".live"
"""Under a run root: one symlink per live runner, `<project>@<task_id>` -> its run directory (`register_live`)."""


def live_entry(run_dir: str) -> str | None:
    """A runner's entry in its run root's registry; None for a run directory not laid out as under a run root
    (`<root>/<project>/tasks/<task_id>`): nothing is ever written above any other directory."""
    run_dir = os.path.realpath(run_dir)
    tasks_dir = os.path.dirname(run_dir)
    if os.path.basename(tasks_dir) != "tasks":
        return None
    project_dir = os.path.dirname(tasks_dir)
    name = f"{os.path.basename(project_dir)}@{os.path.basename(run_dir)}"
    return os.path.join(os.path.dirname(project_dir), LIVE_DIR, name)


def register_live(run_dir: str) -> None:
    """Enter a claimed run directory in the registry the node's agents count its slots from.

    Counting from the registry costs a look at each live runner, where a scan of every run directory ever made
    under the root (thousands on a node with history) cost milliseconds for every start the agent made.
    Only a root an agent has made a run root (its registry exists: `_Agent.live_runners` makes it) gets an
    entry, so a runner laid out as `<dir>/<name>/tasks/<id>` anywhere else writes nothing above its directory.
    Best effort: an entry that cannot be written leaves the runner uncounted only until an agent starts, as
    each agent scans the whole root once, after making the registry."""
    entry = live_entry(run_dir)
    if entry is None:
        return
    try:
        temporary = f"{entry}~{os.getpid()}"  # "~" is in no valid name: never taken for an entry
        os.symlink(os.path.realpath(run_dir), temporary)
        os.replace(temporary, entry)
    except OSError:
        pass


def unregister_live(run_dir: str) -> None:
    entry = live_entry(run_dir)
    if entry is None:
        return
    try:
        os.unlink(entry)
    except OSError:
        pass
