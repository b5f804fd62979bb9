"""The agent CLI drift check, nightly: the contract scenarios against the pinned and the newest published CLIs.

Deployed by `prefect deploy --all` (prefect.yaml, `agent-cli-drift`, cron 02:00 UTC, active). By hand:
`prefect deployment run 'agent-cli-drift/agent-cli-drift'`, or `python flows/agent_cli_drift.py [claude|codex]`.

What it runs is dispatch/ops/agent_drift.py: each scenario (Claude Code and Codex: success with the file written
through the tool round trip, 429 classified transient) against the pinned CLIs (agents/) and the newest npm
versions, installed into a throwaway prefix under DISPATCH_HOME. A newer CLI breaking a scenario the pinned one
passes is an alert through the guardian's notification block (`DISPATCH_ALERT_BLOCK`, or `notify`: a Prefect
notification block `<block-type-slug>/<name>`); the versions that passed are recorded in the Prefect Variable
`dispatch_agent_cli_passed`, which `dispatch nodes check` and the guardian compare each node's CLIs with.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dispatch.core.settings import get_settings
from dispatch.ops.agent_drift import run_drift


@flow(name="agent-cli-drift")
def agent_cli_drift(clis: list[str] | None = None, notify: str | None = None) -> dict:
    """Run the drift check, record the versions that passed, alert when a newer CLI breaks a scenario.

    Args:
        clis: the CLIs to check (default: claude and codex).
        notify: a Prefect notification block (`<block-type-slug>/<name>`); default `DISPATCH_ALERT_BLOCK`.

    Returns:
        The report (`DriftReport.to_json`), with the alerts sent and the errors of those that were not.
    """
    logger = get_run_logger()
    report, alerts, errors = run_drift(get_settings(), clis=clis, notify=notify, log=logger)
    create_markdown_artifact(report.markdown(), key="agent-cli-drift", description="Agent CLI drift check")
    return {**report.to_json(), "alerts": [a.subject for a in alerts], "alert_errors": errors}


if __name__ == "__main__":
    import sys

    agent_cli_drift(sys.argv[1:] or None)
