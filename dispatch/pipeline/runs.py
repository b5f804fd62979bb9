"""A pipeline run on disk: its directory, its reports, the run summary, the layer cache. No Prefect here, so
`dispatch pipeline status` reads it in milliseconds.

```
DISPATCH_HOME/pipeline/<project>/
  <run>/run.json              the summary: every layer result of the run, in order (kept current)
  <run>/<layer>.json          one LayerResult per layer (L4a..L4d too); later cycles: <layer>.cycle<n>.json
  <run>/<layer>/              the layer's evidence: logs, screenshots, coverage
  baseline.json               L4d's last passing baseline
  cache/<layer>/<key>.json    passing results by content key (what a later run reuses)
  latest                      the id of the newest run
```
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from dispatch.core.errors import ConfigError
from dispatch.pipeline.results import LAYERS, TEST_LAYERS, LayerResult, Status

_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{4}")


class LayerRow(BaseModel):
    """One line of a run's summary."""

    layer: str
    cycle: int = 0
    status: Status
    reason: str
    attempts: int = 1
    cached: bool = False
    duration: float | None = None
    report: str = ""
    counted: bool = Field(default=True, description="false: turned off in pipeline.yaml, not part of the exit")


class RunRecord(BaseModel):
    """`run.json`: what a pipeline run did so far, and how it ended."""

    project: str
    run_id: str
    code_dir: str
    started_at: float
    ended_at: float | None = None
    state: str = "running"
    exit_code: int | None = None
    message: str = ""
    pid: int = Field(default_factory=os.getpid)
    flow_run_id: str | None = Field(default=None, description="the pipeline's Prefect flow run (its page in the UI)")
    selection: list[str] = Field(default_factory=list)
    layers: list[LayerRow] = Field(default_factory=list)
    open_bugs: list[dict[str, Any]] = Field(default_factory=list)


def project_dir(home: Path, project: str) -> Path:
    """`home/pipeline/<project>`; the name must be a plain name (it becomes a path).

    Raises:
        ConfigError: the name has a `/`, starts with a dot, or is longer than 100 characters.
    """
    if not _PROJECT.fullmatch(project):
        raise ConfigError(f"project {project[:80]!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return home / "pipeline" / project


def new_run_id() -> str:
    """A sortable, unique run id: `YYYYmmdd-HHMMSS-xxxx`."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def selection(from_layer: str | None, to_layer: str | None, only: str | None) -> tuple[list[str], list[str] | None]:
    """The layers a run covers, in order, and the L4 sub-layers when `only` names one.

    L4 always brings L3 (it tests the app L3 starts); `--only L4b` is L3 and L4 with L4b alone.

    Raises:
        ConfigError: an unknown layer, `--only` with `--from`/`--to`, or `--from` after `--to`.
    """
    known = LAYERS + TEST_LAYERS
    for flag, value in (("--from", from_layer), ("--to", to_layer), ("--only", only)):
        if value is not None and value not in known:
            raise ConfigError(f"{flag} {value[:40]!r}: not a layer; known: {', '.join(known)}")
    if only and (from_layer or to_layer):
        raise ConfigError("--only runs one layer: do not combine it with --from or --to")
    if only:
        layers, sub = [only[:2]], ([only] if only in TEST_LAYERS else None)
    else:
        first = LAYERS.index((from_layer or "L1")[:2])
        last = LAYERS.index((to_layer or "L6")[:2])
        if first > last:
            raise ConfigError(f"--from {from_layer} comes after --to {to_layer}")
        layers, sub = list(LAYERS[first:last + 1]), None
    if "L4" in layers and "L3" not in layers:
        layers.insert(layers.index("L4"), "L3")
    return layers, sub


def content_key(*parts: Any) -> str:
    """A sha256 over JSON-encoded parts (sorted keys): the cache key of a layer's inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def report_path(run_dir: Path, layer: str, cycle: int) -> Path:
    """`<run>/<layer>.json`, or `<run>/<layer>.cycle<n>.json` for a later L4-L5 cycle."""
    return run_dir / (f"{layer}.json" if cycle == 0 else f"{layer}.cycle{cycle}.json")


def write_report(run_dir: Path, result: LayerResult, mask) -> LayerResult:
    """Write `result` (and each L4 child) as JSON, secrets masked; returns it with `report_path` set."""
    children = [write_report(run_dir, child.model_copy(update={"cycle": result.cycle}), mask)
                for child in result.children]
    path = report_path(run_dir, result.layer, result.cycle)
    written = result.model_copy(update={"report_path": str(path), "children": children})
    _write_json(path, json.dumps(mask(written.model_dump(mode="json")), indent=1))
    return written


def save_run(run_dir: Path, record: RunRecord, mask) -> None:
    """Write `run.json` (atomically, masked) and point `latest` at the run."""
    _write_json(run_dir / "run.json", json.dumps(mask(record.model_dump(mode="json")), indent=1))
    _write_json(run_dir.parent / "latest", record.run_id + "\n")


def load_run(run_dir: Path) -> RunRecord | None:
    """A run's summary, or None when it has none (yet)."""
    try:
        return RunRecord.model_validate_json((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def latest_run(project_path: Path, run_id: str | None = None) -> RunRecord | None:
    """The newest run of a project (or the run `run_id`)."""
    if run_id is None:
        try:
            run_id = (project_path / "latest").read_text(encoding="utf-8").strip()
        except OSError:
            return None
    if not _RUN_ID.fullmatch(run_id):
        return None
    return load_run(project_path / run_id)


class LayerCache:
    """Passing layer results by content key, under `<project>/cache/<layer>/<key>.json`."""

    def __init__(self, project_path: Path) -> None:
        self.root = project_path / "cache"

    def get(self, layer: str, key: str) -> LayerResult | None:
        """The cached PASS of `layer` for `key`, marked cached, or None."""
        try:
            data = json.loads((self.root / layer / f"{key}.json").read_text(encoding="utf-8"))
            result = LayerResult.model_validate(data)
        except (OSError, ValueError):
            return None
        return result.model_copy(update={"cached": True}) if result.passed else None

    def put(self, layer: str, key: str, result: LayerResult, mask) -> None:
        """Remember a PASS (only a PASS: a FAIL or NOT RUN is redone next time)."""
        if result.passed:
            _write_json(self.root / layer / f"{key}.json", json.dumps(mask(result.model_dump(mode="json"))))


def final_rows(rows: list[LayerRow]) -> list[LayerRow]:
    """Each layer's last row: a later L4-L5 cycle supersedes the earlier ones."""
    return list({row.layer: row for row in rows}.values())


def exit_code(rows: list[LayerRow]) -> int:
    """0 when the final result of every counted layer is PASS, else 1."""
    return 0 if all(row.status is Status.PASS for row in final_rows(rows) if row.counted) else 1
