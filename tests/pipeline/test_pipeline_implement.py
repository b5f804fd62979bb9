"""L1 -> L6 on an app whose tests need a package that only its `backend.install` provides: L1 writes a spec whose
acceptance runs the project's tests, L2's agent (the fake agent CLI as `claude`) does the work and that
acceptance passes in the project's environment, which L2 builds before its specs run; L3, L4 and L6 follow.

The package is a wheel made by the test (no network, no build step); the node's PATH has no `python` at all,
so a test command run outside the project's venv fails.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from tests.pipeline.test_pipeline import _run, _top, deployed  # noqa: F401 - the deploy fixture

pytestmark = pytest.mark.prefect


def _wheel(directory: Path) -> Path:
    """`shoputil` 1.0, one module, as a wheel built by hand."""
    files = {
        "shoputil/__init__.py": "def hello(name):\n    return f'hello {name}'\n",
        "shoputil-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: shoputil\nVersion: 1.0\n",
        "shoputil-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n",
    }
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files["shoputil-1.0.dist-info/RECORD"] = "\n".join([*record, "shoputil-1.0.dist-info/RECORD,,"]) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "shoputil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def test_l1_to_l6_on_an_app_whose_tests_need_what_only_its_install_provides(shop, deployed, fake_agents,  # noqa: F811
                                                                            monkeypatch):
    monkeypatch.setenv("PATH", f"{shop.home.parent / 'fakebin'}:/usr/bin:/bin")  # no `python` on it
    monkeypatch.setenv("DISPATCH_LOCAL_SLOTS", "1")
    shop.repair()  # the example's defects fixed: L4 passes without L5
    restart = shop.code / "deploy" / "restart.sh"  # its comment names a loopback port: one gap less for L1
    restart.write_text(restart.read_text().replace("127.0.0.1:8765", "its port"))
    (shop.code / "app" / "greeting.py").write_text("def greeting(name):\n    return 'hello'  # TODO: use shoputil\n")
    (shop.code / "tests" / "test_greeting.py").write_text(
        "import shoputil\n\nfrom app.greeting import greeting\n\n\ndef test_greeting():\n"
        "    assert greeting('ann') == shoputil.hello('ann')\n")
    (shop.specs / "SHARED_CONTEXT.md").write_text(
        "The shop's code.\n\nFAKE: write app/greeting.py import shoputil\n"
        "FAKE: write app/greeting.py def greeting(name): return shoputil.hello(name)\n")
    wheel = _wheel(shop.home.parent / "wheels")
    shop.save(backend={"install": f"pip install -q -r requirements.txt && pip install -q --no-index {wheel}"},
              models={"analyze": [], "implement": ["claude"], "verify": []},
              layers={"L4b": {"enabled": False}, "L4c": {"enabled": False}})

    state, record = _run()

    rows = [(r.layer, r.cycle, r.status.value) for r in _top(record) if r.counted]
    assert state.is_completed(), [(r.layer, r.status.value, r.reason) for r in record.layers]
    assert rows == [("L1", 0, "PASS"), ("L2", 0, "PASS"), ("L3", 0, "PASS"), ("L4", 0, "PASS"), ("L6", 0, "PASS")]
    [spec] = sorted((shop.specs / "generated").glob("S*.md"))
    assert 'PATH="$PWD/.venv/bin:$PATH" python -m pytest -q' in spec.read_text()
    assert (deployed / "current" / "app" / "greeting.py").read_text() == (
        "import shoputil\ndef greeting(name): return shoputil.hello(name)\n")
