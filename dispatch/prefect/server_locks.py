"""File locks shared through the Prefect server (team mode): one table for every user and project of a repo.

Inside one project run the scheduler's `LockTable` keeps overlapping `modifies` apart. In team mode two
users' dispatchers may run projects on the same repository from different machines; this table makes
their locks meet. It is exact (`dispatch.core.locks.overlaps`), so specs that cannot touch a common path
still run in parallel.

What is stored: one Prefect Variable per held lock set, `dispatch_lock_<scope>__<id>`, whose value is
`{"scope", "patterns", "holder": "user@host", "project", "task_id", "run_id", "lease", "expires"}`.

Acquire (non-blocking, two API calls): create our variable, then read every variable of the scope in
one filtered call. We hold the locks if no other live variable of the scope overlaps ours; otherwise we
delete ours (in the background) and the spec is requeued. This write-then-read order is what makes two
racing dispatchers safe without a mutex: of two overlapping candidates, the one that reads second sees
the other's committed variable, so at most one of them proceeds (both may back off: then the first by
variable name retries after ~50 ms, the other after the usual jittered 0.2-0.4 s). After a refusal the
next try of that spec reads first (one call) and writes only when the scope looks free.

Crash safety: the holder renews its variables (one PATCH each, every lease/3) in the background; a
variable not renewed for `lease` seconds is treated as gone, and whoever sees it deletes it. Expiry
compares the server's own `updated` time of the holder's variable with the server's `created` time of
ours, so it does not depend on the users' clocks agreeing.

Why not a per-scope mutex on a global concurrency limit: Prefect's lease on a limit lasts at least 60 s
(the API refuses shorter), so a dispatcher that died inside the critical section would block every lock
of its scope for a minute or more, and the mutex would double the calls per acquire (take, read, create,
give back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from dispatch.core.locks import overlaps

logger = logging.getLogger(__name__)

_PREFIX = "dispatch_lock_"
_SEPARATOR = "__"  # scopes never contain `_`, so `<prefix><scope>__` names exactly one scope
_TAG = "dispatch-lock"
_PAGE = 200  # the server's largest page (PREFECT_API_DEFAULT_LIMIT)
_MAX_VALUE_CHARS = 4800  # Prefect refuses values whose JSON exceeds 5000 characters
_WHOLE_SCOPE = ""  # the pattern that covers every path (too many patterns to store)
_RETRY = 0.2  # seconds before a refused spec is tried again (jittered up to twice that)
_RACE_RETRY = 0.05  # ... when it lost a race to a candidate just as new: the first by name goes again soon
_RACE_WINDOW = 1.0  # seconds between two candidates' variables that make it a race


def lock_scope(project: str, repo_url: str | None = None) -> str:
    """The lock table a project's specs use: its repository when `projects.json` names one, else its name.

    Locks are about files, and files belong to a repository, not to a project: two projects of one
    repository (e.g. `api` and `api-hotfix`, or one project run by two users under different names) edit the
    same files and must share one table, while two repositories that both have a `src/` never conflict.
    Without a `repo_url` the project name is all that two users can both know (`repo_local` paths differ
    per machine), so projects without one share a table only with runs of the same project name.

    Examples:
        >>> lock_scope("api", "git@github.com:Acme/api.git") == lock_scope("x", "https://github.com/Acme/api")
        True
        >>> lock_scope("demo")
        'project-demo'
    """
    key = f"repo:{_canonical_repo(repo_url)}" if repo_url else f"project:{project}"
    slug = re.sub(r"[^a-z0-9]+", "-", key.split(":", 1)[1].lower()).strip("-") or "root"
    slug = slug if repo_url else f"project-{slug}"
    if len(slug) > 80:  # variable names are limited to 255 characters; keep names readable
        slug = f"{slug[:60].rstrip('-')}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return slug


def _canonical_repo(url: str) -> str:
    """`git@host:org/repo.git`, `ssh://git@host:22/org/repo`, `https://host/org/repo/` -> `host/org/repo`."""
    url = re.sub(r"(\.git)?/*$", "", url.strip())
    if match := re.match(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^/]*)(.*)$", url, re.IGNORECASE):
        host, path = match.groups()
    elif match := re.match(r"^(?:[^@/]*@)?([^:/]+):(.*)$", url):
        host, path = match.groups()
    else:  # a local path
        host, path = "", url
    return f"{host.split(':')[0].lower()}/{path.strip('/')}"


@dataclass(frozen=True)
class Blocker:
    """Another dispatcher's lock that overlaps ours."""

    pattern: str
    holder: str
    project: str
    task_id: str

    def __str__(self) -> str:
        what = self.pattern or "the whole repository"
        return f"{what} held by {self.holder} (project {self.project}, spec {self.task_id})"


@dataclass(frozen=True)
class Grant:
    """The answer to `try_acquire`: a token to release when held, else why not (true only when held)."""

    token: str | None
    blocker: Blocker | None = None
    error: str = ""
    retry_after: float = field(default_factory=lambda: _RETRY * (1 + random.random()))

    def __bool__(self) -> bool:
        return self.token is not None

    @property
    def reason(self) -> str:
        if self.blocker is not None:
            return f"waiting for lock {self.blocker}"
        return f"waiting for the server's lock table: {self.error}" if self.error else ""


class _Table:
    """What the background threads share (kept apart from `ServerLocks` so that it can be collected)."""

    def __init__(self, client: Any, lease_seconds: float) -> None:
        self.client = client
        self.lease_seconds = lease_seconds
        self.lock = threading.Lock()
        self.held: dict[str, dict] = {}  # our granted variables: name -> value
        self.dropping: set[str] = set()  # ours, being deleted (released or refused): ignored when we read
        self.stop = threading.Event()
        self.abandoned = False  # the owner was collected unclosed (set by a GC callback: a plain assignment)
        self.renewer: threading.Thread | None = None
        self.deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-lock-release")

    def hold(self, name: str, value: dict) -> None:
        with self.lock:
            self.held[name] = value
            if self.renewer is None:
                self.renewer = threading.Thread(target=self.renew, name="server-lock-renewer", daemon=True)
                self.renewer.start()

    def renew(self) -> None:
        """Renew every held variable each lease/3; the thread ends when nothing is held."""
        from prefect.client.schemas.actions import VariableUpdate

        while not self.stop.wait(self.lease_seconds / 3) and not self.abandoned:
            with self.lock:
                if not self.held:
                    self.renewer = None
                    return
                held = list(self.held.items())
            for name, value in held:
                value = {**value, "expires": time.time() + self.lease_seconds}
                try:
                    self.client.update_variable(VariableUpdate(name=name, value=value))
                except Exception as exc:
                    if getattr(getattr(exc, "response", None), "status_code", None) == 404:
                        with self.lock:
                            lost = self.held.pop(name, None)
                        if lost is not None:
                            logger.error("lock %s of spec %s was taken back by the server: it was not renewed "
                                         "for %.0f s; another dispatcher may now run overlapping specs",
                                         lost["patterns"], lost["task_id"], self.lease_seconds)
                    else:
                        logger.warning("could not renew lock %s: %s", name, exc)

    def drop(self, name: str, wait: bool = False) -> None:
        """Delete one of our variables (in the background unless `wait`); ignored by our reads meanwhile."""
        with self.lock:
            self.held.pop(name, None)
            self.dropping.add(name)
        if wait:
            self.delete(name)
        else:
            self.deleter.submit(self.delete, name)

    def delete(self, name: str) -> None:
        from prefect.exceptions import ObjectNotFound

        try:
            self.client.delete_variable_by_name(name)
        except ObjectNotFound:  # someone saw it expired and removed it first
            pass
        except Exception as exc:  # it expires by itself
            logger.warning("could not delete lock %s (it expires by itself): %s", name, exc)
        with self.lock:
            self.dropping.discard(name)

    def shutdown(self) -> None:
        """Release what is held, wait for the deletes under way, close the client (the owner's `close()`)."""
        self.stop.set()
        with self.lock:
            names = list(self.held)
        for name in names:
            self.drop(name, wait=True)
        self.deleter.shutdown(wait=True)
        try:
            self.client.__exit__(None, None, None)
        except Exception as exc:  # the locks are released or expire by their lease: nothing left to do
            logger.debug("closing the lock table's client: %s", exc)

    def abandon(self) -> None:
        """The owner was collected without `close()`: stop renewing, so its locks expire by their lease.

        Runs as a GC callback, anywhere, even inside a lock: it only assigns a flag (no network I/O, no lock, not
        even an Event's, no join); the renewer sees it at its next wake-up and ends. A callback that deleted the
        variables deadlocked a run: the collector ran it on a thread that was inside the same HTTP client's
        connection pool, and the delete waited for that pool forever (issue 19).
        """
        self.abandoned = True


class ServerLocks:
    """File locks of one project run, in the Prefect server's table for `scope`.

    Args:
        scope: the lock table (`lock_scope(...)`): runs with the same scope see each other's locks.
        project, run_id, holder: who holds, as shown to the others ("user@host").
        lease_seconds: how long a lock outlives its holder's last renewal (a dead dispatcher's locks return).
        client: a started `SyncPrefectClient`; default: one for the current Prefect settings.

    Close it explicitly (`close()`, or use it as a context manager): that releases the locks still held.
    One that is never closed stops renewing when collected, and its locks expire by their lease; nothing is
    sent from a finalizer.
    """

    def __init__(self, scope: str, *, project: str, run_id: str, holder: str, lease_seconds: float = 60.0,
                 client: Any = None) -> None:
        if client is None:
            from prefect.client.orchestration import get_client

            client = get_client(sync_client=True)
            client.__enter__()
        self.scope = scope
        self.project = project
        self.run_id = run_id
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.api_calls = 0  # Prefect API calls made by try_acquire (for the figures in docs/team-mode.md)
        self._table = _Table(client, lease_seconds)
        self._contended: dict[str, str] = {}  # spec refused last time -> its candidate: the next try reads first
        self._closed = False
        weakref.finalize(self, _Table.abandon, self._table)  # assigns a flag only: see `_Table.abandon`

    def __enter__(self) -> ServerLocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def try_acquire(self, task_id: str, patterns: Iterable[str]) -> Grant:
        """Take every lock of `patterns` for `task_id`, or none; never waits for a holder to finish."""
        patterns = list(patterns)
        if not patterns:
            return Grant(token="")
        name = None
        try:
            if task_id in self._contended:
                variables, now = self._read()
                if found := self._blocker(variables, patterns, now, own=None):
                    return self._refusal(self._contended[task_id], now, *found)
            name = f"{_PREFIX}{self.scope}{_SEPARATOR}{uuid.uuid4().hex[:16]}"
            value = self._value(task_id, patterns)
            mine = self._create(name, value)
            variables, _ = self._read()
            found = self._blocker(variables, patterns, mine.created.timestamp(), own=name)
        except Exception as exc:  # no server: the spec waits, as for a busy lock
            if name is not None:
                self._table.drop(name)
            logger.warning("server lock table for %s: %s", self.scope, exc)
            return Grant(None, error=f"{type(exc).__name__}: {exc}"[:300])
        if found is not None:
            self._contended[task_id] = name
            self._table.drop(name)
            return self._refusal(name, mine.created.timestamp(), *found)
        self._contended.pop(task_id, None)
        self._table.hold(name, value)
        return Grant(name)

    @staticmethod
    def _refusal(name: str, now: float, blocker: Blocker, other: Any) -> Grant:
        """A refusal; two candidates that both wrote before either read refuse each other, so the first by
        name retries at once when the other is just as new (this decides only how soon one wins, not safety)."""
        if name < other.name and other.created.timestamp() > now - _RACE_WINDOW:
            return Grant(None, blocker, retry_after=_RACE_RETRY * (1 + random.random()))
        return Grant(None, blocker)

    def release(self, token: str, wait: bool = False) -> None:
        """Give the locks of a grant back (in the background: the dispatch loop must not wait on the server)."""
        if token:
            self._table.drop(token, wait=wait)

    @property
    def held(self) -> dict[str, dict]:
        """Our granted lock sets: variable name -> value."""
        with self._table.lock:
            return dict(self._table.held)

    def close(self) -> None:
        """Release every lock still held, stop renewing and close the client (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self._table.shutdown()

    # -- the table -----------------------------------------------------------------------------
    def _value(self, task_id: str, patterns: list[str]) -> dict:
        value = {"scope": self.scope, "patterns": patterns, "holder": self.holder, "project": self.project,
                 "task_id": task_id, "run_id": self.run_id, "lease": self.lease_seconds,
                 "expires": time.time() + self.lease_seconds}
        if len(json.dumps(value)) > _MAX_VALUE_CHARS:  # too long to store: lock the whole repository instead
            logger.warning("spec %s: its modifies are too long to store (%d patterns); it locks the whole %s",
                           task_id, len(patterns), self.scope)
            value["patterns"] = [_WHOLE_SCOPE]
        return value

    def _create(self, name: str, value: dict) -> Any:
        from prefect.client.schemas.actions import VariableCreate

        self.api_calls += 1
        return self._table.client.create_variable(VariableCreate(name=name, value=value, tags=[_TAG]))

    def _read(self) -> tuple[list[Any], float]:
        """Every variable of this scope (one call unless over a page), and the server's time of the read."""
        self.api_calls += 1
        variables, response = _read_variables(self._table.client, f"{_PREFIX}{self.scope}{_SEPARATOR}")
        try:
            now = parsedate_to_datetime(response.headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            now = time.time()
        return variables, now

    def _blocker(self, variables: list[Any], patterns: list[str], now: float,
                 own: str | None) -> tuple[Blocker, Any] | None:
        """The first live lock of another holder that overlaps `patterns`, and its variable; expired ones
        are deleted."""
        with self._table.lock:
            ours = set(self._table.dropping)
        for variable in variables:
            value = variable.value
            if variable.name == own or variable.name in ours or not isinstance(value, dict):
                continue
            if value.get("scope") != self.scope:
                continue
            renewed = (variable.updated or variable.created).timestamp()
            if renewed + float(value.get("lease", 60.0)) < now:  # its holder stopped renewing: gone
                logger.info("lock %s of %s (%s) expired; removing it", value.get("patterns"), value.get("holder"),
                            value.get("task_id"))
                self._table.drop(variable.name)
                continue
            for held in value.get("patterns", []):
                if any(overlaps(pattern, held) for pattern in patterns):
                    return Blocker(held, str(value.get("holder", "?")), str(value.get("project", "?")),
                                   str(value.get("task_id", "?"))), variable
        return None


def _read_variables(client: Any, prefix: str) -> tuple[list[Any], Any]:
    """Variables whose name starts with `prefix`, read by name filter (one call per page of 200)."""
    from prefect.client.schemas.objects import Variable

    found: list[Any] = []
    offset = 0
    while True:
        # `like_` is a case-insensitive substring match where `_` is a wildcard: filter exactly here.
        response = client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": prefix}}, "limit": _PAGE, "offset": offset})
        page = Variable.model_validate_list(response.json())
        found += [v for v in page if v.name.startswith(prefix)]
        if len(page) < _PAGE:
            return found, response
        offset += _PAGE


def held_locks(scope: str | None = None) -> list[dict]:
    """The file locks held in the Prefect server's table (for `dispatch status`), oldest first.

    Args:
        scope: one lock table (`lock_scope(...)`); None: every scope.

    Returns:
        One dict per held lock set: `scope`, `patterns`, `holder`, `project`, `task_id`, `run_id`, `since`,
        `renewed`, `expires` (Unix times, the server's clock) and `expired` (not renewed in time: its holder
        is gone and the next acquire in its scope removes it).
    """
    from prefect.client.orchestration import get_client

    prefix = f"{_PREFIX}{scope}{_SEPARATOR}" if scope else _PREFIX
    with get_client(sync_client=True) as client:
        variables, _ = _read_variables(client, prefix)
    now = time.time()
    locks = []
    for variable in variables:
        value = variable.value
        if not isinstance(value, dict) or "patterns" not in value:
            continue
        renewed = (variable.updated or variable.created).timestamp()
        expires = renewed + float(value.get("lease", 60.0))
        locks.append({"scope": value.get("scope"), "patterns": list(value["patterns"]),
                      "holder": value.get("holder"), "project": value.get("project"),
                      "task_id": value.get("task_id"), "run_id": value.get("run_id"),
                      "since": variable.created.timestamp(), "renewed": renewed, "expires": expires,
                      "expired": expires < now, "name": variable.name})
    return sorted(locks, key=lambda lock: (lock["scope"] or "", lock["since"]))
