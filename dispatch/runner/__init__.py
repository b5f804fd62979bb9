"""The node-side runner: standard-library-only code shipped to every node, run in place locally.

`node_runner.py`, `ratelimits.py` and `protocol.py` are shipped together into one directory on the node
(`protocol.version_dir`); the runner imports the other two from beside itself. `runner_checksum()` is what
the runner reports as `runner_version` (in `result.json` and `node_runner.py version`), so the dispatcher can
tell whether a node holds the current copy.
"""

from __future__ import annotations

from pathlib import Path

from dispatch.runner import protocol

RUNNER_PATH = Path(__file__).with_name("node_runner.py")
RATELIMITS_PATH = Path(__file__).parent.parent / "ratelimits.py"
PROTOCOL_PATH = Path(protocol.__file__)
SHIPPED_FILES = tuple(Path(path) for path in protocol.shipped_paths(str(RUNNER_PATH.parent)))
"""node_runner.py, ratelimits.py, protocol.py: what is copied to a node, in the order they are hashed."""


def runner_checksum() -> str:
    """sha256 over the shipped files (`protocol.checksum`), as the runner computes it on the node."""
    return protocol.checksum(map(str, SHIPPED_FILES))


def runner_dir_parts() -> tuple[str, str]:
    """Where a node keeps this runner version, under its run root: (".runner", first 16 of the checksum)."""
    return protocol.version_dir(runner_checksum())
