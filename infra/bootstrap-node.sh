#!/usr/bin/env bash
# Prepare a Debian/Ubuntu machine to be a node (or the gateway): python3 with venv, git, a `dispatch`
# system user and its directories. Safe to run again; prints what it did.
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  echo "installed: ${need[*]}"
else
  echo "python3, python3-venv and git already present"
fi

if id dispatch >/dev/null 2>&1; then
  echo "user dispatch exists"
else
  useradd --system --create-home --home-dir /var/lib/oyster-dispatch --shell /bin/bash dispatch
  echo "created system user dispatch (home /var/lib/oyster-dispatch)"
fi

install -d -m 0755 -o dispatch -g dispatch /var/lib/oyster-dispatch
install -d -m 0755 -o root -g root /opt/oyster-dispatch
echo "directories: /var/lib/oyster-dispatch (state, owned by dispatch), /opt/oyster-dispatch (the venv)"
python3 --version
