#!/usr/bin/env bash
# SmolLM2-135M-Instruct on reasoning-gym chain_sum, end to end on CPU (see RESULTS.md for the numbers):
#   1. the flow: tree search (rollout values), sample pairs, intervention, DPO + its NLL control, evals of
#      base / tree-dpo / nll-control on 500 held-out problems, report, export;
#   2. the issue's measurements from the finished run (measure.py), re-searching TOKENS problems to count
#      generated tokens.
# Run from the repository root. TOKENS=0 skips the re-search.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
TOKENS=${TOKENS:-20}
start=$(date +%s)
.venv/bin/prefpipe run experiments/smollm2-gym/config.yaml --no-prefect
echo "flow wall: $(( $(date +%s) - start )) s"
start=$(date +%s)
.venv/bin/python experiments/smollm2-gym/measure.py experiments/smollm2-gym/config.yaml --tokens "$TOKENS"
echo "measure wall: $(( $(date +%s) - start )) s"
