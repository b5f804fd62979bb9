"""The node-side runner: a standard-library package (Python 3.8+) shipped to every node as one zipapp.

Modules, from the bottom up: `protocol` (the files of a run directory and their fields, liveness, the version's
layout), `rundir`, `task`, `procs`, `log`, `events`, `supervise` (one step's process), `checks` (acceptance,
verifier, changed files), `run` (one run: `Runner`), `start`, `commands`, `serve` (the node agent), `__main__`
(the command line), `ratelimits` (the output classifier), `zipapp` (the archive and its version).
The dispatcher's side, where a node keeps the zipapp and how it gets there, is dispatch/cluster/shipping.py.

Nothing is imported here: on a node this package runs from the zipapp as `dispatch_runner`.
"""
