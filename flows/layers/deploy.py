"""L6 Deploy: the code that passed L4 goes live, locally or on a cluster node (dispatch/pipeline/deploy.py).

Called by flows/pipeline.py only after L4 PASS. The revision is the code's content digest (12 hex digits),
so a release directory always holds exactly the code that was tested.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from dispatch.core.errors import ConfigError, DispatchError
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.deploy import Deployer, LocalTarget, NodeTarget
from dispatch.pipeline.deploy_dir import check_dir
from dispatch.pipeline.results import Check, LayerResult, Status
from dispatch.pipeline.workspace import code_digest, step_environment, venv_python


def _node_target(name: str):
    from dispatch.cluster.config import load_nodes
    from dispatch.cluster.ssh import SSHPool
    from dispatch.cluster.ssh_target import node_target
    from dispatch.core.settings import get_settings

    nodes = {node.name: node for node in load_nodes(get_settings())}
    if name not in nodes:
        raise ConfigError(f"deploy.target: no node named {name[:60]!r} in nodes.json (known: local, "
                          f"{', '.join(sorted(nodes)) or 'none'})")
    return SSHPool(), node_target(nodes[name])


@flow(name="deploy")
def deploy(project: str, code_dir: str, run_dir: str, config: PipelineConfig) -> LayerResult:
    """L6: copy into `<dir>/releases/<revision>`, switch `<dir>/current`, restart, check the live URL, roll back
    on failure, keep the last `keep` releases.

    Returns:
        PASS when the new release answers its health check; FAIL (rolled back when there was a release to
        go back to); NOT RUN when pipeline.yaml has no `deploy` section.
    """
    settings = config.deploy
    if settings is None or not settings.dir:
        return LayerResult(layer="L6", status=Status.NOT_RUN,
                           reason="no deploy target: add `deploy: {target: local, dir: /srv/<app>, health: <url>}` "
                                  "to pipeline.yaml, or turn L6 off (layers: {L6: {enabled: false}})")
    code = Path(code_dir)
    local = settings.target == "local"
    pool = None
    try:
        if local:
            target = LocalTarget()
            deploy_dir = check_dir(settings.dir, local=True)
        else:
            pool, ssh = _node_target(settings.target)
            target = NodeTarget(pool, ssh)
            home = target.home() if settings.dir.startswith("~/") else None  # on a node, ~ is its login's home
            deploy_dir = check_dir(settings.dir, local=False, home=home)
        env = step_environment(code, config.backend.env)
        if local:
            env["PYTHON"] = str(venv_python(code))
        revision = code_digest(code)[:12]
        outcome = Deployer(target, deploy_dir, env).deploy(code, revision, restart=settings.restart,
                                                           health=settings.health, keep=settings.keep,
                                                           timeout=settings.timeout)
    except DispatchError as exc:  # a bad target or directory, an unreachable node
        return LayerResult(layer="L6", status=Status.FAIL, reason=str(exc)[:500])
    finally:
        if pool is not None:
            pool.close()
    checks = [Check(name=name, verdict="pass" if ok else "fail", detail=detail, duration=round(seconds, 3))
              for name, ok, detail, seconds in outcome.steps]
    get_run_logger().info("L6 %s: %s", project, outcome.message)
    return LayerResult(layer="L6", status=Status.PASS if outcome.ok else Status.FAIL, reason=outcome.message,
                       checks=checks, evidence={"revision": revision, "current": outcome.current,
                                                "dir": deploy_dir, "target": settings.target,
                                                "removed": outcome.removed})
