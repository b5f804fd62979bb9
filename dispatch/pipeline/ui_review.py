"""L4c's review of one page: the question a `review` model gets, and the strict reading of its answer.

The model sees the page's screenshots (their paths: agent CLIs open images) and its HTML, and ends its answer
with one line (the last `UI-REVIEW:` line of its final message counts):

    UI-REVIEW: {"visual": {"score": 21, "reason": "..."}, "layout": {...}, "readability": {...}, "finish": {...}}

Exactly those four keys; each a `score` (a whole number 0-25) and a non-empty `reason`; nothing else. Anything
else is no review (the next model is asked). Horizontal overflow on the mobile viewport (found by L4b) costs
`OVERFLOW_PENALTY` layout points. A page's score is the sum (0-100).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dispatch.pipeline.results import Bug, PageCapture

ASPECTS = ("visual", "layout", "readability", "finish")
PREFIX = "UI-REVIEW:"
OVERFLOW_PENALTY = 10
_HTML_CAP, _REASON_CAP = 30_000, 1_000
_ASKS = {
    "visual": "colours, contrast, imagery, visual hierarchy",
    "layout": "alignment, spacing, grid, how it holds at 1920x1080 and at 375x812 (mobile)",
    "readability": "type sizes, line length, wording, contrast of text",
    "finish": "professional finish: no placeholder text, broken images, debug output or rough edges",
}


class ReviewError(ValueError):
    """The answer holds no valid UI-REVIEW line; the message says what is wrong with it."""


@dataclass
class PageScore:
    """A page's reviewed score: points and reason per aspect (after the overflow penalty), and the total."""

    path: str
    model: str
    aspects: dict[str, dict]

    @property
    def total(self) -> int:
        return sum(int(a["score"]) for a in self.aspects.values())

    def detail(self) -> str:
        return f"score {self.total} by {self.model}: " + "; ".join(
            f"{name} {a['score']} ({a['reason']})" for name, a in self.aspects.items())


def inside(path: str | None, root: Path) -> Path | None:
    """`path` (relative ones under `root`) when it is a file inside `root`, else None."""
    if not path:
        return None
    candidate = (root / path).resolve()
    return candidate if candidate.is_relative_to(root.resolve()) and candidate.is_file() else None


def review_prompt(page: PageCapture, run_dir: Path) -> str:
    """The question for one page: what to score, the screenshots, what the browser saw, the HTML."""
    shots = [f"- {size}: {shot}" for size, p in sorted(page.screenshots.items()) if (shot := inside(p, run_dir))]
    html_file = inside(page.html_file, run_dir)
    html = html_file.read_text(encoding="utf-8", errors="replace")[:_HTML_CAP] if html_file else ""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", html)), default=0) + 1)
    asks = "\n".join(f"- {name} (0-25): {what}" for name, what in _ASKS.items())
    errors = "; ".join(e[:200] for e in page.console_errors[:5]) or "none"
    load = f"{page.load_time_s:.2f} s" if page.load_time_s is not None else "unknown"
    example = json.dumps({name: {"score": 20, "reason": "one sentence"} for name in ASPECTS})
    return (
        f"# UI review of {page.path}\n\nYou review one page of a web app ({page.url}) before a release. Open the "
        "screenshots (PNG files) and read the HTML below; do not modify any file. Score each aspect from 0 to 25 "
        f"points with a one-sentence reason:\n\n{asks}\n\nEnd your answer with exactly one line, this JSON with "
        f"your scores and reasons:\n\n{PREFIX} {example}\n\n"
        "## Screenshots\n\n" + ("\n".join(shots) or "- (none were taken)") + "\n\n"
        "## What the browser saw\n\n"
        f"- horizontal overflow on the 375x812 viewport: {'yes' if page.overflow else 'no'}\n"
        f"- JavaScript console errors: {errors}\n"
        f"- load time: {load}\n\n"
        f"## HTML\n\n{fence}html\n{html or '(not saved)'}\n{fence}\n")


def parse_review(answer: str) -> dict[str, dict]:
    """The four aspects of the answer's last `UI-REVIEW:` line.

    Raises:
        ReviewError: no such line, not JSON, other keys, a score outside 0-25 or not whole, an empty reason.
    """
    lines = [line.strip() for line in answer.splitlines() if line.strip().startswith(PREFIX)]
    if not lines:
        raise ReviewError(f"no line starting {PREFIX!r} in the answer")
    try:
        data = json.loads(lines[-1][len(PREFIX):])
    except ValueError as exc:
        raise ReviewError(f"the {PREFIX} line is not JSON ({exc})") from None
    if not isinstance(data, dict) or set(data) != set(ASPECTS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ReviewError(f"the {PREFIX} JSON must have exactly the keys {', '.join(ASPECTS)}; got {keys}")
    aspects = {}
    for name in ASPECTS:
        item = data[name]
        if not isinstance(item, dict) or set(item) != {"score", "reason"}:
            raise ReviewError(f"{name} must be {{\"score\": 0-25, \"reason\": \"...\"}}, got {str(item)[:100]}")
        score, reason = item["score"], item["reason"]
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 25:
            raise ReviewError(f"{name}.score must be a whole number from 0 to 25, got {score!r}")
        if not isinstance(reason, str) or not reason.strip():
            raise ReviewError(f"{name}.reason must be a non-empty sentence")
        aspects[name] = {"score": score, "reason": reason.strip()[:_REASON_CAP]}
    return aspects


def page_score(page: PageCapture, model: str, aspects: dict[str, dict]) -> PageScore:
    """The page's score from the model's aspects, with L4b's overflow counted against the layout."""
    aspects = {name: dict(value) for name, value in aspects.items()}
    if page.overflow:
        layout = aspects["layout"]
        layout["score"] = max(0, layout["score"] - OVERFLOW_PENALTY)
        layout["reason"] += f" (-{OVERFLOW_PENALTY}: horizontal overflow at 375x812, found by L4b)"
    return PageScore(page.path, model, aspects)


def ui_bug(page: PageCapture, score: PageScore, minimum: float) -> Bug:
    """An S3 (cosmetic) bug for a page under the minimum score, with the reviewer's reasons as evidence."""
    return Bug.make(layer="L4c", where=page.path, title=f"UI review score under {minimum:g}", severity="S3",
                    reproduce=f"open {page.url} at 1920x1080 and at 375x812 and look at it as a visitor would",
                    evidence=score.detail())
