"""The daily snapshot: the Prefect database and DISPATCH_HOME's history in one checksummed archive.

Deployed by `prefect deploy --all` (prefect.yaml, `snapshot`, cron 03:00 UTC, active), on the gateway's pool:
run its worker where the team server's `server.env` is loaded, so that `PREFECT_API_DATABASE_CONNECTION_URL`
names the PostgreSQL database for `pg_dump` (or set `DISPATCH_SNAPSHOT_DATABASE_URL`). By hand:
`prefect deployment run 'snapshot/snapshot' --param keep=30`, `python flows/snapshot.py [DEST]`, or simply
`dispatch snapshot` (no Prefect needed). What goes in, retention and restore: dispatch/ops/snapshot.py,
dispatch/ops/restore.py, the README's "Snapshots and restore".
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dispatch.core.settings import get_settings
from dispatch.ops.snapshot import take_snapshot


@flow(name="snapshot")
def snapshot(dest: str | None = None, keep: int | None = None) -> str:
    """Write one archive and apply retention.

    Args:
        dest: the destination directory; default DISPATCH_SNAPSHOT_DIR, else DISPATCH_HOME/snapshots.
        keep: keep the newest archive of each of the last `keep` days; default DISPATCH_SNAPSHOT_KEEP (14).

    Returns:
        The archive's path.
    """
    logger = get_run_logger()
    shot = take_snapshot(get_settings(), Path(dest) if dest else None, keep)
    logger.info("wrote %s (%d bytes, %d files, %s) in %.1fs; sha256 %s", shot.archive, shot.size, shot.files,
                shot.database, shot.seconds, shot.checksum)
    for path in shot.pruned:
        logger.info("retention removed %s", path)
    if shot.skipped:
        logger.warning("left out %d symbolic link(s) or special file(s), e.g. %s", len(shot.skipped),
                       shot.skipped[0]["path"])
    create_markdown_artifact(key="snapshot", description="the latest snapshot", markdown=(
        f"| archive | bytes | files | database | seconds | sha256 |\n|---|---|---|---|---|---|\n"
        f"| `{shot.archive}` | {shot.size} | {shot.files} | {shot.database} | {shot.seconds:.1f} "
        f"| `{shot.checksum}` |\n"
        f"\nRestore with `dispatch restore {shot.archive}`."))
    return str(shot.archive)


if __name__ == "__main__":
    import sys

    snapshot(sys.argv[1] if len(sys.argv) > 1 else None)
