"""The `snapshot` flow of the daily deployment, run on the session's Prefect server: an archive, retention,
and the artifact that names it."""

from __future__ import annotations

import sqlite3
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect


def test_the_snapshot_flow_writes_an_archive_prunes_and_reports_it(prefect_api, isolated_home: Path,
                                                                   monkeypatch) -> None:
    from prefect.artifacts import Artifact

    from dispatch.core.settings import get_settings
    from flows.snapshot import snapshot

    database = isolated_home / "server-db" / "prefect.db"  # a team server's database on SQLite, named by URL
    database.parent.mkdir()
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE flow_run (id TEXT)")
    monkeypatch.setenv("DISPATCH_SNAPSHOT_DATABASE_URL", f"sqlite+aiosqlite:///{database}")
    (isolated_home / "home" / "state").mkdir()
    (isolated_home / "home" / "state" / "demo.json").write_text("{}")
    dest = isolated_home / "snaps"
    dest.mkdir()
    old = [dest / f"oyster-dispatch-snapshot-2026010{day}T000000Z.tar.gz" for day in range(1, 4)]
    for path in old:
        path.write_text("old")
    get_settings.cache_clear()

    archive = Path(snapshot(str(dest), keep=2))

    assert archive.parent == dest and archive.with_name(archive.name + ".sha256").is_file()
    with tarfile.open(archive) as tar:
        assert {"database/prefect.db", "home/state/demo.json", "manifest.json"} <= set(tar.getnames())
    assert [p.exists() for p in old] == [False, False, True]
    artifact = Artifact.get("snapshot")
    assert artifact is not None and str(archive) in str(artifact.data)
