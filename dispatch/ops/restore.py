"""Restore a snapshot (dispatch/ops/snapshot.py): the Prefect database and DISPATCH_HOME's history, all or nothing.

In this order, so that a damaged archive, or a refusal, changes nothing:

1. the archive's sha256 against `<archive>.sha256` beside it;
2. refused while a dispatcher of this home runs (a state file whose pid lives, a live runner under
   `runs/`, a temporary Prefect server left by one, a command starting the local server); in team mode
   also while the server has running flow runs of our flows;
3. every member checked before anything is extracted: only directories and regular files, names under
   `home/<area>/`, `database/` or `manifest.json`, no absolute path, no `..`, no link, bounded count and size;
4. extracted into a staging directory inside DISPATCH_HOME, each file's sha256 and size checked against the
   manifest, the SQLite copy checked by SQLite; the restored nodes.json and projects.json refused when they
   hold settings that run commands (dispatch/ops/restore_trust.py), unless `--trust` accepts them;
5. then the local server is stopped (embedded mode), the database replaced (pg_restore in one transaction),
   and each area of the home swapped for the archive's by renames (the old ones removed afterwards).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dispatch.core.errors import ConfigError, DispatchError
from dispatch.core.processes import pid_alive
from dispatch.core.results import load_all_states
from dispatch.core.safeload import loads_json
from dispatch.core.settings import DispatchSettings
from dispatch.ops.restore_trust import command_settings
from dispatch.ops.snapshot import AREAS, FILES, FORMAT, MANIFEST, sha256_file
from dispatch.ops.snapshot_db import Database, DatabaseCopyFailed, check_sqlite, copy_in, locate

OUR_FLOWS = ("dispatch-project", "spec-run", "pipeline", "nightly-regression")
_BUSY_STATES = ("PENDING", "RUNNING", "CANCELLING")
_MAX_MEMBERS = 2_000_000
_MAX_NAME = 4096
_MAX_MANIFEST = 64 * 2**20
_DB_MEMBERS = ("database/prefect.db", "database/prefect.dump")


class ArchiveInvalid(DispatchError):
    """The archive is damaged, tampered with, unsafe or not ours: nothing was changed (exit 2)."""


class RestoreRefused(DispatchError):
    """Something still uses the home or the database: nothing was changed (exit 1)."""


@dataclass
class Restored:
    """What a restore brought back."""

    archive: Path
    database: str
    areas: list[str]
    files: int
    created_at: str
    stopped_server: list[int] = field(default_factory=list)
    seconds: float = 0.0
    trusted: list[str] = field(default_factory=list)


def verify_checksum(archive: Path) -> str:
    """The archive's sha256, when it matches `<archive>.sha256` beside it.

    Raises:
        ArchiveInvalid: the archive or its checksum file is missing, or they differ.
    """
    sums = archive.with_name(archive.name + ".sha256")
    if not archive.is_file():
        raise ArchiveInvalid(f"{archive}: no such archive")
    try:
        with open(sums, "rb") as handle:
            words = handle.read(4096).decode("ascii", "replace").split()
    except OSError as exc:
        raise ArchiveInvalid(f"{sums}: the checksum file is missing ({exc.strerror}); copy it with the archive "
                             f"(dispatch snapshot writes both)") from exc
    expected = words[0].lower() if words else ""
    actual = sha256_file(archive)
    if expected != actual:
        raise ArchiveInvalid(f"{archive}: sha256 {actual} does not match {sums} ({expected[:64] or 'empty'}): the "
                             f"archive is damaged or was changed; nothing was restored")
    return actual


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if len(name) > _MAX_NAME or "\0" in name or "\\" in name:
        return "is no usable name"
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        return "is absolute or holds '..' or '.'"
    if not (member.isfile() or member.isdir()):
        return "is a link or special file (only files and directories may be restored)"
    parts = path.parts
    if name == MANIFEST or name in _DB_MEMBERS:
        return None if member.isfile() else "must be a file"
    if name in ("database", "home"):
        return None if member.isdir() else "must be a directory"
    if parts[0] == "home" and len(parts) == 2 and parts[1] in AREAS:
        return None if member.isdir() else "must be a directory"
    if parts[0] == "home" and len(parts) == 2 and parts[1] in FILES:
        return None if member.isfile() else "must be a file"
    if parts[0] == "home" and len(parts) > 2 and parts[1] in AREAS:
        return None
    return "is not part of a dispatch snapshot"


def check_members(tar: tarfile.TarFile, limit: int) -> list[tarfile.TarInfo]:
    """Every member, each checked before anything is extracted; bounded in count and total size.

    Raises:
        ArchiveInvalid: a member is unsafe or unknown, a name repeats, or the archive is too big.
    """
    members, seen, total = [], set(), 0
    try:
        for member in tar:
            if problem := _member_problem(member):
                raise ArchiveInvalid(f"archive member {member.name[:200]!r} {problem}; nothing was restored")
            if member.name in seen:
                raise ArchiveInvalid(f"archive member {member.name[:200]!r} appears twice; nothing was restored")
            seen.add(member.name)
            total += member.size
            if len(members) >= _MAX_MEMBERS or total > limit:
                raise ArchiveInvalid(f"the archive holds more than {_MAX_MEMBERS} members or {limit} bytes "
                                     f"(DISPATCH_SNAPSHOT_MAX_BYTES); nothing was restored")
            members.append(member)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveInvalid(f"the archive cannot be read ({exc}); nothing was restored") from exc
    if MANIFEST not in seen:
        raise ArchiveInvalid(f"the archive has no {MANIFEST}: it is no dispatch snapshot; nothing was restored")
    return members


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
    if member.size > _MAX_MANIFEST:
        raise ArchiveInvalid(f"{MANIFEST} is larger than {_MAX_MANIFEST} bytes; nothing was restored")
    handle = tar.extractfile(member)
    try:
        manifest = loads_json(handle.read(_MAX_MANIFEST + 1), f"the archive's {MANIFEST}") if handle else None
    except ConfigError as exc:
        raise ArchiveInvalid(f"{exc}; nothing was restored") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("database"), dict) \
            or not isinstance(manifest["database"].get("member"), str) \
            or not isinstance(manifest.get("areas", []), list):
        raise ArchiveInvalid(f"{MANIFEST} is not a format-{FORMAT} dispatch snapshot manifest; nothing was restored")
    return manifest


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], manifest: dict, staging: Path) -> int:
    """Write every checked member under `staging`, each file's sha256 and size proven against the manifest."""
    files = manifest["files"]
    listed = {m.name for m in members if m.isfile() and m.name != MANIFEST}
    if set(files) != listed:
        odd = sorted(set(files) ^ listed)[:3]
        raise ArchiveInvalid(f"the archive's files differ from its manifest ({odd}); nothing was restored")
    for member in members:
        if member.name == MANIFEST:
            continue
        target = staging.joinpath(*PurePosixPath(member.name).parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            target.chmod((member.mode & 0o755) | 0o700)
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        source = tar.extractfile(member)
        digest, size = hashlib.sha256(), 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, (member.mode & 0o755) | 0o600)
        with os.fdopen(fd, "wb") as out:
            while block := source.read(2**20):
                digest.update(block)
                size += len(block)
                out.write(block)
        expected = files[member.name]
        if not isinstance(expected, dict) or digest.hexdigest() != expected.get("sha256") \
                or size != expected.get("size"):
            raise ArchiveInvalid(f"archive member {member.name[:200]!r} does not match its sha256 in the manifest; "
                                 f"nothing was restored")
    return len(listed)


def running_here(settings: DispatchSettings) -> list[str]:
    """What of this home is running: dispatchers (live pids in state files), live runners, temporary Prefect
    servers a dispatcher left behind."""
    from dispatch.cluster.transports.local import live_runner

    busy = [f"dispatcher of {s.project} (pid {s.pid})" for s in load_all_states(settings.state_dir)
            if s.state == "running" and pid_alive(s.pid)]
    if settings.runs_dir.is_dir():
        for status in sorted(settings.runs_dir.glob("*/tasks/*/status.json")):
            if not status.is_symlink() and live_runner(status.parent):
                busy.append(f"runner of {status.parent.parent.parent.name}/{status.parent.name}")
    if settings.embedded:
        from dispatch.prefect.embedded import orphaned_servers

        prefect_home = str(settings.prefect_home or settings.home / "prefect")
        busy += [f"temporary Prefect server (pid {pid})" for pid in orphaned_servers(prefect_home)]
    return busy


def running_on_server(settings: DispatchSettings) -> list[str]:
    """Team mode: flow runs of our flows the server has pending or running (they would write into the restore).

    Raises:
        RestoreRefused: the server cannot be asked (we do not restore blind).
    """
    import base64

    import httpx

    api = (settings.prefect_api_url or "").rstrip("/")
    auth = settings.prefect_api_auth_string
    headers = {"Authorization": "Basic " + base64.b64encode(auth.get_secret_value().encode()).decode()} if auth \
        else {}
    try:
        response = httpx.post(f"{api}/flow_runs/filter", headers=headers, timeout=10, json={
            "flows": {"name": {"any_": list(OUR_FLOWS)}},
            "flow_runs": {"state": {"type": {"any_": list(_BUSY_STATES)}}}, "limit": 50})
        response.raise_for_status()
        runs = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise RestoreRefused(f"cannot ask {api} for running flow runs ({type(exc).__name__}: {exc}); a restore "
                             f"needs to know that none runs") from exc
    return [f"flow run {run.get('name')} ({run.get('id')}, {run.get('state_type')})" for run in runs]


class _ServerLock:
    """The local server's start lock, taken without waiting and held through the swap: no command starts a
    server on a half-restored database."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.path = settings.locks_dir / "local-server.lock"

    def __enter__(self) -> _ServerLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RestoreRefused(f"a command is starting the local Prefect server ({self.path} is held); wait for "
                                 "it, stop what runs, then restore") from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _refuse_if_busy(settings: DispatchSettings) -> None:
    busy = running_here(settings)
    if not settings.embedded:
        busy += running_on_server(settings)
    if busy:
        raise RestoreRefused("refusing to restore while these run: " + "; ".join(busy[:10])
                             + ". Stop them (`dispatch stop <project>`) or let them finish, then restore")


def _swap(settings: DispatchSettings, staging: Path, areas: list[str]) -> None:
    """Move the home's areas aside and the archive's into place; on a failure put the old ones back."""
    home, old = settings.home, staging / "old"
    old.mkdir()
    moved: list[tuple[Path, Path]] = []
    try:
        for name in (*FILES, *AREAS):
            current = home / name
            if current.exists() or current.is_symlink():
                os.replace(current, old / name)
                moved.append((old / name, current))
            if name in areas and (staging / "home" / name).exists():
                os.replace(staging / "home" / name, current)
    except OSError:
        for source, target in reversed(moved):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            os.replace(source, target)
        raise


def _commands(settings: DispatchSettings, staging: Path, areas: list[str], trust: bool) -> list[str]:
    """The archive's settings that run commands; refused unless `trust`."""
    try:
        found = command_settings(settings.home, staging / "home", areas)
    except ConfigError as exc:
        raise ArchiveInvalid(f"{exc}; nothing was restored") from exc
    if found and not trust:
        shown = "".join(f"\n  - {line}" for line in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise ArchiveInvalid(f"the archive holds settings that run commands (on this machine, or on nodes):{shown}"
                             f"{more}\nnothing was restored; if you trust where the archive came from, restore it "
                             "with --trust")
    return found


def restore(settings: DispatchSettings, archive: Path, database: Database | None = None, *,
            trust: bool = False) -> Restored:
    """Bring back a snapshot's database and home (see the module's docstring for the order of checks).

    Args:
        settings: whose home and database.
        archive: the `.tar.gz` written by `dispatch snapshot`, its `.sha256` beside it.
        database: the database to replace; default the one `snapshot_db.locate` finds.
        trust: accept settings of the archive that run commands (dispatch/ops/restore_trust.py); they are
            listed in `Restored.trusted`.

    Raises:
        ArchiveInvalid: damaged, tampered with, unsafe, of another kind of database, or (without `trust`)
            carrying settings that run commands (exit 2).
        RestoreRefused: a dispatcher, runner or flow run still runs, or pg_restore failed (exit 1).
        ConfigError: team mode without the database's URL, or pg_restore missing.
    """
    began = time.monotonic()
    verify_checksum(archive)
    _refuse_if_busy(settings)
    database = database or locate(settings)
    if database is None:
        raise RestoreRefused("team mode: the Prefect database is on the server; restore there (with its "
                             "server.env) or set DISPATCH_SNAPSHOT_DATABASE_URL")
    if database.kind == "postgresql" and settings.embedded:
        raise RestoreRefused("set PREFECT_API_URL (and PREFECT_API_AUTH_STRING) to the team's server: a restore "
                             "into its PostgreSQL database first asks it whether a flow run of ours is running")
    settings.home.mkdir(parents=True, exist_ok=True)
    staging = settings.home / f".restore-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    staging.mkdir(mode=0o700)
    stopped: list[int] = []
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = check_members(tar, settings.snapshot_max_bytes)
            manifest = _read_manifest(tar, next(m for m in members if m.name == MANIFEST))
            kind = manifest["database"].get("kind")
            if kind != database.kind or manifest["database"].get("member") not in {m.name for m in members}:
                raise ArchiveInvalid(f"the archive holds a {kind} database, this machine's Prefect database is "
                                     f"{database.describe()}; restore it where it was taken")
            try:
                count = _extract(tar, members, manifest, staging)
            except (tarfile.TarError, EOFError) as exc:
                raise ArchiveInvalid(f"the archive cannot be read ({exc}); nothing was restored") from exc
        copy = staging.joinpath(*PurePosixPath(manifest["database"]["member"]).parts)
        if database.kind == "sqlite":
            try:
                check_sqlite(copy)
            except DatabaseCopyFailed as exc:
                raise ArchiveInvalid(str(exc)) from exc
        areas = [a for a in manifest.get("areas", []) if isinstance(a, str) and (a in AREAS or a in FILES)]
        trusted = _commands(settings, staging, areas, trust)
        with _ServerLock(settings):
            _refuse_if_busy(settings)
            if settings.embedded:
                from dispatch.prefect.embedded import state_path, stop_strays

                stopped = stop_strays(settings)
                state_path(settings).unlink(missing_ok=True)
            if database.kind == "sqlite" and database.path is not None:
                database.path.parent.mkdir(parents=True, exist_ok=True)
                staged_db = database.path.parent / f".{database.path.name}.restoring"
                shutil.move(copy, staged_db)  # onto the database's file system, for an atomic replace
                copy = staged_db
            try:
                copy_in(database, copy)
            except DatabaseCopyFailed as exc:
                raise RestoreRefused(f"{exc}; the database and the home are unchanged") from exc
            _swap(settings, staging, areas)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if database.kind == "sqlite" and database.path is not None:
            (database.path.parent / f".{database.path.name}.restoring").unlink(missing_ok=True)
    return Restored(archive=archive, database=database.describe(), areas=areas, files=count,
                    created_at=str(manifest.get("created_at", ""))[:100], stopped_server=stopped,
                    seconds=time.monotonic() - began, trusted=trusted)
