"""Merge schedule result files and print the ours / baseline table as markdown.

    .venv/bin/python bench/report.py bench/out/schedule_seed1.json bench/out/schedule_seeds23.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from schedule import ROWS, _get  # noqa: E402


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def main() -> int:
    results = []
    for path in sys.argv[1:]:
        results += json.loads(Path(path).read_text())["results"]
    results.sort(key=lambda r: r["seed"])
    header = "| measure | " + " | ".join(f"seed {r['seed']} ours | baseline | ours/base" for r in results) + " |"
    lines = [header, "|---" * (1 + 3 * len(results)) + "|"]
    for label, path in ROWS:
        cells = []
        for r in results:
            ours, base = _get(r.get("ours"), path), _get(r.get("baseline"), path)
            numbers = isinstance(ours, (int, float)) and isinstance(base, (int, float)) and base
            ratio = f"{ours / base:.2f}" if numbers else "-"
            cells += [fmt(ours), fmt(base), ratio]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
