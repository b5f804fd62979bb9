"""L3 Build: install into the workspace venv, byte-compile, build the front end, start the app, health-check.

Called by flows/pipeline.py (which applies retries, the timeout, caching and reports); on its own:
`python -c "from flows.layers.build import build; ..."` needs a `PipelineConfig`. The app it starts stays up
for L4 (registered under the run directory in dispatch/pipeline/app.py) and is stopped by the pipeline.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prefect import flow, get_run_logger

from dispatch.core.errors import ConfigError
from dispatch.core.net import free_port
from dispatch.core.paths import within
from dispatch.pipeline import app as apps
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.results import Check, LayerResult, Status
from dispatch.pipeline.shell import StepResult, quote, run_step
from dispatch.pipeline.workspace import VENV_DIR, code_digest, ensure_venv, step_environment

_BUILD_MARK = ".dispatch-build"
_COMPILE = "python -m compileall -q -x '(^|/)(\\.venv|venv|node_modules|\\.git|dist|build)/' ."


def _step_check(step: StepResult) -> Check:
    detail = step.describe() + ("\n" + "\n".join(step.tail[-15:]) if not step.ok and step.tail else "")
    return Check(name=step.name, verdict="pass" if step.ok else "fail", detail=detail, duration=step.duration)


def _build_key(code: Path, config: PipelineConfig) -> str:
    parts = [code_digest(code), config.backend.install or "", config.backend.model_dump_json(),
             config.frontend.model_dump_json() if config.frontend else ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _start(name: str, command: str, code: Path, env: dict[str, str], run_dir: str, health: str,
           timeout: float) -> tuple[apps.AppProcess | None, Check, list[str]]:
    port = free_port()
    started = time.monotonic()
    app = apps.AppProcess(command.replace("{port}", str(port)), cwd=code, env=env, port=port,
                          log_path=Path(run_dir, "L3", f"{name}.log"), marker=run_dir)
    try:
        healthy, what = app.wait_healthy(apps.health_url(health, port), timeout)
    except BaseException:
        app.stop()
        raise
    check = Check(name=f"start {name}", verdict="pass" if healthy else "fail", detail=what,
                  duration=time.monotonic() - started)
    if healthy:
        apps.register(run_dir, app)
        return app, check, []
    tail = app.log_tail()
    app.stop()
    return None, check, tail


@flow(name="build", log_prints=False)
def build(project: str, code_dir: str, run_dir: str, config: PipelineConfig, force: bool = False) -> LayerResult:
    """L3: make the code runnable and start it on a free loopback port.

    Args:
        project: the project's name.
        code_dir: the code to build (its venv is `<code_dir>/.venv`).
        run_dir: the pipeline run's directory; logs go to `<run_dir>/L3/`.
        config: the project's pipeline configuration.
        force: redo the install and compile steps even when the code and the build config are unchanged.

    Returns:
        PASS with `evidence["app_url"]` (and `frontend_url`) when the app answers its health check; FAIL
        with the failing step or the app's log tail; NOT RUN when `backend.start` is not configured.
    """
    logger = get_run_logger()
    apps.stop_all(run_dir)  # an earlier attempt's or cycle's app
    code = Path(code_dir)
    backend, frontend = config.backend, config.frontend
    if not backend.start and not (frontend and frontend.serve):
        return LayerResult(layer="L3", status=Status.NOT_RUN,
                           reason="nothing to start: set backend.start (e.g. `uvicorn app.main:app --port {port}`) "
                                  "in pipeline.yaml")
    if not code.is_dir():
        return LayerResult(layer="L3", status=Status.FAIL, reason=f"the code directory {code} does not exist")
    deadline = time.monotonic() + (config.layer("L3").timeout or 900.0)
    checks: list[Check] = []
    ensure_venv(code, inherit_packages=backend.inherit_packages)
    env = step_environment(code, backend.env)
    mark = code / VENV_DIR / _BUILD_MARK
    key = _build_key(code, config)
    if not force and mark.is_file() and mark.read_text(encoding="utf-8").strip() == key:
        checks.append(Check(name="install, compile, build", verdict="skip",
                            detail="the code and the build configuration are unchanged since the last build"))
    else:
        mark.unlink(missing_ok=True)
        steps = [("install", backend.install), ("compile", _COMPILE), ("frontend build", frontend and frontend.build)]
        for name, command in steps:
            if not command:
                continue
            step = run_step(name, command, cwd=code, env=env, timeout=max(1.0, deadline - time.monotonic()))
            checks.append(_step_check(step))
            if not step.ok:
                return LayerResult(layer="L3", status=Status.FAIL, reason=step.describe(), checks=checks,
                                   evidence={"log_tail": step.tail})
        mark.write_text(key + "\n", encoding="utf-8")
    evidence: dict = {"code_dir": str(code)}
    to_start = []
    if backend.start:
        to_start.append(("backend", backend.start, backend.health))
    if frontend and frontend.serve:
        serve = frontend.serve
        if serve.split()[0] == "static":
            folder = within(code, serve.split(None, 1)[1] if len(serve.split()) > 1 else ".", what="frontend.serve")
            serve = f"python -m http.server {{port}} --bind 127.0.0.1 --directory {quote(folder)}"
        to_start.append(("frontend", serve, "/"))
    for name, command, health in to_start:
        try:
            app, check, tail = _start(name, command, code, env, run_dir, health,
                                      min(backend.timeout, max(1.0, deadline - time.monotonic())))
        except ConfigError as exc:
            apps.stop_all(run_dir)
            return LayerResult(layer="L3", status=Status.FAIL, reason=str(exc), checks=checks)
        checks.append(check)
        if app is None:
            apps.stop_all(run_dir)
            logger.error("%s did not become healthy; its log ends:\n%s", name, "\n".join(tail))
            return LayerResult(layer="L3", status=Status.FAIL, reason=f"{name}: {check.detail}", checks=checks,
                               evidence={**evidence, "log_tail": tail, "log": str(Path(run_dir, "L3", f"{name}.log"))})
        evidence[f"{name}_url" if name == "frontend" else "app_url"] = app.url
        evidence[f"{name}_log"], evidence[f"{name}_pgid"] = str(app.log_path), app.pgid
    evidence.setdefault("frontend_url", evidence.get("app_url"))
    logger.info("L3 %s: the app serves at %s", project, evidence.get("app_url") or evidence["frontend_url"])
    return LayerResult(layer="L3", status=Status.PASS,
                       reason=f"built and serving at {evidence.get('app_url') or evidence['frontend_url']}",
                       checks=checks, evidence=evidence)
