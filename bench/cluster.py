"""Start the benchmark cluster: N real `sshd` on loopback addresses (127.0.0.2, .3, ...) and its nodes.json.

    .venv/bin/python bench/cluster.py --dir /tmp/bench-cluster [--slots 8,8,8,8,20,40,48] [--port 0]

Default shape: the team's cluster, 7 nodes with 8, 8, 8, 8, 20, 40, 48 slots (140 slots). Stays in the
foreground until Ctrl-C or SIGTERM, printing the path of nodes.json (a thin CLI over
`python -m rigs.loopback_cluster up`). The other benchmarks start their own cluster with
`start_cluster()` below unless given `--nodes <nodes.json>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rigs.loopback_cluster import LoopbackCluster, _main  # noqa: E402

DEFAULT_SLOTS = "8,8,8,8,20,40,48"


def parse_slots(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def start_cluster(slots: list[int], base: Path) -> LoopbackCluster:
    """A started LoopbackCluster (the caller stops it; it is a context manager)."""
    cluster = LoopbackCluster()
    cluster.start(slots, base, port=0)
    return cluster


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--slots" not in argv:
        argv += ["--slots", DEFAULT_SLOTS]
    if "--port" not in argv:
        argv += ["--port", "0"]
    return _main(["up", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
