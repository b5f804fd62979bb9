"""One node model (dispatch/core/nodes.py) for `nodes.json`, the scheduler and the `ClusterNode` block: same
fields, same checks, same words, no server needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from dispatch.cluster.config import load_nodes
from dispatch.core.errors import ConfigError
from dispatch.core.nodes import Node
from dispatch.core.settings import DispatchSettings

# every field away from its default, as a nodes.json user writes it (env values may be numbers)
_FULL_ENTRY = {
    "name": "gpu1", "transport": "worker", "slots": 4, "ssh_host": "gpu1-alias", "host": "127.0.0.9",
    "user": "agent", "key_path": "/keys/gpu1", "known_hosts": "/keys/known_hosts", "ssh_config": "/keys/config",
    "labels": ["gpu", "big"], "models": ["glm", "codex"], "priority": 3,
    "env": {"PATH": "/opt/agents/bin:/usr/bin:/bin", "APP_ENV": "ci", "WORKERS": 8}, "port": 2222,
    "trust_on_first_use": True, "remote_root": "/srv/dispatch", "python": "python3.11",
    "api_mode": "openai", "executor": "glm", "rack": "b7",
}


def _nodes_json(tmp_path: Path, *entries: dict) -> DispatchSettings:
    (tmp_path / "nodes.json").write_text(json.dumps({"nodes": list(entries)}))
    return DispatchSettings(home=tmp_path)


def _saved(block) -> dict:
    """What the server keeps of a block (JSON, secrets included), as `Block.save` sends it."""
    return block.model_dump(mode="json", include=set(type(block).model_fields), context={"include_secrets": True})


def test_the_block_has_exactly_the_node_models_fields_plus_its_private_key() -> None:
    from blocks.cluster_node import ClusterNode
    from dispatch.core import nodes

    assert nodes.Node is Node and issubclass(ClusterNode, Node)
    assert set(ClusterNode.model_fields) == set(Node.model_fields) | {"private_key"}
    for name, field in Node.model_fields.items():
        assert ClusterNode.model_fields[name].description == field.description, name


def test_a_nodes_json_node_round_trips_through_its_saved_block_with_every_field_env_included(tmp_path) -> None:
    from blocks.cluster_node import ClusterNode

    (node,) = load_nodes(_nodes_json(tmp_path, _FULL_ENTRY))
    defaults = Node.model_construct(name="x", slots=1)
    unset = [name for name in Node.model_fields if name not in ("name", "slots")
             and getattr(node, name) == getattr(defaults, name)]
    assert unset == []  # the entry exercises every field
    assert node.env == {"PATH": "/opt/agents/bin:/usr/bin:/bin", "APP_ENV": "ci", "WORKERS": "8"}
    assert node.options == {"api_mode": "openai", "executor": "glm", "rack": "b7"}

    block = ClusterNode.from_node(node, private_key="-----BEGIN KEY-----")
    back = ClusterNode.model_validate(_saved(block))

    assert back.to_node() == node
    assert back.private_key.get_secret_value() == "-----BEGIN KEY-----"
    assert _saved(back) == _saved(block)
    assert _saved(back)["labels"] == ["big", "gpu"]  # sets are saved sorted: the same data every time


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"name": "gpu 1"}, "name", "'gpu 1' must be 1-63 letters, digits, '.', '_' or '-'"),
    ({"slots": 2000}, "slots", "must be from 1 to 1024, got 2000"),
    ({"slots": True}, "slots", "must be a whole number of slots >= 1, got True"),
    ({"transport": "ftp"}, "transport", "must be one of local, ssh, worker, got 'ftp'"),
    ({"ssh_host": None, "host": None}, "ssh_host", "an ssh node needs ssh_host (a host or ~/.ssh/config alias)"),
    ({"user": "a\nb"}, "user", "must be a non-empty line of at most 4096 characters without control characters"),
    ({"labels": "gpu"}, "labels", "must be a list of strings, got 'gpu'"),
    ({"env": {"A": True}}, "env.'A'", "must be a string, got True"),
    ({"port": 70000}, "port", "must be a TCP port from 1 to 65535, got 70000"),
    ({"trust_on_first_use": "yes"}, "trust_on_first_use", "must be true or false (JSON booleans, not strings)"),
])
def test_the_block_refuses_what_nodes_json_refuses_in_the_same_words(tmp_path, change, field, words) -> None:
    from blocks.cluster_node import ClusterNode

    entry = {"name": "gpu1", "slots": 2, "host": "127.0.0.9"} | change
    with pytest.raises(ConfigError) as from_file:
        load_nodes(_nodes_json(tmp_path, {k: v for k, v in entry.items() if v is not None}))
    with pytest.raises(ValidationError) as from_block:
        ClusterNode(**entry)

    assert f".{field}: {words}" in str(from_file.value)
    assert words in str(from_block.value)


def test_an_edit_of_a_block_is_checked_as_nodes_json_is() -> None:
    from blocks.cluster_node import ClusterNode

    block = ClusterNode(name="gpu1", slots=2, host="127.0.0.9")
    with pytest.raises(ValidationError, match="must be 1-63 letters"):
        block.name = "gpu 1"
    with pytest.raises(ValidationError, match="must be from 1 to 1024"):
        block.slots = 0
    block.private_key = "key text"  # still made a secret
    assert block.private_key.get_secret_value() == "key text" and "key text" not in repr(block)
