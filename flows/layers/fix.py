"""L5 Fix: turn L4's bugs into fix specs (`F<nn>-...md`) and dispatch them through the project flow.

The specs (dispatch/pipeline/fixes.py: S1 first, at most `config.max_fix_specs` a cycle) go to the project's
generated-spec directory and run as `<project>.pipeline`, like L2's, with the `fix` models; they run even when
an unchanged spec succeeded before (the bug is still there). At the first cycle the pipeline's own unedited
fix specs of earlier runs are removed; numbers continue after the F specs that stay. PASS when every fix spec
of this cycle succeeded; then the pipeline rebuilds (L3) and runs L4 again. Evidence in `run_dir/L5/cycle-<n>/`.

Run it alone: `python -m flows.layers.fix <project> <code_dir> <run_dir> <bugs.json> [cycle]`.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.fixes import fix_specs
from dispatch.pipeline.generated import GeneratedSpecs, generated_dir
from dispatch.pipeline.results import Bug, LayerResult, Status
from flows.layers.implement import dispatch_generated


@flow(name="fix", flow_run_name="L5 fix {project} cycle {cycle}")
def fix(project: str, code_dir: str, run_dir: str, config: PipelineConfig, bugs: list[Bug], cycle: int) -> LayerResult:
    """L5: fix specs for `bugs`, dispatched through the project flow.

    Args:
        project: the project.
        code_dir: the code the fixes work on.
        run_dir: the pipeline run's directory (evidence goes to `run_dir/L5/cycle-<cycle>/`).
        config: the project's pipeline configuration.
        bugs: L4's bugs of this cycle.
        cycle: the L4-L5 cycle, from 1.
    """
    started, logger = time.time(), get_run_logger()
    evidence = Path(run_dir) / "L5" / f"cycle-{cycle}"
    if not bugs:
        return LayerResult(layer="L5", status=Status.PASS, reason="no bug to fix", cycle=cycle, started_at=started,
                           ended_at=time.time())
    directory = GeneratedSpecs(generated_dir(get_settings(), project))
    try:
        removed = directory.write({}, prefix="F", replace=True).removed if cycle <= 1 else []
        specs, notes = fix_specs(bugs, config, cycle=cycle, first_number=max(directory.numbers("F"), default=0) + 1)
        written = directory.write({s.name: s.text for s in specs}, prefix="F", replace=False)
    except ConfigError as exc:
        return LayerResult(layer="L5", status=Status.FAIL, reason=str(exc), cycle=cycle, started_at=started,
                           ended_at=time.time())
    evidence.mkdir(parents=True, exist_ok=True)
    for path in written.written:
        (evidence / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    logger.info("L5 %s cycle %d: %d fix spec(s) for %d bug(s)%s", project, cycle, len(specs), len(bugs),
                f"; {'; '.join(notes)}" if notes else "")
    result = dispatch_generated(project, "L5", [directory.directory / s.name for s in specs], code_dir=code_dir,
                                evidence_dir=evidence, force=True)
    result.cycle, result.started_at = cycle, started
    result.evidence.update(bugs={s.task_id: s.bug.id for s in specs}, notes=notes, removed=removed)
    result.reason = f"cycle {cycle}: {len(specs)} fix spec(s) for {len(bugs)} bug(s): {result.reason}" + (
        f"; {'; '.join(notes)}" if notes else "")
    return result


if __name__ == "__main__":
    import json
    import sys

    found = [Bug.model_validate(b) for b in json.loads(Path(sys.argv[4]).read_text())]
    print(fix(sys.argv[1], sys.argv[2], sys.argv[3], PipelineConfig(), found,
              int(sys.argv[5]) if len(sys.argv) > 5 else 1).model_dump_json(indent=1))
