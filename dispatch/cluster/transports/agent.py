"""One `runner.pyz serve` per node, shared by every attempt the dispatcher runs there: the one way a run is started,
re-attached to, recovered, followed, killed and its result read, on an SSH node and on this machine alike.

Each attempt is one JSON line on the agent's stdin. The agent forks the runner into its own session (it
outlives the agent), watches its end with a pidfd and streams its log lines and `result.json` back on stdout.
On a 2-core machine running 140 slots this took the node-side CPU per attempt from ~0.14 s (a runner and a
follower started per attempt) to a few ms (docs/performance.md).

The stream is an SSH channel (`SSHPool.open_stream`) or, on the local node, a subprocess of this machine whose
stdin is a Unix socket, so that a request can carry the machine slot's lock to its runner
(dispatch/cluster/transports/local.py).

The runners do not depend on the agent: if its stream ends, they carry on, and every waiting attempt asks a new
agent again, which re-attaches to its runner (or reads its result). An earlier attempt's runner in the run
directory (an edited spec) is killed, and waited for, before the attempt is asked for again.

The agent also enforces the node's own slot count (`serve --slots`): past that many live runners under the
run root, whoever started them, it starts nothing and the attempt comes back with status `NODE_FULL`, which
the dispatcher requeues briefly instead of counting as a failure.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from dispatch.cluster.transports import LineSink
from dispatch.core.errors import NodeError

logger = logging.getLogger(__name__)

NODE_FULL = "node_full"
"""The status of an attempt the node refused to start because its slots were all taken (not a failure)."""


_REATTACH = 2  # times an attempt asks a new agent again after its agent's stream ended, before it is lost
KILL_WAIT = 60.0  # seconds a kill may take on the node (the runner's grace, SIGKILL, its step's group)


class AgentLost(NodeError):
    """The agent's channel ended before this attempt's result came back (the runner may still run)."""


class Stream(Protocol):
    """A started `runner.pyz serve`: its stdin and its output lines. `send` takes descriptors (`fds`) only on a
    local stream; an SSH stream is never given any."""

    def send(self, data: bytes) -> None: ...

    def lines(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class NodeAgent:
    """The dispatcher's end of one node's agent: many attempts at once over one stream.

    Args:
        node: the node's name (for errors).
        start: opens a new stream running `runner.pyz serve` on the node (raises NodeError).
    """

    def __init__(self, node: str, start: Callable[[], Stream]) -> None:
        self.node = node
        self._start = start
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._pending: dict[int, queue.Queue] = {}
        self._ids = itertools.count(1)
        self._cancelled: set[str] = set()  # run directories killed while (or before) their attempt ran
        self._closed = False

    def _register(self, events: queue.Queue) -> tuple[Stream, int]:
        """The live stream (started if needed) and a new request id whose events go to `events`."""
        with self._lock:
            if self._closed:
                raise NodeError(self.node, "its transport was closed (the runners go on)")
            if self._stream is None:
                stream = self._start()
                self._stream, self._pending = stream, {}
                threading.Thread(target=self._read, args=(stream, self._pending), name=f"agent-{self.node}",
                                 daemon=True).start()
            rid = next(self._ids)
            self._pending[rid] = events
            return self._stream, rid

    def _read(self, stream: Stream, pending: dict[int, queue.Queue]) -> None:
        """Route each event to its attempt's queue; at the end tell every attempt still waiting."""
        for raw in stream.lines():
            try:
                event = json.loads(raw)
                rid = event["id"]
            except (ValueError, TypeError, KeyError):
                logger.warning("node %s agent: %s", self.node, raw.decode(errors="replace").rstrip())
                continue
            waiting = pending.get(rid)
            if waiting is not None:
                waiting.put(event)
            elif event.get("event") == "error":
                logger.warning("node %s agent: %s", self.node, event.get("message"))
        with self._lock:  # no attempt registers on this stream after this
            if self._stream is stream:
                self._stream = None
            waiters = list(pending.values())
        for waiting in waiters:
            waiting.put(None)
        stream.close()

    def run(self, run_dir: str, task: dict, secrets: dict[str, str] | None, on_line: LineSink,
            timeout: float, *, fd: int | None = None, start: bool = True) -> dict | None:
        """Start (or re-attach to, or recover) the attempt in `run_dir`, block until it ends and return its
        `result.json`; a result with status `NODE_FULL` (nothing started) when the node already runs as many
        runners as it has slots; None when `start` is false and there is nothing to attach to or recover.

        An earlier attempt's runner in `run_dir` is killed and waited for first; when the agent's stream ends
        meanwhile, a new agent is asked again (it re-attaches), `_REATTACH` times at most.

        Args:
            fd: a descriptor the runner inherits and holds while it lives (the local node's machine slot).

        Raises:
            AgentLost: the stream ended again and again (the runner may still run).
            NodeError: the agent could not be started or could not run it, or gave no result in `timeout` s.
            ValueError: the runner ended without a result.json.
        """
        deadline = time.monotonic() + timeout
        killed = lost = 0
        request = {"op": "run", "run_dir": run_dir, "task": task, "secrets": secrets or {}, "start": start}
        try:
            while True:
                try:
                    kind, event = self._ask(request, deadline, on_line, fd)
                except AgentLost:
                    lost += 1
                    if lost > _REATTACH:
                        raise
                    on_line("the node's agent was lost; asking a new one (the runner goes on)")
                    continue
                if kind == "earlier":  # an edited spec's runner (or its orphaned step) must stop first
                    if killed:
                        raise NodeError(self.node, f"another runner still holds {run_dir} after it was killed")
                    killed += 1
                    on_line("stopping the runner of an earlier version of this spec")
                    self._ask({"op": "kill", "run_dir": run_dir}, time.monotonic() + KILL_WAIT, lambda _: None)
                    continue
                if kind == "absent":
                    return None
                if kind == "full":
                    reason = f"{event.get('message') or 'node full'}; requeued"
                    return {"status": NODE_FULL, "reason": reason, "retryable": True}
                if kind == "recovered":
                    on_line("recovered the result of this attempt, which finished while no dispatcher watched")
                if not isinstance(event.get("result"), dict):
                    raise ValueError(f"no result.json in {run_dir} after the runner ended")
                return event["result"]
        finally:
            with self._lock:
                self._cancelled.discard(run_dir)

    def kill(self, run_dir: str, timeout: float = KILL_WAIT) -> dict:
        """Stop the run in `run_dir` and wait until it has gone; `kill`'s report. An attempt of `run_dir` that
        starts (or is re-attached to) later through this agent is killed too.

        Raises:
            NodeError: the agent could not be reached or could not stop it in `timeout` s.
        """
        with self._lock:
            self._cancelled.add(run_dir)
        _, event = self._ask({"op": "kill", "run_dir": run_dir}, time.monotonic() + timeout, lambda _: None)
        return event.get("report") or {}

    def _ask(self, request: dict, deadline: float, on_line: LineSink, fd: int | None = None) -> tuple[str, dict]:
        """Send one request and wait for its final event, `on_line` getting its log lines: (kind, event)."""
        events: queue.Queue = queue.Queue()
        stream, rid = self._register(events)
        run_dir = request["run_dir"]
        try:
            line = json.dumps({**request, "id": rid, "fd": fd is not None}).encode() + b"\n"
            try:
                if fd is None:
                    stream.send(line)
                else:
                    stream.send(line, fds=(fd,))  # type: ignore[call-arg]  # a local stream only
            except NodeError as exc:  # a stream that cannot be written to is gone: the next request starts anew
                self._drop(stream)
                raise AgentLost(self.node, f"could not send {run_dir} to the node's agent: {exc}") from exc
            while True:
                try:
                    event = events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise NodeError(self.node, f"no answer from the node's agent in time for {run_dir}") from None
                if event is None:
                    raise AgentLost(self.node, f"the agent's connection ended while {run_dir} ran")
                kind = event.get("event")
                if kind == "log":
                    for text in event.get("lines") or []:
                        on_line(text)
                elif kind in ("started", "attached"):
                    if kind == "attached":
                        on_line(f"re-attached to the running attempt (runner pid {event.get('pid')})")
                    with self._lock:
                        cancelled = run_dir in self._cancelled
                    if cancelled:  # cancelled before it started: it must not run on (its result says killed)
                        try:
                            stream.send(json.dumps({"op": "kill", "id": next(self._ids), "run_dir": run_dir,
                                                    "fd": False}).encode() + b"\n")
                        except NodeError as exc:
                            logger.warning("node %s: could not kill %s: %s", self.node, run_dir, exc)
                elif kind == "error":
                    raise NodeError(self.node, f"its agent could not run {run_dir}: {event.get('message')}")
                else:
                    return kind, event
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def _drop(self, stream: Stream) -> None:
        with self._lock:
            if self._stream is stream:
                self._stream = None
        stream.close()

    def close(self) -> None:
        """Close the stream (the agent then ends; its runners go on); no request starts another."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
