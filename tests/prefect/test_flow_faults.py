"""The project flow's fault paths on the real Prefect test server, with fake nodes (tests/fixtures/fake_transport.py)
instead of sshd: a node that breaks mid-run, a lost result, a raised connection error, a full node, a stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.core.errors import NodeError
from tests.fixtures.fake_transport import lost, node_fault, node_full, raises, slow, succeed
from tests.fixtures.projects import shell_spec

pytestmark = pytest.mark.prefect


def _specs(home: Path, project: str, *task_ids: str) -> None:
    for task_id in task_ids:
        shell_spec(home / "specs" / project, task_id, home / "timeline")  # never run: the nodes are fakes


def test_a_node_that_breaks_mid_run_is_taken_out_and_its_spec_runs_elsewhere(run_project, fake_cluster,
                                                                            isolated_home):
    _specs(isolated_home, "faulty", "S01", "S02", "S03")
    cluster = fake_cluster(n1=1, n2=1)
    cluster["n1"].script["S01"] = [node_fault(seconds=0.3)]
    cluster["n1"].default = cluster["n2"].default = succeed(0.5)
    state, summary = run_project("faulty")
    assert state.is_completed(), state.message
    assert summary.counts() == {"succeeded": 3}
    assert [(node, run.attempt, run.status) for node, run in cluster.runs("S01")] == \
        [("n1", 1, "lost"), ("n2", 2, "succeeded")]
    fault = cluster.runs("S01")[0][1].ended
    assert not [run.task_id for run in cluster["n1"].runs if run.started >= fault], "n1 got work while down"
    assert cluster["n1"].probes >= 1 and cluster["n2"].probes == 0  # probed in the background until it answers


@pytest.mark.parametrize("first", [lost(), raises(ConnectionResetError("connection reset by peer"))],
                         ids=["lost-result", "raised-connection-error"])
def test_an_attempt_that_comes_back_lost_is_retried(run_project, fake_cluster, isolated_home, first):
    _specs(isolated_home, "lossy", "S01")
    cluster = fake_cluster(n1=1)
    cluster["n1"].script["S01"] = [first]
    state, summary = run_project("lossy")
    assert state.is_completed(), state.message
    assert [(run.attempt, run.status) for _, run in cluster.runs("S01")] == [(1, "lost"), (2, "succeeded")]
    assert summary.specs["S01"].attempts == 2
    assert not cluster["n1"].down and cluster["n1"].probes == 0  # no node fault: the node stays up


def test_a_full_node_is_no_attempt_and_the_spec_is_placed_again(run_project, fake_cluster, isolated_home):
    _specs(isolated_home, "full", "S01")
    cluster = fake_cluster(n1=1)
    cluster["n1"].script["S01"] = [node_full()]
    state, summary = run_project("full")
    assert state.is_completed(), state.message
    assert [(run.attempt, run.status) for _, run in cluster.runs("S01")] == [(1, "node_full"), (1, "succeeded")]
    assert summary.specs["S01"].attempts == 1


def test_a_node_whose_runs_cannot_be_listed_gets_no_work(run_project, fake_cluster, isolated_home):
    _specs(isolated_home, "unlisted", "S01", "S02")
    cluster = fake_cluster(n1=2, n2=1)
    cluster["n1"].adopt_error, cluster["n1"].down = NodeError("n1", "connection refused"), True
    state, summary = run_project("unlisted")
    assert state.is_completed(), state.message
    assert cluster["n1"].runs == [] and len(cluster["n2"].runs) == 2


def test_stopping_the_dispatcher_cancels_the_running_attempt_on_its_node(run_project, fake_cluster, isolated_home,
                                                                         monkeypatch):
    import flows.dispatch_project as flow_module

    _specs(isolated_home, "stopped", "S01")
    cluster = fake_cluster(n1=1)
    runs = []
    install = flow_module._install_signal_handlers
    monkeypatch.setattr(flow_module, "_install_signal_handlers", lambda run: runs.append(run) or install(run))
    cluster["n1"].script["S01"] = [slow()]
    cluster["n1"].on_start = lambda request: runs[0].request_stop("stopped by the test")
    state, summary = run_project("stopped")
    assert state.is_cancelled(), state.message
    assert cluster["n1"].cancels == [("stopped", "S01")]
    (_, run), = cluster.runs("S01")
    assert run.status == "killed" and run.ended - run.started < 10
    assert summary.specs["S01"].state == "cancelled"
