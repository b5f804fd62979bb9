#!/usr/bin/env bash
# Prepare a Debian/Ubuntu machine to be a node: python3 (with venv), git, the dispatcher's login user and its
# run directory ~/dispatch, the node runner, and optionally Node.js with agent CLIs and the Prefect worker.
# Idempotent: a second run changes nothing and says "no change". Run as root (sudo -n works).
#
#   bootstrap-node.sh [--user NAME] [--runner-dir DIR] [--agents claude,codex,opencode]
#                     [--authorized-key 'ssh-ed25519 AAAA... comment']
#                     [--worker NODE --package PACKAGE --api-url URL]
#
#   --user NAME        the login user the dispatcher connects as (default dispatch, home /var/lib/oyster-dispatch)
#   --runner-dir DIR   where the runner's zipapp runner.pyz is (default: beside this script, else built from the
#                      checkout's dispatch/runner/); installed as ~NAME/dispatch/.runner/<checksum>/runner.pyz
#   --agents LIST      npm install -g the agent CLIs (Node.js from apt if missing); nothing is fetched without it
#   --authorized-key K a public key appended to ~NAME/.ssh/authorized_keys when missing
#   --worker NODE      a Prefect worker for pool node-NODE as the unit prefect-worker@NODE (as user dispatch);
#                      needs --package (what pip installs) and --api-url; PREFECT_API_AUTH_STRING from the env
#
# API keys are never written here: the dispatcher sends them with each attempt, on the runner's stdin.
# Exit codes: 0 done, 1 a step failed, 2 bad arguments or not root.
set -euo pipefail

user=dispatch runner_dir="" agents="" authorized_key="" worker="" package="" api_url=""
usage() { sed -n "6,19p" "$0" | sed "s/^# \{0,1\}//" >&2; exit "${1:-2}"; }
die() { echo "error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --user) user=${2:?--user needs a name}; shift 2 ;;
    --runner-dir) runner_dir=${2:?--runner-dir needs a directory}; shift 2 ;;
    --agents) agents=${2:?--agents needs a list}; shift 2 ;;
    --authorized-key) authorized_key=${2:?--authorized-key needs a public key}; shift 2 ;;
    --worker) worker=${2:?--worker needs the node name}; shift 2 ;;
    --package) package=${2:?--package needs a path or URL}; shift 2 ;;
    --api-url) api_url=${2:?--api-url needs the server URL}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (or through sudo): it creates a user and may install packages"
case $user in [a-z_]*) ;; *) die "--user '$user': must start with a lower-case letter or _" ;; esac
case $user in *[!a-z0-9_-]*) die "--user '$user': only a-z, 0-9, _ and - (a Debian login name)" ;; esac
[ ${#user} -le 32 ] || die "--user '$user': at most 32 characters"
declare -A npm_package=([claude]=@anthropic-ai/claude-code [codex]=@openai/codex [opencode]=opencode-ai)
IFS=, read -r -a wanted_agents <<< "$agents"
for agent in "${wanted_agents[@]}"; do
  [ -n "${npm_package[$agent]:-}" ] || die "--agents: unknown agent '$agent' (known: claude, codex, opencode)"
done
if [ -n "$worker" ]; then
  case $worker in ''|*[!A-Za-z0-9._-]*) die "--worker '$worker': a node name of A-Z, a-z, 0-9, '.', '_', '-'" ;; esac
  if [ -z "$package" ] || [ -z "$api_url" ]; then die "--worker needs --package (a checkout or URL) and --api-url"; fi
  case $api_url in http://*|https://*) ;; *) die "--api-url '$api_url': an http:// or https:// URL" ;; esac
  case $api_url$package in *[[:space:]]*) die "--api-url and --package: no spaces or line breaks" ;; esac
fi
case $authorized_key in ''|ssh-*|ecdsa-*|sk-*) ;; *) die "--authorized-key: not an OpenSSH public key line" ;; esac
case $authorized_key in *$'\n'*) die "--authorized-key: one line only" ;; esac

script_dir=$(cd "$(dirname "$0")" && pwd)
changes=0
changed() { echo "changed: $*"; changes=$((changes + 1)); }
ok() { echo "ok: $*"; }

# --- packages: apt only for what is missing ---------------------------------------------------------------
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
[ ${#wanted_agents[@]} -eq 0 ] || command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  changed "installed ${need[*]}"
else
  ok "python3 ($(python3 -V 2>&1)), venv, git$([ ${#wanted_agents[@]} -eq 0 ] || echo ', npm') present"
fi

# --- the login user and its run directory -----------------------------------------------------------------
# make_user NAME: a login user; `dispatch` (the worker unit's user) lives in /var/lib/oyster-dispatch
make_user() {
  if id "$1" >/dev/null 2>&1; then ok "user $1 exists"; return; fi
  local home_opt=()
  [ "$1" != dispatch ] || home_opt=(--home-dir /var/lib/oyster-dispatch)
  useradd --create-home "${home_opt[@]}" --shell /bin/bash "$1"
  usermod --password '*' "$1"  # no password, but not locked: sshd without PAM refuses locked accounts
  changed "created user $1"
}
make_user "$user"
[ -z "$worker" ] || [ "$user" = dispatch ] || make_user dispatch
group=$(id -gn "$user")
home=$(getent passwd "$user" | cut -d: -f6)
[ -d "$home" ] || die "user $user has no home directory ($home)"

# make_dir PATH MODE [OWNER]: create it owned by OWNER (default the user); an existing one is left as it is
make_dir() {
  if [ -d "$1" ]; then ok "$1 exists"; return; fi
  install -d -m "$2" -o "${3:-$user}" -g "$(id -gn "${3:-$user}")" "$1"
  changed "created $1"
}
make_dir "$home/dispatch" 0700
# a worker runs specs as its unit's user, under that user's home (remote_root is relative to it)
[ -z "$worker" ] || make_dir "$(getent passwd dispatch | cut -d: -f6)/dispatch" 0700 dispatch

if [ -n "$authorized_key" ]; then
  make_dir "$home/.ssh" 0700
  keys=$home/.ssh/authorized_keys
  if [ -f "$keys" ] && grep -qxF -- "$authorized_key" "$keys"; then
    ok "the key is in $keys"
  else
    printf '%s\n' "$authorized_key" >> "$keys"
    chown "$user:$group" "$keys"
    chmod 0600 "$keys"
    changed "added the key to $keys"
  fi
fi

# --- the node runner, where the dispatcher looks for it: ~/dispatch/.runner/<checksum>/ --------------------
runner="" built=""
if [ -n "$runner_dir" ]; then
  [ -f "$runner_dir/runner.pyz" ] || die "--runner-dir $runner_dir: no runner.pyz there"
  runner=$runner_dir/runner.pyz
elif [ -f "$script_dir/runner.pyz" ]; then
  runner=$script_dir/runner.pyz
elif [ -f "$script_dir/../dispatch/runner/zipapp.py" ]; then  # a checkout: build the zipapp as the dispatcher does
  runner=$(mktemp) built=$runner
  PYTHONPATH="$script_dir/.." python3 -c \
    'import sys; from dispatch.runner import zipapp; sys.stdout.buffer.write(zipapp.build().data)' > "$runner"
fi
if [ -n "$runner" ]; then
  # the runner's version, as the dispatcher computes it (dispatch/runner/zipapp.py): the zipapp's sha256
  checksum=$(sha256sum "$runner" | cut -c1-16)
  make_dir "$home/dispatch/.runner" 0755
  make_dir "$home/dispatch/.runner/$checksum" 0755
  dest=$home/dispatch/.runner/$checksum/runner.pyz
  if cmp -s "$runner" "$dest"; then
    ok "$dest is current"
  else
    install -m 0644 -o "$user" -g "$group" "$runner" "$dest"
    changed "installed $dest"
  fi
  [ -z "$built" ] || rm -f -- "$built"
else
  ok "no runner given (--runner-dir): the dispatcher ships it on first use"
fi

# --- agent CLIs, only when asked --------------------------------------------------------------------------
for agent in "${wanted_agents[@]}"; do
  if command -v "$agent" >/dev/null; then
    ok "$agent present ($(command -v "$agent"))"
  else
    npm install -g --no-fund --no-audit "${npm_package[$agent]}"
    changed "npm installed ${npm_package[$agent]}"
  fi
done

# --- the Prefect worker, for worker nodes -----------------------------------------------------------------
# put_file SOURCE DEST MODE GROUP: replace DEST only when its content differs; status 0 when it did. Called
# in an `&&` list, where `set -e` does not apply inside: a failing install exits explicitly.
put_file() {
  if cmp -s "$1" "$2"; then ok "$2 is current"; return 1; fi
  install -m "$3" -o root -g "$4" "$1" "$2" || exit 1
  changed "wrote $2"
}
if [ -n "$worker" ]; then
  prefix=/opt/oyster-dispatch env_dir=/etc/oyster-dispatch unit=prefect-worker@$worker.service restart=0
  if [ -x "$prefix/.venv/bin/prefect" ]; then
    ok "$prefix/.venv has prefect (update it with install-worker.sh)"
  else
    install -d -m 0755 "$prefix"
    [ -x "$prefix/.venv/bin/python" ] || python3 -m venv "$prefix/.venv"
    "$prefix/.venv/bin/pip" install -q --disable-pip-version-check "$package"
    changed "installed $package into $prefix/.venv"
  fi
  install -d -m 0750 -o root -g dispatch "$env_dir"
  tmp=$(mktemp)
  trap 'rm -f -- "$tmp"' EXIT
  {
    echo "PREFECT_API_URL=$api_url"
    [ -z "${PREFECT_API_AUTH_STRING:-}" ] || echo "PREFECT_API_AUTH_STRING=$PREFECT_API_AUTH_STRING"
    echo "DISPATCH_HOME=/var/lib/oyster-dispatch"
    echo "PREFECT_SERVER_ANALYTICS_ENABLED=false"
  } > "$tmp"
  put_file "$tmp" "$env_dir/worker.env" 0640 dispatch && restart=1
  put_file "$script_dir/prefect-worker@.service" /etc/systemd/system/prefect-worker@.service 0644 root && restart=1
  if [ -d /run/systemd/system ]; then
    [ $restart -eq 0 ] || systemctl daemon-reload
    if systemctl is-enabled --quiet "$unit"; then
      ok "$unit enabled"
    else
      systemctl enable --quiet "$unit"
      changed "enabled $unit"
    fi
    if ! systemctl is-active --quiet "$unit"; then
      systemctl start "$unit"
      changed "started $unit"
    elif [ $restart -eq 1 ]; then
      systemctl restart "$unit"
      changed "restarted $unit"
    else
      ok "$unit running"
    fi
  else
    echo "note: systemd is not running here: $unit is installed, not started (systemctl enable --now $unit)"
  fi
fi

if [ $changes -eq 0 ]; then echo "no change"; else echo "$changes change(s)"; fi
