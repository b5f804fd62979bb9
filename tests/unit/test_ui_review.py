"""L4c's question and its strict reading of the answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatch.pipeline.results import PageCapture
from dispatch.pipeline.ui_review import ReviewError, page_score, parse_review, review_prompt

GOOD = {name: {"score": 20, "reason": f"{name} is fine"} for name in ("visual", "layout", "readability", "finish")}


def _answer(data: object) -> str:
    return f"Some thoughts first.\nUI-REVIEW: {json.dumps(data)}\n"


def test_a_valid_answer_is_read() -> None:
    assert parse_review("UI-REVIEW: {}\n" + _answer(GOOD)) == GOOD, "the last line counts"


@pytest.mark.parametrize(("answer", "why"), [
    ("The page looks fine, 80/100.", "no line starting"),
    ("UI-REVIEW: {visual: 20}", "not JSON"),
    (_answer({**GOOD, "extra": {"score": 1, "reason": "x"}}), "exactly the keys"),
    (_answer({k: v for k, v in GOOD.items() if k != "finish"}), "exactly the keys"),
    (_answer({**GOOD, "visual": {"score": 26, "reason": "x"}}), "from 0 to 25"),
    (_answer({**GOOD, "visual": {"score": 20.5, "reason": "x"}}), "from 0 to 25"),
    (_answer({**GOOD, "visual": {"score": True, "reason": "x"}}), "from 0 to 25"),
    (_answer({**GOOD, "layout": {"score": 20, "reason": "  "}}), "non-empty"),
    (_answer({**GOOD, "layout": 20}), "layout must be"),
    (_answer([1, 2, 3, 4]), "exactly the keys"),
])
def test_anything_else_is_no_review(answer: str, why: str) -> None:
    with pytest.raises(ReviewError, match=why):
        parse_review(answer)


def test_mobile_overflow_counts_against_the_layout() -> None:
    page = PageCapture(path="/cart", url="http://127.0.0.1:1/cart", overflow=True)
    score = page_score(page, "claude", GOOD)
    assert score.total == 70 and score.aspects["layout"]["score"] == 10
    assert "overflow" in score.aspects["layout"]["reason"]
    assert GOOD["layout"]["score"] == 20, "the model's answer itself is left as it was"


def test_the_question_names_only_files_inside_the_run(tmp_path: Path) -> None:
    (tmp_path / "L4b").mkdir()
    (tmp_path / "L4b" / "cart-1920x1080.png").write_bytes(b"\x89PNG")
    (tmp_path / "L4b" / "cart.html").write_text("<pre>\n```\n</pre><h1>Cart</h1>")
    page = PageCapture(path="/cart", url="http://127.0.0.1:1/cart", html_file="L4b/cart.html",
                       screenshots={"1920x1080": str(tmp_path / "L4b" / "cart-1920x1080.png"),
                                    "375x812": "/etc/hostname"}, console_errors=["TypeError: x is undefined"])
    prompt = review_prompt(page, tmp_path)
    assert str(tmp_path / "L4b" / "cart-1920x1080.png") in prompt and "/etc/hostname" not in prompt
    assert "<h1>Cart</h1>" in prompt and "````html" in prompt, "a fence the HTML cannot close"
    assert "TypeError: x is undefined" in prompt and "UI-REVIEW:" in prompt
