"""The drift check's record of passed agent CLI versions in this machine's file, without a Prefect server."""

from __future__ import annotations

from pathlib import Path

from dispatch.core.agent_versions import AcceptedVersions, PassedFile, load_passed, record_results


def test_the_machine_file_keeps_passing_versions_and_drops_failing_ones(tmp_path: Path) -> None:
    store = PassedFile(tmp_path / "agents" / "cli_passed.json")
    assert load_passed(store) == {}
    record_results(store, {"codex": {"0.170.0": True, "0.172.0": True}})
    assert record_results(store, {"codex": {"0.170.0": False}, "claude": {"2.1.0": True}}) == {
        "codex": ["0.172.0"], "claude": ["2.1.0"]}
    accepted = AcceptedVersions.load(PassedFile(store.path))
    assert accepted.flag("codex", "codex-cli 0.172.0") is None
    assert "has not passed the contract tier" in (accepted.flag("codex", "codex-cli 0.170.0") or "")


def test_a_store_that_fails_leaves_the_pinned_versions_and_says_why(tmp_path: Path) -> None:
    class Broken(PassedFile):
        def read(self) -> object:
            raise OSError("server away")

    accepted = AcceptedVersions.load(Broken(tmp_path / "x.json"))
    assert accepted.passed == {} and "server away" in accepted.note
