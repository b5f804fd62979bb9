"""task.json and the secrets on stdin, read and checked; what a step's environment may hold.

Standard library only, Python 3.8+ (shipped to nodes in the runner's zipapp).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import protocol

RETRY_LIMIT = 30.0  # seconds an agent may retry by itself with no progress before the chain moves on


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
# Beyond the list: proxies and TLS trust (a proxy the spec trusts sees the key), agent config dirs.
PROTECTED_ENV_NAMES = frozenset({
    "PATH", "HOME", "NODE_OPTIONS", "NODE_PATH", "BASH_ENV", "IS_SANDBOX", "XDG_CONFIG_HOME",
    "CLAUDE_CONFIG_DIR", "CODEX_HOME", "OPENCODE_CONFIG", "OPENCODE_CONFIG_DIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "NODE_TLS_REJECT_UNAUTHORIZED", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
})  # fmt: skip


PROTECTED_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "DISPATCH_")
PROTECTED_ENV_SUFFIXES = ("_BASE_URL", "_API_KEY", "_TOKEN", "_PROXY")  # any case; `_TOKEN` covers `_AUTH_TOKEN`
MASK_ONLY = "mask"  # secrets named "mask:<n>" are values to mask that no step is given


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
    retry_limit: float | None = RETRY_LIMIT  # an agent retrying by itself this long is passed over
    heartbeat: float = 2.0
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, str] = field(default_factory=dict)  # the node's configured env: may set PATH (the CLIs)
    skip_models: list[str] = field(default_factory=list)
    acceptance: list[str] = field(default_factory=list)
    acceptance_timeout: float = 300.0
    verify: list[Step] = field(default_factory=list)


def _seconds(data: dict, key: str, default: float | None, *, allow_none: bool = True) -> float | None:
    value = data.get(key, default)
    if value is None or value == 0:
        if allow_none:
            return None
        raise TaskError(f"task.json: {key!r} must be a positive number of seconds, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TaskError(f"task.json: {key!r} must be a positive number of seconds, got {value!r}")
    return float(value)


def str_map(value: Any, where: str, *, secret: bool = False) -> dict[str, str]:
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
    return Step(raw["name"], argv, script, str_map(raw.get("env"), f"{where}.env"), stdin)


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
        retry_limit=_seconds(data, "retry_limit", RETRY_LIMIT),
        heartbeat=_seconds(data, "heartbeat", 2.0, allow_none=False) or 2.0,
        env=str_map(data.get("env"), "task.json: env"),
        node_env=str_map(data.get("node_env"), "task.json: node_env"),
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
    return str_map(data, "--secrets-stdin: stdin", secret=True)


def base_environment(environ: dict[str, str]) -> dict[str, str]:
    """The variables of `environ` a step may inherit: `STEP_ENV_ALLOW` and the locale's LC_*."""
    return {k: v for k, v in environ.items() if k in STEP_ENV_ALLOW or k.startswith("LC_")}


def protected_env(name: str) -> bool:
    """Whether a spec's `env:` may not set `name` (PROTECTED_ENV_*): it decides which program runs or where an
    agent sends its key. A bare suffix counts too (`TOKEN`, `API_KEY`)."""
    return (name in PROTECTED_ENV_NAMES or name.startswith(PROTECTED_ENV_PREFIXES)
            or ("_" + name.upper()).endswith(PROTECTED_ENV_SUFFIXES))
