"""A real cluster on one machine: N OpenSSH `sshd` processes on loopback addresses 127.0.0.2, .3, ...

For tests and benchmarks. Node `i` listens on `127.0.0.(2+i):<port>` with its own host key; one client key
pair, a `known_hosts`, an `ssh_config` (one `Host` alias per node) and a `nodes.json` in the old system's
format are written to the base directory.

With `login_users=True` (needs root; the test fixture's choice) the nodes are laid out like real ones:
each has its own login user (`dn<port>-<i>`, made with `useradd`, removed by `stop()`) whose home is
`<base>/<node>/home`, the run root `remote_root: "~/dispatch"` relative to that home, the key in
`~/.ssh/authorized_keys` (`StrictModes` on), the stock `sftp-server` and sshd's own privilege separation.
The base directory must be enterable by other users (`o+x` on it and every parent: e.g. under /tmp, not
under a 0700 pytest directory). By default every node runs as the current user and gets an absolute
`remote_root` (`<base>/<node>/root`), which is also its `$HOME` and SFTP start directory (`internal-sftp
-d`), so the real `~/.bashrc` is not run for every command.

`kill(name)` simulates the machine dying: the listener, every sshd serving its sessions and every process
started through it are SIGKILLed, so open connections drop at once. `restart(name)` brings it back with the
same host key.

Run a cluster for a benchmark (stays in the foreground until Ctrl-C or SIGTERM)::

    python -m rigs.loopback_cluster up --slots 2,3,4 --dir /tmp/cluster [--port 2222] [--login-users]

Needs the `openssh-server` package (`apt-get install -y openssh-server`, which brings `sftp-server`), and
`ssh-keygen`; `useradd`/`userdel` for login users.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from dispatch.cluster.ssh import SSHTarget
from dispatch.core.errors import NodeError
from dispatch.core.net import port_free
from dispatch.core.polling import attempts
from dispatch.core.processes import carrying
from rigs.loopback_host import (
    address as loopback_address,
)
from rigs.loopback_host import (
    check_reachable,
    die_with_parent,
    find_free_port,
    keygen,
    make_user,
    process_table,
    sftp_server_path,
    signal_all,
    sshd_path,
    user_exists,
    user_processes,
)

__all__ = ["LoopbackCluster", "find_free_port"]

logger = logging.getLogger(__name__)

_ENV_MARKER = "DISPATCH_LOOPBACK_NODE"
_START_TIMEOUT = 10.0


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
        self.login_users = False
        self._homes: dict[str, Path] = {}
        self._users: dict[str, str] = {}  # login users by node name
        self._uids: dict[str, int] = {}
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

    def home(self, name: str) -> Path:
        """Node `name`'s home directory, as a path on this machine."""
        self.node(name)
        return self._homes[name]

    def run_root(self, name: str) -> Path:
        """Node `name`'s run root (`remote_root`), as a path on this machine."""
        root = self.node(name)["remote_root"]
        return self._homes[name] / root[2:] if root.startswith("~/") else Path(root)

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
    def start(self, slots: list[int], base_dir: Path, port: int = 2222, *, isolate_home: bool = True,
              max_sessions: int = 100, login_users: bool = False) -> list[dict[str, Any]]:
        """Write keys and configs into `base_dir` and start one sshd per entry of `slots`.

        Args:
            slots: the slot count of each node; node `i` is named `loop<i+1>` at 127.0.0.(2+i).
            base_dir: where keys, configs, logs, `nodes.json` and the nodes' homes go.
            port: the TCP port every node listens on; 0 picks one that is free on all addresses.
            isolate_home: without login users, make each node's `remote_root` its `$HOME` and SFTP start
                directory; with False, sessions get the real home (and run its shell start-up files).
            max_sessions: sshd's `MaxSessions` (channels per connection; OpenSSH's default is 10).
            login_users: a login user per node, as on real machines (see the module docstring; needs root).

        Returns:
            The node entries, as written to `nodes.json`.

        Raises:
            NodeError: a port is already in use, a node's user cannot be made or reach its home, or an sshd
                did not come up (its log tail is included).
        """
        if self._processes:
            raise RuntimeError("this LoopbackCluster is already running; stop() it first")
        self.login_users = login_users
        if login_users and os.geteuid() != 0:
            raise RuntimeError("a login user per node needs root (useradd); start with login_users=False to run "
                               f"every node as {getpass.getuser()}")
        self.base_dir = base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        self.port = port = port or find_free_port(len(slots))
        for index in range(len(slots)):
            address = loopback_address(index)
            if not port_free(port, address):
                raise NodeError(f"loop{index + 1}", f"{address}:{port} is already in use (another loopback "
                                "cluster or sshd?): stop it or pick another port (--port, or 0 for a free one)")
        keygen(self.key_path, "dispatch-loopback-client")
        public_key = self.key_path.with_suffix(".pub").read_text()
        try:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # the privilege separation directory
        except PermissionError:
            logger.debug("cannot create /run/sshd (not root); sshd runs without privilege separation")

        self.nodes, known, aliases = [], [], []
        try:
            for index, count in enumerate(slots):
                entry, alias, host_line = self._prepare_node(index, count, port, public_key, isolate_home,
                                                             max_sessions)
                self.nodes.append(entry)
                aliases.append(alias)
                known.append(host_line)
        except BaseException:
            self._remove_users()
            raise
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

    def _prepare_node(self, index: int, slots: int, port: int, public_key: str, isolate_home: bool,
                      max_sessions: int) -> tuple[dict[str, Any], str, str]:
        """Node `index`'s directory, user, keys and sshd_config; its nodes.json entry, ssh_config alias and
        known_hosts line."""
        name, address = f"loop{index + 1}", loopback_address(index)
        node_dir = self._base / name
        node_dir.mkdir(parents=True, exist_ok=True)
        host_key = node_dir / "ssh_host_ed25519_key"
        keygen(host_key, f"dispatch-loopback-{name}")
        if self.login_users:
            node_dir.chmod(0o711)  # its user passes through to its home, and reads nothing else here
            user, home = f"dn{port}-{index + 1}", node_dir / "home"
            self._users[name] = user
            self._uids[name], gid = make_user(user, home)
            check_reachable(name, user, home)
            (home / ".ssh").mkdir(parents=True, exist_ok=True)
            (home / ".ssh" / "authorized_keys").write_text(public_key)
            for path, mode in ((home, 0o755), (home / ".ssh", 0o700), (home / ".ssh" / "authorized_keys", 0o600)):
                os.chown(path, self._uids[name], gid)
                path.chmod(mode)
            remote_root = "~/dispatch"
        else:
            user, home = getpass.getuser(), node_dir / "root"
            home.mkdir(exist_ok=True)
            (self._base / "authorized_keys").write_text(public_key)
            remote_root = str(home)
        self._homes[name] = home
        (node_dir / "sshd_config").write_text(
            self._sshd_config(name, address, port, host_key, user, isolate_home, max_sessions))
        host_field = address if port == 22 else f"[{address}]:{port}"
        key_type, key_data = host_key.with_suffix(".pub").read_text().split()[:2]
        alias = (f"Host {name}\n    HostName {address}\n    Port {port}\n    User {user}\n"
                 f'    IdentityFile "{self.key_path}"\n    UserKnownHostsFile "{self.known_hosts}"\n'
                 "    IdentitiesOnly yes\n    StrictHostKeyChecking yes\n\n")
        entry = {"name": name, "ssh_host": name, "slots": slots, "api_mode": "direct", "executor": "glm",
                 "priority": 1, "host": address, "port": port, "user": user, "key_path": str(self.key_path),
                 "known_hosts": str(self.known_hosts), "remote_root": remote_root}
        return entry, alias, f"{host_field} {key_type} {key_data}\n"

    def _sshd_config(self, name: str, address: str, port: int, host_key: Path, user: str, isolate_home: bool,
                     max_sessions: int) -> str:
        node_dir = self._base / name
        common = [
            f"ListenAddress {address}:{port}",
            f'HostKey "{host_key}"',
            f'PidFile "{node_dir / "sshd.pid"}"',
            "UsePAM no", "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UseDNS no", "PrintMotd no", f"MaxSessions {max_sessions}", "MaxStartups 100:30:200", "LogLevel VERBOSE",
        ]
        if self.login_users:
            # as on a real machine: the user's own authorized_keys, checked strictly; the stock sftp-server
            # (starts in the home); HOME from the user's entry. Every process started through this node carries
            # the marker, and runs as its user, so kill() finds detached ones too.
            return "\n".join([*common, "AuthorizedKeysFile .ssh/authorized_keys", "StrictModes yes",
                              "PermitRootLogin no", f"AllowUsers {user}", f"Subsystem sftp {sftp_server_path()}",
                              f'SetEnv "{_ENV_MARKER}={node_dir}"', ""])
        home = node_dir / "root"
        environment = f'"{_ENV_MARKER}={node_dir}"' + (f' "HOME={home}"' if isolate_home else "")
        return "\n".join([
            *common, f'AuthorizedKeysFile "{self._base / "authorized_keys"}"', "StrictModes no", "PermitRootLogin yes",
            "Subsystem sftp internal-sftp" + (f' -d "{home}"' if isolate_home else ""),
            f"SetEnv {environment}",
            "",
        ])

    def _launch(self, name: str) -> None:
        node, node_dir = self.node(name), self._base / name
        log = node_dir / "sshd.log"
        command = [sshd_path(), "-D", "-e", "-E", str(log), "-f", str(node_dir / "sshd_config")]
        with log.open("ab") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                       start_new_session=True, preexec_fn=die_with_parent())
        with self._lock:
            self._processes[name] = process
        for _ in attempts(_START_TIMEOUT, 0.02):
            if process.poll() is not None:
                break
            try:
                socket.create_connection((node["host"], node["port"]), timeout=1.0).close()
                logger.debug("node %s: sshd pid %d listening on %s:%d", name, process.pid,
                             node["host"], node["port"])
                return
            except OSError:
                pass
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise NodeError(name, f"sshd did not start listening on {node['host']}:{node['port']} "
                              f"(exit code {process.poll()}); {log}:\n{tail}")

    def kill(self, name: str) -> None:
        """Simulate node `name` dying: SIGKILL its sshd, the sshd children serving its sessions, and every
        process started through it (with login users: every process of its user). Its connections drop at
        once. Idempotent.

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
            signal_all({root}, signal.SIGSTOP)
            victims = {root}
            while True:
                table = process_table()
                found = {pid for pid, ppid in table.items() if ppid in victims} - victims
                if not found:
                    break
                signal_all(found, signal.SIGSTOP)
                victims |= found
        victims |= set(carrying(_ENV_MARKER, str(node_dir)))
        uid = self._uids.get(name)
        while uid is not None:  # its user's processes, stopped until no new one appears
            found = user_processes(uid) - victims
            if not found:
                break
            signal_all(found, signal.SIGSTOP)
            victims |= found
        signal_all(victims, signal.SIGKILL)
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
        """Kill every node and remove their login users. Idempotent; files in the base directory are left."""
        if self.base_dir is None:
            return
        for node in self.nodes:
            self.kill(node["name"])
        self._remove_users()

    def _remove_users(self) -> None:
        for name in list(self._uids):
            user = self._users[name]
            done = subprocess.run(["userdel", user], capture_output=True, text=True, timeout=60)
            if done.returncode != 0 and user_exists(user):
                logger.warning("node %s: could not remove its user %s: %s", name, user, done.stderr.strip())
            self._uids.pop(name)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rigs.loopback_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a cluster and keep it up until Ctrl-C or SIGTERM")
    up.add_argument("--slots", default="2,3,4", help="slots per node, comma-separated (default 2,3,4)")
    up.add_argument("--dir", required=True, type=Path, help="base directory for keys, configs and logs")
    up.add_argument("--port", type=int, default=2222, help="TCP port of every node (0: pick a free one)")
    up.add_argument("--login-users", action="store_true",
                    help="a login user per node with remote_root ~/dispatch, as on real machines (needs root; "
                         "--dir must be enterable by other users)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    slots = [int(part) for part in args.slots.split(",") if part.strip()]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LoopbackCluster() as cluster:
        try:
            cluster.start(slots, args.dir, port=args.port, login_users=args.login_users)
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
