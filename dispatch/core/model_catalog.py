"""The model catalog: the agent models a spec can name, each one's CLI command, endpoint and key variable.

Built-in models: `glm` and `minimax` (Claude Code pointed at their Anthropic-compatible endpoints
with `ANTHROPIC_BASE_URL` and the model's token), `claude`, `codex` (`codex exec`) and `opencode`.
The `AgentModel` block (blocks/agent_model.py) overrides these per team, with API keys as secrets.

Each CLI gets what it needs to run headless and to leave retries to us (`cli_environment`, `codex_endpoint`):
Claude Code `IS_SANDBOX=1` (it refuses `--dangerously-skip-permissions` as root otherwise; the dispatcher
cannot know a node's uid, and the variable changes nothing for other users) and `CLAUDE_CODE_MAX_RETRIES`
(0 when another model follows: the chain moves on at once; a few for the chain's last model), and an
endpoint (`ModelSpec.base_url`) the way each CLI reads one: `ANTHROPIC_BASE_URL` for Claude Code, a
`-c model_providers.dispatch...` provider for Codex (it ignores `OPENAI_BASE_URL`), with its own retries off.

It knows nothing of specs (dispatch/core/agents.py turns a spec into the steps of its chain), so spec validation
can refuse a spec's `env:` that sets a model's variables without an import loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatch.core.errors import ConfigError

PROMPT = "{prompt}"


@dataclass(frozen=True)
class ModelSpec:
    """How to run one model.

    Attributes:
        name: the model's name in specs (`model:`, `executor:`).
        argv: its CLI command; a `{prompt}` element becomes `prompt_arg` (or nothing): the prompt itself
            goes on the agent's stdin.
        env: extra environment of its step (not secret), e.g. ANTHROPIC_BASE_URL.
        key_env: the variable its CLI reads its key from.
        install_hint: how to install the CLI.
        prompt_arg: what `{prompt}` becomes in argv (None: nothing), e.g. `-` for `codex exec`.
        source_env: the variable of the dispatcher's (or worker's) own environment that may hold this
            model's key when no `AgentModel` block does; it reaches this model only, as `key_env`.
        base_url: an endpoint its CLI does not read from the environment (Codex): set in argv at each run.
            Claude Code's endpoint is `ANTHROPIC_BASE_URL` in `env` (`endpoint_settings` decides which).
    """

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    key_env: str | None = None
    install_hint: str = ""
    prompt_arg: str | None = None
    source_env: str | None = None
    base_url: str | None = None

    @property
    def cli(self) -> str:
        return self.argv[0]

    @property
    def family(self) -> str:
        """Which CLI this is ("claude", "codex", "opencode" or "other"), from its command's name."""
        return cli_family(self.argv)


ANTHROPIC_BASE_URL = "ANTHROPIC_BASE_URL"
CODEX_PROVIDER = "dispatch"  # the `model_providers.<id>` a Codex step with its own endpoint uses
# The chain's last model may retry a transient error itself this often; a model with another after it
# never does: the next model starts at once and the node runner shows what happened.
LAST_MODEL_CLI_RETRIES = 2


def cli_family(argv: tuple[str, ...] | list[str]) -> str:
    """The CLI a command runs: "claude", "codex", "opencode" or "other", from its executable's name."""
    name = os.path.basename(argv[0]) if argv else ""
    return name if name in ("claude", "codex", "opencode") else "other"


def endpoint_settings(argv: tuple[str, ...] | list[str], env: dict[str, str], base_url: str | None,
                      ) -> tuple[dict[str, str], str | None]:
    """Where a model's endpoint goes for its CLI: (its env, the `ModelSpec.base_url` to set in argv).

    Claude Code (and any CLI we do not know) reads `ANTHROPIC_BASE_URL`; Codex ignores every variable and
    takes a provider from `-c` options, so its URL stays in `base_url` for `codex_endpoint`.
    """
    env = dict(env)
    if not base_url:
        return env, None
    if cli_family(argv) == "codex":
        return env, base_url
    env[ANTHROPIC_BASE_URL] = base_url
    return env, None


def codex_endpoint(base_url: str, key_env: str | None) -> list[str]:
    """`-c` options that point Codex at `base_url` (Responses API) as provider `dispatch`, key from `key_env`,
    with its own retries off (the node runner moves on to the next model instead)."""
    prefix = f"model_providers.{CODEX_PROVIDER}"
    settings = [f"model_provider={json.dumps(CODEX_PROVIDER)}", f"{prefix}.name={json.dumps(CODEX_PROVIDER)}",
                f"{prefix}.base_url={json.dumps(base_url)}", f'{prefix}.wire_api="responses"',
                f"{prefix}.request_max_retries=0", f"{prefix}.stream_max_retries=0"]
    if key_env:
        settings.append(f"{prefix}.env_key={json.dumps(key_env)}")
    return [part for setting in settings for part in ("-c", setting)]


def cli_environment(argv: tuple[str, ...] | list[str], *, last: bool) -> dict[str, str]:
    """What a CLI needs in its environment to run headless under the node runner (the model's env wins).

    Args:
        argv: the model's command.
        last: whether it is the last model of its chain (it may retry a transient error itself, briefly).
    """
    if cli_family(argv) != "claude":
        return {}
    env = {"CLAUDE_CODE_MAX_RETRIES": str(LAST_MODEL_CLI_RETRIES if last else 0), "DISABLE_AUTOUPDATER": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    if "--dangerously-skip-permissions" in argv:
        env["IS_SANDBOX"] = "1"  # as root it refuses the flag otherwise (exit 1 in 0.6 s)
    return env


_CLAUDE = ("claude", "-p", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions", PROMPT)
_CLAUDE_HINT = "install Claude Code (npm install -g @anthropic-ai/claude-code)"

BUILTIN_MODELS: dict[str, ModelSpec] = {
    "glm": ModelSpec("glm", _CLAUDE, {"ANTHROPIC_BASE_URL": "https://api.z.ai/api/anthropic"},
                     key_env="ANTHROPIC_AUTH_TOKEN", install_hint=_CLAUDE_HINT, source_env="ZAI_API_KEY"),
    "minimax": ModelSpec("minimax", _CLAUDE, {"ANTHROPIC_BASE_URL": "https://api.minimax.io/anthropic"},
                         key_env="ANTHROPIC_AUTH_TOKEN", install_hint=_CLAUDE_HINT, source_env="MINIMAX_API_KEY"),
    "claude": ModelSpec("claude", _CLAUDE, key_env="ANTHROPIC_API_KEY", install_hint=_CLAUDE_HINT,
                        source_env="ANTHROPIC_API_KEY"),
    "codex": ModelSpec("codex", ("codex", "exec", "--json", "--sandbox", "workspace-write", "--skip-git-repo-check",
                                 PROMPT), key_env="OPENAI_API_KEY",
                       install_hint="install Codex CLI (npm install -g @openai/codex)", prompt_arg="-",
                       source_env="OPENAI_API_KEY"),
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


def model_variables(catalog: dict[str, ModelSpec]) -> frozenset[str]:
    """The variables the models of `catalog` set or take their key from (a spec's `env:` may set none)."""
    return frozenset(name for model in catalog.values() for name in (*model.env, model.key_env, model.source_env)
                     if name)


def environment_keys(names: list[str], catalog: dict[str, ModelSpec], secrets: dict[str, dict[str, str]],
                     lookup: Callable[[str], str | None]) -> dict[str, dict[str, str]]:
    """`secrets` (model -> {env var: key}, from blocks), completed from the caller's environment: a model
    with no key yet gets the value of its own `source_env` variable, as its `key_env`, and nothing else.

    Args:
        names: the models in use.
        catalog: models by name.
        secrets: the keys found in blocks (kept as they are).
        lookup: reads one variable of the caller's environment (`DispatchSettings.environment_key`).
    """
    found = dict(secrets)
    for name in names:
        model = catalog.get(name)
        if name in found or model is None or not model.source_env or not model.key_env:
            continue
        if value := lookup(model.source_env):
            found[name] = {model.key_env: value}
    return found
