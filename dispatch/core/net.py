"""A free loopback port and a Prefect server's health check, written once, standard library only.

- `free_port`: a TCP port for a server started a moment later (this home's local Prefect server, the
  pipeline's app, the servers of the tests and benchmarks).
- `health_status`, `healthy`, `wait_healthy`: one GET of `<api>/health` (no auth needed), so that a
  command can tell a server that is away before it imports Prefect.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

HEALTH_TIMEOUT = 2.0  # seconds one health GET may take


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (nothing holds it for whoever binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_status(api_url: str, timeout: float = HEALTH_TIMEOUT) -> int:
    """The HTTP status of one GET of `<api_url>/health`.

    Raises:
        OSError: the server cannot be reached (refused, timed out, unknown host).
        ValueError: `api_url` is not a URL urllib can open.
    """
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def healthy(api_url: str, timeout: float = HEALTH_TIMEOUT) -> bool:
    """Whether `<api_url>/health` answers 200 now."""
    try:
        return health_status(api_url, timeout) == 200
    except OSError:
        return False


def wait_healthy(api_url: str, timeout: float, interval: float, alive: Callable[[], bool] | None = None) -> bool:
    """Ask `<api_url>/health` every `interval` seconds until it answers 200 (True).

    Returns:
        False when `timeout` seconds pass first, or when `alive()` says the server's process has ended.
    """
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if (alive is not None and not alive()) or time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
