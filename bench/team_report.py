"""Markdown tables of bench/team.py's rounds (printed after each round; or again from its JSON).

    .venv/bin/python bench/team_report.py bench/out/team.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from team_trace import format_table  # noqa: E402


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def runs_table(result: dict) -> str:
    """One row per user's run: ratios, lock-aware latency, the flow's own phases."""
    lines = ["| run | finished | makespan s | bound s | / bound | bound given share s | / share bound | "
             "lock-aware ready->start p50 / p95 s | ready->dispatched p50 / p95 s | dispatched->started p50 / p95 s |",
             "|---" * 10 + "|"]
    for run in result["runs"]:
        phases = run.get("phases") or {}
        dispatch, start = phases.get("ready_to_dispatched_s") or {}, phases.get("dispatched_to_started_s") or {}
        lines.append(" | ".join([
            f"| {result['profile']}, {run['user']} (seed {run['seed']})", f"{run['finished']}/{run['specs']}",
            _cell(run["makespan_s"]), _cell(run["bound_s"]), _cell(run["makespan_over_bound"]),
            _cell(run["bound_given_share_s"]), _cell(run["makespan_over_bound_given_share"]),
            f"{_cell(run['lock_aware_ready_to_start_p50_s'])} / {_cell(run['lock_aware_ready_to_start_p95_s'])}",
            f"{_cell(dispatch.get('median'))} / {_cell(dispatch.get('p95'))}",
            f"{_cell(start.get('median'))} / {_cell(start.get('p95'))}"]) + " |")
    return "\n".join(lines)


def print_round(result: dict, out=None) -> None:
    """Every table of one round."""
    out = out or sys.stdout
    starts = result["spec_starts"]
    totals = result["server_totals"]
    print(f"\n### {result['profile']}, {result['users']} user(s), {result['specs_each']} specs each "
          f"({'one lock table' if result['same_repo'] else 'a lock table each'})\n", file=out)
    print(runs_table(result), file=out)
    print(f"\nspec starts {starts}; window {result['window_s']} s; span of all users {result['span_all_users_s']} s; "
          f"server: {totals['http_requests']} HTTP requests ({result['server_http_per_spec_started']} per spec "
          f"started, {totals['http_ms']:.0f} ms inside the server), {totals['websocket_messages']} websocket "
          f"messages ({result['server_ws_messages_per_spec_started']} per spec started); by user: "
          + ", ".join(f"{u} {t['http_requests']}" for u, t in result["server_by_user"].items())
          + f"; slot overruns {len(result['slot_overruns'])}, lock overlaps {len(result['lock_overlaps'])}", file=out)
    cpu = result.get("cpu") or {}
    print(f"CPU in the window: server {cpu.get('server_cpu_s')} s, PostgreSQL {cpu.get('postgres_cpu_s')} s, "
          f"dispatchers {cpu.get('dispatchers_cpu_s')} s, machine busy {cpu.get('machine_busy_fraction')}; "
          "dispatch loop waiting for the server (MainThread HTTP): "
          + ", ".join(f"{u} {s} s" for u, s in (result.get("dispatch_loop_waiting_s") or {}).items()) + "\n",
          file=out)
    print("Server side, per phase (time inside the server):\n", file=out)
    print(format_table(result["server"], starts), file=out)
    print("\nClient side, per dispatcher thread and phase (round trip as the dispatcher saw it):\n", file=out)
    print(format_table(result["client_by_thread"], starts), file=out, flush=True)


def main() -> int:
    for path in sys.argv[1:]:
        for result in json.loads(Path(path).read_text())["rounds"]:
            print_round(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
