"""`serve`: one long-lived agent per node and dispatcher, starting and watching runs asked for as JSON lines.

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections import deque
from typing import Any

from . import protocol
from .procs import close_inherited, load_libc, reap_children
from .rundir import CHUNK, LIVE_DIR, live_entry, read_json, register_live, write_json
from .start import claim, fail_before_start, fork_runner
from .supervise import load_classifier
from .task import TaskError, load_task, on_node, str_map

_SERVE_MIN_DELAY = 0.05  # `serve` reads a growing log this often, backing off to the max while it is quiet
_SERVE_MAX_DELAY = 1.0
_SERVE_READ = 1 << 20  # bytes of a log sent in one event at most (a chatty spec does not stall the others)


class _Watched:
    """One run `serve` watches: its runner's exit (a pidfd, else its lock) and the new lines of its log."""

    def __init__(self, rid: Any, run_dir: str, pid: int | None) -> None:
        self.rid, self.run_dir = rid, run_dir
        self.offset, self.pending = 0, b""
        self.delay, self.next_read = _SERVE_MIN_DELAY, 0.0
        self.pidfd: int | None = None
        if pid and hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:  # ended already, or no pidfd on this kernel: the run's lock is polled instead
                self.pidfd = None

    def ended(self) -> bool:
        return not protocol.runner_alive(self.run_dir)

    def read_lines(self, final: bool = False) -> tuple[list[str], bool]:
        """The log lines written since the last read, at most `_SERVE_READ` bytes of them (at the end, also a
        last unterminated line); and whether more is waiting."""
        try:
            with open(os.path.join(self.run_dir, "task.log"), "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(_SERVE_READ)
        except OSError:
            data = b""
        self.offset += len(data)
        more = len(data) == _SERVE_READ
        *lines, self.pending = (self.pending + data).split(b"\n")
        if len(self.pending) >= _SERVE_READ or (final and not more and self.pending):
            lines.append(self.pending)  # a line longer than a read goes in pieces
            self.pending = b""
        return [line.decode("utf-8", "replace") for line in lines], more


class _Killing:
    """A `kill` request `serve` carries out in a forked child (it waits up to the kill's grace): its report pipe."""

    def __init__(self, rid: Any, run_dir: str, fd: int) -> None:
        self.rid, self.run_dir, self.fd = rid, run_dir, fd
        self.data = b""


class _Agent:
    """`serve`: start and watch runs asked for as JSON lines on stdin; report them as JSON lines on stdout.

    Requests: {"op": "run", "id": ..., "run_dir": ..., "task": {task.json}, "secrets": {...}, "start": true,
    "fd": false} and {"op": "kill", "id": ..., "run_dir": ...}. Events of a run, each with the request's id:
    "started" (pid), "attached" (pid: the same attempt was already running), "log" (lines), "result"
    (result.json once the runner has ended), "recovered" (result: the same attempt had succeeded while nobody
    watched), "absent" (`start` false and nothing to attach to or recover: nothing started), "earlier"
    (another attempt's runner or its orphan holds the run directory: the dispatcher kills it, then asks
    again), "full" (running, slots, message: the node already runs `slots` runners, counted on the node
    whoever started them; the dispatcher requeues the spec briefly), "error" (message, e.g. a run_dir outside
    the run root). A kill answers "killed" (report: `kill`'s) once the run has gone.
    Runners are detached: they outlive the agent, whose end (stdin closed) stops nothing but the watching.

    On a local node stdin is a Unix socket, and a run request with "fd": true comes with one descriptor
    (SCM_RIGHTS: the machine slot's lock) that its runner holds for its whole life, as a runner the
    dispatcher started itself did.

    Args:
        root: the node's run root; every run_dir must resolve to a directory inside it.
        slots: how many runners the node runs at once at most.
    """

    def __init__(self, root: str, slots: int) -> None:
        import selectors

        self.root = os.path.realpath(on_node(root))
        self.slots = slots
        self.selector = selectors.DefaultSelector()
        self.watched: dict[Any, _Watched] = {}
        self.stdin = sys.stdin.fileno()
        # a local node's socket may carry descriptors (SCM_RIGHTS) with its requests; an SSH channel is a pipe
        self.sock = socket.socket(fileno=self.stdin) if stat.S_ISSOCK(os.fstat(self.stdin).st_mode) else None
        self.fds: deque[int] = deque()  # received, not yet taken by their request (in order)
        self.buffer = b""
        self.scanned = False  # whether `live_runners` has scanned the whole root once

    def live_runners(self) -> int:
        """Runners alive under the run root (their `.runner.lock` held), whoever started them.

        Counted from the root's registry (`register_live`); entries of runners that are gone (killed before
        they could remove theirs) are removed. The first count of an agent scans every run directory once and
        enters the live ones, so runners that a runner of an earlier version started are counted too."""
        if not self.scanned:
            import glob

            try:  # first the registry, then the scan: a runner claiming meanwhile enters itself or is found
                os.makedirs(os.path.join(self.root, LIVE_DIR), exist_ok=True)
            except OSError:
                pass
            pattern = os.path.join(glob.escape(self.root), "*", "tasks", "*", protocol.LOCK_FILE)
            for lock in glob.glob(pattern):
                if protocol.runner_alive(os.path.dirname(lock)):
                    register_live(os.path.dirname(lock))
            self.scanned = True
        registry = os.path.join(self.root, LIVE_DIR)
        try:
            names = os.listdir(registry)
        except OSError:
            return 0
        live = 0
        for name in names:
            if "~" in name:
                continue  # an entry being written
            entry = os.path.join(registry, name)
            try:
                run_dir = os.readlink(entry)
            except OSError:
                continue  # removed meanwhile
            ours = live_entry(run_dir) == entry  # else not a runner's entry: removed, and nothing else is
            if ours and protocol.runner_alive(run_dir):
                live += 1
                continue
            try:
                os.unlink(entry)  # this very entry, inside the registry
            except OSError:
                pass
            if ours and protocol.runner_alive(run_dir):  # claimed again between the look and the removal
                register_live(run_dir)
                live += 1
        return live

    def _inside_root(self, run_dir: str) -> str:
        """`run_dir` resolved (symlinks, `..`); ValueError unless it lies strictly inside the run root."""
        resolved = os.path.realpath(run_dir)
        if not resolved.startswith(self.root + os.sep):
            raise ValueError(f"run_dir {run_dir} ({resolved}) is outside the agent's run root {self.root}: refused")
        return resolved

    def emit(self, rid: Any, event: str, **fields: Any) -> None:
        fields.update(id=rid, event=event)
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def serve(self) -> int:
        import selectors

        self.selector.register(self.stdin, selectors.EVENT_READ, None)
        while True:
            now = time.monotonic()
            timeout = None
            if self.watched:
                timeout = max(0.0, min(w.next_read for w in self.watched.values()) - now)
            for key, _ in self.selector.select(timeout):
                if isinstance(key.data, _Killing):
                    self.killing(key.data)
                    continue
                if key.data is not None:
                    self.finish(key.data)
                    continue
                data = self.receive()
                if not data:
                    return 0  # the dispatcher is gone; the runners go on, and a new agent finds them
                *requests, self.buffer = (self.buffer + data).split(b"\n")
                for raw in requests:
                    if raw.strip():
                        self.handle(raw)
            now = time.monotonic()
            for watched in list(self.watched.values()):
                if watched.next_read <= now and watched.rid in self.watched:
                    self.poll(watched, now)
            reap_children()

    def receive(self) -> bytes:
        """The next bytes of stdin; descriptors that come with them are queued for their requests."""
        if self.sock is None:
            return os.read(self.stdin, CHUNK)
        data, ancillary, _, _ = self.sock.recvmsg(CHUNK, socket.CMSG_SPACE(64 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
        return data

    def handle(self, raw: bytes) -> None:
        try:
            request = json.loads(raw)
            rid, op = request.get("id"), request.get("op")
        except (ValueError, AttributeError) as exc:
            self.emit(None, "error", message=f"not a JSON request: {exc}")
            return
        passed = [self.fds.popleft()] if isinstance(request, dict) and request.get("fd") and self.fds else []
        try:
            if op == "run":
                self.run(rid, request, passed)
            elif op == "kill":
                self.kill(rid, self._inside_root(on_node(request["run_dir"])))
            else:
                self.emit(rid, "error", message=f"unknown op {op!r}")
        except (OSError, TaskError, KeyError, TypeError, ValueError) as exc:
            self.emit(rid, "error", message=f"{type(exc).__name__}: {exc}")
        finally:
            for fd in passed:  # a started runner took its copy: ours goes in every case
                try:
                    os.close(fd)
                except OSError:
                    pass

    def kill(self, rid: Any, run_dir: str) -> None:
        """Stop the run in `run_dir` in a forked child (`kill` waits for the runner's end); "killed" follows."""
        import selectors

        read_end, write_end = os.pipe()
        sys.stdout.flush()
        if os.fork() == 0:
            code = 1
            try:
                close_inherited((write_end,))
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1):
                    os.dup2(null, fd)
                from .commands import kill_run

                report = kill_run(run_dir)
                os.write(write_end, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        killing = _Killing(rid, run_dir, read_end)
        self.selector.register(read_end, selectors.EVENT_READ, killing)

    def killing(self, killing: _Killing) -> None:
        data = os.read(killing.fd, CHUNK)
        if data:
            killing.data += data
            return
        self.selector.unregister(killing.fd)
        os.close(killing.fd)
        try:
            report = json.loads(killing.data)
        except ValueError:
            self.emit(killing.rid, "error", message=f"could not stop the run in {killing.run_dir}")
            return
        self.emit(killing.rid, "killed", report=report)

    def run(self, rid: Any, request: dict, passed: list[int]) -> None:
        run_dir = self._inside_root(on_node(request["run_dir"]))
        task = request["task"]
        if os.path.exists(os.path.join(run_dir, protocol.STATUS_FILE)):  # a run was here: this attempt's, or older
            previous = read_json(os.path.join(run_dir, protocol.TASK_FILE)) or {}
            same = previous.get("cache_key") == task.get("cache_key")
            if protocol.runner_alive(run_dir):
                if not same:  # an edited spec's runner: the dispatcher kills it first, then asks again
                    self.emit(rid, "earlier")
                    return
                pid = protocol.lock_holder(run_dir)
                self.emit(rid, "attached", pid=pid)
                self.watch(rid, run_dir, pid)
                return
            result = read_json(os.path.join(run_dir, protocol.RESULT_FILE))
            if same and not task.get("fresh") and result is not None and result.get("status") == "succeeded":
                self.emit(rid, "recovered", result=result)
                return
        if request.get("start") is False:
            self.emit(rid, "absent")
            return
        # count and claim under one lock: two agents (two dispatchers) never both take the last slot
        mutex = os.open(os.path.join(self.root, ".slots.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            running = self.live_runners()
            if running >= self.slots:
                self.emit(rid, "full", running=running, slots=self.slots,
                          message=f"node full: {running} of {self.slots} slots run a spec (counted on the node)")
                return
            os.makedirs(run_dir, exist_ok=True)
            old_umask = os.umask(0o077)
            try:
                write_json(os.path.join(run_dir, protocol.TASK_FILE), task)
            finally:
                os.umask(old_umask)
            lock_fd, refused = claim(run_dir)
        finally:
            os.close(mutex)
        if lock_fd is None:
            self.emit(rid, "earlier", reason=refused["message"])
            return
        try:
            loaded = load_task(run_dir)
            secrets = str_map(request.get("secrets") or {}, "secrets", secret=True)
        except TaskError as exc:
            os.close(lock_fd)
            fail_before_start(run_dir, str(exc))
            self.emit(rid, "result", result=read_json(os.path.join(run_dir, protocol.RESULT_FILE)))
            return
        pid = fork_runner(run_dir, lock_fd, loaded, secrets, keep=tuple(passed))
        passed.clear()  # closed by fork_runner
        self.emit(rid, "started", pid=pid)
        self.watch(rid, run_dir, pid)

    def watch(self, rid: Any, run_dir: str, pid: int | None) -> None:
        import selectors

        watched = _Watched(rid, run_dir, pid)
        self.watched[rid] = watched
        if watched.pidfd is not None:  # else `poll` notices the end from the run's lock
            self.selector.register(watched.pidfd, selectors.EVENT_READ, watched)

    def poll(self, watched: _Watched, now: float) -> None:
        if watched.pidfd is None and watched.ended():
            self.finish(watched)
            return
        lines, more = watched.read_lines()
        if lines:
            self.emit(watched.rid, "log", lines=lines)
        if more:  # the rest right after the other runs' turn
            watched.delay = 0.0
        elif lines or watched.pidfd is None:  # growing, or no pidfd: the lock is polled for the end
            watched.delay = _SERVE_MIN_DELAY
        else:  # quiet: read less often; the pidfd still says the end at once
            watched.delay = min(_SERVE_MAX_DELAY, max(_SERVE_MIN_DELAY, watched.delay * 2))
        watched.next_read = now + watched.delay

    def finish(self, watched: _Watched) -> None:
        """The runner has ended: the rest of its log, then its result."""
        if watched.pidfd is not None:
            self.selector.unregister(watched.pidfd)
            os.close(watched.pidfd)
            watched.pidfd = None
        self.watched.pop(watched.rid, None)
        more = True
        while more:
            lines, more = watched.read_lines(final=True)
            if lines:
                self.emit(watched.rid, "log", lines=lines)
        result = read_json(os.path.join(watched.run_dir, protocol.RESULT_FILE))
        if result is None and not os.path.isfile(os.path.join(watched.run_dir, protocol.STATUS_FILE)):
            self.emit(watched.rid, "error", message=f"the detached runner did not start: "
                      f"{_last_line(os.path.join(watched.run_dir, 'runner.err'))} (see {watched.run_dir}/runner.err)")
            return
        self.emit(watched.rid, "result", result=result)


def _last_line(path: str, limit: int = 4096) -> str:
    """The last non-blank line of a text file (a traceback's exception), at most 500 characters; "" if none."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - limit))
            lines = [line for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:500] if lines else ""


def cmd_serve(root: str, slots: int) -> int:
    # what every runner it forks needs, loaded once here: each fork inherits it instead of loading it again
    load_libc()
    load_classifier()
    try:
        return _Agent(root, slots).serve()
    except BrokenPipeError:  # the channel closed while we wrote: same as stdin closing
        return 0
