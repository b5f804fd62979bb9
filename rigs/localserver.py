"""Throwaway servers on loopback for tests and benchmarks: a PostgreSQL cluster and a `prefect server` on it.

- `PostgresCluster`: `initdb` into a temporary directory (as the system user `dispatchpg` when run as
  root: PostgreSQL refuses root), trust auth, `127.0.0.1:<free port>`, no Unix socket, a database
  `prefect`; its `url` is the asyncpg URL Prefect wants.
- `TeamServer`: `prefect server start` on that database (or on SQLite when no URL is given), its own
  PREFECT_HOME, filesystem concurrency-lease storage, and `PREFECT_SERVER_API_AUTH_STRING` when an auth
  string is given; `env()` is the environment of a client of it.

Production servers are systemd units (infra/, docs/team-mode.md); this is the same thing in a temp dir.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core import net

PG_USER = "dispatchpg"
DB_USER, DB_NAME = "dispatch", "prefect"
INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: apt-get install -y "
                "postgresql-15 (or any postgresql-NN), or put their directory on PATH")


def pg_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres.

    Raises:
        RuntimeError: with the install hint, when they are not installed.
    """
    found = shutil.which("initdb")
    candidates = [str(Path(found).resolve().parent)] if found else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if all((Path(directory) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    raise RuntimeError(INSTALL_HINT)


def _as_pg_user(argv: list[str]) -> list[str]:
    """`argv` run as PG_USER when we are root (creating that system user if missing), else as is."""
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True)
    return ["runuser", "-u", PG_USER, "--", *argv]


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path, timeout: float = 180) -> None:
    """Wait until `<url>/health` answers 200.

    Raises:
        RuntimeError: with the log's tail, when the process dies or time runs out.
    """
    if net.wait_healthy(url, timeout, 0.3, alive=None if proc is None else lambda: proc.poll() is None):
        return
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"Prefect server at {url} did not come up; log tail:\n{tail}")


class PostgresCluster:
    """A fresh PostgreSQL cluster on a free loopback port with a database `prefect`."""

    def __init__(self) -> None:
        self.bin_dir = pg_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-pg-"))
        self.data = self.root / "data"
        self.port = net.free_port()
        self.url = f"postgresql+asyncpg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def start(self) -> str:
        """Create, start and fill the cluster; returns its asyncpg URL."""
        if os.geteuid() == 0:
            _as_pg_user(["true"])  # creates the user if needed
            shutil.chown(self.root, PG_USER, PG_USER)
        subprocess.run(_as_pg_user([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", DB_USER,
                                    "--auth=trust", "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
        log = self.root / "postgres.log"
        started = subprocess.run(_as_pg_user([
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=200", "start"]),
            capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        asyncio.run(self._create_database())
        return self.url

    async def _create_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(user=DB_USER, host="127.0.0.1", port=self.port, database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
        finally:
            await conn.close()

    def stop(self) -> None:
        subprocess.run(_as_pg_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                    "stop"]), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class TeamServer:
    """A `prefect server start` subprocess on PostgreSQL (or SQLite without a URL), optionally with API auth."""

    database_url: str | None
    home: Path
    auth_string: str | None = None
    port: int = field(default_factory=net.free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a client of this server (overriding any PREFECT_API_URL of ours)."""
        env = {**os.environ, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(self.home / "client"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_AUTH_STRING", None)
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        env.update(extra)
        return env

    def start(self) -> None:
        env = {**os.environ, "PREFECT_HOME": str(self.home / "server"), "PREFECT_UI_ENABLED": "false",
               "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_API_AUTH_STRING", None)
        if self.auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                 str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop the server and start it again on the same port and database."""
        self.stop()
        self.start()
