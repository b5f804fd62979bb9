"""L6's deploy steps on this machine for real: release directories, the atomic `current` switch, restart,
a live health check over HTTP, rollback, pruning (and nothing removed outside `<dir>/releases`)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dispatch.core.errors import ConfigError
from dispatch.pipeline.deploy import Deployer, LocalTarget
from dispatch.pipeline.deploy_dir import check_dir
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


def test_prune_removes_only_real_directories_named_as_l6_names_releases(tmp_path, live):
    deploy_dir, url = live
    releases = deploy_dir / "releases"
    (releases / "my-backup").mkdir(parents=True)  # a person's directory: a revision-like name, but not ours
    (releases / "my-backup" / "dump.sql").write_text("precious")
    outside = tmp_path / "elsewhere"
    (outside / "keep").mkdir(parents=True)
    (releases / "0123456789ab").symlink_to(outside)  # named like a release, but a link out of deploy.dir
    revisions = []
    for index in range(3):
        outcome = _deploy(deploy_dir, _code(tmp_path, f"v{index}", "ok"), url, keep=1)
        assert outcome.ok, outcome.message
        revisions.append(outcome.revision)

    assert {p.name for p in releases.iterdir()} == {revisions[2], "my-backup", "0123456789ab"}
    assert (releases / "my-backup" / "dump.sql").read_text() == "precious"
    assert (releases / "0123456789ab").is_symlink() and (outside / "keep").is_dir()


def test_a_releases_directory_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, live):
    deploy_dir, url = live
    other = tmp_path / "other"
    for name in ("abcdef012345", "0123456789ab", "notes"):
        (other / name).mkdir(parents=True)
    deploy_dir.mkdir(parents=True)
    (deploy_dir / "releases").symlink_to(other)

    with pytest.raises(ConfigError, match=r"deploy.dir: .*/releases .* is a symbolic link"):
        _deploy(deploy_dir, _code(tmp_path, "v0", "ok"), url, keep=1)
    assert sorted(p.name for p in other.iterdir()) == ["0123456789ab", "abcdef012345", "notes"]
    assert not (deploy_dir / "current").exists()


@pytest.mark.parametrize("value", [
    "/usr/local/shop", "/etc/shop", "/boot/shop", "/var/spool/shop", "/bin/x/y", "/sbin/x/y", "/lib/x/y",
    "/lib64/x/y", "/proc/1/x", "/sys/x/y", "/dev/shm/x", "/root/.ssh/shop", "/home/alice/.aws/x",
    "~/.ssh/shop", "~/.gnupg/shop", "~/.aws/shop", "/tmp/../etc/x", "//etc/shop", "/srv/../usr/share/x",
])
def test_a_deploy_dir_under_a_system_or_credential_directory_is_refused(value):
    with pytest.raises(ConfigError, match="deploy.dir"):
        check_dir(value, local=True)


def test_a_deploy_dir_that_resolves_into_a_system_directory_through_a_link_is_refused(tmp_path):
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ConfigError, match="deploy.dir: .* resolves to /etc/shop"):
        check_dir(str(tmp_path / "link" / "shop"), local=True)
    (tmp_path / "srv").mkdir()
    assert check_dir(str(tmp_path / "srv" / "shop"), local=True) == str(tmp_path / "srv" / "shop")


def test_the_deployer_checks_on_the_target_where_the_directory_resolves_before_writing(tmp_path, live):
    _, url = live
    (tmp_path / "link").symlink_to("/proc")  # a directory checked as given, resolving into a system one
    deployer = Deployer(LocalTarget(), str(tmp_path / "link" / "shop"), {"PATH": "/usr/bin:/bin"})
    code = _code(tmp_path, "v0", "ok")
    with pytest.raises(ConfigError, match="deploy.dir: .* resolves to /proc/shop on local"):
        deployer.deploy(code, code_digest(code)[:12], restart=None, health=url, keep=1, timeout=2)


@pytest.mark.parametrize("deploy, refused", [
    ({"dir": "/etc/shop"}, True),
    ({"dir": "/tmp/../etc/x"}, True),
    ({"target": "node1", "dir": "~/.ssh/shop"}, True),
    ({"target": "node1", "dir": "/root/.ssh/x"}, True),
    ({"dir": "/srv/shop"}, False),
    ({"target": "node1", "dir": "~/apps/shop"}, False),
    ({"dir": "${NOT_SET_ANYWHERE}/shop"}, False),  # judged at deploy time, where the variable is set
])
def test_pipeline_yaml_refuses_a_system_deploy_dir_naming_the_file_and_field(tmp_path, monkeypatch, deploy, refused):
    from dispatch.pipeline.config import load_pipeline_config

    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"deploy": deploy}))
    if not refused:
        assert load_pipeline_config(path).deploy.dir == deploy["dir"]
        return
    with pytest.raises(ConfigError, match=f"{path}: deploy.dir: .* (system directory|credentials live)"):
        load_pipeline_config(path)
