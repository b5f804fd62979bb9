"""L1's scan on a small tree with planted gaps, planted look-alikes that are no gap, and folders it must skip."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dispatch.pipeline.analyze import fetch_openapi, html_files, routes_from_code, routes_from_openapi, scan_code
from tests.fixtures.projects import write_tree

SECRET = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e"
TREE = {
    "app/main.py": (
        "from fastapi import FastAPI\n"
        "app = FastAPI()\n"
        "API_KEY = '" + SECRET + "'\n"                          # 3 secret
        "BASE = 'http://localhost:8000/api'\n"                   # 4 hardcoded-url
        "@app.get('/api/items')\n"
        "def items():\n"
        "    return FAKE_ITEMS  # TODO: read from the database\n"  # 7 mock-data, todo
        "@app.post(\"/api/cart\")\n"
        "def add(item: dict):\n"
        "    pass\n"                                              # 9 empty-handler (def at line 9)
        "@app.route('/legacy', methods=['GET', 'PUT'])\n"
        "def legacy():\n"
        "    raise NotImplementedError\n"                         # 13 not-implemented
    ),
    "app/data.py": "FAKE_ITEMS = [{'id': 1}]\n",                   # 1 mock-data
    "app/base.py": (
        "import abc\n"
        "class Store(abc.ABC):\n"
        "    @abc.abstractmethod\n"
        "    def load(self):\n"
        "        ...\n"                                           # abstract: no gap
        "def stub():\n"
        "    \"\"\"Stub.\"\"\"\n"                                 # 6 empty-handler
    ),
    "web/index.html": (
        "<input placeholder=\"Email\">\n"                         # an attribute: no gap
        "<p>Lorem ipsum dolor sit amet</p>\n"                     # 2 placeholder
        "<script>document.querySelector('#buy').onclick = () => {}</script>\n"  # 3 empty-handler
    ),
    "web/app.js": "router.get('/api/health', (req, res) => res.send('ok'))\n// FIXME: retry on failure\n",
    "tests/test_api.py": "from unittest.mock import MagicMock\nURL = 'http://127.0.0.1:9000'\nfake_user = {}\n# XXX\n",
    "node_modules/lib/index.js": "// TODO: not ours\n",
    ".venv/lib/x.py": "# TODO: not ours\n",
    "myenv/pyvenv.cfg": "home = /usr/bin\n",
    "myenv/lib/site.py": "# TODO: a venv under another name\n",
    "dist/bundle.js": "// TODO: built\n",
    "build/out.py": "# TODO: built\n",
    ".git/hooks/x.py": "# TODO: git\n",
    "app/notes.txt": "TODO: not source\n",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_tree(tmp_path, TREE)
    (tmp_path / "app" / "huge.py").write_text("# TODO\n" + "x = 1\n" * 200_000)
    os.symlink("/etc", tmp_path / "linked")
    return tmp_path


def test_planted_gaps_are_found_and_nothing_else(tree: Path) -> None:
    scan = scan_code(tree)
    found = {(f.file, f.line, f.kind) for f in scan.findings}
    assert found == {
        ("app/main.py", 3, "secret"), ("app/main.py", 4, "hardcoded-url"), ("app/main.py", 7, "mock-data"),
        ("app/main.py", 7, "todo"), ("app/main.py", 9, "empty-handler"), ("app/main.py", 13, "not-implemented"),
        ("app/data.py", 1, "mock-data"), ("app/base.py", 6, "empty-handler"),
        ("web/index.html", 2, "placeholder"), ("web/index.html", 3, "empty-handler"),
        ("web/app.js", 2, "todo"), ("tests/test_api.py", 4, "todo"),
    }
    assert any("huge.py" in s for s in scan.skipped)


def test_a_secret_never_appears_in_what_the_scan_reports(tree: Path) -> None:
    scan = scan_code(tree)
    (secret,) = [f for f in scan.findings if f.kind == "secret"]
    assert SECRET not in json.dumps([f.as_dict() for f in scan.findings])
    assert secret.text == "API_KEY = '***'"


def test_routes_from_code(tree: Path) -> None:
    from dispatch.pipeline.analyze import source_files

    routes = {(r.method, r.path) for r in routes_from_code(tree, source_files(tree))}
    assert routes == {("GET", "/api/items"), ("POST", "/api/cart"), ("GET", "/legacy"), ("PUT", "/legacy"),
                      ("GET", "/api/health")}
    assert html_files(source_files(tree)) == ["web/index.html"]


def test_routes_from_a_served_openapi_schema() -> None:
    schema = {"openapi": "3.1.0", "paths": {"/api/items": {"get": {}, "post": {}, "parameters": []},
                                            "/healthz": {"get": {}}}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(schema).encode() if self.path == "/openapi.json" else b"no"
            self.send_response(200 if self.path == "/openapi.json" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        routes = routes_from_openapi(fetch_openapi(f"{url}/openapi.json"))
        assert [(r.method, r.path) for r in routes] == [("GET", "/api/items"), ("POST", "/api/items"),
                                                         ("GET", "/healthz")]
        with pytest.raises(ValueError, match="answered 404"):
            fetch_openapi(f"{url}/nothing")
    finally:
        server.shutdown()
