"""The `guardian` flow: one guardian cycle per run, its checks as a markdown table artifact.

Deployed by prefect.yaml (`guardian`, every 300 s, active) in team mode; `dispatch guardian --once` runs the
same cycle by hand. A run fails when a check is FAIL or NOT RUN, so the deployment's history shows the sick
cycles at a glance; its artifact (key `guardian`) says which check, why, and what was repaired.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dispatch.core.settings import get_settings
from dispatch.ops.guardian import run_cycle

ARTIFACT_KEY = "guardian"


@flow(name="guardian", log_prints=False)
def guardian(repair: bool = True) -> dict:
    """Check every configured node and the server, repair what is safe, drain and undrain, alert on changes.

    Args:
        repair: try the safe repairs (False: only look; drains and alerts still apply).

    Returns:
        The cycle as JSON (checks, alerts, drained, undrained, duration).

    Raises:
        RuntimeError: some check is FAIL or NOT RUN (after the artifact is written), so the run is Failed.
    """
    logger = get_run_logger()
    report = run_cycle(get_settings(), repair=repair, log=logger)
    create_markdown_artifact(report.markdown(), key=ARTIFACT_KEY,
                             description=f"guardian: {len(report.problems)} of {len(report.checks)} checks not ok")
    if report.problems:
        raise RuntimeError("; ".join(f"{c.target} {c.name} {c.status}: {c.detail}" for c in report.problems[:10]))
    return report.to_json()


if __name__ == "__main__":
    guardian()
