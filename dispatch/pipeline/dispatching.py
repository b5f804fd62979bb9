"""L2 and L5 dispatch generated specs through the project flow: what they check first and what they report.

Prefect-free: flows/layers/implement.py and fix.py call the project flow and hand its state here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dispatch.core.dag import Project
from dispatch.core.model_catalog import BUILTIN_MODELS, ModelSpec
from dispatch.core.nodes import Node
from dispatch.core.results import ProjectState
from dispatch.pipeline.results import Check, LayerResult, Status


def missing_clis(project: Project, task_ids: list[str], nodes: list[Node],
                 catalog: dict[str, ModelSpec] | None = None) -> str | None:
    """When every node is this machine: why some spec cannot start (no CLI of its model chain, or of its
    verifier chain, on PATH), with the install command; None when each can (or remote nodes decide).
    """
    if any(node.transport != "local" for node in nodes):
        return None
    catalog = catalog or BUILTIN_MODELS
    problems: dict[str, str] = {}
    for task_id in task_ids:
        spec = project.specs[task_id]
        chains = ([spec.model_chain] if spec.kind == "agent" else []) + ([spec.verify] if spec.verify else [])
        for chain in chains:
            known = [catalog[m] for m in chain if m in catalog]
            if len(known) < len(chain) or any(shutil.which(model.cli) for model in known):
                continue  # an unknown model fails in the flow, naming the known ones
            hints = sorted({m.install_hint or f"install {m.cli}" for m in known})
            problems[f"{', '.join(chain)} ({', '.join(sorted({m.cli for m in known}))})"] = "; ".join(hints)
    if not problems:
        return None
    return "no agent CLI on PATH for models " + " and ".join(f"{models}: {hint}" for models, hint in problems.items())


def result_of_run(layer: str, run_key: str, state: ProjectState | None, task_ids: list[str], specs: list[Path],
                  message: str) -> LayerResult:
    """The layer's result from the project flow's final state: PASS when every spec succeeded.

    Args:
        layer: L2 or L5.
        run_key: the run's project name (`<project>.pipeline`).
        state: the run's state file (None if the flow never wrote one).
        task_ids: the specs the layer asked for.
        specs: their files (the layer's evidence).
        message: the flow run's final message.
    """
    rows = state.specs if state is not None else {}
    checks = []
    for task_id in task_ids:
        row = rows.get(task_id)
        if row is None:
            checks.append(Check(name=task_id, verdict="fail", detail="never dispatched"))
            continue
        detail = row.reason if row.state != "succeeded" else (
            f"{row.model or 'shell'} on {row.node}, attempt {row.attempts}" + (" (cached)" if row.cached else ""))
        checks.append(Check(name=task_id, verdict="pass" if row.state == "succeeded" else "fail",
                            detail=detail[:500], duration=row.duration))
    failed = [c for c in checks if c.verdict == "fail"]
    evidence = {"specs": [str(p) for p in specs], "run": run_key}
    if not failed:
        return LayerResult(layer=layer, status=Status.PASS, checks=checks, evidence=evidence,
                           reason=f"{len(checks)} spec(s) succeeded through the project flow ({run_key})")
    named = "; ".join(f"{c.name}: {c.detail}" for c in failed[:5]) + ("; ..." if len(failed) > 5 else "")
    return LayerResult(layer=layer, status=Status.FAIL, checks=checks, evidence=evidence,
                       reason=f"{len(failed)} of {len(checks)} spec(s) did not succeed ({message}): {named}")
