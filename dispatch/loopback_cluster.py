"""A real cluster on one machine: N OpenSSH `sshd` processes on loopback addresses 127.0.0.2, .3, ...

For tests and benchmarks. Node `i` listens on `127.0.0.(2+i):<port>` as the current user, with its own host
key; one client key pair, a `known_hosts`, an `ssh_config` (one `Host` alias per node) and a `nodes.json` in
the old system's format are written to the base directory. All nodes share this machine's file system and
`$HOME`, so each node gets a `remote_root` directory (`<base>/<node>/root`) for its node-side state. By
default it is also the node's `$HOME` (and SFTP's start directory, and where `SSHPool` commands start), so
`~/dispatch/...` differs per node as on real machines, and the real `~/.bashrc` is not run for every
command (here it ran `pyenv rehash`, which can block for 60 s on a stale lock).

`kill(name)` simulates the machine dying: the listener, every sshd serving its sessions and every process
started through it are SIGKILLed, so open connections drop at once. `restart(name)` brings it back with the
same host key.

Run a cluster for a benchmark (stays in the foreground until Ctrl-C or SIGTERM)::

    python -m dispatch.loopback_cluster up --slots 2,3,4 --dir /tmp/cluster [--port 2222]

Needs the `openssh-server` package (`apt-get install -y openssh-server`) and `ssh-keygen`.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from dispatch.errors import NodeError
from dispatch.ssh import SSHTarget

logger = logging.getLogger(__name__)

_ENV_MARKER = "DISPATCH_LOOPBACK_NODE"
_START_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


def _address(index: int) -> str:
    return f"127.0.0.{2 + index}"


def _sshd_path() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found is None:
        raise FileNotFoundError("sshd not found: install it with `apt-get install -y openssh-server`")
    return str(Path(found).resolve())  # sshd refuses to re-exec itself from a relative path


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )


def _port_free(address: str, port: int) -> bool:
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
            probe.bind((_address(0), 0))
            port = probe.getsockname()[1]
        if all(_port_free(_address(i), port) for i in range(count)):
            return port
    raise OSError("no TCP port free on all loopback node addresses")


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes sshd get SIGKILLed when this process dies, so a killed test run leaks no
    sshd. Only from the main thread: the signal fires when the *thread* that started the child ends."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: no dlopen in the child
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _process_table() -> dict[int, int]:
    """pid -> ppid for every process, read from /proc."""
    table: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # the command name (field 2) may hold spaces and parentheses: split after the last ")"
            table[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return table


def _marked_processes(marker: bytes) -> set[int]:
    """Processes whose environment holds `marker` (started through the node, even if detached)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.add(int(entry.name))
    return found


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class LoopbackCluster:
    """N real `sshd` nodes on loopback addresses; a context manager that stops them on exit.

    Examples:
        >>> with LoopbackCluster() as cluster:  # doctest: +SKIP
        ...     cluster.start([2, 3, 4], Path("/tmp/cluster"), port=0)
        ...     cluster.nodes_json  # -> /tmp/cluster/nodes.json
    """

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.base_dir: Path | None = None
        self.port = 0
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # --- paths -------------------------------------------------------------------------------------------
    @property
    def nodes_json(self) -> Path:
        """The `nodes.json` file, in the old system's format plus our optional fields."""
        return self._base / "nodes.json"

    @property
    def ssh_config(self) -> Path:
        """An `ssh_config` with a `Host <node-name>` alias per node (usable with `ssh -F`)."""
        return self._base / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        """The client's `known_hosts`, holding every node's host key."""
        return self._base / "known_hosts"

    @property
    def key_path(self) -> Path:
        """The client's private key (ed25519, no passphrase)."""
        return self._base / "client_key"

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("LoopbackCluster.start() has not been called")
        return self.base_dir

    def node(self, name: str) -> dict[str, Any]:
        """The node entry (as in `nodes.json`) named `name`."""
        for node in self.nodes:
            if node["name"] == name:
                return node
        raise KeyError(f"no node {name!r} (known: {', '.join(n['name'] for n in self.nodes)})")

    def target(self, name: str, **overrides: Any) -> SSHTarget:
        """The `SSHTarget` of node `name` from its explicit fields (no ssh config read).

        Args:
            name: the node's name.
            **overrides: `SSHTarget` fields to change, e.g. `known_hosts=...` or `connect_timeout=2`.
        """
        node = self.node(name)
        fields: dict[str, Any] = {"name": name, "host": node["host"], "port": node["port"], "user": node["user"],
                                  "key_path": node["key_path"], "known_hosts": node["known_hosts"],
                                  "connect_timeout": 5.0}
        return SSHTarget(**{**fields, **overrides})

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self, slots: list[int], base_dir: Path, port: int = 2222, *,
              isolate_home: bool = True, max_sessions: int = 100) -> list[dict[str, Any]]:
        """Write keys and configs into `base_dir` and start one sshd per entry of `slots`.

        Args:
            slots: the slot count of each node; node `i` is named `loop<i+1>` at 127.0.0.(2+i).
            base_dir: where keys, configs, logs, `nodes.json` and the nodes' remote roots go.
            port: the TCP port every node listens on; 0 picks one that is free on all addresses.
            isolate_home: make each node's `remote_root` its `$HOME` and SFTP start directory; with False,
                sessions get the real home (and run its shell start-up files).
            max_sessions: sshd's `MaxSessions` (channels per connection; OpenSSH's default is 10).

        Returns:
            The node entries, as written to `nodes.json`.

        Raises:
            NodeError: a port is already in use or an sshd did not come up (its log tail is included).
        """
        if self._processes:
            raise RuntimeError("this LoopbackCluster is already running; stop() it first")
        self.base_dir = base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        self.port = port = port or find_free_port(len(slots))
        user = getpass.getuser()
        _keygen(self.key_path, "dispatch-loopback-client")
        authorized = base_dir / "authorized_keys"
        authorized.write_text(self.key_path.with_suffix(".pub").read_text())
        try:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # the privilege separation directory
        except PermissionError:
            logger.debug("cannot create /run/sshd (not root); sshd runs without privilege separation")

        self.nodes, known, aliases = [], [], []
        for index, count in enumerate(slots):
            name, address = f"loop{index + 1}", _address(index)
            if not _port_free(address, port):
                raise NodeError(name, f"{address}:{port} is already in use (another loopback cluster or "
                                      "sshd?): stop it or pick another port (--port, or 0 for a free one)")
            node_dir = base_dir / name
            (node_dir / "root").mkdir(parents=True, exist_ok=True)
            host_key = node_dir / "ssh_host_ed25519_key"
            _keygen(host_key, f"dispatch-loopback-{name}")
            (node_dir / "sshd_config").write_text(
                self._sshd_config(name, address, port, host_key, authorized, isolate_home, max_sessions))
            host_field = address if port == 22 else f"[{address}]:{port}"
            key_type, key_data = host_key.with_suffix(".pub").read_text().split()[:2]
            known.append(f"{host_field} {key_type} {key_data}\n")
            aliases.append(
                f"Host {name}\n    HostName {address}\n    Port {port}\n    User {user}\n"
                f'    IdentityFile "{self.key_path}"\n    UserKnownHostsFile "{self.known_hosts}"\n'
                "    IdentitiesOnly yes\n    StrictHostKeyChecking yes\n\n"
            )
            self.nodes.append({
                "name": name, "ssh_host": name, "slots": count, "api_mode": "direct", "executor": "glm",
                "priority": 1, "host": address, "port": port, "user": user, "key_path": str(self.key_path),
                "known_hosts": str(self.known_hosts), "remote_root": str(node_dir / "root"),
            })
        self.known_hosts.write_text("".join(known))
        self.ssh_config.write_text("".join(aliases))
        self.nodes_json.write_text(json.dumps({"nodes": self.nodes}, indent=2) + "\n")
        try:
            for node in self.nodes:
                self._launch(node["name"])
        except BaseException:
            self.stop()
            raise
        logger.info("loopback cluster up: %d nodes on port %d, %s", len(self.nodes), port, self.nodes_json)
        return self.nodes

    def _sshd_config(self, name: str, address: str, port: int, host_key: Path, authorized: Path,
                     isolate_home: bool, max_sessions: int) -> str:
        node_dir = self._base / name
        home = node_dir / "root"
        environment = f'"{_ENV_MARKER}={node_dir}"' + (f' "HOME={home}"' if isolate_home else "")
        return "\n".join([
            f"ListenAddress {address}:{port}",
            f'HostKey "{host_key}"',
            f'PidFile "{node_dir / "sshd.pid"}"',
            f'AuthorizedKeysFile "{authorized}"',
            "StrictModes no", "UsePAM no", "PermitRootLogin yes", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UseDNS no", "PrintMotd no",
            f"MaxSessions {max_sessions}", "MaxStartups 100:30:200", "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp" + (f' -d "{home}"' if isolate_home else ""),
            # every process started through this node carries the marker, so kill() finds detached ones too
            f"SetEnv {environment}",
            "",
        ])

    def _launch(self, name: str) -> None:
        node, node_dir = self.node(name), self._base / name
        log = node_dir / "sshd.log"
        command = [_sshd_path(), "-D", "-e", "-E", str(log), "-f", str(node_dir / "sshd_config")]
        with log.open("ab") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                       start_new_session=True, preexec_fn=_die_with_parent())
        with self._lock:
            self._processes[name] = process
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                socket.create_connection((node["host"], node["port"]), timeout=1.0).close()
                logger.debug("node %s: sshd pid %d listening on %s:%d", name, process.pid,
                             node["host"], node["port"])
                return
            except OSError:
                time.sleep(0.02)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise NodeError(name, f"sshd did not start listening on {node['host']}:{node['port']} "
                              f"(exit code {process.poll()}); {log}:\n{tail}")

    def kill(self, name: str) -> None:
        """Simulate node `name` dying: SIGKILL its sshd, the sshd children serving its sessions, and every
        process started through it. Its connections drop at once. Idempotent.

        Args:
            name: the node's name.
        """
        with self._lock:
            process = self._processes.pop(name, None)
        node_dir = self._base / name
        root = process.pid if process else None
        if root is None:
            try:
                root = int((node_dir / "sshd.pid").read_text().strip())
            except (OSError, ValueError):
                root = None
        victims: set[int] = set()
        if root is not None:
            # stop the tree top-down until it stops growing (stopped processes cannot fork), then kill it all
            _signal({root}, signal.SIGSTOP)
            victims = {root}
            while True:
                table = _process_table()
                found = {pid for pid, ppid in table.items() if ppid in victims} - victims
                if not found:
                    break
                _signal(found, signal.SIGSTOP)
                victims |= found
        victims |= _marked_processes(f"{_ENV_MARKER}={node_dir}".encode())
        _signal(victims, signal.SIGKILL)
        if process is not None:
            process.wait(timeout=10)
        (node_dir / "sshd.pid").unlink(missing_ok=True)
        logger.info("node %s killed (%d processes)", name, len(victims))

    def restart(self, name: str) -> None:
        """Start node `name` again (killing it first if it still runs), with the same host key and port.

        Args:
            name: the node's name.

        Raises:
            NodeError: its sshd did not come back up.
        """
        self.kill(name)
        self._launch(name)
        logger.info("node %s restarted", name)

    def alive(self, name: str) -> bool:
        """Whether node `name`'s sshd is running."""
        process = self._processes.get(name)
        return process is not None and process.poll() is None

    def stop(self) -> None:
        """Kill every node. Idempotent; files in the base directory are left in place."""
        if self.base_dir is None:
            return
        for node in self.nodes:
            self.kill(node["name"])

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatch.loopback_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a cluster and keep it up until Ctrl-C or SIGTERM")
    up.add_argument("--slots", default="2,3,4", help="slots per node, comma-separated (default 2,3,4)")
    up.add_argument("--dir", required=True, type=Path, help="base directory for keys, configs and logs")
    up.add_argument("--port", type=int, default=2222, help="TCP port of every node (0: pick a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    slots = [int(part) for part in args.slots.split(",") if part.strip()]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LoopbackCluster() as cluster:
        try:
            cluster.start(slots, args.dir, port=args.port)
        except NodeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(cluster.nodes_json, flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
