"""A small shop: a JSON API (FastAPI, with its OpenAPI schema at /openapi.json) and two HTML pages."""
