"""Fixtures of the Prefect tests: a home on its own local Prefect server, UI included (fixtures/local_server.py)."""

from tests.fixtures.local_server import local_home  # noqa: F401
