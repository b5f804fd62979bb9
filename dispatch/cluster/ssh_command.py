"""One remote command on an SSH channel: its wrapper line, its stdin, its output as lines, its deadline.

`SSHPool.run` (dispatch/cluster/ssh.py) opens the channel and gives it back; this module holds what happens on
it. The command runs under `/bin/sh`, which first prints its pid (sshd made it a process group leader, so a
timeout can kill the whole group); its environment comes through stdin, never the command line, so `ps` on the
node never shows it.
"""

from __future__ import annotations

import re
import select
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import paramiko

from dispatch.core.errors import RemoteCommandFailed
from dispatch.core.polling import attempts

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


class DeadlinePassed(Exception):
    """The command's deadline passed before it ended (`SSHPool.run` turns it into `CommandTimeout`)."""


class LineStream:
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


def wrap_command(command: str, env: Mapping[str, str] | None) -> tuple[str, bytes]:
    """The command line to send and the start of its stdin.

    `command` runs under /bin/sh, which first prints its pid: sshd made it a process group leader. The
    environment comes through stdin, not the command line, so that `ps` on the node never shows it.

    Raises:
        ValueError: an environment variable name is not valid in a shell.
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


def feed_stdin(channel: paramiko.Channel, data: bytes) -> None:
    """Write `data` to the command's stdin, then close it."""
    try:
        if data:
            channel.sendall(data)
        channel.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command exited without reading it all, or the connection dropped: run() reports that


def pump_output(channel: paramiko.Channel, out: LineStream, err: LineStream, deadline: float) -> int:
    """Read the command's output into `out` and `err` until it ends; its exit status.

    Returns:
        The exit status; -1 when the channel closed without one (a signal, or a dropped connection).

    Raises:
        DeadlinePassed: `deadline` (monotonic clock) passed first.
    """
    poller = select.poll()  # not select(): dispatchers hold many descriptors, some above 1023
    poller.register(channel.fileno(), select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed
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
        raise DeadlinePassed
    return channel.exit_status


def connection_dropped(transport: paramiko.Transport) -> bool:
    """Whether the connection is gone (the transport marks itself inactive just after closing channels)."""
    for _ in attempts(0.25, 0.01):
        if not transport.is_active():
            return True
    return False


def kill_group_script(pgid: int, grace: float) -> str:
    """A sh script that sends SIGTERM to process group `pgid`, then SIGKILL if it is there after `grace` s."""
    steps = max(1, int(grace * 10))
    return (f"kill -TERM -{pgid} 2>/dev/null || exit 0; i=0; while kill -0 -{pgid} 2>/dev/null; do "
            f"i=$((i+1)); if [ $i -gt {steps} ]; then kill -KILL -{pgid}; exit 0; fi; sleep 0.1; done")
