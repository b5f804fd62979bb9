"""The dispatcher's side of shipping the runner: where a node keeps this runner version, and putting it there.

Every caller that runs, ships or checks the runner on a node (the transports, the guardian, `nodes add`) takes
its paths and command from `node_runner`, and the archive from `zipapp.build` (bytes and version).
"""

from __future__ import annotations

import os
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dispatch.core.paths import remote_arg, remote_path
from dispatch.runner import protocol, zipapp

if TYPE_CHECKING:
    from dispatch.cluster.ssh import SSHPool
    from dispatch.cluster.ssh_target import SSHTarget

@dataclass(frozen=True)
class NodeRunner:
    """This runner version under one run root: `<root>/.runner/<first 16 of the version>/runner.pyz`.

    Attributes:
        version: the zipapp's sha256, which the runner reports as `runner_version`.
        root: the run root, as the node's paths are written (`dispatch.core.paths.remote_path`).
        directory, path: the version's directory and the zipapp in it, as SFTP takes them.
        directory_arg, path_arg: the same, each one word of a POSIX shell command.
        command: `<python> <path_arg>`: append the runner's command and its arguments.
    """

    version: str
    root: str
    directory: str
    path: str
    directory_arg: str
    path_arg: str
    command: str


def node_runner(root: str, python: str = "python3") -> NodeRunner:
    """Where a node (or this machine, for an absolute `root`) keeps this runner version, and how it is run.

    Args:
        root: the node's run root (`~/dispatch`, or relative to the login's home).
        python: the node's python (3.8 or newer).

    Raises:
        OSError: the runner's sources cannot be read.
    """
    version = zipapp.build().version
    parts = protocol.version_dir(version)
    path_arg = remote_arg(root, *parts, protocol.RUNNER_FILE)
    return NodeRunner(version=version, root=root, directory=remote_path(root, *parts),
                      path=remote_path(root, *parts, protocol.RUNNER_FILE), directory_arg=remote_arg(root, *parts),
                      path_arg=path_arg, command=f"{shlex.quote(python)} {path_arg}")


def ship(pool: SSHPool, target: SSHTarget, runner: NodeRunner, *, timeout: float = 300.0) -> None:
    """Put this runner version in place on a node: written under a temporary name, then renamed, so that another
    dispatcher shipping the same version at the same moment never runs a half-written file.

    Raises:
        NodeError: the node is unreachable or the rename failed.
    """
    temporary = f"{protocol.RUNNER_FILE}.tmp{os.getpid()}-{threading.get_ident()}"
    parts = (*protocol.version_dir(runner.version), temporary)
    pool.put_file(target, zipapp.build().data, remote_path(runner.root, *parts), mode=0o644, timeout=timeout)
    pool.run(target, f"mv -f {remote_arg(runner.root, *parts)} {runner.path_arg}", timeout=timeout)


def local_runner(root: Path) -> Path:
    """This runner version's zipapp under a run root of this machine (the local node), written if missing.

    Written under a temporary name, then renamed: a concurrent writer or a runner starting meanwhile never
    sees a half-written archive. A copy already there is trusted, as on a node: its name is its version.

    Raises:
        OSError: the directory or the file cannot be written.
    """
    built = zipapp.build()
    path = Path(root).joinpath(*protocol.version_dir(built.version), protocol.RUNNER_FILE)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
        temporary.write_bytes(built.data)
        os.replace(temporary, path)
    return path
