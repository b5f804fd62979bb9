"""The `spec-run` flow: one attempt of one spec on a `worker` node, picked up by the node's Prefect worker.

The project flow (the dispatcher) creates a run of the deployment `spec-run/node-<name>` (made by
`dispatch nodes sync`) as a child of the spec's task run, in the node's work pool, whose concurrency
limit is the node's slots. The node's worker runs this flow there; the flow runs the node runner as a
local subprocess, exactly as the `local` transport does, and:

- takes the agent keys from the `AgentModel` blocks itself (they never travel as parameters);
- prepares and pushes the spec's git branch on the node in git mode;
- stamps the label `dispatch.heartbeat` on its flow run every few seconds, so the dispatcher can tell a
  run whose worker died (the label stops moving) from a long one and retry it;
- attaches the `SpecResult` as a table artifact of its flow run, which the dispatcher reads back:
  results live in the server, not on a file system the gateway cannot see.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import get_run_context
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed, State

from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.build import local_transport
from dispatch.cluster.transports.local import LocalTransport
from dispatch.core.errors import ConfigError, UnsafePath
from dispatch.core.nodes import Node
from dispatch.core.paths import contained, local_path, run_dir_parts
from dispatch.core.results import SpecResult
from dispatch.core.secrets import Masker
from dispatch.core.settings import get_settings
from dispatch.prefect.errors import SERVER_ERRORS
from dispatch.prefect.worker_transport import (
    HEARTBEAT_LABEL,
    RESULT_ARTIFACT_DESCRIPTION,
    deployment_name,
    heartbeat_interval,
)
from tasks.run_spec import missing_agent_clis, prepare_branch, push_branch


def _run_name() -> str:
    request = current_flow_run.parameters.get("request") or {}
    if isinstance(request, RunRequest):
        request = request.model_dump()
    return f"{request.get('project', '?')}/{request.get('task_id', '?')} #{request.get('attempt', 1)}"


def _beat(flow_run_id, interval: float, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client

    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.update_flow_run_labels(flow_run_id, {HEARTBEAT_LABEL: f"{time.time():.3f}"})
            except SERVER_ERRORS as exc:  # the dispatcher retries the spec if beats stop for long; say why
                logger.warning("could not stamp the heartbeat: %s", exc)
            if stop.wait(interval):
                return


def _on_node(path: str) -> Path:
    """A path the dispatcher named for this node: `~` expanded, relative ones under the worker user's home."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else Path.home() / resolved


def _secrets(request: RunRequest, masker: Masker) -> dict[str, str]:
    """`model:ENV` -> key for the agent steps of this attempt, from the node's view of the `AgentModel` blocks
    (else the model's own variable in the worker's environment); every value is also added to `masker`, which
    masks what this flow writes to Prefect."""
    names = sorted({step["name"] for step in [*request.steps, *request.verify] if step.get("argv")})
    if not names:
        return {}
    from dispatch.prefect.nodes_admin import models_and_keys

    _, secrets = models_and_keys(names, get_settings(), get_run_logger())
    flat = {f"{model}:{env}": value for model, values in secrets.items() for env, value in values.items()}
    masker.add(flat.values())
    return flat


@flow(name="spec-run", flow_run_name=_run_name, log_prints=False, retries=0)
def spec_run(request: RunRequest) -> State:
    """Run one attempt of a spec on this node and attach its `SpecResult` to the flow run.

    Args:
        request: the attempt, as the dispatcher built it (no secrets in it).
    """
    logger = get_run_logger()
    root = _on_node(request.root) if request.root else get_settings().runs_dir
    request = request.model_copy(update={"root": str(root), "workdir": str(_on_node(request.workdir))})
    transport = local_transport(root, request.node)
    prefix = f"{request.node} {request.task_id}:"
    flow_run = get_run_context().flow_run
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(flow_run.id, heartbeat_interval(request), stop),
                            name="spec-run-heartbeat", daemon=True)
    beat.start()
    try:
        result = _attempt(request, transport, logger, prefix)
    finally:
        transport.close()  # its node agent (the runner has ended, or goes on alone)
        stop.set()
        beat.join(timeout=5)
    create_table_artifact(table=[result.model_dump(mode="json")], description=RESULT_ARTIFACT_DESCRIPTION)
    if result.succeeded:
        logger.info("%s succeeded in %.1fs (model %s)", prefix, result.duration or 0.0, result.model or "-")
        return Completed(message=f"{request.task_id} succeeded")
    logger.error("%s %s", prefix, result.reason or result.status)
    return Failed(message=f"{request.task_id}: {result.reason or result.status}")


def _attempt(request: RunRequest, transport: LocalTransport, logger, prefix: str) -> SpecResult:
    try:  # the request names paths on this node: its run directory and workdir must stay in the run root
        local_path(transport.root, *run_dir_parts(request.project, request.task_id), what="run directory")
        contained(transport.root, Path(request.workdir), "workdir")
    except UnsafePath as exc:
        return request.failure(f"refused on the node: {exc}", retryable=False)
    if missing := missing_agent_clis(request):
        return request.failure(missing, retryable=False)
    if request.git and (failure := prepare_branch(request, transport, logger, prefix)):
        return failure
    masker = Masker()  # every secret this attempt knows, masked in what it writes to Prefect
    try:
        secrets = _secrets(request, masker)
    except ConfigError as exc:  # an invalid block: the agent fails with an auth error the runner classifies
        logger.warning("%s could not read the AgentModel blocks' keys: %s", prefix, exc)
        secrets = {}
    own = get_settings().secret_values()  # the worker's credentials: no step gets them, the runner masks them
    masker.add(own)
    secrets.update({f"mask:{number}": value for number, value in enumerate(own)})
    try:
        result = transport.run(request, lambda line: logger.info("%s %s", prefix, masker.mask(line)),
                               secrets=secrets or None)
    except BaseException:  # cancelled (the worker's SIGTERM) or crashed: the spec must not run on alone
        transport.cancel(request.project, request.task_id)
        raise
    if result.succeeded and request.git:
        push_branch(request, transport, result, logger, prefix)
    return SpecResult.model_validate(masker.mask_data(result.model_dump())) if masker else result


def sync_deployments(nodes: list[Node]) -> list[str]:
    """`dispatch nodes sync` for worker nodes: each one's `spec-run/node-<name>` deployment; the changes made."""
    from prefect.client.orchestration import get_client

    changes: list[str] = []
    with get_client(sync_client=True) as client:
        for node in nodes:
            if node.transport == "worker":
                changes.extend(_sync_deployment(client, node))
    return changes


def _sync_deployment(client, node: Node) -> list[str]:
    """The deployment `spec-run/node-<name>` whose runs the node's worker picks up, created or updated
    when it is missing or differs (pool, entrypoint, parameters); nothing when it matches.

    Its entrypoint is the module path `flows.spec_run.spec_run`, so a worker with this package installed
    runs it from any working directory, with no pull step.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    name, entrypoint = deployment_name(node), "flows.spec_run.spec_run"
    try:
        current = client.read_deployment_by_name(name)
    except ObjectNotFound:
        current = None
    if current is not None and current.work_pool_name == node.pool and current.entrypoint == entrypoint and (
            current.parameter_openapi_schema == parameter_schema(spec_run.fn).model_dump()):
        return []
    deployment = spec_run.to_deployment(
        name=node.pool, work_pool_name=node.pool, entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["oyster-dispatch"], description=f"One spec attempt on node {node.name} (made by dispatch nodes sync)")
    deployment.apply()
    return [f"deployment {name}: {'updated' if current else 'created'} (pool {node.pool})"]
