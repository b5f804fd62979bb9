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
