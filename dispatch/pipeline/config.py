"""`pipeline.yaml`: one project's pipeline configuration, beside its specs.

`$DISPATCH_SPECS/<project>/pipeline.yaml`. The field names are the contract of ../shared/PIPELINE.md;
unknown fields are refused (a typo must not silently turn a check off). Every error names the file and
the field, and `dispatch pipeline run` then exits 2 having run nothing.

Examples:
    >>> config = PipelineConfig.model_validate({"backend": {"start": "uvicorn app:app --port {port}"}})
    >>> config.backend.timeout, config.layer("L3").attempts
    (60.0, 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dispatch.core.errors import ConfigError
from dispatch.core.safeload import load_yaml
from dispatch.core.specs import parse_duration
from dispatch.pipeline.deploy_dir import validate_dir

CONFIG_NAME = "pipeline.yaml"
_MAX_BYTES = 256 * 1024
_MAX_DEPTH = 32  # the schema nests 4 levels (layers.L3.timeout, api.flows[0].steps)
_DEFAULT_ATTEMPTS = {"L1": 1, "L2": 2, "L3": 3, "L4": 1, "L5": 2, "L6": 2}
_DEFAULT_TIMEOUTS = {"L1": 600.0, "L2": 7200.0, "L3": 900.0, "L4": 1200.0, "L5": 7200.0, "L6": 600.0}


def _seconds(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"must be a duration such as 60s, 10m or 1h30m, at most 168h (a week), "
                         f"got {str(value)[:80]!r}") from None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backend(_Model):
    """How to install, start and health-check the app. `{port}` in `start` is a free loopback port we choose."""

    install: str | None = Field(default=None, description="run in a venv inside the workspace")
    start: str | None = Field(default=None, description="the command that serves the app on {port}")
    health: str = Field(default="/", description="GET until 200; a path starting with / is on the started app")
    timeout: float = Field(default=60.0, description="seconds for the health check to answer 200")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (no secrets)")
    inherit_packages: bool = Field(
        default=False, description="the workspace venv also sees the dispatcher's installed packages (read-only), "
                                   "so requirements already installed there install offline; their console "
                                   "scripts are not in the venv: run them as `python -m <tool>`")

    _timeout = field_validator("timeout", mode="before")(classmethod(lambda cls, v: _seconds(v)))


class Frontend(_Model):
    build: str | None = None
    serve: str | None = Field(default=None, description="'static <dir>' or a command with {port}")


class Flow(_Model):
    """An end-to-end API or browser flow: named steps run in order."""

    name: str
    steps: list[str] = Field(min_length=1)


class Api(_Model):
    openapi: str | None = Field(default="/openapi.json", description="the app's OpenAPI schema path")
    endpoints: list[str] = Field(default_factory=list, description="'GET /api/items' ...; else from openapi")
    flows: list[Flow] = Field(default_factory=list)


class Coverage(_Model):
    min: float = Field(default=50.0, ge=0, le=100)


class Regression(_Model):
    command: str | None = Field(default=None, description="the project's test command, e.g. pytest -q")
    coverage: Coverage = Field(default_factory=Coverage)


class Deploy(_Model):
    target: str = Field(default="local", description="local, or a node name from nodes.json")
    dir: str | None = Field(default=None, description="releases/<revision> and the current link live here")
    restart: str | None = None
    health: str | None = Field(default=None, description="the live URL checked after the switch")
    timeout: float = Field(default=60.0, description="seconds for the live URL to answer 200 after the restart")
    keep: int = Field(default=5, ge=1, le=100)

    _timeout = field_validator("timeout", mode="before")(classmethod(lambda cls, v: _seconds(v)))

    @field_validator("dir")
    @classmethod
    def _own_dir(cls, value: str | None, info) -> str | None:
        """Not a system or credential directory (dispatch/pipeline/deploy_dir.py; checked again at deploy time)."""
        return value if value is None else validate_dir(value, info.data.get("target", "local"))


class Models(_Model):
    """The model chains of the agent layers; `implement` and `verify` go into the specs L1 and L5 write
    (`verify: []` writes specs without a verifier)."""

    analyze: list[str] = Field(default_factory=lambda: ["claude"])
    review: list[str] = Field(default_factory=lambda: ["claude"])
    fix: list[str] = Field(default_factory=lambda: ["glm", "minimax", "claude"])
    verify: list[str] = Field(default_factory=lambda: ["codex"])
    implement: list[str] = Field(default_factory=lambda: ["glm", "minimax", "claude"])

    @field_validator("analyze", "review", "fix", "verify", "implement", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Thresholds(_Model):
    api_pass_rate: float = Field(default=0.9, ge=0, le=1)
    load_time_s: float = Field(default=3.0, gt=0)
    ui_min_score: float = Field(default=70.0, ge=0, le=100)
    coverage_min: float = Field(default=50.0, ge=0, le=100)
    spec_min_score: float = Field(default=60.0, ge=0, le=100)
    spec_warn_average: float = Field(default=80.0, ge=0, le=100)


class LayerSettings(_Model):
    """A layer's switch, attempts and timeout. `enabled: false` is the only way a layer may not run and
    the pipeline still pass."""

    enabled: bool = True
    attempts: int | None = Field(default=None, ge=1, le=10)
    timeout: float | None = None

    _timeout = field_validator("timeout", mode="before")(
        classmethod(lambda cls, v: None if v is None else _seconds(v)))


class PipelineConfig(_Model):
    """One project's `pipeline.yaml`."""

    code: str | None = Field(default=None, description="the code directory (relative: to this file's folder)")
    backend: Backend = Field(default_factory=Backend)
    frontend: Frontend | None = None
    pages: list[str] = Field(default_factory=lambda: ["/"])
    api: Api = Field(default_factory=Api)
    browser_flows: list[Flow] = Field(default_factory=list)
    regression: Regression = Field(default_factory=Regression)
    deploy: Deploy | None = None
    models: Models = Field(default_factory=Models)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    layers: dict[str, LayerSettings] = Field(default_factory=dict, description="L1..L6 and L4a..L4d")
    max_cycles: int = Field(default=3, ge=1, le=10, description="L4-L5 cycles before the pipeline FAILs")
    max_fix_specs: int = Field(default=20, ge=1, le=200, description="fix specs L5 writes per cycle")
    notify: str | None = Field(default=None, description="a Prefect notification block's name (nightly)")

    @model_validator(mode="after")
    def _known_layers(self) -> PipelineConfig:
        from dispatch.pipeline.results import LAYERS, TEST_LAYERS

        unknown = sorted(set(self.layers) - set(LAYERS) - set(TEST_LAYERS))
        if unknown:
            raise ValueError(f"layers: unknown layer(s) {', '.join(unknown)}; known: "
                             f"{', '.join(LAYERS + TEST_LAYERS)}")
        for page in self.pages:
            if not page.startswith("/"):
                raise ValueError(f"pages: {page[:80]!r} must be a path starting with /")
        return self

    def layer(self, layer: str) -> LayerSettings:
        """A layer's settings with the defaults filled in (attempts L1 1, L2 2, L3 3, L4 1, L5 2, L6 2)."""
        given = self.layers.get(layer, LayerSettings())
        parent = layer[:2]
        return LayerSettings(enabled=given.enabled, attempts=given.attempts or _DEFAULT_ATTEMPTS.get(parent, 1),
                             timeout=given.timeout or _DEFAULT_TIMEOUTS.get(parent, 600.0))

    def code_dir(self, config_path: Path, default: Path) -> Path:
        """The code the pipeline works on: `code` (relative to the config's folder), else `default`."""
        if self.code is None:
            return default
        return (config_path.parent / self.code).resolve()


def load_pipeline_config(path: Path) -> PipelineConfig:
    """Read and check a `pipeline.yaml`.

    Raises:
        ConfigError: the file is missing, unreadable, too large, not YAML, or a field is wrong; the message
            names the file and every field at fault.
    """
    data = load_yaml(path, max_bytes=_MAX_BYTES, max_depth=_MAX_DEPTH) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a YAML mapping (backend: ..., pages: [...])")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "top level"
            problems.append(f"{path}: {field}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError("\n".join(problems)) from None
