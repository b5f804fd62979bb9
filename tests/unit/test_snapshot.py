"""`dispatch snapshot` / `dispatch restore` on a home with a real SQLite database, through the real command.

The database here is a plain SQLite file where Prefect's would be (the embedded default's path): the archive's
checks, refusals and retention do not depend on what the tables hold. The round trips with Prefect's own
databases (a run of the demo, read back from the restored server) are in tests/prefect/test_snapshot_restore.py
(SQLite) and tests/integration/test_snapshot_team.py (PostgreSQL).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.fixtures.projects import DISPATCH


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "DISPATCH_HOME": str(tmp_path / "home"), "COLUMNS": "250", **extra}


def _dispatch(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([DISPATCH, *args], env=_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=60)


def _home(tmp_path: Path) -> Path:
    """A home with a run's state, a result, a cache entry and an SQLite database where Prefect's would be."""
    home = tmp_path / "home"
    for name, text in {"state/demo.json": json.dumps({"project": "demo", "state": "completed", "pid": 1}),
                       "results/demo/report.md": "# demo\n", "cache/demo--S01--abc": "{}",
                       "runs/demo/tasks/S01/task.log": "line\n" * 100, "nodes.json": '{"nodes": []}'}.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text)
    (home / "prefect").mkdir()
    db = sqlite3.connect(home / "prefect" / "prefect.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE flow_run (id TEXT, state TEXT)")
    db.execute("INSERT INTO flow_run VALUES ('run-1', 'COMPLETED')")
    db.commit()
    db.close()
    return home


def _snapshot(tmp_path: Path, dest: Path) -> Path:
    done = _dispatch(tmp_path, "snapshot", "--dest", str(dest), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return Path(json.loads(done.stdout)["archive"])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(home: Path) -> list[tuple]:
    db = sqlite3.connect(home / "prefect" / "prefect.db")
    try:
        return db.execute("SELECT id, state FROM flow_run").fetchall()
    finally:
        db.close()


def _write_sums(archive: Path) -> None:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    archive.with_name(archive.name + ".sha256").write_text(f"{digest}  {archive.name}\n")


def test_snapshot_then_restore_brings_back_the_database_and_the_home(tmp_path: Path) -> None:
    home = _home(tmp_path)
    before = _tree(home)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    sums = archive.with_name(archive.name + ".sha256").read_text().split()
    assert sums == [hashlib.sha256(archive.read_bytes()).hexdigest(), archive.name]
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest["database"]["kind"] == "sqlite"
    assert set(manifest["areas"]) == {"nodes.json", "state", "results", "runs", "cache"}
    assert manifest["files"]["home/state/demo.json"]["sha256"] == hashlib.sha256(before["state/demo.json"]).hexdigest()

    for area in ("state", "results", "cache", "runs", "prefect"):
        subprocess.run(["rm", "-rf", str(home / area)], check=True)
    (home / "nodes.json").unlink()
    (home / "state").mkdir()
    (home / "state" / "other.json").write_text("{}")  # made after the snapshot: gone after the restore

    done = _dispatch(tmp_path, "restore", str(archive))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _rows(home) == [("run-1", "COMPLETED")]
    after = _tree(home)
    assert {k: v for k, v in after.items() if not k.startswith(("prefect/", "locks/"))} == \
        {k: v for k, v in before.items() if not k.startswith("prefect/")}
    assert not list(home.glob(".restore-*")), "the staging directory is removed"


def test_a_tampered_archive_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    (home / "state" / "demo.json").write_text('{"project": "demo", "state": "failed", "pid": 1}')
    now = _tree(home)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))

    done = _dispatch(tmp_path, "restore", str(archive))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "sha256" in done.stderr and "does not match" in done.stderr
    assert _tree(home) == now

    archive.with_name(archive.name + ".sha256").unlink()
    missing = _dispatch(tmp_path, "restore", str(archive))
    assert missing.returncode == 2 and "checksum file is missing" in missing.stderr
    assert _tree(home) == now


def test_a_member_changed_behind_a_rewritten_checksum_is_refused(tmp_path: Path) -> None:
    """Whoever rewrites the archive and its .sha256 still meets the manifest's per-file sha256."""
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    forged = tmp_path / "snaps" / "forged.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(forged, "w:gz") as out:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == "home/state/demo.json":  # same size: only the sha256 can tell
                data = data.replace(b'"completed"', b'"evil-done"')
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    _write_sums(forged)
    (home / "state" / "demo.json").write_text("mine")
    now = _tree(home)

    done = _dispatch(tmp_path, "restore", str(forged))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "home/state/demo.json" in done.stderr and "manifest" in done.stderr
    assert _tree(home) == now and _rows(home) == [("run-1", "COMPLETED")]
    assert not list(home.glob(".restore-*"))


@pytest.mark.parametrize("name, kind", [("../escaped", tarfile.REGTYPE), ("<tmp>/absolute", tarfile.REGTYPE),
                                        ("home/state/link", tarfile.SYMTYPE), ("home/state/hard", tarfile.LNKTYPE),
                                        ("home/state/../../x", tarfile.REGTYPE), ("home/locks/x", tarfile.REGTYPE),
                                        ("home/pipeline", tarfile.REGTYPE)])
def test_unsafe_members_are_refused_before_anything_is_extracted(tmp_path: Path, name: str, kind: bytes) -> None:
    name = name.replace("<tmp>", str(tmp_path))  # an absolute path that a broken check writes only here
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    evil = tmp_path / "snaps" / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(evil, "w:gz") as out:
        bad = tarfile.TarInfo(name)
        bad.type = kind
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            bad.linkname = "/etc/passwd"
            out.addfile(bad)
        else:
            bad.size = 4
            out.addfile(bad, io.BytesIO(b"evil"))
        for member in src:  # the good members after it: none of them may be extracted either
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == "manifest.json" and kind == tarfile.REGTYPE:  # the forger lists it, right sha256
                manifest = json.loads(data)
                manifest["files"][name] = {"sha256": hashlib.sha256(b"evil").hexdigest(), "size": 4}
                data = json.dumps(manifest).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    _write_sums(evil)
    now = _tree(home)

    done = _dispatch(tmp_path, "restore", str(evil))
    assert done.returncode == 2, done.stdout + done.stderr
    assert repr(name)[:30] in done.stderr
    assert _tree(home) == now
    assert not list(home.glob(".restore-*")) and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "absolute").exists()


def test_restore_is_refused_while_a_dispatcher_runs(tmp_path: Path) -> None:
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    dispatcher = subprocess.Popen(["sleep", "60"])
    try:
        (home / "state" / "demo.json").write_text(json.dumps({"project": "demo", "state": "running",
                                                              "pid": dispatcher.pid}))
        now = _tree(home)
        done = _dispatch(tmp_path, "restore", str(archive))
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"dispatcher of demo (pid {dispatcher.pid})" in done.stderr
        assert _tree(home) == now
    finally:
        dispatcher.kill()
        dispatcher.wait()
    done = _dispatch(tmp_path, "restore", str(archive))  # the dispatcher is gone: the state file's pid is dead
    assert done.returncode == 0, done.stdout + done.stderr


def test_symbolic_links_are_never_followed_into_the_archive(tmp_path: Path) -> None:
    home = _home(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not ours")
    (home / "results" / "elsewhere").symlink_to(outside)
    (home / "state" / "secret.json").symlink_to(outside / "secret.txt")
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))
        assert all(b"not ours" not in tar.extractfile(m).read() for m in tar if m.isfile())
    assert not any("elsewhere" in n or "secret" in n for n in names)
    assert {s["why"] for s in manifest["skipped"]} == {"symbolic link"} and manifest["skipped_count"] == 2


def test_retention_keeps_the_newest_archive_of_each_of_the_last_n_days(tmp_path: Path) -> None:
    _home(tmp_path)
    dest = tmp_path / "snaps"
    dest.mkdir()
    old = []
    for day in range(1, 21):
        for clock in ("010000", "230000"):
            name = f"oyster-dispatch-snapshot-202601{day:02d}T{clock}Z.tar.gz"
            (dest / name).write_text("x")
            (dest / f"{name}.sha256").write_text("x")
            old.append(name)
    strangers = ["notes.tar.gz", "oyster-dispatch-snapshot-latest.tar.gz", "oyster-dispatch-snapshot-2026.txt"]
    for name in strangers:
        (dest / name).write_text("keep me")
    (dest / "oyster-dispatch-snapshot-20250101T000000Z.tar.gz").mkdir()  # not a file: never ours to delete
    target = tmp_path / "precious"
    target.write_text("keep me")
    (dest / "oyster-dispatch-snapshot-20250102T000000Z.tar.gz").symlink_to(target)

    done = _dispatch(tmp_path, "snapshot", "--dest", str(dest), "--keep", "3", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    new = Path(json.loads(done.stdout)["archive"]).name
    left = sorted(p.name for p in dest.iterdir())
    kept = [new, "oyster-dispatch-snapshot-20260120T230000Z.tar.gz", "oyster-dispatch-snapshot-20260119T230000Z.tar.gz"]
    assert left == sorted([*kept, *(f"{k}.sha256" for k in kept), *strangers,
                           "oyster-dispatch-snapshot-20250101T000000Z.tar.gz",
                           "oyster-dispatch-snapshot-20250102T000000Z.tar.gz"])
    assert target.read_text() == "keep me"


def test_team_mode_without_the_database_url_says_where_to_snapshot(tmp_path: Path) -> None:
    _home(tmp_path)
    done = _dispatch(tmp_path, "snapshot", "--dest", str(tmp_path / "snaps"), PREFECT_API_URL="http://127.0.0.1:9/api")
    assert done.returncode == 1
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in done.stderr and "DISPATCH_SNAPSHOT_DATABASE_URL" in done.stderr
    assert not (tmp_path / "snaps").exists()


def test_a_postgres_restore_without_the_team_servers_address_is_refused_and_hides_the_password(
        tmp_path: Path) -> None:
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    now = _tree(home)
    done = _dispatch(tmp_path, "restore", str(archive),
                     DISPATCH_SNAPSHOT_DATABASE_URL="postgresql+asyncpg://prefect:pa55word@127.0.0.1:9/prefect")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PREFECT_API_URL" in done.stderr and "pa55word" not in done.stdout + done.stderr
    assert _tree(home) == now


def test_restore_is_refused_while_a_runner_lives_or_the_local_server_is_being_started(tmp_path: Path) -> None:
    import fcntl

    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    runner = subprocess.Popen(["sleep", "60"])
    status = home / "runs" / "demo" / "tasks" / "S01" / "status.json"
    lock = os.open(status.with_name(".runner.lock"), os.O_RDWR | os.O_CREAT)  # held as a live runner holds it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(lock, f"{runner.pid}\n".encode())
        status.write_text(json.dumps({"state": "running", "runner_pid": runner.pid, "heartbeat_at": time.time()}))
        now = _tree(home)
        done = _dispatch(tmp_path, "restore", str(archive))
        assert done.returncode == 1 and "runner of demo/S01" in done.stderr, done.stdout + done.stderr
        assert _tree(home) == now
    finally:
        os.close(lock)
        runner.kill()
        runner.wait()
    lock = home / "locks" / "local-server.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a command starting the local server holds it
        now = _tree(home)
        done = _dispatch(tmp_path, "restore", str(archive))
        assert done.returncode == 1 and "starting the local Prefect server" in done.stderr, done.stdout + done.stderr
        assert _tree(home) == now and _rows(home) == [("run-1", "COMPLETED")]
