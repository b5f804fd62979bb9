"""Process-wide settings: the one place that reads the environment.

Every value has a `DISPATCH_` environment variable (e.g. `DISPATCH_HOME`) and a documented default.
The defaults follow the XDG base directories instead of the old system's `~/Downloads/...` paths:

| setting             | env var                      | default                                      |
|---------------------|------------------------------|----------------------------------------------|
| `home`              | `DISPATCH_HOME`              | `$XDG_STATE_HOME/oyster-dispatch` (~/.local/state/...) |
| `specs`             | `DISPATCH_SPECS`             | `$XDG_DATA_HOME/oyster-dispatch/specs`, then `examples/` |
| `projects`          | `DISPATCH_PROJECTS`          | `$XDG_DATA_HOME/oyster-dispatch/projects`    |
| `local_slots`       | `DISPATCH_LOCAL_SLOTS`       | the CPU count                                |
| `retries`           | `DISPATCH_RETRIES`           | 2 (attempts after the first)                 |
| `retry_delay`       | `DISPATCH_RETRY_DELAY`       | 2 s, doubled per attempt                     |
| `timeout`           | `DISPATCH_TIMEOUT`           | 45 min per spec                              |
| `stall_timeout`     | `DISPATCH_STALL_TIMEOUT`     | 10 min without output                        |
| `deployment`        | `DISPATCH_DEPLOYMENT`        | `dispatch-project/dispatch-project` (`start --detach`) |
| `server_slots`      | `DISPATCH_SERVER_SLOTS`      | true: team mode counts node slots on the server |
| `server`            | `DISPATCH_SERVER`            | `local` (a server that stays), or `ephemeral`  |
| `server_port`       | `DISPATCH_SERVER_PORT`       | 4200 (a free port when it is taken)           |
| `snapshot_dir`      | `DISPATCH_SNAPSHOT_DIR`      | `<home>/snapshots`                            |
| `snapshot_keep`     | `DISPATCH_SNAPSHOT_KEEP`     | 14 (days)                                     |
| `budget_model`      | `DISPATCH_BUDGET_MODEL`      | none; JSON `{"claude": 20}`: USD per UTC day per model |
| `budget_user`       | `DISPATCH_BUDGET_USER`       | none; JSON `{"alice": 50}`: USD per UTC day per user |
| `usage_ledger_bytes`| `DISPATCH_USAGE_LEDGER_BYTES`| 8 MiB, then results/usage.jsonl rotates      |
| `guardian_*`        | `DISPATCH_GUARDIAN_*`        | every 300 s, drain after 3, 2 GiB, load 4/CPU |
| `alert_block`       | `DISPATCH_ALERT_BLOCK`       | none: the guardian's alerts go to the log    |
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatch.core.paths import check_name, local_path

BUNDLED_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def _default_home() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "oyster-dispatch"


def _default_specs() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "oyster-dispatch" / "specs"


def _default_projects() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "oyster-dispatch" / "projects"


class DispatchSettings(BaseSettings):
    """Settings for the dispatcher and the CLI, read from `DISPATCH_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="DISPATCH_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="State, results, nodes.json, Prefect DB.")
    specs: Path = Field(default_factory=_default_specs, description="Root of spec projects: <specs>/<project>/.")
    projects: Path = Field(
        default_factory=_default_projects, description="Root of project code: <projects>/<project>/."
    )
    local_slots: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=1024,
                             description="Slots of the local node.")
    retries: int = Field(default=2, ge=0, le=20, description="Default retries of a failed spec.")
    retry_delay: float = Field(default=2.0, ge=0, le=3600, description="First retry delay in seconds; doubles.")
    timeout: float = Field(default=45 * 60, gt=0, description="Default hard timeout of a spec, seconds.")
    stall_timeout: float = Field(default=10 * 60, gt=0, description="Kill a spec silent this long, seconds.")
    heartbeat: float = Field(default=2.0, gt=0, le=60, description="Seconds between status.json heartbeats.")
    deployment: str = Field(default="dispatch-project/dispatch-project", pattern=r"^[^/]+/[^/]+$",
                            description="The deployment (flow/deployment) `dispatch start --detach` runs in team mode.")
    server_slots: bool = Field(
        default=True, description="Team mode: take every ssh/worker node's slots from the server's `node-<name>` "
        "limit (created from its slots when missing). Turn off only for a server on SQLite, which cannot hold "
        "concurrency limits; each node's agent still refuses more runners than its slots.")
    server: Literal["local", "ephemeral"] = Field(
        default="local", description="Embedded mode's Prefect server: `local` keeps one running in the background "
        "for this home (the UI stays up, commands start in seconds; `dispatch server stop` ends it), `ephemeral` "
        "starts a temporary one in each command that needs Prefect (sandboxes, CI).")
    server_port: int = Field(default=4200, ge=1, le=65535,
                             description="Port of the local server when it is free (else a free one is taken).")
    prefect_api_url: str | None = Field(default=None, validation_alias="PREFECT_API_URL",
                                        description="A Prefect server (team mode); unset: embedded SQLite.")
    local_api_url: str | None = Field(
        default=None, validation_alias="DISPATCH_LOCAL_API_URL",
        description="Set by dispatch itself next to PREFECT_API_URL when it points at this home's local server, "
        "so that processes started from here still run in embedded mode.")
    prefect_api_auth_string: SecretStr | None = Field(
        default=None, validation_alias="PREFECT_API_AUTH_STRING",
        description="Basic auth user:password for the team's Prefect server (a secret).")
    prefect_home: Path | None = Field(default=None, validation_alias="PREFECT_HOME",
                                      description="Prefect's own home; embedded default: <home>/prefect.")
    # Usage and cost (dispatch/core/usage.py, dispatch/core/budgets.py): optional daily budgets in USD per UTC day, e.g.
    # DISPATCH_BUDGET_MODEL='{"claude": 20}', DISPATCH_BUDGET_USER='{"alice": 50}'; and the ledger's size.
    budget_model: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="USD per UTC day per model; a model past it is left out of chains.")
    budget_user: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="USD per UTC day per user; the user's specs past it wait.")
    usage_ledger_bytes: int = Field(default=8 << 20, ge=1 << 16, le=1 << 30,
                                    description="Rotate results/usage.jsonl to usage.jsonl.1 past this size.")

    # Snapshots and restore (`dispatch snapshot` / `dispatch restore`, the daily `snapshot` deployment)
    snapshot_dir: Path | None = Field(default=None, description="Where `dispatch snapshot` writes its archives; "
                                      "default <home>/snapshots (point it at another disk).")
    snapshot_keep: int = Field(default=14, ge=1, le=3650,
                               description="Days of snapshots kept: the newest archive of each of the last N days.")
    snapshot_database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DISPATCH_SNAPSHOT_DATABASE_URL",
                                                    "PREFECT_API_DATABASE_CONNECTION_URL"),
        description="The Prefect database to snapshot and restore when it is not the embedded SQLite one: the team "
        "server's postgresql+asyncpg:// URL (server.env sets PREFECT_API_DATABASE_CONNECTION_URL). A secret.")
    snapshot_max_bytes: int = Field(default=64 * 2**30, ge=2**20,
                                    description="Most bytes an archive may hold unpacked (a restore refuses more).")

    # The guardian (dispatch/guardian, `dispatch guardian`, the `guardian` deployment): health limits, the drain
    # policy and where alerts go.
    guardian_interval: float = Field(default=300.0, ge=10, le=86400,
                                     description="Seconds between cycles of `dispatch guardian` without --once.")
    guardian_drain_after: int = Field(default=3, ge=1, le=100,
                                      description="Drain a node failing a check this many cycles in a row.")
    guardian_min_disk_gb: float = Field(default=2.0, ge=0, description="Least free GiB under a node's run root.")
    guardian_max_load: float = Field(default=4.0, gt=0, description="Highest 1-minute load per CPU of a node.")
    guardian_min_memory_mb: float = Field(default=256.0, ge=0, description="Least MiB of available memory.")
    guardian_stuck_after: float = Field(
        default=600.0, ge=60, description="Crash a Running dispatcher flow run whose flow-run heartbeats (Prefect's "
        "`prefect.flow-run.heartbeat` events) stopped this many seconds ago.")
    guardian_worker_wait: float = Field(default=60.0, ge=0, le=600,
                                        description="Seconds to wait for a restarted worker's first heartbeat.")
    alert_block: str | None = Field(
        default=None, pattern=r"^[a-z0-9-]+/[A-Za-z0-9_.-]+$",
        description="The Prefect notification block the guardian alerts through, as `<block-type-slug>/<name>` "
        "(e.g. `custom-webhook/ops`, `slack-webhook/ops`); unset: alerts go to the log only.")

    # Drained nodes and `dispatch monitor` (issue #14)
    drain_refresh: float = Field(default=2.0, ge=0.1, le=300, description="Seconds between a running dispatcher's "
                                 "reads of the drained nodes (dispatch/core/drain.py), read in a background thread.")
    monitor_refresh: float = Field(default=2.0, ge=0.2, le=60, description="Seconds between two refreshes of "
                                   "`dispatch monitor`.")
    monitor_failures: int = Field(default=10, ge=1, le=200, description="Recent failed specs `dispatch monitor` "
                                  "lists.")

    @model_validator(mode="after")
    def _local_server_is_embedded(self) -> DispatchSettings:
        # PREFECT_API_URL set by us for our own local server is no team server
        if self.prefect_api_url and self.prefect_api_url == self.local_api_url:
            self.prefect_api_url = None
        return self

    @field_validator("home", "specs", "projects", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def specs_root_for(self, project: str) -> Path:
        """The spec directory of `project`: `<specs>/<project>`, else the bundled example of that name.

        The directory itself may be a symbolic link (e.g. to a repository's `specs/`); the spec files in
        it may not lead out of it (`dispatch.core.specs`).

        Raises:
            UnsafePath: `project` is no valid name (`../other`, `.`, `-x`, ...).
        """
        candidate = local_path(self.specs, check_name(project, "project name"), allow_link=True)
        if candidate.is_dir() or "specs" in self.model_fields_set:
            return candidate
        bundled = local_path(BUNDLED_EXAMPLES, project, allow_link=True) / "specs"
        return bundled if bundled.is_dir() else candidate

    def code_dir_for(self, project: str) -> Path:
        """The code directory of `project`: `<projects>/<project>` (may be a symbolic link to a checkout),
        else a scratch one under `home`.

        Raises:
            UnsafePath: `project` is no valid name.
        """
        candidate = local_path(self.projects, check_name(project, "project name"), allow_link=True)
        if candidate.is_dir() or "projects" in self.model_fields_set:
            return candidate
        return self.project_dir("workspaces", project)

    def home_path(self, *parts: str) -> Path:
        """`<home>/<part>/...`, proven inside `home` (symlinks resolved).

        Raises:
            UnsafePath: a part is no plain file name, or the path leads out of `home`.
        """
        return local_path(self.home, *parts, what="path under DISPATCH_HOME")

    def project_dir(self, area: str, project: str) -> Path:
        """`<home>/<area>/<project>` (area: runs, results, workspaces), the name checked, proven inside `home`.

        Raises:
            UnsafePath: `project` is no valid name, or the path leads out of `home`.
        """
        return self.home_path(area, check_name(project, "project name"))

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    @property
    def cache_dir(self) -> Path:
        """Prefect's persisted results (the cache)."""
        return self.home / "cache"

    @property
    def embedded(self) -> bool:
        """True when no Prefect server is configured: Prefect runs on SQLite under `home`."""
        return not self.prefect_api_url

    def secret_values(self) -> list[str]:
        """Every secret this process knows from its environment, to be masked wherever we write: the
        credentials of its environment (by name, `dispatch.core.secrets.credential_values`) and the Prefect
        API's auth string. None of them is given to a step."""
        from dispatch.core.secrets import credential_values

        values = credential_values(dict(os.environ))
        if self.prefect_api_auth_string is not None:
            values.append(self.prefect_api_auth_string.get_secret_value())
        return values

    def environment_key(self, name: str) -> str | None:
        """The value of this process's environment variable `name` (a model's key, e.g. ZAI_API_KEY), or
        None when unset or empty."""
        return os.environ.get(name) or None

    def prefect_environment(self, verbose: bool = False) -> dict[str, str]:
        """Environment to set before Prefect is imported, for this process and the runs it starts
        (and the directories it names, created).

        Embedded mode keeps Prefect's database under `home`, turns off the server's telemetry (this
        machine may have no network) and allows its first start (database migrations) to take a while.
        Results (the cache) live under `home/cache` in both modes.
        """
        # Prefect creates its home without parents: on a fresh machine DISPATCH_HOME does not exist yet.
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        env = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.cache_dir),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if self.embedded:
            env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
            if self.prefect_home is None:
                env["PREFECT_HOME"] = str(self.home / "prefect")
        if not verbose:
            env["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
            env["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
        return env


@lru_cache(maxsize=1)
def get_settings() -> DispatchSettings:
    """The process's settings (read once)."""
    return DispatchSettings()
