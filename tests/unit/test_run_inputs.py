"""A run's attempt inputs: registered under its id, found by run_spec, gone when the run closes."""

from __future__ import annotations

import pytest

from tasks import run_inputs


def test_inputs_are_found_by_run_id_until_unregistered() -> None:
    inputs = run_inputs.RunInputs({"n1": object()})  # type: ignore[dict-item]
    run_inputs.register("run-a", inputs)
    try:
        assert run_inputs.inputs_of("run-a") is inputs
        with pytest.raises(LookupError, match="run-b"):
            run_inputs.inputs_of("run-b")
    finally:
        run_inputs.unregister("run-a")
    with pytest.raises(LookupError):
        run_inputs.inputs_of("run-a")


def test_options_are_per_attempt_and_on_note_travels_apart() -> None:
    inputs = run_inputs.RunInputs({})
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)

    inputs.set_options("S01", 2, {"secrets": {"glm:KEY": "k"}, "on_note": note})
    options, on_note = inputs.options("S01", 2)
    assert options == {"secrets": {"glm:KEY": "k"}}
    assert on_note is note
    assert inputs.options("S01", 2)[1] is note  # a copy was handed out: the stored options are whole
    assert inputs.options("S01", 1) == ({}, None)
    inputs.drop_options("S01", 2)
    assert inputs.options("S01", 2) == ({}, None)
