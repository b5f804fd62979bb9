"""task.log as the runner writes it: line by line, flushed, every secret value masked.

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

_MIN_SECRET_LEN = 4  # shorter values are not masked: they would blank out ordinary words
LOG_TAIL_LINES = 40


class Log:
    """task.log, written and flushed line by line, with every secret value replaced by ``***``."""

    def __init__(self, path: str, secrets: dict[str, str], echo: bool) -> None:
        self.path = path
        values = {v for v in secrets.values() if len(v) >= _MIN_SECRET_LEN}
        self._secrets = sorted(values, key=len, reverse=True)
        self._encoded = [value.encode("utf-8", "replace") for value in self._secrets]
        # a piece of a long line is cut this many bytes early, so a secret across the cut stays whole
        self.overlap = max((len(value) for value in self._encoded), default=1) - 1
        self._echo = echo
        self._handle = open(path, "ab")  # open for the whole run
        self._events: Any = None  # events.jsonl, opened at an agent's first JSON event

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def mask_bytes(self, data: bytes) -> bytes:
        for secret in self._encoded:
            data = data.replace(secret, b"***")
        return data

    def mask_all(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list):
            return [self.mask_all(v) for v in value]
        if isinstance(value, dict):
            return {k: self.mask_all(v) for k, v in value.items()}
        return value

    def line(self, text: str) -> str:
        masked = self.mask(text)
        data = (masked + "\n").encode("utf-8", "replace")
        self._handle.write(data)
        self._handle.flush()
        if self._echo:
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            except (OSError, ValueError):  # the SSH session went away: keep running, stop echoing
                self._echo = False
        return masked

    def event(self, text: str, shown: list[str]) -> str:
        """One JSON event of an agent: masked, as printed to events.jsonl, and as `shown` to task.log."""
        masked = self.mask(text)
        if self._events is None:
            self._events = open(os.path.join(os.path.dirname(self.path), "events.jsonl"), "ab")
        self._events.write((masked + "\n").encode("utf-8", "replace"))
        self._events.flush()
        for line in shown:
            self.line(line)
        return masked

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 65536))
                data = handle.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def close(self) -> None:
        self._handle.close()
        if self._events is not None:
            self._events.close()


def cut(data: bytes, keep: int) -> tuple[bytes, bytes]:
    """Split masked `data` into a piece to write and the last `keep` bytes (or more, to end on a whole
    UTF-8 character), which may hold the start of a secret that the next read completes."""
    cut = max(0, len(data) - keep)
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # never inside a multi-byte character
        cut -= 1
    return data[:cut], data[cut:]


class Tail:
    """The last ``limit`` characters of a process's output, kept as lines."""

    def __init__(self, limit: int) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._size = 0
        self._limit = limit

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.popleft()) + 1

    def text(self) -> str:
        return "\n".join(self._lines)
