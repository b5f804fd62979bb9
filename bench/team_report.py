"""Markdown tables of bench/team.py's rounds (printed after each round; or again from its JSON).

    .venv/bin/python bench/team_report.py [--summary] bench/out/team.json [more.json ...]

`--summary`: one per-phase table, a column per round (calls per spec started x p50 / p95 ms of the round trip).
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


_PATH_ROWS = [("slot lease: take", "`server-locks` threads, a burst of starts (the dispatch loop before dcc2db6)"),
              ("server locks: write", "lock thread, specs with `modifies`"),
              ("server locks: read", "lock thread, specs with `modifies`")]
_BACKGROUND_ROWS = ["slot lease: release", "lease records: record", "lease records: release", "server locks: release",
                    "slot lease: renew", "server locks: renew", "fair-share board: read", "fair-share board: renew",
                    "drained nodes: read", "budgets: read", "logs: POST"]


def _phase(result: dict, name: str) -> dict:
    """One phase's client-side figures summed over the threads that make it."""
    rows = [row for key, row in result["client_by_thread"].items() if key.split(" | ", 1)[1] == name]
    if not rows:
        return {}
    best = max(rows, key=lambda row: row["count"])
    return {"count": sum(row["count"] for row in rows), "p50_ms": best["p50_ms"], "p95_ms": best["p95_ms"]}


def summary_table(rounds: list[dict]) -> str:
    """Where a spec's time from ready to started goes, one column per round: calls per spec started and the
    round trip's p50 / p95 ms as the dispatcher saw it, on the path first, then what competes for the server."""
    heads = [f"{r['profile']}, {r['users']} user(s)" for r in rounds]
    lines = ["| phase | thread / when | " + " | ".join(heads) + " |", "|---|---" + "|---" * len(rounds) + "|"]

    def spread(summary: dict | None) -> str:
        summary = summary or {}
        return f"{_cell(summary.get('median'))} / {_cell(summary.get('p95'))}"

    def phases(key: str) -> list[str]:
        return [", ".join(spread((run.get("phases") or {}).get(key)) for run in r["runs"]) for r in rounds]

    lines.append("| ready -> dispatched, p50 / p95 s (per user) | flow | " + " | ".join(phases("ready_to_dispatched_s"))
                 + " |")
    loop = [", ".join(f"{r['dispatch_loop_waiting_s'].get(run['user'], 0) / run['runs'] * 1000:.0f}"
                      if run["runs"] else "-" for run in r["runs"]) for r in rounds]
    lines.append("| dispatch loop waiting for the server, ms per spec started (per user) | MainThread | "
                 + " | ".join(loop) + " |")
    for name, where in [*_PATH_ROWS, *((n, "background") for n in _BACKGROUND_ROWS)]:
        cells = []
        for r in rounds:
            row = _phase(r, name)
            cells.append(f"{row['count'] / r['spec_starts']:.2f} x {row['p50_ms']:.0f} / {row['p95_ms']:.0f}"
                         if row and r["spec_starts"] else "-")
        lines.append(f"| {name} | {where} | " + " | ".join(cells) + " |")
    lines.append("| dispatched -> started, p50 / p95 s (per user) | task engine, SSH | "
                 + " | ".join(phases("dispatched_to_started_s")) + " |")
    lines.append("| task-run events (websocket messages) per spec started | task engine | "
                 + " | ".join(_cell(r["server_ws_messages_per_spec_started"]) for r in rounds) + " |")
    lines.append("| **server HTTP requests per spec started** | all | "
                 + " | ".join(_cell(r["server_http_per_spec_started"]) for r in rounds) + " |")
    lines.append("| makespan / bound (per user) | | " + " | ".join(
        ", ".join(_cell(run["makespan_over_bound"]) for run in r["runs"]) for r in rounds) + " |")
    lines.append("| lock-aware ready -> start p50 / p95 s (per user) | | " + " | ".join(", ".join(
        f"{_cell(run['lock_aware_ready_to_start_p50_s'])} / {_cell(run['lock_aware_ready_to_start_p95_s'])}"
        for run in r["runs"]) for r in rounds) + " |")
    lines.append("| CPU s in the round: server / PostgreSQL / dispatchers; machine busy | | " + " | ".join(
        f"{r['cpu']['server_cpu_s']} / {r['cpu']['postgres_cpu_s']} / {r['cpu']['dispatchers_cpu_s']}; "
        f"{r['cpu']['machine_busy_fraction']}" for r in rounds) + " |")
    lines.append("| CPU ms per spec started: server / dispatchers | | " + " | ".join(
        f"{r['cpu']['server_cpu_s'] / r['spec_starts'] * 1000:.0f} / "
        f"{r['cpu']['dispatchers_cpu_s'] / r['spec_starts'] * 1000:.0f}" if r["spec_starts"] else "-"
        for r in rounds) + " |")
    return "\n".join(lines)


def main() -> int:
    args = sys.argv[1:]
    summary = "--summary" in args
    rounds = [r for path in args if path != "--summary" for r in json.loads(Path(path).read_text())["rounds"]]
    if summary:
        print(summary_table(rounds))
    else:
        for result in rounds:
            print_round(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
