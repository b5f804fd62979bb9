"""The nightly regression: L3 and L4 of each project, compared with the night before; a notification only
when something got worse.

Deployed by `prefect deploy --all` (prefect.yaml, `nightly-regression`, cron 02:00 UTC, active). By hand:
`prefect deployment run 'nightly-regression/nightly-regression' --param 'projects=["shop"]'`, or
`python flows/nightly_regression.py shop`.

Each project's run is a `pipeline` subflow (`--from L3 --to L4`, forced: a night re-tests even unchanged code,
since what changed may be the environment). The night's snapshot is
`DISPATCH_HOME/pipeline/<project>/nightly/<run>.json`. The notification goes through the Prefect
notification block named by `notify` (or the project's `pipeline.yaml` `notify`), e.g.
`slack-webhook/team-alerts`; with none configured a regression is a warning in the run's log.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.blocks.core import Block

from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings
from dispatch.pipeline import nightly
from dispatch.pipeline.config import load_pipeline_config
from dispatch.pipeline.runs import latest_run, project_dir
from flows.pipeline import config_path_for, pipeline


def _notify(block_name: str, subject: str, body: str) -> None:
    import prefect.blocks.notifications  # noqa: F401 - registers the notification block types for Block.load

    block = Block.load(block_name)
    block.notify(body=body, subject=subject)


@flow(name="nightly-regression")
def nightly_regression(projects: list[str], notify: str | None = None) -> dict[str, list[str]]:
    """Run L3-L4 of every project and report what got worse since the previous night.

    Args:
        projects: the projects to test.
        notify: a Prefect notification block (`<block-type-slug>/<name>`); default: each project's
            `pipeline.yaml` `notify`.

    Returns:
        Per project, what got worse (empty lists: nothing did).
    """
    logger = get_run_logger()
    settings = get_settings()
    found: dict[str, list[str]] = {}
    for project in projects:
        home = project_dir(settings.home, project)
        try:
            block_name = notify or load_pipeline_config(config_path_for(project)).notify
        except ConfigError as exc:
            logger.error("%s: %s", project, exc)
            found[project] = [f"pipeline.yaml is invalid: {exc}"]
            continue
        pipeline.with_options(flow_run_name=f"{project} nightly")(project, from_layer="L3", to_layer="L4",
                                                                 force=True, return_state=True)
        record = latest_run(home)
        if record is None:
            found[project] = ["the pipeline wrote no summary"]
            continue
        night = nightly.snapshot(record, home / record.run_id)
        found[project] = nightly.worse(nightly.previous(home, record.run_id), night)
        nightly.save(home, night)
        if not found[project]:
            logger.info("%s: nothing got worse since the previous night", project)
            continue
        body = "\n".join(f"- {line}" for line in found[project]) + f"\n\nreports: {home / record.run_id}"
        if block_name:
            _notify(block_name, f"Nightly regression: {project} got worse", body)
            logger.warning("%s got worse; notified %s:\n%s", project, block_name, body)
        else:
            logger.warning("%s got worse (no notification block configured):\n%s", project, body)
    return found


if __name__ == "__main__":
    import sys

    nightly_regression(sys.argv[1:] or ["shop"])
