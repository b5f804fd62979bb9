"""How to reach a node: `SSHTarget`, its resolution from the user's ssh config, and opening a verified,
authenticated paramiko connection to it.

Host keys are checked against the target's `known_hosts` only (unknown keys are refused, or with
`trust_on_first_use` accepted and appended to that file). Key material is never logged or put in messages.
"""

from __future__ import annotations

import getpass
import io
import logging
import os
import re
import shlex
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from dispatch.core.errors import ConfigError, NodeError
from dispatch.core.safeload import read_bounded_bytes

if TYPE_CHECKING:
    from dispatch.core.nodes import Node

logger = logging.getLogger(__name__)

_TCP_USER_TIMEOUT_MS = 60_000
_MAX_SSH_CONFIG = 1 << 20
_SETTING = re.compile(r"(\w+)(?:\s*=\s*|\s+)(.+)")  # paramiko's SSHConfig.SETTINGS_REGEX
_NEVER_MATCHES = "Match host !*"
_known_hosts_lock = threading.Lock()


@dataclass
class SSHTarget:
    """How to reach one node. Build it with `resolve_target` to honour the user's ssh config.

    Attributes:
        name: the node's name (used in messages and as the pool's key).
        host: host name or address to connect to.
        port: TCP port.
        user: login user; None means the local user.
        key_path: private key file; None (and no `key_secret`) means ssh-agent and the default keys.
        key_secret: a private key's text (OpenSSH or PEM); wins over `key_path`; never logged.
        known_hosts: the known_hosts file to check host keys against (default `~/.ssh/known_hosts`).
        trust_on_first_use: accept an unknown host key and save it to `known_hosts`.
        connect_timeout: seconds allowed for TCP connect, SSH banner, authentication and channel opening.
    """

    name: str
    host: str
    port: int = 22
    user: str | None = None
    key_path: str | None = None
    key_secret: str | None = field(default=None, repr=False)
    known_hosts: str | None = None
    trust_on_first_use: bool = False
    connect_timeout: float = 10.0

    @property
    def identity(self) -> tuple[object, ...]:
        """What a connection depends on: a pool reconnects when it changes (the secret only as a hash)."""
        return (self.host, self.port, self.user, self.key_path, hash(self.key_secret), self.known_hosts)


def resolve_target(name: str, ssh_host: str, *, host: str | None = None, port: int | None = None,
                   user: str | None = None, key_path: str | None = None, key_secret: str | None = None,
                   known_hosts: str | None = None, trust_on_first_use: bool = False,
                   connect_timeout: float = 10.0, ssh_config_path: str | Path | None = None) -> SSHTarget:
    """Build the `SSHTarget` of a node from its `ssh_host` (`alias`, `host` or `user@host`) and ssh config.

    The `Host` entry matching `ssh_host` supplies HostName, Port, User, IdentityFile and UserKnownHostsFile;
    explicit arguments win over it.

    Args:
        name: the node's name.
        ssh_host: the node's `ssh_host` from nodes.json: a Host alias, a host name, or `user@host`.
        host, port, user, key_path, known_hosts: explicit values that win over the ssh config.
        key_secret: a private key's text, e.g. from a Prefect `SecretStr`; wins over key files.
        trust_on_first_use: accept and save unknown host keys.
        connect_timeout: seconds for connect, banner, authentication and channel opening.
        ssh_config_path: the ssh config to read; default `~/.ssh/config` if it exists.

    Returns:
        The resolved target.

    Raises:
        ConfigError: `ssh_config_path` was given but does not exist.
    """
    alias_user, _, alias = ssh_host.rpartition("@")
    config_file = Path(ssh_config_path or "~/.ssh/config").expanduser()
    entry: dict[str, Any] = {}
    if config_file.is_file():
        entry = dict(read_ssh_config(config_file).lookup(alias))
    elif ssh_config_path is not None:
        raise ConfigError(f"node {name}: ssh config {config_file} does not exist (fix ssh_config_path)")
    identities = [os.path.expanduser(str(path)) for path in entry.get("identityfile", [])]
    config_key = next((path for path in identities if os.path.exists(path)), identities[0] if identities else None)
    config_known = str(entry["userknownhostsfile"]).split()[0] if entry.get("userknownhostsfile") else None
    return SSHTarget(
        name=name,
        host=host or str(entry.get("hostname") or alias),
        port=int(port or entry.get("port") or 22),
        user=user or alias_user or (str(entry["user"]) if entry.get("user") else None),
        key_path=key_path or config_key,
        key_secret=key_secret,
        known_hosts=os.path.expanduser(known_hosts or config_known or "~/.ssh/known_hosts"),
        trust_on_first_use=trust_on_first_use,
        connect_timeout=connect_timeout,
    )


def _match_runs_a_command(line: str) -> bool:
    """Whether an ssh config line is a `Match` with an `exec` criterion (paramiko runs it during lookup)."""
    found = _SETTING.match(line.strip())
    if not found or found.group(1).lower() != "match":
        return False
    try:
        words = shlex.split(found.group(2))
    except ValueError:
        words = found.group(2).split()
    return any(word.lower().lstrip("!") == "exec" for word in words)


def read_ssh_config(path: Path) -> paramiko.SSHConfig:
    """An ssh config, read so that looking a host up never runs a command.

    paramiko's `SSHConfig.lookup` runs a `Match exec "..."` criterion's command (through invoke) to decide
    whether the block applies; a block with one is read as matching no host, and a warning names the line.
    `ProxyCommand`, `LocalCommand` and `KnownHostsCommand` are never run: `connect_client` opens the TCP
    connection itself and uses only HostName, Port, User, IdentityFile and UserKnownHostsFile.

    Raises:
        ConfigError: the file cannot be read, is larger than 1 MiB, or is no ssh config.
    """
    raw = read_bounded_bytes(path, f"ssh config {path}", max_bytes=_MAX_SSH_CONFIG)
    lines = raw.decode("utf-8", "replace").splitlines()
    for number, line in enumerate(lines):
        if _match_runs_a_command(line):
            logger.warning("ssh config %s line %d: a Match with exec is skipped (dispatch runs no command from an "
                           "ssh config): %s", path, number + 1, line.strip()[:200])
            lines[number] = _NEVER_MATCHES
    try:
        return paramiko.SSHConfig.from_text("\n".join(lines))
    except (paramiko.ConfigParseError, ValueError) as exc:
        raise ConfigError(f"ssh config {path}: cannot be read: {str(exc)[:200]}") from None


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(f"{hostname} {key.get_name()} {key.fingerprint}")


class _SaveNewHostKey(paramiko.MissingHostKeyPolicy):
    """Trust on first use: accept the key and append it to the known_hosts file (other entries untouched)."""

    def __init__(self, node: str, path: Path) -> None:
        self._node, self._path = node, path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        with _known_hosts_lock:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self._path.open("a") as known:
                known.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        logger.warning("node %s: trusted new host key %s of %s, saved to %s", self._node, key.fingerprint,
                       hostname, self._path)


def _load_key(target: SSHTarget) -> paramiko.PKey | None:
    if target.key_secret is not None:
        for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return key_class.from_private_key(io.StringIO(target.key_secret))
            except (paramiko.SSHException, ValueError):
                continue
        raise NodeError(target.name, "key_secret is not an unencrypted ed25519, ECDSA or RSA private key "
                                     "(OpenSSH or PEM text): paste the whole key file")
    if target.key_path is None:
        return None
    path = Path(target.key_path).expanduser()
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError as exc:
        raise NodeError(target.name, f"key file {path} does not exist: fix key_path or IdentityFile") from exc
    except paramiko.PasswordRequiredException as exc:
        raise NodeError(target.name, f"key file {path} is encrypted: use an unencrypted key for the "
                                     "dispatcher, or give it as key_secret") from exc
    except (OSError, ValueError, paramiko.SSHException) as exc:
        raise NodeError(target.name, f"cannot read key file {path}: {exc}") from exc


def connect_client(target: SSHTarget, *, keepalive: int = 15) -> paramiko.SSHClient:
    """Open a connection to `target`, verifying its host key and authenticating with its key.

    Args:
        target: the node.
        keepalive: seconds between SSH keepalives.

    Returns:
        A connected client whose transport sends keepalives; a silently vanished peer is dropped after
        about a minute of unacknowledged traffic (TCP_USER_TIMEOUT, on Linux).

    Raises:
        NodeError: unreachable, unknown or changed host key, authentication failed, unusable key (each
            message says what to do).
    """
    known = Path(target.known_hosts or "~/.ssh/known_hosts").expanduser()
    client = paramiko.SSHClient()
    if known.is_file():
        client.load_host_keys(str(known))
    client.set_missing_host_key_policy(
        _SaveNewHostKey(target.name, known) if target.trust_on_first_use else _RefuseUnknownHost())
    pkey, user = _load_key(target), target.user or getpass.getuser()
    where = f"{user}@{target.host}:{target.port}"
    key_name = target.key_path if target.key_secret is None else "from key_secret"
    bracketed = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    logger.debug("node %s: connecting to %s with key %s", target.name, where, key_name or "(agent)")
    try:
        client.connect(target.host, port=target.port, username=user, pkey=pkey,
                       timeout=target.connect_timeout, banner_timeout=target.connect_timeout,
                       auth_timeout=target.connect_timeout, channel_timeout=target.connect_timeout,
                       allow_agent=pkey is None, look_for_keys=pkey is None)
    except _UnknownHostKey as exc:
        raise NodeError(target.name, f"host key of {bracketed} is not in {known}: add it with "
                        f"`ssh-keyscan -p {target.port} {target.host} >> {known}` (after checking its "
                        "fingerprint), or set trust_on_first_use") from exc
    except paramiko.BadHostKeyException as exc:
        raise NodeError(target.name, f"host key of {bracketed} does not match the one in {known} (the "
                        "machine was reinstalled, or someone is in the middle): if expected, remove it "
                        f"with `ssh-keygen -R '{bracketed}' -f {known}` and add the new one") from exc
    except paramiko.AuthenticationException as exc:
        raise NodeError(target.name, f"authentication as {where} failed with key "
                        f"{key_name or 'from ssh-agent or ~/.ssh/id_*'}: add its public key to "
                        "~/.ssh/authorized_keys on the node, or fix key_path/IdentityFile") from exc
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise NodeError(target.name, f"unreachable: cannot connect to {where}: {exc or type(exc).__name__}"
                        ) from exc
    transport = client.get_transport()
    if transport is None:  # connect() returned without a transport: never seen, but do not pass None on
        raise NodeError(target.name, f"unreachable: no SSH transport to {where}")
    transport.set_keepalive(keepalive)
    if hasattr(socket, "TCP_USER_TIMEOUT") and transport.sock is not None:
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _TCP_USER_TIMEOUT_MS)
    logger.debug("node %s: connected to %s", target.name, where)
    return client


def node_target(node: Node, *, key_secret: str | None = None, connect_timeout: float = 10.0) -> SSHTarget:
    """How to reach `node` over SSH: its explicit fields, then its `ssh_host` through the ssh config.

    Args:
        node: the node (from `nodes.json` or a `ClusterNode` block).
        key_secret: the private key's text, when it comes from a secret rather than `key_path`.
        connect_timeout: seconds for connect, banner, authentication and channel opening.

    Raises:
        ConfigError: the node has neither `ssh_host` nor `host`, or its `ssh_config` file does not exist.
    """
    alias = node.ssh_host or node.host
    if not alias:
        raise ConfigError(f"node {node.name}: no ssh_host or host to connect to; set one in nodes.json")
    return resolve_target(node.name, alias, host=node.host, port=node.port, user=node.user,
                          key_path=node.key_path, key_secret=key_secret, known_hosts=node.known_hosts,
                          trust_on_first_use=node.trust_on_first_use, connect_timeout=connect_timeout,
                          ssh_config_path=node.ssh_config)
