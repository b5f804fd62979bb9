"""Test and benchmark rigs: throwaway clusters and servers on loopback, never shipped with `dispatch`.

- `loopback_cluster` (with `loopback_host`): N real `sshd` nodes on 127.0.0.2, .3, ... and their nodes.json.
- `localserver`: a throwaway PostgreSQL cluster and a `prefect server` on it (team mode's backend).
- `intervals`: judging a schedule from what ran (the most runs at once, whether two runs overlapped).

Importable from the repository root, as the tests (pytest's rootdir) and the benchmarks (`sys.path`) run.
"""
