"""Request traces of team-mode runs: what each call to the Prefect server was for, and tables of them.

Two sources write the same record shape, one JSON list per line:

    [start (epoch s), duration (ms), who, method, route, family]

- the server side (bench/team_server.py): every HTTP request the server answered, timed inside the server
  (an ASGI middleware around Prefect's own app), `who` = the `X-Bench-User` header each dispatcher sends
  (PREFECT_CLIENT_CUSTOM_HEADERS), and every websocket message a client sent (`method` = "WS", 0 ms);
- the client side (bench/team_hook/sitecustomize.py): every HTTP round trip of the dispatcher processes,
  timed around httpx's `send` (queueing for a connection and the client's own work included), `who` = the
  calling thread's name, which tells the dispatch loop from the background threads.

`family` says what a call is for, from its route and, for Variables, the name it writes or the prefix it
reads (the product's naming: `dispatch_lock_`, `dispatch_lease_`, `dispatch_share_`, ...); `phase()` maps
route and family to the rows of the per-phase table.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

_ID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.IGNORECASE)
_FAMILIES = {"dispatch_lock_": "server locks", "dispatch_lease_": "lease records",
             "dispatch_share_": "fair-share board", "dispatch_cooldown_": "cool-downs",
             "dispatch_usage_": "budgets", "dispatch_drain": "drained nodes"}


def template(path: str) -> str:
    """A request path with ids and Variable names folded: `/api/flow_runs/{id}/set_state`."""
    path = path.removeprefix("/api")
    path = _ID.sub("{id}", path)
    return re.sub(r"^/variables/name/[^/]+", "/variables/name/{name}", path)


def variable_family(name: str) -> str:
    """What a Variable (or a name prefix read with `like_`) is for: `server locks`, `lease records`, ..."""
    for prefix, family in _FAMILIES.items():
        if name.startswith(prefix):
            return family
    return "other variables" if name else ""


def family_of(path: str, body: bytes | str | None) -> str:
    """The Variable family a request touches: the name in its path, or in its JSON body (create, filter)."""
    if "/variables" not in path:
        return ""
    if "/variables/name/" in path:
        return variable_family(path.rsplit("/variables/name/", 1)[1].split("/")[0])
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return "other variables"
    if isinstance(data, dict):
        if isinstance(data.get("name"), str):
            return variable_family(data["name"])
        like = (((data.get("variables") or {}).get("name") or {}).get("like_"))
        if isinstance(like, str):
            return variable_family(like)
    return "other variables"


_SLOT_ROUTES = {"/v2/concurrency_limits/increment-with-lease": "slot lease: take",
                "/v2/concurrency_limits/decrement-with-lease": "slot lease: release",
                "/v2/concurrency_limits/leases/{id}/renew": "slot lease: renew"}
_VERBS = {"POST": "write", "PATCH": "renew", "DELETE": "release", "GET": "read", "PUT": "write"}


def phase(method: str, route: str, family: str) -> str:
    """The row of the per-phase table a call belongs to."""
    if method == "WS":
        return f"events (websocket): {family or route}"
    if route in _SLOT_ROUTES:
        return _SLOT_ROUTES[route]
    if family:
        verb = "read" if route.endswith("/filter") else _VERBS.get(method, method.lower())
        if family == "lease records" and verb == "write":
            verb = "record"
        return f"{family}: {verb}"
    if route.startswith("/v2/concurrency_limits") or route.startswith("/concurrency_limits"):
        return "slot limits: other"
    head = route.strip("/").split("/")[0] or "/"
    return f"{head}: {method} {route}" if head in ("flow_runs", "task_runs") else f"{head}: {method}"


def read_trace(paths: list[Path]) -> list[list]:
    """Every record of the trace files (missing files and half-written last lines skipped)."""
    records = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def route_table(records: list[list], window: tuple[float, float], *, by_who: bool = False) -> dict:
    """Per phase (and per `who` when `by_who`): count, total ms, p50 and p95 ms of the calls in `window`."""
    from measures import percentile  # here: the client hook imports this module without bench's imports

    start, end = window
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t0, ms, who, method, route, family in records:
        if start <= t0 <= end:
            groups[(who if by_who else "", phase(method, route, family))].append(ms)
    table: dict[str, dict] = {}
    for (who, name), values in sorted(groups.items()):
        key = f"{who} | {name}" if by_who else name
        table[key] = {"count": len(values), "total_ms": round(sum(values), 1),
                      "p50_ms": round(percentile(values, 0.5), 2), "p95_ms": round(percentile(values, 0.95), 2)}
    return table


def totals(records: list[list], window: tuple[float, float], who: str | None = None) -> dict:
    """HTTP requests and websocket messages in `window` (of one `who`, or everyone's)."""
    start, end = window
    chosen = [r for r in records if start <= r[0] <= end and (who is None or r[2] == who)]
    http = [r for r in chosen if r[3] != "WS"]
    return {"http_requests": len(http), "websocket_messages": len(chosen) - len(http),
            "http_ms": round(sum(r[1] for r in http), 1)}


def format_table(table: dict, starts: int) -> str:
    """A markdown table of `route_table`'s rows, with calls per spec started."""
    lines = ["| phase / route | calls | per spec started | total ms | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for name, row in sorted(table.items(), key=lambda item: -item[1]["total_ms"]):
        per = row["count"] / starts if starts else 0.0
        lines.append(f"| {name} | {row['count']} | {per:.2f} | {row['total_ms']:.0f} | {row['p50_ms']} | "
                     f"{row['p95_ms']} |")
    return "\n".join(lines)
