#!/usr/bin/env bash
# bash examples/server/run_server.sh [-m WEIGHT_DIR] [--port 8000] [--host 127.0.0.1] [--max_batch_size N]
#                                    [--mlgc off|auto|PLAN] [more: python -m atb_llm.entrypoints.openai --help]
# No -m: the default model. Then open http://HOST:PORT/ in a browser and chat.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
exec "$PY" -m atb_llm.entrypoints.openai "$@"
