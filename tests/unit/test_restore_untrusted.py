"""`dispatch restore` of a crafted archive: a bomb of a manifest, and settings that run commands.

A snapshot is checked member by member (tests/unit/test_snapshot.py); these archives are well formed and
correctly checksummed, but what they carry is hostile: a manifest nested 100,000 deep, a `nodes.json` whose
`ssh_config` (in the restored home) has a `Match exec`, a node `python` with shell syntax. Each is refused
(exit 2, naming the file and setting, nothing changed) unless `--trust` accepts it, and even then our SSH
code runs no command from the ssh config.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from tests.unit.test_snapshot import _dispatch, _home, _rows, _snapshot, _tree, _write_sums


def _forge(archive: Path, files: dict[str, bytes], manifest_text: bytes | None = None) -> Path:
    """A copy of `archive` with `files` (archive member names) added or replaced, listed in the manifest with
    their right sha256, and the archive's .sha256 rewritten: only what the files say can give it away."""
    forged = archive.with_name("forged.tar.gz")
    with tarfile.open(archive) as src, tarfile.open(forged, "w:gz") as out:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src]
        for member, data in members:
            if member.name == "manifest.json":
                continue
            if member.name in files:
                data = files[member.name]
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
        for name, data in files.items():
            if name not in {m.name for m, _ in members}:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                out.addfile(info, io.BytesIO(data))
        manifest = json.loads(next(data for m, data in members if m.name == "manifest.json"))
        for name, data in files.items():
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        text = manifest_text if manifest_text is not None else json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mode = len(text), 0o644
        out.addfile(info, io.BytesIO(text))
    _write_sums(forged)
    return forged


def test_a_manifest_nested_100000_deep_is_refused_with_exit_2(tmp_path: Path) -> None:
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    forged = _forge(archive, {}, b'{"format": 1, "files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    now = _tree(home)

    done = _dispatch(tmp_path, "restore", str(forged))

    assert done.returncode == 2, done.stdout + done.stderr
    assert "manifest.json" in done.stderr and "nests deeper" in done.stderr
    assert "Traceback" not in done.stderr
    assert _tree(home) == now and not list(home.glob(".restore-*"))


def _nodes(**fields: object) -> bytes:
    return json.dumps({"nodes": [{"name": "gpu1", "ssh_host": "gpu1", "slots": 1, "port": 1, **fields}]}).encode()


def test_an_ssh_config_with_match_exec_in_the_restored_home_is_refused_then_trusted_but_never_run(
        tmp_path: Path) -> None:
    """The issue's archive: nodes.json points ssh_config into the restored home, where a Match exec waits."""
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    pwned = tmp_path / "pwned"
    config = f'Match exec "touch {pwned}"\n  HostName 127.0.0.9\nHost gpu1\n  ProxyCommand touch {pwned}\n'
    forged = _forge(archive, {"home/nodes.json": _nodes(ssh_config=str(home / "cache" / "ssh_config")),
                              "home/cache/ssh_config": config.encode()})
    now = _tree(home)

    refused = _dispatch(tmp_path, "restore", str(forged))

    assert refused.returncode == 2, refused.stdout + refused.stderr
    for text in ("nodes.json", "gpu1", "ssh_config", "line 1", "Match exec", "line 4", "ProxyCommand", "--trust"):
        assert text in refused.stderr, f"{text!r} not in {refused.stderr}"
    assert _tree(home) == now and _rows(home) == [("run-1", "COMPLETED")]

    trusted = _dispatch(tmp_path, "restore", str(forged), "--trust")

    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert "trusted" in trusted.stdout and "Match exec" in trusted.stdout
    assert (home / "cache" / "ssh_config").read_text() == config
    for command in (("nodes", "check", "gpu1", "--timeout", "3"), ("guardian", "--once")):
        _dispatch(tmp_path, *command, HOME=str(tmp_path))
        assert not pwned.exists(), f"dispatch {' '.join(command)} ran the ssh config's Match exec"


def test_node_programs_with_shell_syntax_are_refused_naming_each(tmp_path: Path) -> None:
    home = _home(tmp_path)
    archive = _snapshot(tmp_path, tmp_path / "snaps")
    forged = _forge(archive, {"home/nodes.json": _nodes(python="python3 -c 'import os'; touch /tmp/x",
                                                        remote_root="$(id)", env={"LD_PRELOAD": "/tmp/evil.so"})})
    now = _tree(home)

    done = _dispatch(tmp_path, "restore", str(forged))

    assert done.returncode == 2, done.stdout + done.stderr
    for text in ("nodes[0] (gpu1).python", "nodes[0] (gpu1).remote_root", "env.LD_PRELOAD"):
        assert text in done.stderr, done.stderr
    assert _tree(home) == now
