"""Files over SFTP on a node's pooled SSH connection: single files, bytes and directory trees.

`SFTPFiles` is mixed into `SSHPool` (dispatch/cluster/ssh.py), which supplies the channel: an SFTP session
takes one channel of the node's connection, like a command, and gives it back when it ends. Relative remote
paths start at the login's home.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import paramiko

from dispatch.cluster.ssh_target import SSHTarget
from dispatch.core.errors import NodeError


class SFTPFiles:
    """File transfer methods of `SSHPool`; the pool provides `_open_channel` and `_release`."""

    def _open_channel(self, target: SSHTarget) -> tuple[Any, paramiko.Channel]:
        raise NotImplementedError  # SSHPool's

    def _release(self, target: SSHTarget, connection: Any, *, broken: bool = False,
                 refused: bool = False) -> None:
        raise NotImplementedError  # SSHPool's

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
