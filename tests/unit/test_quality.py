"""Spec quality scoring: a good spec scores 100, and each rule, broken alone, costs exactly its weight."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.core.specs import parse_spec
from dispatch.pipeline.quality import RULES, WEIGHTS, average, score_spec

GOOD = """\
---
task_id: S02-cart-api
depends_on: [S01-db]
modifies: [app/cart.py, tests/test_cart.py]
---
## Goal
Validate the quantity of `POST /api/cart` in app/cart.py: a quantity below 1 or above 99 is refused
with 422 and a message naming the field, instead of the 500 it gives today.

## Constraints
- Keep the cart's JSON shape; the database layer of S01 stays as it is.
- Read the app's base URL from $APP_URL in tests.

## Acceptance criteria
- [ ] `pytest -q tests/test_cart.py`
- [ ] `python -m py_compile app/cart.py`
"""


def _score(tmp_path: Path, text: str):
    path = tmp_path / "S02-cart-api.md"
    path.write_text(text, encoding="utf-8")
    spec, errors = parse_spec(path)
    assert errors == [] and spec is not None
    return score_spec(spec)


def test_weights_sum_to_100_and_every_rule_is_documented() -> None:
    import dispatch.pipeline.quality as quality

    assert sum(rule.weight for rule in RULES) == 100
    for rule in RULES:
        assert f"| {rule.name} | {rule.weight} |" in quality.__doc__


def test_a_good_spec_scores_100(tmp_path: Path) -> None:
    scored = _score(tmp_path, GOOD)
    assert (scored.score, scored.broken) == (100, [])


BROKEN_ALONE = {
    "goal": GOOD.replace("## Goal\n", "## Background\n"),
    "acceptance": GOOD.replace("## Acceptance criteria\n", "## Checks\n"),
    "runnable-acceptance": GOOD.replace(
        "- [ ] `pytest -q tests/test_cart.py`\n- [ ] `python -m py_compile app/cart.py`",
        "- [ ] a quantity of 0 is refused with 422\n- [ ] the cart total is unchanged"),
    "modifies": GOOD.replace("modifies: [app/cart.py, tests/test_cart.py]\n", ""),
    "specific": GOOD.replace(
        "Validate the quantity of `POST /api/cart` in app/cart.py: a quantity below 1 or above 99 is refused\n"
        "with 422 and a message naming the field, instead of the 500 it gives today.",
        "Improve the cart and clean up whatever looks wrong there, so that it works better for everyone."),
    "length": GOOD + "\n" + "word " * 3000,
    "backend-ui": GOOD.replace("- Read the app's base URL", "- Give the error message a red colour and a larger font.\n"
                               "- Read the app's base URL"),
    "no-hardcoded-urls": GOOD.replace("from $APP_URL in tests", "from http://localhost:8000 in tests"),
    "dependencies": GOOD.replace("the database layer of S01", "the database layer of S01 and the session of S03"),
}


@pytest.mark.parametrize("rule", list(BROKEN_ALONE))
def test_each_rule_broken_alone_costs_its_weight_and_says_why(tmp_path: Path, rule: str) -> None:
    scored = _score(tmp_path, BROKEN_ALONE[rule])
    assert [b.rule for b in scored.broken] == [rule]
    assert scored.score == 100 - WEIGHTS[rule]
    assert len(scored.broken[0].message) > 20


def test_every_rule_has_a_case() -> None:
    assert set(BROKEN_ALONE) == set(WEIGHTS)


@pytest.mark.parametrize("modifies", [".", "**", "**/*"])  # "/" is refused by validation itself
def test_modifies_of_the_whole_repository_breaks_the_rule(tmp_path: Path, modifies: str) -> None:
    scored = _score(tmp_path, GOOD.replace("modifies: [app/cart.py, tests/test_cart.py]", f"modifies: ['{modifies}']"))
    assert [b.rule for b in scored.broken] == ["modifies"]
    assert "whole repository" in scored.broken[0].message


def test_what_is_quoted_as_code_or_asked_for_is_no_fault(tmp_path: Path) -> None:
    quoted = GOOD.replace("from $APP_URL in tests", "from $APP_URL in tests, not `http://localhost:8000`")
    assert _score(tmp_path, quoted).score == 100
    asked = GOOD.replace("task_id: S02-cart-api\n", "task_id: S02-cart-api\nui: true\n").replace(
        "- Read the app's base URL", "- Give the error message a red colour.\n- Read the app's base URL")
    assert _score(tmp_path, asked).score == 100
    curl = GOOD.replace("- [ ] `python -m py_compile app/cart.py`", "- [ ] `curl -sf http://127.0.0.1:8000/healthz`")
    assert _score(tmp_path, curl).score == 100


def test_a_bare_vague_spec_scores_low_and_lists_each_rule(tmp_path: Path) -> None:
    scored = _score(tmp_path, "Fix stuff.\n")
    assert scored.score < 60
    assert {b.rule for b in scored.broken} >= {"goal", "acceptance", "modifies", "specific", "length"}
    assert average([scored, _score(tmp_path, GOOD)]) == (scored.score + 100) / 2


def test_quoted_code_is_not_what_the_spec_asks(tmp_path: Path) -> None:
    quoting = GOOD.replace("## Constraints\n", "## Constraints\n- The line `color = F1(button)  # S07` stays.\n"
                                               "```python\nURL = 'http://localhost:8000'  # S09\n```\n")
    assert _score(tmp_path, quoting).score == 100
