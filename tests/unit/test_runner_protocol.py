"""The node protocol (dispatch/runner/protocol.py): one result shape, one liveness test, one version, shipped as
one reproducible zipapp (dispatch/runner/zipapp.py)."""

from __future__ import annotations

import ast
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from dispatch.cluster.shipping import node_runner
from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.local import LocalTransport, live_runner, run_dir_for
from dispatch.runner import protocol, zipapp
from dispatch.runner.task import load_task
from tests.fixtures.runner import RUNNER_PATH, RUNNER_VERSION

PACKAGE = Path(zipapp.__file__).parent


def test_the_shipped_sources_are_standard_library_python_3_8_importing_each_other_relatively() -> None:
    assert "protocol.py" in zipapp.sources() and "shipping.py" not in zipapp.sources()
    for name in zipapp.sources():
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"), filename=name, feature_version=(3, 8))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, (name, imported)


def test_every_result_record_has_every_field_in_order_and_refuses_unknown_ones() -> None:
    record = protocol.result_record(project="p", task_id="t", status="failed", reason="r", runner_version="v",
                                    started_at=1.0, ended_at=2.0, duration=1.0, model="m")
    assert tuple(record) == protocol.RESULT_FIELDS
    assert record["attempts"] == [] and record["log_tail"] == "" and record["hostname"] is None
    assert record["model"] == "m" and record["status"] == "failed"
    with pytest.raises(TypeError, match="skiped_models"):
        protocol.result_record(project="p", task_id="t", status="failed", reason="r", runner_version="v",
                               started_at=1.0, ended_at=2.0, duration=1.0, skiped_models=[])


def test_runner_written_results_have_the_protocol_shape(tmp_path: Path) -> None:
    refused = tmp_path / "refused"
    refused.mkdir()
    (refused / "task.json").write_text("{}")  # no workdir: refused before the start
    done = subprocess.run([sys.executable, "-S", str(RUNNER_PATH), "run", str(refused)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    result = json.loads((refused / "result.json").read_text())
    assert sorted(result) == sorted(protocol.RESULT_FIELDS) and result["runner_version"] == RUNNER_VERSION


def test_the_task_the_dispatcher_writes_names_only_protocol_fields(tmp_path: Path) -> None:
    request = RunRequest(project="p", task_id="t", node="n", cache_key="k", run_id="r", workdir=str(tmp_path),
                         steps=[{"name": "sh", "argv": ["true"]}], timeout=10, stall_timeout=10)
    task = request.task_json()
    assert set(task) <= set(protocol.TASK_FIELDS), set(task) - set(protocol.TASK_FIELDS)
    (tmp_path / protocol.TASK_FILE).write_text(json.dumps(task))
    assert load_task(str(tmp_path)).task_id == "t"


def test_a_runner_is_alive_exactly_while_it_holds_its_run_directory_lock(tmp_path: Path) -> None:
    assert not protocol.runner_alive(str(tmp_path))  # no lock file
    lock = tmp_path / protocol.LOCK_FILE
    lock.write_text(f"{os.getpid()}\n")
    assert not protocol.runner_alive(str(tmp_path)) and protocol.lock_holder(str(tmp_path)) == os.getpid()
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert protocol.runner_alive(str(tmp_path))
        gone = threading.Event()
        waiter = threading.Thread(target=lambda: (protocol.wait_runner_gone(str(tmp_path)), gone.set()), daemon=True)
        waiter.start()
        assert not gone.wait(0.3), "returned while the lock was held"
    finally:
        os.close(fd)
    assert gone.wait(10), "did not return once the lock was released"
    assert not protocol.runner_alive(str(tmp_path))


def test_the_zipapp_is_reproducible_and_its_sha256_is_the_version_the_shipped_copy_reports(tmp_path: Path) -> None:
    first = zipapp.build().data
    zipapp._BUILT.clear()  # a second build from the sources, not the cached one
    second = zipapp.build()
    assert first == second.data and hashlib.sha256(first).hexdigest() == second.version
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names) and "__main__.py" in names and "dispatch_runner/ratelimits.py" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert {(info.date_time, info.external_attr >> 16, info.compress_type) for info in infos} == {
        ((1980, 1, 1, 0, 0, 0), 0o100644, zipfile.ZIP_STORED)}
    shipped = tmp_path / "elsewhere" / protocol.RUNNER_FILE  # no checkout, no dispatch package beside it
    shipped.parent.mkdir()
    shipped.write_bytes(first)
    version = subprocess.run([sys.executable, "-I", "-S", str(shipped), "version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
    assert version.returncode == 0, version.stderr
    assert json.loads(version.stdout)["runner_version"] == second.version == protocol.checksum(str(shipped))


def test_every_source_of_the_package_changes_the_version(tmp_path: Path) -> None:
    built = zipapp.build()
    shutil.copytree(PACKAGE, tmp_path / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "runner" / "protocol.py").write_text((PACKAGE / "protocol.py").read_text() + "\n# changed\n")
    probe = "import sys; sys.path.insert(0, sys.argv[1]); from runner import zipapp; print(zipapp.build().version)"
    changed = subprocess.run([sys.executable, "-I", "-c", probe, str(tmp_path)], capture_output=True, text=True,
                             timeout=60)
    assert changed.returncode == 0, changed.stderr
    assert len(changed.stdout.strip()) == 64 and changed.stdout.strip() != built.version


def test_a_node_keeps_the_runner_under_its_version_and_runs_it_with_its_python() -> None:
    runner = node_runner("~/dispatch", "/opt/py/bin/python3")
    short = zipapp.build().version[:16]
    assert runner.version == zipapp.build().version
    assert runner.path == f"~/dispatch/.runner/{short}/runner.pyz"
    assert runner.directory == f"~/dispatch/.runner/{short}"
    assert runner.command == f'/opt/py/bin/python3 "$HOME"/dispatch/.runner/{short}/runner.pyz'
    assert RUNNER_PATH.parent.name == short and RUNNER_PATH.read_bytes() == zipapp.build().data


def test_a_live_process_holding_no_run_lock_is_no_runner_and_is_never_signalled(tmp_path: Path) -> None:
    """The local node's liveness is the run directory's lock: a pid in status.json alone (the runner died
    without closing its books, its pid since reused by another process) is no runner."""
    root = tmp_path / "runs"
    run_dir = run_dir_for(root, "shop", "S01")
    run_dir.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / protocol.STATUS_FILE).write_text(json.dumps({"state": "running", "runner_pid": other.pid,
                                                                "heartbeat_at": time.time()}))
        assert live_runner(run_dir) is None
        assert LocalTransport(root).kill_project("shop") == 0
        assert other.poll() is None, "an unrelated process was signalled"
    finally:
        other.kill()
        other.wait()
