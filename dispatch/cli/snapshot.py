"""`dispatch snapshot` and `dispatch restore`: the scheduler's history into one archive, and back.

    dispatch snapshot [--dest DIR] [--keep N] [--json]   the Prefect database + DISPATCH_HOME's history, checksummed
    dispatch restore <archive> [--json] [--trust]         all or nothing; refused while a dispatcher runs

Exit codes: 0 done; 1 refused (something still runs) or the database copy failed; 2 invalid input (a damaged,
tampered or unsafe archive, a missing checksum file, a bad setting). Neither imports Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from dispatch.cli.common import EXIT_FAILED, EXIT_INVALID, console, err
from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings


def _fail(exc: Exception, code: int) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(code)


def snapshot(
    dest: Annotated[Path | None, typer.Option(help="Directory for the archive (default DISPATCH_SNAPSHOT_DIR, "
                                                   "else DISPATCH_HOME/snapshots).")] = None,
    keep: Annotated[int | None, typer.Option(min=1, max=3650, help="Keep the newest archive of each of the last N "
                                                                   "days (default DISPATCH_SNAPSHOT_KEEP, 14).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Write one timestamped archive of the Prefect database and DISPATCH_HOME's state, reports and cache."""
    from dispatch.ops.snapshot import SnapshotError, take_snapshot

    settings = get_settings()
    try:
        shot = take_snapshot(settings, dest, keep)
    except ConfigError as exc:
        raise _fail(exc, EXIT_INVALID) from None
    except SnapshotError as exc:
        raise _fail(exc, EXIT_FAILED) from None
    if as_json:
        console.print_json(data={"archive": str(shot.archive), "sha256": shot.checksum, "bytes": shot.size,
                                 "files": shot.files, "database": shot.database, "seconds": round(shot.seconds, 3),
                                 "skipped": len(shot.skipped), "pruned": [str(p) for p in shot.pruned]})
        return
    console.print(f"wrote {escape(str(shot.archive))} ({shot.size / 2**20:.1f} MiB, {shot.files} files, "
                  f"{escape(shot.database)}) in {shot.seconds:.1f}s\n  sha256 {shot.checksum}", soft_wrap=True)
    if shot.skipped:
        console.print(f"  [dim]left out {len(shot.skipped)} symbolic link(s) or special file(s), e.g. "
                      f"{escape(shot.skipped[0]['path'])}[/]", soft_wrap=True)
    for path in shot.pruned:
        console.print(f"  removed {escape(str(path))}", soft_wrap=True)


def restore(
    archive: Annotated[Path, typer.Argument(help="An archive written by `dispatch snapshot` (its .sha256 beside it).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    trust: Annotated[bool, typer.Option(
        "--trust", help="Accept settings of the archive that run commands (an ssh_config with Match exec or "
                        "ProxyCommand, a node's python with shell syntax, ...); without it they are refused.")]
    = False,
):
    """Bring back a snapshot: the Prefect database (runs, states) and DISPATCH_HOME's state, reports and cache.

    Checks the archive's checksum and every member first; refused while a dispatcher of this home runs (or, in
    team mode, a flow run of ours on the server). Stops this home's local Prefect server if it runs.
    """
    from dispatch.ops.restore import ArchiveInvalid, RestoreRefused
    from dispatch.ops.restore import restore as restore_archive

    settings = get_settings()
    try:
        done = restore_archive(settings, archive.expanduser(), trust=trust)
    except (ArchiveInvalid, ConfigError) as exc:
        raise _fail(exc, EXIT_INVALID) from None
    except RestoreRefused as exc:
        raise _fail(exc, EXIT_FAILED) from None
    if as_json:
        console.print_json(data={"archive": str(done.archive), "created_at": done.created_at,
                                 "database": done.database, "areas": done.areas, "files": done.files,
                                 "stopped_server": done.stopped_server, "seconds": round(done.seconds, 3),
                                 "trusted": done.trusted,
                                 "restart_server": done.database.startswith("PostgreSQL")})
        return
    for line in done.trusted:
        console.print(f"[yellow]trusted (--trust), will run:[/] {escape(line)}", soft_wrap=True)
    if done.stopped_server:
        console.print(f"stopped the local Prefect server (pid {', '.join(map(str, done.stopped_server))}); the next "
                      "command starts it again")
    console.print(f"restored the snapshot of {escape(done.created_at)} into {escape(done.database)} and "
                  f"{escape(str(settings.home))} ({', '.join(done.areas) or 'no home areas'}; {done.files} files) "
                  f"in {done.seconds:.1f}s", soft_wrap=True)
    if done.database.startswith("PostgreSQL"):
        console.print("[yellow]now restart the team's Prefect server[/] (`systemctl restart prefect-server`): its "
                      "open connections still hold plans of the tables the restore replaced", soft_wrap=True)
