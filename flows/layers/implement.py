"""L2 Implement: dispatch the generated `S*` specs (written by L1) through the project flow.

The specs live in the project's generated-spec directory (dispatch/pipeline/generated.py) and run as the
project `<project>.pipeline`: same slots, locks, model chain, retries and nodes as `dispatch start`, with the
pipeline's code directory, once the project's environment is built as L3 builds it (the workspace venv and
`backend.install`: the specs' acceptance runs the project's tests in it). No generated spec is a PASS
("nothing to implement"); a failing install or spec fails the layer; no agent CLI for a spec's models (when
every node is this machine) is NOT RUN with the install command.

Run it alone: `python -m flows.layers.implement <project> <code_dir> <run_dir>`; the pipeline flow runs it as L2.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import flow

from dispatch.cluster.config import load_nodes
from dispatch.core.errors import DispatchError, ProjectInvalid
from dispatch.core.results import load_state, state_path
from dispatch.core.settings import get_settings
from dispatch.core.specs import spec_files
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.dispatching import missing_clis, result_of_run
from dispatch.pipeline.generated import generated_dir, load_specs, run_key
from dispatch.pipeline.results import LayerResult, Status
from dispatch.pipeline.workspace import build_environment
from flows.dispatch_project import dispatch_project


def dispatch_generated(project: str, layer: str, files: list[Path], *, code_dir: str, evidence_dir: Path,
                       force: bool, config: PipelineConfig | None = None) -> LayerResult:
    """Run some generated specs through the project flow (as a subflow) and judge the layer by their results.

    Args:
        project: the project.
        layer: L2 or L5 (the result's layer and the evidence folder under `run_dir`).
        files: the generated spec files to run.
        code_dir: the code they work on.
        evidence_dir: where the run's state file is copied (`run_dir/<layer>/...`).
        force: run them even when an unchanged spec already succeeded (L5: the bug is still there).
        config: when given, the project's environment is built first from its `backend` (L2: L3 has not
            built it yet).
    """
    started = time.time()
    settings = get_settings()
    key = run_key(project)

    def ended(result: LayerResult) -> LayerResult:
        result.started_at, result.ended_at = started, time.time()
        return result

    try:
        proj = load_specs(settings, project, generated=True)
    except ProjectInvalid as exc:
        problems = "; ".join(str(error) for error in exc.errors[:5]) + ("; ..." if len(exc.errors) > 5 else "")
        return ended(LayerResult(layer=layer, status=Status.FAIL, reason=f"the generated specs are invalid: {problems}",
                                 evidence={"specs": [str(p) for p in files]}))
    except DispatchError as exc:
        return ended(LayerResult(layer=layer, status=Status.FAIL, reason=str(exc)))
    wanted = {p.resolve() for p in files}
    ids = [t for t in proj.order if proj.specs[t].path.resolve() in wanted]
    if why := missing_clis(proj, ids, load_nodes(settings)):
        return ended(LayerResult(layer=layer, status=Status.NOT_RUN, reason=why,
                                 evidence={"specs": [str(p) for p in files]}))
    if config is not None:
        timeout = config.layer("L3").timeout or 900.0
        install = build_environment(Path(code_dir), config.backend, timeout)
        if install is not None and not install.ok:
            return ended(LayerResult(layer=layer, status=Status.FAIL, evidence={"log_tail": install.tail},
                                     reason="the project's environment, which the specs' acceptance needs, could "
                                            f"not be built: {install.describe()}"))
    state = dispatch_project(project, only=ids, force=force, generated=True, code_dir=code_dir, return_state=True)
    summary = load_state(settings.state_dir, key)
    if summary is not None and summary.flow_run_id != str(state.state_details.flow_run_id):
        summary = None  # an earlier run's: this one ended before writing its own (e.g. already running)
    else:
        evidence_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state_path(settings.state_dir, key), evidence_dir / f"{key}.json")
    result = result_of_run(layer, key, summary, ids, [proj.specs[t].path for t in ids], state.message or state.name)
    result.evidence["flow_run_id"] = str(state.state_details.flow_run_id)
    return ended(result)


@flow(name="implement", flow_run_name="L2 implement {project}")
def implement(project: str, code_dir: str, run_dir: str, config: PipelineConfig) -> LayerResult:
    """L2: dispatch the project's generated `S*` specs through the project flow.

    Args:
        project: the project.
        code_dir: the code the specs work on.
        run_dir: the pipeline run's directory (evidence goes to `run_dir/L2/`).
        config: the project's pipeline configuration.
    """
    directory = generated_dir(get_settings(), project)
    files = [p for p in spec_files(directory) if p.name.startswith("S")] if directory.is_dir() else []
    if not files:
        return LayerResult(layer="L2", status=Status.PASS, started_at=time.time(), ended_at=time.time(),
                           reason=f"nothing to implement: no generated S* spec in {directory}")
    return dispatch_generated(project, "L2", files, code_dir=code_dir, evidence_dir=Path(run_dir) / "L2",
                              force=False, config=config)


if __name__ == "__main__":
    import sys

    print(implement(sys.argv[1], sys.argv[2], sys.argv[3], PipelineConfig()).model_dump_json(indent=1))
