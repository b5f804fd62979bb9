"""The `local` transport (dispatch/cluster/transports/local.py) with the real node runner, through its node agent
(`runner.pyz serve` as the transport's subprocess)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.local import LocalStream, LocalTransport, live_runner, run_dir_for


def _request(root: Path, cache_key: str, argv: list[str]) -> RunRequest:
    workdir = root.parent / "code"
    workdir.mkdir(exist_ok=True)
    return RunRequest(project="shop", task_id="S01", node="local", cache_key=cache_key, run_id="r1",
                      workdir=str(workdir), root=str(root), steps=[{"name": "sh", "argv": argv}], timeout=120,
                      stall_timeout=120)


def _wait_live(run_dir: Path) -> dict:
    deadline = time.monotonic() + 60
    while not live_runner(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    status = live_runner(run_dir)
    assert status, "the runner never started"
    return status


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_an_edited_spec_waits_for_the_old_runner_to_stop_before_its_own_starts(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with LocalTransport(root) as transport:
        old: dict = {}
        first = threading.Thread(target=lambda: old.update(result=transport.run(
            _request(root, "before-edit", ["sh", "-c", "trap '' TERM; sleep 60"]), lambda line: None)))
        first.start()
        _wait_live(run_dir_for(root, "shop", "S01"))

        lines: list[str] = []  # its new runner takes a while: a kill meant for the old one must not reach it
        result = transport.run(_request(root, "after-edit", ["sh", "-c", "sleep 2; echo edited"]), lines.append)

        first.join(timeout=60)
    assert result.status == "succeeded", (result.status, result.reason, lines)
    assert "edited" in "\n".join(lines)
    assert old["result"].status != "succeeded", "the edited spec's old runner must not finish its work"


def test_a_cancelled_attempt_is_killed_through_the_agent_and_waited_for(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with LocalTransport(root) as transport:
        done: dict = {}
        attempt = threading.Thread(target=lambda: done.update(result=transport.run(
            _request(root, "k", ["sh", "-c", "trap '' TERM; sleep 60"]), lambda line: None)))
        attempt.start()
        run_dir = run_dir_for(root, "shop", "S01")
        _wait_live(run_dir)

        transport.cancel("shop", "S01")

        assert live_runner(run_dir, stale_after=float("inf")) is None, "cancel returned before the runner was gone"
        attempt.join(timeout=30)
    assert done["result"].status == "killed", (done["result"].status, done["result"].reason)


def test_the_result_keeps_what_the_runner_reports(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    request = _request(root, "k", ["true"]).model_copy(update={"acceptance": ["true"]})

    with LocalTransport(root) as transport:
        result = transport.run(request, lambda line: None)

    assert result.status == "succeeded", result.reason
    assert len(result.runner_version) == 64 and result.hostname and result.workdir == request.workdir
    assert result.acceptance[0].duration is not None and result.acceptance[0].duration >= 0
    assert result.skipped_models == []


def test_a_local_attempt_runs_under_the_transports_serve_agent_which_close_ends(tmp_path: Path) -> None:
    """The runner is forked by the transport's `runner.pyz serve` (its parent), as on an SSH node; closing the
    transport ends that agent at once, and the runner goes on."""
    root = tmp_path / "runs"
    transport = LocalTransport(root)
    done: dict = {}
    attempt = threading.Thread(target=lambda: done.update(result=transport.run(
        _request(root, "k", ["sh", "-c", "sleep 2; echo finished"]), lambda line: None)))
    attempt.start()
    runner = int(_wait_live(run_dir_for(root, "shop", "S01"))["runner_pid"])
    stream = transport.agent._stream
    try:
        assert isinstance(stream, LocalStream), "the local attempt does not go through a node agent"
        assert _parent(runner) == stream.proc.pid, "the runner is not the local agent's child"
        assert b"serve" in Path(f"/proc/{stream.proc.pid}/cmdline").read_bytes()
        attempt.join(timeout=60)
        assert done["result"].status == "succeeded", done["result"].reason
    finally:
        transport.close()
    assert stream.proc.poll() is not None, "closing the transport must end its agent"


_DISPATCHER = """
import fcntl, os, sys
from pathlib import Path
from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.local import LocalTransport
slot = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT)
fcntl.flock(slot, fcntl.LOCK_EX)
LocalTransport(Path(sys.argv[1])).run(RunRequest.model_validate_json(sys.argv[3]), print, slot_fd=slot)
"""


def test_a_restarted_dispatcher_re_attaches_to_the_local_runner_which_kept_its_slot(tmp_path: Path) -> None:
    """A dispatcher killed mid-attempt: its agent ends, its runner goes on holding the machine slot it was given;
    a new transport re-attaches (the spec runs once) and gets the result, as over SSH."""
    root, ran, slot = tmp_path / "runs", tmp_path / "ran", tmp_path / "slot-0"
    request = _request(root, "k", ["sh", "-c", f"echo once >> {ran}; sleep 3; echo finished"])
    first = subprocess.Popen([sys.executable, "-c", _DISPATCHER, str(root), str(slot), request.model_dump_json()],
                             stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_live(run_dir_for(root, "shop", "S01"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the dispatcher dies; its agent sees its stdin end
        first.wait(timeout=30)
    probe = os.open(slot, os.O_RDWR)
    try:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        assert held, "the runner must keep the machine slot while it lives"

        lines: list[str] = []
        with LocalTransport(root) as transport:
            result = transport.run(request, lines.append)

        assert result.status == "succeeded", (result.status, result.reason, lines)
        assert any("re-attached to the running attempt" in line for line in lines), lines
        assert "finished" in lines
        assert ran.read_text() == "once\n", "the spec ran twice"
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the slot is free once the runner has ended
    finally:
        os.close(probe)
