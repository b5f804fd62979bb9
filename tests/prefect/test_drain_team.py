"""Drained nodes in team mode: the Prefect Variable `dispatch_drained` on the server (moved from tests/unit, which
runs without a Prefect server; the embedded store's tests stay in tests/unit/test_drain.py)."""

from __future__ import annotations

import pytest

from dispatch.core.drain import drain, drained_nodes, undrain
from dispatch.core.settings import get_settings
from dispatch.prefect.drained import drained_store

pytestmark = pytest.mark.prefect


def test_team_mode_keeps_the_drained_nodes_on_the_server(prefect_api, isolated_home):
    from prefect.variables import Variable

    settings = get_settings()
    assert not settings.embedded
    Variable.unset("dispatch_drained")
    assert drain(drained_store(settings), "n7", reason="disk full", by="bob@gw") is True
    assert Variable.get("dispatch_drained")["n7"]["reason"] == "disk full"
    assert not (settings.home / "drained.json").exists()
    assert list(drained_nodes(drained_store(settings))) == ["n7"]
    assert undrain(drained_store(settings), "n7") is True
    assert drained_nodes(drained_store(settings)) == {}


def test_the_team_drain_watch_reads_through_one_client_and_closes_it(prefect_api, isolated_home, monkeypatch):
    """Each read used to build a new client (TLS context, connection): the watch's thread keeps one."""
    import queue
    import threading

    from prefect.client.orchestration import SyncPrefectClient

    from dispatch.cluster.drain_watch import DrainWatch

    made: list[SyncPrefectClient] = []
    original = SyncPrefectClient.__init__

    def counted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if threading.current_thread().name == "drain-watch":
            made.append(self)

    monkeypatch.setattr(SyncPrefectClient, "__init__", counted)
    settings = get_settings()
    undrain(drained_store(settings), "n8")
    changes: queue.Queue = queue.Queue()
    watch = DrainWatch(settings, {}, changes.put, interval=0.05)
    try:
        for _ in range(3):  # several reads before and after a change
            drain(drained_store(settings), "n8", reason="disk", by="ann@box")
            assert list(changes.get(timeout=30)) == ["n8"]
            undrain(drained_store(settings), "n8")
            assert changes.get(timeout=30) == {}
    finally:
        watch.close()
        watch._thread.join(timeout=30)
    assert not watch._thread.is_alive()
    assert len(made) == 1, f"{len(made)} clients for the watch's reads"
    assert made[0]._closed, "the watch's thread closes its client when it stops"
