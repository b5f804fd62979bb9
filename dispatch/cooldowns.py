"""Model cool-downs, kept in Prefect Variables so every user's runs skip a model out of quota.

A quota verdict (dispatch/ratelimits.py) puts its model on cool-down until the provider's reset time:
Variable `dispatch_cooldown_<model>` = {"until": <unix time>, "reason": ..., "by": <user@host>}. Every
dispatcher against the same Prefect API (the team's server, or this machine's embedded database)
reads them, at most every `refresh` seconds, and leaves cooling models out of a spec's chain.
Transient limits (seconds) and auth errors put no model on cool-down.
"""

from __future__ import annotations

import logging
import re
import threading
import time

logger = logging.getLogger(__name__)
_PREFIX = "dispatch_cooldown_"


def _variable_name(model: str) -> str:
    return _PREFIX + re.sub(r"[^a-z0-9_]", "_", model.lower())


class Cooldowns:
    """Read and set model cool-downs through the Prefect API.

    Args:
        refresh: seconds a read of the server's cool-downs is reused.
        clock: wall clock (Unix time), injectable for tests.
    """

    def __init__(self, refresh: float = 2.0, clock=time.time) -> None:
        self._refresh = refresh
        self._clock = clock
        self._cache: dict[str, dict] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict]:
        from prefect.client.orchestration import get_client

        found: dict[str, dict] = {}
        with get_client(sync_client=True) as client:
            for variable in client.read_variables(limit=200):
                if variable.name.startswith(_PREFIX) and isinstance(variable.value, dict):
                    found[variable.value.get("model") or variable.name[len(_PREFIX):]] = variable.value
        return found

    def active(self) -> dict[str, dict]:
        """Models on cool-down now: model -> {"until", "reason", "by"}."""
        with self._lock:
            if time.monotonic() - self._read_at >= self._refresh:
                try:
                    self._cache = self._load()
                except Exception as exc:  # no API: keep what we knew, never block dispatching
                    logger.warning("could not read model cool-downs: %s", exc)
                self._read_at = time.monotonic()
            now = self._clock()
            return {m: v for m, v in self._cache.items() if float(v.get("until", 0)) > now}

    def set(self, model: str, until: float, reason: str, by: str) -> None:
        """Put `model` on cool-down until `until` (keeps a later cool-down already set)."""
        from prefect.variables import Variable

        current = self.active().get(model)
        if current and float(current["until"]) >= until:
            return
        value = {"model": model, "until": until, "reason": reason[:200], "by": by}
        Variable.set(_variable_name(model), value, overwrite=True)
        with self._lock:
            self._cache[model] = value
        logger.warning("model %s on cool-down until %s: %s", model, time.strftime("%Y-%m-%d %H:%M:%S",
                       time.localtime(until)), reason)

    def clear(self, model: str) -> None:
        from prefect.variables import Variable

        Variable.unset(_variable_name(model))
        with self._lock:
            self._cache.pop(model, None)
