#!/bin/sh
# L6's restart command for the shop (run in the new release's directory, <dir>/current):
# stop the shop this script started last time (its pid file, never "whatever holds the port"), start the
# new release on 127.0.0.1:8765. DEPLOY_DIR and PYTHON (the build's interpreter) come from the pipeline.
# (No `kill -- -PGID`: dash, Debian's /bin/sh, refuses the `--` and the old release would live on.)
set -eu
pidfile="$DEPLOY_DIR/shop.pid"
if [ -f "$pidfile" ]; then
  old=$(cat "$pidfile")
  kill -TERM "-$old" 2>/dev/null || true
  i=0
  while kill -0 "-$old" 2>/dev/null; do  # gone within 10 s, else killed
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then kill -KILL "-$old" 2>/dev/null || true; break; fi
    sleep 0.1
  done
fi
setsid "$PYTHON" -m uvicorn app.main:app --host 127.0.0.1 --port "${SHOP_PORT:-8765}" \
  >"$DEPLOY_DIR/shop.log" 2>&1 </dev/null &
echo $! >"$pidfile"
