"""How long a spec will take: estimates from history, kept with the results.

Agent specs have no known duration, so the scheduler's order (dispatch/core/order.py) and the progress view's
time to finish use what earlier runs measured, kept in `DISPATCH_HOME/results/<project>/durations.json`
(`dispatch cleanup --all` removes it with the other results). A spec's estimate is, first found:

1. its own earlier attempts: the median of its last successful runs (of any attempts, if none succeeded);
2. the project's median: the median of its specs' own estimates (a spec's first run);
3. the model's median: over every project's history on this machine, for the spec's first model (`shell` for
   shell specs), when the project has no history yet;
4. none: the scheduler then counts every spec alike (ranks count specs).

The file is bounded (`_KEEP` runs per spec, `_MAX_SPECS` specs, `_MAX_BYTES` read) and rewritten atomically; a
damaged or oversized file is ignored (and replaced on the next save), never an error: it is only a hint.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core.paths import check_name, local_path, name_problem
from dispatch.core.results import read_json, write_json
from dispatch.core.specs import Spec

logger = logging.getLogger(__name__)

_FILE = "durations.json"
_KEEP = 5  # runs kept per spec: recent enough to follow a changed spec, enough for a median
_MAX_SPECS = 20_000
_MAX_BYTES = 8 * 2**20


def history_path(results_dir: Path, project: str) -> Path:
    """`<results_dir>/<project>/durations.json`, the name checked and the path proven inside `results_dir`."""
    return local_path(results_dir, check_name(project, "project name"), _FILE, what="duration history")


def _runs(data: object) -> dict[str, list[dict]]:
    """The `specs` table of a history file, keeping only well-formed runs (the file is only a hint)."""
    specs = data.get("specs") if isinstance(data, dict) else None
    if not isinstance(specs, dict):
        return {}
    result: dict[str, list[dict]] = {}
    for task_id, runs in list(specs.items())[:_MAX_SPECS]:
        if not isinstance(task_id, str) or name_problem(task_id) or not isinstance(runs, list):
            continue
        kept = [r for r in runs[-_KEEP:] if isinstance(r, dict) and isinstance(r.get("seconds"), (int, float))
                and not isinstance(r.get("seconds"), bool) and 0 <= r["seconds"] < 10**7]
        if kept:
            result[task_id] = kept
    return result


def _read(path: Path) -> dict[str, list[dict]]:
    try:
        if path.stat().st_size > _MAX_BYTES:
            logger.warning("%s is larger than %d bytes; ignored (estimates start afresh)", path, _MAX_BYTES)
            return {}
    except OSError:
        return {}
    return _runs(read_json(path))


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


@dataclass
class DurationHistory:
    """A project's measured spec durations, and the estimates drawn from them.

    Attributes:
        path: the history file.
        runs: per spec id, its last runs: {"seconds", "succeeded", "model", "at"}.
        model_medians: median seconds per model over every project's history (for projects without one).
    """

    path: Path
    runs: dict[str, list[dict]] = field(default_factory=dict)
    model_medians: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, results_dir: Path, project: str) -> DurationHistory:
        """The project's history, with every project's model medians (read once: a few small files)."""
        path = history_path(results_dir, project)
        by_model: dict[str, list[float]] = {}
        if results_dir.is_dir():
            for other in sorted(results_dir.glob(f"*/{_FILE}"))[:1000]:
                for runs in _read(other).values():
                    for run in runs:
                        if run.get("succeeded") and isinstance(run.get("model"), str):
                            by_model.setdefault(run["model"], []).append(float(run["seconds"]))
        medians = {model: statistics.median(values) for model, values in by_model.items()}
        return cls(path=path, runs=_read(path), model_medians=medians)

    def record(self, task_id: str, seconds: float, *, succeeded: bool, model: str = "") -> None:
        """Add one measured run of a spec (the oldest beyond `_KEEP` is dropped)."""
        runs = self.runs.setdefault(task_id, [])
        runs.append({"seconds": round(max(float(seconds), 0.0), 3), "succeeded": succeeded, "model": model,
                     "at": round(time.time())})
        del runs[:-_KEEP]

    def save(self) -> None:
        """Write the history atomically (the specs run most recently are kept when over `_MAX_SPECS`)."""
        newest = sorted(self.runs.items(), key=lambda item: item[1][-1].get("at", 0), reverse=True)[:_MAX_SPECS]
        write_json(self.path, {"version": 1, "specs": dict(sorted(newest))})

    def own(self, task_id: str) -> float | None:
        """The median of the spec's last successful runs (of its last attempts when none succeeded)."""
        runs = self.runs.get(task_id, [])
        good = [r["seconds"] for r in runs if r.get("succeeded")]
        return _median(good or [r["seconds"] for r in runs])

    def estimates(self, specs: dict[str, Spec]) -> dict[str, float]:
        """An estimate per spec id, by the rules of the module docstring (specs with none are left out)."""
        own = {task_id: value for task_id in specs if (value := self.own(task_id)) is not None}
        project = _median(own.values())
        result: dict[str, float] = {}
        for task_id, spec in specs.items():
            if task_id in own:
                result[task_id] = own[task_id]
            elif project is not None:
                result[task_id] = project
            elif (model := self.model_medians.get(first_model(spec))) is not None:
                result[task_id] = model
        return result


def first_model(spec: Spec) -> str:
    """The model a spec's duration is filed under: its first model, or `shell` for shell specs."""
    return "shell" if spec.kind == "shell" else spec.model_chain[0]
