"""What a loopback cluster (rigs/loopback_cluster.py) needs from this machine: the sshd and sftp-server
binaries, host keys, free ports on the loopback addresses, login users, and the process table (to find
and kill what a node started, wherever it went).
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dispatch.core.errors import NodeError

_PR_SET_PDEATHSIG = 1
_SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/sftp-server",
                 "/usr/libexec/sftp-server")


def address(index: int) -> str:
    """The loopback address of node `index` (0-based): 127.0.0.2, .3, ..."""
    return f"127.0.0.{2 + index}"


def sshd_path() -> str:
    """The absolute path of `sshd`."""
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found is None:
        raise FileNotFoundError("sshd not found: install it with `apt-get install -y openssh-server`")
    return str(Path(found).resolve())  # sshd refuses to re-exec itself from a relative path


def sftp_server_path() -> str:
    """The stock `sftp-server` (Debian: /usr/lib/openssh/sftp-server, else what `dpkg -L` lists)."""
    for candidate in _SFTP_SERVERS:
        if os.access(candidate, os.X_OK):
            return candidate
    try:
        listed = subprocess.run(["dpkg", "-L", "openssh-sftp-server"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        listed = None
    for line in listed.stdout.splitlines() if listed is not None else []:
        if line.endswith("/sftp-server") and os.access(line, os.X_OK):
            return line
    raise FileNotFoundError("sftp-server not found: install it with `apt-get install -y openssh-sftp-server`")


def check_reachable(name: str, user: str, home: Path) -> None:
    """Raise NodeError unless every parent of `home` can be entered by other users (`o+x`)."""
    for parent in home.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise NodeError(name, f"its login user {user} cannot reach its home {home}: {parent} (mode "
                                  f"{oct(mode & 0o777)}) does not let other users in; start the cluster under a "
                                  f"directory they can enter (e.g. /tmp/...), or `chmod o+x {parent}`")


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def make_user(user: str, home: Path) -> tuple[int, int]:
    """Create (or point at `home`) the login user `user`; its (uid, gid).

    Its password is `*`, not the locked `!`: sshd without PAM refuses even key logins to locked accounts.
    """
    if user_exists(user):  # left by a killed earlier run on this port
        command = ["usermod", "--home", str(home), "--shell", "/bin/bash", "--password", "*", user]
    else:
        command = ["useradd", "--home-dir", str(home), "--no-create-home", "--shell", "/bin/bash",
                   "--password", "*", "--comment", "dispatch loopback node", user]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise NodeError(user, f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def keygen(path: Path, comment: str) -> None:
    """Write an ed25519 key pair without passphrase to `path` (and `.pub`), unless it exists."""
    if path.exists():
        return
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )


def port_free(address: str, port: int) -> bool:
    """Whether `address:port` can be bound (a TIME_WAIT socket does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT, as sshd does
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def find_free_port(count: int) -> int:
    """A TCP port free on all of 127.0.0.2 .. 127.0.0.(1+count) (for tests running side by side).

    Args:
        count: the number of nodes.

    Returns:
        The port number.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address(0), 0))
            port = probe.getsockname()[1]
        if all(port_free(address(i), port) for i in range(count)):
            return port
    raise OSError("no TCP port free on all loopback node addresses")


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes sshd get SIGKILLed when this process dies, so a killed test run leaks no
    sshd. Only from the main thread: the signal fires when the *thread* that started the child ends."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: no dlopen in the child
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, content of /proc/<pid>/<name>) for every process that can be read."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                yield int(entry.name), Path(entry.path, name).read_bytes()
            except OSError:
                continue


def process_table() -> dict[int, int]:
    """pid -> ppid for every process, read from /proc."""
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    return {pid: int(stat.rpartition(b")")[2].split()[1]) for pid, stat in _proc_files("stat")}


def marked_processes(marker: bytes) -> set[int]:
    """Processes whose environment holds `marker` (started through the node, even if detached)."""
    return {pid for pid, environ in _proc_files("environ") if pid != os.getpid() and marker in environ.split(b"\0")}


def user_processes(uid: int) -> set[int]:
    """Processes whose real user is `uid` (a login-user node's, wherever they went)."""
    found = set()
    for pid, status in _proc_files("status"):
        uids = next((line.split()[1:] for line in status.splitlines() if line.startswith(b"Uid:")), [])
        if uids and int(uids[0]) == uid:
            found.add(pid)
    return found


def signal_all(pids: set[int], signum: int) -> None:
    """Send `signum` to each pid, skipping those gone or not ours."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
