"""Pydantic validation that speaks our messages: the one bridge from a `ValidationError` to ours.

The models of the files users write (a spec's front matter, `nodes.json`, `projects.json`) check each field
with a validator that raises `invalid(...)`: the message is ours, word for word ("must be 1 (high), 2 (default)
or 3 (low), got 'high'"). `problems` turns the `ValidationError` that pydantic collects back into (field,
message) pairs, in the models' field order, for a `SpecError` or a `ConfigError` naming the file.
"""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

_KIND = "dispatch_invalid"


def invalid(message: str, field: str | None = None) -> PydanticCustomError:
    """The error a validator raises: `message` as the user reads it, under `field` (default: the field
    being validated; give it for a dotted place such as `env.PATH` or from a model-wide check)."""
    return PydanticCustomError(_KIND, "{message}", {"message": message, "field": field})


def problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(field, message) for each error pydantic collected, in field order.

    Errors raised by `invalid` keep their own message; any other (a type pydantic checked itself, a missing
    field) is shown as pydantic words it, under its dotted location.
    """
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        context = error.get("ctx") or {}
        place = ".".join(str(part) for part in error["loc"][:1])
        if error["type"] == _KIND:
            found.append((context["field"] or place, context["message"]))
        else:
            found.append((".".join(str(part) for part in error["loc"]), error["msg"]))
    return found
