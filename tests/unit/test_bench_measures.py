"""The benchmark's own measures (bench/measures.py): the figures issue targets are judged by must be right."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from measures import schedule_measures, startable_together  # noqa: E402
from workload import GenSpec, Workload  # noqa: E402


def _timeline(path: Path, runs: dict[str, tuple[float, float]]) -> Path:
    path.write_text("".join(f"{t} start {s} n1\n{t} end {e} n1\n" for t, (s, e) in runs.items()))
    return path


def test_a_spec_waiting_for_a_file_a_running_spec_holds_is_not_runnable():
    files = {"A": frozenset({"f"}), "B": frozenset({"f"}), "C": frozenset({"g"}), "D": frozenset({"g"}),
             "E": frozenset()}
    # A runs and holds f: B cannot start; C and D share g, so only one of them can; E needs no file
    assert startable_together(["A", "B", "C", "D", "E"], ["A"], files) == 2
    assert startable_together(["B", "C", "D"], [], files) == 2


def test_serialised_file_work_is_full_use_lock_aware_and_not_before(tmp_path: Path):
    # two specs on one file, back to back, two slots: nothing else could have run
    workload = Workload(seed=0, specs=[GenSpec("A", 0, 1.0, 2, modifies=["f"]),
                                       GenSpec("B", 0, 1.0, 2, modifies=["f"])])
    measured = schedule_measures(workload, _timeline(tmp_path / "t", {"A": (0.0, 1.0), "B": (1.0, 2.0)}), {"n1": 2})
    assert measured["utilisation_lock_aware"] == pytest.approx(1.0, abs=0.03)
    assert measured["utilisation"] == pytest.approx(2 / 3, abs=0.03)


def test_a_free_spec_started_late_counts_as_idle_lock_aware_too(tmp_path: Path):
    # C shares nothing and was ready at 0 but started at 0.5: half of its slot-time before the start is lost
    workload = Workload(seed=0, specs=[GenSpec("A", 0, 1.0, 2, modifies=["f"]),
                                       GenSpec("C", 0, 0.5, 2, modifies=["g"])])
    measured = schedule_measures(workload, _timeline(tmp_path / "t", {"A": (0.0, 1.0), "C": (0.5, 1.0)}), {"n1": 2})
    assert measured["utilisation_lock_aware"] == pytest.approx(1.5 / 2.0, abs=0.04)
