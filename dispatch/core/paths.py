"""Names and paths: every path we create, write, read from specs, or delete is built here, and proven safe.

Task ids and project names match one pattern, `NAME_PATTERN`: ASCII letters, digits, `.`, `_` and `-`, not
starting with `.` (no hidden files, no `.` or `..`) or `-` (it would read as an option), at most 100
characters. They become directory names here and on nodes, branch names, and Prefect task run names.

- `local_path(root, *parts)`: `root/part/...` on this machine; each part one plain component, and the
  result, symlinks resolved, inside `root` (else `UnsafePath`).
- `remote_path(root, *parts)` / `remote_arg(...)`: the same on a node, where we cannot resolve: each part
  one plain component (no `/`, not `.` or `..`), the root free of `..`; `remote_arg` is one shell word.
- `contained(root, path)`: the same proof for a path someone else built (a request from the dispatcher).
- `read_bounded(root, path, limit)`: at most `limit + 1` bytes of a regular file that resolves inside
  `root`: a spec or context file that is a symbolic link out of its spec directory is refused.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
from pathlib import Path

from dispatch.core.errors import UnsafePath

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}"
"""Task ids and project names (a full match): letters, digits, `.`, `_`, `-`; no leading `.` or `-`; 1-100."""

MAX_NAME = 100
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]*")
NAME_RULE = "use letters, digits, '.', '_' and '-' only, not starting with '.' or '-', at most 100 characters"
"""The rule of `NAME_PATTERN` as a user reads it in an error message."""
_MAX_COMPONENT_BYTES = 255  # NAME_MAX of Linux file systems


def name_problem(value: object) -> str | None:
    """Why `value` is no valid task id or project name, or None when it is one."""
    if not isinstance(value, str) or not value:
        return "is empty"
    if len(value) > MAX_NAME:
        return f"is {len(value)} characters long; at most {MAX_NAME} are allowed"
    if not _NAME_CHARS.fullmatch(value):
        bad = sorted({c for c in value if not _NAME_CHARS.fullmatch(c)})
        return "holds " + ", ".join(repr(c) for c in bad[:5])
    if value[0] == ".":
        return "starts with '.'"
    if value[0] == "-":
        return "starts with '-' (it would read as an option)"
    return None


def check_name(value: str, what: str) -> str:
    """`value` itself when it is a valid task id or project name.

    Args:
        value: the name.
        what: what it names, for the message ("task_id", "project name").

    Raises:
        UnsafePath: naming `what`, the value (cut) and the pattern.
    """
    problem = name_problem(value)
    if problem:
        raise UnsafePath(what, value, f"{problem}; {NAME_RULE}")
    return value


def run_dir_parts(project: str, task_id: str) -> tuple[str, str, str]:
    """The parts of a spec's run directory under a run root: `(<project>, "tasks", <task_id>)`, checked.

    Raises:
        UnsafePath: when the project or the task id is no valid name.
    """
    return check_name(project, "project name"), "tasks", check_name(task_id, "task_id")


def _component_problem(part: object) -> str | None:
    if not isinstance(part, str) or not part:
        return "is empty"
    if part in (".", ".."):
        return "is '.' or '..'"
    if "/" in part:
        return "holds '/'"
    if any(c in part for c in "\0\n\r"):
        return "holds a NUL or line break"
    if len(part.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT_BYTES:
        return f"is longer than {_MAX_COMPONENT_BYTES} bytes"
    return None


def _check_components(parts: tuple[str, ...], what: str) -> None:
    for part in parts:
        if problem := _component_problem(part):
            raise UnsafePath(what, part, f"{problem}: each part of a path must be one plain file name")


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a component we may not read
        raise UnsafePath(what, str(path), f"cannot be resolved ({exc}); remove the symbolic link loop") from exc


def local_path(root: Path, *parts: str, allow_link: bool = False, what: str = "path") -> Path:
    """`root/part/...`, proven to stay inside `root` on this machine.

    Args:
        root: the directory the path must stay in (itself may be a symbolic link).
        parts: plain file names (no `/`, not `.` or `..`).
        allow_link: the last part may be a symbolic link to anywhere (a project's spec or code directory
            linked into DISPATCH_SPECS / DISPATCH_PROJECTS); everything above it must stay inside.
        what: what the path is, for the message.

    Returns:
        The joined path (not resolved).

    Raises:
        UnsafePath: a part is not a plain name, or the path resolves (symlinks followed) outside `root`.
    """
    _check_components(parts, what)
    path = root.joinpath(*parts)
    if not parts:
        return path
    base = _resolve(root, what)
    resolved = _resolve(path.parent if allow_link else path, what)
    inside = resolved.is_relative_to(base) and (allow_link or resolved != base)
    if not inside:
        raise UnsafePath(what, str(path), f"leads outside {root} (to {resolved}) through a symbolic link; "
                                          "remove the link or point it inside")
    return path


def contained(root: Path, path: Path, what: str = "path") -> Path:
    """`path` (absolute, or relative to the working directory) when it lies inside `root`, proven as by
    `local_path`: written under `root` without `..`, and inside it with symlinks resolved.

    Raises:
        UnsafePath: `path` is not under `root`, climbs with `..`, or leads out through a symbolic link.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise UnsafePath(what, str(path), f"is not under {root}") from None
    return local_path(root, *parts, what=what)


def within(root: Path, relative: str, what: str = "path") -> Path:
    """`root/relative` (a relative path that may hold `/`, as a configuration gives it), resolved and proven
    inside `root`: not absolute, no `..` out of it, no symbolic link out of it.

    Raises:
        UnsafePath: it would lead outside `root`, or is no usable path.
    """
    if not isinstance(relative, str) or "\0" in relative or len(relative) > 4096:
        raise UnsafePath(what, str(relative)[:200], "is no usable path")
    base = _resolve(root, what)
    target = _resolve(base / relative, what)
    if not target.is_relative_to(base):
        raise UnsafePath(what, relative, f"leads outside {root}; give a path inside it")
    return target


def _check_remote_root(root: str) -> None:
    if not root or any(c in root for c in "\0\n\r") or ".." in root.split("/"):
        raise UnsafePath("node run root", root, "must be a directory without '..' (e.g. 'dispatch' or "
                                                "'/srv/dispatch'); fix remote_root in nodes.json")


def remote_path(root: str, *parts: str) -> str:
    """`root/part/...` on a node: the root free of `..`, each part one plain file name.

    Nothing on the node is resolved (we cannot, before running a command there): a part can neither climb
    (`..`) nor hold a `/`, so the path stays under `root`. Relative roots are under the login's home.

    Raises:
        UnsafePath: when the root or a part is refused.
    """
    _check_remote_root(root)
    _check_components(parts, "remote path part")
    return "/".join([root.rstrip("/"), *parts]) if root.rstrip("/") else "/" + "/".join(parts)


def remote_arg(root: str, *parts: str) -> str:
    """`remote_path(root, *parts)` as one word of a POSIX shell command line (a leading `~/` stays the home)."""
    path = remote_path(root, *parts)
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + shlex.quote(path[1:]) if len(path) > 1 else '"$HOME"'
    return shlex.quote(path)


def read_bounded(root: Path, path: Path, limit: int) -> bytes:
    """At most `limit + 1` bytes of `path`: a regular file that resolves inside `root`.

    A symbolic link to another file inside `root` is read; one that leads out of it is refused (a spec
    linked to `/etc/shadow` must not become an agent's prompt). A caller sees `len(data) > limit` for a file
    over its limit without the file ever being read whole.

    Raises:
        UnsafePath: a link out of `root`, or not a regular file (a FIFO would block forever).
        OSError: the file cannot be opened or read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    if path.parent != root:
        local_path(root, *path.relative_to(root).parts[:-1], what="file")
    try:
        fd = os.open(path, flags)  # the usual case, a plain file in `root`: no resolving at all
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        base, target = _resolve(root, "file"), _resolve(path, "file")  # a link: follow it only inside `root`
        if not target.is_relative_to(base):
            raise UnsafePath("file", path.name, f"is a symbolic link leading out of {root} (to {target}); "
                                                "copy the file into the directory instead of linking it") from None
        fd = os.open(target, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath("file", path.name, "is not a regular file; replace it with one")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
