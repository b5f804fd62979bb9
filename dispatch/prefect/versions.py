"""The agent CLI versions the drift check passed, for a team: the Prefect Variable `dispatch_agent_cli_passed`.

`passed_store(settings)` is where this process keeps that record: this Variable in team mode, else the machine's
`DISPATCH_HOME/agents/cli_passed.json` (`dispatch.core.agent_versions.PassedFile`).
"""

from __future__ import annotations

from typing import Any

from dispatch.core.agent_versions import PassedFile, PassedStore
from dispatch.core.settings import DispatchSettings
from dispatch.prefect.errors import SERVER_ERRORS

VARIABLE = "dispatch_agent_cli_passed"


class PassedVariable:
    """The `PassedStore` of the Prefect server this process talks to."""

    errors: tuple[type[Exception], ...] = SERVER_ERRORS

    def read(self) -> Any:
        from prefect.variables import Variable

        return Variable.get(VARIABLE, default={})

    def write(self, passed: dict[str, list[str]]) -> None:
        from prefect.variables import Variable

        Variable.set(VARIABLE, passed, overwrite=True)


def passed_store(settings: DispatchSettings) -> PassedStore:
    """The drift check's record of this process: the machine's file when embedded, the team server's Variable else."""
    return PassedFile(settings.home / "agents" / "cli_passed.json") if settings.embedded else PassedVariable()
