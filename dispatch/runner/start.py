"""Starting a runner: claiming its run directory (the lock), then running it here, detached, or forked by `serve`.

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
import traceback
from typing import NoReturn

from . import protocol
from .commands import print_json
from .procs import RUNNER_PROCESS_NAME, close_inherited, orphan_step, set_process_name
from .run import Runner
from .rundir import register_live, rotate_previous, write_json
from .task import Task, TaskError, load_task, read_secrets
from .zipapp import runner_version


def fail_before_start(run_dir: str, message: str) -> int:
    """task.json or stdin is unusable: say so on stderr and in result.json, exit 2."""
    print(f"runner: {message}", file=sys.stderr)
    now = time.time()
    result = protocol.result_record(
        project=None,
        task_id=os.path.basename(run_dir),
        status="failed",
        reason=message,
        started_at=now,
        ended_at=now,
        duration=0.0,
        runner_version=runner_version(),
        runner_pid=os.getpid(),
        hostname=socket.gethostname(),
    )
    try:
        write_json(os.path.join(run_dir, protocol.RESULT_FILE), result, sync=True)
        write_json(
            os.path.join(run_dir, protocol.STATUS_FILE),
            {
                "state": "failed",
                "runner_pid": os.getpid(),
                "step": None,
                "step_pid": None,
                "started_at": now,
                "heartbeat_at": now,
                "ended_at": now,
                "log_bytes": 0,
                "heartbeat": 2.0,
            },
        )
    except OSError:
        pass
    return 2


def claim(run_dir: str) -> tuple[int | None, dict | None]:
    """Take the run directory's lock: (lock fd, None), or (None, why not) when a runner or its orphan holds it."""
    lock_fd = os.open(os.path.join(run_dir, protocol.LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        holder = protocol.lock_holder(run_dir)
        return None, {
            "pid": holder,
            "run_dir": run_dir,
            "already_running": True,
            "message": f"another runner (pid {holder}) is running {run_dir}; re-attach with `status`/`tail`, "
            "or stop it with `kill`",
        }
    orphan = orphan_step(run_dir)
    if orphan is not None:  # a runner died hard (SIGKILL, OOM) and left its step running
        os.close(lock_fd)
        return None, {
            "pid": None,
            "run_dir": run_dir,
            "already_running": True,
            "orphan_step_pid": orphan,
            "message": f"the step of a previous runner (process group {orphan}) still runs in {run_dir}; "
            "stop it with `kill` before starting again",
        }
    register_live(run_dir)
    return lock_fd, None


def cmd_run(run_dir: str, *, detach: bool, secrets_stdin: bool) -> int:
    if not os.path.isdir(run_dir):
        print(
            f"runner: run dir {run_dir} does not exist: the dispatcher creates it with task.json", file=sys.stderr
        )
        return 2
    lock_fd, refused = claim(run_dir)
    if lock_fd is None:
        message = refused.pop("message")
        print_json(refused)
        print(f"runner: {message}", file=sys.stderr)
        return 3
    try:
        task = load_task(run_dir)
        secrets = read_secrets(sys.stdin.read()) if secrets_stdin else {}
    except TaskError as exc:
        os.close(lock_fd)
        return fail_before_start(run_dir, str(exc))
    if detach:
        pid = spawn_detached(run_dir, lock_fd, task, secrets)
        if pid is None:
            print(f"runner: the detached runner did not start; see {run_dir}/runner.err", file=sys.stderr)
            return 1
        print_json({"pid": pid, "run_dir": run_dir})
        return 0
    record_lock_holder(lock_fd)
    runner = Runner(run_dir, task, secrets, echo=True)
    runner.start()
    return runner.run()


def record_lock_holder(lock_fd: int) -> None:
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def spawn_detached(run_dir: str, lock_fd: int, task: Task, secrets: dict[str, str]) -> int | None:
    """Double-fork a runner into its own session; its pid once it has started, None if it did not start.

    `run --detach` promises its caller a started runner (one to `status`, `tail` or `kill`): status.json and task.log
    exist. The caller's copy of the lock descriptor is closed: the runner holds its own.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child > 0:
        os.close(write_end)
        chunks = []
        while True:
            data = os.read(read_end, 4096)
            if not data:
                break
            chunks.append(data)
        os.close(read_end)
        os.waitpid(child, 0)
        os.close(lock_fd)  # the runner holds its own copy of the lock
        try:
            return int(json.loads(b"".join(chunks).decode())["pid"])
        except (ValueError, KeyError, TypeError):
            return None
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    become_runner(run_dir, lock_fd, task, secrets, started_pipe=write_end)
    return None  # not reached


def fork_runner(run_dir: str, lock_fd: int, task: Task, secrets: dict[str, str], keep: tuple[int, ...] = ()) -> int:
    """`serve`: fork a runner into its own session and return its pid at once; the agent reaps it at its end.

    `keep`: descriptors the runner holds for its whole life (the local node's machine slot), closed here.

    The agent does not wait for the runner to set itself up (~15 ms, longer on a busy node): in a burst of 40
    starts that wait, taken one after another, was what the last start waited for. The previous attempt's log
    and result are set aside first, so the agent never reads them as this attempt's.
    """
    rotate_previous(run_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child > 0:
        for fd in (lock_fd, *keep):  # the runner holds its own copies
            os.close(fd)
        return child
    os.setsid()
    become_runner(run_dir, lock_fd, task, secrets, started_pipe=None, keep=keep)
    return 0  # not reached


def become_runner(run_dir: str, lock_fd: int, task: Task, secrets: dict[str, str], *,
                   started_pipe: int | None, keep: tuple[int, ...] = ()) -> NoReturn:
    """In a forked child: detach from the caller's descriptors and run the attempt; never returns.

    Args:
        started_pipe: where to write {"pid": ...} once the runner has started (then closed), if anywhere.
        keep: other descriptors the runner keeps open (inherited by nothing it starts).
    """
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(os.path.join(run_dir, "runner.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err, 2)
        close_inherited((lock_fd, *keep) if started_pipe is None else (lock_fd, started_pipe, *keep))
        set_process_name(RUNNER_PROCESS_NAME)
        os.chdir("/")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        record_lock_holder(lock_fd)
        runner = Runner(run_dir, task, secrets)
        runner.start()
        if started_pipe is not None:
            os.write(started_pipe, json.dumps({"pid": os.getpid()}).encode())
            os.close(started_pipe)
        code = runner.run()
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
