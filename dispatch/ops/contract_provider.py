"""The contract provider of the agent CLI drift check (dispatch/ops/agent_drift.py), as a subprocess.

It is the test double tests/fixtures/fake_provider.py, started from the repository checkout the deployment runs
from (`python -m tests.fixtures.fake_provider --port 0`) on 127.0.0.1: it stays a test fixture, and dispatch never
imports it. Each model API request it answers is one JSON line on its stdout, read here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dispatch.core.errors import DispatchError
from dispatch.core.polling import attempts

REPO = Path(__file__).resolve().parents[2]


class ContractProvider:
    """The contract provider (tests/fixtures/fake_provider.py) as a subprocess on 127.0.0.1, its request
    records read from its stdout (one JSON line each)."""

    def __init__(self, repo: Path = REPO, timeout: float = 30.0) -> None:
        module = repo / "tests" / "fixtures" / "fake_provider.py"
        if not module.is_file():
            raise DispatchError(f"the drift check runs the contract provider {module}, which is missing: run it "
                                "from a checkout of the repository (the deployment's working directory)")
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.fake_provider", "--port", "0"], cwd=repo, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, args=(ready,), name="contract-provider", daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise DispatchError(f"the contract provider did not start within {timeout:.0f} s")

    def _read(self, ready: threading.Event) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if not self.port and line.startswith("fake provider on http://127.0.0.1:"):
                self.port = int(line.split(":")[2].split()[0])
                ready.set()
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.records.append(record)
        ready.set()

    def url(self, scenario: str) -> str:
        return f"http://127.0.0.1:{self.port}/s/{scenario}"

    def asked_with(self, key: str, *, at_least: int = 0, wait: float = 3.0) -> list[dict]:
        """The model API requests that carried `key` (the provider keeps a short hash of each key), waiting up to
        `wait` seconds for `at_least` of them (the provider prints its records a moment after it answers)."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        found: list[dict] = []
        for _ in attempts(wait, 0.1):
            with self._lock:
                found = [r for r in self.records if r.get("key") == digest
                         and str(r.get("path", "")).endswith(("/messages", "/responses"))]
            if len(found) >= at_least:
                break
        return found

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        self._reader.join(timeout=5)

    def __enter__(self) -> ContractProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
