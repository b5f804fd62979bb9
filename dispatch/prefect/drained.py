"""The drained set of a team: the Prefect Variable `dispatch_drained` on the team's server.

`drained_store(settings)` is where the drained set of this process lives: this Variable in team mode (Prefect's
client must already point at the server, e.g. after `connect_prefect`), else the machine's
`DISPATCH_HOME/drained.json` (`dispatch.core.drain.DrainedFile`).
"""

from __future__ import annotations

from typing import Any

from dispatch.core.drain import FILE, DrainedFile, DrainedStore
from dispatch.core.settings import DispatchSettings

VARIABLE = "dispatch_drained"


class DrainedVariable:
    """The `DrainedStore` of the Prefect server this process talks to (raises httpx errors when it fails)."""

    def read(self) -> Any:
        from prefect.variables import Variable

        return Variable.get(VARIABLE, default={})

    def write(self, drained: dict[str, dict]) -> None:
        from prefect.variables import Variable

        Variable.set(VARIABLE, drained, overwrite=True)


def drained_store(settings: DispatchSettings) -> DrainedStore:
    """The drained set of this process: the machine's file when embedded, the team server's Variable else."""
    return DrainedFile(settings.home / FILE) if settings.embedded else DrainedVariable()
