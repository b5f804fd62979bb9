"""The node protocol (dispatch/runner/protocol.py): one result shape, one liveness test, one checksum, shipped."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.local import LocalTransport, live_runner, run_dir_for
from dispatch.runner import PROTOCOL_PATH, RUNNER_PATH, SHIPPED_FILES, protocol, runner_checksum, runner_dir_parts
from dispatch.runner.node_runner import load_task


def test_protocol_source_is_standard_library_python_3_8() -> None:
    tree = ast.parse(PROTOCOL_PATH.read_text(encoding="utf-8"), feature_version=(3, 8))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


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
    assert sorted(result) == sorted(protocol.RESULT_FIELDS) and result["runner_version"] == runner_checksum()


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


def test_the_checksum_covers_every_shipped_file_and_the_shipped_copy_reports_it(tmp_path: Path) -> None:
    assert [path.name for path in SHIPPED_FILES] == list(protocol.SHIPPED_NAMES)
    assert runner_checksum() == protocol.checksum(map(str, SHIPPED_FILES))
    assert runner_dir_parts() == (".runner", runner_checksum()[:16])
    for source in SHIPPED_FILES:
        shutil.copy(source, tmp_path / source.name)
    shipped = tmp_path / RUNNER_PATH.name
    version = subprocess.run([sys.executable, "-S", str(shipped), "version"], capture_output=True, text=True,
                             timeout=60, cwd="/")
    assert json.loads(version.stdout)["runner_version"] == runner_checksum(), version.stderr
    (tmp_path / "protocol.py").write_text(PROTOCOL_PATH.read_text(encoding="utf-8") + "\n# changed\n")
    assert protocol.checksum(protocol.shipped_paths(str(tmp_path))) != runner_checksum()


def test_a_shipped_runner_without_its_protocol_module_fails_loudly(tmp_path: Path) -> None:
    shutil.copy(RUNNER_PATH, tmp_path / RUNNER_PATH.name)
    done = subprocess.run([sys.executable, "-S", str(tmp_path / RUNNER_PATH.name), "version"], capture_output=True,
                          text=True, timeout=60, cwd="/")
    assert done.returncode != 0 and "protocol" in done.stderr


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
