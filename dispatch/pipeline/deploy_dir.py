"""Where L6 may deploy: `deploy.dir` is never, and never resolves into, a system or credential directory.

Checked when pipeline.yaml is read (`validate_dir`, for config.py's validation of `deploy.dir`) and again on the
target before anything is written (`check_dir`; dispatch/pipeline/deploy.py). On its own, so that the config's
validation does not import the deploy machinery (which imports the workspace, which imports the config).
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath

from dispatch.core.errors import ConfigError, cut

# Refused as the directory itself (and anything only one level deep, like /srv or /data).
_FORBIDDEN = {"/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var"}
# Refused with everything under them; /lib, /lib64, /libx32... by the pattern below.
_SYSTEM_TREES = tuple(PurePosixPath(p) for p in ("/bin", "/boot", "/dev", "/etc", "/proc", "/sbin", "/sys", "/usr",
                                                 "/var/spool", "/var/mail"))
_SYSTEM_LIB = re.compile(r"lib[\w.-]*")
# Refused anywhere (any user's home, on this machine or a node): where keys and credentials live.
_CREDENTIAL_DIRS = {".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store"}
_CREDENTIAL_PAIRS = {(".config", "gcloud")}
EXAMPLE = "e.g. /srv/shop or ${DISPATCH_HOME}/deploy/shop"


def _absolute(path: str) -> PurePosixPath:
    """`path` normalised, with a POSIX `//` start made `/` (`//etc` is `/etc`)."""
    return PurePosixPath(os.path.normpath("/" + path.lstrip("/") if path.startswith("/") else path))


def unsafe_dir(path: str) -> str | None:
    """Why an absolute deploy directory may not be used (a system or credential directory), or None.

    Examples:
        >>> unsafe_dir("/tmp/../etc/x")
        'is under /etc, a system directory'
        >>> unsafe_dir("/srv/shop") is None
        True
    """
    normal = _absolute(path)
    parts = normal.parts
    if str(normal) in _FORBIDDEN or len(parts) < 3:
        return "is a system or top-level directory, not a directory of its own"
    for tree in _SYSTEM_TREES:
        if normal.is_relative_to(tree):
            return f"is under {tree}, a system directory"
    if _SYSTEM_LIB.fullmatch(parts[1]):
        return f"is under /{parts[1]}, a system directory"
    for index, part in enumerate(parts):
        if part in _CREDENTIAL_DIRS or tuple(parts[index:index + 2]) in _CREDENTIAL_PAIRS:
            return f"is under {PurePosixPath(*parts[:index + 1])}, where credentials live"
    return None


def _expand(value: str, *, local: bool, home: str | None) -> str:
    if local:
        return os.path.expanduser(os.path.expandvars(value))
    return home.rstrip("/") + value[1:] if home and value.startswith("~/") else value


def _problem(expanded: str, *, local: bool) -> str | None:
    """`unsafe_dir` of the path as written and, on this machine, as it resolves (`..`, symbolic links)."""
    problem = unsafe_dir(expanded)
    if problem is None and local:
        resolved = os.path.realpath(expanded)
        problem = unsafe_dir(resolved)
        if problem is None and resolved == os.path.realpath(os.path.expanduser("~")):
            problem = "is your home directory, not a directory of its own"
        if problem and resolved != str(_absolute(expanded)):
            problem = f"resolves to {resolved}, which {problem}"
    return problem


def check_dir(value: str, *, local: bool, home: str | None = None) -> str:
    """The deploy directory as an absolute path; refuses a system or credential directory or a relative path.

    Args:
        value: `deploy.dir`.
        local: this machine (`~` and `${VAR}` expand here) or a node.
        home: a node's login home, for a `~/...` directory on that node.

    Raises:
        ConfigError: naming `deploy.dir` and what to give instead.
    """
    expanded = _expand(value, local=local, home=home)
    if not expanded.startswith("/") or "$" in expanded:
        raise ConfigError(f"deploy.dir: {cut(value, 120)} must be an absolute directory of its own ({EXAMPLE})")
    problem = _problem(expanded, local=local)
    if problem:
        raise ConfigError(f"deploy.dir: {cut(value, 120)} {problem}; give a directory of its own ({EXAMPLE})")
    return str(_absolute(expanded))


def validate_dir(value: str, target: str) -> str:
    """pipeline.yaml's check of `deploy.dir` (for `target`): refuses what is or resolves into a system or
    credential directory. A directory that cannot be judged yet (a `${VAR}` not set here, a node's `~`) is
    checked again at deploy time (`check_dir`, then `Deployer` on the target).

    Raises:
        ValueError: what is wrong, for the validation error of `deploy.dir`.
    """
    local = target == "local"
    # On a node, `~` is its login's home, unknown here: what follows it is checked under a stand-in home.
    stand_in = "/home/node-login"
    expanded = _expand(value, local=local, home=None if local else stand_in)
    if expanded.startswith("/") and "$" not in expanded:
        problem = _problem(expanded, local=local)
        if problem:
            problem = problem.replace(stand_in, "~") if not local else problem
            raise ValueError(f"{cut(value, 120)} {problem}; give a directory of its own ({EXAMPLE})")
    return value
