"""Orders: POST /api/orders turns the cart into an order (201); GET /api/orders/{order_id} reads one."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from app.cart import CART
from app.catalog import PRODUCTS

router = APIRouter()
ORDERS: dict[int, dict] = {}


class OrderRequest(BaseModel):
    """Who the order is for; the items come from the cart."""

    name: str = Field(default="guest", max_length=100)


@router.post("/api/orders", status_code=201)
def place_order(request: OrderRequest | None = None) -> dict:
    """Place an order for the cart's items (400 when the cart is empty) and empty the cart."""
    if not CART:
        raise HTTPException(status_code=400, detail="the cart is empty")
    order_id = len(ORDERS) + 1
    total = round(sum(PRODUCTS[i]["price"] for i in CART), 2)
    ORDERS[order_id] = {"id": order_id, "name": (request or OrderRequest()).name, "items": list(CART), "total": total}
    CART.clear()
    return ORDERS[order_id]


@router.get("/api/orders/{order_id}")
def get_order(order_id: int) -> dict:
    """One order, or 404."""
    if order_id not in ORDERS:
        raise HTTPException(status_code=404, detail="no such order")
    return ORDERS[order_id]
