"""What a loopback cluster (rigs/loopback_cluster.py) needs from this machine: the sshd and sftp-server
binaries, host keys, free ports on the loopback addresses, login users, and the process table (to find
and kill what a node started, wherever it went).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import psutil

from dispatch.core.errors import NodeError
from dispatch.core.net import free_port, port_free

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


def find_free_port(count: int) -> int:
    """A TCP port free on all of 127.0.0.2 .. 127.0.0.(1+count) (for tests running side by side).

    Args:
        count: the number of nodes.

    Returns:
        The port number.
    """
    for _ in range(50):
        port = free_port(address(0))
        if all(port_free(port, address(i)) for i in range(count)):
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


def process_table() -> dict[int, int]:
    """pid -> ppid for every process that can be read."""
    return {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"]) if p.info["ppid"] is not None}


def user_processes(uid: int) -> set[int]:
    """Processes whose real user is `uid` (a login-user node's, wherever they went)."""
    return {p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] is not None and p.info["uids"].real == uid}


def signal_all(pids: set[int], signum: int) -> None:
    """Send `signum` to each pid, skipping those gone or not ours."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
