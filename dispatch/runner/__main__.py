"""The runner's command line: runs one spec's model chain inside one run directory, and more.

Shipped to every node as one zipapp (`zipapp.py`) and run by the node's own ``python3`` (3.8 or newer,
standard library only), the local node's too; ``python -m dispatch.runner`` runs it in the repo. One run
directory is one spec run:

    task.json     written by the dispatcher: project, task_id, workdir, timeouts, env, steps, acceptance, verify
    task.log      merged stdout+stderr of every step and acceptance command, secrets masked
    status.json   state and heartbeat, rewritten atomically at each change and every `heartbeat` seconds
    result.json   the outcome, written atomically once, before the final status.json
    .runner.lock  flock held by the live runner for the whole run; the OS drops it if the runner dies

Commands:

    python3 runner.pyz run <run_dir> [--detach] [--secrets-stdin]
        exit 0 if the spec succeeded, 1 for any other final status, 2 for a bad task.json or
        usage, 3 (with a JSON line naming the live runner's pid) if another runner holds run_dir
        or the step of a runner that died hard still runs there (`kill` clears it).
        --detach prints {"pid": ..., "run_dir": ...} and returns at once; the run goes on in its
        own session. --secrets-stdin reads a JSON object of secrets: "<model>:NAME" is env var NAME of
        that model's agent step only, a plain "NAME" goes to every agent step, "mask:<n>" to no step;
        every value is masked wherever the runner writes. A step's own environment is an allow-list
        (STEP_ENV_ALLOW, LC_*) of the runner's, plus task.json's node_env, its env (less PATH, keys,
        endpoints and the rest of `protected_env`: dropped) and its step's env.
    python3 runner.pyz status <run_dir>                 status.json + "alive", as one JSON line
    python3 runner.pyz kill <run_dir>                   stop the run; exit 0 even if none runs
    python3 runner.pyz tail <run_dir> [--from-byte N]   task.log from byte N (N < 0: from the end)
    python3 runner.pyz version                          {"runner_version": sha256, "python": ...}
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import cmd_kill, cmd_live, cmd_status, cmd_tail, print_json
from .zipapp import runner_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner.pyz", description="Oyster Dispatch node-side runner")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run <run_dir>/task.json")
    run.add_argument("run_dir")
    run.add_argument("--detach", action="store_true", help="keep running after this process and SSH exit")
    run.add_argument("--secrets-stdin", action="store_true", help="read a JSON object of secret env vars")
    for name, text in (("status", "print status.json with liveness"), ("kill", "stop the run")):
        commands.add_parser(name, help=text).add_argument("run_dir")
    tail = commands.add_parser("tail", help="print task.log from a byte offset")
    tail.add_argument("run_dir")
    tail.add_argument("--from-byte", type=int, default=0)
    live = commands.add_parser("live", help="list the live runs under a <project>/tasks directory")
    live.add_argument("run_dir")
    live.add_argument("--finished", action="store_true", help="also the runs that ended in success")
    commands.add_parser("version", help="print the runner's checksum")
    serve = commands.add_parser("serve", help="start and watch runs asked for as JSON lines on stdin (one agent "
                                "per node)")
    serve.add_argument("--root", required=True, help="the node's run root: run directories must be inside it")
    serve.add_argument("--slots", required=True, type=int, help="runners the node runs at once at most")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # each command imports what it runs: `status`, `kill`, `tail` start without compiling the run
    if args.command == "version":
        from .supervise import load_classifier

        print_json(
            {
                "runner_version": runner_version(),
                "python": sys.version.split()[0],
                "ratelimits": getattr(load_classifier()[0], "__file__", None),
            }
        )
        return 0
    if args.command == "serve":
        if args.slots < 1:
            parser.error("serve: --slots must be at least 1")
        from .serve import cmd_serve

        return cmd_serve(args.root, args.slots)
    run_dir = os.path.abspath(os.path.expanduser(args.run_dir))
    if args.command == "run":
        from .start import cmd_run

        return cmd_run(run_dir, detach=args.detach, secrets_stdin=args.secrets_stdin)
    if args.command == "status":
        return cmd_status(run_dir)
    if args.command == "kill":
        return cmd_kill(run_dir)
    if args.command == "live":
        return cmd_live(run_dir, args.finished)
    return cmd_tail(run_dir, args.from_byte)


if __name__ == "__main__":
    sys.exit(main())
