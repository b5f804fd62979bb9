"""One command per node: a small standard-library Python probe that prints one JSON object.

It reports the node's Python, the free space of its run root, load, memory, the checksum of the shipped
runner, which agent CLIs are on its PATH and what their `--version` answers (each bounded), systemd, and every
run directory whose runner holds its `.runner.lock` or whose `status.json` still says running. Run by the node's
own `python3` (3.8 or newer) over the dispatcher's SSH pool, or locally for the `local` node.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from dispatch.core.errors import ConfigError, NodeError
from dispatch.core.safeload import loads_json
from dispatch.runner import protocol

MAX_OUTPUT = 1_000_000  # a node's answer is hostile input: bounded before it is parsed
MAX_RUNS = 2000  # run directories reported per node
VERSION_TIMEOUT = 20  # seconds one agent CLI's `--version` may take on the node

# The probe is the runner's protocol module (the checksum, the liveness test), then the lines below: one script,
# as the node may hold no runner yet, or another version of it.
_PROBE = r'''
import glob, json, os, shutil, signal, subprocess, sys, time
root, runner_dir, clis = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {"python": sys.version.split()[0], "cpus": os.cpu_count() or 1, "time": time.time()}
probe_dir = root
while probe_dir and not os.path.isdir(probe_dir):
    probe_dir = os.path.dirname(probe_dir.rstrip("/"))
try:
    st = os.statvfs(probe_dir or ".")
    out["disk_free"], out["disk_total"] = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
except OSError as exc:
    out["disk_error"] = str(exc)
try:
    out["load"] = list(os.getloadavg())
except OSError:
    pass
try:
    info = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    out["mem_available"], out["mem_total"] = info.get("MemAvailable"), info.get("MemTotal")
except (OSError, ValueError, IndexError):
    pass
try:
    out["runner"] = checksum(os.path.join(runner_dir, RUNNER_FILE))
except OSError:
    out["runner"] = None
out["clis"] = [c for c in clis if shutil.which(c)]
def version_of(cli):
    try:
        proc = subprocess.Popen([shutil.which(cli) or cli, "--version"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return "(--version failed: %s)" % exc
    try:
        text = proc.communicate(timeout=__VERSION_TIMEOUT__)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            text = proc.communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:
            text = b""
        return "(--version did not answer within __VERSION_TIMEOUT__ s)"
    lines = text.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:200] if lines else ""
out["cli_versions"] = {c: version_of(c) for c in out["clis"] if c in ("claude", "codex", "opencode")}
out["systemd"] = bool(shutil.which("systemctl")) and os.path.isdir("/run/systemd/system")
runs = []
pattern = os.path.join(glob.escape(root), "*", "tasks", "*", STATUS_FILE)
for path in sorted(glob.glob(pattern))[:__MAX_RUNS__]:
    run_dir = os.path.dirname(path)
    try:
        with open(path) as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        status = {}
    if not isinstance(status, dict):
        status = {}
    alive = runner_alive(run_dir)
    if not alive and status.get("state") != "running":
        continue
    beat = status.get("heartbeat_at")
    runs.append({"run_dir": run_dir, "project": os.path.basename(os.path.dirname(os.path.dirname(run_dir))),
                 "task_id": os.path.basename(run_dir), "alive": alive, "state": status.get("state"),
                 "heartbeat_age": time.time() - beat if isinstance(beat, (int, float)) else None,
                 "heartbeat": status.get("heartbeat") or 2.0, "pid": status.get("runner_pid")})
out["runs"] = runs
print(json.dumps(out))
'''.replace("__MAX_RUNS__", str(MAX_RUNS)).replace("__VERSION_TIMEOUT__", str(VERSION_TIMEOUT))
SCRIPT = Path(protocol.__file__).read_text(encoding="utf-8") + _PROBE


def probe_command(python: str, root: str, runner_dir: str, clis: list[str]) -> str:
    """The shell command that runs the probe with the node's `python` (root and runner_dir: shell words,
    already quoted, e.g. from `dispatch.core.paths.remote_arg`)."""
    return " ".join([shlex.quote(python), "-c", shlex.quote(SCRIPT), root, runner_dir,
                     *(shlex.quote(c) for c in clis)])


def parse_probe(node: str, output: str) -> dict[str, Any]:
    """The probe's JSON object from its output (the last line), checked to be an object.

    Raises:
        NodeError: the output is too large, or holds no JSON object (the node's Python failed).
    """
    if len(output) > MAX_OUTPUT:
        raise NodeError(node, f"the probe's answer is {len(output)} characters, over {MAX_OUTPUT}: refused")
    lines = output.strip().splitlines()
    try:
        data = loads_json(lines[-1], f"node {node}: the probe's answer") if lines else None
    except ConfigError:
        data = None
    if not isinstance(data, dict):
        raise NodeError(node, f"the probe printed no JSON object: {output.strip()[-300:]!r}")
    versions = data.get("cli_versions")
    data["cli_versions"] = ({str(k): str(v)[:200] for k, v in versions.items()} if isinstance(versions, dict)
                            else {})
    runs = data.get("runs")
    data["runs"] = [r for r in runs if isinstance(r, dict)][:MAX_RUNS] if isinstance(runs, list) else []
    return data
