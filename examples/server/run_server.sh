#!/usr/bin/env bash
# bash examples/server/run_server.sh [-m WEIGHT_DIR] [--port 8000] [--host 127.0.0.1] [--max_batch_size N]
#                                    [--mlgc off|auto|PLAN] [more: python -m examples.server --help]
# No -m: the default model. Then open http://HOST:PORT/ in a browser and chat.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -m) args+=(--model_path "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$ROOT"
exec "$PY" -m examples.server "${args[@]}"
