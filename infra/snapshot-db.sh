#!/usr/bin/env bash
# Snapshot the team server's Prefect database (pg_dump, custom format) and DISPATCH_HOME's history into one
# checksummed archive, keeping the newest archive of each of the last KEEP days. A thin wrapper of
# `dispatch snapshot`, kept for the cron jobs and timers that call it; the daily `snapshot` deployment of
# prefect.yaml does the same as a Prefect flow.
#
#   snapshot-db.sh [DEST_DIR] [KEEP]      defaults: /var/backups/oyster-dispatch, 14
#
# The database URL comes from PREFECT_API_DATABASE_CONNECTION_URL (as in /etc/oyster-dispatch/server.env:
# `set -a; . /etc/oyster-dispatch/server.env; set +a`) or DISPATCH_SNAPSHOT_DATABASE_URL; the password goes
# to pg_dump in its environment, never on its command line. DISPATCH points at the dispatch command (default:
# /opt/oyster-dispatch/.venv/bin/dispatch, else the one on PATH). Restore with `dispatch restore <archive>`.
set -euo pipefail

dest=${1:-/var/backups/oyster-dispatch}
keep=${2:-14}
case $keep in ''|*[!0-9]*|0) echo "KEEP must be a positive number, got '$keep'" >&2; exit 2 ;; esac
if [[ -z ${PREFECT_API_DATABASE_CONNECTION_URL:-} && -z ${DISPATCH_SNAPSHOT_DATABASE_URL:-} ]]; then
    echo "set PREFECT_API_DATABASE_CONNECTION_URL (see server.env) or DISPATCH_SNAPSHOT_DATABASE_URL" >&2
    exit 2
fi

dispatch=${DISPATCH:-/opt/oyster-dispatch/.venv/bin/dispatch}
[[ -x $dispatch ]] || dispatch=$(command -v dispatch || true)
[[ -n $dispatch ]] || { echo "dispatch not found: set DISPATCH=/path/to/.venv/bin/dispatch" >&2; exit 2; }
umask 077
exec "$dispatch" snapshot --dest "$dest" --keep "$keep"
