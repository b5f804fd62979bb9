"""Client-side request trace for bench/team.py: imported at start-up by a dispatcher whose PYTHONPATH has this
directory first, active only when BENCH_TEAM_CLIENT_TRACE names a directory.

Wraps httpx's `Client.send` and `AsyncClient.send` (every HTTP round trip the Prefect client makes, retries
apart) and writes bench/team_trace.py's records, `who` = the calling thread's name, to
`<dir>/client-<pid>.jsonl` every half second and at exit. Measurement only: the wrapped calls behave as before.
"""

from __future__ import annotations

import os

if os.environ.get("BENCH_TEAM_CLIENT_TRACE"):
    import atexit
    import json
    import sys
    import threading
    import time
    from pathlib import Path

    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    import httpx
    from team_trace import family_of, template

    _records: list[list] = []
    _lock = threading.Lock()
    _path = Path(os.environ["BENCH_TEAM_CLIENT_TRACE"]) / f"client-{os.getpid()}.jsonl"

    def _flush() -> None:
        global _records
        with _lock:
            batch, _records = _records, []
            if batch:
                with open(_path, "a") as handle:
                    handle.write("".join(json.dumps(r) + "\n" for r in batch))

    def _writer() -> None:
        while True:
            time.sleep(0.5)
            _flush()

    def _record(request: httpx.Request, start: float, clock: float) -> None:
        body = request.content if "/variables" in request.url.path and request.method == "POST" else b""
        _records.append([round(start, 4), round((time.perf_counter() - clock) * 1000, 2),
                         threading.current_thread().name, request.method, template(request.url.path),
                         family_of(request.url.path, body)])

    _sync_send, _async_send = httpx.Client.send, httpx.AsyncClient.send

    def _send(self, request, *args, **kwargs):
        start, clock = time.time(), time.perf_counter()
        try:
            return _sync_send(self, request, *args, **kwargs)
        finally:
            _record(request, start, clock)

    async def _asend(self, request, *args, **kwargs):
        start, clock = time.time(), time.perf_counter()
        try:
            return await _async_send(self, request, *args, **kwargs)
        finally:
            _record(request, start, clock)

    httpx.Client.send, httpx.AsyncClient.send = _send, _asend
    threading.Thread(target=_writer, name="bench-trace-writer", daemon=True).start()
    atexit.register(_flush)

if os.environ.get("BENCH_DISPATCH_PROFILE"):  # where the dispatcher's threads spend their CPU (bench only)
    import atexit
    import sys
    from pathlib import Path

    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from team_server import StackSampler

    _sampler = StackSampler(Path(os.environ["BENCH_DISPATCH_PROFILE"]) / f"dispatch-{os.getpid()}.json")
    atexit.register(_sampler.write)
