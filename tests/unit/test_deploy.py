"""L6's deploy steps on this machine for real: release directories, the atomic `current` switch, restart,
a live health check over HTTP, rollback, pruning (and nothing removed outside `<dir>/releases`)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dispatch.errors import ConfigError
from dispatch.pipeline.deploy import Deployer, LocalTarget, check_dir
from dispatch.pipeline.workspace import code_digest


@pytest.fixture
def live(tmp_path):
    """A live "app": answers 200 while `<deploy>/current/HEALTH` says ok, 500 otherwise."""
    deploy_dir = tmp_path / "srv" / "shop"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            health = deploy_dir / "current" / "HEALTH"
            ok = health.is_file() and health.read_text().strip() == "ok"
            self.send_response(200 if ok else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield deploy_dir, f"http://127.0.0.1:{server.server_address[1]}/healthz"
    server.shutdown()


def _code(root: Path, name: str, health: str) -> Path:
    code = root / name
    (code / "app").mkdir(parents=True)
    (code / "app" / "main.py").write_text(f"VERSION = {name!r}\n")
    (code / "HEALTH").write_text(health + "\n")
    (code / ".venv").mkdir()  # never copied
    return code


_RESTART = 'echo "$REVISION" >> "$DEPLOY_DIR/restarts.log"'


def _deploy(deploy_dir: Path, code: Path, health_url: str, keep: int = 5):
    deployer = Deployer(LocalTarget(), str(deploy_dir), {"PATH": "/usr/bin:/bin"})
    return deployer.deploy(code, code_digest(code)[:12], restart=_RESTART, health=health_url, keep=keep, timeout=2)


def test_failed_health_check_rolls_back_to_the_previous_release(tmp_path, live):
    deploy_dir, url = live
    good, bad = _code(tmp_path, "good", "ok"), _code(tmp_path, "bad", "broken")

    first = _deploy(deploy_dir, good, url)
    assert first.ok, first.message
    assert (deploy_dir / "current").is_symlink() and (deploy_dir / "current" / "app" / "main.py").is_file()
    assert not (deploy_dir / "current" / ".venv").exists()

    second = _deploy(deploy_dir, bad, url)
    assert not second.ok
    assert second.message.endswith(f"rolled back to {first.revision}")
    assert (deploy_dir / "current").resolve().name == first.revision
    assert (deploy_dir / "restarts.log").read_text().split() == [first.revision, second.revision, first.revision]
    assert {p.name for p in (deploy_dir / "releases").iterdir()} == {first.revision, second.revision}


def test_the_first_release_failing_has_nothing_to_roll_back_to(tmp_path, live):
    deploy_dir, url = live
    outcome = _deploy(deploy_dir, _code(tmp_path, "bad", "broken"), url)
    assert not outcome.ok and "no previous release to roll back to" in outcome.message


def test_keeps_the_last_releases_and_removes_nothing_outside_releases(tmp_path, live):
    deploy_dir, url = live
    (deploy_dir / "releases" / "notes+draft").mkdir(parents=True)  # the oldest entry, but not a revision name
    (deploy_dir / "data.db").write_text("keep me")
    outside = tmp_path / "srv" / "neighbour"
    outside.mkdir()
    revisions = []
    for index in range(4):
        outcome = _deploy(deploy_dir, _code(tmp_path, f"v{index}", "ok"), url, keep=2)
        assert outcome.ok, outcome.message
        revisions.append(outcome.revision)

    final = _deploy(deploy_dir, tmp_path / "v3", url, keep=2)  # the same revision again: reused, not copied
    assert final.ok and ("release exists", True) in [(s[0], s[1]) for s in final.steps]
    assert {p.name for p in (deploy_dir / "releases").iterdir()} == {revisions[2], revisions[3], "notes+draft"}
    assert (deploy_dir / "data.db").read_text() == "keep me" and outside.is_dir()


@pytest.mark.parametrize("value", ["/", "/etc", "/srv", "relative/dir", "/tmp", "$NOT_SET_ANYWHERE/x"])
def test_a_system_or_relative_deploy_dir_is_refused(value, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="deploy.dir"):
        check_dir(value, local=True)


def test_deploy_dir_expands_dispatch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path / "home"))
    assert check_dir("${DISPATCH_HOME}/deploy/shop", local=True) == str(tmp_path / "home" / "deploy" / "shop")
