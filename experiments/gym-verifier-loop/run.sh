#!/usr/bin/env bash
# The verifier loop on reasoning-gym chain_sum with SmolLM2 (config.yaml; numbers in RESULTS.md).
#   1. the base model's eval on the 500 eval problems is experiments/smollm2-gym's (same model, problems, tokens and
#      code; the flow skips an eval whose file exists): copied when this run has none. SOURCE=none: computed here.
#   2. the flow: rollout-valued search, verifier, learned-value search on the new problems, the DPO arm on its pairs, evals, report;
#   3. measure.py: the verifier's pairwise accuracy on the learned search's pairs (new problems), terminal-pair
#      agreement with the gym scorer, validity, pairs per 1,000 generated tokens (re-search of TOKENS problems).
# Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
SOURCE=${SOURCE:-runs/smollm2-gym}
RUN=runs/gym-verifier-loop
TOKENS=${TOKENS:-20}
if [ "$SOURCE" != none ] && [ -f "$SOURCE/eval/base.json" ] && [ ! -e "$RUN/eval/base.json" ]; then
  mkdir -p "$RUN/eval" && cp "$SOURCE/eval/base.json" "$RUN/eval/base.json"
fi
start=$(date +%s)
.venv/bin/prefpipe run experiments/gym-verifier-loop/config.yaml --no-prefect
echo "flow wall: $(( $(date +%s) - start )) s"
start=$(date +%s)
.venv/bin/python experiments/gym-verifier-loop/measure.py experiments/gym-verifier-loop/config.yaml --tokens "$TOKENS"
echo "measure wall: $(( $(date +%s) - start )) s"
