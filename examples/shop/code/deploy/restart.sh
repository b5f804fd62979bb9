#!/bin/sh
# L6's restart command for the shop (run in the new release's directory, <dir>/current):
# stop the shop this script started last time (its pid file, never "whatever holds the port"), start the
# new release on 127.0.0.1:8765. DEPLOY_DIR and PYTHON (the build's interpreter) come from the pipeline.
set -eu
pidfile="$DEPLOY_DIR/shop.pid"
if [ -f "$pidfile" ]; then
  kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || true
  sleep 0.5
fi
setsid "$PYTHON" -m uvicorn app.main:app --host 127.0.0.1 --port "${SHOP_PORT:-8765}" \
  >"$DEPLOY_DIR/shop.log" 2>&1 </dev/null &
echo $! >"$pidfile"
