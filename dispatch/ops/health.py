"""What the guardian found: one `Check` per node and check (or per server check), and what it repaired.

Shared by the checks (`dispatch/ops/guardian/`), the drain-and-alert policy and the reports (CLI, artifact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SERVER = "server"
"""The `target` of the checks on the Prefect server (leases, lock variables, stuck flow runs)."""


@dataclass
class Check:
    """One check of one target.

    Attributes:
        target: a node's name, or `SERVER`.
        name: the check: reachable, disk, load, memory, python, runner, agents, worker, orphans, heartbeats
            (nodes); leases, locks, stuck-runs (server).
        ok: True healthy, False failing, None NOT RUN (the reason in `detail`; never counted as healthy).
        detail: what was seen, for a person ("12.1 GiB free of 200", "sshd refused: ...").
        repair: the repair tried, if any ("re-shipped the runner").
        repaired: True only when the re-check after the repair passed; False when it did not.
    """

    target: str
    name: str
    ok: bool | None
    detail: str
    repair: str | None = None
    repaired: bool | None = None

    @property
    def status(self) -> str:
        """"ok", "FAIL", "NOT RUN", or "REPAIRED" (failed, repaired, re-checked healthy)."""
        if self.ok is None:
            return "NOT RUN"
        if self.repaired:
            return "REPAIRED"
        return "ok" if self.ok else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}
