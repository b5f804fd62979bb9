"""Spec files: markdown with YAML front matter, in the format of the system we replace.

A spec is `S<digits>...md` or `P<digits>...md` in `$DISPATCH_SPECS/<project>/` (and `F<digits>...md`, the fix
specs the pipeline's L5 writes into a project's generated-spec directory). Other markdown there
(`SHARED_CONTEXT.md`, `CLAUDE.md`, ...) is context handed to agents and is never scheduled.

Parsing never raises for a bad file: it returns `SpecError`s, so that `validate` can report every
problem of a project at once. Spec files are hostile input: at most `MAX_SPEC_BYTES` are read, the front
matter is at most `MAX_FRONT_MATTER_BYTES` and may use no YAML aliases (a "billion laughs" expands without
bound), a file that is a symbolic link out of its directory is refused unread, the task id must be a name
(`dispatch.core.paths.NAME_PATTERN`), `modifies` entries must stay inside the repository, and every value quoted
in a message is cut (`dispatch.core.errors.cut`).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dispatch.core.errors import SpecError, UnsafePath, cut
from dispatch.core.model_catalog import BUILTIN_MODELS
from dispatch.core.model_catalog import model_variables as variables_of
from dispatch.core.paths import NAME_RULE, name_problem, read_bounded
from dispatch.core.safeload import AliasFound, parse_yaml

MAX_SPEC_BYTES = 1 << 20
"""A spec (or context) file larger than this is refused, and never read whole."""
MAX_FRONT_MATTER_BYTES = 64 << 10
"""A front matter larger than this is refused before it is parsed."""
MAX_FRONT_MATTER_DEPTH = 32
"""Nesting levels a front matter may use (its fields are lists and one mapping deep)."""

SPEC_NAME = re.compile(r"^[SPF]\d+.*\.md$")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$\n?", re.DOTALL | re.MULTILINE)
_FENCE = re.compile(r"^```[ \t]*(bash|sh|shell)[ \t]*\r?\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.MULTILINE)
_FENCE_OPEN = re.compile(r"^(`{3,}|~{3,})")
_CHECKBOX_COMMAND = re.compile(r"^\s*[-*]\s+\[[ xX]\]\s+.*?`([^`]+)`", re.MULTILINE)
_ACCEPTANCE_HEADING = re.compile(r"acceptance|验收", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?\s*$")

KINDS = ("agent", "shell")
_KNOWN_FIELDS = {
    "task_id", "project", "priority", "depends_on", "modifies", "exclusive", "executor",
    "model", "timeout", "retries", "node", "labels", "kind", "env", "verify",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ENV_MAX = 64  # variables a spec may set


@dataclass
class Spec:
    """One parsed spec.

    Attributes:
        task_id: unique id within the project (default: the file stem).
        path: the spec file.
        priority: 1 high, 2 default, 3 low.
        depends_on: ids (or unique prefixes, resolved by `dag.resolve`) this spec waits for.
        modifies: files, directories or globs the spec changes (its file locks).
        exclusive: runs with no other spec of its project.
        executor: the old system's single model name (`glm` by default).
        models: our fallback chain (`model:`), empty when the spec only gave `executor`.
        verify: the verifier chain (`verify:`): after the agent succeeds and the acceptance commands pass, the
            first of these models that answers reviews the change; a rejection fails the attempt.
        timeout: hard limit in seconds, None for the project default.
        retries: retries after the first attempt, None for the project default.
        env: environment variables for the spec's steps (not secrets: keys belong in AgentModel blocks).
        kind: `agent` (run the model chain) or `shell` (run the first fenced bash block).
        script: the shell block of a `shell` spec.
        acceptance: acceptance commands (checkbox lines with a command in backticks).
        extra: front-matter fields we do not know, kept as they were.
    """

    task_id: str
    path: Path
    body: str
    project: str | None = None
    priority: int = 2
    depends_on: list[str] = field(default_factory=list)
    modifies: list[str] = field(default_factory=list)
    exclusive: bool = False
    executor: str = "glm"
    models: list[str] = field(default_factory=list)
    verify: list[str] = field(default_factory=list)
    timeout: float | None = None
    retries: int | None = None
    node: str | None = None
    labels: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "agent"
    script: str | None = None
    acceptance: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""

    @property
    def model_chain(self) -> list[str]:
        """The models to try in order: `model:` if given, else `executor`."""
        return self.models or [self.executor]


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


def model_env_errors(specs: Iterable[Spec], model_variables: Iterable[str]) -> list[SpecError]:
    """An `env` error for each spec whose `env:` sets a configured model's variable (known once the run has
    read the AgentModel blocks; `parse_spec` already refused the protected names)."""
    models = set(model_variables)
    return [SpecError(str(spec.path), "env", problem) for spec in specs
            if spec.env and (problem := env_problem(spec.env, models))]


def _env(value: Any) -> tuple[dict[str, str], str | None]:
    """`env:` as {NAME: text}, or why it is wrong. Scalars become text; `env_problem` names are refused."""
    if value is None:
        return {}, None
    if not isinstance(value, dict):
        return {}, f"must be a mapping of variable names to values (env: {{APP_ENV: test}}), got {cut(value)}"
    if len(value) > _ENV_MAX:
        return {}, f"sets {len(value)} variables; at most {_ENV_MAX}"
    env = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            return {}, f"{cut(name)} is not a variable name (letters, digits and _, not starting with a digit)"
        if isinstance(item, dict | list) or item is None or (isinstance(item, str) and "\0" in item):
            return {}, f"{name} must be a text, number or true/false, got {cut(item)}"
        env[name] = str(item).lower() if isinstance(item, bool) else str(item)
    if problem := env_problem(env):
        return {}, problem
    return env, None


def is_spec_file(path: Path) -> bool:
    """Whether `path` is a schedulable spec by the old system's naming rule."""
    return bool(SPEC_NAME.match(path.name))


MAX_DURATION = 7 * 24 * 3600.0
"""The longest duration `parse_duration` accepts (a week): beyond it a timeout overflows dates and timers."""


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


def _string_list(value: Any) -> list[str] | None:
    """A list of strings; a lone string is a one-item list; None when the type is wrong."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    return None


_AliasFound = AliasFound


def _load_yaml(text: str) -> Any:
    """The front matter's data (dispatch/core/safeload.py: no alias, bounded depth, checked before it is built).

    Raises:
        AliasFound: it uses an alias.
        yaml.YAMLError: it is no YAML, nests too deep, or holds a value that cannot be built.
    """
    return parse_yaml(text, "front matter", max_depth=MAX_FRONT_MATTER_DEPTH)


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


def fence_closes(stripped: str, fence: str) -> bool:
    """Whether a line (stripped of its indent) closes a code block opened by `fence` (e.g. "````")."""
    return re.fullmatch(re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*", stripped) is not None


def _acceptance_commands(body: str) -> list[str]:
    """Checkbox commands under an acceptance heading (English or Chinese), sub-headings included.

    Lines inside fenced code blocks are neither headings nor checkboxes; a fence is closed only by a run of
    its character at least as long (CommonMark), so a block can quote ``` lines.
    """
    commands: list[str] = []
    fence: str | None = None
    level: int | None = None  # the acceptance heading's level while inside its section
    for line in body.splitlines():
        stripped = line.lstrip()
        if fence is not None:
            if fence_closes(stripped, fence):
                fence = None
            continue
        if opened := _FENCE_OPEN.match(stripped):
            fence = opened.group(1)
            continue
        heading = _HEADING.match(line)
        if heading:
            depth = len(line) - len(line.lstrip("#"))
            if level is not None and depth <= level:
                level = None
            if level is None and _ACCEPTANCE_HEADING.search(heading.group(1)):
                level = depth
            continue
        if level is not None and (checkbox := _CHECKBOX_COMMAND.match(line)):
            commands.append(checkbox.group(1).strip())
    return commands


def parse_spec(path: Path) -> tuple[Spec | None, list[SpecError]]:
    """Parse one spec file.

    Args:
        path: the markdown file.

    Returns:
        The spec (None when it cannot be used at all) and every problem found in it.
    """
    errors: list[SpecError] = []

    def error(field_name: str, message: str) -> None:
        errors.append(SpecError(str(path), field_name, message))

    try:
        raw = read_bounded(path.parent, path, MAX_SPEC_BYTES)
    except UnsafePath as exc:
        error("file", exc.problem)
        return None, errors
    except OSError as exc:
        error("file", f"cannot read it: {exc.strerror or exc}; check its permissions")
        return None, errors
    if len(raw) > MAX_SPEC_BYTES:
        error("file", f"is larger than {MAX_SPEC_BYTES >> 20} MiB; a spec is instructions for an agent: "
                      "keep data it needs in the repository")
        return None, errors
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        error("file", f"is not UTF-8 (byte {exc.start}); save it as UTF-8")
        return None, errors
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")

    meta: dict[str, Any] = {}
    body = text
    match = _FRONT_MATTER.match(text)
    if match:
        body = text[match.end():]
        if len(match.group(1).encode()) > MAX_FRONT_MATTER_BYTES:
            error("front matter", f"is larger than {MAX_FRONT_MATTER_BYTES >> 10} KiB; keep it to the fields "
                                  "(task_id, depends_on, modifies, ...) and put the rest in the body")
            return None, errors
        try:
            loaded = _load_yaml(match.group(1))
        except _AliasFound:
            error("front matter", "uses a YAML alias (*name, or a merge key <<: *name); aliases are refused "
                                  "because they can expand without bound: write the values out")
            return None, errors
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 2}" if mark is not None else ""
            problem = str(getattr(exc, "problem", None) or exc)[:200]
            error("front matter", f"bad YAML{where}: {problem}; fix the YAML between the --- lines")
            return None, errors
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            error("front matter", "must be a YAML mapping of fields (task_id: ..., depends_on: [...])")
            return None, errors
        meta = loaded
    elif text.startswith("---"):
        error("front matter", "starts with --- but has no closing --- line; close the front matter")
        return None, errors

    task_id = meta.get("task_id", path.stem)
    if not isinstance(task_id, str | int) or isinstance(task_id, bool) or not str(task_id).strip():
        error("task_id", f"must be a non-empty string, got {cut(task_id)}")
        task_id = path.stem
    elif (problem := name_problem(str(task_id).strip())) and "task_id" in meta:
        error("task_id", f"{cut(str(task_id).strip())} {problem}; {NAME_RULE}")
    elif problem:
        error("task_id", f"the file name gives the id {cut(task_id)}, which {problem}; rename the file or set "
                         f"task_id ({NAME_RULE})")
    spec = Spec(task_id=str(task_id).strip(), path=path, body=body)

    project = meta.get("project")
    if project is not None and not isinstance(project, str):
        error("project", f"must be a string, got {cut(project)}")
    else:
        spec.project = project

    priority = meta.get("priority", 2)
    if isinstance(priority, bool) or priority not in (1, 2, 3):
        error("priority", f"must be 1 (high), 2 (default) or 3 (low), got {cut(priority)}")
    else:
        spec.priority = int(priority)

    for name in ("depends_on", "modifies", "labels"):
        items = _string_list(meta.get(name))
        if items is None:
            error(name, f"must be a list of strings (or one string), got {cut(meta.get(name))}")
        else:
            setattr(spec, name, [item.strip() for item in items])
    for entry in spec.modifies:
        if problem := modifies_problem(entry):
            error("modifies", f"entry {cut(entry)} {problem}; list files, directories or globs relative to the "
                              "repository's root (e.g. src/api.py, docs/, src/**/*.py)")

    exclusive = meta.get("exclusive", False)
    if not isinstance(exclusive, bool):
        error("exclusive", f"must be true or false, got {cut(exclusive)}")
    else:
        spec.exclusive = exclusive

    executor = meta.get("executor", "glm")
    if not isinstance(executor, str) or not executor.strip():
        error("executor", f"must be a model name such as glm, codex or claude, got {cut(executor)}")
    else:
        spec.executor = executor.strip()

    models = _string_list(meta.get("model"))
    if models is None:
        error("model", "must be a model name or a list (e.g. [glm, minimax, claude]), "
                       f"got {cut(meta.get('model'))}")
    else:
        spec.models = models

    verify = _string_list(meta.get("verify"))
    if verify is None:
        error("verify", f"must be a model name or a list (e.g. [codex]), got {cut(meta.get('verify'))}")
    else:
        spec.verify = [name.strip() for name in verify]

    if meta.get("timeout") is not None:
        try:
            spec.timeout = parse_duration(meta["timeout"])
        except ValueError:
            error("timeout", f"must be a duration such as 45m, 1h30m or 90s, at most 168h (a week), "
                             f"got {cut(meta['timeout'])}")

    retries = meta.get("retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            error("retries", f"must be a whole number from 0 to 20, got {cut(retries)}")
        else:
            spec.retries = retries

    node = meta.get("node")
    if node is not None and (not isinstance(node, str) or not node.strip()):
        error("node", f"must be a node name, got {cut(node)}")
    else:
        spec.node = node

    env, problem = _env(meta.get("env"))
    if problem:
        error("env", problem)
    else:
        spec.env = env

    kind = meta.get("kind", "agent")
    if kind not in KINDS:
        error("kind", f"must be one of {', '.join(KINDS)}, got {cut(kind)}")
    else:
        spec.kind = kind

    if not body.strip():
        error("body", "is empty; describe the goal, changes and acceptance criteria below the front matter")
    if spec.kind == "shell":
        fence = _FENCE.search(body)
        if fence is None or not fence.group(2).strip():
            error("body", "a kind: shell spec needs a fenced ```bash code block with the commands to run")
        else:
            spec.script = fence.group(2)
    spec.acceptance = _acceptance_commands(body)
    spec.extra = {k: v for k, v in meta.items() if k not in _KNOWN_FIELDS}
    spec.content_hash = hashlib.sha256(raw).hexdigest()
    return spec, errors


def spec_files(directory: Path) -> list[Path]:
    """The spec files of a project directory, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and is_spec_file(p))


def context_files(directory: Path) -> list[Path]:
    """Markdown in the project directory that is context for agents, not a spec."""
    return sorted(p for p in directory.glob("*.md") if p.is_file() and not is_spec_file(p))


def context_problem(path: Path) -> SpecError | None:
    """Why a context file cannot be handed to agents (a link out of its directory, over 1 MiB), or None."""
    try:
        size = len(read_bounded(path.parent, path, MAX_SPEC_BYTES))
    except UnsafePath as exc:
        return SpecError(str(path), "file", exc.problem)
    except OSError as exc:
        return SpecError(str(path), "file", f"cannot read it: {exc.strerror or exc}; check its permissions")
    if size > MAX_SPEC_BYTES:
        return SpecError(str(path), "file", f"is larger than {MAX_SPEC_BYTES >> 20} MiB; agents get it whole "
                                            "as context: shorten it")
    return None
