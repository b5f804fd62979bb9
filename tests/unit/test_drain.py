from __future__ import annotations

import json

import pytest

from dispatch.core.drain import drain, drained_nodes, undrain
from dispatch.core.errors import UnsafePath
from dispatch.core.settings import get_settings
from dispatch.prefect.drained import drained_store


@pytest.fixture
def embedded(isolated_home, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.embedded
    return settings


def test_drain_and_undrain_embedded_round_trip(embedded):
    settings = embedded
    assert drained_nodes(drained_store(settings)) == {}
    assert drain(drained_store(settings), "n1", reason="sshd down 3 checks", by="guardian") is True
    assert drain(drained_store(settings), "n1", reason="again", by="alice") is False  # the first reason is kept
    drained = drained_nodes(drained_store(settings))
    assert list(drained) == ["n1"] and drained["n1"]["reason"] == "sshd down 3 checks"
    assert json.loads((settings.home / "drained.json").read_text())["n1"]["by"] == "guardian"
    assert undrain(drained_store(settings), "n1") is True
    assert undrain(drained_store(settings), "n1") is False
    assert drained_nodes(drained_store(settings)) == {}


def test_damaged_file_counts_as_nothing_drained_and_bad_names_are_refused(embedded):
    settings = embedded
    (settings.home / "drained.json").write_text("{not json")
    assert drained_nodes(drained_store(settings)) == {}
    (settings.home / "drained.json").write_text(json.dumps({"n1": "x", "n2": {"reason": "r"}}))
    assert list(drained_nodes(drained_store(settings))) == ["n2"]
    with pytest.raises(UnsafePath):
        drain(drained_store(settings), "../etc", reason="x", by="y")
