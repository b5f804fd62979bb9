"""Spec files: markdown with YAML front matter, in the format of the system we replace.

A spec is `S<digits>...md` or `P<digits>...md` in `$DISPATCH_SPECS/<project>/` (and `F<digits>...md`, the fix
specs the pipeline's L5 writes into a project's generated-spec directory). Other markdown there
(`SHARED_CONTEXT.md`, `CLAUDE.md`, ...) is context handed to agents and is never scheduled.

Parsing never raises for a bad file: it returns `SpecError`s, so that `validate` can report every
problem of a project at once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dispatch.errors import SpecError

# libyaml's loader when PyYAML has it (88% of parsing time in pure Python; 5,000 specs: 7.3 s -> 2.9 s).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
    "model", "timeout", "retries", "node", "labels", "kind", "verify",
}


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
    kind: str = "agent"
    script: str | None = None
    acceptance: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""

    @property
    def model_chain(self) -> list[str]:
        """The models to try in order: `model:` if given, else `executor`."""
        return self.models or [self.executor]


def is_spec_file(path: Path) -> bool:
    """Whether `path` is a schedulable spec by the old system's naming rule."""
    return bool(SPEC_NAME.match(path.name))


def parse_duration(value: Any) -> float:
    """Parse `45m`, `1h30m`, `90s`, `90` (seconds) into seconds.

    Raises:
        ValueError: when the value is not a positive duration.
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
    if not 0 < seconds < float("inf"):  # also rejects NaN
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
        raw = path.read_bytes()
    except OSError as exc:
        error("file", f"cannot read it: {exc.strerror or exc}; check its permissions")
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
        try:
            loaded = yaml.load(match.group(1), Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 2}" if mark is not None else ""
            problem = getattr(exc, "problem", exc)
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
        error("task_id", f"must be a non-empty string, got {task_id!r}")
        task_id = path.stem
    spec = Spec(task_id=str(task_id).strip(), path=path, body=body)

    project = meta.get("project")
    if project is not None and not isinstance(project, str):
        error("project", f"must be a string, got {project!r}")
    else:
        spec.project = project

    priority = meta.get("priority", 2)
    if isinstance(priority, bool) or priority not in (1, 2, 3):
        error("priority", f"must be 1 (high), 2 (default) or 3 (low), got {priority!r}")
    else:
        spec.priority = int(priority)

    for name in ("depends_on", "modifies", "labels"):
        items = _string_list(meta.get(name))
        if items is None:
            error(name, f"must be a list of strings (or one string), got {meta.get(name)!r}")
        else:
            setattr(spec, name, [item.strip() for item in items])

    exclusive = meta.get("exclusive", False)
    if not isinstance(exclusive, bool):
        error("exclusive", f"must be true or false, got {exclusive!r}")
    else:
        spec.exclusive = exclusive

    executor = meta.get("executor", "glm")
    if not isinstance(executor, str) or not executor.strip():
        error("executor", f"must be a model name such as glm, codex or claude, got {executor!r}")
    else:
        spec.executor = executor.strip()

    models = _string_list(meta.get("model"))
    if models is None:
        error("model", f"must be a model name or a list (e.g. [glm, minimax, claude]), got {meta.get('model')!r}")
    else:
        spec.models = models

    verify = _string_list(meta.get("verify"))
    if verify is None:
        error("verify", f"must be a model name or a list (e.g. [codex]), got {repr(meta.get('verify'))[:80]}")
    else:
        spec.verify = [name.strip() for name in verify]

    if meta.get("timeout") is not None:
        try:
            spec.timeout = parse_duration(meta["timeout"])
        except ValueError:
            error("timeout", f"must be a duration such as 45m, 1h30m or 90s, got {meta['timeout']!r}")

    retries = meta.get("retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            error("retries", f"must be a whole number from 0 to 20, got {retries!r}")
        else:
            spec.retries = retries

    node = meta.get("node")
    if node is not None and (not isinstance(node, str) or not node.strip()):
        error("node", f"must be a node name, got {node!r}")
    else:
        spec.node = node

    kind = meta.get("kind", "agent")
    if kind not in KINDS:
        error("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
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
