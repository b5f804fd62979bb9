"""Untrusted JSON, YAML and ssh configs: bounded, refused with the file named, and never a command run.

`dispatch.core.safeload` is the one reader of files a user, a node, an agent or an archive wrote;
`dispatch.cluster.ssh_target.read_ssh_config` reads an ssh config so that a lookup never runs its `Match exec`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dispatch.cluster.ssh_target import node_target, resolve_target
from dispatch.core import safeload
from dispatch.core.errors import ConfigError
from dispatch.core.nodes import Node
from dispatch.core.safeload import AliasFound, json_depth, load_json, load_yaml, loads_json, loads_yaml


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[" * 100_000, '{"a":' * 50_000 + "1"])
def test_json_nested_past_the_bound_is_a_config_error_naming_the_file(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^x\.json: nests deeper than 64 levels"):
        loads_json(text, "x.json")


def test_json_brackets_inside_strings_do_not_count_and_the_bound_itself_is_allowed() -> None:
    assert loads_json('{"a": "' + "[" * 10_000 + '"}', "x.json") == {"a": "[" * 10_000}
    assert json_depth('["\\"[", {"b": [1]}]') == 3
    assert loads_json("[" * 64 + "]" * 64, "x.json", max_depth=64) is not None


def test_a_json_file_is_read_no_further_than_its_bound(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"x": "y" * 5000}))
    with pytest.raises(ConfigError, match=r"big\.json: larger than 1 KiB"):
        load_json(big, max_bytes=1024)
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read it"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{1")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON at line 1"):
        load_json(tmp_path / "bad.json")


@pytest.mark.parametrize("loader", ["CSafeLoader", "SafeLoader"])
@pytest.mark.parametrize("text", ["[" * 20_000 + "]" * 20_000, "".join(f"{' ' * i}a:\n" for i in range(700))])
def test_yaml_nested_past_the_bound_is_a_config_error_with_either_loader(
        text: str, loader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(yaml, loader):
        pytest.skip(f"PyYAML has no {loader} here")
    monkeypatch.setattr(safeload, "_YAML_LOADER", getattr(yaml, loader))
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"pipeline\.yaml: (nests deeper|bad YAML.*nesting depth)"):
        load_yaml(path)


def test_yaml_aliases_are_refused_before_anything_is_built() -> None:
    with pytest.raises(AliasFound, match="f.yaml: uses a YAML alias"):
        loads_yaml("a: &a [1, 2]\nb: *a\n", "f.yaml")
    assert loads_yaml("a: '*not an alias*'\nb: [1, {c: d}]\n", "f.yaml") == {"a": "*not an alias*",
                                                                             "b": [1, {"c": "d"}]}


def _config_with_match_exec(tmp_path: Path) -> tuple[Path, Path]:
    pwned = tmp_path / "pwned"
    config = tmp_path / "ssh_config"
    config.write_text(f'Match exec "touch {pwned}"\n  HostName 127.0.0.9\n  Port 2299\n'
                      f"Match host gpu1 !exec \"touch {pwned}\"\n  User mallory\n"
                      "Host gpu1\n  HostName 127.0.0.2\n  Port 2222\n  User dispatch\n")
    return config, pwned


def test_a_match_exec_in_an_ssh_config_is_never_run_and_its_block_never_applies(tmp_path: Path) -> None:
    config, pwned = _config_with_match_exec(tmp_path)

    target = resolve_target("gpu1", "gpu1", ssh_config_path=config)

    assert not pwned.exists(), "a lookup ran the config's Match exec command"
    assert (target.host, target.port, target.user) == ("127.0.0.2", 2222, "dispatch")


def test_nodes_check_with_a_match_exec_config_runs_no_command(tmp_path: Path) -> None:
    """The issue's reproduction: `dispatch nodes check` looked the node up and so ran the command."""
    config, pwned = _config_with_match_exec(tmp_path)
    home = tmp_path / "dispatch-home"
    home.mkdir()
    (home / "nodes.json").write_text(json.dumps({"nodes": [
        {"name": "gpu1", "ssh_host": "gpu1", "slots": 1, "ssh_config": str(config), "port": 1}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "PREFECT_"))}
    env.update(DISPATCH_HOME=str(home), HOME=str(tmp_path))

    done = subprocess.run([sys.executable, "-m", "dispatch.cli.main", "nodes", "check", "gpu1", "--timeout", "5"],
                          env=env, capture_output=True, text=True, timeout=120)

    assert not pwned.exists(), done.stdout + done.stderr
    assert "gpu1" in done.stdout + done.stderr


def test_node_target_names_an_unreadable_ssh_config(tmp_path: Path) -> None:
    big = tmp_path / "ssh_config"
    big.write_text("# x\n" * (1 << 19))
    with pytest.raises(ConfigError, match="ssh config .*larger than 1 MiB"):
        node_target(Node(name="gpu1", slots=1, ssh_host="gpu1", ssh_config=str(big)))
