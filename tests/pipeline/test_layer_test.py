"""L4 on the real example app: real HTTP (L4a), real headless Chromium (L4b), the app's own pytest suite with
coverage against a baseline (L4d). The agent side's L4c is absent here or turned off."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.pipeline import app as apps
from dispatch.pipeline.results import Status

pytestmark = pytest.mark.prefect


@pytest.fixture
def serve(prefect_api, shop, tmp_path):
    """Build and start the shop (L3) for a run directory under the project's pipeline dir; stop it after."""
    from flows.layers.build import build

    started = []

    def start(name: str = "run1") -> tuple[str, str]:
        run_dir = shop.home / "pipeline" / "shop" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        result = build("shop", str(shop.code), str(run_dir), shop.load())
        assert result.passed, result
        started.append(str(run_dir))
        return str(run_dir), result.evidence["app_url"]

    yield start
    for run_dir in started:
        apps.stop_all(run_dir)


def _by_layer(result):
    return {child.layer: child for child in result.children}


def test_l4_finds_the_example_defects_and_passes_once_they_are_repaired(shop, serve):
    from flows.layers.test import run_tests

    run_dir, url = serve("run1")
    result = run_tests("shop", str(shop.code), run_dir, shop.load(), url)
    children = _by_layer(result)

    assert result.status is Status.FAIL
    assert children["L4a"].status is Status.FAIL and children["L4b"].status is Status.FAIL
    assert children["L4c"].status is Status.NOT_RUN
    assert children["L4d"].status is Status.PASS, children["L4d"].reason
    found = {(b.layer, b.where, b.title.split(":")[0], b.severity, b.file) for b in result.bugs}
    assert ("L4a", "POST /api/cart", "empty body", "S2", "app/cart.py") in found
    assert ("L4a", "POST /api/cart", "null body", "S2", "app/cart.py") in found
    assert ("L4a", "GET /api/search", "script payload in query", "S1", "app/search.py") in found
    assert ("L4b", "/cart", "console error", "S2", "app/static/app.js") in found
    assert ("L4b", "/", "horizontal overflow at 375x812", "S3", None) in found
    assert len(result.bugs) == 5, [b.title for b in result.bugs]
    assert result.bugs[0].severity == "S1"
    screenshots = children["L4b"].evidence["screenshots"]
    assert sorted(screenshots) == ["/ 1920x1080", "/ 375x812", "/cart 1920x1080", "/cart 375x812"]
    assert all(Path(png).read_bytes().startswith(b"\x89PNG") for png in screenshots.values())
    assert (Path(run_dir).parent / "baseline.json").is_file()

    apps.stop_all(run_dir)
    shop.repair()
    shop.save(layers={"L4c": {"enabled": False}})
    run_dir, url = serve("run2")
    repaired = run_tests("shop", str(shop.code), run_dir, shop.load(), url)
    assert repaired.status is Status.PASS, repaired.reason
    assert repaired.bugs == []


def test_no_browser_is_not_run_and_never_pass(shop, serve, monkeypatch):
    from flows.layers.test import run_tests

    shop.repair()
    shop.save(layers={"L4c": {"enabled": False}})
    monkeypatch.setenv("DISPATCH_CHROMIUM", str(shop.home / "no-such-chromium"))
    run_dir, url = serve()
    result = run_tests("shop", str(shop.code), run_dir, shop.load(), url, only=["L4a", "L4b"])

    children = _by_layer(result)
    assert children["L4a"].status is Status.PASS
    assert children["L4b"].status is Status.NOT_RUN
    assert "apt-get install chromium" in children["L4b"].reason
    assert result.status is Status.NOT_RUN


def test_regression_reports_a_test_that_passed_in_the_baseline_and_fails_now(shop, serve):
    from flows.layers.test import run_tests

    run_dir, url = serve("run1")
    first = run_tests("shop", str(shop.code), run_dir, shop.load(), url, only=["L4d"])
    assert first.status is Status.PASS, first.reason
    catalog = shop.code / "app" / "catalog.py"
    catalog.write_text(catalog.read_text().replace('"Pacific oyster"', '"Pacific"'))

    second = run_tests("shop", str(shop.code), serve("run2")[0], shop.load(), url, only=["L4d"])
    assert second.status is Status.FAIL
    [bug] = second.bugs
    assert bug.where == "tests.test_api::test_products_are_listed_and_found"
    assert "passed in the baseline" in bug.title
    assert second.children[0].evidence["compared"]["new_failures"] == [bug.where]
