"""The whole L4-L5 loop with the agent side's real `fix` layer (flows/layers/fix.py, by its import path): the
fake agent CLI, as the `fix` model, really rewrites the example's defective files, the second L4 cycle passes
and L6 deploys; with an agent that changes nothing, the pipeline FAILs after 3 cycles listing the open bugs.

These need the pipe-agents branch merged (flows/layers/fix.py, and `fake_agents` in tests/conftest.py): before
that they fail.
The fake agent writes what `FAKE: write <path> <line>` lines in its prompt say; they reach every fix spec's
prompt through the project's SHARED_CONTEXT.md (context handed to agents).
"""

from __future__ import annotations

import pytest

from tests.fixtures.shop import EXAMPLE
from tests.pipeline.test_pipeline import _run, _top, deployed  # noqa: F401 - the deploy fixture

pytestmark = pytest.mark.prefect
FIXED = ["app/cart.py", "app/search.py", "app/static/app.js", "app/static/style.css"]


@pytest.fixture
def agent_cli(fake_agents, shop, monkeypatch):
    """`fake_agents` (tests/conftest.py: the fake agent as `claude` and `codex`) and a PATH without the shop's
    workspace venv: the fix specs' acceptance must find the shop's packages by itself (it runs in that venv)."""
    monkeypatch.setenv("PATH", f"{shop.home.parent / 'fakebin'}:/usr/bin:/bin")


def _fake_writes() -> str:
    return "\n".join(f"FAKE: write {path} {line}".rstrip() for path in FIXED
                     for line in (EXAMPLE / "fixed" / path).read_text().splitlines())


def test_fix_specs_repair_the_example_the_second_cycle_passes_and_l6_deploys(shop, deployed, agent_cli):  # noqa: F811
    (shop.specs / "SHARED_CONTEXT.md").write_text("The shop's code.\n\n" + _fake_writes() + "\n")
    shop.save(models={"fix": ["claude"], "verify": ["codex"]}, layers={"L4c": {"enabled": False}})
    state, record = _run(from_layer="L3")

    assert state.is_completed(), [(r.layer, r.cycle, r.status.value, r.reason) for r in record.layers]
    assert [(r.layer, r.cycle, r.status.value) for r in _top(record) if r.counted] == [
        ("L3", 0, "PASS"), ("L4", 0, "FAIL"), ("L5", 1, "PASS"), ("L3", 1, "PASS"), ("L4", 1, "PASS"),
        ("L6", 0, "PASS")]
    for path in FIXED:
        assert (shop.code / path).read_text() == (EXAMPLE / "fixed" / path).read_text()
        assert (deployed / "current" / path).read_text() == (EXAMPLE / "fixed" / path).read_text()


def test_a_fix_that_never_works_fails_after_three_cycles_with_the_open_bugs(shop, agent_cli):
    (shop.specs / "SHARED_CONTEXT.md").write_text("The shop's code. (This agent changes nothing.)\n")
    shop.save(models={"fix": ["claude"], "verify": ["codex"]}, regression={"command": None},
              layers={"L4b": {"enabled": False}, "L4c": {"enabled": False}, "L4d": {"enabled": False}})
    state, record = _run(from_layer="L3", to_layer="L5")

    assert state.is_failed()
    assert [(r.layer, r.cycle, r.status.value) for r in _top(record) if r.layer in ("L4", "L5")] == [
        ("L4", 0, "FAIL"), ("L5", 1, "PASS"), ("L4", 1, "FAIL"), ("L5", 2, "PASS"), ("L4", 2, "FAIL"),
        ("L5", 3, "PASS"), ("L4", 3, "FAIL")]
    assert "still open after 3 fix cycle(s)" in record.message
    assert {b["where"] for b in record.open_bugs} == {"POST /api/cart", "GET /api/search"}
