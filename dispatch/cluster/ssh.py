"""The SSH connection pool: one reused paramiko connection per node, a channel per command or transfer.

`SSHPool.run` streams a command's output line by line, enforces a timeout (killing the remote process group,
not just closing the channel, which would leave the process running), and raises the domain's errors:
`NodeError` when the node cannot be reached or used, `RemoteCommandFailed` for a non-zero exit and
`CommandTimeout` for a timeout. A dropped connection is reopened once, transparently, before a command
starts; a command whose connection drops while it runs is not re-run (it may not be idempotent).

Commands run under `/bin/sh` on the node, starting in `$HOME`, in the process group sshd made for the
session (so a timeout kills what they started too, unless it left the group with `setsid`). Host keys are
checked against the target's `known_hosts`; key material is never logged. What happens on a command's channel
(its wrapper, stdin, output lines, deadline) is dispatch/cluster/ssh_command.py; file transfer over SFTP is
dispatch/cluster/ssh_files.py, mixed into the pool.

Examples:
    >>> pool = SSHPool()  # doctest: +SKIP
    >>> target = resolve_target("gpu1", "gpu1")  # a Host alias in ~/.ssh/config
    >>> pool.run(target, "nproc", timeout=30).stdout
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping

import paramiko

from dispatch.cluster.ssh_command import (
    CommandResult,
    CommandTimeout,
    DeadlinePassed,
    LineStream,
    OnLine,
    connection_dropped,
    feed_stdin,
    kill_group_script,
    pump_output,
    wrap_command,
)
from dispatch.cluster.ssh_files import SFTPFiles
from dispatch.cluster.ssh_target import SSHTarget, connect_client, resolve_target
from dispatch.core.errors import NodeError, RemoteCommandFailed

__all__ = ["CommandResult", "CommandTimeout", "SSHPool", "SSHStream", "SSHTarget", "resolve_target"]

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15
"""Seconds between SSH keepalives on an idle connection."""


class _Connection:
    def __init__(self, client: paramiko.SSHClient, identity: tuple[object, ...]) -> None:
        self.client = client
        self.transport: paramiko.Transport = client.get_transport()  # type: ignore[assignment]
        self.identity = identity
        self.channels = 0
        self.max_channels = 0  # set by the pool; lowered if the server refuses a channel (MaxSessions)


class SSHPool(SFTPFiles):
    """Reused SSH connections, one per node (more only when the server limits sessions per connection).

    Thread-safe: any number of threads may run commands on any nodes at once; each command gets its own
    channel on the node's connection.

    Args:
        max_sessions: channels per connection before another connection is opened; OpenSSH's default
            `MaxSessions` is 10. Lowered automatically when a server refuses a channel.
        keepalive: seconds between keepalives on a connection.
    """

    def __init__(self, *, max_sessions: int = 10, keepalive: int = KEEPALIVE_SECONDS) -> None:
        self.max_sessions, self.keepalive = max_sessions, keepalive
        self._lock = threading.Lock()
        self._node_locks: dict[str, threading.Lock] = {}
        self._connections: dict[str, list[_Connection]] = {}
        self._opened: dict[str, int] = {}
        self._failures: dict[str, tuple[float, NodeError]] = {}

    @property
    def connections_opened(self) -> int:
        """How many SSH connections this pool has opened, over all nodes."""
        with self._lock:
            return sum(self._opened.values())

    @property
    def connections_by_node(self) -> dict[str, int]:
        """How many SSH connections this pool has opened, per node name."""
        with self._lock:
            return dict(self._opened)

    # --- connections ---------------------------------------------------------------------------------------
    def _connect(self, target: SSHTarget) -> _Connection:
        connection = _Connection(connect_client(target, keepalive=self.keepalive), target.identity)
        connection.max_channels = self.max_sessions
        with self._lock:
            self._opened[target.name] = self._opened.get(target.name, 0) + 1
            count = self._opened[target.name]
        logger.debug("node %s: connection #%d open", target.name, count)
        return connection

    def _acquire(self, target: SSHTarget) -> _Connection:
        """A live connection with a free channel for `target`; opens one if needed."""
        waited_since = time.monotonic()
        with self._lock:
            node_lock = self._node_locks.setdefault(target.name, threading.Lock())
        with node_lock:
            connections = self._connections.setdefault(target.name, [])
            for stale in [c for c in connections
                          if not c.transport.is_active() or c.identity != target.identity]:
                connections.remove(stale)
                if stale.channels == 0 or not stale.transport.is_active():
                    stale.client.close()
            for connection in connections:
                if connection.channels < connection.max_channels:
                    connection.channels += 1
                    return connection
            failed = self._failures.get(target.name)
            if failed and failed[0] > waited_since:  # it failed while we waited: do not try again at once
                raise failed[1]
            try:
                connection = self._connect(target)
            except NodeError as exc:
                self._failures[target.name] = (time.monotonic(), exc)
                raise
            connections.append(connection)
            connection.channels = 1
            return connection

    def _release(self, target: SSHTarget, connection: _Connection, *, broken: bool = False,
                 refused: bool = False) -> None:
        with self._lock:
            node_lock = self._node_locks[target.name]
        with node_lock:
            connection.channels -= 1
            if refused:  # the server's MaxSessions is lower than ours
                connection.max_channels = max(1, connection.channels)
            connections = self._connections.get(target.name, [])
            if broken and connection in connections:
                connections.remove(connection)
            if connection not in connections and connection.channels == 0:
                connection.client.close()

    def _open_channel(self, target: SSHTarget) -> tuple[_Connection, paramiko.Channel]:
        """Open a session channel, reopening a dropped connection once.

        A refusal on a live connection means the server's `MaxSessions` is lower than ours (sshd answers
        "Connect failed"; concurrent refusals can surface as a bare "Unable to open channel"): that
        connection's limit is lowered and another connection takes the channel.
        """
        last: Exception | None = None
        reopened = False
        for _ in range(8):
            connection = self._acquire(target)
            try:
                return connection, connection.transport.open_session(timeout=target.connect_timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                last = exc
                if connection.transport.is_active() and isinstance(exc, paramiko.SSHException):
                    logger.debug("node %s: channel refused (%s); using another connection", target.name, exc)
                    self._release(target, connection, refused=True)
                    continue
                self._release(target, connection, broken=True)
                if reopened:
                    break
                reopened = True
                logger.debug("node %s: connection dropped (%s); reopening", target.name, exc)
        raise NodeError(target.name, f"unreachable: cannot open a channel: {last}") from last

    def connect(self, target: SSHTarget) -> None:
        """Open (or check) the connection to `target` now, e.g. to probe a node.

        Raises:
            NodeError: the node cannot be reached, its host key is unknown or authentication failed.
        """
        connection = self._acquire(target)
        self._release(target, connection)

    # --- commands ----------------------------------------------------------------------------------------
    def run(self, target: SSHTarget, command: str, *, timeout: float, on_line: OnLine | None = None,
            stdin_data: bytes | str | None = None, env: Mapping[str, str] | None = None,
            check: bool = True) -> CommandResult:
        """Run `command` under /bin/sh on the node, streaming its output.

        Args:
            target: the node.
            command: a shell command line.
            timeout: seconds; past it the command's process group is killed (TERM, then KILL).
            on_line: called with ("stdout" or "stderr", line) as each line arrives, in the calling thread.
            stdin_data: fed to the command's standard input (closed after it; empty when None).
            env: environment variables for the command (set by the shell; values never logged).
            check: raise `RemoteCommandFailed` for a non-zero exit.

        Returns:
            The exit code, the whole output and the duration.

        Raises:
            NodeError: the node is unreachable, or the connection dropped while the command ran.
            CommandTimeout: the command ran past `timeout` and was killed.
            RemoteCommandFailed: it exited non-zero (or was killed by a signal: -1) and `check` is set.
        """
        started = time.monotonic()
        deadline = started + timeout
        out, err = LineStream("stdout", on_line, pid_first=True), LineStream("stderr", on_line)
        line, data = wrap_command(command, env)
        data += stdin_data.encode() if isinstance(stdin_data, str) else stdin_data or b""
        connection, channel = self._open_channel(target)
        finished = False
        logger.debug("node %s: run %s", target.name, command)
        try:
            try:
                channel.exec_command(line)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise NodeError(target.name, f"unreachable: connection dropped starting `{command}`") from exc
            if len(data) > 65536:  # more than fits the channel's window at once: do not block the reader
                threading.Thread(target=feed_stdin, args=(channel, data), daemon=True).start()
            else:
                feed_stdin(channel, data)
            try:
                exit_code = pump_output(channel, out, err, deadline)
            except DeadlinePassed:
                raise CommandTimeout(target.name, command, timeout, err.tail()) from None
            finished = True
            if exit_code == -1 and connection_dropped(connection.transport):
                raise NodeError(target.name, f"unreachable: connection lost while running `{command}`")
        finally:
            if not finished and out.pid is not None and connection.transport.is_active():
                try:
                    self.kill_process_group(target, out.pid)
                except Exception:  # best effort: the original error matters more
                    logger.warning("node %s: could not kill process group %s", target.name, out.pid,
                                   exc_info=True)
            channel.close()
            self._release(target, connection)
        result = CommandResult(exit_code, out.text(), err.text(), time.monotonic() - started)
        logger.debug("node %s: exit %d after %.2f s: %s", target.name, exit_code, result.duration, command)
        if check and exit_code != 0:
            raise RemoteCommandFailed(target.name, command, exit_code, err.tail())
        return result

    def open_stream(self, target: SSHTarget, command: str) -> SSHStream:
        """Start a long-lived `command` on the node and keep its channel: write its stdin, read its output.

        The command's stderr is merged into its stdout. It holds one channel of the node's connection until
        `SSHStream.close()`.

        Raises:
            NodeError: the node is unreachable or the command could not start.
        """
        connection, channel = self._open_channel(target)
        try:
            channel.set_combine_stderr(True)
            channel.exec_command(command)  # no `wrap_command`: its pid line serves timeouts, and this has none
        except (paramiko.SSHException, EOFError, OSError) as exc:
            channel.close()
            self._release(target, connection, broken=not connection.transport.is_active())
            raise NodeError(target.name, f"unreachable: cannot start `{command}`: {exc}") from exc
        logger.debug("node %s: stream %s", target.name, command)
        return SSHStream(self, target, connection, channel)

    def kill_process_group(self, target: SSHTarget, pgid: int, *, grace: float = 2.0) -> None:
        """Send SIGTERM to a remote process group, then SIGKILL if it is still there after `grace` seconds.

        Args:
            target: the node.
            pgid: the process group id (every `run` command leads its own group).
            grace: seconds between SIGTERM and SIGKILL.
        """
        self.run(target, kill_group_script(pgid, grace), timeout=grace + 15, check=False)

    def close(self) -> None:
        """Close every connection. The pool stays usable: the next command reconnects."""
        with self._lock:
            connections, self._connections = self._connections, {}
        for node_connections in connections.values():
            for connection in node_connections:
                connection.client.close()

    def __enter__(self) -> SSHPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SSHStream:
    """A long-lived command on a node (`SSHPool.open_stream`): send to its stdin, iterate its output lines."""

    def __init__(self, pool: SSHPool, target: SSHTarget, connection: _Connection, channel: paramiko.Channel) -> None:
        self._pool, self._target, self._connection, self._channel = pool, target, connection, channel
        self._send_lock = threading.Lock()
        self._closed = False

    def send(self, data: bytes) -> None:
        """Write to the command's stdin. Raises NodeError when the channel or connection is gone."""
        try:
            with self._send_lock:
                self._channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise NodeError(self._target.name, f"connection lost writing to a stream: {exc}") from exc

    def lines(self) -> Iterator[bytes]:
        """The command's output, line by line (without the newline), to its end."""
        partial = b""
        while True:
            try:
                data = self._channel.recv(65536)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                break
            *complete, partial = (partial + data).split(b"\n")
            yield from complete
        if partial:
            yield partial

    def close(self) -> None:
        """Close the channel (the command sees its stdin end) and give the connection's slot back."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._channel.close()
        finally:
            self._pool._release(self._target, self._connection)
