"""L5 turns L4's bugs into fix specs: `F<nn>-<slug>.md`, seed format, one per bug.

S1 bugs first (then S2, S3), at most `config.max_fix_specs` a cycle (the rest wait for the next cycle, and the
result says so). `modifies` is the bug's file when L4 knew it (relative, inside the code); a bug with no file
gets `exclusive: true` instead, so it never runs beside another spec it might collide with. The bug's
reproduction and what was seen go into fenced blocks (what the app printed can never become a heading or an
acceptance command of the spec), and become its acceptance criteria: a checkable statement, the project's test
command, and for a regression failure (L4d) whose reproduction is a command, that command. Each spec carries
`bug`, `severity` and `cycle` in its front matter, the `fix` models and the `verify` models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import yaml

from dispatch.pipeline.config import PipelineConfig
from dispatch.pipeline.generated import slug
from dispatch.pipeline.results import LAYER_NAMES, Bug
from dispatch.pipeline.workspace import in_venv

_ORDER = {"S1": 0, "S2": 1, "S3": 2}
_PRIORITY = {"S1": 1, "S2": 2, "S3": 3}
_MEANING = {"S1": "critical: security, crash or data loss", "S2": "a broken feature", "S3": "cosmetic"}
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9_./@+-]*$")
_COMMAND = re.compile(r"^(?:pytest|python3?|npm|npx|node|make|bash|sh|go|cargo|\./)(?:\s|$)")
_REPRODUCE_CAP, _EVIDENCE_CAP = 4_000, 2_000


@dataclass
class FixSpec:
    """A fix spec to write: its file name, id, the bug it fixes and its text."""

    name: str
    task_id: str
    bug: Bug
    text: str


def _fenced(text: str) -> str:
    """`text` in a fenced block that nothing inside it can close."""
    longest = max((len(run) for run in re.findall(r"`{3,}|~{3,}", text)), default=2)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _code(text: str) -> str:
    return "`" + " ".join(text.split()).replace("`", "'")[:200] + "`"


def safe_file(file: str | None) -> str | None:
    """The bug's file when it is a plain relative path inside the code, else None."""
    if not file or not _SAFE_FILE.match(file) or ".." in PurePosixPath(file).parts:
        return None
    return file


def _render(task_id: str, bug: Bug, config: PipelineConfig, cycle: int) -> str:
    file = safe_file(bug.file)
    front: dict = {"task_id": task_id}
    front.update({"modifies": [file]} if file else {"exclusive": True})
    front["priority"] = _PRIORITY[bug.severity]
    if config.models.fix:
        front["model"] = list(config.models.fix)
    if config.models.verify:
        front["verify"] = list(config.models.verify)
    front.update(bug=bug.id, severity=bug.severity, cycle=cycle)
    layer = f"{bug.layer} {LAYER_NAMES.get(bug.layer, '')}".strip()
    where = file or f"the code that serves {_code(bug.where)}"
    acceptance = []
    if file and file.endswith(".py"):
        acceptance.append(f"- [ ] `python3 -m py_compile {file}`")
    reproduce = bug.reproduce.strip()
    # the project's own commands run in the workspace venv L3 made (<code>/.venv, where the app's packages are)
    # when the node has one
    if bug.layer == "L4d" and "\n" not in reproduce and "`" not in reproduce and _COMMAND.match(reproduce):
        acceptance.append(f"- [ ] `{in_venv(reproduce)}`")
    if config.regression.command and "`" not in config.regression.command:
        acceptance.append(f"- [ ] `{in_venv(config.regression.command)}`")
    acceptance.append("- [ ] the reproduction above no longer shows the defect (the pipeline's L4 runs it again "
                      "after this spec)")
    again = (f" This is fix cycle {cycle}: the fix of the previous cycle did not remove the defect, so look "
             "again at its cause." if cycle > 1 else "")
    body = "\n".join([
        "## Goal",
        f"Fix bug {bug.id} ({bug.severity}, {_MEANING[bug.severity]}), found by {layer} at {_code(bug.where)}: "
        f"{_code(bug.title)}.{again}",
        "", "## Reproduce", _fenced(reproduce[:_REPRODUCE_CAP] or "(no reproduction given)"),
        "", "What was seen:", _fenced(bug.evidence[:_EVIDENCE_CAP] or "(nothing recorded)"),
        "", "## Concrete changes",
        f"- Find the cause in {where} and fix it there, for every input of the same kind, not only this one.",
        "- Add or extend a test that reproduces the defect and passes with the fix.",
        "", "## Constraints",
        "- The app is not running while you work: reason from the code and the reproduction.",
        "- Keep the public routes, pages and function signatures unless the bug is in them.",
        "", "## Acceptance criteria", *acceptance,
        "", "## Do not do",
        "- Do not change or remove the check, test or page that found the bug to make it pass.",
        "- Do not print, log or commit secret values.",
        "",
    ])
    return f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n{body}"


def fix_specs(bugs: list[Bug], config: PipelineConfig, *, cycle: int, first_number: int) -> tuple[list[FixSpec],
                                                                                                  list[str]]:
    """Fix specs for `bugs`, S1 first, at most `config.max_fix_specs`; and notes on what waits or was dropped.

    Args:
        bugs: L4's bugs (duplicates by id count once).
        config: the pipeline configuration (models, the test command, the cap).
        cycle: the L4-L5 cycle (1 for the first fix).
        first_number: the number of the first spec (after the F specs already in the directory).
    """
    unique = list({bug.id: bug for bug in bugs}.values())
    ordered = sorted(unique, key=lambda b: (_ORDER[b.severity], b.layer, b.where, b.id))
    chosen = ordered[:config.max_fix_specs]
    notes = []
    if len(ordered) > len(chosen):
        notes.append(f"{len(ordered) - len(chosen)} bug(s) wait for the next cycle: at most "
                     f"{config.max_fix_specs} fix specs a cycle (max_fix_specs)")
    specs = []
    for number, bug in enumerate(chosen, first_number):
        if bug.file and not safe_file(bug.file):
            notes.append(f"{bug.id}: its file {bug.file[:120]!r} is not a plain path inside the code; the fix "
                         "spec runs exclusive instead")
        task_id = f"F{number:02d}-{slug(bug.title, 40)}"
        specs.append(FixSpec(f"{task_id}.md", task_id, bug, _render(task_id, bug, config, cycle)))
    return specs, notes
