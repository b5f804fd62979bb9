"""What a project run's attempts need that cannot be `run_spec` parameters, owned by the run, found by its id.

A Prefect task's parameters are serialized: shown in the UI, stored with the task run, and (here through
`cache_key_fn`) part of caching. The transports (live connections), an attempt's secrets, its inherited slot
descriptor and its note callback cannot be, so the project run puts them in one `RunInputs` and registers it
under its `run_id`, a plain string every `RunRequest` carries already. `run_spec` looks its run up by that
id; the cache key stays the spec's key alone (`RunRequest.cache_key`), so nothing here changes what is
cached. A task runs in the dispatcher's process (a thread of the flow's task runner), as the flow that
registered its inputs; the registry is that process's, and the run removes its entry when it closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatch.cluster.transports import Transport
from dispatch.core.secrets import Masker


@dataclass
class RunInputs:
    """One run's transports by node name, its masker (every secret it knows), and per-attempt options.

    An attempt's options are the keyword arguments of `Transport.run` (secrets, slot_fd, sync_from, sync_back)
    plus `on_note`, called with what the spec's row should say while it runs.
    """

    transports: Mapping[str, Transport]
    masker: Masker = field(default_factory=Masker)
    _options: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def set_options(self, task_id: str, attempt: int, options: dict[str, Any]) -> None:
        self._options[(task_id, attempt)] = options

    def options(self, task_id: str, attempt: int) -> tuple[dict[str, Any], Callable[[str], None] | None]:
        """The attempt's `Transport.run` options (a copy) and its `on_note` (None when none was set)."""
        options = dict(self._options.get((task_id, attempt), {}))
        return options, options.pop("on_note", None)

    def drop_options(self, task_id: str, attempt: int) -> None:
        self._options.pop((task_id, attempt), None)


_RUNS: dict[str, RunInputs] = {}
_LOCK = threading.Lock()


def register(run_id: str, inputs: RunInputs) -> None:
    """Make `inputs` the attempt inputs of run `run_id` in this process."""
    with _LOCK:
        _RUNS[run_id] = inputs


def unregister(run_id: str) -> None:
    with _LOCK:
        _RUNS.pop(run_id, None)


def inputs_of(run_id: str) -> RunInputs:
    """The inputs run `run_id` registered in this process.

    Raises:
        LookupError: no run of that id is live here (the task ran outside its dispatcher's process).
    """
    with _LOCK:
        found = _RUNS.get(run_id)
    if found is None:
        raise LookupError(f"run {run_id!r} has no attempt inputs in this process: run_spec runs only inside the "
                          "dispatcher's own project flow")
    return found
