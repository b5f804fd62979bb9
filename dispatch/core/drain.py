"""Drained nodes: dispatchers place no new spec on them; the specs already running there finish.

The guardian drains a node that failed its checks several cycles in a row and undrains it when it is
healthy again; people do the same with `dispatch nodes drain|undrain <node>`. Where the state lives is a
`DrainedStore`:

- `DrainedFile`, one machine (embedded): `DISPATCH_HOME/drained.json`, rewritten atomically;
- team mode: the Prefect Variable `dispatch_drained` on the team's server (`dispatch.prefect.drained`, whose
  `drained_store(settings)` picks one of the two), so every user's dispatcher sees the same drained nodes.

Both hold `{"<node>": {"reason": str, "by": str, "since": <epoch seconds>}}`. A change is a read, then a
write of the whole value: two people draining different nodes in the same instant may lose one of the
two (the guardian's next cycle drains its node again); it never drains a node nobody asked for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from dispatch.core.errors import ConfigError
from dispatch.core.paths import check_name
from dispatch.core.results import write_json
from dispatch.core.safeload import load_json

FILE = "drained.json"
MAX_REASON = 500


class DrainedStore(Protocol):
    """Where the drained set is kept (its calls may raise what its medium raises: OSError, HTTP errors)."""

    def read(self) -> Any:
        """The stored value as it is (checked by `parse_stored`); {} when none."""

    def write(self, drained: dict[str, dict]) -> None:
        """Replace the stored value."""


class DrainedFile:
    """The drained set of one machine: a JSON file (a missing or damaged file counts as nothing drained)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Any:
        try:
            return load_json(self.path, max_bytes=1 << 20)
        except ConfigError:  # missing, unreadable, or no (bounded) JSON: nothing drained
            return {}

    def write(self, drained: dict[str, dict]) -> None:
        write_json(self.path, drained)


def parse_stored(raw: Any) -> dict[str, dict]:
    """The well-formed entries of a stored value (a damaged value counts as nothing drained)."""
    if not isinstance(raw, dict):
        return {}
    drained: dict[str, dict] = {}
    for name, info in raw.items():
        if isinstance(name, str) and isinstance(info, dict):
            drained[name] = {"reason": str(info.get("reason", "")), "by": str(info.get("by", "")),
                             "since": float(info.get("since") or 0.0)}
    return drained


def drained_nodes(store: DrainedStore) -> dict[str, dict]:
    """The drained nodes and why: `{node: {"reason", "by", "since"}}` (empty when none)."""
    return parse_stored(store.read())


def drain(store: DrainedStore, node: str, *, reason: str, by: str) -> bool:
    """Drain `node`; False when it already was (its first reason is kept).

    Raises:
        UnsafePath: `node` is no valid node name.
    """
    check_name(node, "node name")
    drained = drained_nodes(store)
    if node in drained:
        return False
    drained[node] = {"reason": reason[:MAX_REASON], "by": by[:100], "since": time.time()}
    store.write(drained)
    return True


def undrain(store: DrainedStore, node: str) -> bool:
    """Put `node` back in service; False when it was not drained."""
    check_name(node, "node name")
    drained = drained_nodes(store)
    if drained.pop(node, None) is None:
        return False
    store.write(drained)
    return True
