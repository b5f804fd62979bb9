"""Oyster Dispatch: run AI coding-agent specs across a cluster, on Prefect 3."""

__version__ = "0.1.0"
