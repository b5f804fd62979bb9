"""The user's fast paths, the local server that stays against today's temporary (ephemeral) server, side by side.

    .venv/bin/python bench/fast_paths.py [--rounds 3] [--modes ephemeral,local] [--project demo]
        [--before DIR]   # also today's code: git archive <commit> | tar -x -C DIR

Per round and mode (the modes alternate, so all see the same machine load), in a fresh DISPATCH_HOME with no
PREFECT_* variable (the embedded default, as on a fresh machine) and `DISPATCH_SERVER=<mode>`; mode `before`
runs the code in DIR (`python -m dispatch.cli.main` with DIR first on PYTHONPATH, this virtualenv's packages):

1. `dispatch start demo`: first run on a fresh home (database created; in `local` mode the server started);
2. `dispatch start demo` again: every spec cached;
3. `dispatch start demo` after every spec file was edited (a comment appended): every spec runs again, with
   the server (in `local` mode) already up. (`--force` is not used: on the local node it takes back the
   previous attempt's result from the run directory instead of running the spec again.)
4. `dispatch status demo` (5 times, the median).

Reported: wall time of each command (process start to exit, as a user waits for it) and, for 1 and 3, the
seconds from the command's start to the first spec running (the root spec's runner `started_at` in its
`status.json`). `local` rounds end with `dispatch server stop`. Ratios are each mode / the first mode, of
the medians. Python writes its bytecode caches as on a user's machine (PYTHONDONTWRITEBYTECODE is dropped:
set, every command compiled dispatch/, flows/ and tasks/ again). Writes bench/out/fast_paths.json. No
thresholds: the figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def _environment(home: Path, specs: Path, mode: str, before: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "DISPATCH_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs), "COLUMNS": "200",
            "DISPATCH_SERVER": "ephemeral" if mode == "before" else mode}
    if mode == "before":
        env["PYTHONPATH"] = str(before)
    return env


def _timed(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, wall-clock start) of one command; its output appended to `log`."""
    began, wall = time.monotonic(), time.time()
    with open(log, "ab") as out:
        code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900,
                              cwd=log.parent).returncode  # not the checkout: `python -m` would import it first
    took = time.monotonic() - began
    if code != 0:
        raise SystemExit(f"{' '.join(argv[1:])} exited {code}; see {log}")
    return took, wall


def _first_spec_started(home: Path, project: str, since: float) -> float | None:
    """Seconds from `since` to the first runner start of this run (status.json `started_at`)."""
    starts = []
    for status in (home / "runs" / project / "tasks").glob("*/status.json"):
        started = json.loads(status.read_text()).get("started_at")
        if started and started >= since:
            starts.append(started)
    return min(starts) - since if starts else None


def one_round(mode: str, base: Path, project: str, before: Path | None) -> dict:
    home, specs = base / mode / "home", base / mode / "specs"
    home.mkdir(parents=True)
    shutil.copytree(ROOT / "examples" / project / "specs", specs / project)
    env, log = _environment(home, specs, mode, before), base / mode / "commands.log"
    dispatch = [sys.executable, "-m", "dispatch.cli.main"] if mode == "before" else [DISPATCH]
    row: dict = {}
    try:
        row["first_wall"], began = _timed([*dispatch, "start", project], env, log)
        row["first_to_spec"] = _first_spec_started(home, project, began)
        row["cached_wall"], _ = _timed([*dispatch, "start", project], env, log)
        for spec in (specs / project).glob("[SP][0-9]*.md"):
            spec.write_text(spec.read_text() + "\n<!-- edited -->\n")
        row["edited_wall"], began = _timed([*dispatch, "start", project], env, log)
        row["edited_to_spec"] = _first_spec_started(home, project, began)
        row["status_wall"] = statistics.median(_timed([*dispatch, "status", project], env, log)[0] for _ in range(5))
    finally:
        if mode == "local":
            subprocess.run([*dispatch, "server", "stop"], env=env, capture_output=True, timeout=120, cwd=log.parent)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="ephemeral,local")
    parser.add_argument("--project", default="demo")
    parser.add_argument("--before", type=Path, help="a checkout of today's code, run as mode `before` first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "fast_paths.json")
    args = parser.parse_args()
    modes = (["before"] if args.before else []) + args.modes.split(",")
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="dispatch-fast-") as tmp:
        for number in range(args.rounds):
            for mode in modes:
                row = one_round(mode, Path(tmp) / f"round{number}", args.project, args.before)
                rows[mode].append(row)
                print(mode, {k: round(v, 2) if v is not None else None for k, v in row.items()}, flush=True)
    measures = list(next(iter(rows.values()))[0])
    medians = {mode: {m: statistics.median(r[m] for r in rows[mode] if r[m] is not None) for m in measures}
               for mode in modes}
    print(f"\n{'median (s)':<16}" + "".join(f"{mode:>12}" for mode in modes)
          + "".join(f"{mode + '/' + modes[0]:>18}" for mode in modes[1:]))
    for measure in measures:
        values = [medians[mode][measure] for mode in modes]
        print(f"{measure:<16}" + "".join(f"{v:>12.2f}" for v in values)
              + "".join(f"{v / values[0]:>18.2f}" for v in values[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rows, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
