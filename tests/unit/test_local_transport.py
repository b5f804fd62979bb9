"""The `local` transport (dispatch/cluster/transports/local.py) with the real node runner as its subprocess."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dispatch.cluster.transports import RunRequest
from dispatch.cluster.transports.local import LocalTransport, live_runner, run_dir_for


def _request(root: Path, cache_key: str, argv: list[str]) -> RunRequest:
    workdir = root.parent / "code"
    workdir.mkdir(exist_ok=True)
    return RunRequest(project="shop", task_id="S01", node="local", cache_key=cache_key, run_id="r1",
                      workdir=str(workdir), root=str(root), steps=[{"name": "sh", "argv": argv}], timeout=120,
                      stall_timeout=120)


def test_an_edited_spec_waits_for_the_old_runner_to_stop_before_its_own_starts(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    transport = LocalTransport(root)
    old: dict = {}
    first = threading.Thread(target=lambda: old.update(result=transport.run(
        _request(root, "before-edit", ["sh", "-c", "trap '' TERM; sleep 60"]), lambda line: None)))
    first.start()
    run_dir = run_dir_for(root, "shop", "S01")
    deadline = time.monotonic() + 60
    while not live_runner(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_runner(run_dir), "the first runner never started"

    lines: list[str] = []
    result = transport.run(_request(root, "after-edit", ["sh", "-c", "echo edited"]), lines.append)

    first.join(timeout=60)
    assert result.status == "succeeded", (result.status, result.reason, lines)
    assert "edited" in "\n".join(lines)
    assert old["result"].status != "succeeded", "the edited spec's old runner must not finish its work"


def test_the_result_keeps_what_the_runner_reports(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    request = _request(root, "k", ["true"]).model_copy(update={"acceptance": ["true"]})

    result = LocalTransport(root).run(request, lambda line: None)

    assert result.status == "succeeded", result.reason
    assert len(result.runner_version) == 64 and result.hostname and result.workdir == request.workdir
    assert result.acceptance[0].duration is not None and result.acceptance[0].duration >= 0
    assert result.skipped_models == []
