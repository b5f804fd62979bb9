"""The shop's ASGI app: `uvicorn app.main:app --port 8000`.

Pages: / (the products, with Add buttons) and /cart. Health: /healthz.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app import cart, catalog, orders, search

STATIC = Path(__file__).parent / "static"

app = FastAPI(title="Oyster shop", version="1.0")
app.include_router(catalog.router)
app.include_router(cart.router)
app.include_router(orders.router)
app.include_router(search.router)
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/healthz", include_in_schema=False)
def healthz() -> dict:
    """200 while the app serves."""
    return {"ok": True}


@app.get("/", include_in_schema=False)
def home_page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@app.get("/cart", include_in_schema=False)
def cart_page() -> FileResponse:
    return FileResponse(STATIC / "cart.html")
