"""The agent models a spec can name, and how each becomes a step of the node runner's model chain.

Built-in models: `glm` and `minimax` (Claude Code pointed at their Anthropic-compatible endpoints
with `ANTHROPIC_BASE_URL` and the model's token), `claude`, `codex` (`codex exec`) and `opencode`.
The `AgentModel` block (blocks/agent_model.py) overrides these per team, with API keys as secrets.

The prompt never goes in argv (one argument is capped at 128 KiB: longer prompts failed every model with
"Argument list too long"): a step carries it as `stdin`, which the node runner writes to
`<run_dir>/prompt.txt` (mode 0600) and opens as the agent's standard input. The `{prompt}` element of a
command only marks where the prompt used to go; it is dropped (or replaced by `-`, for `codex exec -`).
Claude Code runs with `--output-format stream-json --verbose` and Codex with `--json`: their structured
output tells a failed run from one that only talks about limits (dispatch/ratelimits.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dispatch.errors import ConfigError
from dispatch.specs import Spec

PROMPT = "{prompt}"


@dataclass(frozen=True)
class ModelSpec:
    """How to run one model: its CLI command (with `{prompt}`), extra env, and its secret's env name.

    `prompt_arg` is what `{prompt}` becomes in argv (None: nothing); the prompt itself goes on stdin.
    """

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    key_env: str | None = None
    install_hint: str = ""
    prompt_arg: str | None = None

    @property
    def cli(self) -> str:
        return self.argv[0]


_CLAUDE = ("claude", "-p", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions", PROMPT)
_CLAUDE_HINT = "install Claude Code (npm install -g @anthropic-ai/claude-code)"

BUILTIN_MODELS: dict[str, ModelSpec] = {
    "glm": ModelSpec("glm", _CLAUDE, {"ANTHROPIC_BASE_URL": "https://api.z.ai/api/anthropic"},
                     key_env="ANTHROPIC_AUTH_TOKEN", install_hint=_CLAUDE_HINT),
    "minimax": ModelSpec("minimax", _CLAUDE, {"ANTHROPIC_BASE_URL": "https://api.minimax.io/anthropic"},
                         key_env="ANTHROPIC_AUTH_TOKEN", install_hint=_CLAUDE_HINT),
    "claude": ModelSpec("claude", _CLAUDE, key_env="ANTHROPIC_API_KEY", install_hint=_CLAUDE_HINT),
    "codex": ModelSpec("codex", ("codex", "exec", "--json", "--full-auto", PROMPT), key_env="OPENAI_API_KEY",
                       install_hint="install Codex CLI (npm install -g @openai/codex)", prompt_arg="-"),
    "opencode": ModelSpec("opencode", ("opencode", "run", PROMPT),
                          install_hint="install opencode (npm install -g opencode-ai)"),
}


def model_spec(name: str, catalog: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """The model named `name`.

    Raises:
        ConfigError: for an unknown model, listing the known ones.
    """
    catalog = catalog or BUILTIN_MODELS
    try:
        return catalog[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(sorted(catalog))} "
            "(add one with an AgentModel block)") from None


def build_prompt(spec: Spec, context: list[tuple[str, str]]) -> str:
    """The text handed to the agent: shared context files, then the spec itself."""
    parts = [f"# Context: {name}\n\n{text.strip()}\n" for name, text in context]
    parts.append(f"# Task {spec.task_id}\n\n{spec.body.strip()}\n")
    return "\n".join(parts)


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
    steps = []
    for name in chain:
        model = model_spec(name, catalog)
        argv = [model.prompt_arg if part == PROMPT else part for part in model.argv]
        steps.append({"name": name, "argv": [part for part in argv if part is not None], "stdin": prompt,
                      "env": {**model.env, "DISPATCH_MODEL": name}, "install_hint": model.install_hint})
    return steps
