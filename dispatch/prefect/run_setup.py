"""What a project run sets up and leaves through the Prefect server, when there is one: its flow run's user
tags, its fair share of the slots against other dispatchers' runs (a board on the server, else this machine's
files), the server's file lock table (team mode), and its report artifacts."""

from __future__ import annotations

import logging
from typing import Any

from dispatch.core.brokers import SHARED_TRANSPORTS
from dispatch.core.dag import Project
from dispatch.core.nodes import Node
from dispatch.core.report import render_markdown, table_rows
from dispatch.core.results import ProjectState
from dispatch.core.settings import DispatchSettings
from dispatch.core.shares import FairShare, MachineShares
from dispatch.prefect.errors import SERVER_ERRORS
from dispatch.prefect.server_locks import ServerLocks, lock_scope
from dispatch.prefect.shares import ServerShares


def tag_flow_run(flow_run: Any, user: str, host: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Tag this flow run (only it: task runs stay untagged, so no tag-limit checks) with who started it."""
    from prefect.client.orchestration import get_client

    from dispatch.prefect.team import user_tags

    wanted = set(user_tags(user, host))
    if wanted <= set(flow_run.tags or []):
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=sorted(set(flow_run.tags or []) | wanted))
    except SERVER_ERRORS as exc:  # `dispatch status` then shows the started_by parameter instead
        log.warning("could not tag the flow run with its user: %s", exc)


def fair_share(settings: DispatchSettings, nodes: list[Node], run_id: str, *, project: str, user: str,
               weight: float) -> FairShare:
    """This run's fair share of the cluster's slots against other runs (dispatch/core/shares.py): through the
    server in team mode when nodes are shared with other machines, else through this machine's files."""
    details = {"project": project, "user": user, "weight": weight}
    if settings.prefect_api_url and any(n.transport in SHARED_TRANSPORTS for n in nodes):
        board: Any = ServerShares(run_id, **details)
    else:
        board = MachineShares(settings.locks_dir / "shares", run_id, **details)
    return FairShare(board, run_id, sum(n.slots for n in nodes), weight)


def server_locks(settings: DispatchSettings, project: Project, selected: set[str], base: str, repo_url: str | None,
                 *, run_id: str, holder: str) -> ServerLocks | None:
    """Team mode: `modifies` locks also go through the server's table, shared with other users' runs (None in
    embedded mode, or when no selected spec modifies anything). `base`: the project whose code it works on."""
    if not settings.prefect_api_url or not any(project.specs[t].modifies for t in selected):
        return None
    return ServerLocks(lock_scope(base, repo_url), project=project.name, run_id=run_id, holder=holder)


def attach_report(state: ProjectState, settings: DispatchSettings, run_id: str,
                  log: logging.Logger | logging.LoggerAdapter) -> None:
    """The run's report and spec table as artifacts of its flow run (the results are on disk already: a server
    that refuses them is only logged)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from dispatch.core.usage import run_usage

    key = "".join(c if c.isalnum() else "-" for c in state.project.lower())
    try:
        usage = run_usage(settings, run_id)
        create_markdown_artifact(markdown=render_markdown(state, settings.runs_dir, ui_links=True, usage=usage),
                                 key=f"report-{key}", description=f"Oyster Dispatch report for {state.project}")
        create_table_artifact(table=table_rows(state), key=f"specs-{key}", description=f"Specs of {state.project}")
    except SERVER_ERRORS as exc:
        log.warning("could not attach the report artifact: %s", exc)
