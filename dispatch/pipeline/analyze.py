"""L1's scan: the gaps in a code base, its API routes and its pages. Prefect-free; flows/layers/analyze.py runs it.

Gaps (`Finding.kind`): `todo` (TODO, FIXME, XXX), `placeholder` (placeholder or lorem ipsum text, not the HTML
attribute), `mock-data` (mock/fake/dummy data outside tests), `not-implemented` (NotImplementedError, "not
implemented"), `empty-handler` (a Python function whose body is only `pass` or `...`, an empty JS function),
`hardcoded-url` (`localhost:<port>`, `127.0.0.1:<port>` outside tests) and `secret` (a literal assigned to a
key/token/password name, or a known key shape; the value is never shown: excerpts mask it).

The walk skips `.git`, `node_modules`, virtualenvs (`venv`, `.venv`, any folder with a `pyvenv.cfg`), `dist`,
`build`, vendored code (`vendor`, `third_party`, `site-packages`), caches and hidden folders, never follows a
symlink, and is bounded: files over 1 MiB are skipped, at most 20,000 files and 5,000 findings.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

_SKIP_DIRS = {
    ".git", "node_modules", "venv", ".venv", "env", "dist", "build", "vendor", "vendored", "third_party",
    "site-packages", "__pycache__", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".next",
    ".nuxt", "coverage", "htmlcov", "bower_components",
}  # fmt: skip
_SOURCE = {
    ".py", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".vue", ".svelte", ".html", ".htm", ".css", ".scss",
    ".go", ".rb", ".java", ".kt", ".rs", ".php", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini",
}  # fmt: skip
MAX_FILE_BYTES, MAX_FILES, MAX_FINDINGS = 1 << 20, 20_000, 5_000
_MAX_LINE = 2_000
_EXCERPT = 160

_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("todo", re.compile(r"\b(?:TODO|FIXME|XXX)\b")),
    ("not-implemented", re.compile(r"\bNotImplemented(?:Error)?\b|\bnot[ _]implemented\b", re.IGNORECASE)),
    ("placeholder", re.compile(r"(?<![:\w-])placeholder\b(?!\s*[=:])(?![\w-])|\blorem ipsum\b", re.IGNORECASE)),
    ("mock-data", re.compile(r"\b(?:[Mm]ock|[Ff]ake|[Dd]ummy|MOCK|FAKE|DUMMY)(?:_\w*|s?\b|[A-Z]\w*)")),
    ("empty-handler", re.compile(r"\bfunction\s*[\w$]*\s*\([^)]*\)\s*\{\s*\}|=>\s*\{\s*\}")),
    ("hardcoded-url", re.compile(r"\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):\d{2,5}\b")),
]
_NOT_IN_TESTS = {"mock-data", "hardcoded-url"}
_SECRET_ASSIGN = re.compile(
    r"""(?i)\b([\w-]*(?:api[_-]?key|secret|token|passw(?:or)?d|pwd|private[_-]?key)[\w-]*)["']?\s*[:=]\s*"""
    r"""(["'])([^"'\s$%{}<>]{8,})\2""")
_KEY_SHAPES = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|"
                         r"xox[baprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b|-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True)
class Finding:
    """One gap: its kind, the file (relative to the code), the line, and a masked excerpt."""

    kind: str
    file: str
    line: int
    text: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scan:
    """What the scan saw: the findings, and what it counted or skipped (for the layer's evidence)."""

    findings: list[Finding] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    files_scanned: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: bool = False

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts


def mask_secrets(line: str) -> str:
    """`line` with every secret-looking literal replaced by `***` (what we print of a line, always)."""
    line = _SECRET_ASSIGN.sub(lambda m: m.group(0).replace(m.group(3), "***"), line)
    return _KEY_SHAPES.sub(lambda m: m.group(0)[:4] + "***", line)


def is_test_path(relative: str) -> bool:
    """Whether a file is test code (where mock data and loopback URLs are expected)."""
    parts = relative.lower().split("/")
    name = parts[-1]
    return (any(p in ("test", "tests", "__tests__", "spec", "specs", "fixtures", "e2e") for p in parts[:-1])
            or name.startswith("test_") or name == "conftest.py"
            or re.search(r"(_test\.py|\.(test|spec)\.[jt]sx?)$", name) is not None)


def source_files(code_dir: Path, scan: Scan | None = None) -> list[str]:
    """The source files to scan, relative to `code_dir` with `/` separators, sorted (see the module doc)."""
    found: list[str] = []
    for root, dirs, files in os.walk(code_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")
                         and not os.path.isfile(os.path.join(root, d, "pyvenv.cfg"))
                         and not os.path.islink(os.path.join(root, d)))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith(".") or name.endswith((".min.js", ".min.css")) or os.path.islink(path):
                continue
            if os.path.splitext(name)[1].lower() not in _SOURCE:
                continue
            relative = os.path.relpath(path, code_dir).replace(os.sep, "/")
            if os.path.getsize(path) > MAX_FILE_BYTES:
                if scan is not None:
                    scan.skipped.append(f"{relative}: over {MAX_FILE_BYTES >> 20} MiB")
                continue
            found.append(relative)
            if len(found) >= MAX_FILES:
                if scan is not None:
                    scan.truncated = True
                return found
    return found


def _excerpt(line: str) -> str:
    text = mask_secrets(line.strip()[:_MAX_LINE])
    return text if len(text) <= _EXCERPT else text[:_EXCERPT - 3] + "..."


def _constant(statement: ast.stmt, kind: type) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, kind))


def _empty_functions(source: str) -> list[tuple[int, str]]:
    """Python functions whose body is only `pass` or `...` (a docstring aside), not abstract or overloads."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        decorators = {ast.unparse(d).rsplit(".", 1)[-1] for d in node.decorator_list}
        if decorators & {"abstractmethod", "overload", "abstractproperty"}:
            continue
        body = [s for s in node.body if not _constant(s, str)]  # docstrings
        if not body or (len(body) == 1 and (isinstance(body[0], ast.Pass) or _constant(body[0], type(Ellipsis)))):
            found.append((node.lineno, f"def {node.name}(...): only `pass`/`...`"))
    return found


def scan_code(code_dir: Path) -> Scan:
    """Scan `code_dir` for gaps (see the module doc)."""
    scan = Scan()
    scan.files = source_files(code_dir, scan)
    for relative in scan.files:
        try:
            source = (code_dir / relative).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            scan.skipped.append(f"{relative}: {exc.strerror or exc}")
            continue
        scan.files_scanned += 1
        in_tests = is_test_path(relative)
        found: list[Finding] = []
        for number, line in enumerate(source.splitlines(), 1):
            head = line[:_MAX_LINE]
            kinds = [kind for kind, rule in _RULES if not (in_tests and kind in _NOT_IN_TESTS) and rule.search(head)]
            if _SECRET_ASSIGN.search(head) or _KEY_SHAPES.search(head):
                kinds.append("secret")
            found += [Finding(kind, relative, number, _excerpt(line)) for kind in kinds]
        if relative.endswith(".py"):
            found += [Finding("empty-handler", relative, number, text) for number, text in _empty_functions(source)]
        scan.findings += sorted(found, key=lambda f: (f.line, f.kind))
        if len(scan.findings) >= MAX_FINDINGS:
            scan.findings, scan.truncated = scan.findings[:MAX_FINDINGS], True
            break
    return scan


# -- the API and pages -------------------------------------------------------------------------------------------

_METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
_DECORATOR = re.compile(r"""@\w+(?:\.\w+)*\.(get|post|put|patch|delete|head|options|route|api_route)\(\s*"""
                        r"""(?:path\s*=\s*)?["']([^"']+)["'](.*)$""")
_EXPRESS = re.compile(r"""\b(?:app|router|server)\.(get|post|put|patch|delete)\(\s*["'`](/[^"'`]*)["'`]""")
_FLASK_METHODS = re.compile(r"""methods\s*=\s*[\[(]([^\])]*)[\])]""")


@dataclass(frozen=True)
class Route:
    """One API route: method, path, and where it came from (`openapi` or `file:line`)."""

    method: str
    path: str
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


def routes_from_openapi(schema: dict) -> list[Route]:
    """The routes of an OpenAPI document (its `paths`), sorted."""
    paths = schema.get("paths") if isinstance(schema, dict) else None
    routes = []
    for path, item in (paths or {}).items():
        if isinstance(item, dict):
            routes += [Route(method.upper(), str(path), "openapi") for method in item if method in _METHODS]
    return sorted(set(routes), key=lambda r: (r.path, r.method))


def fetch_openapi(url: str, timeout: float = 10.0) -> dict:
    """GET an OpenAPI document (at most 5 MiB).

    Raises:
        ValueError: it did not answer 200 with a JSON object, or is too large.
        httpx.HTTPError: the request failed.
    """
    import httpx

    with httpx.Client(timeout=timeout, follow_redirects=False) as client, client.stream("GET", url) as response:
        if response.status_code != 200:
            raise ValueError(f"GET {url} answered {response.status_code}")
        data = b""
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > 5 << 20:
                raise ValueError(f"GET {url}: the schema is over 5 MiB")
    import json

    schema = json.loads(data)
    if not isinstance(schema, dict):
        raise ValueError(f"GET {url}: not a JSON object")
    return schema


def routes_from_code(code_dir: Path, files: list[str]) -> list[Route]:
    """Routes declared in the code: FastAPI/Flask/Starlette decorators, Express-style `app.get('/x', ...)`."""
    routes: set[Route] = set()
    for relative in files:
        if is_test_path(relative) or not relative.endswith((".py", ".js", ".mjs", ".cjs", ".ts")):
            continue
        try:
            lines = (code_dir / relative).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for number, line in enumerate(lines, 1):
            head = line.strip()[:_MAX_LINE]
            where = f"{relative}:{number}"
            if match := _DECORATOR.search(head):
                kind, path, rest = match.groups()
                if kind in ("route", "api_route"):
                    listed = _FLASK_METHODS.search(rest)
                    methods = re.findall(r"\w+", listed.group(1)) if listed else ["GET"]
                else:
                    methods = [kind]
                routes |= {Route(m.upper(), path, where) for m in methods}
            elif match := _EXPRESS.search(head):
                routes.add(Route(match.group(1).upper(), match.group(2), where))
    return sorted(routes, key=lambda r: (r.path, r.method, r.source))


def html_files(files: list[str]) -> list[str]:
    """The HTML files (templates and static pages) among the scanned files, outside tests."""
    return [f for f in files if f.endswith((".html", ".htm")) and not is_test_path(f)]
