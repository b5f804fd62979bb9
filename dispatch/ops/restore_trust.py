"""What a restored home would make this machine run: settings that execute commands, found before a restore.

A snapshot is data, but `nodes.json` and `projects.json` in it choose programs: an `ssh_config` whose
`Match exec`, `ProxyCommand`, `LocalCommand` or `KnownHostsCommand` runs a command (one in the archive
itself can sit in the restored home), a node's `python` or `remote_root` with shell syntax, a node `env`
that loads code into every process (`LD_PRELOAD`, `BASH_ENV`, `NODE_OPTIONS`, a `PATH` into the home), a
project's `repo_local` inside the home (a crafted `.git/config` runs hooks and `core.fsmonitor`). `dispatch
restore` refuses an archive with any of them (exit 2), naming each setting and its file, unless `--trust`
is given; then it prints what it accepted.

Our own SSH code never runs these (dispatch/cluster/ssh_target.py skips `Match exec`; paramiko is never given a
`ProxyCommand`), but `ssh`, `git` or a person using the restored files would.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dispatch.core.errors import cut
from dispatch.core.safeload import load_json

_MAX_SSH_CONFIG = 1 << 20
_COMMAND_KEYS = ("proxycommand", "localcommand", "permitlocalcommand", "knownhostscommand", "include")
_SSH_SETTING = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PLAIN = re.compile(r"[A-Za-z0-9_./+~-]+")
_LOADER_ENV = re.compile(r"(LD_|DYLD_).*|BASH_ENV|ENV|NODE_OPTIONS|PYTHONSTARTUP|PYTHONPATH|PYTHONHOME|"
                         r"PROMPT_COMMAND|GIT_SSH|GIT_SSH_COMMAND|GIT_EXEC_PATH|GIT_CONFIG_GLOBAL")


def _shown(name: object) -> str:
    """A node, project or variable name as it reads in a message: bare when plain, else quoted and cut."""
    return name if isinstance(name, str) and _NAME.fullmatch(name) else cut(name, 40)


def _inside(path: Path, root: Path) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(root) + os.sep)


def _as_staged(value: str, home: Path, staged_home: Path) -> tuple[Path, bool]:
    """Where the file `value` names will be after the restore: its archive copy when it lies in the home."""
    path = Path(os.path.normpath(Path(value).expanduser()))
    if _inside(path, home):
        return staged_home / path.relative_to(os.path.normpath(home)), True
    return path, False


def ssh_config_commands(path: Path) -> list[str]:
    """The lines of an ssh config that run (or pull in) commands: `Match ... exec`, `ProxyCommand`, ..."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(_MAX_SSH_CONFIG + 1).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"cannot be read to check it ({exc.strerror or exc})"]
    found = []
    for number, line in enumerate(text.splitlines()[:100_000], 1):
        match = _SSH_SETTING.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        key, value = match.group(1).lower(), match.group(2).strip()
        runs = key in _COMMAND_KEYS and not (key in ("proxycommand", "permitlocalcommand")
                                             and value.lower() in ("none", "no"))
        if runs or (key == "match" and re.search(r"(^|\s)!?exec(\s|$)", value, re.IGNORECASE)):
            found.append(f"line {number}: {cut(line.strip(), 120)}")
    return found


def _node_findings(where: str, node: dict[str, Any], home: Path, staged_home: Path) -> list[str]:
    found = []
    if isinstance(node.get("ssh_config"), str):
        config, from_archive = _as_staged(node["ssh_config"], home, staged_home)
        if from_archive and not config.exists():  # a file of the home that the restore leaves as it is
            config, from_archive = Path(node["ssh_config"]).expanduser(), False
        origin = "in the archive" if from_archive else "on this machine"
        found += [f"{where}.ssh_config {node['ssh_config']} ({origin}) {line}"
                  for line in ssh_config_commands(config)]
    for key in ("python", "remote_root"):
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not _PLAIN.fullmatch(value) or value.startswith("-"):
            found.append(f"{where}.{key} {cut(value)} is not a plain program or path (shell syntax)")
        elif key == "python" and _as_staged(value, home, staged_home)[1]:
            found.append(f"{where}.python {cut(value)} is a program inside the restored home")
    env = node.get("env")
    for name, value in (env.items() if isinstance(env, dict) else ()):
        if _LOADER_ENV.fullmatch(str(name)):
            found.append(f"{where}.env.{_shown(name)} loads code into every process it starts: {cut(value)}")
        elif name == "PATH" and any(_as_staged(p, home, staged_home)[1] for p in str(value).split(":") if p):
            found.append(f"{where}.env.PATH {cut(value)} puts programs of the restored home first")
    return found


def command_settings(home: Path, staged_home: Path, areas: list[str]) -> list[str]:
    """Every setting of the restored `nodes.json` and `projects.json` that would run a command, each named
    with its file; empty when none does.

    Args:
        home: DISPATCH_HOME, where the files will be.
        staged_home: the archive's `home/`, extracted and checked.
        areas: the areas and files the restore brings back.

    Raises:
        ConfigError: a restored file is no JSON, too large or nested too deep.
    """
    found: list[str] = []
    nodes_file = staged_home / "nodes.json"
    if "nodes.json" in areas and nodes_file.is_file():
        data = load_json(nodes_file, "the archive's home/nodes.json")
        nodes = data.get("nodes") if isinstance(data, dict) else None
        for index, node in enumerate(nodes if isinstance(nodes, list) else []):
            if isinstance(node, dict):
                where = f"nodes.json: nodes[{index}] ({_shown(node.get('name'))})"
                found += _node_findings(where, node, home, staged_home)
    projects_file = staged_home / "projects.json"
    if "projects.json" in areas and projects_file.is_file():
        data = load_json(projects_file, "the archive's home/projects.json")
        for project, entry in (data.items() if isinstance(data, dict) else ()):
            if not isinstance(entry, dict):
                continue
            where = f"projects.json: {_shown(project)}"
            local = entry.get("repo_local")
            if isinstance(local, str) and _as_staged(local, home, staged_home)[1]:
                found.append(f"{where}.repo_local {cut(local)} is a repository inside the restored home (its "
                             ".git/config and hooks run commands)")
            url = entry.get("repo_url")
            if isinstance(url, str) and (url.startswith("-") or re.match(r"(ext|fd)::", url)):
                found.append(f"{where}.repo_url {cut(url)} makes git run a command")
    return found

