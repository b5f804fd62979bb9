"""`dispatch pipeline run` refuses a deploy.dir under a system or credential directory before it runs anything
(exit 2, naming pipeline.yaml and `deploy.dir`); L6 checks it again on the target (tests/unit/test_deploy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DISPATCH = str(Path(sys.executable).with_name("dispatch"))


@pytest.mark.parametrize("deploy_dir", ["/tmp/../etc/shop", "~/.ssh/shop"])
def test_a_system_deploy_dir_exits_2_naming_the_file_and_field_and_runs_nothing(shop, deploy_dir):
    shop.save(deploy={"target": "local", "dir": deploy_dir})
    done = subprocess.run([DISPATCH, "pipeline", "run", "shop"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{shop.specs / 'pipeline.yaml'}: deploy.dir: {deploy_dir!r}" in done.stderr
    assert not (shop.home / "pipeline").exists()
