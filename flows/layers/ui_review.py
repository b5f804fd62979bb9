"""L4c UI Review: a `review` model scores each page L4b captured, from its screenshots and HTML.

Visual, layout, readability and finish, 25 points each, with reasons, read strictly from the model's last
`UI-REVIEW:` line (dispatch/pipeline/ui_review.py); an answer that is not valid goes to the next model of the
chain. L4b's mobile overflow costs layout points. PASS when the lowest page score is at least
`thresholds.ui_min_score`; each page under it is an S3 bug for L5. NOT RUN (with the reasons and the install
command) when no page was captured or no review model can run: missing CLI, unknown, or every model limited.
A page no model reviewed, while others were, fails the layer. Evidence in `run_dir/L4c/`: scores.json and each
question's run directory (prompt, log, result).

The pipeline's L4 runs it beside L4a, L4b and L4d; run it alone on captures with
`python -m flows.layers.ui_review <project> <run_dir> <pages.json>`.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, get_run_logger

from dispatch.pipeline import ui_review as review
from dispatch.pipeline.agent_call import ask, usable_models
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.generated import slug
from dispatch.pipeline.results import Check, LayerResult, PageCapture, Status

_RATE_KINDS = {"quota", "billing", "transient", "auth", "config"}  # the runner's: the next model is asked
_PARALLEL = 4


def _review_page(number: int, page: PageCapture, models: list[str], run_dir: Path, evidence: Path, timeout: float,
                 logger) -> tuple[review.PageScore | None, str, bool]:
    """(the page's score or None, why not, whether every model that ran was limited)."""
    prompt, left, problems, limited = review.review_prompt(page, run_dir), list(models), [], True
    for round_number in range(1, len(models) + 1):
        answer = ask(left, prompt, name=f"page{number}-{slug(page.path, 40)}-{round_number}", workdir=evidence,
                     evidence_dir=evidence, timeout=timeout, on_line=lambda line: logger.debug("%s", line))
        if not answer.ran:
            problems.append(answer.reason)
            break
        limited = limited and all(a.get("verdict") in _RATE_KINDS for a in answer.attempts)
        if answer.ok:
            try:
                return review.page_score(page, answer.model or "", review.parse_review(answer.text)), "", False
            except review.ReviewError as exc:
                problems.append(f"{answer.model}'s answer is no valid review: {exc}")
                limited = False
        else:
            problems.append(answer.reason)
        if answer.model not in left:
            break
        left = left[left.index(answer.model) + 1:]
        if not left:
            break
    return None, "; ".join(problems), limited


@flow(name="ui_review", flow_run_name="L4c ui_review {project}")
def ui_review(project: str, run_dir: str, config: PipelineConfig, pages: list[PageCapture]) -> LayerResult:
    """L4c: score every captured page with the `review` models.

    Args:
        project: the project.
        run_dir: the pipeline run's directory (screenshots and HTML paths resolve inside it).
        config: the project's pipeline configuration (`models.review`, `thresholds.ui_min_score`).
        pages: what L4b captured of each page.
    """
    started, logger = time.time(), get_run_logger()
    root, evidence = Path(run_dir), Path(run_dir) / "L4c"
    evidence.mkdir(parents=True, exist_ok=True)

    def result(status: Status, reason: str, **fields) -> LayerResult:
        return LayerResult(layer="L4c", status=status, reason=reason, started_at=started, ended_at=time.time(),
                           **fields)

    if not pages:
        return result(Status.NOT_RUN, "no page captures to review: L4b (browser QA) captured none")
    usable, why = usable_models(config.models.review)
    if not usable:
        return result(Status.NOT_RUN, "no review model can run: " + "; ".join(why))
    timeout = min(config.layer("L4c").timeout or 600.0, 600.0)
    with ThreadPoolExecutor(max_workers=min(_PARALLEL, len(pages))) as pool:
        outcomes = list(pool.map(lambda n, p: _review_page(n, p, usable, root, evidence, timeout, logger),
                                 range(1, len(pages) + 1), pages))
    minimum = config.thresholds.ui_min_score
    checks, bugs, scores, missing = [], [], {}, []
    for page, (score, why_not, _) in zip(pages, outcomes, strict=True):
        if score is None:
            checks.append(Check(name=page.path, verdict="skip", detail=f"not reviewed: {why_not}"[:1000]))
            missing.append(f"{page.path}: {why_not}")
            continue
        scores[page.path] = {"total": score.total, "model": score.model, **score.aspects}
        passed = score.total >= minimum
        checks.append(Check(name=page.path, verdict="pass" if passed else "fail", detail=score.detail()[:2000]))
        if not passed:
            bugs.append(review.ui_bug(page, score, minimum))
    (evidence / "scores.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
    data = {"scores": scores, "scores_file": str(evidence / "scores.json"), "models": usable, "left_out": why}
    if not scores:
        limited = all(outcome[2] for outcome in outcomes)
        head = "every review model is limited" if limited else "no review model gave a valid review"
        return result(Status.NOT_RUN, f"{head}: " + " | ".join(missing)[:2000], checks=checks, evidence=data)
    lowest = min(s["total"] for s in scores.values())
    data["lowest"] = lowest
    summary = f"{len(scores)} page(s) reviewed, lowest score {lowest} (minimum {minimum:g})"
    if missing:
        return result(Status.FAIL, f"{summary}; not reviewed: " + " | ".join(missing)[:1500], checks=checks,
                      bugs=bugs, evidence=data)
    if bugs:
        under = ", ".join(f"{b.where} {scores[b.where]['total']}" for b in bugs)
        return result(Status.FAIL, f"{summary}; under the minimum: {under}", checks=checks, bugs=bugs, evidence=data)
    return result(Status.PASS, summary, checks=checks, evidence=data)


if __name__ == "__main__":
    import sys

    captured = [PageCapture.model_validate(p) for p in json.loads(Path(sys.argv[3]).read_text())]
    print(ui_review(sys.argv[1], sys.argv[2], PipelineConfig(), captured).model_dump_json(indent=1))
