"""Spec quality: a score from 0 to 100 per spec, and the rules it broke.

`dispatch validate <project> --score` prints it; the pipeline's L1 gates the specs it writes with it (a spec
under `thresholds.spec_min_score` stops L2; an average under `thresholds.spec_warn_average` is a warning).
A spec starts at 100 and loses each broken rule's weight. The rules (weights sum to 100):

| rule | weight | broken when |
|---|---|---|
| goal | 15 | no goal section (`## Goal`, `## 目标`, `## Objective`) with at least 3 words |
| acceptance | 20 | no acceptance criteria section with at least one item |
| runnable-acceptance | 10 | it has acceptance items, but none is a runnable command (- [ ] `command`) |
| modifies | 15 | `modifies` is missing, or is the whole repository (`.`, `*`, `**`, `/`, ...) |
| specific | 10 | the goal uses a vague verb ("improve", "clean up", "fix stuff", ...) and names nothing concrete |
| length | 10 | the body has fewer than 30 or more than 3,000 words |
| backend-ui | 10 | every `modifies` entry is backend code, yet the body asks for UI/CSS work (unless `ui: true`) |
| no-hardcoded-urls | 5 | the body names a loopback or IP URL (`localhost:8000`): use an environment variable |
| dependencies | 5 | the body names another spec id (`S01`, `F03-login`) that `depends_on` does not list |

The last three read what the spec asks in its own words: prose outside fenced code, code spans and the
acceptance criteria (quoting code that holds a URL or a colour is no fault). Scoring runs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dispatch.core.specs import Spec, fence_closes

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE_OPEN = re.compile(r"^(`{3,}|~{3,})")
_GOAL = re.compile(r"\b(goal|objective|purpose)s?\b|目标", re.IGNORECASE)
_ACCEPTANCE = re.compile(r"acceptance|验收", re.IGNORECASE)
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(?:\[[ xX]\]\s*)?\S")
_WHOLE_REPO = {".", "./", "*", "**", "**/*", "*/**", "/", "./**", "./*", "**/"}
_VAGUE = re.compile(
    r"\b(improve|enhance|optimi[sz]e|clean(?:\s|-)?up|refactor|polish|tweak|tidy|"
    r"make (?:it|things|everything) better|fix (?:stuff|things|issues|everything|it)|update (?:stuff|things)|"
    r"various|misc(?:ellaneous)?)\b", re.IGNORECASE)
_CONCRETE = re.compile(r"`[^`]+`|\b[\w-]+/[\w./-]+|\b\d+\b|\s/[\w{}-]+"
                       r"|\b[\w-]+\.(?:py|js|ts|tsx|jsx|html|css|json|ya?ml|toml|md|sql|go|rs)\b")
_BACKEND = (".py", ".pyi", ".go", ".rb", ".java", ".kt", ".rs", ".php", ".sql", ".ex", ".exs", ".cs", ".scala")
_UI_WORDS = re.compile(
    r"\.s?css\b|\bs?css\b|\bstylesheets?\b|\bfont(?:s|-size|-family)?\b|\bcolou?rs?\b|\bmargins?\b|\bpadding\b|"
    r"\bflexbox\b|\btailwind\b|\bresponsive\b|\bdark mode\b|\bUI\b|\bbuttons?\b")
_URL = re.compile(r"\b(?:https?://)?(?:localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|0\.0\.0\.0|\d{1,3}(?:\.\d{1,3}){3})"
                  r":\d{2,5}\b|\bhttps?://(?:localhost|\d{1,3}(?:\.\d{1,3}){3})\b")
# spec ids as people write them (S01, F12-login); a bare S1-S3 is a bug severity, not a spec
_SPEC_ID = re.compile(r"(?<![\w/.-])([SPF](?:\d{2,4}|\d(?=-\w)))(?:-[\w-]+)?\b")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
MIN_WORDS, MAX_WORDS, GOAL_MIN_WORDS = 30, 3000, 3


@dataclass(frozen=True)
class Rule:
    """One quality rule: its name, its weight (points lost when broken) and what it asks for."""

    name: str
    weight: int
    asks: str


RULES: tuple[Rule, ...] = (
    Rule("goal", 15, "a goal section saying what the change achieves"),
    Rule("acceptance", 20, "an acceptance criteria section with at least one item"),
    Rule("runnable-acceptance", 10, "acceptance criteria as runnable commands (- [ ] `command`)"),
    Rule("modifies", 15, "modifies: the files the spec changes, not the whole repository"),
    Rule("specific", 10, "a concrete goal, not a vague verb alone"),
    Rule("length", 10, f"a body of {MIN_WORDS}-{MAX_WORDS:,} words"),
    Rule("backend-ui", 10, "no UI/CSS work in a backend spec unless asked (ui: true)"),
    Rule("no-hardcoded-urls", 5, "environment variables instead of hard-coded URLs"),
    Rule("dependencies", 5, "every spec it needs named in depends_on"),
)
WEIGHTS = {rule.name: rule.weight for rule in RULES}


@dataclass
class Broken:
    """A rule a spec broke: its name, the points it cost, and what to do about it."""

    rule: str
    weight: int
    message: str


@dataclass
class SpecScore:
    """A spec's score (0-100) and the rules it broke."""

    task_id: str
    path: str
    score: int
    broken: list[Broken] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"task_id": self.task_id, "file": self.path, "score": self.score,
                "broken": [{"rule": b.rule, "weight": b.weight, "message": b.message} for b in self.broken]}


@dataclass
class _Section:
    title: str
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _sections(body: str) -> tuple[list[_Section], list[str]]:
    """The body's sections by heading (headings inside fenced code are text), and its lines outside code."""
    sections: list[_Section] = [_Section("", [])]
    prose: list[str] = []
    fence: str | None = None
    for line in body.splitlines():
        stripped = line.lstrip()
        if fence is not None:
            if fence_closes(stripped, fence):
                fence = None
            sections[-1].lines.append(line)
            continue
        if opened := _FENCE_OPEN.match(stripped):
            fence = opened.group(1)
            sections[-1].lines.append(line)
            continue
        heading = _HEADING.match(line)
        if heading:
            sections.append(_Section(heading.group(2), []))
            continue
        sections[-1].lines.append(line)
        prose.append(line)
    return sections, prose


def _words(text: str) -> int:
    return len(text.split())


def _check(spec: Spec) -> list[Broken]:
    sections, prose = _sections(spec.body)
    broken: list[Broken] = []

    def broke(rule: str, message: str) -> None:
        broken.append(Broken(rule, WEIGHTS[rule], message))

    goal = next((s for s in sections if _GOAL.search(s.title)), None)
    if goal is None or _words(goal.text) < GOAL_MIN_WORDS:
        broke("goal", "no goal section: add '## Goal' with a sentence or two on what the change achieves"
              if goal is None else f"the goal section has {_words(goal.text)} word(s): say what the change achieves")

    acceptance = [s for s in sections if _ACCEPTANCE.search(s.title)]
    items = [line for s in acceptance for line in s.lines if _ITEM.match(line)]
    if not items:
        broke("acceptance", "no acceptance criteria: add '## Acceptance criteria' with checkable items "
              "(- [ ] `pytest -q tests/test_x.py`)")
    elif not spec.acceptance:
        broke("runnable-acceptance", "no acceptance item is a runnable command: write each check as "
              "- [ ] `command` (it runs in the code directory after the agent; exit 0 passes)")

    whole = [entry for entry in spec.modifies if entry.strip() in _WHOLE_REPO]
    if not spec.modifies:
        broke("modifies", "modifies is missing: list the files (or directories, globs) the spec changes; "
              "they are its file locks")
    elif whole:
        broke("modifies", f"modifies {whole[0]!r} is the whole repository: name the files the spec changes, "
              "so other specs can run beside it")

    goal_text = goal.text if goal is not None else " ".join(" ".join(prose).split()[:60])
    vague = _VAGUE.search(goal_text)
    if vague and not _CONCRETE.search(goal_text):
        broke("specific", f"the goal says {vague.group(0)!r} and names nothing concrete: say which file, "
              "function, endpoint or behaviour changes, and how")

    words = _words(spec.body)
    if not MIN_WORDS <= words <= MAX_WORDS:
        broke("length", f"the body has {words:,} words; an agent acts best on {MIN_WORDS}-{MAX_WORDS:,}: "
              + ("add the goal, the changes and the acceptance criteria" if words < MIN_WORDS
                 else "split the spec into smaller ones"))

    # what the spec asks, in its own words: prose outside code blocks, code spans and the acceptance criteria
    asks = [_CODE_SPAN.sub("", line) for s in sections if not _ACCEPTANCE.search(s.title)
            for line in s.lines if line in prose]
    backend = bool(spec.modifies) and all(e.strip().endswith(_BACKEND) for e in spec.modifies)
    if backend and spec.extra.get("ui") is not True:
        asked = _UI_WORDS.search(" ".join(asks))
        if asked:
            broke("backend-ui", f"a backend spec (modifies {', '.join(spec.modifies[:3])}) asks for UI/CSS work "
                  f"({asked.group(0)!r}): move it to a frontend spec, or set ui: true if it is meant")

    for number, line in enumerate(asks, 1):
        url = _URL.search(line)
        if url:
            broke("no-hardcoded-urls", f"hard-coded URL {url.group(0)!r} (body line {number}): name an "
                  "environment variable instead (e.g. $APP_URL), so the spec works on any node and port")
            break

    own = spec.task_id.split("-", 1)[0]
    mentioned = {m.group(1) for m in _SPEC_ID.finditer(" ".join(asks))} - {own}
    listed = {dep.split("-", 1)[0] for dep in spec.depends_on}
    missing = sorted(mentioned - listed)
    if missing:
        broke("dependencies", f"the body names {', '.join(missing)} but depends_on does not: add "
              f"{missing[0]} to depends_on if this spec needs its work")
    return broken


def score_spec(spec: Spec) -> SpecScore:
    """Score one parsed spec.

    Examples:
        >>> from pathlib import Path
        >>> score_spec(Spec(task_id="S01", path=Path("S01.md"), body="Improve things.")).score
        30
    """
    broken = _check(spec)
    return SpecScore(spec.task_id, str(spec.path), max(0, 100 - sum(b.weight for b in broken)), broken)


def average(scores: list[SpecScore]) -> float:
    """The mean score (100.0 for no specs: nothing to fault)."""
    return sum(s.score for s in scores) / len(scores) if scores else 100.0
