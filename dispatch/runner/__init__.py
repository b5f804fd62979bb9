"""The node-side runner: a standard-library-only script shipped to every node, run in place locally.

`node_runner.py` and `ratelimits.py` are shipped together into one directory on the node; the runner
imports the classifier from beside itself. `runner_checksum()` is what the runner reports as
`runner_version` (in `result.json` and `node_runner.py version`), so the dispatcher can tell whether
a node holds the current copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RUNNER_PATH = Path(__file__).with_name("node_runner.py")
RATELIMITS_PATH = Path(__file__).parent.parent / "ratelimits.py"
SHIPPED_FILES = (RUNNER_PATH, RATELIMITS_PATH)


def runner_checksum() -> str:
    """sha256 over node_runner.py then ratelimits.py, as the runner computes it on the node."""
    digest = hashlib.sha256()
    for path in SHIPPED_FILES:
        digest.update(path.read_bytes())
    return digest.hexdigest()
