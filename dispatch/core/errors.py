"""The domain's exceptions, shaped like paramiko's (one base, a few precise kinds).

Every message says what went wrong and what to do about it.
"""

from __future__ import annotations

import reprlib

_CUT = 80
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 10
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = _CUT + 10


def cut(value: object, limit: int = _CUT) -> str:
    """`repr(value)` for a message: at most `limit` characters, then "…".

    Never builds the whole repr of a huge value first (a YAML bomb's expansion, a 1 MiB string): strings
    are cut before quoting, containers are shown a few items and levels deep.

    Examples:
        >>> cut("S01-setup")
        "'S01-setup'"
        >>> cut("x" * 1000)[-3:]
        'xx…'
    """
    try:
        text = repr(value[:limit + 1]) if isinstance(value, str) else _REPR.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit] + "…"


class DispatchError(Exception):
    """Base of every error Oyster Dispatch raises on purpose."""


class ConfigError(DispatchError):
    """A settings value, `nodes.json`, `projects.json` or block is wrong."""


class UnsafePath(ConfigError):
    """A name or path was refused because it could lead out of its root (or is not a plain name).

    Args:
        what: what the value is ("task_id", "project name", "path", ...).
        value: the refused value (quoted, cut, in the message).
        problem: what is wrong with it and what to do.
    """

    def __init__(self, what: str, value: object, problem: str) -> None:
        self.what = what
        self.value = value
        self.problem = problem
        super().__init__(f"{what} {cut(value)} {problem}")


class SpecError(DispatchError):
    """One problem with one spec file, naming the file and the field.

    Args:
        path: the spec file (or project directory) the problem is in.
        field: the front-matter field or part of the file at fault ("depends_on", "body", ...).
        message: what is wrong and how to fix it.
    """

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = str(path)
        self.field = field
        self.message = message
        super().__init__(f"{self.path}: {field}: {message}")


class ProjectInvalid(DispatchError):
    """A project has one or more `SpecError`s; nothing of it may run."""

    def __init__(self, project: str, errors: list[SpecError]) -> None:
        self.project = project
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"project {cut(project)} is invalid ({len(errors)} error(s)); nothing was scheduled:\n{lines}")


class NodeError(DispatchError):
    """A node cannot be reached or used; the spec should move to another node."""

    def __init__(self, node: str, message: str) -> None:
        self.node = node
        super().__init__(f"node {node}: {message}")


class RemoteCommandFailed(DispatchError):
    """A command on a node exited non-zero (like Invoke's `UnexpectedExit`).

    Args:
        host: the node or host the command ran on.
        command: the command line.
        exit_code: its exit status.
        stderr_tail: the last lines of its standard error.
    """

    def __init__(self, host: str, command: str, exit_code: int, stderr_tail: str = "") -> None:
        self.host = host
        self.command = command
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        tail = f"\n--- stderr (tail) ---\n{stderr_tail}" if stderr_tail else ""
        super().__init__(f"{host}: command exited {exit_code}: {command}{tail}")


class RateLimited(DispatchError):
    """An agent model is rate-limited or out of quota.

    Args:
        model: the model's name (glm, minimax, claude, codex, ...).
        kind: "transient" (retry in seconds) or "quota" (cool down until `reset_at`).
        reset_at: Unix time when the limit resets, when the provider said.
    """

    def __init__(self, model: str, kind: str, reset_at: float | None = None, message: str = "") -> None:
        self.model = model
        self.kind = kind
        self.reset_at = reset_at
        super().__init__(f"model {model} is rate-limited ({kind}){': ' + message if message else ''}")
