"""Drained nodes: dispatchers place no new spec on them; the specs already running there finish.

The guardian drains a node that failed its checks several cycles in a row and undrains it when it is
healthy again; people do the same with `dispatch nodes drain|undrain <node>`. Where the state lives:

- embedded (one machine): `DISPATCH_HOME/drained.json`, rewritten atomically;
- team mode: the Prefect Variable `dispatch_drained` on the team's server, so every user's dispatcher
  sees the same drained nodes.

Both hold `{"<node>": {"reason": str, "by": str, "since": <epoch seconds>}}`. A change is a read, then a
write of the whole value: two people draining different nodes in the same instant may lose one of the
two (the guardian's next cycle drains its node again); it never drains a node nobody asked for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dispatch.core.errors import ConfigError
from dispatch.core.paths import check_name
from dispatch.core.results import write_json
from dispatch.core.safeload import load_json
from dispatch.core.settings import DispatchSettings

VARIABLE = "dispatch_drained"
FILE = "drained.json"
MAX_REASON = 500


def _file(settings: DispatchSettings) -> Path:
    return settings.home / FILE


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


def drained_nodes(settings: DispatchSettings) -> dict[str, dict]:
    """The drained nodes and why: `{node: {"reason", "by", "since"}}` (empty when none).

    Team mode reads the server (Prefect's client must already point at it, e.g. after `connect_prefect`).
    """
    if settings.embedded:
        try:
            return parse_stored(load_json(_file(settings), max_bytes=1 << 20))
        except ConfigError:  # missing, unreadable, or no (bounded) JSON: nothing drained
            return {}
    from prefect.variables import Variable

    return parse_stored(Variable.get(VARIABLE, default={}))


def _store(settings: DispatchSettings, drained: dict[str, dict]) -> None:
    if settings.embedded:
        write_json(_file(settings), drained)
        return
    from prefect.variables import Variable

    Variable.set(VARIABLE, drained, overwrite=True)


def drain(settings: DispatchSettings, node: str, *, reason: str, by: str) -> bool:
    """Drain `node`; False when it already was (its first reason is kept).

    Raises:
        UnsafePath: `node` is no valid node name.
    """
    check_name(node, "node name")
    drained = drained_nodes(settings)
    if node in drained:
        return False
    drained[node] = {"reason": reason[:MAX_REASON], "by": by[:100], "since": time.time()}
    _store(settings, drained)
    return True


def undrain(settings: DispatchSettings, node: str) -> bool:
    """Put `node` back in service; False when it was not drained."""
    check_name(node, "node name")
    drained = drained_nodes(settings)
    if drained.pop(node, None) is None:
        return False
    _store(settings, drained)
    return True

