"""L4d's evidence: the JUnit report keeps what the tests said (assertion messages), so a key in it is masked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dispatch.pipeline.regression import run_regression

KEY = "fake-test-token-0123456789abcdef"


def test_a_key_a_failing_test_prints_is_masked_in_the_junit_report(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SHOP_SERVICE_TOKEN", KEY)  # known to this process; the tests read it from a file
    code = tmp_path / "code"
    (code / "tests").mkdir(parents=True)
    (code / "token.txt").write_text(KEY)
    (code / "tests" / "test_token.py").write_text(
        "from pathlib import Path\n\n\ndef test_token():\n    token = Path('token.txt').read_text()\n"
        "    print('the token is', token)\n    assert token == 'expected'\n")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path)}
    run = run_regression(code, "python -m pytest -q", tmp_path / "L4d", env, timeout=120)

    assert run.tests == {"tests.test_token::test_token": "failed"}, run.step.tail
    junit = (tmp_path / "L4d" / "junit.xml").read_text()
    assert "***" in junit and KEY not in junit  # pytest quotes the value in its assertion message
    assert KEY not in "\n".join(run.step.tail)
