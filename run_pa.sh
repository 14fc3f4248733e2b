#!/usr/bin/env bash
# bash run_pa.sh [-m WEIGHT_DIR] [--world_size N] [run_pa options...]   (no -m: the default model)
# --world_size N: tensor parallel over N ranks (torchrun --nproc_per_node N -m examples.run_pa ...)
# Options: python -m examples.run_pa --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
WORLD=1
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --world_size) WORLD="$2"; shift 2 ;;
    --world_size=*) WORLD="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if ! [[ "$WORLD" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_pa.sh: --world_size $WORLD must be a positive number of ranks" >&2
  exit 2
fi
if [ "$WORLD" = 1 ]; then
  exec "$PY" -m examples.run_pa "${ARGS[@]+"${ARGS[@]}"}"
fi
exec "$PY" -m torch.distributed.run --nproc_per_node "$WORLD" -m examples.run_pa "${ARGS[@]+"${ARGS[@]}"}"
