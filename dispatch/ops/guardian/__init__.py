"""The guardian: one cycle checks every configured node and the Prefect server, repairs what is safe,
drains and undrains nodes, and alerts on changes of state.

    run_cycle(settings)   one cycle -> CycleReport (checks, alerts, drains, where alerts went, duration)

Used by `dispatch guardian` (dispatch/cli/guardian.py) and the `guardian` flow (flows/guardian.py, deployed
every 5 minutes). Nodes come from `dispatch.cluster.config.load_nodes` (nodes.json; keys from ClusterNode blocks).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dispatch.cluster.config import load_nodes
from dispatch.core.settings import DispatchSettings
from dispatch.ops.health import Check

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1


@dataclass
class CycleReport:
    """What one guardian cycle found and did."""

    checks: list[Check]
    alerts: list[Any] = field(default_factory=list)  # policy.Alert
    alerts_to: str = ""
    alert_errors: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    undrained: list[str] = field(default_factory=list)
    started_at: float = 0.0
    duration: float = 0.0

    @property
    def problems(self) -> list[Check]:
        """The checks that are neither ok nor REPAIRED (FAIL and NOT RUN)."""
        return [c for c in self.checks if c.status not in ("ok", "REPAIRED")]

    @property
    def exit_code(self) -> int:
        """0 when every check is ok or REPAIRED, else 1."""
        return EXIT_FAILED if self.problems else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "checks": [c.to_json() for c in self.checks],
                "alerts": [a.to_json() for a in self.alerts], "alerts_to": self.alerts_to,
                "alert_errors": self.alert_errors, "drained": self.drained, "undrained": self.undrained,
                "started_at": self.started_at, "duration": round(self.duration, 3)}

    def markdown(self) -> str:
        """The cycle as a markdown table (the flow's artifact)."""
        rows = ["| target | check | status | detail | repair |", "|---|---|---|---|---|"]
        for c in self.checks:
            cells = [c.target, c.name, f"**{c.status}**" if c.status in ("FAIL", "NOT RUN") else c.status,
                     c.detail, c.repair or ""]
            rows.append("| " + " | ".join(_cell(x) for x in cells) + " |")
        summary = [f"{len(self.checks)} checks, {len(self.problems)} not ok, {self.duration:.1f} s; "
                   f"alerts go to {self.alerts_to}."]
        summary += [f"- drained: {n}" for n in self.drained] + [f"- undrained: {n}" for n in self.undrained]
        summary += [f"- alert: {_cell(a.subject)}" for a in self.alerts]
        summary += [f"- alert not sent: {_cell(e)}" for e in self.alert_errors]
        return "# Guardian cycle\n\n" + "\n".join(summary) + "\n\n" + "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:400]


def run_cycle(settings: DispatchSettings, *, repair: bool = True, alert: bool = True,
              log: logging.Logger | logging.LoggerAdapter = logger) -> CycleReport:
    """Check every node (in parallel, one SSH command each) and, in team mode, the server; repair what is safe
    and proven by a re-check; apply the drain policy and send the alerts of changes.

    Prefect must already point at the right server (team mode), e.g. after `connect_prefect(settings)`.

    Args:
        settings: the process settings (thresholds, drain policy, alert block).
        repair: try the safe repairs (False: look only; the drain policy and alerts still apply).
        alert: apply the drain policy and send alerts (False: a read-only look, nothing stored).
        log: where to say what it did (the flow's run logger).

    Raises:
        ConfigError: nodes.json is invalid.
    """
    from dispatch.core.agent_versions import AcceptedVersions
    from dispatch.ops.guardian.nodes import Limits, NodeContext, check_node
    from dispatch.ops.guardian.policy import apply_policy, send_alerts
    from dispatch.ops.guardian.server import dispatchers, server_checks
    from dispatch.prefect.errors import SERVER_ERRORS
    from dispatch.prefect.versions import passed_store

    started, clock = time.time(), time.monotonic()
    nodes = load_nodes(settings)
    who = dispatchers(settings)
    keys: dict[str, str] = {}
    if not settings.embedded and any(n.transport == "ssh" and not n.key_path for n in nodes):
        from dispatch.prefect.nodes_admin import ssh_key_secrets

        keys = ssh_key_secrets(nodes, log)
    pool = None
    if any(n.transport in ("ssh", "worker") for n in nodes):
        from dispatch.cluster.ssh import SSHPool

        pool = SSHPool()
    accepted = AcceptedVersions.load(passed_store(settings))
    ctx = NodeContext(settings, pool, Limits.from_settings(settings), who.live, repair=repair,
                      prefect=not settings.embedded, key_secrets=keys, accepted=accepted)
    try:
        with ThreadPoolExecutor(max_workers=min(16, len(nodes)), thread_name_prefix="guardian") as executor:
            checks = [c for found in executor.map(lambda node: check_node(ctx, node), nodes) for c in found]
    finally:
        if pool is not None:
            pool.close()
    if not settings.embedded:
        checks += server_checks(settings, who, repair)
    report = CycleReport(checks, started_at=started)
    if alert:
        try:
            report.alerts, report.drained, report.undrained = apply_policy(settings, checks,
                                                                           settings.guardian_drain_after, log)
        except SERVER_ERRORS as exc:  # team mode with the server down: the checks still stand
            report.alerts_to = "nowhere: the drain policy and alerts need the Prefect server"
            report.alert_errors = [f"drain policy and alerts skipped: {settings.prefect_api_url} failed: {exc}"]
            log.warning("%s", report.alert_errors[0])
        else:
            report.alerts_to, report.alert_errors = send_alerts(settings, report.alerts)
    for check in checks:
        if check.repair:
            log.info("%s %s: %s (%s)", check.target, check.name, check.repair,
                     "re-checked healthy" if check.repaired else "NOT proven by the re-check")
    report.duration = time.monotonic() - clock
    return report
