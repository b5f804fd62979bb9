"""How a spec's model chain becomes steps of the node runner: the prompt, the agent steps, the verifiers.

The prompt never goes in argv (one argument is capped at 128 KiB: longer prompts failed every model with
"Argument list too long"): a step carries it as `stdin`, which the node runner writes to
`<run_dir>/prompt.txt` (mode 0600) and opens as the agent's standard input. The `{prompt}` element of a
command only marks where the prompt used to go; it is dropped (or replaced by `-`, for `codex exec -`).
Claude Code runs with `--output-format stream-json --verbose` and Codex with `--json`: their structured
output tells a failed run from one that only talks about limits (dispatch/runner/ratelimits.py).

The models themselves (each one's CLI command, endpoint, key variable, and what each CLI needs to run
headless and leave retries to us) are the catalog's: dispatch/core/model_catalog.py.
"""

from __future__ import annotations

from dispatch.core.model_catalog import PROMPT, ModelSpec, cli_environment, codex_endpoint, model_spec
from dispatch.core.specs import Spec

VERDICT_APPROVE, VERDICT_REJECT = "VERDICT: APPROVE", "VERDICT: REJECT"  # a verifier's last line (node runner)


def build_prompt(spec: Spec, context: list[tuple[str, str]], review: str = "") -> str:
    """The text handed to the agent: shared context files, the spec itself, and (on a retry after a
    verifier rejected the previous attempt) that review."""
    parts = [f"# Context: {name}\n\n{text.strip()}\n" for name, text in context]
    parts.append(f"# Task {spec.task_id}\n\n{spec.body.strip()}\n")
    if review:
        parts.append("# Review of your previous attempt\n\nA verifier rejected the previous attempt at this task "
                     "(its changes are still in the working directory). Address every point of its review:\n\n"
                     f"{review.strip()}\n")
    return "\n".join(parts)


def build_verify_prompt(spec: Spec) -> str:
    """The verifier's instructions, the spec and its acceptance commands; the node runner appends the change
    (`git diff`, or the changed files) once the agent is done."""
    commands = "\n".join(f"- `{command}`" for command in spec.acceptance) or "- (none as commands: judge by the text)"
    return (
        f"# Review of task {spec.task_id}\n\n"
        "Another agent has just made a change for the task below, and its acceptance commands passed. Review the "
        "change against the task's goal and acceptance criteria. Do not modify any file: read and judge only.\n\n"
        "Give your reasons: what is right, and what is missing or wrong, precisely enough that the next attempt "
        "can fix it. Then end your answer with exactly one of these two lines:\n\n"
        f"{VERDICT_APPROVE}\n{VERDICT_REJECT}\n\n"
        f"## The task\n\n{spec.body.strip()}\n\n"
        f"## Acceptance commands (already run: they passed)\n\n{commands}\n"
    )


def build_steps(spec: Spec, prompt: str, *, skip: set[str] | None = None,
                catalog: dict[str, ModelSpec] | None = None) -> list[dict]:
    """The node runner's `steps` for a spec: its shell block, or its model chain in order.

    Args:
        spec: the spec.
        prompt: the agent prompt (ignored for shell specs), handed to each agent on its stdin.
        skip: models to leave out (on cool-down); at least the last model always stays.
        catalog: models by name (built-ins by default).
    """
    if spec.kind == "shell":
        return [{"name": "shell", "script": spec.script or ""}]
    chain = [m for m in spec.model_chain if m not in (skip or set())] or spec.model_chain[-1:]
    return [_model_step(name, prompt, catalog, last=index == len(chain) - 1) for index, name in enumerate(chain)]


def build_verify_steps(spec: Spec, *, skip: set[str] | None = None,
                       catalog: dict[str, ModelSpec] | None = None) -> list[dict]:
    """The node runner's `verify` steps: the spec's verifier chain (`verify:`), each with the review prompt on
    its stdin and `DISPATCH_STEP_KIND=verify` in its environment. Empty when the spec names no verifier.

    Args:
        spec: the spec.
        skip: verifiers to leave out (on cool-down); at least the last one always stays.
        catalog: models by name (built-ins by default).
    """
    if not spec.verify:
        return []
    chain = [m for m in spec.verify if m not in (skip or set())] or spec.verify[-1:]
    prompt = build_verify_prompt(spec)
    return [_model_step(name, prompt, catalog, last=index == len(chain) - 1, DISPATCH_STEP_KIND="verify")
            for index, name in enumerate(chain)]


def _model_step(name: str, prompt: str, catalog: dict[str, ModelSpec] | None, *, last: bool = True,
                **env: str) -> dict:
    model = model_spec(name, catalog)
    argv = [model.prompt_arg if part == PROMPT else part for part in model.argv]
    if model.base_url and model.family == "codex":
        argv[1:1] = codex_endpoint(model.base_url, model.key_env)  # before `exec`: codex's own options
    return {"name": name, "argv": [part for part in argv if part is not None], "stdin": prompt,
            "env": {**cli_environment(model.argv, last=last), **model.env, "DISPATCH_MODEL": name, **env},
            "install_hint": model.install_hint}
