"""A spec's front matter as a pydantic model: each field checked, with the message a spec's author reads.

`FrontMatter.model_validate(fields)` checks the YAML mapping of a spec (`dispatch.core.specs.parse_spec`
reads the file, bounds it and parses the YAML first). Each field's validator does what the field allows and
nothing else (true is no number, a lone string is a one-item list, `45m` is 2700 seconds) and raises
`dispatch.core.validation.invalid` with our words; `front_matter` returns every problem at once and, for a spec
with bad fields, the rest of its fields with the bad ones at their defaults. One model per spec, so 5,000 specs
validate in a few tens of milliseconds (bench/scale.py).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from dispatch.core.errors import cut
from dispatch.core.model_catalog import BUILTIN_MODELS
from dispatch.core.model_catalog import model_variables as variables_of
from dispatch.core.paths import NAME_RULE, name_problem
from dispatch.core.validation import invalid, problems

KINDS = ("agent", "shell")
MAX_DURATION = 7 * 24 * 3600.0
"""The longest duration `parse_duration` accepts (a week): beyond it a timeout overflows dates and timers."""
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?\s*$")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ENV_MAX = 64  # variables a spec may set


def parse_duration(value: Any, maximum: float = MAX_DURATION) -> float:
    """Parse `45m`, `1h30m`, `90s`, `90` (seconds) into seconds.

    Raises:
        ValueError: when the value is not a positive duration of at most `maximum` seconds.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match or not any(match.groups()):
            raise ValueError(value)
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not 0 < seconds <= maximum:  # also rejects NaN and infinity
        raise ValueError(value)
    return seconds


def modifies_problem(entry: str) -> str | None:
    """Why a `modifies` entry is no pattern inside the repository, or None when it is one.

    Entries are relative: not absolute, not under `~`, not climbing out with `..` (`src/../lib` is fine),
    not empty. Backslashes count as `/`, as the lock table reads them.
    """
    path = entry.strip().replace("\\", "/")
    if not path:
        return "is empty"
    if "\0" in path:
        return "holds a NUL character"
    if path.startswith("/"):
        return "is an absolute path"
    if path.startswith("~"):
        return "starts with '~' (a home directory)"
    if posixpath.normpath(path).split("/", 1)[0] == "..":
        return "climbs out of the repository with '..'"
    return None


def env_problem(names: Iterable[str], model_variables: Iterable[str] = ()) -> str | None:
    """Why a spec's `env:` may not set these names, or None.

    Refused: DISPATCH_* (ours), what decides which program runs or where an agent sends its key
    (`runner.task.protected_env`: the one list, which the runner applies too; suffixes such as `*_BASE_URL`
    and `*_TOKEN` in any case, since some tools read lower-case variants), and the variables of the built-in
    models and of `model_variables` (the configured models', `dispatch.core.model_catalog.model_variables`).
    """
    # imported here: the runner module takes 50-100 ms to import and most specs set no env
    from dispatch.runner.task import protected_env

    names, models = list(names), {*model_variables, *variables_of(BUILTIN_MODELS)}
    if ours := [name for name in names if name.startswith("DISPATCH_")]:
        return f"{_names(ours)}: DISPATCH_* variables are set by the dispatcher; use another name"
    if refused := [name for name in names if protected_env(name) or name in models]:
        return (f"may not set {_names(refused)}: these decide which program runs or where an agent sends its "
                "key; set endpoints and keys in the model's settings: dispatch models / AgentModel (and PATH in "
                "the node's env)")
    return None


def _names(names: list[str], shown: int = 8) -> str:
    """Names for a message: the first `shown` of them (each at most 128 characters), then how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _string_list(value: Any) -> list[str] | None:
    """A list of strings; a lone string is a one-item list; None when the type is wrong."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    return None


def _strings(value: Any, message: str) -> list[str]:
    """`_string_list(value)`, stripped, or the error "<message>, got <value>"."""
    items = _string_list(value)
    if items is None:
        raise invalid(f"{message}, got {cut(value)}")
    return [item.strip() for item in items]


def _modifies_entry(entry: str) -> str:
    if problem := modifies_problem(entry):
        raise invalid(f"entry {cut(entry)} {problem}; list files, directories or globs relative to the "
                      "repository's root (e.g. src/api.py, docs/, src/**/*.py)", "modifies")
    return entry


class FrontMatter(BaseModel):
    """The fields of a spec's front matter, as `dispatch.core.specs.Spec` holds them (see its attributes).

    `task_id` is None when the front matter has none (the file name gives it). Fields we do not know are
    not part of the model: `parse_spec` keeps them in `Spec.extra`.
    """

    model_config = ConfigDict(extra="ignore")

    task_id: str | None = None
    project: str | None = None
    priority: int = 2
    depends_on: list[str] = Field(default_factory=list)
    modifies: list[Annotated[str, AfterValidator(_modifies_entry)]] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    exclusive: bool = False
    executor: str = "glm"
    models: list[str] = Field(default_factory=list, alias="model")
    verify: list[str] = Field(default_factory=list)
    timeout: float | None = None
    retries: int | None = None
    node: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    kind: str = "agent"

    @field_validator("task_id", mode="plain")
    @classmethod
    def _task_id(cls, value: Any) -> str:
        if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
            raise invalid(f"must be a non-empty string, got {cut(value)}")
        if problem := name_problem(task_id := str(value).strip()):
            raise invalid(f"{cut(task_id)} {problem}; {NAME_RULE}")
        return task_id

    @field_validator("project", mode="plain")
    @classmethod
    def _project(cls, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise invalid(f"must be a string, got {cut(value)}")
        return value

    @field_validator("priority", mode="plain")
    @classmethod
    def _priority(cls, value: Any) -> int:
        if isinstance(value, bool) or value not in (1, 2, 3):
            raise invalid(f"must be 1 (high), 2 (default) or 3 (low), got {cut(value)}")
        return int(value)

    @field_validator("depends_on", "modifies", "labels", mode="before")
    @classmethod
    def _list(cls, value: Any) -> list[str]:
        return _strings(value, "must be a list of strings (or one string)")

    @field_validator("exclusive", mode="plain")
    @classmethod
    def _exclusive(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise invalid(f"must be true or false, got {cut(value)}")
        return value

    @field_validator("executor", mode="plain")
    @classmethod
    def _executor(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise invalid(f"must be a model name such as glm, codex or claude, got {cut(value)}")
        return value.strip()

    @field_validator("models", mode="plain")
    @classmethod
    def _models(cls, value: Any) -> list[str]:
        if (items := _string_list(value)) is None:  # not stripped: as the old system read `model:`
            raise invalid(f"must be a model name or a list (e.g. [glm, minimax, claude]), got {cut(value)}")
        return items

    @field_validator("verify", mode="plain")
    @classmethod
    def _verify(cls, value: Any) -> list[str]:
        return _strings(value, "must be a model name or a list (e.g. [codex])")

    @field_validator("timeout", mode="plain")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        try:
            return None if value is None else parse_duration(value)
        except ValueError:
            raise invalid(f"must be a duration such as 45m, 1h30m or 90s, at most 168h (a week), "
                          f"got {cut(value)}") from None

    @field_validator("retries", mode="plain")
    @classmethod
    def _retries(cls, value: Any) -> int | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
            raise invalid(f"must be a whole number from 0 to 20, got {cut(value)}")
        return value

    @field_validator("node", mode="plain")
    @classmethod
    def _node(cls, value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise invalid(f"must be a node name, got {cut(value)}")
        return value

    @field_validator("env", mode="plain")
    @classmethod
    def _env(cls, value: Any) -> dict[str, str]:
        """{NAME: text}: scalars become text; `env_problem` names are refused."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise invalid(f"must be a mapping of variable names to values (env: {{APP_ENV: test}}), "
                          f"got {cut(value)}")
        if len(value) > _ENV_MAX:
            raise invalid(f"sets {len(value)} variables; at most {_ENV_MAX}")
        env = {}
        for name, item in value.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise invalid(f"{cut(name)} is not a variable name (letters, digits and _, not starting with a "
                              "digit)")
            if isinstance(item, dict | list) or item is None or (isinstance(item, str) and "\0" in item):
                raise invalid(f"{name} must be a text, number or true/false, got {cut(item)}")
            env[name] = str(item).lower() if isinstance(item, bool) else str(item)
        if problem := env_problem(env):
            raise invalid(problem)
        return env

    @field_validator("kind", mode="plain")
    @classmethod
    def _kind(cls, value: Any) -> str:
        if value not in KINDS:
            raise invalid(f"must be one of {', '.join(KINDS)}, got {cut(value)}")
        return value


def front_matter(fields: dict[str, Any]) -> tuple[FrontMatter, list[tuple[str, str]]]:
    """The front matter's fields validated, and every (field, message) problem found.

    A bad field takes its default (a bad `task_id` that is a string is kept, for the duplicate checks) so
    that the caller can still report what depends on the rest.
    """
    try:
        return FrontMatter.model_validate(fields), []
    except ValidationError as exc:
        found = problems(exc)
        bad = {field for field, _ in found}
        kept = FrontMatter.model_validate({key: value for key, value in fields.items() if key not in bad})
        if "task_id" in bad and (task_id := fields["task_id"]) is not None:
            if isinstance(task_id, str | int) and not isinstance(task_id, bool) and str(task_id).strip():
                kept.task_id = str(task_id).strip()
        return kept, found
