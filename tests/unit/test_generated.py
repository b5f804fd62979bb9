"""The generated-spec directory: where it is, and that a person's edits survive the pipeline's rewrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings
from dispatch.pipeline.generated import GeneratedSpecs, generated_dir, run_key, slug


def test_it_lives_beside_the_projects_specs_or_under_home_for_a_bundled_example(isolated_home: Path) -> None:
    (isolated_home / "specs" / "shop").mkdir()
    settings = get_settings()
    assert generated_dir(settings, "shop") == isolated_home / "specs" / "shop" / "generated"
    assert run_key("shop") == "shop.pipeline"


def test_a_bundled_example_is_never_written_into(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCH_SPECS")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.specs_root_for("demo").name == "specs", "the bundled demo's specs"
    assert generated_dir(settings, "demo") == isolated_home / "home" / "generated" / "demo"


def test_rewrites_keep_hand_edits_and_replace_removes_only_our_stale_files(tmp_path: Path) -> None:
    specs = GeneratedSpecs(tmp_path / "generated")
    first = specs.write({"S01-a.md": "one\n", "S02-b.md": "two\n", "S03-c.md": "three\n"}, prefix="S", replace=True)
    assert [p.name for p in first.written] == ["S01-a.md", "S02-b.md", "S03-c.md"]
    (tmp_path / "generated" / "S02-b.md").write_text("two, edited by a person\n")
    (tmp_path / "generated" / "S03-c.md").write_text("three, edited\n")
    (tmp_path / "generated" / "S09-mine.md").write_text("a person's own spec\n")

    again = specs.write({"S01-a.md": "one v2\n", "S02-b.md": "two v2\n", "S09-mine.md": "ours\n"}, prefix="S",
                        replace=True)
    assert [p.name for p in again.written] == ["S01-a.md"]
    assert sorted(p.name for p in again.kept) == ["S02-b.md", "S03-c.md", "S09-mine.md"]
    assert (tmp_path / "generated" / "S01-a.md").read_text() == "one v2\n"
    assert (tmp_path / "generated" / "S02-b.md").read_text() == "two, edited by a person\n"
    assert (tmp_path / "generated" / "S09-mine.md").read_text() == "a person's own spec\n"

    third = specs.write({}, prefix="S", replace=True)
    assert third.removed == ["S01-a.md"], "only the pipeline's unedited file goes"
    assert sorted(p.name for p in (tmp_path / "generated").glob("S*.md")) == ["S02-b.md", "S03-c.md", "S09-mine.md"]


def test_fix_specs_do_not_touch_implementation_specs_and_numbers_continue(tmp_path: Path) -> None:
    specs = GeneratedSpecs(tmp_path)
    specs.write({"S01-a.md": "s\n"}, prefix="S", replace=True)
    specs.write({"F01-x.md": "f\n", "F02-y.md": "f\n"}, prefix="F", replace=True)
    assert specs.numbers("F") == [1, 2] and specs.numbers("S") == [1]
    assert specs.write({}, prefix="F", replace=True).removed == ["F01-x.md", "F02-y.md"]
    assert (tmp_path / "S01-a.md").exists()


@pytest.mark.parametrize("name", [
    "../S01-x.md", "S01-x.md/../../y.md", "X01-x.md", "S1-x.md", "S01-X Y.md", "F01-a.md"])
def test_only_generated_spec_names_are_written(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="is not a generated S spec name"):
        GeneratedSpecs(tmp_path / "g").write({name: "x"}, prefix="S", replace=False)
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_a_symlinked_spec_is_refused(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "S01-a.md").symlink_to("/etc/hostname")
    with pytest.raises(ConfigError, match="not a symlink"):
        GeneratedSpecs(tmp_path / "g").write({"S01-a.md": "x"}, prefix="S", replace=False)
    assert (tmp_path / "g" / "S01-a.md").is_symlink()


def test_slug() -> None:
    assert slug("app/main.py, app/db.py") == "app-main-py-app-db-py"
    assert slug("../../etc/passwd") == "etc-passwd"
    assert slug("") == "spec"
