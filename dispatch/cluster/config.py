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
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dispatch.core.errors import ConfigError, cut
from dispatch.core.nodes import Node
from dispatch.core.order import ORDERS
from dispatch.core.safeload import load_json
from dispatch.core.settings import DispatchSettings
from dispatch.core.shares import MAX_WEIGHT, MIN_WEIGHT
from dispatch.core.validation import invalid, problems

__all__ = ["ProjectConfig", "load_nodes", "load_project_config", "local_node", "parse_node"]

logger = logging.getLogger(__name__)

_OPTION_FIELDS = ("api_mode", "executor")  # the old system's node fields: kept in `options`
_NODE_FIELDS = set(Node.model_fields) - {"options"}
_MAX_FILE_BYTES = 4 << 20  # nodes.json, projects.json
_MAX_DEPTH = 16  # {"nodes": [{"env": {...}}]} nests 3


class ProjectConfig(BaseModel):
    """How a project's code reaches the nodes, and how it is scheduled (a `projects.json` entry)."""

    model_config = ConfigDict(extra="forbid")

    sync_mode: str = Field(default="scp", description="`git` (nodes clone repo_url) or `scp` (pushed).")
    repo_url: str | None = Field(default=None, description="The repository the nodes clone in git mode.")
    repo_local: str | None = Field(default=None, description="The project's checkout on this machine.")
    specs_dir: str | None = Field(default=None, description="The project's spec directory.")
    main_branch: str = Field(default="main", description="The branch specs start from.")
    order: str = Field(default="path", description="`path` or `priority`: how ready specs are ordered.")
    weight: float = Field(default=1.0, description="The project's share of contended slots against others' 1.")
    options: dict[str, Any] = Field(default_factory=dict, description="Other fields, kept as they were.")

    @field_validator("sync_mode", mode="before")
    @classmethod
    def _sync_mode(cls, value: Any) -> str:
        if value not in ("git", "scp"):
            raise invalid(f"must be git or scp, got {value!r}")
        return value

    @field_validator("repo_url", "repo_local", "specs_dir", "main_branch", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise invalid(f"must be a string, got {value!r}")
        return value

    @field_validator("order", mode="before")
    @classmethod
    def _order(cls, value: Any) -> str:
        if value not in ORDERS:
            raise invalid("must be path (by how much the project waits on a spec) or priority (strictly by "
                          f"priority first), got {value!r}")
        return value

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not MIN_WEIGHT <= value <= MAX_WEIGHT:
            raise invalid("must be a number from 0.01 to 100 (the project's share of contended slots against "
                          f"others' 1), got {value!r}")
        return float(value)

    @model_validator(mode="after")
    def _cloneable(self) -> ProjectConfig:
        if self.sync_mode == "git" and not self.repo_url:
            raise invalid("git mode needs the repository URL the nodes clone", "repo_url")
        return self


def local_node(settings: DispatchSettings) -> Node:
    """The embedded default node: this machine."""
    return Node(name="local", slots=settings.local_slots, transport="local")


def _read(path: Path) -> Any:
    return load_json(path, max_bytes=_MAX_FILE_BYTES, max_depth=_MAX_DEPTH)


def _expect(path: Path, where: str, value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: {where}: must be {what}, got {cut(value)}")
    return value


def _validated(model: type[BaseModel], data: dict, path: Path, where: Any) -> Any:
    """`model` validated from `data`; its first problem as a ConfigError "<file>: <where>.<field>: <message>".

    Args:
        where: the entry's place, or a function of the field that names it.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, message = problems(exc)[0]
        raise ConfigError(f"{path}: {where(field) if callable(where) else where}.{field}: {message}") from None


def parse_node(path: Path, index: int, raw: Any, settings: DispatchSettings) -> Node:
    """One `nodes.json` entry as a `Node`.

    A node named `local` is a `local` one unless it says otherwise; a `local` node without `slots` has as
    many as the embedded local node (`DISPATCH_LOCAL_SLOTS`, else the CPU count). Unknown fields are kept in
    `options`, with a warning.

    Raises:
        ConfigError: naming the file, the entry and the field.
    """
    where = f"nodes[{index}]"
    _expect(path, where, raw, dict, "an object with name, ssh_host and slots")
    data = {key: value for key, value in raw.items() if key in _NODE_FIELDS}
    data.setdefault("name", None)
    data.setdefault("transport", "local" if data["name"] == "local" else "ssh")
    data.setdefault("slots", settings.local_slots if data["transport"] == "local" else None)
    unknown = {key: value for key, value in raw.items() if key not in _NODE_FIELDS and key not in _OPTION_FIELDS}
    data["options"] = {key: raw[key] for key in _OPTION_FIELDS if key in raw} | unknown
    node = _validated(Node, data, path, lambda field: where if field == "name" else f"{where} ({data['name']})")
    if unknown:
        logger.warning("%s: %s (%s): unknown fields kept as options: %s", path, where, node.name,
                       ", ".join(sorted(map(cut, unknown))))
    return node


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
    data = {key: value for key, value in raw.items() if key in ProjectConfig.model_fields and key != "options"}
    data["options"] = {k: v for k, v in raw.items() if k not in data}
    return _validated(ProjectConfig, data, path, project)
