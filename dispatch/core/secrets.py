"""Known secrets, and masking them wherever the dispatcher writes.

The node runner masks what it writes on the node (`task.log`, `result.json`) with the secrets it is
given. The dispatcher masks again what it writes itself (Prefect logs, the cached `SpecResult`, the state
file, reports and artifacts), with every secret it knows: the agent keys of the `AgentModel` blocks and
of its own environment, the Prefect API's auth string, and any variable of its environment whose name
says it is a credential (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, `*CREDENTIAL*`, `*AUTH*`), even
though no step is given those (dispatch/runner/run.py: steps get an allow-list environment).

Examples:
    >>> masker = Masker(["fake-ant-0123456789"])
    >>> masker.mask("key=fake-ant-0123456789")
    'key=***'
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

MASK = "***"
MIN_LENGTH = 8
"""Shorter values are never masked: they would blank out ordinary words of a log."""

_CREDENTIAL_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
_PLAIN_VALUE = re.compile(r"[a-z]+|[0-9]+|(true|false|yes|no)", re.IGNORECASE)


def credential_values(environ: dict[str, str]) -> list[str]:
    """Values of `environ` that are credentials by their variable's name and look like one.

    A value counts when it has at least `MIN_LENGTH` characters, no blank, is not a path and is not a
    plain word or number (`SSH_AUTH_SOCK=/tmp/...` or `AUTH_MODE=production` are not masked).
    """
    return [value for name, value in environ.items()
            if _CREDENTIAL_NAME.search(name) and len(value) >= MIN_LENGTH and not value.startswith("/")
            and not any(c.isspace() for c in value) and not _PLAIN_VALUE.fullmatch(value)]


class Masker:
    """Replaces every known secret value with `***`, in text and in nested JSON-like data. Thread-safe.

    Args:
        values: the secret values; shorter than `MIN_LENGTH` ones are ignored.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Also mask `values` from now on."""
        with self._lock:
            known = set(self._values) | {v for v in values if isinstance(v, str) and len(v) >= MIN_LENGTH}
            self._values = tuple(sorted(known, key=len, reverse=True))  # a key inside a longer one: longer first

    @property
    def values(self) -> tuple[str, ...]:
        """The values masked, longest first."""
        return self._values

    def mask(self, text: str) -> str:
        """`text` with every known secret replaced by `***`."""
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def mask_data(self, data: Any) -> Any:
        """A copy of `data` (str, list, tuple, dict; anything else as it is) with every string masked."""
        if isinstance(data, str):
            return self.mask(data)
        if isinstance(data, dict):
            return {self.mask_data(k): self.mask_data(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return type(data)(self.mask_data(v) for v in data)
        return data

    def __bool__(self) -> bool:
        return bool(self._values)
