"""A bundled example's code is worked on as a copy under DISPATCH_HOME, never in the installed package."""

from __future__ import annotations

from pathlib import Path

from dispatch.core.settings import BUNDLED_EXAMPLES
from dispatch.pipeline.workspace import code_digest, working_copy


def test_bundled_code_is_copied_once_under_the_home_and_other_code_is_used_in_place(tmp_path: Path) -> None:
    bundled = BUNDLED_EXAMPLES / "shop" / "code"
    before = sorted(p.relative_to(bundled) for p in bundled.rglob("*"))

    copy, made = working_copy(bundled, tmp_path / "home", "shop")
    assert made and copy == tmp_path / "home" / "workspaces" / "shop"
    assert code_digest(copy) == code_digest(bundled), "the copy holds the same code"
    (copy / "app" / "extra.py").write_text("x = 1\n")  # a fix in the copy
    again, made_again = working_copy(bundled, tmp_path / "home", "shop")
    assert again == copy and not made_again and (copy / "app" / "extra.py").exists(), "an existing copy is kept"
    assert sorted(p.relative_to(bundled) for p in bundled.rglob("*")) == before, "the package is not written to"

    own = tmp_path / "mine"
    own.mkdir()
    assert working_copy(own, tmp_path / "home", "mine") == (own, False)
