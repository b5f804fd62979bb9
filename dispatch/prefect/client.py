"""One Prefect client kept open by a thread that calls the server again and again (team mode's background reads).

Without it every `Variable.get` or `get_client()` in a thread outside the flow builds a new client: a new TLS
context (the CA bundle parsed again), a new TCP connection and a new HTTP/1.1 session on the server, for one
small request. `kept_client()` enters Prefect's own `SyncClientContext` for the thread, so every such call
inside the block reuses one client and its connection; the client is closed when the block ends (by the thread
that used it, never by a finalizer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from dispatch.prefect.errors import API_ERRORS

logger = logging.getLogger(__name__)


@contextmanager
def kept_client(enabled: bool = True) -> Iterator[None]:
    """Inside the block, this thread's Prefect calls share one client (nothing when not `enabled`: embedded
    mode keeps these stores in files). A server that cannot be reached on entry is no error here: the calls
    inside then build a client each, as without the block, and fail or succeed as they would."""
    if not enabled:
        yield
        return
    from prefect.context import SyncClientContext

    if SyncClientContext.get() is not None:  # this thread has one already (e.g. the flow's own thread)
        yield
        return
    context = SyncClientContext()
    try:
        context.__enter__()
    except API_ERRORS as exc:  # the version check could not reach the server
        logger.debug("no kept Prefect client for this thread: %s", exc)
        context.client.__exit__(None, None, None)
        yield
        return
    try:
        yield
    finally:
        context.__exit__(None, None, None)
