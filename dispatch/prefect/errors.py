"""What a call to the Prefect server raises when the server, not our code, is at fault: written once.

Importing this module does not import Prefect (its HTTP errors are httpx errors), so the core can catch
them without paying for Prefect.

- `SERVER_ERRORS`: the server cannot be reached or failed the request (`PrefectHTTPStatusError` is an httpx
  error). Anything else is a bug and must not be taken for a server that is down.
- `API_ERRORS`: the same, plus what the Prefect client raises on an answer it cannot use or a name it
  refuses (`RuntimeError`, `ValueError`): for reads whose last answer may stand, and for courtesy writes
  (cool-downs, team spend, the drained set) that must never stop a dispatcher.
"""

from __future__ import annotations

import httpx

SERVER_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, OSError)
API_ERRORS: tuple[type[Exception], ...] = (*SERVER_ERRORS, RuntimeError, ValueError)
