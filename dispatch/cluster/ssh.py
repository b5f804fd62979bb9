"""The SSH transport: one reused paramiko connection per node, a channel per command, SFTP for files.

`SSHPool.run` streams a command's output line by line, enforces a timeout (killing the remote process group,
not just closing the channel, which would leave the process running), and raises the domain's errors:
`NodeError` when the node cannot be reached or used, `RemoteCommandFailed` for a non-zero exit and
`CommandTimeout` for a timeout. A dropped connection is reopened once, transparently, before a command
starts; a command whose connection drops while it runs is not re-run (it may not be idempotent).

Commands run under `/bin/sh` on the node, starting in `$HOME`, in the process group sshd made for the
session (so a timeout kills what they started too, unless it left the group with `setsid`). Host keys are
checked against the target's `known_hosts`; key material is never logged.

Examples:
    >>> pool = SSHPool()  # doctest: +SKIP
    >>> target = resolve_target("gpu1", "gpu1")  # a Host alias in ~/.ssh/config
    >>> pool.run(target, "nproc", timeout=30).stdout
"""

from __future__ import annotations

import io
import logging
import os
import re
import select
import shlex
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import paramiko

from dispatch.cluster.ssh_target import SSHTarget, connect_client, resolve_target
from dispatch.core.errors import NodeError, RemoteCommandFailed

__all__ = ["CommandResult", "CommandTimeout", "SSHPool", "SSHStream", "SSHTarget", "resolve_target"]

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15
"""Seconds between SSH keepalives on an idle connection."""

_TAIL_LINES = 20
_PID_MARKER = b"__dispatch_pgid__="
_ENV_END = "__dispatch_env_end__"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

OnLine = Callable[[str, str], None]
"""`on_line(stream, line)`: `stream` is "stdout" or "stderr", `line` has no trailing newline."""


class CommandTimeout(RemoteCommandFailed):
    """A remote command ran past its timeout; its process group was killed (exit code -1)."""

    def __init__(self, host: str, command: str, timeout: float, stderr_tail: str = "") -> None:
        super().__init__(host, command, -1, stderr_tail)
        self.timeout = timeout
        tail = f"\n--- stderr (tail) ---\n{stderr_tail}" if stderr_tail else ""
        self.args = (f"{host}: command timed out after {timeout:g} s and was killed: {command}{tail}",)


@dataclass(frozen=True)
class CommandResult:
    """What a finished remote command produced (`stdout`/`stderr` decoded as UTF-8, invalid bytes replaced)."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float


class _Connection:
    def __init__(self, client: paramiko.SSHClient, identity: tuple[object, ...]) -> None:
        self.client = client
        self.transport: paramiko.Transport = client.get_transport()  # type: ignore[assignment]
        self.identity = identity
        self.channels = 0
        self.max_channels = 0  # set by the pool; lowered if the server refuses a channel (MaxSessions)


class _LineStream:
    """Splits one output stream into lines for `on_line`, keeping the whole text."""

    def __init__(self, name: str, on_line: OnLine | None, pid_first: bool = False) -> None:
        self.name, self._on_line, self._partial, self._data = name, on_line, bytearray(), bytearray()
        self.pid: int | None = None
        self._pid_pending = pid_first

    def feed(self, data: bytes) -> None:
        self._partial += data
        if b"\n" in data:  # else keep collecting: a long line in many chunks stays linear
            *lines, rest = self._partial.split(b"\n")
            self._partial = bytearray(rest)
            for line in lines:
                self._emit(bytes(line), b"\n")

    def finish(self) -> None:
        if self._partial:
            self._emit(bytes(self._partial), b"")
            self._partial = bytearray()

    def _emit(self, raw: bytes, end: bytes) -> None:
        if self._pid_pending and raw.startswith(_PID_MARKER):  # the wrapper's process group id
            self._pid_pending = False
            self.pid = int(raw[len(_PID_MARKER):])
            return
        self._data += raw + end
        if self._on_line is not None:
            self._on_line(self.name, raw.decode(errors="replace").rstrip("\r"))

    def text(self) -> str:
        return (self._data + self._partial).decode(errors="replace")

    def tail(self) -> str:
        return "\n".join(self.text().splitlines()[-_TAIL_LINES:])


def _wrap(command: str, env: Mapping[str, str] | None) -> tuple[str, bytes]:
    """The command line to send and the start of its stdin.

    `command` runs under /bin/sh, which first prints its pid: sshd made it a process group leader. The
    environment comes through stdin, not the command line, so that `ps` on the node never shows it.
    """
    exports, script = "", f"echo {_PID_MARKER.decode()}$$\ncd \"$HOME\" 2>/dev/null\n"
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"environment variable name {key!r} is not valid in a shell")
        exports += f"export {key}={shlex.quote(value)}\n"
    if exports:  # `read` takes stdin byte by byte, leaving the rest for the command
        exports += _ENV_END + "\n"
        script += (f'__e=; while IFS= read -r __l && [ "$__l" != {_ENV_END} ]; do __e="$__e$__l\n'
                   '"; done; eval "$__e"; unset __e __l\n')
    return "exec /bin/sh -c " + shlex.quote(script + command), exports.encode()


class _Deadline(Exception):
    pass


class SSHPool:
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
        out, err = _LineStream("stdout", on_line, pid_first=True), _LineStream("stderr", on_line)
        line, data = _wrap(command, env)
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
                threading.Thread(target=_feed, args=(channel, data), daemon=True).start()
            else:
                _feed(channel, data)
            try:
                exit_code = self._pump(channel, out, err, deadline)
            except _Deadline:
                raise CommandTimeout(target.name, command, timeout, err.tail()) from None
            finished = True
            if exit_code == -1 and _dropped(connection.transport):
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
            channel.exec_command(command)  # no `_wrap`: its process-group line serves timeouts, which this has none of
        except (paramiko.SSHException, EOFError, OSError) as exc:
            channel.close()
            self._release(target, connection, broken=not connection.transport.is_active())
            raise NodeError(target.name, f"unreachable: cannot start `{command}`: {exc}") from exc
        logger.debug("node %s: stream %s", target.name, command)
        return SSHStream(self, target, connection, channel)

    @staticmethod
    def _pump(channel: paramiko.Channel, out: _LineStream, err: _LineStream, deadline: float) -> int:
        poller = select.poll()  # not select(): dispatchers hold many descriptors, some above 1023
        poller.register(channel.fileno(), select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline
            poller.poll(int(min(remaining, 1.0) * 1000) + 1)
            ended = channel.eof_received or channel.closed  # read before draining: data precedes EOF
            while channel.recv_ready():
                out.feed(channel.recv(65536))
            while channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(65536))
            if ended:
                break
        out.finish()
        err.finish()
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise _Deadline
        return channel.exit_status  # -1 when closed without a status: a signal, or a dropped connection

    def kill_process_group(self, target: SSHTarget, pgid: int, *, grace: float = 2.0) -> None:
        """Send SIGTERM to a remote process group, then SIGKILL if it is still there after `grace` seconds.

        Args:
            target: the node.
            pgid: the process group id (every `run` command leads its own group).
            grace: seconds between SIGTERM and SIGKILL.
        """
        steps = max(1, int(grace * 10))
        script = (f"kill -TERM -{pgid} 2>/dev/null || exit 0; i=0; while kill -0 -{pgid} 2>/dev/null; do "
                  f"i=$((i+1)); if [ $i -gt {steps} ]; then kill -KILL -{pgid}; exit 0; fi; sleep 0.1; done")
        self.run(target, script, timeout=grace + 15, check=False)

    # --- files -------------------------------------------------------------------------------------------
    @contextmanager
    def sftp(self, target: SSHTarget, *, timeout: float = 300.0) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session on the node's connection, closed on exit. Relative paths start at the home.

        Raises:
            NodeError: the node is unreachable, the connection dropped, or the transfer timed out.
        """
        connection, channel = self._open_channel(target)
        try:
            channel.settimeout(timeout)
            try:
                channel.invoke_subsystem("sftp")
                client = paramiko.SFTPClient(channel)
            except (paramiko.SSHException, EOFError, TimeoutError) as exc:
                raise NodeError(target.name, f"cannot start SFTP: {exc}") from exc
            try:
                yield client
            except (paramiko.SSHException, EOFError, TimeoutError) as exc:
                raise NodeError(target.name, f"unreachable: file transfer failed: {exc or 'timeout'}") from exc
        finally:
            channel.close()
            self._release(target, connection)

    def put_file(self, target: SSHTarget, source: str | Path | bytes, remote_path: str, mode: int = 0o644,
                 *, timeout: float = 300.0) -> None:
        """Copy a local file (or bytes) to `remote_path`, creating its parent directories.

        Args:
            target: the node.
            source: a local path, or the file's content as bytes.
            remote_path: where to write it (relative paths start at the remote home).
            mode: the remote file's permission bits.
            timeout: seconds allowed for each SFTP operation.
        """
        with self.sftp(target, timeout=timeout) as sftp:
            _makedirs(sftp, str(PurePosixPath(remote_path).parent))
            if isinstance(source, bytes):
                sftp.putfo(io.BytesIO(source), remote_path)
            else:
                sftp.put(str(source), remote_path)
            sftp.chmod(remote_path, mode)

    def get_file(self, target: SSHTarget, remote_path: str, local_path: str | Path, *,
                 timeout: float = 300.0) -> Path:
        """Copy `remote_path` from the node to `local_path` (parents created); returns the local path."""
        local = Path(local_path)
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.sftp(target, timeout=timeout) as sftp:
            sftp.get(remote_path, str(local))
        return local

    def read_file(self, target: SSHTarget, remote_path: str, *, timeout: float = 300.0) -> bytes:
        """The content of `remote_path` on the node."""
        buffer = io.BytesIO()
        with self.sftp(target, timeout=timeout) as sftp:
            sftp.getfo(remote_path, buffer)
        return buffer.getvalue()

    def put_dir(self, target: SSHTarget, local_dir: str | Path, remote_dir: str, *,
                exclude: tuple[str, ...] = (".git",), timeout: float = 300.0) -> int:
        """Copy a local directory tree into `remote_dir` (scp-mode sync), keeping file modes.

        Entries named in `exclude` are skipped at any depth; symlinked files are copied as files.

        Returns:
            The number of files copied.
        """
        root, copied = Path(local_dir), 0
        with self.sftp(target, timeout=timeout) as sftp:
            _makedirs(sftp, remote_dir)
            for directory, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in exclude)
                relative = Path(directory).relative_to(root)
                remote = PurePosixPath(remote_dir, *relative.parts)
                for name in dirnames:
                    _makedirs(sftp, str(remote / name))
                for name in sorted(filenames):
                    path = Path(directory, name)
                    if name in exclude or not path.is_file():
                        continue
                    sftp.put(str(path), str(remote / name))
                    sftp.chmod(str(remote / name), stat.S_IMODE(path.stat().st_mode))
                    copied += 1
        return copied

    def get_dir(self, target: SSHTarget, remote_dir: str, local_dir: str | Path, *,
                exclude: tuple[str, ...] = (".git",), timeout: float = 300.0) -> int:
        """Copy a remote directory tree into `local_dir`, keeping file modes; `exclude` as in `put_dir`.

        Returns:
            The number of files copied.
        """
        with self.sftp(target, timeout=timeout) as sftp:
            return _get_tree(sftp, remote_dir, Path(local_dir), exclude)

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


def _feed(channel: paramiko.Channel, data: bytes) -> None:
    try:
        if data:
            channel.sendall(data)
        channel.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command exited without reading it all, or the connection dropped: run() reports that


def _dropped(transport: paramiko.Transport) -> bool:
    """Whether the connection is gone (the transport marks itself inactive just after closing channels)."""
    for _ in range(25):
        if not transport.is_active():
            return True
        time.sleep(0.01)
    return False


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    current = PurePosixPath()
    for part in PurePosixPath(path).parts:
        current /= part
        try:
            sftp.stat(str(current))
        except FileNotFoundError:
            try:
                sftp.mkdir(str(current))
            except OSError:  # another spec made it in between (SFTP says only "Failure"): fine if it is there
                if not stat.S_ISDIR(sftp.stat(str(current)).st_mode or 0):
                    raise


def _get_tree(sftp: paramiko.SFTPClient, remote: str, local: Path, exclude: tuple[str, ...]) -> int:
    local.mkdir(parents=True, exist_ok=True)
    copied = 0
    for entry in sorted(sftp.listdir_attr(remote), key=lambda e: e.filename):
        if entry.filename in exclude:
            continue
        source, destination = f"{remote.rstrip('/')}/{entry.filename}", local / entry.filename
        mode = entry.st_mode or 0
        if stat.S_ISLNK(mode):
            mode = sftp.stat(source).st_mode or 0
        if stat.S_ISDIR(mode):
            copied += _get_tree(sftp, source, destination, exclude)
        elif stat.S_ISREG(mode):
            sftp.get(source, str(destination))
            destination.chmod(stat.S_IMODE(mode))
            copied += 1
    return copied
