"""L4a API QA: every endpoint (from the app's OpenAPI schema or the config) gets its normal case and the
hostile cases of PIPELINE.md, over real HTTP; then the configured API flows, step by step.

A case fails on a 5xx, a timeout (2 s), a payload echoed back unescaped in HTML, a SQL error or a file's
content in the answer, or (for an endpoint that declares security) a 2xx without a valid token. SQL
injection, traversal, echo and auth failures are S1; a 5xx or a timeout is S2. Requests go only to the app:
a path from the schema or the config must be a plain absolute path, and redirects are not followed.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from dispatch.pipeline.results import Bug, Check

TIMEOUT = 2.0
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
SQLI = "' OR '1'='1'; DROP TABLE users; --"
XSS = "<script>alert('dispatch-xss')</script>"
TRAVERSAL = "../../etc/passwd"
_SQL_ERRORS = re.compile(r"syntax error|SQLSTATE|sqlite3\.|psycopg|ORA-\d{5}|error in your SQL syntax|"
                         r"unterminated quoted string|OperationalError", re.IGNORECASE)
_MAX_ENDPOINTS = 200
_MAX_SCHEMA_BYTES = 5 * 1024 * 1024
_STEP = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS)\s+(/\S*)(?:\s+(.*?))?(?:\s*->\s*(\d{3}))?\s*$")


@dataclass
class Endpoint:
    """One operation: method, path template, its parameters and body schema."""

    method: str
    path: str
    params: list[dict] = field(default_factory=list)
    body: dict | None = None
    secured: bool = False

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Outcome:
    """What one request (or a batch of them) got."""

    status: int | None
    seconds: float
    body: str = ""
    content_type: str = ""
    error: str = ""


def safe_path(path: str) -> str:
    """`path` when it is a plain absolute path on the app (no scheme, no `//host`), else ValueError."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path or any(c in path for c in "\r\n\0 "):
        raise ValueError(f"{path[:120]!r} is not a path on the app")
    return path


def _resolve(schema: Any, spec: dict, depth: int = 0) -> Any:
    if depth > 20 or not isinstance(schema, dict):
        return schema if isinstance(schema, dict) else {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = spec
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return _resolve(node, spec, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key, []) if isinstance(o, dict) and o.get("type") != "null"]
        if options:
            return _resolve(options[0], spec, depth + 1)
    return schema


def sample(schema: Any, spec: dict, text: str | None = None, depth: int = 0) -> Any:
    """A value that fits `schema`; `text` (a hostile string) goes into every string field."""
    schema = _resolve(schema, spec)
    if depth > 8:
        return None
    for key in ("example", "default"):
        if key in schema and text is None:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type") or ("object" if "properties" in schema else "string")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: sample(sub, spec, text, depth + 1) for name, sub in list(properties.items())[:50]}
    if kind == "array":
        return [sample(schema.get("items", {}), spec, text, depth + 1)]
    return {"integer": 1, "number": 1.0, "boolean": True}.get(kind, text if text is not None else "test")


def endpoints_from_openapi(spec: dict) -> list[Endpoint]:
    """The operations of an OpenAPI 3 document (at most 200), with their parameters and JSON body."""
    found: list[Endpoint] = []
    global_security = bool(spec.get("security"))
    for path, operations in (spec.get("paths") or {}).items():
        if not isinstance(operations, dict):
            continue
        try:
            safe_path(path)
        except ValueError:
            continue
        shared = operations.get("parameters", [])
        for method, operation in operations.items():
            if method.upper() not in METHODS or not isinstance(operation, dict):
                continue
            params = [_resolve(p, spec) for p in shared + operation.get("parameters", [])]
            content = ((_resolve(operation.get("requestBody", {}), spec)).get("content") or {})
            body = content.get("application/json", {}).get("schema") if content else None
            secured = bool(operation.get("security", global_security and [1]))
            found.append(Endpoint(method.upper(), path, [p for p in params if isinstance(p, dict)],
                                  _resolve(body, spec) if body is not None else None, secured))
            if len(found) >= _MAX_ENDPOINTS:
                return found
    return found


def endpoints_from_config(lines: list[str]) -> list[Endpoint]:
    """`["GET /api/items", "POST /api/cart"]` as endpoints (a POST/PUT/PATCH takes a JSON object)."""
    found = []
    for line in lines[:_MAX_ENDPOINTS]:
        method, _, path = line.strip().partition(" ")
        if method.upper() not in METHODS:
            raise ValueError(f"api.endpoints: {line[:80]!r} must be 'METHOD /path'")
        safe_path(path.strip())
        body = {"type": "object"} if method.upper() in ("POST", "PUT", "PATCH") else None
        found.append(Endpoint(method.upper(), path.strip(), [], body))
    return found


def load_schema(client: httpx.Client, path: str) -> dict:
    """The app's OpenAPI document at `path` (at most 5 MiB)."""
    response = client.get(safe_path(path), timeout=10.0)
    response.raise_for_status()
    if len(response.content) > _MAX_SCHEMA_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_SCHEMA_BYTES // (1 << 20)} MiB")
    document = response.json()
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a JSON object")
    return document


def request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Outcome:
    """One request with the 2 s timeout; the body is kept up to 64 KiB."""
    started = time.monotonic()
    for attempt in (1, 2):
        try:
            response = client.request(method, path, timeout=TIMEOUT, **kwargs)
            break
        except httpx.TimeoutException:
            return Outcome(None, time.monotonic() - started, error=f"no answer within {TIMEOUT:.0f}s")
        except httpx.TransportError as exc:
            # A server may close a kept-alive connection after refusing a large body unread: the next request
            # on it is reset. Once more on a fresh connection tells that from an app that really drops it.
            if attempt == 2:
                return Outcome(None, time.monotonic() - started, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    return Outcome(response.status_code, time.monotonic() - started, response.text[:65536],
                   response.headers.get("content-type", ""))


class Runner:
    """Runs the cases against one app and collects rows and bugs.

    Args:
        client: an `httpx.Client` whose `base_url` is the app.
        spec: the OpenAPI document (for `$ref`s), or {}.
    """

    def __init__(self, client: httpx.Client, spec: dict) -> None:
        self.client, self.spec = client, spec
        self.checks: list[Check] = []
        self.bugs: list[Bug] = []
        self.declared: dict[str, set[str]] = {}

    def _url(self, endpoint: Endpoint, path_value: str | None = None) -> tuple[str, dict]:
        """The path with its parameters filled in (with `path_value` when given) and the query's samples."""
        path, query = endpoint.path, {}
        for param in endpoint.params:
            where, name = param.get("in"), str(param.get("name", ""))
            value = sample(param.get("schema", {}), self.spec)
            if where == "path":
                path = path.replace("{" + name + "}", quote(str(value if path_value is None else path_value), safe=""))
            elif where == "query":
                query[name] = value
        return path, query

    def _string_query(self, endpoint: Endpoint) -> list[str]:
        return [str(p["name"]) for p in endpoint.params if p.get("in") == "query"
                and _resolve(p.get("schema", {}), self.spec).get("type", "string") == "string"]

    def record(self, endpoint: Endpoint, case: str, outcome: Outcome, *, payload: str | None = None,
               expect_refusal: bool = False, reproduce: str = "", severity: str = "S2") -> None:
        """Judge one case's outcome; a failure becomes a row and a bug."""
        problem, sev = None, severity
        if outcome.status is None:
            problem = outcome.error
        elif outcome.status >= 500:
            problem = f"answered {outcome.status}"
        elif payload == XSS and XSS in outcome.body and ("html" in outcome.content_type or not outcome.content_type):
            problem, sev = "echoed the payload back unescaped in HTML", "S1"
        elif payload == SQLI and _SQL_ERRORS.search(outcome.body):
            problem, sev = "leaked a SQL error", "S1"
        elif payload == TRAVERSAL and "root:x:0:0" in outcome.body:
            problem, sev = "served /etc/passwd", "S1"
        elif expect_refusal and outcome.status < 400:
            problem, sev = f"answered {outcome.status} without a valid token", "S1"
        verdict = "fail" if problem else "pass"
        detail = f"{outcome.status or '-'} {problem or ''}".strip()
        self.checks.append(Check(name=f"{endpoint.name} | {case}", verdict=verdict, detail=detail,
                                 duration=round(outcome.seconds, 3)))
        if problem:
            if case in ("sql injection in query", "sql injection in body", "path traversal in path",
                        "path traversal in query"):
                sev = "S1"
            self.bugs.append(Bug.make(layer="L4a", where=endpoint.name, title=f"{case}: {problem}", severity=sev,
                                      reproduce=reproduce or f"{endpoint.method} {endpoint.path} ({case})",
                                      evidence=f"HTTP {outcome.status}: {outcome.body[:300]}" if outcome.status
                                      else outcome.error))

    def endpoint_cases(self, endpoint: Endpoint) -> None:
        """The normal case and every hostile case that applies to `endpoint`."""
        method = endpoint.method
        path, query = self._url(endpoint)
        normal_body = sample(endpoint.body, self.spec) if endpoint.body is not None else None
        send = {"json": normal_body} if endpoint.body is not None else {}

        def case(name: str, *, payload: str | None = None, refusal: bool = False, **kwargs: Any) -> None:
            target, verb = kwargs.pop("path", path), kwargs.pop("method", method)
            outcome = request(self.client, verb, target, **kwargs)
            shown = json.dumps(kwargs["json"]) if "json" in kwargs else repr(kwargs.get("content", b"")[:80])
            self.record(endpoint, name, outcome, payload=payload, expect_refusal=refusal,
                        reproduce=f"{verb} {target} params={kwargs.get('params')} body={shown[:200]}")

        case("normal", params=query, **send)
        case("bad auth token", params=query, headers={"Authorization": "Bearer dispatch-invalid-token"},
             refusal=endpoint.secured, **send)
        if endpoint.secured:
            case("missing auth token", params=query, refusal=True, **send)
        declared = self.declared.get(endpoint.path, {method})
        other = next((m for m in ("PUT", "PATCH", "POST", "GET") if m not in declared), None)
        if other:  # never an undeclared DELETE: it could destroy what the other cases rely on
            case(f"unexpected method {other}", method=other, params=query)
        strings = self._string_query(endpoint)
        for label, value in (("sql injection", SQLI), ("script payload", XSS), ("path traversal", TRAVERSAL)):
            if strings:
                case(f"{label} in query", payload=value, params={**query, **dict.fromkeys(strings, value)}, **send)
        if any(p.get("in") == "path" for p in endpoint.params):
            hostile_path, _ = self._url(endpoint, path_value=TRAVERSAL)
            case("path traversal in path", payload=TRAVERSAL, path=hostile_path, params=query, **send)
        if endpoint.body is not None:
            headers = {"Content-Type": "application/json"}
            case("empty body", params=query, content=b"", headers=headers)
            case("1 MB body", params=query, content=json.dumps({"data": "x" * (1 << 20)}).encode(),
                 headers={**headers, "Connection": "close"})
            case("null body", params=query, content=b"null", headers=headers)
            case("wrong content type", params=query, content=json.dumps(normal_body).encode(),
                 headers={"Content-Type": "text/plain"})
            for label, value in (("sql injection", SQLI), ("script payload", XSS)):
                case(f"{label} in body", payload=value, params=query, json=sample(endpoint.body, self.spec, value))
        self._concurrent(endpoint, path, query, send)

    def _concurrent(self, endpoint: Endpoint, path: str, query: dict, send: dict) -> None:
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(lambda _: request(self.client, endpoint.method, path, params=query, **send),
                                     range(5)))
        worst = next((o for o in outcomes if o.status is None or o.status >= 500), outcomes[0])
        worst.seconds = time.monotonic() - started
        self.record(endpoint, "5 concurrent requests", worst, reproduce=f"5 x {endpoint.method} {path} at once")

    def flow(self, name: str, steps: list[str]) -> None:
        """Run one configured API flow; its first failing step is a row and a bug (the flow stops there)."""
        for number, step in enumerate(steps, 1):
            matched = _STEP.match(step.strip())
            where = f"flow {name} step {number}"
            if not matched:
                self.checks.append(Check(name=where, verdict="fail", detail=f"cannot read step {step[:80]!r}: "
                                         "write 'METHOD /path [json] [-> status]'"))
                return
            method, path, body_text, expected = matched.groups()
            kwargs: dict[str, Any] = {}
            if body_text:
                try:
                    kwargs["json"] = json.loads(body_text)
                except json.JSONDecodeError:
                    self.checks.append(Check(name=where, verdict="fail", detail=f"step body is not JSON: {step[:80]}"))
                    return
            outcome = request(self.client, method, path, **kwargs)
            wanted = int(expected) if expected else None
            ok = outcome.status is not None and (outcome.status == wanted if wanted else outcome.status < 400)
            detail = f"{step}: got {outcome.status or outcome.error}"
            self.checks.append(Check(name=where, verdict="pass" if ok else "fail", detail=detail,
                                     duration=round(outcome.seconds, 3)))
            if not ok:
                self.bugs.append(Bug.make(layer="L4a", where=f"{method} {path}", title=f"flow {name}: step {number} "
                                          f"expected {wanted or '< 400'}", severity="S2", reproduce=" ; ".join(steps),
                                          evidence=f"got {outcome.status or outcome.error}: {outcome.body[:300]}"))
                return


def run_api_qa(base_url: str, *, openapi: str | None, endpoints: list[str],
               flows: list[tuple[str, list[str]]]) -> tuple[list[Check], list[Bug], str]:
    """Every case of every endpoint, and the flows (first: the hostile cases must not break them).

    Args:
        base_url: the app, e.g. `http://127.0.0.1:43121`.
        openapi: the schema's path on the app (used when `endpoints` is empty).
        endpoints: explicit `"METHOD /path"` lines.
        flows: (name, steps) of the configured API flows.

    Returns:
        The rows, the bugs and a note on where the endpoints came from.

    Raises:
        ValueError: no endpoint could be found (no schema, a bad line).
    """
    with httpx.Client(base_url=base_url, follow_redirects=False, trust_env=False) as client:
        spec: dict = {}
        if endpoints:
            found, source = endpoints_from_config(endpoints), "api.endpoints"
        elif openapi:
            try:
                spec = load_schema(client, openapi)
            except (httpx.HTTPError, ValueError) as exc:
                raise ValueError(f"cannot read the OpenAPI schema at {openapi}: {str(exc)[:200]}; set "
                                 "api.openapi to its path or list api.endpoints") from exc
            found, source = endpoints_from_openapi(spec), f"OpenAPI {openapi}"
        else:
            raise ValueError("no endpoints: set api.openapi or api.endpoints in pipeline.yaml")
        runner = Runner(client, spec)
        for endpoint in found:
            runner.declared.setdefault(endpoint.path, set()).add(endpoint.method)
        for name, steps in flows:
            runner.flow(name, steps)
        for endpoint in found:
            runner.endpoint_cases(endpoint)
    return runner.checks, runner.bugs, f"{len(found)} endpoints from {source}"
