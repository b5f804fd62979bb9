"""The nightly regression's memory: one snapshot per night of what L4 saw, and what got worse since the last.

`DISPATCH_HOME/pipeline/<project>/nightly/<run>.json` holds, per night: L3/L4's results, the failing API
cases (L4a), the failing page loads and flows (L4b), the failing tests, the coverage and the page times
(L4d). Comparing two nights lists newly failing tests, a coverage drop, slower pages and new API or
browser failures; nothing new is silence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dispatch.pipeline.runs import RunRecord, final_rows

_SLOWER = 1.5  # a page is slower when it takes 1.5 x its previous time (and 0.1 s more)


def _report(run_dir: Path, layer: str) -> dict[str, Any]:
    try:
        return json.loads((run_dir / f"{layer}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def snapshot(record: RunRecord, run_dir: Path) -> dict[str, Any]:
    """What one night's L3-L4 run saw (from its reports)."""
    regression = _report(run_dir, "L4d").get("evidence", {})
    return {
        "run": record.run_id,
        "started_at": record.started_at,
        "layers": {row.layer: row.status.value for row in final_rows(record.layers)},
        "api_failures": sorted(c["name"] for c in _report(run_dir, "L4a").get("checks", []) if c["verdict"] == "fail"),
        "browser_failures": sorted(c["name"] for c in _report(run_dir, "L4b").get("checks", [])
                                   if c["verdict"] == "fail"),
        "failing_tests": sorted(t for t, outcome in (regression.get("tests") or {}).items()
                                if outcome in ("failed", "error")),
        "coverage": regression.get("coverage"),
        "pages": regression.get("pages") or {},
    }


def worse(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What got worse from `before` to `now`, one line each (empty: nothing, or no night before)."""
    if not before:
        return []
    lines = []
    for layer, status in now["layers"].items():
        if before["layers"].get(layer) == "PASS" and status != "PASS":
            lines.append(f"{layer} was PASS, now {status}")
    for key, label in (("failing_tests", "test newly failing"), ("api_failures", "API case newly failing"),
                       ("browser_failures", "browser check newly failing")):
        lines += [f"{label}: {name}" for name in sorted(set(now[key]) - set(before.get(key, [])))]
    if before.get("coverage") is not None and now["coverage"] is not None and now["coverage"] < before["coverage"]:
        lines.append(f"coverage dropped from {before['coverage']}% to {now['coverage']}%")
    for page, seconds in now["pages"].items():
        old = (before.get("pages") or {}).get(page)
        if seconds is None and old is not None:
            lines.append(f"page {page} no longer loads")
        elif seconds is not None and old is not None and seconds > old * _SLOWER + 0.1:
            lines.append(f"page {page} slower: {old:.2f}s -> {seconds:.2f}s")
    return lines


def previous(project_path: Path, run_id: str) -> dict[str, Any] | None:
    """The newest night before `run_id`."""
    folder = project_path / "nightly"
    earlier = sorted(p for p in folder.glob("*.json") if p.stem < run_id) if folder.is_dir() else []
    for path in reversed(earlier):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def save(project_path: Path, night: dict[str, Any]) -> Path:
    """Keep `night` as `nightly/<run>.json` (atomically)."""
    folder = project_path / "nightly"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{night['run']}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(night, indent=1), encoding="utf-8")
    os.replace(temporary, path)
    return path
