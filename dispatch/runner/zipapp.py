"""The runner as one reproducible zipapp: the bytes shipped to a node, and the runner's version (their sha256).

`build()` packs this package's node-side modules (every ``*.py`` here)
into one zip: the package as ``dispatch_runner/`` (its relative imports work as they do in the repo) and a
top-level ``__main__.py`` that runs ``dispatch_runner.__main__``. The archive is the same bytes wherever it is
built: entries sorted, stored uncompressed (no zlib version in the bytes), dated 1980-01-01, mode 0644, no
``__pycache__``. A node runs it as ``python3 <root>/.runner/<first 16 of the version>/runner.pyz <command>``.

Standard library only, Python 3.8+: shipped inside the zipapp too, where `runner_version` hashes the archive
it was imported from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from . import protocol

PACKAGE = "dispatch_runner"
"""The package's name inside the archive."""

_HERE = os.path.dirname(os.path.abspath(__file__))
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
_MODE = 0o100644  # a regular file, rw-r--r--
_MAIN = (
    b'"""Oyster Dispatch node runner: python3 runner.pyz <command> (see dispatch_runner/__main__.py)."""\n'
    b"import sys\n\nfrom dispatch_runner.__main__ import main\n\nsys.exit(main())\n"
)


@dataclass(frozen=True)
class Zipapp:
    """The runner's archive: its bytes and its version (their sha256, hex)."""

    data: bytes
    version: str


_BUILT: dict[tuple, Zipapp] = {}  # one build per state of the sources (name, mtime, size): built once per process


def sources() -> list[str]:
    """The file names of the package's node-side modules, sorted."""
    return sorted(name for name in os.listdir(_HERE)
                  if name.endswith(".py"))


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def build() -> Zipapp:
    """The runner's zipapp, built from the package's sources (in memory; again only once a source changed).

    Raises:
        OSError: a source cannot be read (the dispatcher's checkout is damaged).
    """
    names = sources()
    key = tuple((name, *_stamp(os.path.join(_HERE, name))) for name in names)
    if key not in _BUILT:
        import io  # here, not at the top: a runner on a node never builds, and zipfile takes ~20 ms to import
        import zipfile

        entries = [("__main__.py", _MAIN)]
        for name in names:
            with open(os.path.join(_HERE, name), "rb") as handle:
                entries.append((f"{PACKAGE}/{name}", handle.read()))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, data in sorted(entries):
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.external_attr, info.create_system, info.compress_type = _MODE << 16, 3, zipfile.ZIP_STORED
                archive.writestr(info, data)
        data = buffer.getvalue()
        _BUILT.clear()
        _BUILT[key] = Zipapp(data, hashlib.sha256(data).hexdigest())
    return _BUILT[key]


def _archive() -> str | None:
    """The zipapp this module was imported from, or None (imported from the repo's package)."""
    return getattr(globals().get("__loader__"), "archive", None)


def runner_version() -> str:
    """The running runner's version: the sha256 of its zipapp (the archive itself on a node; in the repo, the
    archive `build` makes of these sources), as `result.json` and the `version` command report it."""
    archive = _archive()
    return protocol.checksum(archive) if archive else build().version
