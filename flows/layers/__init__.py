"""The pipeline's layers, one Prefect subflow each (flows/pipeline.py runs them): analyze (L1), implement
(L2), build (L3), test (L4: api_qa, browser_qa, ui_review, regression), fix (L5), deploy (L6).

The agent layers (L1, L2, L4c, L5) are found by import path, so a build without them reports them NOT RUN
(with the reason) instead of failing to import, and tests may point a path at a stand-in of their own.
"""

from __future__ import annotations

import importlib
from typing import Any

EXTERNAL = {
    "L1": "flows.layers.analyze:analyze",
    "L2": "flows.layers.implement:implement",
    "L4c": "flows.layers.ui_review:ui_review",
    "L5": "flows.layers.fix:fix",
}


def resolve(layer: str) -> tuple[Any | None, str]:
    """The subflow of an agent layer by its import path in `EXTERNAL`.

    Returns:
        (the flow, its path), or (None, why it is unavailable) when its module is not installed.
    """
    path = EXTERNAL[layer]
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None, f"{path} is not part of this installation"
        raise
    return getattr(module, attribute), path
