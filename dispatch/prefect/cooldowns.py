"""Model cool-downs kept in Prefect Variables, so that every user's runs against one API skip a limited model.

One Variable per model, `dispatch_cooldown_<model>`, holding the value `dispatch.core.cooldowns` describes.
Every dispatcher against the same Prefect API (the team's server, or this machine's embedded database) reads
them. `server_cooldowns()` is the `Cooldowns` the flow, the CLI and the pipeline use.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from dispatch.core.cooldowns import Cooldowns
from dispatch.prefect.errors import API_ERRORS

_PREFIX = "dispatch_cooldown_"


def variable_name(model: str) -> str:
    """The Prefect Variable that holds `model`'s cool-down."""
    return _PREFIX + re.sub(r"[^a-z0-9_]", "_", model.lower())


class VariableCooldowns:
    """The `CooldownStore` of a Prefect API: one Variable per model.

    Its calls raise `API_ERRORS` (`errors`) when the API cannot be reached or refuses the request.
    """

    errors: tuple[type[Exception], ...] = API_ERRORS

    def load(self) -> dict[str, dict]:
        from prefect.client.orchestration import get_client

        found: dict[str, dict] = {}
        with get_client(sync_client=True) as client:
            # only ours, by name (`like_` is a substring match, `_` a wildcard: checked exactly below); reading
            # every variable would page past them once the team's lock table grows
            response = client.request("POST", "/variables/filter", json={
                "variables": {"name": {"like_": _PREFIX}}, "limit": 200})
            response.raise_for_status()
            for variable in response.json():
                value, name = variable.get("value"), str(variable.get("name", ""))
                if name.startswith(_PREFIX) and isinstance(value, dict):
                    value = {"kind": "quota", **value}
                    found[str(value.get("model") or name[len(_PREFIX):])] = value
        return found

    def save(self, model: str, value: dict) -> None:
        from prefect.variables import Variable

        Variable.set(variable_name(model), value, overwrite=True)

    def remove(self, model: str) -> bool:
        from prefect.variables import Variable

        existed = Variable.get(variable_name(model)) is not None
        Variable.unset(variable_name(model))
        return existed


def server_cooldowns(refresh: float = 2.0, clock: Callable[[], float] = time.time) -> Cooldowns:
    """The cool-downs of the Prefect API this process talks to (see `Cooldowns` for the arguments)."""
    return Cooldowns(VariableCooldowns(), refresh=refresh, clock=clock)
