#!/usr/bin/env python3
"""Node-side runner of Oyster Dispatch: runs one spec's model chain inside one run directory.

Shipped to every node next to ``ratelimits.py`` and run by the node's own ``python3`` (3.8 or newer,
standard library only); the local node runs it in place. One run directory is one spec run:

    task.json     written by the dispatcher: project, task_id, workdir, timeouts, env, steps, acceptance, verify
    task.log      merged stdout+stderr of every step and acceptance command, secrets masked
    status.json   state and heartbeat, rewritten atomically at each change and every `heartbeat` seconds
    result.json   the outcome, written atomically once, before the final status.json
    .runner.lock  flock held by the live runner for the whole run; the OS drops it if the runner dies

Commands:

    python3 node_runner.py run <run_dir> [--detach] [--secrets-stdin]
        exit 0 if the spec succeeded, 1 for any other final status, 2 for a bad task.json or
        usage, 3 (with a JSON line naming the live runner's pid) if another runner holds run_dir
        or the step of a runner that died hard still runs there (`kill` clears it).
        --detach prints {"pid": ..., "run_dir": ...} and returns at once; the run goes on in its
        own session. --secrets-stdin reads a JSON object of secrets: "<model>:NAME" is env var NAME of
        that model's agent step only, a plain "NAME" goes to every agent step, "mask:<n>" to no step;
        every value is masked wherever the runner writes. A step's own environment is an allow-list
        (STEP_ENV_ALLOW, LC_*) of the runner's, plus task.json's node_env, its env (less PATH, keys,
        endpoints and the rest of `protected_env`: dropped) and its step's env.
    python3 node_runner.py status <run_dir>                 status.json + "alive", as one JSON line
    python3 node_runner.py kill <run_dir>                   stop the run; exit 0 even if none runs
    python3 node_runner.py tail <run_dir> [--from-byte N]   task.log from byte N (N < 0: from the end)
    python3 node_runner.py version                          {"runner_version": sha256, "python": ...}
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import importlib.util
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

if __package__:  # imported as dispatch.runner.node_runner (the dispatcher's side)
    from . import protocol
else:  # run as a script, shipped to a node or in the repo: protocol.py lies beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import protocol  # type: ignore[no-redef]
    finally:
        sys.path.pop(0)


def _import_ratelimits() -> tuple[Any, str]:
    """The classifier, from beside this file (shipped) or from dispatch/ (in the repo).

    Returns the module (None if no copy imports under this python) and why the copies failed.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    errors = []
    sys.path.insert(0, here)
    try:
        import ratelimits  # type: ignore[import-not-found]

        return ratelimits, ""
    except Exception as exc:  # also TypeError & co. from a copy written for a newer python
        errors.append(f"{exc.__class__.__name__}: {exc}")
    finally:
        if sys.path and sys.path[0] == here:
            sys.path.pop(0)
    candidate = os.path.join(os.path.dirname(here), "ratelimits.py")
    if os.path.isfile(candidate):  # dispatch/ratelimits.py, loaded without importing dispatch/__init__
        spec = importlib.util.spec_from_file_location("ratelimits", candidate)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules["ratelimits"] = module
            try:
                spec.loader.exec_module(module)
                return module, ""
            except Exception as exc:
                del sys.modules["ratelimits"]
                errors.append(f"{exc.__class__.__name__}: {exc}")
    try:
        from dispatch import ratelimits  # type: ignore[no-redef]

        return ratelimits, ""
    except Exception as exc:
        errors.append(f"{exc.__class__.__name__}: {exc}")
    return None, "; ".join(errors)


_LOADED: list[tuple[Any, str]] = []


def _classifier() -> tuple[Any, str]:
    """The ratelimits module (or None) and the import error, loaded once: only `run` needs them."""
    if not _LOADED:
        _LOADED.append(_import_ratelimits())
    return _LOADED[0]


_KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL to a process group
_LEFTOVER_GRACE = 1.0  # after a step exits, how long its background children may hold the output pipe
_POLL = 0.1
_SERVE_MIN_DELAY = 0.05  # `serve` reads a growing log this often, backing off to the max while it is quiet
_SERVE_MAX_DELAY = 1.0
_SERVE_READ = 1 << 20  # bytes of a log sent in one event at most (a chatty spec does not stall the others)
_CHUNK = 65536
_EVENT_LINE_MAX = 4 << 20  # an agent's JSON event is kept whole up to this size (a shell line: _CHUNK)
_SHOWN_CHARS = 2000  # characters of one text block an event shows in task.log (the event is whole in events.jsonl)
_CLASSIFY_TAIL = 1 << 20  # characters of a step's output kept for the rate-limit classifier
_LOG_TAIL_LINES = 40
_FILES_CAP = 1000
_TREE_CAP = 200_000  # files stamped in a workdir without git (a bound on a hostile tree)
_ANSWER_CAP = 16384  # characters of an agent's final message kept in its attempt record
_CHANGE_CAP, _CHANGE_FILE_CAP = 200_000, 30_000  # characters of the change shown to a verifier: all, per file
_VERDICT_PREFIX = "VERDICT:"
_MIN_SECRET_LEN = 4  # shorter values are not masked: they would blank out ordinary words
# The only variables of the runner's own environment a step inherits (plus LC_*); everything else a step
# gets is named: the node's and the task's `env`, the DISPATCH_* variables and its own model's key.
STEP_ENV_ALLOW = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
)  # fmt: skip
# What decides which program a step runs or where its agent connects and sends its key. A spec's `env:` never
# sets these (dispatch/core/specs.py refuses them; this runner drops them from task.json's `env`): the node's own
# `env` (task.json's `node_env`) and the model's settings (its step's env and key) do. Names are case-sensitive
# on Linux, but the suffixes match in any case (`anthropic_base_url`, `https_proxy`): some tools read those too.
# Beyond the issue's list: proxies and TLS trust (a proxy the spec trusts sees the key), agent config dirs.
PROTECTED_ENV_NAMES = frozenset({
    "PATH", "HOME", "NODE_OPTIONS", "NODE_PATH", "BASH_ENV", "IS_SANDBOX", "XDG_CONFIG_HOME",
    "CLAUDE_CONFIG_DIR", "CODEX_HOME", "OPENCODE_CONFIG", "OPENCODE_CONFIG_DIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "NODE_TLS_REJECT_UNAUTHORIZED", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
})  # fmt: skip
PROTECTED_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "DISPATCH_")
PROTECTED_ENV_SUFFIXES = ("_BASE_URL", "_API_KEY", "_TOKEN", "_PROXY")  # any case; `_TOKEN` covers `_AUTH_TOKEN`
MASK_ONLY = "mask"  # secrets named "mask:<n>" are values to mask that no step is given
_FINAL_STATES = protocol.FINAL_STATES
# the chain moves on to the next model at once ("config": its CLI refused to start, the reason names the fix)
_RATE_KINDS = ("quota", "billing", "transient", "auth", "config")
_RETRY_LIMIT = 30.0  # seconds an agent may retry by itself with no progress before the chain moves on
_RUNNER_NAME = os.path.basename(__file__).encode()
RUNNER_PROCESS_NAME = b"dispatch-runner"  # a detached runner's process name (`ps -e`, /proc/<pid>/comm)


class TaskError(ValueError):
    """task.json (or the secrets on stdin) cannot be used; the message says which field and why."""


@dataclass
class Step:
    name: str
    argv: list[str] | None
    script: str | None
    env: dict[str, str]
    stdin: str | None = None  # the agent's prompt: written to <run_dir>/prompt.txt, opened as its stdin


@dataclass
class Task:
    """task.json. Only `workdir` and `steps` are required; a timeout of 0 or null means none.

    Each step is {"name", "argv": [...]} (an agent CLI, output classified for rate limits) or
    {"name", "script": "..."} (a shell spec, run as `bash -e -o pipefail <run_dir>/script.sh`, judged
    by exit code alone), with an optional "env". A relative workdir starts at the login's home, as every
    relative path on a node does (`on_node`).
    `verify` steps (agent steps) review the change after the chain and the acceptance commands succeeded: the
    first that answers with a last line `VERDICT: APPROVE` or `VERDICT: REJECT` decides (status `rejected`).
    """

    project: str
    task_id: str
    workdir: str
    steps: list[Step]
    timeout: float | None = 3600.0
    stall_timeout: float | None = 900.0
    retry_limit: float | None = _RETRY_LIMIT  # an agent retrying by itself this long is passed over
    heartbeat: float = 2.0
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, str] = field(default_factory=dict)  # the node's configured env: may set PATH (the CLIs)
    skip_models: list[str] = field(default_factory=list)
    acceptance: list[str] = field(default_factory=list)
    acceptance_timeout: float = 300.0
    verify: list[Step] = field(default_factory=list)


@dataclass
class Outcome:
    """How one process (step or acceptance command) ended."""

    returncode: int | None = None
    reason: str | None = None  # None, "timeout", "stalled" or "killed" (the runner killed it)
    output: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    spawn_error: str | None = None
    pgid: int = 0
    survivors: bool = False  # some process of its group outlived SIGKILL
    leftovers: str = ""  # "killed N leftover processes: pid cmd, ..." (detached descendants), or ""
    usage: dict | None = None  # what an agent step said it used (UsageMeter), None when it printed nothing
    retries: int = 0  # lines where the agent CLI said it retries by itself (ratelimits.retry_notice)
    last_retry: str = ""  # the last of them, e.g. "429, retrying 2/10"


# ---------------------------------------------------------------------------------------------------------
# task.json


def _seconds(data: dict, key: str, default: float | None, *, allow_none: bool = True) -> float | None:
    value = data.get(key, default)
    if value is None or value == 0:
        if allow_none:
            return None
        raise TaskError(f"task.json: {key!r} must be a positive number of seconds, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TaskError(f"task.json: {key!r} must be a positive number of seconds, got {value!r}")
    return float(value)


def _str_map(value: Any, where: str, *, secret: bool = False) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        shown = f"a JSON {type(value).__name__}" if secret else repr(value)  # never echo a secret
        raise TaskError(f"{where} must be a JSON object of NAME: value strings, got {shown}")
    return {k: "" if v is None else str(v) for k, v in value.items()}


def _parse_step(raw: Any, index: int) -> Step:
    where = f"task.json: steps[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise TaskError(f"{where} must be an object with a non-empty 'name', got {raw!r}")
    argv, script = raw.get("argv"), raw.get("script")
    if (argv is None) == (script is None):
        raise TaskError(f"{where} ({raw['name']}) needs exactly one of 'argv' (a list) or 'script' (text)")
    if argv is not None and (not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)):
        raise TaskError(f"{where} ({raw['name']}): 'argv' must be a non-empty list of strings, got {argv!r}")
    if script is not None and not isinstance(script, str):
        raise TaskError(f"{where} ({raw['name']}): 'script' must be a string")
    stdin = raw.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise TaskError(f"{where} ({raw['name']}): 'stdin' must be a string (the prompt), got a JSON "
                        f"{type(stdin).__name__}")
    return Step(raw["name"], argv, script, _str_map(raw.get("env"), f"{where}.env"), stdin)


def on_node(path: str) -> str:
    """The one rule for a path the dispatcher names on a node: `~` expanded, a relative one taken from the
    login's home (where SFTP and SSH commands start), never from the current or the run directory."""
    path = os.path.expanduser(path)
    return os.path.abspath(path if os.path.isabs(path) else os.path.join(os.path.expanduser("~"), path))


def load_task(run_dir: str) -> Task:
    """Read and check ``<run_dir>/task.json``.

    Raises:
        TaskError: the file is missing, is not JSON, or a field is wrong (the message names it).
    """
    path = os.path.join(run_dir, protocol.TASK_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise TaskError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TaskError(f"{path} must hold a JSON object")
    steps, verify = data.get("steps", []), data.get("verify") or []
    if not isinstance(steps, list):
        raise TaskError("task.json: 'steps' must be a list")
    if not isinstance(verify, list) or not all(isinstance(raw, dict) and raw.get("argv") for raw in verify):
        raise TaskError("task.json: 'verify' must be a list of agent steps (each with 'name' and 'argv')")
    workdir = data.get("workdir")
    if not isinstance(workdir, str) or not workdir:
        raise TaskError("task.json: 'workdir' must be a directory path (it is created if missing)")
    lists = {}
    for key in ("skip_models", "acceptance"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TaskError(f"task.json: {key!r} must be a list of strings, got {value!r}")
        lists[key] = value
    return Task(
        project=str(data.get("project") or os.path.basename(os.path.dirname(os.path.dirname(run_dir)))),
        task_id=str(data.get("task_id") or os.path.basename(run_dir)),
        workdir=on_node(workdir),
        steps=[_parse_step(raw, i) for i, raw in enumerate(steps)],
        timeout=_seconds(data, "timeout", 3600.0),
        stall_timeout=_seconds(data, "stall_timeout", 900.0),
        retry_limit=_seconds(data, "retry_limit", _RETRY_LIMIT),
        heartbeat=_seconds(data, "heartbeat", 2.0, allow_none=False) or 2.0,
        env=_str_map(data.get("env"), "task.json: env"),
        node_env=_str_map(data.get("node_env"), "task.json: node_env"),
        skip_models=lists["skip_models"],
        acceptance=lists["acceptance"],
        acceptance_timeout=_seconds(data, "acceptance_timeout", 300.0, allow_none=False) or 300.0,
        verify=[_parse_step(raw, i) for i, raw in enumerate(verify)],
    )


def read_secrets(text: str) -> dict[str, str]:
    """Parse the JSON object of secret env vars given on stdin (empty input means none)."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TaskError(f"--secrets-stdin: stdin is not a JSON object ({exc.msg})") from None
    return _str_map(data, "--secrets-stdin: stdin", secret=True)


# ---------------------------------------------------------------------------------------------------------
# files, processes


def _write_json(path: str, data: dict, *, sync: bool = False) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=1, sort_keys=True) + "\n")  # one write, not one per token
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def runner_version() -> str:
    """sha256 of the shipped files (`protocol.checksum`): equal to ``dispatch.runner.runner_checksum()``.

    Hashes the ratelimits.py that is shipped with the runner even if this python cannot import it.
    """
    paths = protocol.shipped_paths(os.path.dirname(os.path.abspath(__file__)))
    return protocol.checksum(path for path in paths if os.path.isfile(path))


def _in_git_checkout(path: str) -> bool:
    """Whether `path` may lie in a git checkout: a `.git` in it or above it, or git told where one is.

    Saves starting `git rev-parse` (a few ms of a loaded node's CPU, at the end of every spec) where it
    could only say no, as in a spec's own empty workdir."""
    if os.environ.get("GIT_DIR") or os.environ.get("GIT_WORK_TREE"):
        return True
    current = os.path.abspath(path)
    while True:
        if os.path.lexists(os.path.join(current, ".git")):
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, session) of a live pid from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def _session_members(pgid: int) -> list[tuple[int, str]] | None:
    """(pid, state) of every process in process group or session ``pgid``; None without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    if "self" not in names:
        return None
    members = []
    for name in names:
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and pgid in (stat[1], stat[2]):
                members.append((int(name), stat[0]))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a step's process group, plus any process that moved to another group of its session."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid, _state in _session_members(pgid) or []:
        stat = _proc_stat(pid)
        if stat is not None and stat[1] != pgid:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _group_alive(pgid: int, proc: subprocess.Popen | None = None) -> bool:
    """Whether any non-zombie process of the group (or its session) remains; reaps zombies we own.

    For our own step (`proc`, reaped) on a subreaper runner, no child at all means nothing of its session is
    left: every member descends from the step, and an orphan comes back to us. That answer costs one read of
    /proc/self instead of a scan of every process on the node."""
    if proc is not None:
        proc.poll()
        if proc.returncode is not None and _SUBREAPER[0] and not _has_children():
            return False
    members = _session_members(pgid)
    if members is None:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    alive = False
    for pid, state in members:
        if state == "Z":
            if proc is None or pid != proc.pid:  # an orphan re-parented to us (subreaper)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        else:
            alive = True
    return alive


def _terminate_group(pgid: int, proc: subprocess.Popen | None = None) -> bool:
    """SIGTERM the group, SIGKILL it after the grace; True if nothing of it survives."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, 2.0)):
        if not _group_alive(pgid, proc):
            return True
        _signal_group(pgid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _group_alive(pgid, proc):
                return True
            time.sleep(_POLL)
    return not _group_alive(pgid, proc)


def _pid_alive(pid: Any) -> bool:
    """Whether ``pid`` is a live (not zombie) process of ours running this runner script."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = _proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return _RUNNER_NAME in handle.read()
    except OSError:
        return stat is None  # no /proc (not Linux): trust kill(pid, 0)


def _become_subreaper() -> None:
    """Linux: adopt orphaned descendants, so that killed background children are reaped by us, and children
    that detach (`setsid`, a double fork) come back to us to be killed when their step ends."""
    _SUBREAPER[0] = _prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER


_LIBC: list = []  # [(ctypes, libc)] once loaded, [None] where there is no C library to load


def _libc() -> Any:
    """(ctypes, the C library), loaded once per process; None where they cannot be. `serve` loads them before
    it forks any runner, so a runner does not pay ~4 ms to load them again."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append((ctypes, ctypes.CDLL(None, use_errno=True)))
        except (OSError, ImportError):
            _LIBC.append(None)
    return _LIBC[0]


def _prctl(option: int, value: Any) -> int | None:
    """Linux prctl(2); None where there is none."""
    loaded = _libc()
    if loaded is None:
        return None
    ctypes, libc = loaded
    try:
        return libc.prctl(option, ctypes.c_char_p(value) if isinstance(value, bytes) else value, 0, 0, 0)
    except AttributeError:
        return None


_SUBREAPER = [False]  # whether this process is a child subreaper (set by `_become_subreaper`)


def _has_children() -> bool:
    """Whether this process has any child (cheap: /proc/self/task/*/children; True when that cannot be read)."""
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as handle:
                if handle.read().strip():
                    return True
    except OSError:
        return True
    return False


def _descendants(root: int) -> dict[int, str]:
    """Live (not zombie) descendants of `root`, pid -> state, read from /proc; our zombie children are reaped."""
    children: dict[int, list[tuple[int, str]]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read().decode("ascii", "replace")
            fields = raw[raw.rfind(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append((int(name), fields[0]))
        except (OSError, IndexError, ValueError):
            continue
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for pid, state in children.get(stack.pop(), []):
            if state == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # not ours (a grandchild): its parent reaps it
                    pass
                continue
            found[pid] = state
            stack.append(pid)
    return found


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            text = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"
    return text[:200] or "?"


def _kill_leftovers() -> tuple[str, bool]:
    """Kill every process still descending from this runner (SIGTERM, SIGKILL after the grace).

    Run when a step has ended and been reaped, so whatever is left escaped its process group and session:
    a daemon that double-forked with `setsid`, re-parented to us by `_become_subreaper`. Returns the report
    ("killed N leftover processes: pid cmd, ...", or "") and whether any outlived SIGKILL.
    """
    found = _descendants(os.getpid()) if _has_children() else {}
    if not found:
        return "", False
    described = [f"{pid} {_command_line(pid)}" for pid in sorted(found)]
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, 2.0)):
        for pid in found:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + wait
        while found and time.monotonic() < end:
            time.sleep(_POLL)
            found = _descendants(os.getpid())
        if not found:
            break
    return f"killed {len(described)} leftover processes: {', '.join(described)}", bool(found)


def _set_process_name(name: bytes) -> None:
    """Linux: the name `ps -e` and `top` show (a runner forked by `serve` would otherwise look like it)."""
    _prctl(15, name[:15])  # PR_SET_NAME


def _find_executable(exe: str, path: str, cwd: str) -> str | None:
    if os.sep in exe:
        full = exe if os.path.isabs(exe) else os.path.join(cwd, exe)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    return shutil.which(exe, path=path)


# ---------------------------------------------------------------------------------------------------------
# the log


class _Log:
    """task.log, written and flushed line by line, with every secret value replaced by ``***``."""

    def __init__(self, path: str, secrets: dict[str, str], echo: bool) -> None:
        self.path = path
        values = {v for v in secrets.values() if len(v) >= _MIN_SECRET_LEN}
        self._secrets = sorted(values, key=len, reverse=True)
        self._encoded = [value.encode("utf-8", "replace") for value in self._secrets]
        # a piece of a long line is cut this many bytes early, so a secret across the cut stays whole
        self.overlap = max((len(value) for value in self._encoded), default=1) - 1
        self._echo = echo
        self._handle = open(path, "ab")  # open for the whole run
        self._events: Any = None  # events.jsonl, opened at an agent's first JSON event

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def mask_bytes(self, data: bytes) -> bytes:
        for secret in self._encoded:
            data = data.replace(secret, b"***")
        return data

    def mask_all(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list):
            return [self.mask_all(v) for v in value]
        if isinstance(value, dict):
            return {k: self.mask_all(v) for k, v in value.items()}
        return value

    def line(self, text: str) -> str:
        masked = self.mask(text)
        data = (masked + "\n").encode("utf-8", "replace")
        self._handle.write(data)
        self._handle.flush()
        if self._echo:
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            except (OSError, ValueError):  # the SSH session went away: keep running, stop echoing
                self._echo = False
        return masked

    def event(self, text: str, shown: list[str]) -> str:
        """One JSON event of an agent: masked, as printed to events.jsonl, and as `shown` to task.log."""
        masked = self.mask(text)
        if self._events is None:
            self._events = open(os.path.join(os.path.dirname(self.path), "events.jsonl"), "ab")
        self._events.write((masked + "\n").encode("utf-8", "replace"))
        self._events.flush()
        for line in shown:
            self.line(line)
        return masked

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 65536))
                data = handle.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def close(self) -> None:
        self._handle.close()
        if self._events is not None:
            self._events.close()


def _shown(text: Any, limit: int = _SHOWN_CHARS) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _tool_call(name: Any, arguments: Any) -> str:
    """`→ Bash: pytest -q`: a tool call in one line, by the argument that says most."""
    if isinstance(arguments, dict):
        for key in ("command", "file_path", "path", "pattern", "url", "query", "description"):
            if isinstance(arguments.get(key), str):
                return f"→ {name}: {_shown(arguments[key], 300)}"
    return f"→ {name}: {_shown(arguments, 300)}"


def _claude_blocks(content: Any) -> list[str]:
    shown: list[str] = []
    for block in content if isinstance(content, list) else [{"type": "text", "text": content}]:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            shown += _shown(block["text"]).splitlines() or [""]
        elif kind == "tool_use":
            shown.append(_tool_call(block.get("name"), block.get("input")))
        elif kind == "tool_result":
            body = block.get("content")
            if isinstance(body, list):
                body = "\n".join(b.get("text", "") for b in body if isinstance(b, dict))
            first = (str(body or "").strip().splitlines() or [""])[0]
            mark = "← error" if block.get("is_error") else "← result"
            shown.append(f"{mark} ({len(str(body or ''))} characters): {_shown(first, 200)}")
    return shown


def _codex_item(item: dict) -> list[str]:
    kind = item.get("type")
    if kind == "agent_message":
        return _shown(item.get("text") or "").splitlines() or [""]
    if kind == "reasoning":
        return [f"(thinking) {_shown(item.get('text') or '', 300)}"]
    if kind == "command_execution":
        output = (item.get("aggregated_output") or "").strip().splitlines()[-5:]
        return [f"$ {_shown(item.get('command') or '', 300)} → exit {item.get('exit_code')}", *output]
    if kind == "file_change":
        changes = item.get("changes") or []
        return ["changed: " + ", ".join(str(c.get("path")) for c in changes if isinstance(c, dict))]
    if kind == "error":
        return [f"error: {_shown(item.get('message') or '')}"]
    return [f"({kind})"]


def parse_event(line: str) -> dict | None:
    """One line an agent printed, as the JSON object it is; None when it is none."""
    if not line.startswith("{") or not line.rstrip().endswith("}"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def render_event(line: str, event: dict | None = None) -> list[str] | None:
    """The readable lines of one line an agent printed in its JSON output (Claude Code `stream-json`, Codex
    `--json`); None when it is no such event (printed as it is); [] for an event that says nothing.
    `event`: the line already parsed (`parse_event`)."""
    event = parse_event(line) if event is None else event
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str):
        return None
    if kind in ("assistant", "user"):
        return _claude_blocks((event.get("message") or {}).get("content"))
    if kind == "system":
        if event.get("subtype") == "init":
            return [f"=== agent session {str(event.get('session_id', ''))[:8]}, model {event.get('model', '?')} ==="]
        return []
    if kind == "result":
        cost, _ = usage_figure("cost_usd", event.get("total_cost_usd"))  # UsageMeter warns of a bad one
        figures = [f"{event.get('num_turns')} turns" if event.get("num_turns") is not None else "",
                   f"{event['duration_ms'] / 1000:.1f} s" if isinstance(event.get("duration_ms"), (int, float)) else "",
                   f"${cost:.4f}" if cost is not None else ""]
        head = "error" if event.get("is_error") else "result"
        summary = ", ".join([str(event.get("subtype", "")), *(f for f in figures if f)])
        return [f"=== agent {head}: {summary} ===", *_shown(event.get("result") or "").splitlines()]
    if kind == "rate_limit_event":
        info = event.get("rate_limit_info") or {}
        return [f"rate limit: {info.get('status')} ({info.get('rateLimitType')}), resets at {info.get('resetsAt')}"]
    if kind == "item.completed" and isinstance(event.get("item"), dict):
        return _codex_item(event["item"])
    if kind in ("thread.started", "turn.started", "item.started", "item.updated"):
        return []
    if kind == "turn.completed":
        usage = event.get("usage") or {}
        return [f"=== codex turn done: {usage.get('input_tokens')} tokens in, {usage.get('output_tokens')} out ==="]
    if kind in ("turn.failed", "error"):
        error = event.get("error") if isinstance(event.get("error"), dict) else event
        return [f"=== codex {kind}: {_shown(error.get('message') or '')} ==="]
    return None


# An agent's usage figures are its own output, so untrusted: past these bounds (one attempt) a figure is a bug
# or a forged event, recorded as unknown with a warning. Both sides check (dispatch/core/usage.py imports these).
USAGE_MAX_COST_USD = 10_000.0
USAGE_MAX_TOKENS = 10**10  # of one kind (input, output, cache...); a long session is ~10^7


def usage_figure(name: str, value: Any) -> tuple[float | int | None, str]:
    """A usage figure an agent printed, as recorded: `cost_usd` a finite number from 0 to USAGE_MAX_COST_USD,
    a token count a whole number from 0 to USAGE_MAX_TOKENS.

    Returns:
        (the figure, ""); (None, why it is no figure) for anything else, which is recorded as unknown;
        (None, "") when nothing was printed (None).
    """
    if value is None:
        return None, ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{name} is a {type(value).__name__}, not a number"
    cost = name == "cost_usd"
    bound = USAGE_MAX_COST_USD if cost else USAGE_MAX_TOKENS
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= bound:
        shown = f"{value:.6g}" if isinstance(value, float) or abs(value) < 10**15 else "a number of many digits"
        return None, f"{name} {shown} is not a finite number from 0 to {bound:,.0f}"
    if not cost and value != int(value):
        return None, f"{name} {value:g} is not a whole number"
    return (float(value) if cost else int(value)), ""


class UsageMeter:
    """What an agent said one attempt used, from its JSON events; never a guess.

    Claude Code's final `result` event (`total_cost_usd`, `usage`: the session's totals, which its per-message
    usage only repeats), Codex's `turn.completed.usage` (cumulative for the session; no cost) and opencode's
    `step_finish` parts (`run --format json`: per step, summed). A figure the agent did not print is absent.
    """

    _CLAUDE = {"input_tokens": "input_tokens", "output_tokens": "output_tokens",
               "cache_read_input_tokens": "cache_read_tokens", "cache_creation_input_tokens": "cache_write_tokens"}
    _CODEX = {"input_tokens": "input_tokens", "cached_input_tokens": "cache_read_tokens",
              "output_tokens": "output_tokens", "reasoning_output_tokens": "reasoning_tokens"}

    def __init__(self) -> None:
        self._usage: dict[str, Any] = {}
        self._unknown: set[str] = set()  # figures the agent printed that are no figures (`usage_figure`)
        self._agent_model = ""

    def _set(self, source: str, figures: dict[str, Any], add: bool = False) -> list[str]:
        checked = {key: usage_figure(key, value) for key, value in figures.items()}
        found = {key: value for key, (value, _) in checked.items() if value is not None}
        refused = {key: problem for key, (_, problem) in checked.items() if problem}
        warnings = [f"=== runner: WARNING: {source} reported {problem}; recorded as unknown ==="
                    for problem in refused.values()]
        fresh = not add or self._usage.get("source") != source
        if not found and (fresh or not refused):  # nothing believable: nothing recorded (or added to)
            return warnings
        if fresh:
            self._usage, self._unknown = {"source": source}, set()
        self._unknown |= set(refused)  # a sum with one bad step in it is unknown too
        for key, value in found.items():
            self._usage[key] = self._usage.get(key, 0) + value if add else value
        return warnings

    def add(self, event: Any) -> list[str]:
        """Take one parsed JSON event of the agent's output (others are ignored); returns the warnings for
        task.log about figures in it that are no figures (`usage_figure`: recorded as unknown)."""
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "system" and event.get("subtype") == "init" and isinstance(event.get("model"), str):
            self._agent_model = event["model"][:100]
        elif kind == "result":
            usage = event.get("usage") if isinstance(event.get("usage"), dict) else {}
            figures = {name: usage.get(key) for key, name in self._CLAUDE.items()}
            return self._set("claude", {"cost_usd": event.get("total_cost_usd"), **figures})
        elif kind == "turn.completed" and isinstance(event.get("usage"), dict):
            return self._set("codex", {name: event["usage"].get(key) for key, name in self._CODEX.items()})
        elif kind == "step_finish" and isinstance(event.get("part"), dict):
            part = event["part"]
            tokens = part.get("tokens") if isinstance(part.get("tokens"), dict) else {}
            cache = tokens.get("cache") if isinstance(tokens.get("cache"), dict) else {}
            return self._set("opencode", {
                "cost_usd": part.get("cost"), "input_tokens": tokens.get("input"),
                "output_tokens": tokens.get("output"), "reasoning_tokens": tokens.get("reasoning"),
                "cache_read_tokens": cache.get("read"), "cache_write_tokens": cache.get("write")}, add=True)
        return []

    def usage(self) -> dict[str, Any] | None:
        """The attempt's usage (`source`, `cost_usd`, `*_tokens`, `agent_model`: only what was printed, and
        believable), or None."""
        if not self._usage:
            return None
        usage = {key: value for key, value in self._usage.items() if key not in self._unknown}
        if self._agent_model and usage.get("source") == "claude":
            return {**usage, "agent_model": self._agent_model}
        return usage


def base_environment(environ: dict[str, str]) -> dict[str, str]:
    """The variables of `environ` a step may inherit: `STEP_ENV_ALLOW` and the locale's LC_*."""
    return {k: v for k, v in environ.items() if k in STEP_ENV_ALLOW or k.startswith("LC_")}


def protected_env(name: str) -> bool:
    """Whether a spec's `env:` may not set `name` (PROTECTED_ENV_*): it decides which program runs or where an
    agent sends its key. A bare suffix counts too (`TOKEN`, `API_KEY`)."""
    return (name in PROTECTED_ENV_NAMES or name.startswith(PROTECTED_ENV_PREFIXES)
            or ("_" + name.upper()).endswith(PROTECTED_ENV_SUFFIXES))


def _cut(data: bytes, keep: int) -> tuple[bytes, bytes]:
    """Split masked `data` into a piece to write and the last `keep` bytes (or more, to end on a whole
    UTF-8 character), which may hold the start of a secret that the next read completes."""
    cut = max(0, len(data) - keep)
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # never inside a multi-byte character
        cut -= 1
    return data[:cut], data[cut:]


class _Tail:
    """The last ``limit`` characters of a process's output, kept as lines."""

    def __init__(self, limit: int) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._size = 0
        self._limit = limit

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.popleft()) + 1

    def text(self) -> str:
        return "\n".join(self._lines)


# ---------------------------------------------------------------------------------------------------------
# the run


class Runner:
    """Runs one task: the model chain, acceptance, then result.json."""

    def __init__(self, run_dir: str, task: Task, secrets: dict[str, str], *, echo: bool = False) -> None:
        self.run_dir = run_dir
        self.task = task
        self.secrets = secrets
        self.echo = echo
        self.stop_requested = False
        self.attempts: list[dict] = []
        self.skipped: list[str] = []
        self.started_at = time.time()
        self._stamps: dict[str, tuple[int, int]] = {}  # the workdir's files when the run started (no git)
        self._deadline = None if task.timeout is None else time.monotonic() + task.timeout
        self._status: dict[str, Any] = {}
        self._status_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self.log: _Log | None = None
        self._meter: UsageMeter | None = None  # the agent step's usage, while it runs

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def start(self) -> None:
        """Keep the previous run's log and result as *.prev, open task.log, write the first status."""
        _rotate_previous(self.run_dir)
        self.log = _Log(self._path("task.log"), self.secrets, self.echo)
        self._write_status(
            state="running",
            runner_pid=os.getpid(),
            step=None,
            step_pid=None,
            started_at=self.started_at,
            heartbeat=self.task.heartbeat,
            project=self.task.project,
            task_id=self.task.task_id,
        )

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self.stop_requested = True

    # -- status ------------------------------------------------------------------------------------------

    def _write_status(self, **changes: Any) -> None:
        with self._status_lock:
            self._status.update(changes)
            self._status["heartbeat_at"] = time.time()
            try:
                self._status["log_bytes"] = os.path.getsize(self._path("task.log"))
            except OSError:
                self._status["log_bytes"] = 0
            _write_json(self._path(protocol.STATUS_FILE), self._status)

    def _heartbeat(self) -> None:
        while not self._beat_stop.wait(self.task.heartbeat):
            try:
                self._write_status()
            except OSError:
                pass

    # -- main --------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run the task to the end; returns the process exit code (0 only if it succeeded)."""
        assert self.log is not None, "call start() first"
        _become_subreaper()
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, lambda *_: None)  # a dropped SSH session never stops a run
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        self._stamps = self._tree_stamps(self.task.workdir)  # what "changed" is measured from (no git)
        if any(step.script is None for step in self.task.steps):  # shell specs are never classified
            classifier, error = _classifier()
            if classifier is None:
                self.log.line(
                    f"=== runner: WARNING: no rate-limit classifier ({error}); "
                    "agent steps are judged by exit code alone ==="
                )
        model, exit_code, files, acceptance, verification = None, None, [], [], None
        try:
            os.makedirs(self.task.workdir, exist_ok=True)
            status, reason, model, exit_code = self._run_chain()
            self._write_status(step=None, step_pid=None)
            files = self._files_changed()
            if status == "succeeded" and self.task.acceptance:
                status, reason, acceptance = self._run_acceptance()
            if status == "succeeded" and self.task.verify:
                status, reason, verification = self._run_verify(files)
        except Exception as exc:  # a bug or an unusable workdir: still leave a result behind
            status, reason = "failed", f"runner error: {exc.__class__.__name__}: {exc}"
            for line in traceback.format_exc().splitlines():
                self.log.line(line)
        self._beat_stop.set()
        beat.join(timeout=5)
        ended = time.time()
        self.log.line(f"=== runner: {status}: {reason} ===")
        result = protocol.result_record(
            project=self.task.project,
            task_id=self.task.task_id,
            status=status,
            reason=reason,
            model=model,
            attempts=self.attempts,
            skipped_models=self.skipped,
            exit_code=exit_code,
            started_at=self.started_at,
            ended_at=ended,
            duration=round(ended - self.started_at, 3),
            workdir=self.task.workdir,
            files_changed=files,
            acceptance=acceptance,
            verification=verification,
            log_tail=self.log.tail(),
            runner_version=runner_version(),
            runner_pid=os.getpid(),
            hostname=socket.gethostname(),
        )
        _write_json(self._path(protocol.RESULT_FILE), self.log.mask_all(result), sync=True)
        self._write_status(state=status, step=None, step_pid=None, ended_at=ended)
        self.log.close()
        _unregister_live(self.run_dir)
        if self.echo:
            print(f"runner: {status} ({reason}); result in {self._path('result.json')}", file=sys.stderr)
        return 0 if status == "succeeded" else 1

    def _run_chain(self) -> tuple[str, str, str | None, int | None]:
        """Run the steps in order; returns (status, reason, model, exit_code)."""
        if not self.task.steps:
            return "failed", "task.json has no steps: nothing to run", None, None
        model, exit_code, passed_over = None, None, []
        for step in self.task.steps:
            if step.name in self.task.skip_models:
                self.skipped.append(step.name)
                self.log.line(f"=== step {step.name} skipped (on cool-down) ===")
                continue
            if self.stop_requested:
                return "killed", "killed before the chain finished", model, exit_code
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return "timeout", f"hard timeout of {self.task.timeout:g}s reached", model, exit_code
            attempt, fall_through = self._run_step(step, len(self.attempts) + 1)
            self.attempts.append(attempt)
            model, exit_code = step.name, attempt["exit_code"]
            verdict, reason = attempt["verdict"], attempt["reason"]
            if verdict == "ok":
                return "succeeded", f"{step.name}: {reason}", model, exit_code
            if verdict == "stalled" and step is not self.task.steps[-1] and step.argv is not None:
                passed_over.append(f"{step.name}: {reason}")  # a hang with no progress: try the next model
                continue
            if verdict in ("timeout", "stalled", "killed"):
                return verdict, f"{step.name}: {reason}", model, exit_code
            if not fall_through:
                return "failed", f"{step.name}: {reason}", model, exit_code
            passed_over.append(f"{step.name}: {verdict}: {reason}")
        if not self.attempts:
            return "failed", "every model is skipped (on cool-down): " + ", ".join(self.skipped), None, None
        return "failed", "no model left to try; " + "; ".join(passed_over), model, exit_code

    def _child_env(self, step: Step | None) -> dict[str, str]:
        """A step's environment: the allow-list of ours, the node's env, the task's env without what it may not
        set (`protected_env`: dropped, and named in task.log), then its model's own env and key.

        Shell steps and acceptance commands get no secret at all; an agent step gets `<model>:NAME` of its
        own model only (glm and minimax both take ANTHROPIC_AUTH_TOKEN, each its own), and a plain `NAME`
        (given by hand to `run --secrets-stdin`; the dispatcher always names the model). The DISPATCH_* of
        the task's env are the dispatcher's own (DISPATCH_ATTEMPT, DISPATCH_NODE, DISPATCH_SPEC_FILE).
        """
        env = base_environment(os.environ)
        env.update(self.task.node_env)
        dropped = sorted(k for k in self.task.env if protected_env(k) and not k.startswith("DISPATCH_"))
        if dropped:  # a spec's env that validation refused (an older or hostile dispatcher): names, no values
            self.log.line(f"=== runner: the task's env may not set {', '.join(dropped)} (which program runs, "
                          "where an agent sends its key): dropped; set them in the node's env or the model's "
                          "settings ===")
        env.update((k, v) for k, v in self.task.env.items() if k not in dropped)
        env["DISPATCH_RUN_DIR"] = self.run_dir
        env["DISPATCH_PROJECT"], env["DISPATCH_TASK_ID"] = self.task.project, self.task.task_id
        if step is not None:
            env.update(step.env)
            env["DISPATCH_MODEL"] = step.name
            if step.argv is not None:
                for key, value in self.secrets.items():
                    model, _, name = key.rpartition(":")
                    if (model == step.name or not model) and model != MASK_ONLY:
                        env[name] = value
        return env

    def _run_step(self, step: Step, number: int) -> tuple[dict, bool]:
        """Run one step; returns its attempt record and whether the chain may go on to the next."""
        self.log.line(f"=== step {step.name} (attempt {number}) ===")
        attempt: dict[str, Any] = {
            "model": step.name,
            "verdict": "failure",
            "reason": "",
            "reset_at": None,
            "retry_after": None,
            "exit_code": None,
            "started_at": time.time(),
            "ended_at": None,
            "matched": "",
        }
        env = self._child_env(step)
        if step.script is not None:
            script = self._path("script.sh" if number == 1 else f"script-{number}.sh")
            with open(script, "w", encoding="utf-8") as handle:
                handle.write(step.script)
            argv = ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", script]
            attempt["role"] = "shell"  # no agent: no usage to count
        else:
            argv = list(step.argv or [])
        if _find_executable(argv[0], env.get("PATH", os.defpath), self.task.workdir) is None:
            what = "bash" if step.script is not None else "agent CLI"
            attempt["reason"] = (
                f"no {what} {argv[0]!r} on PATH for model {step.name}: install it on {socket.gethostname()} "
                f"or fix the model's command (PATH={env.get('PATH', '')})"
            )
            attempt["ended_at"] = time.time()
            self.log.line(f"=== runner: {attempt['reason']} ===")
            return attempt, True
        self._write_status(step=step.name, step_pid=None, attempt=number, retrying=None)
        stdin_path = None
        if step.stdin is not None:  # a prompt in argv is capped at 128 KiB; a file is not
            stdin_path = self._path("prompt.txt")
            descriptor = os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as handle:
                os.fchmod(descriptor, 0o600)
                handle.write(step.stdin)
        outcome = self._run_process(
            argv,
            env,
            deadline=self._deadline,
            stall_timeout=self.task.stall_timeout,
            on_start=lambda pid: self._write_status(step_pid=pid),
            stdin_path=stdin_path,
            render=step.argv is not None,
            name=step.name,
        )
        attempt["started_at"], attempt["ended_at"] = outcome.started_at, outcome.ended_at
        if outcome.retries:
            attempt["retries"], attempt["last_retry"] = outcome.retries, self.log.mask(outcome.last_retry)
        attempt["exit_code"] = outcome.returncode
        if step.script is None:
            attempt["answer"] = _final_message(outcome.output)[-_ANSWER_CAP:]
            attempt["usage"] = outcome.usage
        attempt, fall_through = self._judge(step, attempt, outcome, argv[0])
        if outcome.leftovers:
            attempt["reason"] += f"; {outcome.leftovers}"
        if outcome.survivors:
            attempt["reason"] += f"; WARNING: processes of group {outcome.pgid} survived SIGKILL"
        return attempt, fall_through

    def _judge(self, step: Step, attempt: dict, outcome: Outcome, exe: str) -> tuple[dict, bool]:
        """Fill in the attempt's verdict from how the process ended and what it printed."""
        if outcome.spawn_error is not None:
            attempt["reason"] = f"cannot start {exe!r} for model {step.name}: {outcome.spawn_error}"
            return attempt, True
        if outcome.reason == "timeout":
            attempt["verdict"] = "timeout"
            attempt["reason"] = f"hard timeout of {self.task.timeout:g}s reached; process group killed"
            return attempt, False
        if outcome.reason == "killed":
            attempt["verdict"], attempt["reason"] = "killed", "killed on request; process group killed"
            return attempt, False
        if step.script is not None:  # a shell spec's output is the user's: never a rate limit
            ok = outcome.returncode == 0 and outcome.reason is None
            attempt["verdict"] = "ok" if ok else ("stalled" if outcome.reason else "failure")
            attempt["reason"] = self._stall_reason() if outcome.reason else f"exit code {outcome.returncode}"
            return attempt, False
        verdict = _classify(outcome.output, None if outcome.reason else outcome.returncode)
        for key in ("reset_at", "retry_after", "matched"):
            attempt[key] = getattr(verdict, key, attempt[key])
        attempt["verdict"], attempt["reason"] = verdict.kind, self.log.mask(str(verdict.reason))
        if outcome.reason == "retrying":  # it retried by itself past the limit: that model is done for now
            limit = f"gave up after {self.task.retry_limit:g}s of its own retries, last: {outcome.last_retry}"
            if verdict.kind not in _RATE_KINDS:
                attempt["verdict"], attempt["reason"] = "transient", self.log.mask(limit)
            else:
                attempt["reason"] += f" ({self.log.mask(limit)})"
            return attempt, True
        if outcome.reason == "stalled":
            if verdict.kind in _RATE_KINDS:  # it hung on a limit: that model is done, try the next
                attempt["reason"] += f" ({self._stall_reason()})"
                return attempt, True
            attempt["verdict"], attempt["reason"] = "stalled", self._stall_reason()
            return attempt, False
        return attempt, verdict.kind in _RATE_KINDS

    def _stall_reason(self) -> str:
        return f"stalled: no output for {self.task.stall_timeout:g}s; process group killed"

    def _record(self, text: str, render: bool) -> str:
        """Write one line of a step's output; returns it masked, as printed (what the classifier reads)."""
        event = parse_event(text) if render else None
        if event is not None and self._meter is not None:
            for warning in self._meter.add(event):
                self.log.line(warning)
        shown = render_event(text, event) if event is not None else None
        if shown is None:
            return self.log.line(text)
        return self.log.event(text, shown)

    def _run_process(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        deadline: float | None,
        stall_timeout: float | None,
        on_start: Any = None,
        stdin_path: str | None = None,
        render: bool = False,
        name: str = "",
    ) -> Outcome:
        """Run argv in its own session, stream its output to task.log, enforce the limits, reap it all.

        With `render` (agent steps), JSON events are written to task.log readably and to events.jsonl whole,
        and the lines where the CLI says it retries by itself (`retry_notice`) are shown as "=== runner:
        <name>: 429, retrying 2/10 ===" and in status.json (`retrying`), count as no progress for the stall
        check, and end the step once they have gone on for `retry_limit` seconds without progress.
        """
        outcome = Outcome(started_at=time.time())
        self._meter = UsageMeter() if render else None
        stdin = os.open(stdin_path, os.O_RDONLY) if stdin_path else subprocess.DEVNULL  # the prompt, if any
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.task.workdir,
                env=env,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            outcome.spawn_error, outcome.ended_at = str(exc), time.time()
            self.log.line(f"=== runner: cannot start {argv[0]!r}: {exc} ===")
            return outcome
        finally:
            if stdin_path:
                os.close(stdin)
        pgid = outcome.pgid = proc.pid
        if on_start is not None:
            on_start(proc.pid)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        tail = _Tail(_CLASSIFY_TAIL)
        pending = b""
        longest = _EVENT_LINE_MAX if render else _CHUNK
        last_output = time.monotonic()
        retrying_since: float | None = None  # when the CLI began retrying by itself, until its next progress
        notice_of = _retry_reader() if render else None
        retry_limit = self.task.retry_limit
        exited_at = term_at = gone_at = None
        eof = sent_kill = False
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if term_at is None:
                why = None
                if exited_at is None:
                    if self.stop_requested:
                        outcome.reason, why = "killed", "kill requested"
                    elif deadline is not None and now >= deadline:
                        outcome.reason, why = "timeout", "hard timeout reached"
                    elif stall_timeout is not None and now - last_output >= stall_timeout:
                        outcome.reason, why = "stalled", f"no output for {stall_timeout:g}s"
                    elif retrying_since is not None and retry_limit is not None and now - retrying_since >= retry_limit:
                        outcome.reason = "retrying"
                        why = f"{name} retried by itself for {retry_limit:g}s without progress; moving on"
                elif not eof and now - exited_at >= _LEFTOVER_GRACE:
                    why = "step exited but its background processes hold its output"
                if why is not None:
                    self.log.line(f"=== runner: {why}; killing process group {pgid} ===")
                    _signal_group(pgid, signal.SIGTERM)
                    term_at = now
            if term_at is not None and not sent_kill and now - term_at >= _KILL_GRACE:
                if _group_alive(pgid, proc):
                    _signal_group(pgid, signal.SIGKILL)
                sent_kill = True
            if eof and exited_at is not None:
                break
            if exited_at is not None and term_at is not None and not eof:
                # the pipe is held by a process that left the session: do not wait for it forever
                if _group_alive(pgid, proc):
                    gone_at = None
                elif gone_at is None:
                    gone_at = now
                elif now - gone_at >= 2.0:
                    break
            ready, _, _ = select.select([fd], [], [], _POLL)
            if not ready:
                continue
            data = os.read(fd, _CHUNK)
            if not data:
                eof = True
                continue
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) >= longest:  # a long line goes in pieces; a secret across a cut is kept whole
                piece, pending = _cut(self.log.mask_bytes(pending), self.log.overlap)
                lines.append(piece)
            progressed = not lines  # part of a line is output all the same
            for raw in lines:
                text = raw.decode("utf-8", "replace")
                notice = notice_of(text) if notice_of is not None else None
                tail.add(self._record(text, render))
                if notice is None:
                    progressed = True
                    continue
                outcome.retries += 1
                outcome.last_retry = notice
                retrying_since = retrying_since or time.monotonic()
                self._write_status(retrying=self.log.mask(f"{name}: {notice}"))
                self.log.line(f"=== runner: {name}: {notice} ===")
            if progressed:
                last_output = time.monotonic()
                if retrying_since is not None:
                    retrying_since = None
                    self._write_status(retrying=None)
        if pending:
            tail.add(self._record(pending.decode("utf-8", "replace"), render))
        proc.stdout.close()
        outcome.returncode = proc.wait()
        if _group_alive(pgid, proc):
            if outcome.reason is None:
                self.log.line(f"=== runner: step left background processes in group {pgid}; killing them ===")
            if not _terminate_group(pgid, proc):
                outcome.survivors = True
                self.log.line(f"=== runner: WARNING: processes of group {pgid} survived SIGKILL ===")
        outcome.leftovers, survived = _kill_leftovers()
        if outcome.leftovers:
            self.log.line(f"=== runner: {outcome.leftovers} ===")
        if survived:
            outcome.survivors = True
            self.log.line("=== runner: WARNING: leftover processes survived SIGKILL ===")
        outcome.output, outcome.ended_at = tail.text(), time.time()
        outcome.usage, self._meter = (self._meter.usage() if self._meter else None), None
        return outcome

    # -- after the chain ---------------------------------------------------------------------------------

    def _run_acceptance(self) -> tuple[str, str, list[dict]]:
        """Run each acceptance command in workdir; returns (status, reason, records)."""
        records, failed = [], []
        shell = "bash" if shutil.which("bash") else "/bin/sh"
        env = self._child_env(None)
        for number, command in enumerate(self.task.acceptance, 1):
            if self.stop_requested:
                return "killed", "killed during acceptance", records
            self.log.line(f"=== acceptance {number}/{len(self.task.acceptance)}: {command} ===")
            self._write_status(step=f"acceptance {number}", step_pid=None)
            outcome = self._run_process(
                [shell, "-c", command],
                env,
                deadline=time.monotonic() + self.task.acceptance_timeout,
                stall_timeout=None,
                on_start=lambda pid: self._write_status(step_pid=pid),
            )
            if outcome.reason == "killed":
                return "killed", "killed during acceptance", records
            passed = outcome.returncode == 0 and outcome.reason is None and outcome.spawn_error is None
            record = {
                "command": command,
                "passed": passed,
                "exit_code": None if outcome.reason else outcome.returncode,
                "output_tail": "\n".join(outcome.output.splitlines()[-30:])[-4000:] or (outcome.spawn_error or ""),
                "duration": round(outcome.ended_at - outcome.started_at, 3),
            }
            if outcome.reason == "timeout":
                record["output_tail"] += f"\n[timed out after {self.task.acceptance_timeout:g}s]"
            records.append(record)
            if not passed:
                failed.append(command)
        if failed:
            return "acceptance_failed", f"{len(failed)} acceptance command(s) failed: {failed[0]}", records
        return "succeeded", f"{len(records)} acceptance command(s) passed", records

    def _run_verify(self, files: list[str]) -> tuple[str, str, dict]:
        """Ask the verifier chain to review the change; the first verdict decides. Returns (status, reason,
        verification record). No verdict from any verifier (missing CLI, limits, no VERDICT line) fails."""
        change = self._change_text(files)
        passed_over = []
        for step in self.task.verify:
            if step.name in self.task.skip_models:
                passed_over.append(f"{step.name}: on cool-down")
                continue
            if self.stop_requested:
                return "killed", "killed during verification", {"model": step.name, "verdict": "none", "review": ""}
            self.log.line(f"=== verify: {step.name} reviews the change ===")
            reviewer = Step(step.name, step.argv, None, step.env, (step.stdin or "") + change)
            attempt, _ = self._run_step(reviewer, len(self.attempts) + 1)
            attempt["role"] = "verify"
            self.attempts.append(attempt)
            answer = attempt.get("answer", "")
            record = {"model": step.name, "verdict": "none", "review": answer[-4000:]}
            if attempt["verdict"] in ("timeout", "killed"):
                return attempt["verdict"], f"verifier {step.name}: {attempt['reason']}", record
            verdict = _verdict(answer) if attempt["verdict"] == "ok" else None
            if verdict == "approve":
                return "succeeded", f"verified by {step.name}", dict(record, verdict="approve")
            if verdict == "reject":
                why = " ".join(line.strip() for line in answer.splitlines()[:-1] if line.strip())[:600]
                return "rejected", f"rejected by verifier {step.name}: {why or 'no reason given'}", dict(
                    record, verdict="reject")
            why = attempt["reason"] if attempt["verdict"] != "ok" else "its answer has no VERDICT line"
            passed_over.append(f"{step.name}: {why}")
        return "failed", "no verifier gave a verdict: " + "; ".join(passed_over), {
            "model": "", "verdict": "none", "review": ""}

    def _change_text(self, files: list[str]) -> str:
        """The agent's change for the verifier: `git diff HEAD` and the new files of a git checkout, else the
        changed files' contents; capped."""
        root = _git_text(["rev-parse", "--show-toplevel"], self.task.workdir)
        diff = _git_text(["diff", "HEAD", "--no-color", "--no-ext-diff"], self.task.workdir) if root else None
        root = root.strip() if diff is not None else self.task.workdir
        new = set(files)
        if diff is not None:
            listing = _git_text(["ls-files", "--others", "--exclude-standard", "--full-name", "-z"], root) or ""
            new = set(listing.split("\0")) & new
        parts = [f"\n## The change ({len(files)} file(s) changed: {', '.join(files[:50]) or 'none'})\n"]
        if diff:
            parts.append(f"```diff\n{diff[:_CHANGE_CAP]}\n```\n")
        budget = _CHANGE_CAP - len(parts[-1])
        for name in sorted(new):
            if budget <= 0:
                parts.append(f"(more files not shown: the change is over {_CHANGE_CAP:,} characters)\n")
                break
            try:
                with open(os.path.join(root, name), "rb") as handle:
                    data = handle.read(_CHANGE_FILE_CAP + 1)
            except OSError:
                continue
            text = "(binary)" if b"\0" in data else data[:_CHANGE_FILE_CAP].decode("utf-8", "replace")
            cut = " (cut)" if len(data) > _CHANGE_FILE_CAP else ""
            parts.append(f"### {name}{cut}\n```\n{text}\n```\n")
            budget -= len(parts[-1])
        return "".join(parts)

    def _files_changed(self) -> list[str]:
        """Paths changed in workdir: `git status` for a git checkout, else files modified since start."""
        workdir = self.task.workdir
        git = shutil.which("git") if _in_git_checkout(workdir) else None
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
        if git is not None:
            try:
                top = subprocess.run(
                    [git, "rev-parse", "--show-toplevel"],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    timeout=30,
                )
                if top.returncode == 0:
                    listing = subprocess.run(
                        [git, "status", "--porcelain", "-z", "--untracked-files=all"],
                        cwd=workdir,
                        env=env,
                        capture_output=True,
                        timeout=120,
                    )
                    if listing.returncode == 0:
                        root = top.stdout.decode("utf-8", "replace").strip()
                        return self._git_paths(listing.stdout.decode("utf-8", "replace"), root)
            except (OSError, subprocess.SubprocessError):
                pass
        found = [rel for rel, stamp in self._tree_stamps(workdir).items() if self._stamps.get(rel) != stamp]
        return found[:_FILES_CAP]

    def _tree_stamps(self, workdir: str) -> dict[str, tuple[int, int]]:
        """(mtime in ns, size) of every file under `workdir` (not .git, not the run directory), at most
        `_TREE_CAP` files. Taken when the run starts and again at its end: a file changed when its stamp did,
        so files copied in just before the start (scp mode) never count as the spec's work, whatever the
        file system's time granularity."""
        stamps: dict[str, tuple[int, int]] = {}
        for root, dirs, files in os.walk(workdir):
            dirs[:] = sorted(d for d in dirs if d != ".git" and os.path.join(root, d) != self.run_dir)
            for name in sorted(files):
                full = os.path.join(root, name)
                try:
                    info = os.lstat(full)
                except OSError:
                    continue
                stamps[os.path.relpath(full, workdir)] = (info.st_mtime_ns, info.st_size)
                if len(stamps) >= _TREE_CAP:
                    return stamps
        return stamps

    def _git_paths(self, porcelain: str, root: str) -> list[str]:
        entries = porcelain.split("\0")
        paths: list[str] = []
        run_dir_rel = os.path.relpath(self.run_dir, root) + os.sep
        index = 0
        while index < len(entries) and len(paths) < _FILES_CAP:
            entry = entries[index]
            index += 1
            if len(entry) < 4:
                continue
            if entry[0] in "RC":
                index += 1  # the rename's source path follows
            path = entry[3:]
            if not (path + os.sep).startswith(run_dir_rel):
                paths.append(path)
        return paths


@dataclass(frozen=True)
class _ExitVerdict:
    """Stands in for ratelimits.Verdict when the classifier is missing or raised."""

    kind: str
    reason: str
    reset_at: float | None = None
    retry_after: float | None = None
    matched: str = ""


def _retry_reader() -> Any:
    """The classifier's `retry_notice` (None when no classifier imports, or an older copy lacks it)."""
    classifier, _ = _classifier()
    return getattr(classifier, "retry_notice", None)


def _classify(output: str, exit_code: int | None) -> Any:
    """ratelimits.classify, or an exit-code verdict when the classifier is missing or broken."""
    classifier, error = _classifier()
    if classifier is not None:
        try:
            return classifier.classify(output, exit_code)
        except Exception as exc:
            note = f"classifier error {exc.__class__.__name__}: {exc}"
    else:
        note = f"rate-limit classifier unavailable under python {sys.version.split()[0]}: {error}"
    if exit_code == 0:
        return _ExitVerdict("ok", f"exit code 0 ({note})")
    return _ExitVerdict("failure", f"exit code {exit_code} ({note})")


def _final_message(output: str) -> str:
    """An agent's answer: Claude Code's final `result` text, else Codex's last agent message, else its text."""
    result = message = None
    plain = []
    for line in output.splitlines():
        event = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                pass
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            plain.append(line)
        elif event["type"] == "result" and isinstance(event.get("result"), str):
            result = event["result"]
        elif event["type"] == "item.completed" and isinstance(event.get("item"), dict):
            if event["item"].get("type") == "agent_message" and isinstance(event["item"].get("text"), str):
                message = event["item"]["text"]
    return result if result is not None else message if message is not None else "\n".join(plain)


def _verdict(answer: str) -> str | None:
    """"approve" or "reject" from the answer's last non-empty line (`VERDICT: APPROVE`), else None."""
    lines = [line.strip().strip("*`_ ") for line in answer.splitlines() if line.strip()]
    if not lines or not lines[-1].upper().startswith(_VERDICT_PREFIX):
        return None
    word = lines[-1][len(_VERDICT_PREFIX):].strip().upper()
    return {"APPROVE": "approve", "REJECT": "reject"}.get(word)


def _git_text(args: list[str], cwd: str) -> str | None:
    """A git command's output in `cwd`, or None when git is missing or fails (not a checkout, no HEAD)."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run([git, *args], cwd=cwd, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"),
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


# ---------------------------------------------------------------------------------------------------------
# commands


def _print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def _fail_before_start(run_dir: str, message: str) -> int:
    """task.json or stdin is unusable: say so on stderr and in result.json, exit 2."""
    print(f"node_runner: {message}", file=sys.stderr)
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
        _write_json(os.path.join(run_dir, protocol.RESULT_FILE), result, sync=True)
        _write_json(
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


LIVE_DIR = ".live"
"""Under a run root: one symlink per live runner, `<project>@<task_id>` -> its run directory (`_register_live`)."""


def _live_entry(run_dir: str) -> str | None:
    """A runner's entry in its run root's registry; None for a run directory not laid out as under a run root
    (`<root>/<project>/tasks/<task_id>`): nothing is ever written above any other directory."""
    run_dir = os.path.realpath(run_dir)
    tasks_dir = os.path.dirname(run_dir)
    if os.path.basename(tasks_dir) != "tasks":
        return None
    project_dir = os.path.dirname(tasks_dir)
    name = f"{os.path.basename(project_dir)}@{os.path.basename(run_dir)}"
    return os.path.join(os.path.dirname(project_dir), LIVE_DIR, name)


def _register_live(run_dir: str) -> None:
    """Enter a claimed run directory in the registry the node's agents count its slots from.

    Counting from the registry costs a look at each live runner, where a scan of every run directory ever made
    under the root (thousands on a node with history) cost milliseconds for every start the agent made.
    Only a root an agent has made a run root (its registry exists: `_Agent.live_runners` makes it) gets an
    entry, so a runner laid out as `<dir>/<name>/tasks/<id>` anywhere else writes nothing above its directory.
    Best effort: an entry that cannot be written leaves the runner uncounted only until an agent starts, as
    each agent scans the whole root once, after making the registry."""
    entry = _live_entry(run_dir)
    if entry is None:
        return
    try:
        temporary = f"{entry}~{os.getpid()}"  # "~" is in no valid name: never taken for an entry
        os.symlink(os.path.realpath(run_dir), temporary)
        os.replace(temporary, entry)
    except OSError:
        pass


def _unregister_live(run_dir: str) -> None:
    entry = _live_entry(run_dir)
    if entry is None:
        return
    try:
        os.unlink(entry)
    except OSError:
        pass


def _claim(run_dir: str) -> tuple[int | None, dict | None]:
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
    orphan = _orphan_step(run_dir)
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
    _register_live(run_dir)
    return lock_fd, None


def cmd_run(run_dir: str, *, detach: bool, secrets_stdin: bool) -> int:
    if not os.path.isdir(run_dir):
        print(
            f"node_runner: run dir {run_dir} does not exist: the dispatcher creates it with task.json", file=sys.stderr
        )
        return 2
    lock_fd, refused = _claim(run_dir)
    if lock_fd is None:
        message = refused.pop("message")
        _print_json(refused)
        print(f"node_runner: {message}", file=sys.stderr)
        return 3
    try:
        task = load_task(run_dir)
        secrets = read_secrets(sys.stdin.read()) if secrets_stdin else {}
    except TaskError as exc:
        os.close(lock_fd)
        return _fail_before_start(run_dir, str(exc))
    if detach:
        pid = _spawn_detached(run_dir, lock_fd, task, secrets)
        if pid is None:
            print(f"node_runner: the detached runner did not start; see {run_dir}/runner.err", file=sys.stderr)
            return 1
        _print_json({"pid": pid, "run_dir": run_dir})
        return 0
    _record_lock_holder(lock_fd)
    runner = Runner(run_dir, task, secrets, echo=True)
    runner.start()
    return runner.run()


def _record_lock_holder(lock_fd: int) -> None:
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def _close_inherited(keep: tuple[int, ...]) -> None:
    """Close every descriptor above stderr but `keep` (a runner forked by `serve` must not hold its channel)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _rotate_previous(run_dir: str) -> None:
    """Keep the previous attempt's log and result as *.prev (before anything reads this attempt's)."""
    for name, prev in (("task.log", "task.prev.log"), ("result.json", "result.prev.json")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.replace(path, os.path.join(run_dir, prev))


def _spawn_detached(run_dir: str, lock_fd: int, task: Task, secrets: dict[str, str]) -> int | None:
    """Double-fork a runner into its own session; its pid once it has started, None if it did not start.

    `run --detach` promises the command that follows it (`follow`) a started runner: status.json and task.log
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
    _become_runner(run_dir, lock_fd, task, secrets, started_pipe=write_end)
    return None  # not reached


def _fork_runner(run_dir: str, lock_fd: int, task: Task, secrets: dict[str, str]) -> int:
    """`serve`: fork a runner into its own session and return its pid at once; the agent reaps it at its end.

    The agent does not wait for the runner to set itself up (~15 ms, longer on a busy node): in a burst of 40
    starts that wait, taken one after another, was what the last start waited for. The previous attempt's log
    and result are set aside first, so the agent never reads them as this attempt's.
    """
    _rotate_previous(run_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child > 0:
        os.close(lock_fd)  # the runner holds its own copy of the lock
        return child
    os.setsid()
    _become_runner(run_dir, lock_fd, task, secrets, started_pipe=None)
    return 0  # not reached


def _become_runner(run_dir: str, lock_fd: int, task: Task, secrets: dict[str, str], *,
                   started_pipe: int | None) -> NoReturn:
    """In a forked child: detach from the caller's descriptors and run the attempt; never returns.

    Args:
        started_pipe: where to write {"pid": ...} once the runner has started (then closed), if anywhere.
    """
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(os.path.join(run_dir, "runner.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err, 2)
        _close_inherited((lock_fd,) if started_pipe is None else (lock_fd, started_pipe))
        _set_process_name(RUNNER_PROCESS_NAME)
        os.chdir("/")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _record_lock_holder(lock_fd)
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


def cmd_status(run_dir: str) -> int:
    status = _read_json(os.path.join(run_dir, protocol.STATUS_FILE)) or {"state": "absent"}
    pid_alive = protocol.runner_alive(run_dir)  # the runner's process lives: it holds the run directory's lock
    beat = status.get("heartbeat_at")
    interval = status.get("heartbeat") or 2.0
    age = time.time() - beat if isinstance(beat, (int, float)) else None
    alive = pid_alive and age is not None and age <= 3 * interval
    out = dict(status)
    out.update(
        run_dir=run_dir,
        alive=alive,
        pid_alive=pid_alive,
        heartbeat_age=age,
        stale=status.get("state") == "running" and not alive,
    )
    if status.get("state") in _FINAL_STATES or not alive:
        result = _read_json(os.path.join(run_dir, protocol.RESULT_FILE))
        if result is not None:
            out["result"] = result
    _print_json(out)
    return 0


def _belongs_to_run(pgid: int, run_dir: str) -> bool:
    """Whether the group's processes carry this run's DISPATCH_RUN_DIR (guards against pid reuse)."""
    marker = f"DISPATCH_RUN_DIR={run_dir}\0".encode()
    members = _session_members(pgid)
    if members is None:
        return True
    for pid, _state in members:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker in handle.read():
                    return True
        except OSError:
            continue
    return False


def _orphan_step(run_dir: str) -> int | None:
    """The process group of this run's step if it outlived its runner, else None."""
    step_pid = (_read_json(os.path.join(run_dir, protocol.STATUS_FILE)) or {}).get("step_pid")
    if isinstance(step_pid, int) and step_pid > 0 and _group_alive(step_pid) and _belongs_to_run(step_pid, run_dir):
        return step_pid
    return None


def cmd_kill(run_dir: str) -> int:
    status_path = os.path.join(run_dir, protocol.STATUS_FILE)
    status = _read_json(status_path) or {}
    pid = protocol.lock_holder(run_dir) or status.get("runner_pid")
    report: dict[str, Any] = {"run_dir": run_dir, "runner_pid": pid, "was_running": False}
    if _pid_alive(pid):
        report["was_running"] = True
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + _KILL_GRACE + 12
        while _pid_alive(pid) and time.monotonic() < end:
            time.sleep(_POLL)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    orphan = _orphan_step(run_dir)
    if orphan is not None:
        report["was_running"] = True
        report["orphans_left"] = not _terminate_group(orphan)
    status = _read_json(status_path) or {}
    if status.get("state") == "running":  # the runner died without finishing: close the books
        now = time.time()
        status.update(state="killed", step_pid=None, ended_at=now)
        _write_json(status_path, status)
        if not os.path.exists(os.path.join(run_dir, protocol.RESULT_FILE)):
            _write_json(
                os.path.join(run_dir, protocol.RESULT_FILE),
                protocol.result_record(
                    project=status.get("project"),
                    task_id=status.get("task_id"),
                    status="killed",
                    reason="killed; the runner had died, so this result was written by `kill`",
                    model=status.get("step"),
                    started_at=status.get("started_at"),
                    ended_at=now,
                    duration=None,
                    runner_version=runner_version(),
                ),
                sync=True,
            )
    report["state"] = status.get("state", "absent")
    _print_json(report)
    return 0


def cmd_tail(run_dir: str, from_byte: int) -> int:
    try:
        handle = open(os.path.join(run_dir, "task.log"), "rb")
    except OSError:
        return 0
    with handle:
        if from_byte < 0:
            handle.seek(0, os.SEEK_END)
            from_byte = max(0, handle.tell() + from_byte)
        handle.seek(from_byte)
        while True:
            data = handle.read(_CHUNK)
            if not data:
                break
            sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_live(tasks_dir: str, finished: bool = False) -> int:
    """Print [[task_id, cache_key, "running"], ...] for the run directories under `tasks_dir` whose runner is
    alive; with `finished`, also [task_id, cache_key, "succeeded"] for those whose runner ended in success."""
    found = []
    names = sorted(os.listdir(tasks_dir)) if os.path.isdir(tasks_dir) else []
    for name in names:
        run_dir = os.path.join(tasks_dir, name)
        if not os.path.exists(os.path.join(run_dir, protocol.LOCK_FILE)):
            continue
        if protocol.runner_alive(run_dir):
            state = "running"
        elif finished and (_read_json(os.path.join(run_dir, protocol.RESULT_FILE)) or {}).get("status") == "succeeded":
            state = "succeeded"
        else:
            continue
        found.append([name, (_read_json(os.path.join(run_dir, protocol.TASK_FILE)) or {}).get("cache_key"), state])
    print(json.dumps(found))
    return 0


def cmd_follow(run_dir: str, from_byte: int) -> int:
    """Stream task.log from `from_byte` as it grows, until the runner has exited; then print the rest.

    The dispatcher follows a detached run with this. The runner's end is its lock being released (a
    blocking flock in a thread: no polling, and no waiting for anyone to reap the runner, which a
    container's PID 1 may leave a zombie for a while). The log is read every 0.05 s while it grows,
    backing off to 1 s while it is quiet, so a long silent agent costs next to no CPU.
    """
    import threading

    gone = threading.Event()

    def wait_for_exit() -> None:
        try:
            protocol.wait_runner_gone(run_dir)
        finally:
            gone.set()

    threading.Thread(target=wait_for_exit, daemon=True).start()
    path = os.path.join(run_dir, "task.log")
    offset, delay = max(0, from_byte), 0.05
    while True:
        ended = gone.is_set()
        grew = False
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                while True:
                    data = handle.read(_CHUNK)
                    if not data:
                        break
                    offset += len(data)
                    grew = True
                    sys.stdout.buffer.write(data)
            sys.stdout.flush()
        except OSError:
            pass
        if ended:
            return 0
        delay = 0.05 if grew else min(1.0, delay * 2)
        gone.wait(delay)


# ---------------------------------------------------------------------------------------------------------
# serve: one long-lived agent per node and dispatcher


class _Watched:
    """One run `serve` watches: its runner's exit (a pidfd, else its lock) and the new lines of its log."""

    def __init__(self, rid: Any, run_dir: str, pid: int | None) -> None:
        self.rid, self.run_dir = rid, run_dir
        self.offset, self.pending = 0, b""
        self.delay, self.next_read = _SERVE_MIN_DELAY, 0.0
        self.pidfd: int | None = None
        if pid and hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:  # ended already, or no pidfd on this kernel: the run's lock is polled instead
                self.pidfd = None

    def ended(self) -> bool:
        return not protocol.runner_alive(self.run_dir)

    def read_lines(self, final: bool = False) -> tuple[list[str], bool]:
        """The log lines written since the last read, at most `_SERVE_READ` bytes of them (at the end, also a
        last unterminated line); and whether more is waiting."""
        try:
            with open(os.path.join(self.run_dir, "task.log"), "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(_SERVE_READ)
        except OSError:
            data = b""
        self.offset += len(data)
        more = len(data) == _SERVE_READ
        *lines, self.pending = (self.pending + data).split(b"\n")
        if len(self.pending) >= _SERVE_READ or (final and not more and self.pending):
            lines.append(self.pending)  # a line longer than a read goes in pieces
            self.pending = b""
        return [line.decode("utf-8", "replace") for line in lines], more


class _Agent:
    """`serve`: start and watch runs asked for as JSON lines on stdin; report them as JSON lines on stdout.

    Requests: {"op": "run", "id": ..., "run_dir": ..., "task": {task.json}, "secrets": {...}}. Events, each
    with the request's id: "started" (pid), "attached" (pid: the same attempt was already running), "log"
    (lines), "result" (result.json once the runner has ended), "recovered" (result: the same attempt had
    succeeded while nobody watched), "earlier" (another runner or its orphan holds the run directory: the
    dispatcher takes the long way), "full" (running, slots, message: the node already runs `slots` runners,
    counted on the node whoever started them; the dispatcher requeues the spec briefly), "error" (message,
    e.g. a run_dir outside the run root).
    Runners are detached: they outlive the agent, whose end (stdin closed) stops nothing but the watching.

    Args:
        root: the node's run root; every run_dir must resolve to a directory inside it.
        slots: how many runners the node runs at once at most.
    """

    def __init__(self, root: str, slots: int) -> None:
        import selectors

        self.root = os.path.realpath(on_node(root))
        self.slots = slots
        self.selector = selectors.DefaultSelector()
        self.watched: dict[Any, _Watched] = {}
        self.stdin = sys.stdin.fileno()
        self.buffer = b""
        self.scanned = False  # whether `live_runners` has scanned the whole root once

    def live_runners(self) -> int:
        """Runners alive under the run root (their `.runner.lock` held), whoever started them.

        Counted from the root's registry (`_register_live`); entries of runners that are gone (killed before
        they could remove theirs) are removed. The first count of an agent scans every run directory once and
        enters the live ones, so runners that a runner of an earlier version started are counted too."""
        if not self.scanned:
            import glob

            try:  # first the registry, then the scan: a runner claiming meanwhile enters itself or is found
                os.makedirs(os.path.join(self.root, LIVE_DIR), exist_ok=True)
            except OSError:
                pass
            pattern = os.path.join(glob.escape(self.root), "*", "tasks", "*", protocol.LOCK_FILE)
            for lock in glob.glob(pattern):
                if protocol.runner_alive(os.path.dirname(lock)):
                    _register_live(os.path.dirname(lock))
            self.scanned = True
        registry = os.path.join(self.root, LIVE_DIR)
        try:
            names = os.listdir(registry)
        except OSError:
            return 0
        live = 0
        for name in names:
            if "~" in name:
                continue  # an entry being written
            entry = os.path.join(registry, name)
            try:
                run_dir = os.readlink(entry)
            except OSError:
                continue  # removed meanwhile
            ours = _live_entry(run_dir) == entry  # else not a runner's entry: removed, and nothing else is
            if ours and protocol.runner_alive(run_dir):
                live += 1
                continue
            try:
                os.unlink(entry)  # this very entry, inside the registry
            except OSError:
                pass
            if ours and protocol.runner_alive(run_dir):  # claimed again between the look and the removal
                _register_live(run_dir)
                live += 1
        return live

    def _inside_root(self, run_dir: str) -> str:
        """`run_dir` resolved (symlinks, `..`); ValueError unless it lies strictly inside the run root."""
        resolved = os.path.realpath(run_dir)
        if not resolved.startswith(self.root + os.sep):
            raise ValueError(f"run_dir {run_dir} ({resolved}) is outside the agent's run root {self.root}: refused")
        return resolved

    def emit(self, rid: Any, event: str, **fields: Any) -> None:
        fields.update(id=rid, event=event)
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def serve(self) -> int:
        import selectors

        self.selector.register(self.stdin, selectors.EVENT_READ, None)
        while True:
            now = time.monotonic()
            timeout = None
            if self.watched:
                timeout = max(0.0, min(w.next_read for w in self.watched.values()) - now)
            for key, _ in self.selector.select(timeout):
                if key.data is not None:
                    self.finish(key.data)
                    continue
                data = os.read(self.stdin, _CHUNK)
                if not data:
                    return 0  # the dispatcher is gone; the runners go on, and a new agent finds them
                *requests, self.buffer = (self.buffer + data).split(b"\n")
                for raw in requests:
                    if raw.strip():
                        self.handle(raw)
            now = time.monotonic()
            for watched in list(self.watched.values()):
                if watched.next_read <= now and watched.rid in self.watched:
                    self.poll(watched, now)
            _reap_children()

    def handle(self, raw: bytes) -> None:
        try:
            request = json.loads(raw)
            rid, op = request.get("id"), request.get("op")
        except (ValueError, AttributeError) as exc:
            self.emit(None, "error", message=f"not a JSON request: {exc}")
            return
        if op != "run":
            self.emit(rid, "error", message=f"unknown op {op!r}")
            return
        try:
            self.run(rid, request)
        except (OSError, TaskError, KeyError, TypeError, ValueError) as exc:
            self.emit(rid, "error", message=f"{type(exc).__name__}: {exc}")

    def run(self, rid: Any, request: dict) -> None:
        run_dir = self._inside_root(on_node(request["run_dir"]))
        task = request["task"]
        if os.path.exists(os.path.join(run_dir, protocol.STATUS_FILE)):  # a run was here: this attempt's, or older
            previous = _read_json(os.path.join(run_dir, protocol.TASK_FILE)) or {}
            same = previous.get("cache_key") == task.get("cache_key")
            if protocol.runner_alive(run_dir):
                if not same:  # an edited spec's runner: the dispatcher's long way kills it first
                    self.emit(rid, "earlier")
                    return
                pid = protocol.lock_holder(run_dir)
                self.emit(rid, "attached", pid=pid)
                self.watch(rid, run_dir, pid)
                return
            result = _read_json(os.path.join(run_dir, protocol.RESULT_FILE))
            if same and not task.get("fresh") and result is not None and result.get("status") == "succeeded":
                self.emit(rid, "recovered", result=result)
                return
        # count and claim under one lock: two agents (two dispatchers) never both take the last slot
        mutex = os.open(os.path.join(self.root, ".slots.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            running = self.live_runners()
            if running >= self.slots:
                self.emit(rid, "full", running=running, slots=self.slots,
                          message=f"node full: {running} of {self.slots} slots run a spec (counted on the node)")
                return
            os.makedirs(run_dir, exist_ok=True)
            old_umask = os.umask(0o077)
            try:
                _write_json(os.path.join(run_dir, protocol.TASK_FILE), task)
            finally:
                os.umask(old_umask)
            lock_fd, refused = _claim(run_dir)
        finally:
            os.close(mutex)
        if lock_fd is None:
            self.emit(rid, "earlier", reason=refused["message"])
            return
        try:
            loaded = load_task(run_dir)
            secrets = _str_map(request.get("secrets") or {}, "secrets", secret=True)
        except TaskError as exc:
            os.close(lock_fd)
            _fail_before_start(run_dir, str(exc))
            self.emit(rid, "result", result=_read_json(os.path.join(run_dir, protocol.RESULT_FILE)))
            return
        pid = _fork_runner(run_dir, lock_fd, loaded, secrets)
        self.emit(rid, "started", pid=pid)
        self.watch(rid, run_dir, pid)

    def watch(self, rid: Any, run_dir: str, pid: int | None) -> None:
        import selectors

        watched = _Watched(rid, run_dir, pid)
        self.watched[rid] = watched
        if watched.pidfd is not None:  # else `poll` notices the end from the run's lock
            self.selector.register(watched.pidfd, selectors.EVENT_READ, watched)

    def poll(self, watched: _Watched, now: float) -> None:
        if watched.pidfd is None and watched.ended():
            self.finish(watched)
            return
        lines, more = watched.read_lines()
        if lines:
            self.emit(watched.rid, "log", lines=lines)
        if more:  # the rest right after the other runs' turn
            watched.delay = 0.0
        elif lines or watched.pidfd is None:  # growing, or no pidfd: the lock is polled for the end
            watched.delay = _SERVE_MIN_DELAY
        else:  # quiet: read less often; the pidfd still says the end at once
            watched.delay = min(_SERVE_MAX_DELAY, max(_SERVE_MIN_DELAY, watched.delay * 2))
        watched.next_read = now + watched.delay

    def finish(self, watched: _Watched) -> None:
        """The runner has ended: the rest of its log, then its result."""
        if watched.pidfd is not None:
            self.selector.unregister(watched.pidfd)
            os.close(watched.pidfd)
            watched.pidfd = None
        self.watched.pop(watched.rid, None)
        more = True
        while more:
            lines, more = watched.read_lines(final=True)
            if lines:
                self.emit(watched.rid, "log", lines=lines)
        result = _read_json(os.path.join(watched.run_dir, protocol.RESULT_FILE))
        if result is None and not os.path.isfile(os.path.join(watched.run_dir, protocol.STATUS_FILE)):
            self.emit(watched.rid, "error", message=f"the detached runner did not start: "
                      f"{_last_line(os.path.join(watched.run_dir, 'runner.err'))} (see {watched.run_dir}/runner.err)")
            return
        self.emit(watched.rid, "result", result=result)


def _last_line(path: str, limit: int = 4096) -> str:
    """The last non-blank line of a text file (a traceback's exception), at most 500 characters; "" if none."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - limit))
            lines = [line for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:500] if lines else ""


def _reap_children() -> None:
    """Reap the runners `serve` forked that have ended (their results are read from their run directories)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def cmd_serve(root: str, slots: int) -> int:
    # what every runner it forks needs, loaded once here: each fork inherits it instead of loading it again
    _libc()
    _classifier()
    try:
        return _Agent(root, slots).serve()
    except BrokenPipeError:  # the channel closed while we wrote: same as stdin closing
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node_runner.py", description="Oyster Dispatch node-side runner")
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
    follow = commands.add_parser("follow", help="stream task.log until the runner exits")
    follow.add_argument("run_dir")
    follow.add_argument("--from-byte", type=int, default=0)
    commands.add_parser("version", help="print the runner's checksum")
    serve = commands.add_parser("serve", help="start and watch runs asked for as JSON lines on stdin (one agent "
                                "per node)")
    serve.add_argument("--root", required=True, help="the node's run root: run directories must be inside it")
    serve.add_argument("--slots", required=True, type=int, help="runners the node runs at once at most")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "version":
        _print_json(
            {
                "runner_version": runner_version(),
                "python": sys.version.split()[0],
                "ratelimits": getattr(_classifier()[0], "__file__", None),
            }
        )
        return 0
    if args.command == "serve":
        if args.slots < 1:
            parser.error("serve: --slots must be at least 1")
        return cmd_serve(args.root, args.slots)
    run_dir = os.path.abspath(os.path.expanduser(args.run_dir))
    if args.command == "run":
        return cmd_run(run_dir, detach=args.detach, secrets_stdin=args.secrets_stdin)
    if args.command == "status":
        return cmd_status(run_dir)
    if args.command == "kill":
        return cmd_kill(run_dir)
    if args.command == "follow":
        return cmd_follow(run_dir, args.from_byte)
    if args.command == "live":
        return cmd_live(run_dir, args.finished)
    return cmd_tail(run_dir, args.from_byte)


if __name__ == "__main__":
    sys.exit(main())
