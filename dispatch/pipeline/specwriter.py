"""L1 writes specs from its scan: one per coherent batch of gaps, in the seed format.

A batch is up to `BATCH_FILES` files of one top-level folder, in path order. Each spec (`S<nn>-<slug>.md`) has
`modifies` = its files, `depends_on` the batches whose files its files import (Python imports, JS relative
imports; never a cycle), `model` = the `implement` models and `verify` = the `verify` models of pipeline.yaml,
and the sections an agent acts on: goal, findings, concrete changes, constraints, acceptance criteria (runnable
commands: compile, grep that the markers are gone, the project's test command in the workspace venv), do not do.

Files whose names cannot be quoted plainly in a spec (spaces, quotes, backticks, `$`) are left out and named.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dispatch.pipeline.analyze import Finding
from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.generated import slug
from dispatch.pipeline.workspace import in_venv

BATCH_FILES, MAX_SPECS, MAX_LISTED = 3, 50, 40
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9_./@+-]*$")
_JS_IMPORT = re.compile(r"""(?:\bfrom\s+|\brequire\(\s*|\bimport\s+)["'](\.{1,2}/[^"']+)["']""")
_JS_EXTENSIONS = ("", ".js", ".mjs", ".ts", ".jsx", ".tsx", "/index.js", "/index.ts")
_CHANGE = {
    "todo": "do what the marker asks, for real, and remove the marker",
    "placeholder": "replace the placeholder text with the real content or behaviour",
    "mock-data": "replace the mock/fake data with its real source (the database, the API or configuration)",
    "not-implemented": "implement it, with the behaviour its name and callers expect",
    "empty-handler": "give this handler its real behaviour (or remove it if nothing uses it)",
    "hardcoded-url": "read this URL from an environment variable (e.g. APP_URL); no loopback URL stays in the code",
    "secret": "move this secret out of the code: read it from an environment variable, and never print it",
}
_GONE = {  # kind -> an extended regular expression that must no longer match the file
    "todo": r"\b(TODO|FIXME|XXX)\b",
    "not-implemented": r"NotImplemented",
    "hardcoded-url": r"(localhost|127\.0\.0\.1|0\.0\.0\.0):[0-9]+",
}


@dataclass
class DraftSpec:
    """A spec L1 will write: its file name, id, files, dependencies and full text."""

    name: str
    task_id: str
    files: list[str]
    findings: list[Finding]
    depends_on: list[str] = field(default_factory=list)
    text: str = ""


def _batches(findings: list[Finding], notes: list[str]) -> list[list[str]]:
    """Files with gaps, grouped by top-level folder and cut into batches of `BATCH_FILES`."""
    groups: dict[str, list[str]] = {}
    for file in dict.fromkeys(f.file for f in findings):
        if not _SAFE_PATH.match(file) or ".." in file.split("/"):
            notes.append(f"{file[:120]!r}: left out: its name cannot be quoted plainly in a spec; rename it")
            continue
        groups.setdefault(file.split("/", 1)[0] if "/" in file else ".", []).append(file)
    batches = [files[i:i + BATCH_FILES] for _, files in sorted(groups.items())
               for i in range(0, len(files), BATCH_FILES)]
    if len(batches) > MAX_SPECS:
        left = sum(len(b) for b in batches[MAX_SPECS:])
        notes.append(f"{left} more file(s) with gaps wait for a later run: at most {MAX_SPECS} specs at a time")
    return batches[:MAX_SPECS]


def _python_imports(code_dir: Path, file: str, known: set[str]) -> set[str]:
    try:
        tree = ast.parse((code_dir / file).read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError, RecursionError):
        return set()
    package = file.split("/")[:-1]
    modules: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            modules += [module] + [module + [alias.name] for alias in node.names]
    found = set()
    for parts in modules:
        for candidate in ("/".join(parts) + ".py", "/".join(parts + ["__init__.py"])):
            if candidate in known:
                found.add(candidate)
    return found


def _js_imports(code_dir: Path, file: str, known: set[str]) -> set[str]:
    try:
        text = (code_dir / file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    found = set()
    for target in _JS_IMPORT.findall(text):
        base = os.path.normpath(os.path.join(os.path.dirname(file), target)).replace(os.sep, "/")
        found |= {base + ext for ext in _JS_EXTENSIONS if base + ext in known}
    return found


def imports(code_dir: Path, file: str, known: set[str]) -> set[str]:
    """The files among `known` that `file` imports (Python imports, JS/TS relative imports)."""
    if file.endswith(".py"):
        return _python_imports(code_dir, file, known) - {file}
    if file.endswith((".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".vue", ".svelte")):
        return _js_imports(code_dir, file, known) - {file}
    return set()


def _dependencies(code_dir: Path, drafts: list[DraftSpec]) -> None:
    """Set `depends_on`: a spec needs the specs whose files its files import, unless that closes a cycle."""
    owner = {file: d.task_id for d in drafts for file in d.files}
    by_id = {d.task_id: d for d in drafts}

    def reaches(start: str, goal: str) -> bool:
        stack, seen = [start], set()
        while stack:
            current = stack.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                stack += by_id[current].depends_on
        return False

    for draft in drafts:
        needed = {owner[f] for file in draft.files for f in imports(code_dir, file, set(owner))} - {draft.task_id}
        for other in sorted(needed):
            if not reaches(other, draft.task_id):
                draft.depends_on.append(other)


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def _render(draft: DraftSpec, config: PipelineConfig) -> str:
    files = draft.files
    kinds = sorted({f.kind for f in draft.findings})
    front: dict = {"task_id": draft.task_id, "modifies": files}
    if draft.depends_on:
        front["depends_on"] = draft.depends_on
    front["priority"] = 1 if {"secret", "not-implemented"} & set(kinds) else 2
    if config.models.implement:
        front["model"] = list(config.models.implement)
    if config.models.verify:
        front["verify"] = list(config.models.verify)
    listed = draft.findings[:MAX_LISTED]
    more = len(draft.findings) - len(listed)
    findings = [f"- {f.file}:{f.line} ({f.kind}) {_code(f.text)}" for f in listed]
    changes = [f"- {f.file} line {f.line}: {_CHANGE[f.kind]}." for f in listed]
    if more:
        findings.append(f"- ... and {more} more in these files: `grep -n` them, or run the pipeline's scan again")
    acceptance = []
    python = [f for f in files if f.endswith(".py")]
    if python:
        acceptance.append(f"- [ ] `python3 -m py_compile {' '.join(python)}`")
    for kind, pattern in _GONE.items():
        marked = sorted({f.file for f in draft.findings if f.kind == kind})
        if marked:
            acceptance.append(f"- [ ] `! grep -nE '{pattern}' {' '.join(marked)}`")
    if config.regression.command and "`" not in config.regression.command:
        # in the workspace venv, with the project's packages: L2 builds it before its specs run
        acceptance.append(f"- [ ] `{in_venv(config.regression.command)}`")
    acceptance.append("- [ ] every finding listed above is resolved in the code, not hidden or renamed")
    needs = f" It builds on the work of {', '.join(draft.depends_on)}." if draft.depends_on else ""
    body = "\n".join([
        "## Goal",
        f"Close the {len(draft.findings)} gap(s) the pipeline's scan found in {', '.join(files)} "
        f"({', '.join(kinds)}), so that this code does its real work: no unfinished markers, no placeholder or "
        f"mock data, no stub handler, and configuration from the environment.{needs}",
        "", "## Findings", *findings,
        "", "## Concrete changes", *changes,
        "", "## Constraints",
        "- Change only the files in `modifies`; keep the public routes, function names and signatures.",
        "- Read configuration (URLs, keys, credentials) from environment variables.",
        "- Keep the existing tests passing; add a test for each handler that gets real behaviour.",
        "", "## Acceptance criteria", *acceptance,
        "", "## Do not do",
        "- Do not delete, skip or weaken tests to make the checks pass.",
        "- Do not print, log or commit secret values.",
        "",
    ])
    return f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n{body}"


def draft_specs(findings: list[Finding], code_dir: Path, config: PipelineConfig) -> tuple[list[DraftSpec], list[str]]:
    """The specs for a scan's findings, and notes on what was left out.

    Args:
        findings: the scan's findings.
        code_dir: the code (read for imports).
        config: the pipeline configuration (models, the regression command).

    Returns:
        (the draft specs in order, notes).
    """
    notes: list[str] = []
    by_file: dict[str, list[Finding]] = {}
    for finding in findings:
        by_file.setdefault(finding.file, []).append(finding)
    drafts = []
    for number, files in enumerate(_batches(findings, notes), 1):
        task_id = f"S{number:02d}-{slug('-'.join(Path(f).stem for f in files), 40)}"
        drafts.append(DraftSpec(f"{task_id}.md", task_id, files, [f for file in files for f in by_file[file]]))
    _dependencies(code_dir, drafts)
    for draft in drafts:
        draft.text = _render(draft, config)
    return drafts, notes
