"""Putting the cluster into Prefect: node and model blocks, a work pool and a concurrency limit per node.

- `import_nodes`: `nodes.json` -> one `ClusterNode` block per node (plus an `AgentModel` block per built-in
  model that has none yet), so the UI shows and edits them.
- `sync_pools`: per node, a `process` work pool `node-<name>` and a global concurrency limit `node-<name>`,
  both limited to the node's slots; created when missing, their limits updated when they differ, and
  nothing else touched (a limit's active slots are never reset, so runs holding slots keep them).
- `node_load`: the slots each node has in use, from those concurrency limits (team mode).
- `node_keys`: the private keys kept in the nodes' blocks (as `SecretStr`), for the SSH transport;
  `ssh_key_secrets` the same for the ssh nodes that need one, unwrapped, as every SSH user of them asks.

Prefect is imported inside the functions: importing this module is cheap, and only the commands that
call these functions pay for Prefect (in embedded mode, also for its temporary API server). Set the
environment from `DispatchSettings.prefect_environment()` before calling them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import SecretStr

from dispatch.cluster.config import load_nodes
from dispatch.core.errors import ConfigError
from dispatch.core.nodes import Node
from dispatch.core.settings import DispatchSettings
from dispatch.prefect.errors import SERVER_ERRORS

if TYPE_CHECKING:
    from dispatch.core.model_catalog import ModelSpec

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

logger = logging.getLogger(__name__)

_BANNED_IN_NAMES = "/%&<>"  # prefect.types.names.BANNED_CHARACTERS

POOL_TYPE = "process"
"""The type of every node's work pool (a `prefect worker start --type process` on the node serves it)."""


def _client() -> SyncPrefectClient:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _saved_data(client: SyncPrefectClient, block_class: type, name: str, *,
                secrets: bool = False) -> dict[str, Any] | None:
    """The fields of the saved block `name` of `block_class`, or None when there is none."""
    from prefect.exceptions import ObjectNotFound

    slug = block_class.get_block_type_slug()
    try:
        return client.read_block_document_by_name(name, slug, include_secrets=secrets).data
    except ObjectNotFound:
        return None


def import_nodes(settings: DispatchSettings, *, embed_keys: bool = False) -> list[str]:
    """Save each node of `nodes.json` as a `ClusterNode` block (overwriting), and the built-in models as
    `AgentModel` blocks where none exists yet (without keys: add them in the UI or with `block.save`).

    A private key already saved in a node's block is kept when `nodes.json` does not bring one (so a key
    pasted in the UI survives a re-import).

    Args:
        settings: where `nodes.json` is (`settings.home`).
        embed_keys: read each node's `key_path` file into its block's `private_key` secret, so other
            machines (workers, teammates) can connect without the file.

    Returns:
        One human line per block saved.

    Raises:
        ConfigError: a bad `nodes.json`, two node names that slugify alike, or an unreadable key file.
    """
    from blocks.agent_model import AgentModel
    from blocks.cluster_node import ClusterNode, block_name
    from dispatch.core.model_catalog import BUILTIN_MODELS

    nodes = load_nodes(settings)
    by_slug: dict[str, str] = {}
    for node in nodes:
        other = by_slug.setdefault(block_name(node.name), node.name)
        if other != node.name:
            raise ConfigError(f"nodes {other!r} and {node.name!r} would share the block name "
                              f"{block_name(node.name)!r}; rename one of them in nodes.json")
    lines = []
    with _client() as client:
        for node in nodes:
            key = _read_key(node) if embed_keys and node.key_path else None
            block = ClusterNode.from_node(node, private_key=key)
            saved = _saved_data(client, ClusterNode, block.document_name, secrets=True) if key is None else None
            if block.private_key is None and saved:
                block.private_key = saved.get("private_key")  # validated into a SecretStr again
            block.save(block.document_name, overwrite=True)
            secret = " (private key stored as a secret)" if block.private_key is not None else ""
            lines.append(f"node {node.name}: saved block {ClusterNode.get_block_type_slug()}/"
                         f"{block.document_name}{secret}")
            logger.info("saved ClusterNode block %s", block.document_name)
        for name in sorted(BUILTIN_MODELS):
            if _saved_data(client, AgentModel, block_name(name)) is None:
                AgentModel.builtin(name).save(block_name(name))
                lines.append(f"model {name}: saved block {AgentModel.get_block_type_slug()}/{block_name(name)} "
                             "(no API key: add one in the UI)")
    return lines


def node_keys(nodes: list[Node]) -> dict[str, SecretStr]:
    """The private keys saved in the nodes' `ClusterNode` blocks, still wrapped, by node name.

    For the SSH transport of nodes whose key is not a file on this machine: unwrap each one only where it
    is handed to paramiko (`SSHTarget.key_secret`). Nodes without a block or without a key are left out.
    """
    from blocks.cluster_node import ClusterNode, block_name

    keys: dict[str, SecretStr] = {}
    with _client() as client:
        for node in nodes:
            saved = _saved_data(client, ClusterNode, block_name(node.name), secrets=True)
            if saved and saved.get("private_key"):
                keys[node.name] = SecretStr(saved["private_key"])
    return keys


def ssh_key_secrets(nodes: list[Node], log: logging.Logger | logging.LoggerAdapter = logger) -> dict[str, str]:
    """The private keys of the ssh nodes whose key is no file here (no `key_path`), from their `ClusterNode`
    blocks, unwrapped for paramiko: what a run, `dispatch stop`, `collect` and `cleanup` connect with.

    Prefect is asked only when such a node exists (set the environment from `prefect_environment()` first).
    When it cannot answer, that is logged and the nodes are tried with ssh-agent and the default keys.

    Returns:
        Node name -> private key text, for the nodes that have a key in their block.
    """
    wanted = [node for node in nodes if node.transport == "ssh" and not node.key_path]
    if not wanted:
        return {}
    try:
        return {name: key.get_secret_value() for name, key in node_keys(wanted).items()}
    except (httpx.HTTPError, OSError, RuntimeError) as exc:  # RuntimeError: an embedded server that did not start
        log.warning("could not read the nodes' keys from their blocks (%s); using ssh-agent and key files", exc)
        return {}


def _read_key(node: Node) -> str:
    path = Path(str(node.key_path)).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"node {node.name}: cannot read key_path {path} to store it as a secret: {exc}") from exc


def sync_pools(nodes: list[Node]) -> list[str]:
    """Make each node's work pool and global concurrency limit `node-<name>` match its slots.

    Missing ones are created (pools of type `process`, with the process worker's default job template);
    existing ones get their limit updated when it differs, and are otherwise left alone: a concurrency
    limit's active slots are never reset.

    Args:
        nodes: the cluster's nodes.

    Returns:
        One human line per change; empty when everything already matched.

    Raises:
        ConfigError: a node's name has a character Prefect does not allow in pool or limit names.
    """
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
        WorkPoolUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    for node in nodes:
        if banned := sorted(set(node.name) & set(_BANNED_IN_NAMES)):
            raise ConfigError(f"node {node.name!r}: Prefect does not allow {' '.join(banned)} in work pool and "
                              "concurrency limit names; rename the node in nodes.json")
    changes: list[str] = []
    with _client() as client:
        for node in nodes:
            name = node.pool
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type=POOL_TYPE, concurrency_limit=node.slots,
                    base_job_template=_process_job_template(),
                    description=f"Oyster Dispatch node {node.name} ({node.transport}): {node.slots} slots"))
                changes.append(f"work pool {name}: created, concurrency limit {node.slots}")
            else:
                if pool.concurrency_limit != node.slots:
                    client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=node.slots))
                    changes.append(f"work pool {name}: concurrency limit {pool.concurrency_limit} -> {node.slots}")
                if pool.type != POOL_TYPE:
                    logger.warning("work pool %s is of type %s, not %s; left as it is", name, pool.type, POOL_TYPE)
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=node.slots))
                changes.append(f"concurrency limit {name}: created, limit {node.slots}")
            else:
                if limit.limit != node.slots:
                    # only `limit` is sent (the client drops unset fields): active slots stay as they are
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=node.slots))
                    busy = f" ({limit.active_slots} in use)" if limit.active_slots else ""
                    changes.append(f"concurrency limit {name}: limit {limit.limit} -> {node.slots}{busy}")
                if not limit.active:
                    logger.warning("concurrency limit %s is inactive (not enforced); left as it is", name)
    return changes


def _process_job_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def node_load(nodes: list[Node]) -> dict[str, dict[str, int]]:
    """The slots in use on each node, from its global concurrency limit on the Prefect server.

    Args:
        nodes: the cluster's nodes.

    Returns:
        `{node name: {"slots": limit, "used": active slots}}` for every node that has a limit; nodes
        without one (not synced yet) are left out.
    """
    from prefect.exceptions import ObjectNotFound

    load: dict[str, dict[str, int]] = {}
    with _client() as client:
        for node in nodes:
            try:
                limit = client.read_global_concurrency_limit_by_name(node.pool)
            except ObjectNotFound:
                continue
            load[node.name] = {"slots": limit.limit, "used": limit.active_slots}
    return load


def models_and_keys(names: list[str], settings: DispatchSettings,
                    log: logging.Logger | logging.LoggerAdapter | None = None,
                    ) -> tuple[dict[str, ModelSpec], dict[str, dict[str, str]]]:
    """Every model (built-ins, overridden by `AgentModel` blocks) and the keys of `names`: from their blocks,
    else each from its own variable of this process's environment (`dispatch.core.model_catalog.environment_keys`).

    A server that cannot be asked leaves the built-ins (said on `log`); an invalid block raises ConfigError.
    """
    from dispatch.core.model_catalog import BUILTIN_MODELS, environment_keys

    blocks: dict[str, ModelSpec] = {}
    secrets: dict[str, dict[str, str]] = {}
    if names:
        try:
            blocks, secrets = agent_models(names)
        except SERVER_ERRORS as exc:
            (log or logger).warning("could not read AgentModel blocks (%s); using the built-in models", exc)
    catalog = {**BUILTIN_MODELS, **blocks}
    return catalog, environment_keys(names, catalog, secrets, settings.environment_key)


def agent_models(names: list[str]) -> tuple[dict[str, ModelSpec], dict[str, dict[str, str]]]:
    """The `AgentModel` blocks of these models: their specs (overriding the built-ins) and secret env.

    Models without a block keep their built-in spec and get no secret here
    (`dispatch.core.model_catalog.environment_keys` then looks for the model's own variable, e.g. ZAI_API_KEY for
    glm, in the caller's environment). The keys are unwrapped here, only to be handed to the node runner's stdin.

    Returns:
        (model name -> ModelSpec for models with a block, model name -> {env var: key}).
    """
    from pydantic import ValidationError

    from blocks.agent_model import AgentModel
    from blocks.cluster_node import block_name

    catalog: dict[str, ModelSpec] = {}
    secrets: dict[str, dict[str, str]] = {}
    with _client() as client:
        for name in names:
            data = _saved_data(client, AgentModel, block_name(name), secrets=True)
            if not data:
                continue
            try:
                model = AgentModel(**data)
            except ValidationError as exc:
                raise ConfigError(f"AgentModel block {block_name(name)!r} is invalid: {exc}") from exc
            catalog[name] = model.to_model_spec()
            if env := model.secret_env():
                secrets[name] = env
    return catalog, secrets
