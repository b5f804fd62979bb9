"""The Prefect database a snapshot copies and a restore brings back: which one, and how.

- SQLite (the embedded default, `<PREFECT_HOME>/prefect.db` under DISPATCH_HOME, or a `sqlite` URL in
  `PREFECT_API_DATABASE_CONNECTION_URL`): copied with SQLite's online backup API, a consistent copy even
  while a server writes (a copy of the file and its WAL taken one after the other is not); restored by
  replacing the file, with the old WAL and shared-memory files removed so they cannot be replayed into it.
- PostgreSQL (a team server, its URL in `DISPATCH_SNAPSHOT_DATABASE_URL` or the server's
  `PREFECT_API_DATABASE_CONNECTION_URL`): `pg_dump --format=custom`, restored with `pg_restore --clean
  --single-transaction` (all or nothing). The password travels in `PGPASSWORD`, never in argv or a message.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dispatch.core.errors import ConfigError, DispatchError
from dispatch.core.settings import DispatchSettings

_PG_TIMEOUT = 6 * 3600.0
_STDERR_TAIL = 2000


class DatabaseCopyFailed(DispatchError):
    """pg_dump, pg_restore or the SQLite backup failed (the message says which and why)."""


@dataclass(frozen=True)
class Database:
    """Where the Prefect database is: an SQLite file, or a PostgreSQL server (its URL a secret)."""

    kind: str  # "sqlite" or "postgresql"
    path: Path | None = None
    url: str | None = field(default=None, repr=False)  # may hold the password

    @property
    def member(self) -> str:
        """The archive member that holds its copy."""
        return "database/prefect.db" if self.kind == "sqlite" else "database/prefect.dump"

    def describe(self) -> str:
        """Where it is, for a message: the file, or the PostgreSQL host and database (never the password)."""
        if self.kind == "sqlite":
            return f"SQLite {self.path}"
        parts = urlsplit(self.url or "")
        return f"PostgreSQL {parts.hostname}:{parts.port or 5432}/{parts.path.lstrip('/')}"


def locate(settings: DispatchSettings) -> Database | None:
    """This machine's Prefect database, or None when it is elsewhere (team mode without a database URL).

    Raises:
        ConfigError: the configured URL is neither SQLite nor PostgreSQL.
    """
    secret = settings.snapshot_database_url
    url = secret.get_secret_value() if secret is not None else ""
    if url:
        scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme in ("postgresql", "postgres"):
            return Database("postgresql", url=url)
        if scheme == "sqlite" and url.count("/") >= 3:
            return Database("sqlite", path=Path(url.split("://", 1)[1][1:].split("?", 1)[0]))
        raise ConfigError(f"DISPATCH_SNAPSHOT_DATABASE_URL / PREFECT_API_DATABASE_CONNECTION_URL: scheme {scheme!r} "
                          f"is not supported; give postgresql+asyncpg://... or sqlite+aiosqlite:///<file>")
    if not settings.embedded:
        return None
    return Database("sqlite", path=(settings.prefect_home or settings.home / "prefect") / "prefect.db")


def _pg_env(url: str) -> dict[str, str]:
    """libpq's environment for `url` (host, port, user, password, database), so argv carries no secret."""
    parts = urlsplit(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGHOST": parts.hostname or "127.0.0.1", "PGPORT": str(parts.port or 5432),
                "PGDATABASE": unquote(parts.path.lstrip("/")) or "prefect", "PGCONNECT_TIMEOUT": "10"})
    if parts.username:
        env["PGUSER"] = unquote(parts.username)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


def _pg_tool(name: str) -> str:
    """The newest `pg_dump`/`pg_restore` on PATH or under /usr/lib/postgresql (newer ones read older servers).

    Raises:
        ConfigError: not installed.
    """
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0, reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: apt-get install -y postgresql-client (the same major version as the "
                          f"server, or newer)")
    return found


def _run_pg(argv: list[str], url: str, what: str) -> None:
    try:
        done = subprocess.run(argv, env=_pg_env(url), capture_output=True, text=True, timeout=_PG_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DatabaseCopyFailed(f"{what} did not finish within {_PG_TIMEOUT:.0f}s") from exc
    if done.returncode != 0:
        raise DatabaseCopyFailed(f"{what} exited {done.returncode}: {done.stderr.strip()[-_STDERR_TAIL:]}")


def copy_out(database: Database, target: Path) -> None:
    """Write a consistent copy of `database` to `target` (an SQLite file, or a pg_dump custom-format file).

    Raises:
        DatabaseCopyFailed: the database is missing or the copy failed.
        ConfigError: pg_dump is not installed.
    """
    if database.kind == "postgresql":
        url = database.url or ""
        _run_pg([_pg_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={target}"], url,
                f"pg_dump of {database.describe()}")
        return
    assert database.path is not None
    if not database.path.is_file():
        raise DatabaseCopyFailed(f"no Prefect database at {database.path}: nothing has run on this DISPATCH_HOME yet "
                                 f"(or PREFECT_HOME points elsewhere)")
    try:
        source = sqlite3.connect(f"file:{database.path}?mode=ro", uri=True, timeout=30)
        try:
            copy = sqlite3.connect(target)
            with copy:
                source.backup(copy)  # one step: a single read transaction, a consistent copy
            copy.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise DatabaseCopyFailed(f"SQLite backup of {database.path} failed: {exc}") from exc


def check_sqlite(path: Path) -> None:
    """Refuse a copy that SQLite itself finds damaged.

    Raises:
        DatabaseCopyFailed: it is no SQLite database, or `PRAGMA quick_check` reports damage.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise DatabaseCopyFailed(f"the archive's database is no usable SQLite database: {exc}") from exc
    if verdict != "ok":
        raise DatabaseCopyFailed(f"the archive's database is damaged: {str(verdict)[:200]}")


def copy_in(database: Database, source: Path) -> None:
    """Replace `database` with the copy in `source` (the caller made sure that nothing uses it).

    SQLite: the file is moved into place (`source` must be on the same file system), after the old WAL and
    shared-memory files are removed. PostgreSQL: pg_restore in one transaction, so a failure changes nothing.

    Raises:
        DatabaseCopyFailed: pg_restore failed (the database is unchanged).
        ConfigError: pg_restore is not installed.
    """
    if database.kind == "postgresql":
        url = database.url or ""
        _run_pg([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
                 "--exit-on-error", f"--dbname={_pg_env(url)['PGDATABASE']}", str(source)], url,
                f"pg_restore into {database.describe()}")
        return
    assert database.path is not None
    database.path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{database.path}{suffix}").unlink(missing_ok=True)
    os.replace(source, database.path)
