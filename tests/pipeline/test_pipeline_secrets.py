"""What the pipeline writes never holds a secret it knows: a key printed by an install or a start command is
masked in the app's log, the layer's reason and report, the console and the run's logs in Prefect (read back
through the API); a caller's variable whose name no shell can `unset` never reaches a step."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.pipeline.test_pipeline import _run

pytestmark = pytest.mark.prefect
KEY = "fake-shop-token-0123456789abcdef"
ODD_KEY = "fake-odd-name-0123456789abcdef"


def _logs_since(since: datetime) -> list[str]:
    """Every log message the Prefect API holds since `since` (this session's server is this process's)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log lines are shipped in batches: send every one still queued
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=since)),
                                    offset=len(messages), limit=200)
            messages += [log.message for log in page]
            if len(page) < 200:
                return messages


def test_a_key_printed_by_install_and_start_is_masked_everywhere_the_pipeline_writes(shop, prefect_api, monkeypatch,
                                                                                   caplog):
    monkeypatch.setenv("SHOP_SERVICE_TOKEN", KEY)  # the caller's: this process knows it, no step is given it
    monkeypatch.setenv("MY-API-KEY", ODD_KEY)  # a name `unset` cannot remove
    (shop.code / "token.txt").write_text(KEY + "\n")  # how the app's commands come to print it anyway
    shop.save(backend={"install": 'echo "install sees $(cat token.txt)"; env | cut -d= -f1',
                       "start": "sh -c 'echo \"start sees $(cat token.txt)\"; sleep 600'", "timeout": "2s"},
              layers={"L3": {"attempts": 1}})
    since = datetime.now(UTC)
    with caplog.at_level(logging.INFO):
        state, record = _run(from_layer="L3", to_layer="L3")

    assert state.is_failed() and record.layers[0].status.value == "FAIL"
    run_dir = Path(record.layers[0].report).parent
    backend_log = (run_dir / "L3" / "backend.log").read_text()
    assert "start sees ***" in backend_log and KEY not in backend_log
    report = json.loads((run_dir / "L3.json").read_text())
    assert "start sees ***" in report["evidence"]["log_tail"]
    logs = "\n".join(_logs_since(since))
    assert "install: install sees ***" in logs, "the install's lines reach the run's logs, masked"
    assert "its log ends:\nstart sees ***" in logs, "the console message quotes the app's log, masked"
    assert KEY not in logs and KEY not in caplog.text
    assert "MY-API-KEY" not in logs and ODD_KEY not in logs, "the odd name never reached the install"
