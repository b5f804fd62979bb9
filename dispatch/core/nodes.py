"""A node: a machine that runs specs. One model for `nodes.json`, the scheduler and the `ClusterNode` block.

`Node` holds every field a node has and checks each with the words `nodes.json` users read
(`dispatch.cluster.config` adds the file, the entry and the node's name in front). The `ClusterNode` block
(blocks/cluster_node.py) is this model plus a private key, so the UI, `nodes.json` and the scheduler cannot
drift apart: a field added here is a field of all three.

Examples:
    >>> Node(name="gpu1", slots=4, host="127.0.0.9").pool
    'node-gpu1'
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from dispatch.core.errors import cut
from dispatch.core.validation import invalid

TRANSPORTS = ("local", "ssh", "worker")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A node name (a full match): it becomes a work pool, a systemd instance and a path component on the node."""
MAX_SLOTS = 1024
_MAX_FIELD = 4096  # characters of one string field
_TEXT_FIELDS = ("ssh_host", "host", "user", "key_path", "known_hosts", "ssh_config", "remote_root", "python")


def node_name_problem(name: object) -> str | None:
    """Why `name` is no node name (`NODE_NAME`), or None when it is one."""
    if isinstance(name, str) and NODE_NAME.fullmatch(name):
        return None
    return ("must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit (it names the "
            "node's work pool, its worker unit and paths on the node)")


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` when it is a `kind` (true/false count as a bool only), else the error "must be <what>"."""
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,))):
        raise invalid(f"must be {what}, got {cut(value)}")
    return value


def _strings(value: Any, what: str) -> frozenset[str]:
    """A list (or set, from code) of strings as a frozenset."""
    for item in _expect(value, list | tuple | set | frozenset, what):
        _expect(item, str, what)
    return frozenset(value)


class Node(BaseModel):
    """A machine that runs specs (a `nodes.json` entry; fields in the order they are checked).

    Unknown `nodes.json` fields are kept in `options` by `dispatch.cluster.config.parse_node`; here an unknown
    field is an error.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique node name; its work pool and concurrency limit are `node-<name>`.")
    transport: Literal["local", "ssh", "worker"] = Field(
        default="ssh", description="`local` (the dispatcher's machine), `ssh` (pushed over SSH) or `worker` "
                                   "(a Prefect worker on the node pulls from its pool).")
    slots: int = Field(description="How many specs the node runs at once (1-1024).")
    ssh_host: str | None = Field(default=None, description="Host name, `user@host` or ~/.ssh/config alias.")
    host: str | None = Field(default=None, description="Host name or address to connect to (wins over ssh_host).")
    user: str | None = Field(default=None, description="SSH login user (default: the ssh config's or local user).")
    key_path: str | None = Field(default=None, description="Private key file on the dispatcher's machine.")
    known_hosts: str | None = Field(default=None, description="known_hosts file to check the host key against.")
    ssh_config: str | None = Field(default=None, description="An ssh config file to resolve ssh_host with.")
    labels: frozenset[str] = Field(default=frozenset(), description="Placement labels a spec can ask for.")
    models: frozenset[str] | None = Field(
        default=None, description="Models whose CLI the node has (glm, claude, codex, ...); unset: any model.")
    priority: int = Field(default=0, description="Tie-break between nodes with as many free slots (lower first).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment for every spec on the node, e.g. PATH (no secrets).")
    port: int | None = Field(default=None, description="SSH port (default 22 or the ssh config's).")
    trust_on_first_use: bool = Field(default=False, description="Accept and save an unknown host key.")
    remote_root: str = Field(default="dispatch", description="The node's run root; relative to the login's home.")
    python: str = Field(default="python3", description="The node's Python 3, for the node runner.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Other nodes.json fields, kept as they were (api_mode, executor, ...).")

    @property
    def pool(self) -> str:
        """The node's Prefect work pool (and global concurrency limit) name."""
        return f"node-{self.name}"

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        if problem := node_name_problem(_expect(value, str, "the node's name")):
            raise invalid(f"{cut(value)} {problem}")
        return value

    @field_validator("transport", mode="before")
    @classmethod
    def _transport(cls, value: Any) -> str:
        if not isinstance(value, str) or value not in TRANSPORTS:
            raise invalid(f"must be one of {', '.join(TRANSPORTS)}, got {cut(value)}")
        return value

    @field_validator("slots", mode="before")
    @classmethod
    def _slots(cls, value: Any) -> int:
        if not 1 <= _expect(value, int, "a whole number of slots >= 1") <= MAX_SLOTS:
            raise invalid(f"must be from 1 to {MAX_SLOTS}, got {value}")
        return value

    @field_validator(*_TEXT_FIELDS, mode="before")
    @classmethod
    def _text(cls, value: Any, info: Any) -> str | None:
        """A one-line string; null is the field's default."""
        if value is None:
            return cls.model_fields[info.field_name].default
        _expect(value, str, "a string")
        if not value or len(value) > _MAX_FIELD or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise invalid(f"must be a non-empty line of at most {_MAX_FIELD} characters without control "
                          f"characters, got {cut(value)}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> frozenset[str]:
        return _strings(value, "a list of strings")

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> frozenset[str] | None:
        return None if value is None else _strings(value, "a list of model names")

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> int:
        return _expect(value, int, "a whole number")

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> dict[str, str]:
        """Variables as text (numbers are written out; true/false, lists and null are refused)."""
        _expect(value, dict, "an object of environment variables")
        for key, item in value.items():
            if not isinstance(item, str | int | float) or isinstance(item, bool):
                raise invalid(f"must be a string, got {cut(item)}", f"env.{cut(key)}")
        return {str(key): str(item) for key, item in value.items()}

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> int | None:
        if value is not None and not 1 <= _expect(value, int, "a TCP port number") <= 65535:
            raise invalid(f"must be a TCP port from 1 to 65535, got {value}")
        return value

    @field_validator("trust_on_first_use", mode="before")
    @classmethod
    def _trust(cls, value: Any) -> bool:
        return _expect(value, bool, "true or false (JSON booleans, not strings)")

    @model_validator(mode="after")
    def _reachable(self) -> Node:
        if self.transport == "ssh" and not (self.ssh_host or self.host):
            raise invalid("an ssh node needs ssh_host (a host or ~/.ssh/config alias)", "ssh_host")
        return self

    @field_serializer("labels", "models")
    def _sorted(self, value: frozenset[str] | None) -> list[str] | None:
        """Sets as sorted lists: a saved block or a dump reads the same every time."""
        return None if value is None else sorted(value)
