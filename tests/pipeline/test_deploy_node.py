"""L6 to a cluster node over SSH (a real sshd on 127.0.0.x, our SSHPool): the release copied to the node,
`current` switched there, the restart command run there, the live URL checked, old releases pruned."""

from __future__ import annotations

import os
import shutil
import signal

import httpx
import pytest

from dispatch.core.net import free_port
from dispatch.pipeline.results import Status

pytestmark = [pytest.mark.integration, pytest.mark.prefect]


def test_deploy_to_a_node_over_ssh_switches_restarts_checks_and_prunes(loopback_cluster, shop, prefect_api):
    from flows.layers.deploy import deploy

    shutil.copy(loopback_cluster.nodes_json, shop.home / "nodes.json")
    node = loopback_cluster.node("loop1")
    deploy_dir = loopback_cluster.home("loop1") / "apps" / "shop"  # deploy.dir ~/apps/shop: under the login's home
    port = free_port()
    restart = (f"kill -TERM -$(cat {deploy_dir}/http.pid) 2>/dev/null; sleep 0.3; "
               f"setsid python3 -m http.server {port} --bind {node['host']} --directory {deploy_dir}/current "
               f">/dev/null 2>&1 </dev/null & echo $! > {deploy_dir}/http.pid")
    shop.save(deploy={"target": "loop1", "dir": "~/apps/shop", "restart": restart, "keep": 1, "timeout": "15s",
                      "health": f"http://{node['host']}:{port}/app/main.py"})
    run_dir = str(shop.home / "run")
    try:
        first = deploy("shop", str(shop.code), run_dir, shop.load())
        assert first.status is Status.PASS, first.reason
        assert first.evidence["target"] == "loop1"
        live = httpx.get(f"http://{node['host']}:{port}/app/search.py", timeout=5).text
        assert live == (shop.code / "app" / "search.py").read_text()

        shop.repair("app/search.py")
        second = deploy("shop", str(shop.code), run_dir, shop.load())
        assert second.status is Status.PASS, second.reason
        assert (deploy_dir / "current").resolve().name == second.evidence["revision"]
        assert second.evidence["removed"] == [first.evidence["revision"]]
        assert [p.name for p in (deploy_dir / "releases").iterdir()] == [second.evidence["revision"]]
        assert "escape(q)" in httpx.get(f"http://{node['host']}:{port}/app/search.py", timeout=5).text
    finally:
        pid_file = deploy_dir / "http.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
