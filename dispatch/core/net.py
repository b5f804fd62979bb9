"""A free loopback port and a Prefect server's health check, written once, standard library only.

- `free_port`: a TCP port for a server started a moment later (this home's local Prefect server, the
  pipeline's app, the servers of the tests and benchmarks); `port_free`: whether a given port can be bound
  (the local server's preferred port, the loopback cluster's sshd port on every node address).
- `health_status`, `healthy`, `wait_healthy`: one GET of `<api>/health` (no auth needed), so that a
  command can tell a server that is away before it imports Prefect.
"""

from __future__ import annotations

import errno
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

from dispatch.core.polling import attempts

HEALTH_TIMEOUT = 2.0  # seconds one health GET may take


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` right now (nothing holds it for whoever binds it next)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def port_free(port: int, address: str = "127.0.0.1") -> bool:
    """Whether TCP `address:port` can be bound now (a TIME_WAIT socket does not count, as for servers).

    Returns:
        False when something holds it or it is a privileged port we may not bind.

    Raises:
        OSError: `address` cannot be bound at all (not an address of this machine).
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT, as servers do
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


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
    for _ in attempts(timeout, interval):
        if healthy(api_url):
            return True
        if alive is not None and not alive():
            return False
    return False
