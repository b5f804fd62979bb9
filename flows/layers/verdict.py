"""A layer's Prefect run ends in the state of its verdict, so the UI tells the truth about it.

The layer flows return a `LayerResult` (a FAIL is a value, not an exception: tests and callers read it
directly). Where the pipeline runs them, `judged` gives each the same flow under a readable run name whose
run ends Completed on PASS, Failed on FAIL and Cancelled named `NotRun` on NOT RUN, with the reason as the
state's message (masked) and the result as its data. The caller asks for the state (`return_state=True`) and reads
the verdict back with `result_of`, so a failed layer never raises into the pipeline: the pipeline decides.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from prefect import Flow
from prefect.exceptions import MissingResult
from prefect.states import Cancelled, Completed, Failed, State

from dispatch.pipeline.masking import pipeline_masker
from dispatch.pipeline.results import LayerResult, Status

NOT_RUN_STATE = "NotRun"
_MESSAGE = 1000  # characters of the reason in a state's message


def verdict_state(value: Any) -> Any:
    """The final state of a run that returned `value`: by its verdict when it is a `LayerResult`, else the
    value itself (Prefect then completes the run with it)."""
    if not isinstance(value, LayerResult):
        return value
    message = pipeline_masker().mask(value.reason[:_MESSAGE])  # the server keeps it: a sink like the reports
    if value.status is Status.FAIL:
        return Failed(message=message, data=value)
    if value.status is Status.NOT_RUN:
        return Cancelled(name=NOT_RUN_STATE, message=message, data=value)
    return Completed(message=message, data=value)


def judged(subflow: Flow, run_name: str, timeout: float | None = None) -> Flow:
    """`subflow` (same flow name, parameters and task runner) as a run named `run_name` that ends in the
    state of the `LayerResult` it returns; `timeout` in seconds (None: the flow's own)."""
    layer = subflow.fn

    @functools.wraps(layer)
    def run(*args: Any, **kwargs: Any) -> Any:
        return verdict_state(layer(*args, **kwargs))

    # Prefect validates the parameters against this signature in this module's namespace: resolve the
    # layer's (string) annotations in its own
    run.__signature__ = inspect.signature(layer, eval_str=True)  # type: ignore[attr-defined]

    return Flow(run, name=subflow.name, version=subflow.version, description=subflow.description,
                flow_run_name=run_name, task_runner=subflow.task_runner, log_prints=subflow.log_prints,
                timeout_seconds=timeout if timeout is not None else subflow.timeout_seconds)


def result_of(state: State, layer: str) -> LayerResult:
    """The verdict a layer's final `state` carries; a run that ended without one (crashed, timed out,
    cancelled from outside) is its layer's FAIL, with the state's name and message as the reason."""
    try:
        value = state.result(raise_on_failure=False)
    except MissingResult:
        value = None
    if isinstance(value, LayerResult):
        return value
    return LayerResult(layer=layer, status=Status.FAIL, reason=f"{state.name}: {state.message or 'no result'}"[:500])
