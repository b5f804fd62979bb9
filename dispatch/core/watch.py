"""Who follows a project or pipeline run in this process: the CLI's progress view and its link to the flow run
in the UI.

A flow's parameters are serialized (the UI shows them, the server stores them), so a callable cannot be one. The
caller hands its `Watch` over for the runs it starts inside `watching(...)` (this context only: other threads'
and other callers' runs are unaffected), and the project and pipeline flows pass `current_watch()` to their
run explicitly.

Examples:
    >>> seen = []
    >>> with watching(Watch(on_event=lambda event, task_id, details: seen.append(event))):
    ...     current_watch().on_event("started", "S01", {})
    >>> seen, current_watch().on_event is None
    (['started'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Watch:
    """The callbacks of one caller of the project flow.

    Args:
        on_event: called with (event, task_id, details) on every spec event; details["progress"] holds the
            counts and the estimated time left.
        on_flow_run: called with the flow run's id once it exists (the CLI prints where to see it in the UI).
    """

    on_event: Callable[[str, str, dict], None] | None = None
    on_flow_run: Callable[[str], None] | None = None


_WATCH: ContextVar[Watch | None] = ContextVar("dispatch_watch", default=None)


@contextmanager
def watching(watch: Watch) -> Iterator[Watch]:
    """Project runs started in this block (in this context) report to `watch`."""
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def current_watch() -> Watch:
    """The `Watch` of the innermost `watching` block around this call (one that follows nothing outside any)."""
    return _WATCH.get() or Watch()
