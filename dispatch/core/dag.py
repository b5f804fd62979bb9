"""A project's spec DAG: load every spec, check it whole, and order the work.

`load_project` is the one entry point: it parses all specs of a project, resolves `depends_on`
(full ids or unique prefixes), and reports every error at once (unknown dependency, cycle,
duplicate id, ids differing only in case, a project name that is no name, unreadable file, bad YAML,
wrong type, empty body, a context file linked out of the directory). An invalid project raises
`ProjectInvalid` and nothing of it may be scheduled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.core.errors import ProjectInvalid, SpecError, cut
from dispatch.core.paths import NAME_RULE, name_problem
from dispatch.core.specs import Spec, context_files, context_problem, parse_spec, spec_files


@dataclass
class Project:
    """A validated project: its specs by id, in a dependency-respecting order.

    Attributes:
        name: the project name (the directory name under `DISPATCH_SPECS`).
        specs_dir: the directory holding the specs.
        specs: specs by id; every `depends_on` holds full ids after validation.
        order: ids in topological order (dependencies first).
        context: markdown files handed to agents as context.
    """

    name: str
    specs_dir: Path
    specs: dict[str, Spec]
    order: list[str]
    context: list[Path] = field(default_factory=list)

    def dependents(self) -> dict[str, list[str]]:
        """For each id, the ids that depend on it directly."""
        result: dict[str, list[str]] = {task_id: [] for task_id in self.specs}
        for spec in self.specs.values():
            for dep in spec.depends_on:
                result[dep].append(spec.task_id)
        return result

    def critical_path(self, weights: dict[str, float] | None = None) -> dict[str, float]:
        """Length of the longest chain from each spec to the end of the DAG (inclusive).

        Args:
            weights: expected duration per id; 1.0 for any id not given.
        """
        weights = weights or {}
        dependents = self.dependents()
        length: dict[str, float] = {}
        for task_id in reversed(self.order):
            tail = max((length[d] for d in dependents[task_id]), default=0.0)
            length[task_id] = weights.get(task_id, 1.0) + tail
        return length

    def cache_keys(self, revision: str = "") -> dict[str, str]:
        """A key per spec from its content, its dependencies' keys and the project revision.

        An edited spec changes its key and, through them, its dependents' keys.
        """
        keys: dict[str, str] = {}
        for task_id in self.order:
            spec = self.specs[task_id]
            digest = hashlib.sha256()
            for part in (self.name, task_id, spec.content_hash, revision, *(keys[d] for d in spec.depends_on)):
                digest.update(part.encode())
                digest.update(b"\0")
            keys[task_id] = f"{self.name}--{task_id}--{digest.hexdigest()[:32]}"
        return keys

    def descendants(self, roots: set[str]) -> set[str]:
        """`roots` and everything that depends on them, transitively."""
        dependents = self.dependents()
        return _closure(roots, lambda task_id: dependents[task_id])

    def ancestors(self, roots: set[str]) -> set[str]:
        """`roots` and everything they depend on, transitively."""
        return _closure(roots, lambda task_id: self.specs[task_id].depends_on)


def _resolve_dependency(entry: str, ids: list[str]) -> tuple[str | None, str]:
    """Resolve a `depends_on` entry to a full id; (None, why) when it cannot."""
    if entry in ids:
        return entry, ""
    candidates = [i for i in ids if i.startswith(entry) and not i[len(entry)].isalnum()]
    if len(candidates) == 1:
        return candidates[0], ""
    if candidates:
        shown = ", ".join(sorted(candidates)[:10]) + (", ..." if len(candidates) > 10 else "")
        return None, f"is ambiguous: {cut(entry)} is a prefix of {shown}; use the full id"
    known = ", ".join(sorted(ids)[:20]) + (", ..." if len(ids) > 20 else "")
    return None, f"names {cut(entry)} but no spec has that id (known: {known})"


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a list of ids (first id repeated at the end), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if color[start] != white:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                color[node] = grey
                path.append(node)
            children = graph[node]
            if index < len(children):
                stack.append((node, index + 1))
                child = children[index]
                if color[child] == grey:
                    return path[path.index(child):] + [child]
                if color[child] == white:
                    stack.append((child, 0))
            else:
                color[node] = black
                path.pop()
    return None


def _topological_order(specs: dict[str, Spec]) -> list[str]:
    remaining = {task_id: len(spec.depends_on) for task_id, spec in specs.items()}
    dependents: dict[str, list[str]] = {task_id: [] for task_id in specs}
    for spec in specs.values():
        for dep in spec.depends_on:
            dependents[dep].append(spec.task_id)
    ready = sorted(task_id for task_id, count in remaining.items() if count == 0)
    order: list[str] = []
    while ready:
        task_id = ready.pop(0)
        order.append(task_id)
        for child in sorted(dependents[task_id]):
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    return order


def load_project(name: str, specs_dir: Path) -> Project:
    """Parse and validate every spec of a project.

    Args:
        name: the project's name.
        specs_dir: its spec directory.

    Returns:
        The validated project.

    Raises:
        ProjectInvalid: with every problem found, each naming its file and field.
    """
    errors: list[SpecError] = []
    if problem := name_problem(name):
        raise ProjectInvalid(name, [SpecError(str(specs_dir), "project", f"name {cut(name)} {problem}; {NAME_RULE}")])
    if not specs_dir.is_dir():
        raise ProjectInvalid(name, [SpecError(str(specs_dir), "project", (
            "no such spec directory; create it, or set DISPATCH_SPECS to the directory that holds "
            f"<project>/S01-....md (tried {specs_dir})"))])
    files = spec_files(specs_dir)
    if not files:
        raise ProjectInvalid(name, [SpecError(str(specs_dir), "project", (
            "holds no spec files; specs are named S<digits>...md, P<digits>...md or F<digits>...md"))])

    specs: dict[str, Spec] = {}
    folded: dict[str, Spec] = {}
    for path in files:
        spec, spec_errors = parse_spec(path)
        errors += spec_errors
        if spec is None:
            continue
        if spec.task_id in specs:
            errors.append(SpecError(str(path), "task_id", (
                f"duplicate id {cut(spec.task_id)}, also used by {specs[spec.task_id].path.name}; "
                "give each spec its own task_id")))
            continue
        if (twin := folded.setdefault(spec.task_id.casefold(), spec)) is not spec:
            errors.append(SpecError(str(path), "task_id", (
                f"id {cut(spec.task_id)} differs only in case from {cut(twin.task_id)} of {twin.path.name}; "
                "ids must differ in more than case (run directories and branches would collide on "
                "case-insensitive file systems)")))
            continue
        if spec.project is not None and spec.project != name:
            errors.append(SpecError(str(path), "project", (
                f"says project {cut(spec.project)} but the file is in project {cut(name)}; "
                "move the file or fix the field")))
        specs[spec.task_id] = spec

    ids = list(specs)
    for spec in specs.values():
        resolved: list[str] = []
        for entry in spec.depends_on:
            full, why = _resolve_dependency(entry, ids)
            if full is None:
                errors.append(SpecError(str(spec.path), "depends_on", why))
            elif full == spec.task_id:
                errors.append(SpecError(str(spec.path), "depends_on", "a spec cannot depend on itself"))
            elif full not in resolved:
                resolved.append(full)
        spec.depends_on = resolved

    context = context_files(specs_dir)
    errors += [problem for path in context if (problem := context_problem(path)) is not None]
    cycle = _find_cycle({task_id: spec.depends_on for task_id, spec in specs.items()})
    if cycle:
        first = specs[cycle[0]]
        errors.append(SpecError(str(first.path), "depends_on", (
            f"dependency cycle: {' -> '.join(cycle)}; remove one of these depends_on entries")))
    if errors:
        raise ProjectInvalid(name, errors)
    return Project(name=name, specs_dir=specs_dir, specs=specs, order=_topological_order(specs), context=context)


def select(project: Project, only: list[str] | None = None, start_from: list[str] | None = None) -> set[str]:
    """The ids to run for `--only` (those specs and what they need) and `--from` (those and dependents).

    Raises:
        ProjectInvalid: when a name matches no spec.
    """
    ids = list(project.specs)

    def resolve(entries: list[str], option: str) -> set[str]:
        found: set[str] = set()
        problems: list[SpecError] = []
        for entry in entries:
            full, why = _resolve_dependency(entry, ids)
            if full is None:
                problems.append(SpecError(str(project.specs_dir), option, why))
            else:
                found.add(full)
        if problems:
            raise ProjectInvalid(project.name, problems)
        return found

    chosen = set(ids)
    if only:
        chosen &= project.ancestors(resolve(only, "--only"))
    if start_from:
        chosen &= project.descendants(resolve(start_from, "--from"))
    return chosen


def _closure(roots: set[str], step: Callable[[str], Iterable[str]]) -> set[str]:
    """`roots` and every id reached from them by `step`, transitively."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        task_id = stack.pop()
        if task_id not in seen:
            seen.add(task_id)
            stack.extend(step(task_id))
    return seen
