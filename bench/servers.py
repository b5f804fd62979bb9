"""`--server sqlite|postgres` for the benchmarks: a throwaway `prefect server` on 127.0.0.1 (dispatch/localserver.py).

`postgres` also starts a throwaway PostgreSQL cluster (team mode's backend); `sqlite` is the server's default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dispatch.localserver import PostgresCluster, TeamServer

KINDS = ("sqlite", "postgres")


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
