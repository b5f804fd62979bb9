"""L1 Analyze: scan the code for gaps, inventory its API routes and pages, write specs, gate them on quality.

The scan (dispatch/pipeline/analyze.py) is the layer's work; a plan by the `analyze` models is optional (the
result says when none was made, and why). Specs go to the project's generated-spec directory
(dispatch/pipeline/generated.py) in the seed format (dispatch/pipeline/specwriter.py); a person's edits there
are kept. The gate scores every generated `S*` spec L2 would run (dispatch/pipeline/quality.py): one under
`thresholds.spec_min_score` fails the layer with the rules it broke; an average under
`thresholds.spec_warn_average` is a warning. Evidence in `run_dir/L1/`: findings.json, routes.json,
scores.json, plan.md.

Run it alone: `python -m flows.layers.analyze <project> <code_dir> <run_dir> [app_url]`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urljoin

from prefect import flow, get_run_logger

from dispatch.core.errors import ConfigError, ProjectInvalid
from dispatch.core.settings import get_settings
from dispatch.pipeline import analyze as scanner
from dispatch.pipeline.agent_call import ask
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.generated import GeneratedSpecs, generated_dir, run_key
from dispatch.pipeline.quality import average, score_spec
from dispatch.pipeline.results import Check, LayerResult, Status
from dispatch.pipeline.specwriter import DraftSpec, draft_specs

_MAX_CHECKS = 500  # finding rows in the table artifact; findings.json holds them all
_PLAN_FINDINGS = 200


def _routes(code: Path, files: list[str], config: PipelineConfig, app_url: str | None) -> tuple[list, str]:
    """The API routes: from the app's OpenAPI schema when it serves one, else from the code; plus the
    endpoints pipeline.yaml lists."""
    listed = []
    for entry in config.api.endpoints:
        method, _, path = entry.strip().rpartition(" ")
        listed.append(scanner.Route((method.strip() or "GET").upper(), path, "pipeline.yaml"))
    if app_url and config.api.openapi:
        url = urljoin(app_url.rstrip("/") + "/", config.api.openapi.lstrip("/"))
        try:
            return scanner.routes_from_openapi(scanner.fetch_openapi(url)) + listed, f"the OpenAPI schema at {url}"
        except (ValueError, OSError) as exc:
            source = f"the code (the app's schema at {url} failed: {str(exc)[:200]})"
        except Exception as exc:  # httpx errors (not an OSError): the inventory falls back to the code
            source = f"the code (the app's schema at {url} failed: {type(exc).__name__}: {str(exc)[:200]})"
    else:
        source = "the code"
    return scanner.routes_from_code(code, files) + listed, source


def _plan(project: str, code: Path, evidence: Path, config: PipelineConfig, scan: scanner.Scan,
          drafts: list[DraftSpec], logger) -> tuple[Path | None, str]:
    """Ask the `analyze` models for a plan over the findings: (plan.md, a note on what happened)."""
    if not scan.findings:
        return None, "no plan: no gap to plan for"
    findings = "\n".join(f"- {f.file}:{f.line} ({f.kind}) {f.text}" for f in scan.findings[:_PLAN_FINDINGS])
    specs = "\n".join(f"- {d.task_id}: {', '.join(d.files)}" for d in drafts)
    prompt = (f"# A plan for the gaps of {project}\n\nA scan of this code base (your working directory) found the "
              "gaps below, and one spec per batch of files was written for coding agents. Read the code as you "
              "need; do not modify any file. Answer with a short plan in markdown: the order of the work, what "
              "each spec must watch out for, and the risks.\n\n"
              f"## Findings\n\n{findings}\n\n## Specs\n\n{specs}\n")
    answer = ask(config.models.analyze, prompt, name="plan", workdir=code, evidence_dir=evidence,
                 timeout=min(config.layer("L1").timeout or 600.0, 900.0), on_line=lambda line: logger.debug(line))
    if not answer.ok or not answer.text.strip():
        return None, f"no plan: {answer.reason or 'the model gave no answer'}"
    plan = evidence / "plan.md"
    plan.write_text(answer.text.strip() + "\n", encoding="utf-8")
    return plan, f"plan by {answer.model}"


def _gate(project: str, config: PipelineConfig) -> tuple[list, list[Path], str | None]:
    """Score every generated S* spec: (scores, spec files, why the gate stops L2 or None)."""
    from dispatch.core.dag import load_project

    directory = generated_dir(get_settings(), project)
    try:
        specs = load_project(run_key(project), directory).specs.values()
    except ProjectInvalid as exc:
        if not any(directory.glob("*.md")) or all(e.field == "project" for e in exc.errors):
            return [], [], None  # no spec at all: nothing to gate
        return [], [], "the generated specs are invalid: " + "; ".join(str(e) for e in exc.errors[:5])
    ours = sorted((s for s in specs if s.path.name.startswith("S")), key=lambda s: s.path.name)
    scores = [score_spec(spec) for spec in ours]
    low = [s for s in scores if s.score < config.thresholds.spec_min_score]
    if not low:
        return scores, [s.path for s in ours], None
    named = "; ".join(f"{Path(s.path).name} scored {s.score} < {config.thresholds.spec_min_score:g}: "
                      + ", ".join(f"{b.rule} ({b.message})" for b in s.broken) for s in low[:5])
    return scores, [s.path for s in ours], f"the quality gate stops L2: {named}"


@flow(name="analyze", flow_run_name="L1 analyze {project}")
def analyze(project: str, code_dir: str, run_dir: str, config: PipelineConfig,
            app_url: str | None = None) -> LayerResult:
    """L1: scan, inventory, write specs, gate them.

    Args:
        project: the project.
        code_dir: the code to scan.
        run_dir: the pipeline run's directory (evidence goes to `run_dir/L1/`).
        config: the project's pipeline configuration.
        app_url: the running app (L3's), whose OpenAPI schema lists the routes; None: routes from the code.
    """
    started, logger = time.time(), get_run_logger()
    code, evidence = Path(code_dir), Path(run_dir) / "L1"
    evidence.mkdir(parents=True, exist_ok=True)

    def result(status: Status, reason: str, **fields) -> LayerResult:
        return LayerResult(layer="L1", status=status, reason=reason, started_at=started, ended_at=time.time(),
                           **fields)

    if not code.is_dir():
        return result(Status.FAIL, f"the code directory {code} does not exist; set `code:` in pipeline.yaml")
    scan = scanner.scan_code(code)
    routes, route_source = _routes(code, scan.files, config, app_url)
    drafts, notes = draft_specs(scan.findings, code, config)
    directory = generated_dir(get_settings(), project)
    try:
        written = GeneratedSpecs(directory).write({d.name: d.text for d in drafts}, prefix="S", replace=True)
    except ConfigError as exc:
        return result(Status.FAIL, str(exc))
    notes += [f"{p.name}: kept as edited by hand (not rewritten)" for p in written.kept]
    plan, plan_note = _plan(project, code, evidence, config, scan, drafts, logger)
    if plan is not None:
        (directory / "PLAN.md").write_text(plan.read_text(encoding="utf-8"), encoding="utf-8")
    scores, spec_paths, stopped = _gate(project, config)
    mean = average(scores)
    for name, data in (("findings", [f.as_dict() for f in scan.findings]), ("routes", [r.as_dict() for r in routes]),
                       ("scores", [s.as_dict() for s in scores])):
        (evidence / f"{name}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")

    checks = [Check(name=f"{f.kind} {f.file}:{f.line}", verdict="fail", detail=f.text)
              for f in scan.findings[:_MAX_CHECKS]]
    checks += [Check(name=f"spec {s.task_id}", verdict="pass" if s.score >= config.thresholds.spec_min_score
                     else "fail", detail=f"score {s.score}" + "".join(f"; {b.rule}: {b.message}" for b in s.broken))
               for s in scores]
    warning = (f"; WARNING: average spec score {mean:.0f} < {config.thresholds.spec_warn_average:g}"
               if scores and mean < config.thresholds.spec_warn_average else "")
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(scan.by_kind().items())) or "none"
    summary = (f"scanned {scan.files_scanned} file(s): {len(scan.findings)} gap(s) ({counts}); {len(routes)} "
               f"route(s) from {route_source}; {len(spec_paths)} spec(s) in {directory}"
               + (f" (average score {mean:.0f})" if scores else "") + f"{warning}; {plan_note}")
    evidence_data = {
        "specs": [str(p) for p in spec_paths], "generated_dir": str(directory), "findings": str(evidence /
        "findings.json"), "findings_by_kind": scan.by_kind(), "routes": [f"{r.method} {r.path}" for r in routes],
        "route_source": route_source, "pages": list(config.pages), "html_files": scanner.html_files(scan.files),
        "plan": str(plan) if plan else None, "plan_note": plan_note, "average_score": mean, "notes": notes,
        "removed": written.removed, "truncated": scan.truncated, "skipped": scan.skipped[:50],
    }
    logger.info("L1 %s: %s", project, summary)
    if stopped:
        return result(Status.FAIL, f"{stopped} ({summary})", checks=checks, evidence=evidence_data)
    return result(Status.PASS, summary, checks=checks, evidence=evidence_data)


if __name__ == "__main__":
    import sys

    print(analyze(sys.argv[1], sys.argv[2], sys.argv[3], PipelineConfig(),
                  sys.argv[4] if len(sys.argv) > 4 else None).model_dump_json(indent=1))
