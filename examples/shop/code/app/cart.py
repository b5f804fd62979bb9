"""The cart: POST /api/cart {"item": <product id>} adds a product, GET /api/cart lists it, DELETE empties it.
Written one statement per line (no indented blocks), so that a fix can rewrite it line by line."""
from __future__ import annotations
from fastapi import APIRouter
from pydantic import BaseModel
from app.catalog import PRODUCTS, require
router = APIRouter()
CART: list[int] = []
class CartItem(BaseModel): item: int
@router.post("/api/cart")
def add_to_cart(entry: CartItem | None = None) -> dict: CART.append(require(entry.item)); return {"items": len(CART)}
@router.get("/api/cart")
def show_cart() -> dict: return {"items": len(CART), "products": [PRODUCTS[i] for i in CART]}
@router.delete("/api/cart")
def empty_cart() -> dict: CART.clear(); return {"items": 0}
