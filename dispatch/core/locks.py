"""File locks from `modifies`, and the machine-local slot locks of the embedded default.

Two `modifies` entries conflict when some path could be touched by both: the same file, a directory
and anything under it, or globs (`*`, `?`, `[...]`, `**`) that can match a common path. The check is
exact for these patterns (an intersection of the two patterns, not a guess), so specs that cannot
touch the same file do run in parallel.

`LockTable` is the dispatcher's in-flow accounting: a spec takes all its locks at once or none
(`try_acquire`), so there is no hold-and-wait and no deadlock. `SlotLocks` keeps two dispatchers on
one machine from overfilling it: one `flock`ed file per slot, which the OS releases if the holder dies.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
from collections.abc import Iterable
from functools import cache, lru_cache
from pathlib import Path

_STAR, _ANY = "*", "?"


def normalize(path: str) -> str:
    """`./src//a.py/` -> `src/a.py`; `.` or empty -> `` (the whole project)."""
    path = path.strip().replace("\\", "/")
    if not path:
        return ""
    normalized = posixpath.normpath(path)
    return "" if normalized == "." else normalized


def _tokens(segment: str) -> tuple[object, ...]:
    """Tokens of one path segment pattern: literal chars, `*`, `?` or a (negate, chars) class."""
    tokens: list[object] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            if not tokens or tokens[-1] != _STAR:
                tokens.append(_STAR)
        elif char == "?":
            tokens.append(_ANY)
        elif char == "[" and "]" in segment[i + 2:]:
            end = segment.index("]", i + 2)
            body = segment[i + 1:end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            chars: set[str] = set()
            j = 0
            while j < len(body):
                if j + 2 < len(body) and body[j + 1] == "-":
                    chars.update(chr(c) for c in range(ord(body[j]), ord(body[j + 2]) + 1))
                    j += 3
                else:
                    chars.add(body[j])
                    j += 1
            tokens.append((negate, frozenset(chars)))
            i = end
        else:
            tokens.append(char)
        i += 1
    return tuple(tokens)


def _chars_meet(a: object, b: object) -> bool:
    """Whether two single-character tokens can match a common character."""
    if a == _ANY or b == _ANY:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, str):
        a, b = b, a
    negate_a, chars_a = a  # type: ignore[misc]
    if isinstance(b, str):
        return (b in chars_a) != negate_a
    negate_b, chars_b = b  # type: ignore[misc]
    if negate_a and negate_b:
        return True
    if negate_a:
        return bool(chars_b - chars_a)
    if negate_b:
        return bool(chars_a - chars_b)
    return bool(chars_a & chars_b)


@lru_cache(maxsize=4096)
def segments_meet(a: str, b: str) -> bool:
    """Whether two segment patterns (no `/`) can match one common name."""
    ta, tb = _tokens(a), _tokens(b)

    @cache
    def meet(i: int, j: int) -> bool:
        if i == len(ta) and j == len(tb):
            return True
        if i < len(ta) and ta[i] == _STAR:
            return meet(i + 1, j) or (j < len(tb) and meet(i, j + 1))
        if j < len(tb) and tb[j] == _STAR:
            return meet(i, j + 1) or (i < len(ta) and meet(i + 1, j))
        if i < len(ta) and j < len(tb):
            return _chars_meet(ta[i], tb[j]) and meet(i + 1, j + 1)
        return False

    return meet(0, 0)


@lru_cache(maxsize=16384)
def overlaps(a: str, b: str) -> bool:
    """Whether two `modifies` entries can touch a common path.

    A path covers everything under it (a directory locks its files). `**` matches any number of
    segments.

    Examples:
        >>> overlaps("src/api.py", "src/api.py"), overlaps("src", "src/api.py")
        (True, True)
        >>> overlaps("src/*.py", "src/api.py"), overlaps("src/*.py", "docs/*.md")
        (True, False)
    """
    sa = [s for s in normalize(a).split("/") if s]
    sb = [s for s in normalize(b).split("/") if s]

    @cache
    def meet(i: int, j: int) -> bool:
        if i == len(sa) or j == len(sb):
            return True  # one is a directory (or the same path) that covers the rest of the other
        if sa[i] == "**":
            return meet(i + 1, j) or meet(i, j + 1)
        if sb[j] == "**":
            return meet(i, j + 1) or meet(i + 1, j)
        return segments_meet(sa[i], sb[j]) and meet(i + 1, j + 1)

    return meet(0, 0)


def conflicts(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two specs' `modifies` lists overlap anywhere."""
    b = list(b)
    return any(overlaps(x, y) for x in a for y in b)


class LockTable:
    """In-flow file locks: who holds which `modifies` patterns, taken all together or not at all."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, ...]] = {}

    def blockers(self, holder: str, patterns: Iterable[str], ignore: set[str] = frozenset()) -> list[str]:
        """Holders whose locks overlap `patterns` (excluding `holder` itself and `ignore`)."""
        patterns = tuple(patterns)
        return [other for other, held in self._held.items()
                if other != holder and other not in ignore and conflicts(patterns, held)]

    def try_acquire(self, holder: str, patterns: Iterable[str], ignore: set[str] = frozenset()) -> bool:
        """Take every lock of `patterns` for `holder`, or none when any is held by someone else."""
        patterns = tuple(patterns)
        if self.blockers(holder, patterns, ignore):
            return False
        if patterns:
            self._held[holder] = patterns
        return True

    def release(self, holder: str) -> None:
        self._held.pop(holder, None)

    @property
    def held(self) -> dict[str, tuple[str, ...]]:
        return dict(self._held)


class SlotLocks:
    """Machine-wide slots for the local node: one `flock`ed file per slot under `directory`.

    A second dispatcher on the same machine sees the slots the first holds. The kernel drops the
    lock when the holding process dies, so a killed dispatcher leaves no slot held; a runner
    started with the slot's descriptor inherited keeps the slot for as long as it lives.
    """

    def __init__(self, directory: Path, slots: int) -> None:
        self.directory = directory
        self.slots = slots
        directory.mkdir(parents=True, exist_ok=True)

    def try_acquire(self) -> int | None:
        """An open, locked descriptor for a free slot, or None when all are taken."""
        for index in range(self.slots):
            fd = os.open(self.directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    @staticmethod
    def release(fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def in_use(self) -> int:
        """How many slots some process holds right now (a probe: takes and drops each free one)."""
        return sum(held_by_a_process(self.directory / f"slot-{index}.lock") for index in range(self.slots))


def held_by_a_process(path: Path) -> bool:
    """Whether some process holds a `flock` on the file (a probe: takes and drops it when free; no file: False)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class ProcessLock:
    """An exclusive `flock` on a file, held while a process lives (e.g. one dispatcher per project)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder_pid(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
