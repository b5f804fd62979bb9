"""The shell scripts in infra/ pass shellcheck (Debian's `shellcheck`; `.ci/run` installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"
SCRIPTS = sorted(INFRA.glob("*.sh"))


def test_infra_has_scripts_to_check():
    assert INFRA / "bootstrap-node.sh" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_infra_script_passes_shellcheck(script: Path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (bash .ci/run does this)")
    done = subprocess.run([shellcheck, "--shell=bash", "--external-sources", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"shellcheck {script.name}:\n{done.stdout}{done.stderr}"
