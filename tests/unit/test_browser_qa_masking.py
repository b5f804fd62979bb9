"""L4b keeps a page's HTML as evidence: a key the page shows is masked there, as in every file the pipeline
writes (headless Chromium, a page served on 127.0.0.1)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

KEY = "fake-page-token-5f3c2a9e81d04b"


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        body = f"<html><body><h1>Settings</h1><p>token: {KEY}</p></body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_html_kept_of_a_page_showing_a_key_is_masked(tmp_path: Path, monkeypatch) -> None:
    from dispatch.core.settings import get_settings
    from dispatch.pipeline.browser_qa import run_browser_qa

    monkeypatch.setenv("SHOP_SERVICE_TOKEN", KEY)  # a credential of this process: the masker knows it by name
    get_settings.cache_clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        qa = run_browser_qa(f"http://127.0.0.1:{server.server_port}", ["/"], [], tmp_path / "L4b", 10.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    html = Path(qa.captures[0].html_file).read_text()
    assert "<h1>Settings</h1>" in html and KEY not in html and "token: ***" in html
