"""The nightly regression: `prefect deploy` creates it (and `pipeline`) with its active 02:00 UTC schedule on a
real server; a night that got worse notifies through a real Prefect notification block, a quiet night does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures.shop import EXAMPLE, REPO

pytestmark = pytest.mark.prefect

_PREFECT = [sys.executable, "-m", "prefect"]


def _prefect(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*_PREFECT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PREFECT_CLI_PROMPT": "false"})


def test_prefect_deploy_creates_the_nightly_regression_with_its_schedule_and_the_pipeline(prefect_api):
    from prefect.client.orchestration import get_client

    created = _prefect("work-pool", "create", "dispatch-gateway", "--type", "process")
    assert created.returncode == 0 or "already exists" in created.stdout + created.stderr, created.stderr
    deployed = _prefect("deploy", "--name", "nightly-regression", "--name", "pipeline")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("nightly-regression/nightly-regression")
        pipeline = client.read_deployment_by_name("pipeline/pipeline")
    [schedule] = nightly.schedules
    assert schedule.active is True
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert nightly.parameters == {"projects": ["shop"], "notify": None}
    assert nightly.entrypoint == "flows/nightly_regression.py:nightly_regression"
    assert pipeline.entrypoint == "flows/pipeline.py:pipeline" and pipeline.schedules == []
    assert {"project", "from_layer", "to_layer"} <= set(pipeline.parameters)


@pytest.fixture
def webhook():
    """A webhook receiver on loopback: the notifications it got, as JSON bodies."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_a_night_that_got_worse_notifies_and_a_quiet_night_does_not(shop, webhook, prefect_api):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.nightly_regression import nightly_regression

    url, received = webhook
    CustomWebhookNotificationBlock(name="nightly", url=url, allow_private_urls=True,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(
        "dispatch-nightly-test", overwrite=True)
    shop.repair()
    shop.save(notify="custom-webhook/dispatch-nightly-test",
              layers={"L4b": {"enabled": False}, "L4c": {"enabled": False}})

    assert nightly_regression(["shop"]) == {"shop": []}  # the first night: nothing to compare with
    assert nightly_regression(["shop"]) == {"shop": []}  # unchanged: quiet
    assert received == []

    shutil.copy(EXAMPLE / "code" / "app" / "search.py", shop.code / "app" / "search.py")  # the XSS is back
    found = nightly_regression(["shop"])["shop"]

    assert "L4 was PASS, now FAIL" in found
    assert "API case newly failing: GET /api/search | script payload in query" in found
    [message] = received
    assert message["subject"] == "Nightly regression: shop got worse"
    assert "GET /api/search | script payload in query" in message["body"]
    nights = sorted((shop.home / "pipeline" / "shop" / "nightly").glob("*.json"))
    assert len(nights) == 3 and json.loads(nights[-1].read_text())["layers"]["L4"] == "FAIL"
    assert Path(nights[0]).stem < Path(nights[-1]).stem
