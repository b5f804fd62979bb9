"""A `prefect server start` that also writes down every request it answers (bench/team_trace.py's records).

    .venv/bin/python bench/team_server.py --port 4200 --trace /tmp/server-trace.jsonl

The same app and settings as `prefect server start` in the foreground (one uvicorn worker, services on:
Prefect's `_run_in_foreground`), wrapped in an ASGI middleware that times each HTTP request inside the
server and counts each websocket message a client sends. Nothing of Prefect or of the dispatcher changes:
the clients talk to it as to any server. `InstrumentedServer` is rigs/localserver.py's `TeamServer`
started this way; `traced_server()` adds the throwaway PostgreSQL under it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from team_trace import family_of, template  # noqa: E402

_FLUSH_S = 0.5
_USER_HEADER = b"x-bench-user"


class TraceSink:
    """Records appended from the event loop, written to a JSONL file by a thread every `_FLUSH_S`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[list] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="trace-writer", daemon=True)
        self.thread.start()

    def add(self, record: list) -> None:
        self.records.append(record)

    def flush(self) -> None:
        with self.lock:
            batch, self.records = self.records, []
            if batch:
                with open(self.path, "a") as handle:
                    handle.write("".join(json.dumps(r) + "\n" for r in batch))

    def _loop(self) -> None:
        while not self.stop.wait(_FLUSH_S):
            self.flush()


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return ""


def _event_family(text: str | None) -> str:
    """`prefect.task-run.Running` -> `prefect.task-run`: what kind of event a websocket message carries."""
    try:
        name = json.loads(text or "{}").get("event", "")
    except (ValueError, AttributeError):
        return "other"
    return ".".join(name.split(".")[:2]) or "other"


class Trace:
    """ASGI middleware: one record per HTTP request (timed here) and per websocket message received."""

    def __init__(self, app, sink: TraceSink) -> None:
        self.app, self.sink = app, sink

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await self.app(scope, self._counting(scope, receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        family = ""
        if "/variables" in path:
            body = b""
            if method == "POST":  # the name (create) or prefix (filter) is in the body: read it, then replay
                messages = []
                while True:
                    message = await receive()
                    messages.append(message)
                    body += message.get("body", b"")
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
                receive = _replay(messages, receive)
            family = family_of(path, body)
        start, clock = time.time(), time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.sink.add([round(start, 4), round((time.perf_counter() - clock) * 1000, 2),
                           _header(scope, _USER_HEADER), method, template(path), family])

    def _counting(self, scope, receive):
        who, route = _header(scope, _USER_HEADER), template(scope["path"])

        async def counted():
            message = await receive()
            if message["type"] == "websocket.receive":
                self.sink.add([round(time.time(), 4), 0.0, who, "WS", route, _event_family(message.get("text"))])
            return message

        return counted


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


class StackSampler:
    """Where the server's threads spend their CPU: every `interval` s, each busy thread's stack is counted.

    A thread whose innermost frame waits (`select`, `epoll`, a lock, a queue) counts as idle. Written as
    JSON (`top`: self samples by function, `cumulative`: samples with the function anywhere on the stack)
    every few seconds and at the end. Turned on by `BENCH_SERVER_PROFILE=<file>` (bench only).

    It sees the other threads only when it holds the GIL, so a thread inside a system call (a socket write,
    an `lstat`) is counted more often than its CPU time says: good for finding what runs at all (it found a
    new client per background read), not for CPU shares. For those, an outside sampler (py-spy, not a
    dependency of ours: `py-spy record --pid <pid> --format raw`) was used in docs/performance.md.
    """

    _IDLE = {"select", "poll", "epoll", "wait", "_wait_for_tstate_lock", "get", "sleep", "accept", "recv",
             "_worker", "run_forever", "readline", "read"}

    def __init__(self, path: Path, interval: float = 0.005) -> None:
        self.path, self.interval = path, interval
        self.top: dict[str, int] = {}
        self.cumulative: dict[str, int] = {}
        self.samples = self.busy = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="stack-sampler", daemon=True)
        self.thread.start()

    @staticmethod
    def _key(frame) -> str:
        code = frame.f_code
        return f"{code.co_filename.split('site-packages/')[-1]}:{code.co_name}"

    def _loop(self) -> None:
        me, written = threading.get_ident(), time.monotonic()
        while not self.stop.wait(self.interval):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                self.samples += 1
                if frame.f_code.co_name in self._IDLE:
                    continue
                self.busy += 1
                key = self._key(frame)
                self.top[key] = self.top.get(key, 0) + 1
                seen = set()
                while frame is not None:
                    key = self._key(frame)
                    if key not in seen:
                        seen.add(key)
                        self.cumulative[key] = self.cumulative.get(key, 0) + 1
                    frame = frame.f_back
            if time.monotonic() - written > 5:
                self.write()
                written = time.monotonic()

    def write(self) -> None:
        def best(counts: dict[str, int]) -> list:
            return sorted(counts.items(), key=lambda item: -item[1])[:150]

        self.path.write_text(json.dumps({"samples": self.samples, "busy": self.busy, "top": best(self.top),
                                         "cumulative": best(self.cumulative)}, indent=0))


def serve(host: str, port: int, trace: Path) -> None:
    """Prefect's foreground server (`prefect server start`, one worker), wrapped in `Trace`."""
    import os

    import prefect
    import prefect.settings
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
    )

    sink = TraceSink(trace)
    sampler = StackSampler(Path(os.environ["BENCH_SERVER_PROFILE"])) if os.environ.get("BENCH_SERVER_PROFILE") else None
    try:
        uvicorn.run(app=Trace(create_app(final=True, webserver_only=False), sink),
                    app_dir=str(prefect.__module_path__.parent), host=host, port=port,
                    timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
                    ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
                    ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(), log_level="warning")
    finally:
        sink.stop.set()
        sink.flush()
        if sampler is not None:
            sampler.stop.set()
            sampler.write()


@dataclass
class InstrumentedServer:
    """rigs/localserver.py's TeamServer, started through `serve` so that it writes `trace`."""

    server: object  # a TeamServer
    trace: Path

    def start(self) -> None:
        import subprocess

        from rigs.localserver import wait_healthy

        server = self.server
        env = {**server.env(), "PREFECT_HOME": str(server.home / "server"), "PREFECT_UI_ENABLED": "false",
               "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
               "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
        if server.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = server.database_url
        env.pop("PREFECT_API_URL", None)
        server.home.mkdir(parents=True, exist_ok=True)
        with open(server.log, "ab") as log:
            server.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--host", "127.0.0.1",
                                            "--port", str(server.port), "--trace", str(self.trace)], env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(server.url, server.proc, server.log)


@dataclass
class Traced:
    """A started traced server: its API URL, its process and PostgreSQL's postmaster (for their CPU time)."""

    url: str
    server_pid: int
    postgres_pid: int | None


@contextmanager
def traced_server(base: Path, trace: Path) -> Iterator[Traced]:
    """A throwaway PostgreSQL and a traced Prefect server on it."""
    from rigs.localserver import PostgresCluster, TeamServer

    cluster = PostgresCluster()
    server = TeamServer(cluster.start(), base / "prefect-postgres")
    try:
        InstrumentedServer(server, trace).start()
        pid_file = cluster.data / "postmaster.pid"
        postgres = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        yield Traced(server.url, server.proc.pid, postgres)
    finally:
        server.stop()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--trace", type=Path, required=True)
    args = parser.parse_args()
    serve(args.host, args.port, args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
