"""Snapshot and restore in team mode: a real `prefect server` on PostgreSQL, `pg_dump` and `pg_restore`.

The module has its own database in the session's PostgreSQL cluster and its own server on it (with API auth),
so that deleting and restoring never touches what other tests keep on the shared `team_server`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tarfile
from base64 import b64encode
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fixtures.postgres import AUTH_STRING, TeamServer

pytestmark = [pytest.mark.prefect, pytest.mark.integration]

_DB = "prefect_snapshot"


async def _create_database(url: str) -> None:
    import asyncpg

    parts = urlsplit(url.replace("+asyncpg", ""))
    conn = await asyncpg.connect(user=parts.username, host=parts.hostname, port=parts.port, database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{_DB}"')
        await conn.execute(f'CREATE DATABASE "{_DB}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def own_server(postgres_url: str, tmp_path_factory: pytest.TempPathFactory):
    asyncio.run(_create_database(postgres_url))
    server = TeamServer(postgres_url.rsplit("/", 1)[0] + f"/{_DB}", tmp_path_factory.mktemp("snapshot-server"),
                        auth_string=AUTH_STRING)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


def _client(server: TeamServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10,
                        headers={"Authorization": "Basic " + b64encode(AUTH_STRING.encode()).decode()})


def _dispatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dispatch.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_postgres_snapshot_delete_restore_reads_back_the_same_runs_and_status(own_server: TeamServer,
                                                                              tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = own_server.env(DISPATCH_HOME=str(home), DISPATCH_LOCAL_SLOTS="3", COLUMNS="250",
                         DISPATCH_SNAPSHOT_DATABASE_URL=own_server.database_url)
    env.pop("DISPATCH_SPECS", None)  # the bundled demo
    started = _dispatch(env, "start", "demo")
    assert started.returncode == 0, started.stdout + started.stderr
    status = json.loads(_dispatch(env, "status", "demo", "--json").stdout)["projects"][0]
    client = _client(own_server)

    def read_back(flow_run_id: str) -> tuple[int, list[tuple]]:
        code = client.get(f"/flow_runs/{flow_run_id}").status_code
        tasks = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
        return code, sorted((t["id"], t["name"], t["state_type"]) for t in tasks)

    flow_run_id = status["flow_run_id"]
    code, tasks = read_back(flow_run_id)
    assert code == 200 and len(tasks) == 7 and {t[2] for t in tasks} == {"COMPLETED"}

    shot = _dispatch(env, "snapshot", "--dest", str(tmp_path / "snaps"), "--json")
    assert shot.returncode == 0, shot.stdout + shot.stderr
    archive = json.loads(shot.stdout)["archive"]
    assert "s3cret" not in shot.stdout + shot.stderr

    assert client.delete(f"/flow_runs/{flow_run_id}").status_code == 204
    for area in ("state", "results", "runs", "cache"):
        shutil.rmtree(home / area)
    assert read_back(flow_run_id) == (404, [])

    restored = _dispatch(env, "restore", archive)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restart the team's Prefect server" in restored.stdout
    own_server.restart()  # as the restore says: the running server's connections cached the old tables' plans
    client = _client(own_server)
    assert read_back(flow_run_id) == (200, tasks)
    run = client.get(f"/flow_runs/{flow_run_id}").json()
    assert run["state_type"] == "COMPLETED" and run["parameters"]["project"] == "demo"
    assert json.loads(_dispatch(env, "status", "demo", "--json").stdout)["projects"][0] == status


def test_postgres_restore_is_refused_while_a_flow_run_of_ours_runs(own_server: TeamServer, tmp_path: Path) -> None:
    env = own_server.env(DISPATCH_HOME=str(tmp_path / "home"), COLUMNS="250",
                         DISPATCH_SNAPSHOT_DATABASE_URL=own_server.database_url)
    shot = _dispatch(env, "snapshot", "--dest", str(tmp_path / "snaps"), "--json")
    assert shot.returncode == 0, shot.stdout + shot.stderr
    client = _client(own_server)
    flow = client.post("/flows/", json={"name": "dispatch-project"}).json()
    run = client.post("/flow_runs/", json={"flow_id": flow["id"], "name": "demo",
                                           "state": {"type": "RUNNING", "name": "Running"}}).json()

    refused = _dispatch(env, "restore", json.loads(shot.stdout)["archive"])
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert run["id"] in refused.stderr and "RUNNING" in refused.stderr
    assert client.get(f"/flow_runs/{run['id']}").status_code == 200  # the database was not touched
    client.post(f"/flow_runs/{run['id']}/set_state", json={"state": {"type": "CRASHED", "name": "Crashed"},
                                                          "force": True})


def test_infra_snapshot_script_writes_the_same_archive_through_dispatch(own_server: TeamServer,
                                                                        tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "infra" / "snapshot-db.sh"
    checked = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    env = {k: v for k, v in own_server.env(DISPATCH_HOME=str(tmp_path / "home")).items()
           if not k.startswith("PREFECT_API")}  # on the gateway: server.env names the database, no API URL
    env |= {"PREFECT_API_DATABASE_CONNECTION_URL": own_server.database_url or "",
            "DISPATCH": str(Path(sys.executable).with_name("dispatch"))}
    done = subprocess.run(["bash", str(script), str(tmp_path / "backups"), "3"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (archive,) = (tmp_path / "backups").glob("oyster-dispatch-snapshot-*Z.tar.gz")
    with tarfile.open(archive) as tar:
        assert "database/prefect.dump" in tar.getnames()
    assert archive.with_name(archive.name + ".sha256").is_file()
    bad = subprocess.run(["bash", str(script), str(tmp_path / "backups"), "0"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "KEEP must be a positive number" in bad.stderr
