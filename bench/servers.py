"""`--server sqlite|postgres` for the benchmarks: a throwaway `prefect server` on 127.0.0.1 (rigs/localserver.py).

`postgres` also starts a throwaway PostgreSQL cluster (team mode's backend); `sqlite` is the server's default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rigs.localserver import PostgresCluster, TeamServer

KINDS = ("sqlite", "postgres")


def stop_home_server(env: dict[str, str]) -> None:
    """Stop the local Prefect server that the embedded default left running for this env's DISPATCH_HOME.

    It stays up for the next command by design; in a benchmark it would idle on at ~4 % of a core for every
    run before, under the runs that follow (14 of them were found running after one morning's benchmarks)."""
    if env.get("PREFECT_API_URL") or not env.get("DISPATCH_HOME"):
        return
    subprocess.run([str(Path(sys.executable).with_name("dispatch")), "server", "stop"], env=env,
                   capture_output=True, timeout=120, check=False)


@contextmanager
def throwaway_server(kind: str | None, base: Path) -> Iterator[str | None]:
    """Yield the API URL of a new server of `kind` (exported as PREFECT_API_URL), or the ambient one for None."""
    if kind is None:
        yield os.environ.get("PREFECT_API_URL")
        return
    cluster = PostgresCluster() if kind == "postgres" else None
    server = TeamServer(cluster.start() if cluster else None, base / f"prefect-{kind}")
    previous = os.environ.get("PREFECT_API_URL")
    try:
        server.start()
        os.environ["PREFECT_API_URL"] = server.url
        yield server.url
    finally:
        server.stop()
        if cluster is not None:
            cluster.stop()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
