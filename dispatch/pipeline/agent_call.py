"""Ask a model chain one question on this machine, for the layers that need an answer rather than a change:
L1's optional plan (the `analyze` models) and L4c's page scores (the `review` models).

It runs the node runner locally (dispatch/cluster/transports/local.py), so a question gets what a spec gets: the prompt
on stdin, an allow-list environment with only the running model's key, rate-limit classification with the
next model on a limit, masking, a timeout. Models whose CLI is missing, that are unknown, or that are cooling
down are left out beforehand, each with its reason; a quota, billing or transient verdict cools the model for the
team, as in the project flow. The answer is the model's final message (Claude Code's `result`, Codex's last
agent message, else its output).
"""

from __future__ import annotations

import getpass
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core.agents import build_steps
from dispatch.core.model_catalog import BUILTIN_MODELS, ModelSpec
from dispatch.core.results import read_json
from dispatch.core.settings import get_settings
from dispatch.core.specs import Spec


@dataclass
class Answer:
    """What a question got: the model that answered (None: none could run), its final message, and why not."""

    model: str | None
    text: str = ""
    ok: bool = False
    reason: str = ""
    ran: bool = False
    log_path: str = ""
    attempts: list[dict] = field(default_factory=list)


def _catalog(names: list[str]) -> tuple[dict[str, ModelSpec], dict[str, dict[str, str]]]:
    """Models (built-ins, overridden by `AgentModel` blocks) and their keys, as the project flow reads them."""
    from dispatch.prefect.nodes_admin import models_and_keys

    return models_and_keys(names, get_settings())


def _cooling() -> dict[str, dict]:
    from dispatch.prefect.cooldowns import server_cooldowns

    return server_cooldowns(refresh=0).active()


def usable_models(models: list[str], catalog: dict[str, ModelSpec] | None = None,
                  cooling: dict[str, dict] | None = None) -> tuple[list[str], list[str]]:
    """(the models of the chain that can run here, in order; why each other one cannot)."""
    catalog = catalog or BUILTIN_MODELS
    cooling = _cooling() if cooling is None else cooling
    usable, why = [], []
    for name in dict.fromkeys(models):
        model = catalog.get(name)
        if model is None:
            why.append(f"{name}: unknown model (known: {', '.join(sorted(catalog))})")
        elif name in cooling:
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(cooling[name].get("until", 0))))
            kind = "blocked for billing" if cooling[name].get("kind") == "billing" else "cooling down"
            why.append(f"{name}: {kind} until {until} ({cooling[name].get('reason', '')[:120]})")
        elif shutil.which(model.cli) is None:
            why.append(f"{name}: no CLI '{model.cli}' on PATH ({model.install_hint or 'install it'})")
        else:
            usable.append(name)
    return usable, why


def _record_limits(attempts: list[dict]) -> None:
    from dispatch.core.cooldowns import COOLING_KINDS
    from dispatch.prefect.cooldowns import server_cooldowns
    from dispatch.prefect.errors import API_ERRORS

    who = f"{getpass.getuser()}@{socket.gethostname()}"
    for attempt in attempts:  # as a spec's attempts cool their models (Cooldowns.record_attempts), transient too
        if attempt.get("verdict") in COOLING_KINDS and attempt.get("model"):
            try:
                server_cooldowns().record(attempt["model"], attempt["verdict"], attempt.get("reset_at"),
                                   attempt.get("reason") or attempt["verdict"], who,
                                   retry_after=attempt.get("retry_after"))
            except API_ERRORS:  # the answer (or the next model's) stands; the cool-down is a courtesy
                pass


def ask(models: list[str], prompt: str, *, name: str, workdir: Path, evidence_dir: Path, timeout: float,
        on_line: Callable[[str], None] = lambda line: None) -> Answer:
    """Ask the first usable model of `models`; the runner moves to the next one on a limit.

    Args:
        models: the chain, e.g. `config.models.review`.
        prompt: the question (on the agent's stdin).
        name: the question's name (its run directory: `evidence_dir/agents/tasks/<name>/`).
        workdir: where the agent runs (what it may read).
        evidence_dir: the layer's evidence folder.
        timeout: hard limit in seconds.
        on_line: receives each line of the agent's log.
    """
    from dispatch.cluster.transports import RunRequest
    from dispatch.cluster.transports.build import local_transport

    catalog, secrets = _catalog(list(dict.fromkeys(models)))
    usable, why = usable_models(models, catalog)
    if not usable:
        return Answer(None, reason="no model can run: " + "; ".join(why))
    steps = build_steps(Spec(task_id=name, path=Path(name), body="", models=usable), prompt, catalog=catalog)
    settings = get_settings()
    request = RunRequest(project="agents", task_id=name, node="local", cache_key=uuid.uuid4().hex,
                         run_id=uuid.uuid4().hex, workdir=str(workdir), steps=steps, timeout=timeout,
                         stall_timeout=min(timeout, settings.stall_timeout), heartbeat=settings.heartbeat)
    keys = {f"{model}:{env}": value for model in usable for env, value in secrets.get(model, {}).items()}
    with local_transport(evidence_dir) as transport:  # its node agent ends with the call
        result = transport.run(request, on_line, secrets=keys or None)
    data = read_json(Path(result.run_dir) / "result.json") or {}
    attempts = [a for a in data.get("attempts", []) if isinstance(a, dict)]
    _record_limits(attempts)
    text = str(attempts[-1].get("answer") or "") if attempts and result.succeeded else ""
    skipped = f" (left out: {'; '.join(why)})" if why else ""
    return Answer(result.model or None, text=text, ok=result.succeeded, ran=True, log_path=result.log_path,
                  reason=(result.reason or result.status) + skipped, attempts=attempts)
