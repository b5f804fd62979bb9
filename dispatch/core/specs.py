"""Spec files: markdown with YAML front matter, in the format of the system we replace.

A spec is `S<digits>...md` or `P<digits>...md` in `$DISPATCH_SPECS/<project>/` (and `F<digits>...md`, the fix
specs the pipeline's L5 writes into a project's generated-spec directory). Other markdown there
(`SHARED_CONTEXT.md`, `CLAUDE.md`, ...) is context handed to agents and is never scheduled.

Parsing never raises for a bad file: it returns `SpecError`s, so that `validate` can report every
problem of a project at once. Spec files are hostile input: at most `MAX_SPEC_BYTES` are read, the front
matter is at most `MAX_FRONT_MATTER_BYTES` and may use no YAML aliases (a "billion laughs" expands without
bound), a file that is a symbolic link out of its directory is refused unread, the task id must be a name
(`dispatch.core.paths.NAME_PATTERN`), `modifies` entries must stay inside the repository, and every value quoted
in a message is cut (`dispatch.core.errors.cut`). The front matter's fields are checked by one pydantic model,
`dispatch.core.front_matter.FrontMatter`; this module reads the file, its YAML and its body.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dispatch.core.errors import SpecError, UnsafePath, cut
from dispatch.core.front_matter import (
    KINDS,
    MAX_DURATION,
    FrontMatter,
    env_problem,
    front_matter,
    modifies_problem,
    parse_duration,
)
from dispatch.core.paths import NAME_RULE, name_problem, read_bounded
from dispatch.core.safeload import AliasFound, parse_yaml

__all__ = [  # the front matter's checks live in dispatch/core/front_matter.py; these stay importable from here
    "KINDS", "MAX_DURATION", "Spec", "context_files", "context_problem", "env_problem", "fence_closes",
    "is_spec_file", "model_env_errors", "modifies_problem", "parse_duration", "parse_spec", "spec_files",
]

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

_KNOWN_FIELDS = {info.alias or name for name, info in FrontMatter.model_fields.items()}


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


def model_env_errors(specs: Iterable[Spec], model_variables: Iterable[str]) -> list[SpecError]:
    """An `env` error for each spec whose `env:` sets a configured model's variable (known once the run has
    read the AgentModel blocks; `parse_spec` already refused the protected names)."""
    models = set(model_variables)
    return [SpecError(str(spec.path), "env", problem) for spec in specs
            if spec.env and (problem := env_problem(spec.env, models))]


def is_spec_file(path: Path) -> bool:
    """Whether `path` is a schedulable spec by the old system's naming rule."""
    return bool(SPEC_NAME.match(path.name))


_AliasFound = AliasFound


def _load_yaml(text: str) -> Any:
    """The front matter's data (dispatch/core/safeload.py: no alias, bounded depth, checked before it is built).

    Raises:
        AliasFound: it uses an alias.
        yaml.YAMLError: it is no YAML, nests too deep, or holds a value that cannot be built.
    """
    return parse_yaml(text, "front matter", max_depth=MAX_FRONT_MATTER_DEPTH)


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

    fields, problems = front_matter(meta)
    task_id = fields.task_id or path.stem
    if "task_id" not in meta and (problem := name_problem(task_id)):
        error("task_id", f"the file name gives the id {cut(task_id)}, which {problem}; rename the file or set "
                         f"task_id ({NAME_RULE})")
    errors += [SpecError(str(path), field_name, message) for field_name, message in problems]
    spec = Spec(path=path, body=body, **{**fields.__dict__, "task_id": task_id})  # __dict__: 4x faster than dict()

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
