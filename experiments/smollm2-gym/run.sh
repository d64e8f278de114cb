#!/usr/bin/env bash
# SmolLM2-135M-Instruct on reasoning-gym chain_sum, end to end on CPU (see RESULTS.md for the numbers):
#   1. the flow: tree search (rollout values), sample pairs, intervention, DPO + its NLL control, evals of
#      base / tree-dpo / nll-control on 500 held-out problems, report, export;
#   2. `prefpipe eval --task` on base and both arms (same problems as the flow's eval);
#   3. the issue's measurements from the finished run (measure.py), re-searching TOKENS problems to count
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
# before / after with the eval command itself (the same 500 problems as the flow's eval step)
opts=(--option min_terms=2 --option max_terms=2 --option min_digits=1 --option max_digits=1 --option system_prompt=null)
for m in smollm2-135m runs/smollm2-gym/train/tree-dpo/final runs/smollm2-gym/train/nll-control/final; do
  .venv/bin/prefpipe eval --task "reasoning-gym:chain_sum" "${opts[@]}" --n 500 --seed 1 --model "$m" \
    --max-tokens 16 --batch-size 100
done
start=$(date +%s)
.venv/bin/python experiments/smollm2-gym/measure.py experiments/smollm2-gym/config.yaml --tokens "$TOKENS"
echo "measure wall: $(( $(date +%s) - start )) s"
