#!/usr/bin/env bash
# Install (or update) a Prefect worker for one node pool; safe to run again.
#
#   PREFECT_API_AUTH_STRING=user:password sudo -E ./install-worker.sh NODE PACKAGE API_URL
#
#   NODE     the node's name in nodes.json: the worker serves pool node-NODE
#   PACKAGE  what pip installs: a checkout path (/srv/oyster-dispatch) or a URL (git+https://..., a wheel)
#   API_URL  the team server, e.g. http://gateway:4200/api
#
# Run bootstrap-node.sh first (python3, git, the dispatch user). The auth string comes from the environment,
# never the command line (it would show in `ps`). Writes /etc/oyster-dispatch/worker.env (0640, group dispatch).
set -euo pipefail

[ $# -eq 3 ] || { echo "usage: $0 NODE PACKAGE API_URL" >&2; exit 2; }
node=$1 package=$2 api_url=$3
prefix=/opt/oyster-dispatch
env_dir=/etc/oyster-dispatch
unit_src="$(cd "$(dirname "$0")" && pwd)/prefect-worker@.service"

[ "$(id -u)" -eq 0 ] || { echo "run as root (systemd unit, /etc, /opt)" >&2; exit 2; }
id dispatch >/dev/null 2>&1 || { echo "no 'dispatch' user: run bootstrap-node.sh first" >&2; exit 2; }
case $node in *[!A-Za-z0-9._-]*|'') echo "bad node name: $node" >&2; exit 2 ;; esac

[ -x "$prefix/.venv/bin/python" ] || python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/pip" install -q --disable-pip-version-check --upgrade "$package"
echo "installed $package into $prefix/.venv"

install -d -m 0750 -o root -g dispatch "$env_dir"
umask 027
tmp=$(mktemp "$env_dir/.worker.env.XXXXXX")
{
  echo "PREFECT_API_URL=$api_url"
  [ -n "${PREFECT_API_AUTH_STRING:-}" ] && echo "PREFECT_API_AUTH_STRING=$PREFECT_API_AUTH_STRING"
  echo "DISPATCH_HOME=/var/lib/oyster-dispatch"
  echo "PREFECT_SERVER_ANALYTICS_ENABLED=false"
} > "$tmp"
chgrp dispatch "$tmp" && mv "$tmp" "$env_dir/worker.env"
echo "wrote $env_dir/worker.env (PREFECT_API_URL=$api_url${PREFECT_API_AUTH_STRING:+, with auth})"

install -m 0644 "$unit_src" /etc/systemd/system/prefect-worker@.service
systemctl daemon-reload
systemctl enable "prefect-worker@$node.service"
systemctl restart "prefect-worker@$node.service"
echo "enabled and (re)started prefect-worker@$node (pool node-$node)"
