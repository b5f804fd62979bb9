// The shop's pages: the product list with Add buttons (/) and the cart (/cart).
function formatPrice(amount) { return `${amount.toFixed(2)} EUR`; }
let added = 0;

async function showProducts() {
const products = await (await fetch("/api/products")).json();
const list = document.getElementById("products");
for (const product of products) {
const item = document.createElement("li");
item.textContent = `${product.name} `;
const button = document.createElement("button");
button.textContent = "Add";
button.addEventListener("click", () => addToCart(product.id));
item.appendChild(button);
list.appendChild(item);
}
}

async function addToCart(id) {
const response = await fetch("/api/cart", {
method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({item: id}),
});
if (response.ok) {
added += 1;
document.getElementById("added").textContent = `${added} ${added === 1 ? "item" : "items"} added`;
}
}

async function showCart() {
const cart = await (await fetch("/api/cart")).json();
const list = document.getElementById("cart");
for (const product of cart.products) {
const item = document.createElement("li");
item.textContent = product.name;
list.appendChild(item);
}
const total = cart.products.reduce((sum, product) => sum + product.price, 0);
document.getElementById("total").textContent = `Total: ${formatPrice(total)}`;
}
