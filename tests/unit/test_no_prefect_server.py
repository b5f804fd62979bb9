"""A session of unit tests alone starts no Prefect server, and its PREFECT_API_URL refuses every connection
(tests/conftest.py), so a unit test that talks to Prefect by mistake fails at once instead of reaching a server.

The whole suite needs the server, so the test runs a session of its own (pytest in a subprocess, this file
alone), where it checks the session from inside."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import conftest

_INSIDE = "DISPATCH_TEST_UNIT_SESSION"  # set for the inner session: check it from inside
_ROOT = Path(__file__).resolve().parents[2]


def test_a_session_without_prefect_tests_starts_no_server_and_its_api_url_is_refused(request):
    if os.environ.get(_INSIDE) != "1":
        inner = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider",
                                str(Path(__file__).relative_to(_ROOT))], cwd=_ROOT, capture_output=True, text=True,
                               timeout=300, env={**os.environ, _INSIDE: "1"}, stdin=subprocess.DEVNULL)
        assert inner.returncode == 0 and "1 passed" in inner.stdout, inner.stdout[-3000:] + inner.stderr[-2000:]
        return
    assert not any(conftest._needs_server(item) for item in request.session.items)
    assert "proc" not in conftest._SERVER, "a unit-only session started a Prefect server"
    url = urlsplit(os.environ["PREFECT_API_URL"])
    assert url.hostname == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError), socket.create_connection((url.hostname, url.port), timeout=5):
        pass

