"""The shop's own tests (what L4d, the regression layer, runs with coverage)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.cart import CART
from app.main import app

client = TestClient(app)


@pytest.fixture(autouse=True)
def empty_cart():
    CART.clear()
    yield
    CART.clear()


def test_health():
    assert client.get("/healthz").json() == {"ok": True}


def test_products_are_listed_and_found():
    products = client.get("/api/products").json()
    assert [p["id"] for p in products] == [1, 2, 3]
    assert client.get("/api/products/2").json()["name"] == "Pacific oyster"
    assert client.get("/api/products/99").status_code == 404


def test_add_to_cart_then_order():
    assert client.post("/api/cart", json={"item": 1}).json() == {"items": 1}
    assert client.post("/api/cart", json={"item": 3}).json() == {"items": 2}
    assert client.get("/api/cart").json()["items"] == 2
    order = client.post("/api/orders", json={"name": "ann"})
    assert order.status_code == 201 and order.json()["total"] == 14.5
    assert client.get(f"/api/orders/{order.json()['id']}").json()["name"] == "ann"
    assert client.get("/api/cart").json()["items"] == 0


def test_unknown_product_is_not_added():
    assert client.post("/api/cart", json={"item": 42}).status_code == 404


def test_order_needs_a_cart():
    assert client.post("/api/orders").status_code == 400


def test_search_finds_by_name():
    response = client.get("/api/search", params={"q": "knife"})
    assert response.status_code == 200 and "Oyster knife" in response.text


def test_pages_are_served():
    assert "Oyster shop" in client.get("/").text
    assert "Your cart" in client.get("/cart").text
