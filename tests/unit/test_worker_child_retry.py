"""The worker transport's child flow run retries the server's 409 only (dispatch/prefect/worker_transport.py),
with a fake Prefect client: no server."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import uuid4

import httpx
import pytest

from dispatch.prefect.worker_transport import WorkerTransport


class _FakeClient:
    """Answers `create_flow_run_from_deployment` with the given HTTP statuses first, then a flow run."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls = 0

    def create_flow_run_from_deployment(self, deployment_id, **kwargs):
        self.calls += 1
        if self.statuses:
            status = self.statuses.pop(0)
            request = httpx.Request("POST", "http://127.0.0.1:9/api/deployments/x/create_flow_run")
            raise httpx.HTTPStatusError(f"HTTP {status}", request=request, response=httpx.Response(status,
                                                                                                 request=request))
        return SimpleNamespace(id=uuid4(), kwargs=kwargs)


def _transport(client: _FakeClient) -> WorkerTransport:
    transport = WorkerTransport(SimpleNamespace(name="w1", pool="node-w1"), SimpleNamespace(client=client))
    transport._deployment_id = uuid4()
    return transport


_REQUEST = SimpleNamespace(project="demo", task_id="S01", run_id="r1", attempt=1,
                           model_dump=lambda mode: {"task_id": "S01"})


def test_a_child_refused_with_409_while_its_parent_is_recorded_is_created_on_a_retry():
    client = _FakeClient(409, 409)
    run = _transport(client)._create_child(_REQUEST, None)
    assert client.calls == 3
    assert run.kwargs["idempotency_key"] == "r1:S01:1", "a retry must be harmless if an earlier try landed"


def test_any_other_refusal_is_raised_at_once():
    client = _FakeClient(422)
    with pytest.raises(httpx.HTTPStatusError, match="HTTP 422"):
        _transport(client)._create_child(_REQUEST, None)
    assert client.calls == 1
