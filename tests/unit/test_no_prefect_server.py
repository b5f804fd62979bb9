"""A session of unit tests alone starts no Prefect server, and its PREFECT_API_URL refuses every connection
(tests/conftest.py), so a unit test that talks to Prefect by mistake fails at once instead of reaching a server."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

from tests import conftest


def test_a_session_without_prefect_tests_starts_no_server_and_its_api_url_is_refused(request):
    if any(conftest._needs_server(item) for item in request.session.items):
        pytest.skip("this session collected tests that need the Prefect server (run tests/unit alone)")
    assert "proc" not in conftest._SERVER
    url = urlsplit(os.environ["PREFECT_API_URL"])
    assert url.hostname == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError), socket.create_connection((url.hostname, url.port), timeout=5):
        pass
