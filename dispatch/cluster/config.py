"""The cluster as the dispatcher sees it: nodes (`nodes.json`) and projects (`projects.json`).

Both files keep the old system's format and live in `DISPATCH_HOME`:

    nodes.json    {"nodes": [{"name", "ssh_host", "slots", "api_mode", "executor", "priority", ...}]}
    projects.json {"<project>": {"sync_mode": "git"|"scp", "repo_url", "repo_local", "specs_dir", "main_branch"}}

Ours in projects.json, optional: `order` (`path`, the default: ready specs by how much the project waits on
them; `priority`: strictly by `priority` first) and `weight` (the project's fair share of contended slots
relative to other running projects, default 1).

Our optional node fields: `transport` (`ssh` default, `local`, `worker`), `host`, `port`, `user`,
`key_path`, `known_hosts`, `trust_on_first_use`, `ssh_config`, `remote_root` (default `dispatch`, i.e.
`~/dispatch`), `labels`, `models` (whose CLI the node has), `python`, `env` (variables for every spec on
the node, e.g. a `PATH` that holds the agent CLIs: SSH commands get no login shell's PATH). Unknown fields are kept in
`options` and warned about once. Without `nodes.json` the cluster is the embedded `local` node.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch.core.errors import ConfigError, cut
from dispatch.core.order import ORDERS
from dispatch.core.safeload import load_json
from dispatch.core.settings import DispatchSettings
from dispatch.core.shares import MAX_WEIGHT, MIN_WEIGHT

logger = logging.getLogger(__name__)

TRANSPORTS = ("local", "ssh", "worker")
_NODE_FIELDS = {
    "name", "ssh_host", "slots", "api_mode", "executor", "priority", "transport", "host", "port", "user",
    "key_path", "known_hosts", "trust_on_first_use", "ssh_config", "remote_root", "labels", "models", "python",
    "env",
}
_PROJECT_FIELDS = {"sync_mode", "repo_url", "repo_local", "specs_dir", "main_branch", "order", "weight"}
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A node name (a full match): it becomes a work pool, a systemd instance and a path component on the node."""
_TEXT_FIELDS = ("ssh_host", "host", "user", "key_path", "known_hosts", "ssh_config")
_MAX_FIELD = 4096  # characters of one string field
_MAX_SLOTS = 1024
_MAX_FILE_BYTES = 4 << 20  # nodes.json, projects.json
_MAX_DEPTH = 16  # {"nodes": [{"env": {...}}]} nests 3


@dataclass
class Node:
    """A machine that runs specs.

    Attributes:
        name: unique node name; its work pool is `node-<name>`.
        slots: how many specs it runs at once.
        transport: `local` (this machine), `ssh` (pushed over paramiko) or `worker` (a Prefect worker).
        labels: placement labels a spec can ask for.
        priority: tie-break between nodes with as many free slots (lower first).
        models: models whose CLI the node has; None when not said (any).
        ssh_host: the old field: a host name or a `Host` alias of the ssh config.
        host, port, user, key_path, known_hosts, trust_on_first_use, ssh_config: SSH details (explicit wins).
        remote_root: the node's run root; relative paths are under the login's home.
        python: the node's Python 3 for the node runner.
        env: environment for every spec on the node (not secrets: those belong in blocks).
        options: fields we do not know, kept as they were.
    """

    name: str
    slots: int
    transport: str = "ssh"
    labels: frozenset[str] = frozenset()
    priority: int = 0
    models: frozenset[str] | None = None
    ssh_host: str | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    key_path: str | None = None
    known_hosts: str | None = None
    trust_on_first_use: bool = False
    ssh_config: str | None = None
    remote_root: str = "dispatch"
    python: str = "python3"
    env: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def pool(self) -> str:
        """The node's Prefect work pool (and global concurrency limit) name."""
        return f"node-{self.name}"


@dataclass
class ProjectConfig:
    """How a project's code reaches the nodes (`projects.json`)."""

    sync_mode: str = "scp"
    repo_url: str | None = None
    repo_local: str | None = None
    specs_dir: str | None = None
    main_branch: str = "main"
    order: str = "path"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


def local_node(settings: DispatchSettings) -> Node:
    """The embedded default node: this machine."""
    return Node(name="local", slots=settings.local_slots, transport="local")


def _read(path: Path) -> Any:
    return load_json(path, max_bytes=_MAX_FILE_BYTES, max_depth=_MAX_DEPTH)


def node_name_problem(name: object) -> str | None:
    """Why `name` is no node name (`NODE_NAME`), or None when it is one."""
    if isinstance(name, str) and NODE_NAME.fullmatch(name):
        return None
    return ("must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit (it names the "
            "node's work pool, its worker unit and paths on the node)")


def _expect(path: Path, where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{path}: {where}: must be {what}, got {cut(value)}")
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: {where}: must be {what}, got {cut(value)}")
    return value


def _text(path: Path, where: str, raw: dict, key: str, default: str | None = None) -> str | None:
    """An optional one-line string field (None or `default` when absent)."""
    value = raw.get(key, default)
    if value is None:
        return None
    _expect(path, f"{where}.{key}", value, str, "a string")
    if not value or len(value) > _MAX_FIELD or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{path}: {where}.{key}: must be a non-empty line of at most {_MAX_FIELD} characters "
                          f"without control characters, got {cut(value)}")
    return value


def _strings(path: Path, where: str, value: Any, what: str) -> list[str]:
    _expect(path, where, value, list, what)
    for item in value:
        _expect(path, where, item, str, what)
    return value


def parse_node(path: Path, index: int, raw: Any, settings: DispatchSettings) -> Node:
    """One `nodes.json` entry as a `Node`.

    Raises:
        ConfigError: naming the file, the entry and the field.
    """
    where = f"nodes[{index}]"
    _expect(path, where, raw, dict, "an object with name, ssh_host and slots")
    name = _expect(path, f"{where}.name", raw.get("name"), str, "the node's name")
    if problem := node_name_problem(name):
        raise ConfigError(f"{path}: {where}.name: {cut(name)} {problem}")
    where = f"nodes[{index}] ({name})"
    transport = raw.get("transport", "local" if name == "local" else "ssh")
    if transport not in TRANSPORTS:
        raise ConfigError(f"{path}: {where}.transport: must be one of {', '.join(TRANSPORTS)}, got {cut(transport)}")
    if transport == "local" and "slots" not in raw:
        slots = settings.local_slots  # as the embedded local node: DISPATCH_LOCAL_SLOTS, else the CPU count
    else:
        slots = _expect(path, f"{where}.slots", raw.get("slots"), int, "a whole number of slots >= 1")
    if not 1 <= slots <= _MAX_SLOTS:
        raise ConfigError(f"{path}: {where}.slots: must be from 1 to {_MAX_SLOTS}, got {slots}")
    text = {key: _text(path, where, raw, key) for key in _TEXT_FIELDS}
    if transport == "ssh" and not (text["ssh_host"] or text["host"]):
        raise ConfigError(f"{path}: {where}.ssh_host: an ssh node needs ssh_host (a host or ~/.ssh/config alias)")
    labels = _strings(path, f"{where}.labels", raw.get("labels", []), "a list of strings")
    models = raw.get("models")
    if models is not None:
        _strings(path, f"{where}.models", models, "a list of model names")
    priority = _expect(path, f"{where}.priority", raw.get("priority", 0), int, "a whole number")
    env = raw.get("env", {})
    _expect(path, f"{where}.env", env, dict, "an object of environment variables")
    if bad := [k for k, v in env.items() if not isinstance(v, str | int | float) or isinstance(v, bool)]:
        raise ConfigError(f"{path}: {where}.env.{cut(bad[0])}: must be a string, got {cut(env[bad[0]])}")
    port = raw.get("port")
    if port is not None and not 1 <= _expect(path, f"{where}.port", port, int, "a TCP port number") <= 65535:
        raise ConfigError(f"{path}: {where}.port: must be a TCP port from 1 to 65535, got {port}")
    trust = _expect(path, f"{where}.trust_on_first_use", raw.get("trust_on_first_use", False), bool,
                    "true or false (JSON booleans, not strings)")
    unknown = {k: v for k, v in raw.items() if k not in _NODE_FIELDS}
    if unknown:
        logger.warning("%s: %s: unknown fields kept as options: %s", path, where, ", ".join(sorted(map(cut, unknown))))
    options = {k: raw[k] for k in ("api_mode", "executor") if k in raw} | unknown
    return Node(
        name=name, slots=slots, transport=transport, labels=frozenset(labels), priority=priority,
        models=frozenset(models) if models is not None else None, ssh_host=text["ssh_host"], host=text["host"],
        port=port, user=text["user"], key_path=text["key_path"], known_hosts=text["known_hosts"],
        trust_on_first_use=trust, ssh_config=text["ssh_config"],
        remote_root=_text(path, where, raw, "remote_root", "dispatch") or "dispatch",
        python=_text(path, where, raw, "python", "python3") or "python3",
        env={str(k): str(v) for k, v in env.items()}, options=options,
    )


def load_nodes(settings: DispatchSettings) -> list[Node]:
    """The cluster's nodes from `DISPATCH_HOME/nodes.json`, or the embedded `local` node without one.

    Raises:
        ConfigError: for an unreadable file, a bad field, or two nodes with one name.
    """
    path = settings.home / "nodes.json"
    if not path.exists():
        return [local_node(settings)]
    data = _read(path)
    _expect(path, "top level", data, dict, 'an object {"nodes": [...]}')
    entries = _expect(path, "nodes", data.get("nodes"), list, "a list of node objects")
    if not entries:
        raise ConfigError(f"{path}: nodes: is empty; list at least one node, or delete the file for the local node")
    nodes = [parse_node(path, i, raw, settings) for i, raw in enumerate(entries)]
    seen: set[str] = set()
    for node in nodes:
        if node.name in seen:
            raise ConfigError(f"{path}: two nodes are named {node.name!r}; node names must be unique")
        seen.add(node.name)
    return nodes


def load_project_config(settings: DispatchSettings, project: str) -> ProjectConfig:
    """The project's entry of `DISPATCH_HOME/projects.json` (scp mode, no repository, when absent).

    Raises:
        ConfigError: for an unreadable file or a bad field.
    """
    path = settings.home / "projects.json"
    if not path.exists():
        return ProjectConfig()
    data = _read(path)
    _expect(path, "top level", data, dict, 'an object {"<project>": {...}}')
    raw = data.get(project)
    if raw is None:
        return ProjectConfig()
    _expect(path, project, raw, dict, "an object with sync_mode, repo_url, ...")
    mode = raw.get("sync_mode", "scp")
    if mode not in ("git", "scp"):
        raise ConfigError(f"{path}: {project}.sync_mode: must be git or scp, got {mode!r}")
    if mode == "git" and not raw.get("repo_url"):
        raise ConfigError(f"{path}: {project}.repo_url: git mode needs the repository URL the nodes clone")
    for name in ("repo_url", "repo_local", "specs_dir", "main_branch"):
        if name in raw and not isinstance(raw[name], str):
            raise ConfigError(f"{path}: {project}.{name}: must be a string, got {raw[name]!r}")
    order = raw.get("order", "path")
    if order not in ORDERS:
        raise ConfigError(f"{path}: {project}.order: must be path (by how much the project waits on a spec) or "
                          f"priority (strictly by priority first), got {order!r}")
    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ConfigError(f"{path}: {project}.weight: must be a number from 0.01 to 100 (the project's share of "
                          f"contended slots against others' 1), got {weight!r}")
    return ProjectConfig(sync_mode=mode, repo_url=raw.get("repo_url"), repo_local=raw.get("repo_local"),
                         specs_dir=raw.get("specs_dir"), main_branch=raw.get("main_branch", "main"),
                         order=order, weight=float(weight),
                         options={k: v for k, v in raw.items() if k not in _PROJECT_FIELDS})
