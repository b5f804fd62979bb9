"""Fixtures of the pipeline tests (tests/fixtures/shop.py)."""

from tests.fixtures.shop import shop  # noqa: F401
