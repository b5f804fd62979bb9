"""What a pipeline layer returns: PASS, FAIL or NOT RUN, with its reason, its checks, its bugs and evidence.

NOT RUN is never success: a layer that could not do its work (no browser, no agent model, no command
configured) says why, and the pipeline's exit is 1 unless the configuration turned that layer off.
Every result is written as JSON under `DISPATCH_HOME/pipeline/<project>/<run>/<layer>.json`.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

LAYERS = ("L1", "L2", "L3", "L4", "L5", "L6")
TEST_LAYERS = ("L4a", "L4b", "L4c", "L4d")
LAYER_NAMES = {"L1": "analyze", "L2": "implement", "L3": "build", "L4": "test", "L5": "fix", "L6": "deploy",
               "L4a": "api_qa", "L4b": "browser_qa", "L4c": "ui_review", "L4d": "regression"}


def layer_run_name(project: str, layer: str, cycle: int = 0, attempt: int = 1) -> str:
    """The name of a layer's Prefect run, as a person reads it: `shop L4a api_qa`, `shop L3 build cycle 1
    attempt 2`."""
    name = f"{project} {layer} {LAYER_NAMES.get(layer, '')}".rstrip()
    return name + (f" cycle {cycle}" if cycle else "") + (f" attempt {attempt}" if attempt > 1 else "")


class Status(StrEnum):
    """A layer's outcome. Only PASS is success."""

    PASS = "PASS"
    FAIL = "FAIL"
    NOT_RUN = "NOT RUN"


Severity = Literal["S1", "S2", "S3"]
"""S1 critical (security, crash, data loss), S2 broken feature, S3 cosmetic."""


class Bug(BaseModel):
    """One defect found by L4, the input of L5's fix specs."""

    id: str = Field(description="Stable across runs for the same defect: see `Bug.make`.")
    severity: Severity
    layer: str = Field(description="L4a, L4b, L4c or L4d")
    title: str
    where: str = Field(description="the endpoint ('POST /api/cart') or page ('/cart')")
    reproduce: str = Field(description="how to reproduce it: a request, browser steps or a command")
    file: str | None = Field(default=None, description="the source file, relative to the code, when known")
    evidence: str = Field(default="", description="what was seen: status, body excerpt, console error, ...")

    @classmethod
    def make(cls, *, layer: str, where: str, title: str, **fields: Any) -> Bug:
        """A bug whose id is a digest of (layer, where, title), so the same defect keeps its id."""
        digest = hashlib.sha256(f"{layer}\0{where}\0{title}".encode()).hexdigest()[:8]
        return cls(id=f"B{digest}", layer=layer, where=where, title=title, **fields)


class Check(BaseModel):
    """One row of a layer's table artifact: a test case, a page load, a command."""

    name: str
    verdict: Literal["pass", "fail", "skip"]
    detail: str = ""
    duration: float | None = None


class PageCapture(BaseModel):
    """What L4b saw of one page, handed to L4c's review: its HTML and a screenshot per viewport."""

    path: str = Field(description="the page's path, e.g. /cart")
    url: str
    html_file: str | None = Field(default=None, description="the page's HTML as loaded, saved with the run")
    screenshots: dict[str, str] = Field(default_factory=dict, description="viewport ('1920x1080') -> PNG path")
    overflow: bool = Field(default=False, description="horizontal overflow on the mobile viewport")
    load_time_s: float | None = None
    console_errors: list[str] = Field(default_factory=list)


class LayerResult(BaseModel):
    """The result of one layer (or one L4 sub-layer) of one pipeline run."""

    layer: str = Field(description="L1..L6 or L4a..L4d")
    status: Status
    reason: str = Field(description="why, in one line: what passed, what failed, or why it did not run")
    checks: list[Check] = Field(default_factory=list)
    bugs: list[Bug] = Field(default_factory=list)
    evidence: dict[str, Any] = Field(default_factory=dict, description="paths and figures: screenshots, specs")
    children: list[LayerResult] = Field(default_factory=list, description="L4: the results of L4a-d")
    attempts: int = 1
    cycle: int = Field(default=0, description="the L4-L5 cycle this result belongs to (0: before any fix)")
    started_at: float | None = None
    ended_at: float | None = None
    cached: bool = False
    report_path: str = ""

    def __repr__(self) -> str:  # short: Prefect logs the state a run ends in, with its data
        return f"LayerResult({self.layer} {self.status.value}: {self.reason[:200]!r})"

    @property
    def name(self) -> str:
        return LAYER_NAMES.get(self.layer, self.layer)

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at
