"""One builder for results of attempts that did not succeed, one rule for a missing reason."""

from __future__ import annotations

from dispatch.cluster.transports import RunRequest, explained, failure
from dispatch.core.results import Attempt, SpecResult


def _request() -> RunRequest:
    return RunRequest(project="p", task_id="t", node="n1", attempt=3, cache_key="k", run_id="r", workdir="/w",
                      steps=[], timeout=10, stall_timeout=5)


def test_request_failure_carries_the_attempt() -> None:
    result = _request().failure("refused", retryable=False)
    assert (result.project, result.task_id, result.node, result.attempt, result.cache_key, result.run_id) == (
        "p", "t", "n1", 3, "k", "r")
    assert (result.status, result.reason, result.retryable, result.node_fault) == ("failed", "refused", False, False)
    lost = _request().failure("gone", status="lost", node_fault=True, node="other", run_dir="/x")
    assert (lost.status, lost.node, lost.run_dir, lost.retryable, lost.node_fault) == ("lost", "other", "/x", True,
                                                                                       True)


def test_missing_reason_has_one_rule() -> None:
    assert failure("p", "t", "").reason == "failed"
    assert failure("p", "t", "", status="lost", exit_code=3).reason == "lost (exit code 3)"
    tried = SpecResult(project="p", task_id="t", status="failed", exit_code=1,
                       attempts=[Attempt(model="glm", reason="429 quota")])
    assert explained(tried).reason == "failed: 429 quota"
    assert explained(SpecResult(project="p", task_id="t", status="stalled", reason="no output")).reason == "no output"
    assert explained(SpecResult(project="p", task_id="t", status="succeeded")).reason == ""
