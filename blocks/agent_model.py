"""`AgentModel`: an agent model (its CLI command, endpoint and API key) as a Prefect block.

A team overrides or adds models with these blocks; the key is a `SecretStr`, unwrapped only by
`secret_env()`, which gives the environment the agent CLI needs at the moment a spec starts.
`dispatch nodes import` saves one block per built-in model (without keys) so the UI lists them.

Examples:
    >>> glm = AgentModel.builtin("glm")
    >>> glm.api_key = SecretStr("...")  # doctest: +SKIP
    >>> glm.save("glm", overwrite=True)  # doctest: +SKIP
    >>> AgentModel.load("glm").to_model_spec().env["ANTHROPIC_BASE_URL"]  # doctest: +SKIP
    'https://api.z.ai/api/anthropic'
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from dispatch.core.errors import ConfigError
from dispatch.core.model_catalog import ANTHROPIC_BASE_URL, BUILTIN_MODELS, PROMPT, ModelSpec, endpoint_settings


class AgentModel(Block):
    """How to run one agent model: the command, its non-secret environment, and its API key as a secret."""

    # assigning a plain string to a secret field still makes it a SecretStr
    model_config = ConfigDict(validate_assignment=True)

    _block_type_name = "Dispatch Agent Model"
    _description = "An agent model for Oyster Dispatch: CLI command with {prompt}, endpoint, API key (secret)."

    name: str = Field(description="The model's name as specs use it (`model:` / `executor:`), e.g. glm.")
    command: list[str] = Field(
        description='The CLI command as argv; the element "{prompt}" marks the prompt, which the agent reads on '
                    "stdin (the element is dropped from argv).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra non-secret environment, e.g. ANTHROPIC_BASE_URL.")
    api_key: SecretStr | None = Field(default=None, description="The model's API key or token.")
    key_env: str | None = Field(
        default=None, description="The environment variable the key goes into, e.g. ANTHROPIC_AUTH_TOKEN.")
    base_url: str | None = Field(
        default=None, description="The endpoint, given to the CLI the way it reads one: ANTHROPIC_BASE_URL for "
                                  "Claude Code (wins over env), a `-c model_providers...` provider for Codex.")
    install_hint: str = Field(default="", description="How to install the CLI, shown when a node lacks it.")

    @field_validator("command")
    @classmethod
    def _has_prompt(cls, command: list[str]) -> list[str]:
        if not command:
            raise ValueError('command: must not be empty, e.g. ["claude", "-p", "{prompt}"]')
        if PROMPT not in command:
            raise ValueError(f'command: needs an element that is exactly "{PROMPT}" (the spec\'s prompt goes '
                             f"there), got {command!r}")
        return command

    @model_validator(mode="after")
    def _key_has_env(self) -> AgentModel:
        if self.api_key is not None and not self.key_env:
            raise ValueError(f"model {self.name}: api_key is set but key_env is not: name the environment "
                             "variable the CLI reads it from (e.g. ANTHROPIC_AUTH_TOKEN)")
        return self

    def to_model_spec(self) -> ModelSpec:
        """The model as `dispatch.core.agents` runs it (no key in it: that comes from `secret_env()`)."""
        env, base_url = endpoint_settings(self.command, self.env, self.base_url)
        builtin = BUILTIN_MODELS.get(self.name)  # a block of a built-in model keeps how its CLI reads the prompt
        return ModelSpec(self.name, tuple(self.command), env, key_env=self.key_env, install_hint=self.install_hint,
                         prompt_arg=builtin.prompt_arg if builtin else None,
                         source_env=builtin.source_env if builtin else None, base_url=base_url)

    def secret_env(self) -> dict[str, str]:
        """The key as the CLI wants it, `{key_env: key}`; empty without a key. Never log the result.

        Raises:
            ConfigError: a key is set without `key_env` (possible only if validation was bypassed).
        """
        if self.api_key is None:
            return {}
        if not self.key_env:
            raise ConfigError(f"model {self.name}: api_key is set but key_env is not; set key_env")
        return {self.key_env: self.api_key.get_secret_value()}

    @classmethod
    def builtin(cls, name: str) -> AgentModel:
        """A block holding the built-in model `name` (no key).

        Raises:
            ConfigError: `name` is not a built-in model, listing the known ones.
        """
        try:
            spec = BUILTIN_MODELS[name]
        except KeyError:
            raise ConfigError(f"no built-in model {name!r}; built-in models: {', '.join(sorted(BUILTIN_MODELS))}"
                              ) from None
        env = dict(spec.env)
        base_url = env.pop(ANTHROPIC_BASE_URL, None) or spec.base_url
        return cls(name=spec.name, command=list(spec.argv), env=env, key_env=spec.key_env, base_url=base_url,
                   install_hint=spec.install_hint)
