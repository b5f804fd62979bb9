"""What one attempt of a spec is given: its `RunRequest` (plain data, the task's parameter) and the process-local
options `Transport.run` takes beside it (secrets, an inherited machine slot, scp-mode paths, the note callback).

Built once per project run (`AttemptInputs`) from what the run set up: its prompts and model keys, its code
directory and sync mode, the verifier reviews of rejected attempts (a retry's prompt carries the last one).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatch.cluster.config import ProjectConfig
from dispatch.cluster.gitsync import worktree_path
from dispatch.cluster.transports import RunRequest, Transport
from dispatch.core.agents import build_prompt, build_steps, build_verify_steps
from dispatch.core.dag import Project
from dispatch.core.errors import ProjectInvalid
from dispatch.core.model_catalog import model_variables
from dispatch.core.nodes import Node
from dispatch.core.scheduler import Assignment
from dispatch.core.settings import DispatchSettings
from dispatch.core.specs import model_env_errors


def cache_keys(project: Project, code_dir: Path) -> dict[str, str]:
    """Each spec's cache key: the same spec against another code directory or revision is other work."""
    try:
        out = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        revision = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        revision = ""
    return project.cache_keys(f"{code_dir}@{revision}")


@dataclass
class AttemptInputs:
    """Everything an attempt's request and options are made of, for one project run.

    Args:
        project: the project.
        settings: the process settings (timeouts, heartbeat).
        config: the project's `projects.json` entry.
        run_id: the run's id (task runs find their `RunInputs` by it).
        code_dir: the code directory the specs work in.
        keys: cache key per task id.
        force: task ids re-run whatever the cache holds.
        nodes: the configured nodes by name (their `env`).
        transports: the nodes' transports by name.
        catalog: the agent models (built-in and `AgentModel` blocks).
        model_secrets: the keys of each model, by model.
        mask_only: secrets to mask that no step is given (this process's credentials): the local node's only.
        is_local: whether a node is this machine.
    """

    project: Project
    settings: DispatchSettings
    config: ProjectConfig
    run_id: str
    code_dir: Path
    keys: Mapping[str, str]
    force: set[str]
    nodes: Mapping[str, Node]
    transports: Mapping[str, Transport]
    catalog: dict
    model_secrets: dict[str, dict[str, str]]
    mask_only: list[str]
    is_local: Callable[[str], bool]
    context: list[tuple[str, str]] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    reviews: dict[str, str] = field(default_factory=dict)  # task id -> the review that rejected its last attempt

    @classmethod
    def for_run(cls, project: Project, selected: set[str], *,
                models_and_keys: Callable[[list[str]], tuple[dict, dict[str, dict[str, str]]]],
                **fields: Any) -> AttemptInputs:
        """The inputs of a run of `selected`: prompts with the project's context files, the models the specs
        name with their keys (`models_and_keys`), and this process's credentials to mask.

        Raises:
            ProjectInvalid: a spec's `env:` sets a configured model's variable.
        """
        context = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in project.context]
        prompts = {t: build_prompt(project.specs[t], context) for t in selected if project.specs[t].kind == "agent"}
        models = sorted({m for t in prompts for m in project.specs[t].model_chain}
                        | {m for t in selected for m in project.specs[t].verify})
        catalog, model_secrets = models_and_keys(models)
        specs = [project.specs[t] for t in project.order if t in selected]
        if errors := model_env_errors(specs, model_variables(catalog)):
            raise ProjectInvalid(project.name, errors)
        # values to mask that no step is given: this process's credentials (the local node's steps could read
        # them from /proc; remote nodes never see them)
        mask_only = fields["settings"].secret_values()
        return cls(project=project, catalog=catalog, model_secrets=model_secrets, mask_only=mask_only,
                   context=context, prompts=prompts, **fields)

    def secrets(self) -> list[str]:
        """Every secret value the run's attempts may print: to mask."""
        return [*self.mask_only, *(v for keys in self.model_secrets.values() for v in keys.values())]

    def request(self, assignment: Assignment, chain: list[str] | tuple[str, ...],
                cooled: set[str] | None) -> RunRequest:
        """The attempt's request: `chain` the usable models, `cooled` the models on cool-down (verifiers skip)."""
        spec = self.project.specs[assignment.task_id]
        transport = self.transports[assignment.node]
        git = None
        if self.config.sync_mode == "git":
            git = {"repo_url": self.config.repo_url, "main_branch": self.config.main_branch,
                   "dependencies": list(spec.depends_on)}
            workdir = worktree_path(transport.root_path, self.project.name, spec.task_id)
        else:
            workdir = transport.workdir(self.project.name, spec.task_id) or str(self.code_dir)
        prompt = self.prompts.get(spec.task_id, "")
        if spec.task_id in self.reviews and spec.kind == "agent":  # the verifier's review of the last attempt
            prompt = build_prompt(spec, self.context, self.reviews[spec.task_id])
        steps = build_steps(spec, prompt, skip=set(spec.model_chain) - set(chain), catalog=self.catalog)
        verify = build_verify_steps(spec, skip=cooled if spec.verify else None, catalog=self.catalog)
        return RunRequest(
            project=self.project.name, task_id=spec.task_id, node=assignment.node, attempt=assignment.attempt,
            cache_key=self.keys[spec.task_id], run_id=self.run_id, workdir=workdir, root=transport.root_path,
            fresh=spec.task_id in self.force,
            steps=steps, verify=verify,
            timeout=spec.timeout or self.settings.timeout, stall_timeout=self.settings.stall_timeout,
            heartbeat=self.settings.heartbeat, acceptance=spec.acceptance,
            env={**spec.env, "DISPATCH_SPEC_FILE": spec.path.name}, node_env=self.nodes[assignment.node].env,
            git=git)

    def options(self, assignment: Assignment, slot: tuple[str, object] | None,
                on_note: Callable[[str], None]) -> dict[str, Any]:
        """Process-local options of an attempt: its secrets, the machine slot to inherit, scp-mode paths, where
        its retry notes go."""
        options: dict[str, Any] = {}
        spec = self.project.specs[assignment.task_id]
        models = [*(spec.model_chain if spec.kind == "agent" else []), *spec.verify]
        secrets = {f"{model}:{name}": value for model in models
                   for name, value in self.model_secrets.get(model, {}).items()}
        local = self.is_local(assignment.node)
        if local:
            secrets.update({f"mask:{number}": value for number, value in enumerate(self.mask_only)})
        if secrets:
            options["secrets"] = secrets
        options["on_note"] = on_note
        if local:
            if slot is not None and slot[0] == "machine":
                options["slot_fd"] = slot[1]
        elif self.config.sync_mode == "scp":
            options["sync_from"] = self.code_dir
            options["sync_back"] = self.code_dir
        return options
