"""L6 Deploy: a release directory per revision, an atomic switch of `current`, restart, health check of the
live URL, automatic rollback, the last N releases kept. Locally or on a node over SSH, with the same steps.

```
<dir>/releases/<revision>/    one copy of the code per revision (no venvs, caches or .git)
<dir>/current -> releases/<revision>    switched by renaming a new link over it (rename is atomic)
```
Nothing outside `<dir>/releases` is ever removed; a pruned entry is a real directory (not a link) named
exactly as L6 names a release (12 lowercase hex digits), and a `releases` that is a symbolic link is refused.
`deploy.dir` may not be, or resolve into, a system or credential directory (checked when pipeline.yaml is
read, and on the target before anything is written).
"""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import httpx

from dispatch.core.errors import ConfigError
from dispatch.core.polling import attempts
from dispatch.pipeline.deploy_dir import EXAMPLE, unsafe_dir
from dispatch.pipeline.workspace import SKIP_DIRS, copy_code

REVISION = re.compile(r"[0-9a-f]{12}")  # flows/layers/deploy.py: code_digest(code)[:12]
_POLL = 0.3


class Target(Protocol):
    """Where a release goes: runs shell commands and receives a copy of the code."""

    name: str

    def sh(self, command: str, *, timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run `command` under /bin/sh; (exit code, stdout and stderr)."""
        ...

    def upload(self, code_dir: Path, remote_dir: str) -> int:
        """Copy the code into `remote_dir` (made); the number of files."""
        ...


class LocalTarget:
    """This machine."""

    name = "local"

    def sh(self, command: str, *, timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                                  env=env, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            return 124, f"timed out after {timeout:g}s: {(exc.stdout or '')[-2000:]}"
        return done.returncode, (done.stdout + done.stderr)[-4000:]

    def upload(self, code_dir: Path, remote_dir: str) -> int:
        return copy_code(code_dir, Path(remote_dir))


class NodeTarget:
    """A cluster node over SSH (our `SSHPool`).

    Args:
        pool: the SSH pool.
        target: the node's `SSHTarget`.
    """

    def __init__(self, pool, target) -> None:
        self.pool, self.target, self.name = pool, target, target.name

    def sh(self, command: str, *, timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[int, str]:
        from dispatch.core.errors import RemoteCommandFailed

        try:
            result = self.pool.run(self.target, command, timeout=timeout, env=env, check=False)
        except RemoteCommandFailed as exc:  # CommandTimeout
            return 124, str(exc)[-2000:]
        return result.exit_code, (result.stdout + result.stderr)[-4000:]

    def upload(self, code_dir: Path, remote_dir: str) -> int:
        return self.pool.put_dir(self.target, code_dir, remote_dir, exclude=tuple(sorted(SKIP_DIRS)))

    def home(self) -> str:
        """The login's home directory on the node (where `~/...` of a deploy directory starts)."""
        code, output = self.sh('printf %s "$HOME"', timeout=30)
        if code != 0 or not output.startswith("/"):
            raise ConfigError(f"node {self.name}: cannot tell its home directory ({output.strip()[:200]})")
        return output


@dataclass
class DeployOutcome:
    """What a deploy did."""

    ok: bool
    message: str
    revision: str
    steps: list[tuple[str, bool, str, float]] = field(default_factory=list)  # (step, ok, detail, seconds)
    current: str | None = None
    removed: list[str] = field(default_factory=list)


def wait_healthy(url: str, timeout: float, *, interval: float = _POLL,
                 exited: Callable[[], int | None] | None = None) -> tuple[bool, str]:
    """GET `url` until it answers 200, `timeout` passes, or `exited()` gives the exit code of the app we started.

    The pipeline's app (L3) and a deploy's health check (L6) both poll through here. No proxy and no redirect:
    the answer must come from the app itself.

    Returns:
        (healthy, what happened in one line).
    """
    last = "no answer yet"
    with httpx.Client(timeout=2.0, follow_redirects=False, trust_env=False) as client:
        for _ in attempts(timeout, interval):
            if exited is not None and (code := exited()) is not None:
                return False, f"the app exited with code {code} before its health check answered"
            try:
                status = client.get(url).status_code
            except httpx.HTTPError as exc:
                last = type(exc).__name__
                continue
            if status == 200:
                return True, f"{url} answered 200"
            last = f"HTTP {status}"
    return False, f"{url} did not answer 200 within {timeout:g}s (last: {last})"


class Deployer:
    """One deploy of `revision` of the code to `target` under `deploy_dir`.

    Args:
        target: where to.
        deploy_dir: the absolute deploy directory (checked with `check_dir`).
        env: the restart command's environment (no keys), DEPLOY_DIR and the revisions are added.
    """

    def __init__(self, target: Target, deploy_dir: str, env: dict[str, str]) -> None:
        self.target, self.dir, self.env = target, deploy_dir, env
        self.q = shlex.quote
        self.outcome: DeployOutcome | None = None

    def _step(self, name: str, command: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> bool:
        started = time.monotonic()
        code, output = self.target.sh(command, timeout=timeout, env=env)
        detail = output.strip()[-600:] or f"exit {code}"
        self.outcome.steps.append((name, code == 0, detail, time.monotonic() - started))
        return code == 0

    def current(self) -> str | None:
        """The revision `current` points at, if any."""
        code, output = self.target.sh(f"readlink {self.q(self.dir + '/current')}", timeout=30)
        name = PurePosixPath(output.strip()).name if code == 0 else ""
        return name if REVISION.fullmatch(name) else None

    def switch(self, revision: str) -> bool:
        """Point `current` at `releases/<revision>`: a new link renamed over the old one (atomic)."""
        link = f"{self.dir}/.current-{secrets.token_hex(4)}"
        return self._step(f"switch to {revision}", f"ln -s {self.q('releases/' + revision)} {self.q(link)} && "
                                                   f"mv -T {self.q(link)} {self.q(self.dir + '/current')}")

    def restart(self, command: str | None, revision: str, previous: str | None) -> bool:
        if not command:
            return True
        env = {**self.env, "DEPLOY_DIR": self.dir, "RELEASE_DIR": f"{self.dir}/releases/{revision}",
               "REVISION": revision, "PREVIOUS_REVISION": previous or ""}
        return self._step(f"restart ({revision})", f"cd {self.q(self.dir + '/current')} && {command}", env=env)

    def check_target(self) -> None:
        """On the target, before anything is written: the deploy directory as it resolves there (symbolic
        links, `..`) is not a system or credential directory, and `releases` is not a symbolic link.

        Raises:
            ConfigError: naming `deploy.dir`, what it resolves to and what to do.
        """
        # The longest existing ancestor resolved physically, plus the part not made yet (which has no links).
        script = (f'd={self.q(self.dir)}; rest=; while [ ! -e "$d" ] && [ "$d" != / ]; do '
                  f'rest="/$(basename "$d")$rest"; d=$(dirname "$d"); done; '
                  f'cd -P -- "$d" && printf "%s%s\\n" "$(pwd -P)" "$rest" && '
                  f'if [ -L {self.q(self.dir + "/releases")} ]; then echo releases-is-a-link; fi')
        code, output = self.target.sh(script, timeout=30)
        lines = output.strip().splitlines()
        if code != 0 or not lines or not lines[0].startswith("/"):
            raise ConfigError(f"deploy.dir: cannot resolve {self.dir} on {self.target.name}: "
                              f"{output.strip()[-200:] or f'exit {code}'}")
        problem = unsafe_dir(lines[0])
        if problem:
            raise ConfigError(f"deploy.dir: {self.dir} resolves to {lines[0]} on {self.target.name}, which "
                              f"{problem}; give a directory of its own ({EXAMPLE})")
        if "releases-is-a-link" in lines[1:]:
            raise ConfigError(f"deploy.dir: {self.dir}/releases on {self.target.name} is a symbolic link; L6 writes "
                              "and prunes only a releases directory of its own: remove the link (or move the "
                              "directory it points to there), or choose another deploy.dir")

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Remove the oldest releases beyond `keep`: only real directories (not links) named as L6 names a
        release, never a protected one, never through a `releases` that is a symbolic link."""
        releases = self.q(self.dir + "/releases")
        code, output = self.target.sh(
            f"[ ! -L {releases} ] && cd -P -- {releases} && ls -1t | while IFS= read -r n; do "
            '[ -d "$n" ] && [ ! -L "$n" ] && printf "%s\\n" "$n"; done', timeout=30)
        names = [n for n in output.splitlines() if REVISION.fullmatch(n)] if code == 0 else []
        doomed = [n for n in names[keep:] if n not in protect]
        for name in doomed:
            path = self.q(f"{self.dir}/releases/{name}")
            # Checked again at the moment of removal: a link put there since the listing is left alone.
            self._step(f"remove release {name}", f"[ ! -L {releases} ] && [ ! -L {path} ] && [ -d {path} ] && "
                                                 f"rm -rf -- {path}")
        return doomed

    def deploy(self, code_dir: Path, revision: str, *, restart: str | None, health: str | None, keep: int,
               timeout: float) -> DeployOutcome:
        """Copy, switch, restart, check; roll back to the previous release when the check fails; prune."""
        if not REVISION.fullmatch(revision):
            raise ConfigError(f"revision {revision[:80]!r} cannot name a release directory")
        self.check_target()
        self.outcome = outcome = DeployOutcome(ok=False, message="", revision=revision)
        release = f"{self.dir}/releases/{revision}"
        previous = self.current()
        if not self._step("prepare", f"mkdir -p {self.q(self.dir + '/releases')}"):
            outcome.message = f"cannot create {self.dir}/releases on {self.target.name}"
            return outcome
        code, _ = self.target.sh(f"test -d {self.q(release)}", timeout=30)
        if code != 0:
            staging = f"{self.dir}/releases/.incoming-{revision}-{secrets.token_hex(3)}"
            started = time.monotonic()
            copied = self.target.upload(code_dir, staging)
            outcome.steps.append(("copy", True, f"{copied} files to {staging}", time.monotonic() - started))
            if not self._step("publish release", f"mv -T {self.q(staging)} {self.q(release)}"):
                outcome.message = f"cannot move the release into {release}"
                return outcome
        else:
            self._step("release exists", f"touch {self.q(release)}")
        if not self.switch(revision):
            outcome.message = f"cannot switch {self.dir}/current"
            return outcome
        healthy, detail = self.restart(restart, revision, previous), ""
        if healthy and health:
            started = time.monotonic()
            healthy, detail = wait_healthy(health, timeout)
            outcome.steps.append(("health check", healthy, detail, time.monotonic() - started))
        elif not healthy:
            detail = "the restart command failed"
        if not healthy:
            if previous and previous != revision:
                self.switch(previous)
                self.restart(restart, previous, revision)
                outcome.message, outcome.current = f"{detail}; rolled back to {previous}", previous
            else:
                outcome.message, outcome.current = f"{detail}; no previous release to roll back to", revision
            return outcome
        outcome.ok, outcome.current = True, revision
        outcome.removed = self.prune(keep, {revision})
        outcome.message = f"{revision} live on {self.target.name} at {self.dir}/current" + \
            (f" ({detail})" if detail else "")
        return outcome
