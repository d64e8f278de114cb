#!/usr/bin/env bash
# Run bench/gpu_check.py with a Python that has torch; from anywhere (it cds to the repo root):
#     bash bench/gpu_check.sh [--out bench/gpu_check_results.json] [--peak-flops 989e12] [other gpu_check.py options]
# Python: .venv/bin/python, python3 or python, the first that imports torch; if none does, .venv-gpu is made
# with `pip install -e .` (needs the package registry). Missing pure-Python needs (e.g. pydantic on a machine
# that has torch but no network) are installed from wheels in .whl/ when that folder exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for p in .venv/bin/python .venv-gpu/bin/python python3 python; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' 2>/dev/null; then PY=$p; break; fi
done
if [ -z "$PY" ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -e .
  PY=.venv-gpu/bin/python
fi
if ! "$PY" -c 'import pydantic, transformers, pyarrow, yaml' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" bench/gpu_check.py "$@"
