"""Snapshot and restore of a real history: size and time of `dispatch snapshot`, time of `dispatch restore`.

    .venv/bin/python bench/snapshot.py [--specs 1000] [--slots 8] [--keep-dir DIR]

Makes a history for real, in a fresh DISPATCH_HOME in embedded mode (`DISPATCH_SERVER=ephemeral`, Prefect on
SQLite): one project of N shell specs (`echo`, no dependencies) run by `dispatch start` to the end, so the
database holds N task runs with their states and logs, and the home N run directories, state rows and cache
entries. Then times, as separate `dispatch` processes (wall clock, interpreter start included):
`dispatch snapshot` (archive size, database size, files), and, after the home's history and the database are
deleted, `dispatch restore`; checks that the restored database holds the N task runs. Writes
bench/out/snapshot.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from measures import write_result  # noqa: E402

DISPATCH = str(Path(sys.executable).with_name("dispatch"))


def _dispatch(env: dict[str, str], *args: str, timeout: float = 3600) -> tuple[float, str]:
    began = time.monotonic()
    done = subprocess.run([DISPATCH, *args], env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"dispatch {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def _write_project(specs: Path, count: int) -> None:
    project = specs / "history"
    project.mkdir(parents=True)
    for number in range(1, count + 1):
        (project / f"S{number:04d}-step.md").write_text(
            f"---\nkind: shell\nretries: 0\n---\n## Goal\nStep {number}.\n\n```bash\necho step {number}\n```\n",
            encoding="utf-8")


def _task_runs(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT count(*) FROM task_run").fetchone()[0]


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--keep-dir", type=Path, help="work here and keep it (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "snapshot.json")
    args = parser.parse_args()
    work = args.keep_dir or Path(tempfile.mkdtemp(prefix="dispatch-bench-snapshot-"))
    work.mkdir(parents=True, exist_ok=True)
    home, specs, dest = work / "home", work / "specs", work / "snapshots"
    _write_project(specs, args.specs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DISPATCH_"))}
    env |= {"DISPATCH_HOME": str(home), "DISPATCH_SPECS": str(specs), "DISPATCH_SERVER": "ephemeral",
            "DISPATCH_LOCAL_SLOTS": str(args.slots), "HOME": str(work)}
    try:
        run_seconds, _ = _dispatch(env, "start", "history")
        database = home / "prefect" / "prefect.db"
        history = {"task_runs": _task_runs(database), "database_bytes": database.stat().st_size,
                   "home_bytes": _size(home) - _size(home / "prefect")}
        snap_seconds, out = _dispatch(env, "snapshot", "--dest", str(dest), "--json")
        shot = json.loads(out)
        for area in ("state", "results", "runs", "cache", "prefect"):
            shutil.rmtree(home / area, ignore_errors=True)
        restore_seconds, _ = _dispatch(env, "restore", shot["archive"])
        restored = _task_runs(database)
        if restored != history["task_runs"]:
            raise SystemExit(f"the restored database holds {restored} task runs, not {history['task_runs']}")
        result = {"specs": args.specs, "slots": args.slots, "run_seconds": round(run_seconds, 1), **history,
                  "archive_bytes": shot["bytes"], "archive_files": shot["files"],
                  "snapshot_seconds": round(snap_seconds, 2), "snapshot_seconds_inside": shot["seconds"],
                  "restore_seconds": round(restore_seconds, 2), "restored_task_runs": restored,
                  "command": f".venv/bin/python bench/snapshot.py --specs {args.specs} --slots {args.slots}"}
    finally:
        if args.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"history of {args.specs} specs ({result['task_runs']} task runs; database "
          f"{result['database_bytes'] / 2**20:.1f} MiB, home {result['home_bytes'] / 2**20:.1f} MiB; the run took "
          f"{result['run_seconds']} s)")
    print(f"dispatch snapshot: {result['archive_bytes'] / 2**20:.2f} MiB archive, {result['archive_files']} files, "
          f"{result['snapshot_seconds']} s wall ({result['snapshot_seconds_inside']} s inside the command)")
    print(f"dispatch restore:  {result['restore_seconds']} s wall, {restored} task runs back")
    print(f"command: {result['command']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
