"""L4b Browser QA: every page in a real headless Chromium at 1920x1080 and 375x812, and the browser flows.

Driven by Playwright with Debian's own Chromium (`executable_path`, never a downloaded browser):
Playwright's sync API waits for load states and selectors itself, reports console messages, page errors
and failed requests as events, and needs no separate driver binary (Selenium would need Debian's
chromium-driver in lock-step with the browser). No browser or no Playwright: `BrowserMissing`, which the
layer reports as NOT RUN with the install command; never PASS.

Each full-page PNG gets a small JPEG beside it (`thumbnail_path`), drawn by the same Chromium, which the
pipeline embeds in its screenshots artifact (`screenshots_markdown`): the Prefect UI shows the images from
the artifact itself, on any machine, where a `file://` link to the PNG is refused by the browser.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from pathlib import Path

from dispatch.pipeline.masking import pipeline_masker
from dispatch.pipeline.results import Bug, Check, PageCapture

VIEWPORTS = {"1920x1080": (1920, 1080), "375x812": (375, 812)}
MOBILE = "375x812"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_HINT = "apt-get install chromium; pip install 'oyster-dispatch[pipeline]' (Playwright, no browser download)"
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_ACTION_MS = 5000
_SETTLE_MS = 3000
THUMBNAIL_WIDTH, THUMBNAIL_HEIGHT, THUMBNAIL_QUALITY = 480, 960, 70  # px at most (the page's top), JPEG quality
EMBEDDED_MAX, EMBEDDED_BYTES = 12, 150_000  # images in one artifact, bytes of one image (before base64)
_THUMBNAIL_SOURCE_BYTES = 20_000_000  # a larger PNG gets no thumbnail


class BrowserMissing(Exception):
    """No usable browser or no Playwright: the layer cannot run (what is missing, and how to install it)."""


def find_browser() -> str:
    """The Chromium to drive: `DISPATCH_CHROMIUM` if set, else the first of chromium, chromium-browser,
    google-chrome on PATH.

    Raises:
        BrowserMissing: none found, or Playwright is not installed.
    """
    chosen = os.environ.get("DISPATCH_CHROMIUM")
    path = chosen if chosen is not None else next(filter(None, map(shutil.which, _CANDIDATES)), None)
    if not path or not os.access(path, os.X_OK):
        where = f"DISPATCH_CHROMIUM={chosen!r} is not an executable" if chosen is not None else \
            f"none of {', '.join(_CANDIDATES)} is on PATH"
        raise BrowserMissing(f"no headless browser: {where}; install one: {INSTALL_HINT}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        raise BrowserMissing(f"Playwright is not installed: {INSTALL_HINT}") from exc
    return path


def _browser_own(url: str) -> bool:
    """A request the browser makes on its own (the favicon), not one of the page's."""
    return url.split("?", 1)[0].endswith("/favicon.ico")


def _slug(index: int, path: str) -> str:
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')[:40] or 'root'}"


def thumbnail_path(png: Path) -> Path:
    """The small JPEG beside a screenshot (`01-cart-375x812.png` -> `01-cart-375x812.thumb.jpg`)."""
    return png.with_suffix(".thumb.jpg")


def _thumbnail(browser, png: Path) -> None:
    """Write `thumbnail_path(png)`: the PNG scaled by Chromium to at most THUMBNAIL_WIDTH px wide, its top
    THUMBNAIL_HEIGHT px, as a JPEG. Best effort: a screenshot without a thumbnail is listed, not shown."""
    if png.stat().st_size > _THUMBNAIL_SOURCE_BYTES:
        return
    context = browser.new_context(viewport={"width": THUMBNAIL_WIDTH, "height": THUMBNAIL_HEIGHT})
    try:
        page = context.new_page()
        image = base64.b64encode(png.read_bytes()).decode("ascii")
        page.set_content(f'<body style="margin:0;overflow:hidden"><img style="display:block;max-width:'
                         f'{THUMBNAIL_WIDTH}px" src="data:image/png;base64,{image}"></body>', timeout=_ACTION_MS)
        box = page.locator("img").bounding_box(timeout=_ACTION_MS)
        if box and box["width"] >= 1 and box["height"] >= 1:
            page.screenshot(path=str(thumbnail_path(png)), type="jpeg", quality=THUMBNAIL_QUALITY,
                            clip={"x": 0, "y": 0, "width": box["width"], "height": min(box["height"],
                                                                                      THUMBNAIL_HEIGHT)})
    except Exception:  # Playwright's errors: no thumbnail, the PNG stays the evidence
        pass
    finally:
        context.close()


def _cell(text: str) -> str:
    """`text` safe inside a markdown table cell."""
    return re.sub(r"([|\\`*_\[\]<>])", r"\\\1", text.replace("\n", " "))


def screenshots_markdown(shots: dict[str, str]) -> str:
    """The screenshots artifact: a table row per screenshot (`shots`: "<page> <viewport>" -> PNG path) with
    its thumbnail embedded as a `data:` image, at most EMBEDDED_MAX of at most EMBEDDED_BYTES each; the
    others are named, with the folder that holds every full-size PNG."""
    lines = ["| page | viewport | screenshot | file |", "|---|---|---|---|"]
    shown = 0
    for name, png in shots.items():
        page, _, size = name.rpartition(" ")
        thumbnail = thumbnail_path(Path(png))
        image = "not shown"
        if shown < EMBEDDED_MAX and thumbnail.is_file() and thumbnail.stat().st_size <= EMBEDDED_BYTES:
            data = base64.b64encode(thumbnail.read_bytes()).decode("ascii")
            image, shown = f"![{_cell(page)} at {size}](data:image/jpeg;base64,{data})", shown + 1
        lines.append(f"| {_cell(page)} | {_cell(size)} | {image} | {_cell(Path(png).name)} |")
    folders = sorted({str(Path(png).parent) for png in shots.values()})
    lines.append(f"\n{shown} of {len(shots)} shown (at most {EMBEDDED_MAX}, {THUMBNAIL_WIDTH}x{THUMBNAIL_HEIGHT} px "
                 f"and {EMBEDDED_BYTES // 1000} kB each); full-size PNGs on the dispatcher in "
                 + ", ".join(f"`{folder}`" for folder in folders))
    return "\n".join(lines)


class BrowserQA:
    """One Chromium for every page and flow of one run.

    Args:
        base_url: where the pages are served.
        out_dir: screenshots and HTML go here.
        load_time_limit: seconds; a slower page is a bug.
    """

    def __init__(self, base_url: str, out_dir: Path, load_time_limit: float) -> None:
        self.base_url, self.out_dir, self.limit = base_url.rstrip("/"), out_dir, load_time_limit
        self.checks: list[Check] = []
        self.bugs: list[Bug] = []
        self.captures: list[PageCapture] = []
        self.masker = pipeline_masker()  # a page may show a key the app was given: what we keep of it is masked
        out_dir.mkdir(parents=True, exist_ok=True)

    def _bug(self, where: str, title: str, severity: str, reproduce: str, evidence: str = "") -> None:
        bug = Bug.make(layer="L4b", where=where, title=title[:200], severity=severity, reproduce=reproduce,
                       evidence=evidence[:1500])
        if all(known.id != bug.id for known in self.bugs):
            self.bugs.append(bug)

    def _watch(self, page) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {"console": [], "failed": [], "stacks": []}

        def console(message) -> None:
            if message.type == "error" and not _browser_own(message.location.get("url", "")):
                seen["console"].append(message.text[:500])

        def response(answer) -> None:
            if answer.status >= 400 and not _browser_own(answer.url):
                seen["failed"].append(f"{answer.request.method} {answer.url}: HTTP {answer.status}")

        page.on("console", console)
        page.on("pageerror", lambda e: seen["console"].append(f"uncaught {e.name}: {e.message}"[:500]) or
                seen["stacks"].append(e.stack or ""))
        page.on("requestfailed", lambda r: seen["failed"].append(f"{r.method} {r.url}: {r.failure}"[:300]))
        page.on("response", response)
        return seen

    def check_page(self, browser, index: int, path: str) -> None:
        """Load `path` at both sizes: status, console errors, failed requests, load time, overflow, PNGs."""
        url = self.base_url + path
        capture = PageCapture(path=path, url=url)
        for size, (width, height) in VIEWPORTS.items():
            context = browser.new_context(viewport={"width": width, "height": height})
            try:
                page = context.new_page()
                seen = self._watch(page)
                started = time.monotonic()
                try:
                    response = page.goto(url, wait_until="load", timeout=max(_ACTION_MS, self.limit * 3000))
                    error = None
                except Exception as exc:  # Playwright's TimeoutError/Error: the page did not load
                    response, error = None, str(exc).splitlines()[0][:300]
                load_time = time.monotonic() - started
                name = f"{path} @ {size}"
                if response is None or response.status >= 400:
                    detail = error or f"HTTP {response.status}"
                    self.checks.append(Check(name=name, verdict="fail", detail=f"did not load: {detail}",
                                             duration=round(load_time, 3)))
                    self._bug(path, f"page does not load ({detail[:80]})", "S2", f"open {url}", detail)
                    continue
                try:
                    page.wait_for_load_state("networkidle", timeout=_SETTLE_MS)
                except Exception:  # a page that keeps polling never idles: judge what it did so far
                    pass
                shot = self.out_dir / f"{_slug(index, path)}-{size}.png"
                page.screenshot(path=str(shot), full_page=True)
                capture.screenshots[size] = str(shot)
                _thumbnail(browser, shot)
                overflow = size == MOBILE and page.evaluate(
                    "document.documentElement.scrollWidth > window.innerWidth + 1")
                if size == MOBILE:
                    capture.overflow = bool(overflow)
                else:
                    html = self.out_dir / f"{_slug(index, path)}.html"
                    html.write_text(self.masker.mask(page.content()[:2_000_000]), encoding="utf-8")
                    capture.html_file, capture.load_time_s = str(html), round(load_time, 3)
                problems = self._judge(path, url, size, load_time, seen, bool(overflow))
                capture.console_errors = sorted(set(capture.console_errors) | set(seen["console"]))
                self.checks.append(Check(name=name, verdict="fail" if problems else "pass",
                                         detail="; ".join(problems) or f"loaded in {load_time:.2f}s",
                                         duration=round(load_time, 3)))
            finally:
                context.close()
        self.captures.append(capture)

    def _judge(self, path: str, url: str, size: str, load_time: float, seen: dict, overflow: bool) -> list[str]:
        problems = []
        stacks = "\n".join(seen["stacks"])[:1000]
        for text in dict.fromkeys(seen["console"]):
            problems.append(f"console error: {text[:160]}")
            self._bug(path, f"console error: {text[:120]}", "S2", f"open {url} with the browser console open",
                      f"{text}\n{stacks}" if text.startswith("uncaught ") else text)
        for text in dict.fromkeys(seen["failed"]):
            problems.append(f"failed request: {text[:160]}")
            self._bug(path, f"failed request: {text[:120]}", "S2", f"open {url}, watch the network", text)
        if load_time > self.limit:
            problems.append(f"slow: {load_time:.2f}s > {self.limit:g}s")
            self._bug(path, "loads slower than the limit", "S3", f"open {url}", f"{load_time:.2f}s at {size}")
        if overflow:
            problems.append("horizontal overflow on mobile")
            self._bug(path, "horizontal overflow at 375x812", "S3", f"open {url} at 375x812 and scroll sideways",
                      "document.scrollWidth is wider than the viewport")
        return problems

    def run_flow(self, browser, name: str, steps: list[str]) -> None:
        """One browser flow (goto, click, fill <selector> = <text>, press <key>, expect <selector>)."""
        context = browser.new_context(viewport={"width": 1920, "height": 1080})
        page = context.new_page()
        page.set_default_timeout(_ACTION_MS)
        try:
            for number, step in enumerate(steps, 1):
                verb, _, argument = step.strip().partition(" ")
                try:
                    if verb == "goto":
                        if not argument.startswith("/") or argument.startswith("//"):
                            raise ValueError(f"goto takes a path on the app, got {argument[:80]!r}")
                        page.goto(self.base_url + argument, wait_until="load")
                    elif verb == "click":
                        page.click(argument)
                    elif verb == "fill":
                        selector, _, text = argument.partition(" = ")
                        page.fill(selector, text)
                    elif verb == "press":
                        page.keyboard.press(argument)
                    elif verb == "expect":
                        page.wait_for_selector(argument, state="visible")
                    else:
                        raise ValueError(f"unknown step {verb!r}: use goto, click, fill, press or expect")
                except Exception as exc:  # Playwright errors and ours: the step failed, say which and why
                    detail = f"step {number} `{step}`: {str(exc).splitlines()[0][:200]}"
                    self.checks.append(Check(name=f"flow {name}", verdict="fail", detail=detail))
                    self._bug(f"flow {name}", f"step {number} fails: {step[:80]}", "S2", " ; ".join(steps), detail)
                    return
            self.checks.append(Check(name=f"flow {name}", verdict="pass", detail=f"{len(steps)} steps"))
        finally:
            context.close()


def run_browser_qa(base_url: str, pages: list[str], flows: list[tuple[str, list[str]]], out_dir: Path,
                   load_time_limit: float) -> BrowserQA:
    """Check every page and run every flow in one headless Chromium.

    Raises:
        BrowserMissing: no browser or no Playwright (the layer is NOT RUN).
    """
    executable = find_browser()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    qa = BrowserQA(base_url, out_dir, load_time_limit)
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as exc:
            raise BrowserMissing(f"{executable} did not start: {str(exc).splitlines()[0][:300]}; "
                                 f"{INSTALL_HINT}") from exc
        try:
            for index, path in enumerate(pages):
                qa.check_page(browser, index, path)
            for name, steps in flows:
                qa.run_flow(browser, name, steps)
        finally:
            browser.close()
    return qa
