#!/usr/bin/env bash
# Snapshot the team server's PostgreSQL database with pg_dump (custom format), keeping the newest KEEP.
#
#   snapshot-db.sh [DEST_DIR] [KEEP]      defaults: /var/backups/oyster-dispatch, 14
#
# The database URL comes from PREFECT_API_DATABASE_CONNECTION_URL (as in /etc/oyster-dispatch/server.env:
# `set -a; . /etc/oyster-dispatch/server.env; set +a`); the +asyncpg driver suffix is dropped for pg_dump.
# Run it from cron or a systemd timer; restore with `pg_restore --clean -d <db> <file>`.
set -euo pipefail

dest=${1:-/var/backups/oyster-dispatch}
keep=${2:-14}
url=${PREFECT_API_DATABASE_CONNECTION_URL:?set PREFECT_API_DATABASE_CONNECTION_URL (see server.env)}
url=${url/postgresql+asyncpg:/postgresql:}
case $keep in ''|*[!0-9]*|0) echo "KEEP must be a positive number, got '$keep'" >&2; exit 2 ;; esac

command -v pg_dump >/dev/null || PATH="$PATH:$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)"
command -v pg_dump >/dev/null || { echo "pg_dump not found: apt-get install -y postgresql-client" >&2; exit 2; }
umask 077
mkdir -p "$dest"
file="$dest/prefect-$(date -u +%Y%m%dT%H%M%SZ).dump"
trap 'rm -f -- "$file.partial"' EXIT
pg_dump --format=custom --no-owner --file="$file.partial" "$url"
mv "$file.partial" "$file"
echo "wrote $file ($(du -h "$file" | cut -f1))"

# Rotation: the names sort by time; delete all but the newest $keep.
mapfile -t old < <(find "$dest" -maxdepth 1 -name 'prefect-*.dump' | sort | head -n -"$keep")
for f in "${old[@]}"; do rm -f -- "$f" && echo "removed $f"; done
