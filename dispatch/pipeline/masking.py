"""The pipeline's one `Masker`: every secret this process knows, applied to everything the pipeline writes.

The reports, `run.json`, the layer cache and the artifacts (flows/pipeline.py), the lines of the shell steps
and their tails (shell.py), the app's log file (app.py), the evidence a test command leaves (regression.py)
and every line logged on a flow or task run of this process go through `pipeline_masker()`. It knows this
process's credentials (`DispatchSettings.secret_values`: by variable name, whatever the name's spelling, and
the Prefect API's auth string), read again at each call, and the keys of the models a pipeline names (their
`AgentModel` blocks or their own variables), added when a run starts. It only grows.

Run-log lines are masked by a filter on Prefect's run loggers (`prefect.flow_runs`, `prefect.task_runs`),
installed with the masker: a line is masked once, before any handler (the API's log table, the console) sees
it, whoever logged it (a layer's own message quoting an app's log, a step's output).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from dispatch.core.errors import DispatchError
from dispatch.core.secrets import Masker
from dispatch.core.settings import get_settings

logger = logging.getLogger(__name__)
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_MASKER = Masker()
_installed = threading.Event()
_install_lock = threading.Lock()


class MaskingFilter(logging.Filter):
    """Masks a record's message (its arguments merged in) and its traceback with `masker`."""

    def __init__(self, masker: Masker) -> None:
        super().__init__()
        self.masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.masker:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed format: leave it to the handler's own error path
            return True
        masked = self.masker.mask(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.masker.mask(record.exc_text)
        return True


def _install_filter() -> None:
    with _install_lock:
        if _installed.is_set():
            return
        for name in _RUN_LOGGERS:
            logging.getLogger(name).addFilter(MaskingFilter(_MASKER))
        _installed.set()


def pipeline_masker(models: Iterable[str] = ()) -> Masker:
    """The process's pipeline masker, told this process's credentials now (and the keys of `models`).

    Args:
        models: model names whose keys are masked too (from their `AgentModel` blocks, else their own variable
            of this environment); a server that cannot be asked or an invalid block is a warning, not an error.

    Returns:
        The one `Masker` every pipeline sink uses.
    """
    settings = get_settings()
    _MASKER.add(settings.secret_values())
    if names := sorted(set(models)):
        from dispatch.prefect.nodes_admin import models_and_keys

        try:
            _, keys = models_and_keys(names, settings, logger)
        except DispatchError as exc:
            logger.warning("could not read the keys of models %s to mask them: %s", ", ".join(names), exc)
        else:
            _MASKER.add(value for values in keys.values() for value in values.values())
    _install_filter()
    return _MASKER


def mask_file(path: Path, masker: Masker | None = None) -> bool:
    """Rewrite a text file a project's command left as evidence (a JUnit report, a log) with its secrets masked.

    Returns:
        Whether it held one.
    """
    masker = masker if masker is not None else pipeline_masker()
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return False
    masked = masker.mask(text)
    if masked == text:
        return False
    temporary = path.with_name(f".{path.name}.masking")
    temporary.write_text(masked, encoding="utf-8", errors="surrogateescape")
    os.replace(temporary, path)
    return True
