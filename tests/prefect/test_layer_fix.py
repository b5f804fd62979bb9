"""L5 Fix on Prefect's real API: bugs become F specs in the generated-spec directory, dispatched through the
project flow, where the fake agent (`claude`, as the `fix` model) really edits the code and the fake verifier
(`codex`) approves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.results import Bug, Status

pytestmark = pytest.mark.prefect
CONFIG = PipelineConfig.model_validate({"models": {"fix": ["claude"]}})


def _layout(isolated_home: Path) -> tuple[Path, Path, Path]:
    (isolated_home / "specs" / "shop").mkdir(parents=True, exist_ok=True)
    code, run_dir = isolated_home / "code", isolated_home / "home" / "pipeline" / "shop" / "run1"
    (code / "app").mkdir(parents=True)
    (code / "app" / "cart.py").write_text("def total(items):\n    return 0\n")
    return isolated_home / "specs" / "shop" / "generated", code, run_dir


def _bug(title: str, severity: str = "S2", seen: str = "", **fields) -> Bug:
    return Bug.make(layer="L4a", where="GET /api/cart", title=title, severity=severity,
                    reproduce="GET /api/cart -> 200 with the total", evidence=seen, **fields)


def test_no_bug_is_a_pass(prefect_api, isolated_home: Path):
    from flows.layers.fix import fix

    _, code, run_dir = _layout(isolated_home)
    result = fix("shop", str(code), str(run_dir), CONFIG, [], 1)
    assert result.layer == "L5" and result.status is Status.PASS and result.reason == "no bug to fix"


def test_fix_specs_repair_the_code_through_the_project_flow(fake_agents, isolated_home: Path):
    from dispatch.core.dag import load_project
    from dispatch.core.results import load_state
    from dispatch.core.settings import get_settings
    from flows.layers.fix import fix

    generated, code, run_dir = _layout(isolated_home)
    repair = "total was 0\nFAKE: write app/cart.py def total(items): return sum(items)"
    bugs = [_bug("cart total is always 0", seen=repair, file="app/cart.py"),
            _bug("cart answers 500 on null", severity="S1", seen="FAKE: write app/null.txt handled")]
    result = fix("shop", str(code), str(run_dir), CONFIG, bugs, 1)
    assert result.status is Status.PASS, result.reason
    assert (code / "app" / "cart.py").read_text() == "def total(items): return sum(items)\n"
    assert (code / "app" / "null.txt").exists()
    first, second = generated / "F01-cart-answers-500-on-null.md", generated / "F02-cart-total-is-always-0.md"
    assert result.evidence["specs"] == [str(first), str(second)], "S1 first"
    assert result.evidence["bugs"] == {"F01-cart-answers-500-on-null": bugs[1].id,
                                       "F02-cart-total-is-always-0": bugs[0].id}
    assert load_project("shop.pipeline", generated).specs["F02-cart-total-is-always-0"].modifies == ["app/cart.py"]
    assert (run_dir / "L5" / "cycle-1" / first.name).exists()
    assert result.cycle == 1 and result.reason.startswith("cycle 1: 2 fix spec(s) for 2 bug(s)")

    (code / "app" / "cart.py").write_text("def total(items):\n    return 0\n")  # the fix did not hold
    again = fix("shop", str(code), str(run_dir), CONFIG, bugs[:1], 2)
    assert again.status is Status.PASS, again.reason
    assert again.evidence["specs"] == [str(generated / "F03-cart-total-is-always-0.md")], "numbers continue"
    assert "fix cycle 2" in (generated / "F03-cart-total-is-always-0.md").read_text()
    assert (code / "app" / "cart.py").read_text() == "def total(items): return sum(items)\n"
    state = load_state(get_settings().state_dir, "shop.pipeline")
    assert list(state.specs) == ["F03-cart-total-is-always-0"], "only this cycle's specs run"


def test_a_fix_that_fails_fails_the_layer(fake_agents, isolated_home: Path, monkeypatch):
    from flows.layers.fix import fix

    monkeypatch.setenv("DISPATCH_RETRIES", "0")
    _, code, run_dir = _layout(isolated_home)
    result = fix("shop", str(code), str(run_dir), CONFIG, [_bug("cart broken", seen="FAKE: mode=fail")], 1)
    assert result.status is Status.FAIL
    assert "F01-cart-broken" in result.reason and "fake agent failed on purpose" in json.dumps(result.model_dump())
