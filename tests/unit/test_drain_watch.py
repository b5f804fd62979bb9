from __future__ import annotations

import queue

import pytest

from dispatch.cluster.drain_watch import DrainWatch, read_drained
from dispatch.core.drain import drain, undrain
from dispatch.core.settings import get_settings
from dispatch.prefect.drained import drained_store


@pytest.fixture
def embedded(isolated_home, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    return get_settings()


def test_the_watch_reports_each_change_of_the_drained_set_once(embedded):
    settings = embedded
    changes: queue.Queue = queue.Queue()
    watch = DrainWatch(settings, read_drained(settings) or {}, changes.put, interval=0.05)
    try:
        drain(drained_store(settings), "n1", reason="disk", by="ann@box")
        assert list(changes.get(timeout=10)) == ["n1"]
        drain(drained_store(settings), "n1", reason="again", by="bob@box")  # no change of the set: nothing reported
        drain(drained_store(settings), "n2", reason="fan", by="ann@box")
        assert sorted(changes.get(timeout=10)) == ["n1", "n2"]
        undrain(drained_store(settings), "n1")
        undrain(drained_store(settings), "n2")
        assert changes.get(timeout=10) == {}
    finally:
        watch.close()


def test_a_failed_read_keeps_the_last_known_set(embedded, monkeypatch):
    import threading

    import httpx

    import dispatch.cluster.drain_watch as drain_watch

    settings = embedded
    changes: queue.Queue = queue.Queue()
    failed = queue.Queue()
    server_back = threading.Event()

    def flaky(settings):
        if not server_back.is_set():
            failed.put(True)
            raise httpx.ConnectError("server away")
        return {}

    monkeypatch.setattr(drain_watch, "drained_nodes", flaky)
    watch = DrainWatch(settings, {"n1": {"reason": "disk", "by": "ann", "since": 1.0}}, changes.put, interval=0.05)
    try:
        for _ in range(3):
            failed.get(timeout=10)
        assert changes.empty(), "a server that blinks undrains nothing"
        server_back.set()
        assert changes.get(timeout=10) == {}  # the next good read does
    finally:
        watch.close()
