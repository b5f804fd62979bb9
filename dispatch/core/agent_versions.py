"""Which agent CLI versions the contract tier has proved: the pinned ones and the ones the drift check passed.

The pinned versions are `agents/package.json`'s (what `npm ci --prefix agents` installs and the contract tier in
tests/contract runs). The drift check (dispatch/ops/agent_drift.py, the `agent-cli-drift` deployment) runs the same
scenarios against the newest published versions and records the versions that passed every one, `{cli: [versions]}`,
in a `PassedStore`: `PassedFile`, `DISPATCH_HOME/agents/cli_passed.json` (embedded), or the Prefect Variable
`dispatch_agent_cli_passed` (team mode: `dispatch.prefect.versions`, whose `passed_store(settings)` picks one).
`dispatch nodes check` and the guardian read them to flag a node whose CLI is at a version neither pinned nor passed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dispatch.core.results import write_json

AGENTS_DIR = Path(__file__).resolve().parents[2] / "agents"
PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}
"""The CLIs the contract tier proves, with their npm packages."""
KEEP_VERSIONS = 30  # passed versions remembered per CLI (the newest ones)

_VERSION = re.compile(r"(?<![\w.])v?(\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?)(?![\w.])")


def parse_version(text: str | None) -> str | None:
    """The first `X.Y.Z` version in a CLI's `--version` answer ("2.1.332 (Claude Code)", "codex-cli 0.171.0")."""
    match = _VERSION.search(text or "")
    return match.group(1) if match else None


def pinned_versions(agents_dir: Path = AGENTS_DIR) -> dict[str, str]:
    """`{cli: version}` from `agents/package.json` (empty when this install has no such file)."""
    try:
        data = json.loads((agents_dir / "package.json").read_text())
    except (OSError, ValueError):
        return {}
    dependencies = data.get("dependencies") if isinstance(data, dict) else None
    if not isinstance(dependencies, dict):
        return {}
    return {cli: str(dependencies[package]) for cli, package in PACKAGES.items() if package in dependencies}


class PassedStore(Protocol):
    """Where the drift check's record is kept. `errors`: what its calls raise when the store, not our code, fails."""

    errors: tuple[type[Exception], ...]

    def read(self) -> Any:
        """The stored record as it is (checked by `load_passed`); {} when none."""

    def write(self, passed: dict[str, list[str]]) -> None:
        """Replace the stored record."""


class PassedFile:
    """The record of one machine: a JSON file (a missing or damaged file counts as no record)."""

    errors: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Any:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, passed: dict[str, list[str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, passed)


def _clean(raw: object) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        return {}
    return {str(cli): [str(v) for v in versions if isinstance(v, str)][-KEEP_VERSIONS:]
            for cli, versions in raw.items() if isinstance(versions, list)}


def load_passed(store: PassedStore) -> dict[str, list[str]]:
    """The recorded `{cli: [versions that passed]}` (empty when the drift check never ran).

    Raises:
        Exception: one of the store's `errors` (team mode: the Prefect server failed).
    """
    return _clean(store.read())


def record_results(store: PassedStore, results: dict[str, dict[str, bool]]) -> dict[str, list[str]]:
    """Record the drift check's `{cli: {version: passed every scenario}}`: a passing version is added (newest
    last), a failing one removed. Returns the record as saved."""
    passed = load_passed(store)
    for cli, versions in results.items():
        kept = [v for v in passed.get(cli, []) if v not in versions]
        kept += [v for v, ok in versions.items() if ok]
        passed[cli] = kept[-KEEP_VERSIONS:]
    store.write(passed)
    return passed


@dataclass
class AcceptedVersions:
    """The versions of each CLI the contract tier proved: pinned, or passed by the drift check.

    Attributes:
        pinned: `{cli: version}` (agents/package.json).
        passed: `{cli: [versions]}` recorded by the drift check.
        note: why the record is missing, when it could not be read (said in every flag).
    """

    pinned: dict[str, str] = field(default_factory=pinned_versions)
    passed: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def load(cls, store: PassedStore) -> AcceptedVersions:
        """The pinned versions and the recorded ones; a server that fails leaves the pinned ones only."""
        try:
            return cls(passed=load_passed(store))
        except store.errors as exc:
            return cls(note=f"the passed versions could not be read ({exc}): only the pinned ones count")

    def flag(self, cli: str, answer: str | None) -> str | None:
        """Why `cli` answering `answer` to `--version` is not proved, or None when it is (or is not tracked)."""
        if cli not in PACKAGES:
            return None
        version = parse_version(answer)
        if version is None:
            return f"{cli}: no version in its `--version` answer {(answer or '')[:80]!r}"
        if version == self.pinned.get(cli) or version in self.passed.get(cli, []):
            return None
        known = [v for v in [self.pinned.get(cli), *self.passed.get(cli, [])] if v]
        return (f"{cli} {version} has not passed the contract tier (proved: {', '.join(dict.fromkeys(known)) or 'none'}"
                f"{'; ' + self.note if self.note else ''}): install a proved version "
                f"(npm install -g {PACKAGES[cli]}@{self.pinned.get(cli, '<version>')}) or let the agent-cli-drift "
                "deployment test it")

    def flags(self, answers: dict[str, str | None]) -> list[str]:
        """The flags of a node's `{cli: --version answer}`, in CLI order."""
        return [flag for cli in sorted(answers) if (flag := self.flag(cli, answers[cli]))]
