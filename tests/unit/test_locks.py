"""File-lock overlap of `modifies` patterns, the all-or-nothing lock table, and machine-wide flock slots."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dispatch.core.locks import LockTable, ProcessLock, SlotLocks, conflicts, normalize, overlaps, segments_meet

OVERLAPPING = [
    ("src/api.py", "src/api.py"),            # same file
    ("src", "src/a.py"),                     # a directory covers its files
    ("docs/", "docs/x/y.md"),
    ("src/*.py", "src/api.py"),
    ("src/*", "src/sub/a.py"),               # src/sub matches src/* and covers what is under it
    ("**/*.md", "docs/a/b.md"),
    ("**/*.md", "README.md"),                # ** matches zero segments
    ("docs/**/x.md", "docs/x.md"),
    ("[ab].py", "a.py"),
    ("[a-c]x", "bx"),
    ("[!a].py", "b.py"),
    ("a*", "*b"),                            # "ab"
    ("x*", "*y"),                            # "xy"
    ("src/a?.py", "src/*.py"),
    ("src/*.py", "src/[ab].py"),
    ("*", "anything/at/all"),
    ("", "src/a.py"),                        # the whole project
    (".", "docs"),
    ("**", "x/y/z"),
    ("./src//a.py", "src/a.py"),             # normalisation
    ("src/a.py/", "src/a.py"),
    ("src/../docs/a.md", "docs/a.md"),
]

DISJOINT = [
    ("src/a.py", "src/b.py"),
    ("src/a.py", "src/a.pyc"),
    ("src/a", "src/ab"),                     # a directory does not cover a sibling with a longer name
    ("src", "srcx/a.py"),
    ("src/*.py", "src/sub/a.py"),            # a single * does not cross /
    ("src/*.py", "docs/api.py"),
    ("[ab].py", "c.py"),
    ("[!a].py", "a.py"),
    ("[!a]", "[a]"),
    ("*.py", "*.md"),
    ("a*b", "*c"),                           # a common name would end in both b and c
    ("a?", "abc"),
    ("docs/**/*.md", "src/a.md"),
    ("src/*/x.py", "src/y/z.py"),
]


@pytest.mark.parametrize(("a", "b"), OVERLAPPING)
def test_overlapping_patterns_overlap_both_ways(a: str, b: str) -> None:
    assert overlaps(a, b)
    assert overlaps(b, a)


@pytest.mark.parametrize(("a", "b"), DISJOINT)
def test_disjoint_patterns_do_not_overlap_either_way(a: str, b: str) -> None:
    assert not overlaps(a, b)
    assert not overlaps(b, a)


@pytest.mark.parametrize(("raw", "clean"), [
    ("./src//a.py", "src/a.py"), ("src/a.py/", "src/a.py"), (" docs/ ", "docs"), (".", ""), ("", ""),
    ("src\\win\\a.py", "src/win/a.py"), ("a/./b/../c", "a/c"),
])
def test_normalize(raw: str, clean: str) -> None:
    assert normalize(raw) == clean


def test_segments_meet_is_symmetric_on_globs() -> None:
    pairs = [("a*", "*b"), ("a*b", "*c"), ("[ab]?", "?[bc]"), ("x", "*")]
    for a, b in pairs:
        assert segments_meet(a, b) == segments_meet(b, a)


def test_conflicts_when_any_pair_of_entries_overlaps() -> None:
    assert conflicts(["docs/a.md", "src/api.py"], ["tests/", "src/*.py"])
    assert not conflicts(["docs/a.md", "src/api.py"], ["tests/", "src/db/*.py"])
    assert not conflicts([], ["src"])
    assert conflicts((p for p in ["src"]), iter(["src/a.py"]))  # any iterables


# -- LockTable -----------------------------------------------------------------------------------------------


def test_lock_table_refuses_an_overlapping_holder_and_frees_on_release() -> None:
    table = LockTable()

    assert table.try_acquire("S01", ["src/api.py"])
    assert not table.try_acquire("S02", ["src/"])
    assert table.blockers("S02", ["src/"]) == ["S01"]

    table.release("S01")

    assert table.try_acquire("S02", ["src/"])
    assert table.held == {"S02": ("src/",)}


def test_lock_table_lets_disjoint_holders_run_together() -> None:
    table = LockTable()

    assert table.try_acquire("S01", ["src/api.py"])
    assert table.try_acquire("S02", ["docs/*.md"])
    assert table.try_acquire("S03", [])
    assert set(table.held) == {"S01", "S02"}


def test_lock_table_is_all_or_nothing() -> None:
    table = LockTable()
    table.try_acquire("S01", ["src/db.py"])

    # S02's first pattern is free, its second is held: it must take neither.
    assert not table.try_acquire("S02", ["docs/guide.md", "src/db.py"])
    assert "S02" not in table.held
    assert table.try_acquire("S03", ["docs/guide.md"])  # the free one was not taken by S02


def test_lock_table_ignores_the_given_holders() -> None:
    table = LockTable()
    table.try_acquire("S01", ["src/"])

    assert table.try_acquire("S02", ["src/a.py"], ignore={"S01"})


# -- SlotLocks and ProcessLock across processes --------------------------------------------------------------

_HOLD_SLOTS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dispatch.core.locks import SlotLocks
    slots = SlotLocks(Path(sys.argv[1]), 2)
    held = [slots.try_acquire(), slots.try_acquire()]
    assert None not in held, held
    print("held", flush=True)
    time.sleep(60)
""")

_HOLD_PROCESS_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dispatch.core.locks import ProcessLock
    assert ProcessLock(Path(sys.argv[1])).try_acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def _hold(script: str, path: Path) -> subprocess.Popen[str]:
    """A real process that takes the locks and sleeps; returns once it holds them."""
    process = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "held":
        process.kill()
        raise AssertionError(f"holder did not start: {line!r} {process.communicate()[1]}")
    return process


def _kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.communicate(timeout=10)


def test_slot_locks_held_by_another_process_are_taken_and_come_back_when_it_dies(tmp_path: Path) -> None:
    slots = SlotLocks(tmp_path / "slots", 2)
    holder = _hold(_HOLD_SLOTS, tmp_path / "slots")
    try:
        assert slots.try_acquire() is None
        assert slots.in_use() == 2
    finally:
        _kill(holder)

    assert slots.in_use() == 0
    first, second = slots.try_acquire(), slots.try_acquire()
    assert first is not None and second is not None
    assert slots.try_acquire() is None
    SlotLocks.release(first)
    SlotLocks.release(second)


def test_slot_locks_count_slots_within_one_process(tmp_path: Path) -> None:
    slots = SlotLocks(tmp_path, 2)

    first = slots.try_acquire()
    second = slots.try_acquire()
    assert first is not None and second is not None
    assert slots.try_acquire() is None
    assert slots.in_use() == 2

    SlotLocks.release(first)
    assert slots.in_use() == 1
    again = slots.try_acquire()
    assert again is not None
    SlotLocks.release(again)
    SlotLocks.release(second)
    SlotLocks.release(second)  # releasing twice is harmless


def test_process_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "run" / "shop.lock"
    first, second = ProcessLock(path), ProcessLock(path)

    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.holder_pid() == os.getpid()

    first.release()
    assert second.try_acquire()
    second.release()


def test_process_lock_of_a_killed_process_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "shop.lock"
    holder = _hold(_HOLD_PROCESS_LOCK, path)
    lock = ProcessLock(path)
    try:
        assert not lock.try_acquire()
        assert lock.holder_pid() == holder.pid
    finally:
        _kill(holder)

    assert lock.try_acquire()
    assert lock.holder_pid() == os.getpid()
    lock.release()
