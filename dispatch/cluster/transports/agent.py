"""One `runner.pyz serve` per node, shared by every attempt the dispatcher runs there.

Instead of one SSH command and two Python start-ups per attempt (start the runner, follow its log),
each attempt is one JSON line on the agent's stdin. The agent forks the runner into its own session (it
outlives the agent, as a `run --detach` runner does), watches its end with a pidfd and streams its log
lines and `result.json` back on stdout. On a 2-core machine running 140 slots this took the node-side CPU
per attempt from ~0.14 s to a few ms (docs/performance.md).

The runners do not depend on the agent: if its channel drops, they carry on, every waiting attempt
gets `AgentLost`, and the transport re-attaches the long way (status, follow); the next attempt
starts a new agent.

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


class AgentLost(NodeError):
    """The agent's channel ended before this attempt's result came back (the runner may still run)."""


class Stream(Protocol):
    """A started `runner.pyz serve`: its stdin and its output lines."""

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

    def _register(self, events: queue.Queue) -> tuple[Stream, int]:
        """The live stream (started if needed) and a new request id whose events go to `events`."""
        with self._lock:
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
            timeout: float) -> dict | None:
        """Start (or re-attach to) the attempt in `run_dir`, block until it ends and return its `result.json`;
        None when an earlier runner holds the directory (the transport takes the long way); a result with
        status `NODE_FULL` (nothing started) when the node already runs as many runners as it has slots.

        Raises:
            AgentLost: the stream ended first (the runner may still run: re-attach the long way).
            NodeError: the agent could not be started or could not run it, or gave no result in `timeout` s.
            ValueError: the runner ended without a result.json.
        """
        events: queue.Queue = queue.Queue()
        stream, rid = self._register(events)
        try:
            try:
                stream.send(json.dumps({"op": "run", "id": rid, "run_dir": run_dir, "task": task,
                                        "secrets": secrets or {}}).encode() + b"\n")
            except NodeError as exc:  # a stream that cannot be written to is gone: the next attempt starts anew
                self.close()
                raise AgentLost(self.node, f"could not send {run_dir} to the node's agent: {exc}") from exc
            deadline = time.monotonic() + timeout
            while True:
                try:
                    event = events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise NodeError(self.node, f"no result from the node's agent within {timeout:.0f} s "
                                               f"for {run_dir}") from None
                if event is None:
                    raise AgentLost(self.node, f"the agent's connection ended while {run_dir} ran")
                kind = event.get("event")
                if kind == "log":
                    for line in event.get("lines") or []:
                        on_line(line)
                elif kind == "attached":
                    on_line(f"re-attached to the running attempt (runner pid {event.get('pid')})")
                elif kind == "earlier":
                    return None
                elif kind == "full":
                    reason = f"{event.get('message') or 'node full'}; requeued"
                    return {"status": NODE_FULL, "reason": reason, "retryable": True}
                elif kind in ("result", "recovered"):
                    if kind == "recovered":
                        on_line("recovered the result of this attempt, which finished while no dispatcher watched")
                    if not isinstance(event.get("result"), dict):
                        raise ValueError(f"no result.json in {run_dir} after the runner ended")
                    return event["result"]
                elif kind == "error":
                    raise NodeError(self.node, f"its agent could not run {run_dir}: {event.get('message')}")
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
