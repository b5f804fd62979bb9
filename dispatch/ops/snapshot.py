"""Snapshots: the Prefect database and DISPATCH_HOME's state in one timestamped, checksummed archive.

    take_snapshot(settings, dest, keep)   write <dest>/oyster-dispatch-snapshot-<UTC time>.tar.gz (+ .sha256)
    prune(dest, keep)                     keep the newest archive of each of the last `keep` days

An archive holds `database/prefect.db` (SQLite's online backup) or `database/prefect.dump` (pg_dump, custom
format) (dispatch/ops/snapshot_db.py), then `home/<area>/...` for the areas of DISPATCH_HOME that make its history:
`AREAS` (state, results and reports, run directories with their logs, the result cache, pipeline reports, the
guardian's failure counts) and `FILES` (nodes.json, projects.json, drained.json), and last `manifest.json`: when,
by whom, which database, which areas, and the sha256 and size of every member. `<archive>.sha256` beside it
(sha256sum's format) covers the whole archive; `dispatch restore` checks it before anything else
(dispatch/ops/restore.py).

Never archived: symbolic links (none is followed, inside the home or out of it), special files, the local
server's files, locks and logs, code workspaces (they live in git or DISPATCH_PROJECTS). Retention deletes
only regular files whose names match `ARCHIVE_NAME` inside the destination.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core.errors import DispatchError
from dispatch.core.settings import DispatchSettings
from dispatch.ops.snapshot_db import Database, DatabaseCopyFailed, copy_out, locate

AREAS = ("state", "results", "runs", "cache", "pipeline", "guardian")
FILES = ("nodes.json", "projects.json", "drained.json")
MANIFEST = "manifest.json"
FORMAT = 1
PREFIX = "oyster-dispatch-snapshot-"
ARCHIVE_NAME = re.compile(r"^oyster-dispatch-snapshot-(\d{8})T(\d{6})Z\.tar\.gz(\.sha256)?$")
_IN_MEMORY = 8 * 2**20  # files up to this size are read whole first: a file rewritten meanwhile stays whole
_SKIPPED_SHOWN = 100


class SnapshotError(DispatchError):
    """A snapshot could not be written (nothing was left behind in the destination)."""


@dataclass
class Snapshot:
    """What one `take_snapshot` wrote, and what retention removed."""

    archive: Path
    checksum: str
    size: int
    files: int
    database: str
    seconds: float
    skipped: list[dict] = field(default_factory=list)
    pruned: list[Path] = field(default_factory=list)


def snapshot_dir(settings: DispatchSettings) -> Path:
    """Where archives go by default: DISPATCH_SNAPSHOT_DIR, else <home>/snapshots."""
    return settings.snapshot_dir or settings.home / "snapshots"


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


class _Hashing(io.RawIOBase):
    """Reads through to a file, hashing what passes (tarfile reads exactly the size it was told)."""

    def __init__(self, handle) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def _walk(root: Path, skipped: list[dict]) -> Iterator[Path]:
    """Every regular file and directory under `root` (itself first), never following a symbolic link."""
    stack = [root]
    while stack:
        directory = stack.pop()
        yield directory
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append({"path": str(directory), "why": f"unreadable: {exc.strerror}"})
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                skipped.append({"path": str(path), "why": "symbolic link"})
            elif entry.is_dir(follow_symlinks=False):
                stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                yield path
            else:
                skipped.append({"path": str(path), "why": "not a regular file"})


class _Writer:
    """Adds files to the archive, recording each member's sha256 and size for the manifest."""

    def __init__(self, tar: tarfile.TarFile, limit: int) -> None:
        self.tar, self.limit = tar, limit
        self.files: dict[str, dict] = {}
        self.total = 0

    def add_dir(self, name: str, mode: int = 0o700) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode & 0o777, int(time.time())
        self.tar.addfile(info)

    def add_file(self, name: str, path: Path) -> bool:
        """Add `path` as `name`; False when it vanished meanwhile (a run removed it)."""
        try:
            handle = open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW))
        except (FileNotFoundError, OSError):
            return False
        with handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                return False
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = status.st_mode & 0o777, int(status.st_mtime)
            if status.st_size <= _IN_MEMORY:
                data = handle.read(_IN_MEMORY + 1)[:_IN_MEMORY]
                info.size, source, digest = len(data), io.BytesIO(data), hashlib.sha256(data).hexdigest()
                self._count(name, info.size)
                self.tar.addfile(info, source)
            else:  # big: what it holds at open time (a log growing meanwhile is cut there)
                info.size = status.st_size
                self._count(name, info.size)
                reader = _Hashing(handle)
                try:
                    self.tar.addfile(info, reader)
                except OSError as exc:
                    raise SnapshotError(f"{path} shrank while it was archived ({exc}); run the snapshot "
                                        "again") from exc
                digest = reader.digest.hexdigest()
        self.files[name] = {"sha256": digest, "size": info.size}
        return True

    def _count(self, name: str, size: int) -> None:
        self.total += size
        if self.total > self.limit:
            raise SnapshotError(f"the snapshot would hold more than {self.limit} bytes (at {name}); raise "
                                f"DISPATCH_SNAPSHOT_MAX_BYTES or clean up with `dispatch cleanup <project> --all`")


def _add_home(writer: _Writer, home: Path, skipped: list[dict]) -> list[str]:
    """Add the home's areas and files; returns the names of those present."""
    present = []
    for name in FILES:
        path = home / name
        if path.is_symlink():
            skipped.append({"path": str(path), "why": "symbolic link"})
        elif path.is_file() and writer.add_file(f"home/{name}", path):
            present.append(name)
    for area in AREAS:
        root = home / area
        if root.is_symlink():
            skipped.append({"path": str(root), "why": "symbolic link"})
            continue
        if not root.is_dir():
            continue
        present.append(area)
        for path in _walk(root, skipped):
            member = "home/" + path.relative_to(home).as_posix()
            if path.is_dir():
                writer.add_dir(member, path.stat().st_mode)
            else:
                writer.add_file(member, path)
    return present


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("oyster-dispatch", "prefect"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def archive_name(when: float) -> str:
    """`oyster-dispatch-snapshot-<YYYYmmddTHHMMSSZ>.tar.gz` for a Unix time (UTC)."""
    return f"{PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(when))}.tar.gz"


def take_snapshot(settings: DispatchSettings, dest: Path | None = None, keep: int | None = None,
                  database: Database | None = None) -> Snapshot:
    """Write one archive of the Prefect database and DISPATCH_HOME's history, then apply retention.

    Args:
        settings: whose home and database.
        dest: the destination directory (created); default `snapshot_dir(settings)`.
        keep: days of archives to keep (default `settings.snapshot_keep`); None or 0 keeps settings'.
        database: the database to copy; default the one `snapshot_db.locate` finds.

    Returns:
        The archive written, its checksum, and the archives retention removed.

    Raises:
        SnapshotError: the database is elsewhere, the copy failed, or the archive would be too big; nothing is
            left in `dest`.
        ConfigError: a bad database URL, or pg_dump missing.
    """
    began = time.monotonic()
    database = database or locate(settings)
    if database is None:
        raise SnapshotError("team mode: the Prefect database is on the server, not here. Run `dispatch snapshot` "
                            "where the server runs (with its server.env, which sets "
                            "PREFECT_API_DATABASE_CONNECTION_URL), or set DISPATCH_SNAPSHOT_DATABASE_URL")
    dest = (dest or snapshot_dir(settings)).expanduser()
    for area in AREAS:  # an archive inside what it archives would hold itself
        if dest.resolve().is_relative_to((settings.home / area).resolve()):
            raise SnapshotError(f"--dest {dest} lies inside DISPATCH_HOME/{area}, which the snapshot archives; "
                                f"choose another directory (default {snapshot_dir(settings)})")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    archive = dest / archive_name(now)
    if archive.exists():
        raise SnapshotError(f"{archive} already exists (one snapshot per second); run it again in a second")
    work = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=dest))
    partial = work / archive.name
    skipped: list[dict] = []
    try:
        copy = work / "database"
        try:
            copy_out(database, copy)
        except DatabaseCopyFailed as exc:
            raise SnapshotError(str(exc)) from exc
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
                writer = _Writer(tar, settings.snapshot_max_bytes)
                writer.add_dir("database")
                writer.add_file(database.member, copy)
                writer.add_dir("home")
                present = _add_home(writer, settings.home, skipped)
                user = getpass.getuser()
                manifest = {
                    "format": FORMAT, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                    "created_by": f"{user}@{socket.gethostname()}", "versions": _versions(),
                    "mode": "embedded" if settings.embedded else "team", "home": str(settings.home),
                    "database": {"kind": database.kind, "member": database.member, "source": database.describe(),
                                 **writer.files[database.member]},
                    "areas": present, "files": writer.files, "skipped": skipped[:_SKIPPED_SHOWN],
                    "skipped_count": len(skipped)}
                body = json.dumps(manifest, indent=1).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mode, info.mtime = len(body), 0o600, int(now)
                tar.addfile(info, io.BytesIO(body))
            raw.flush()
            os.fsync(raw.fileno())
        checksum = sha256_file(partial)
        sums = work / f"{archive.name}.sha256"
        sums.write_text(f"{checksum}  {archive.name}\n", encoding="ascii")
        os.replace(partial, archive)
        os.replace(sums, dest / sums.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pruned = prune(dest, keep or settings.snapshot_keep)
    return Snapshot(archive=archive, checksum=checksum, size=archive.stat().st_size, files=len(writer.files),
                    database=database.describe(), seconds=time.monotonic() - began, skipped=skipped, pruned=pruned)


def prune(dest: Path, keep: int) -> list[Path]:
    """Keep the newest archive of each of the last `keep` days that have one; delete the other archives.

    Only regular files in `dest` whose names match `ARCHIVE_NAME` (and their `.sha256`) are ever deleted.

    Returns:
        The files deleted.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    archives: dict[str, list[str]] = {}
    for entry in os.scandir(dest):
        match = ARCHIVE_NAME.match(entry.name)
        if match and not match.group(3) and entry.is_file(follow_symlinks=False):
            archives.setdefault(match.group(1), []).append(entry.name)
    kept = {max(names) for day, names in sorted(archives.items())[-keep:]}
    removed = []
    for names in archives.values():
        for name in names:
            if name in kept:
                continue
            for path in (dest / name, dest / f"{name}.sha256"):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
                    removed.append(path)
    return removed
