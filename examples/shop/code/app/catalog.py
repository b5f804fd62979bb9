"""The product catalogue: GET /api/products and GET /api/products/{product_id}."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

router = APIRouter()

PRODUCTS: dict[int, dict] = {
    1: {"id": 1, "name": "Rock oyster", "price": 2.5},
    2: {"id": 2, "name": "Pacific oyster", "price": 3.0},
    3: {"id": 3, "name": "Oyster knife", "price": 12.0},
}


def require(product_id: int) -> int:
    """`product_id` when such a product exists, else a 404."""
    if product_id not in PRODUCTS:
        raise HTTPException(status_code=404, detail="no such product")
    return product_id


@router.get("/api/products")
def list_products(limit: int = 20) -> list[dict]:
    """Every product, at most `limit` of them."""
    return list(PRODUCTS.values())[: max(0, min(limit, 100))]


@router.get("/api/products/{product_id}")
def get_product(product_id: int) -> dict:
    """One product, or 404."""
    return PRODUCTS[require(product_id)]
