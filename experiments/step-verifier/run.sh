#!/usr/bin/env bash
# The step-verifier measurement (RESULTS.md): step pairs from tree search on training problems of the bundled task,
# a reward model trained on 250 / 1,000 / all of them, scored on step pairs from eval problems that the exact step
# verifier labelled. Run from the repository root; outputs go to runs/step-verifier/.
set -euo pipefail
OUT=${OUT:-runs/step-verifier}
N_TRAIN=${N_TRAIN:-4000}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
P=.venv/bin/prefpipe
SEARCH="--shard-size 100 --variant best_first --value-fn step_verifier --best-first-k 4 --expansion-budget 6
        --validity-rollouts 0 --temperature 1.0 --top-p 1.0 --top-k 0"
$P task make --out "$OUT/task" --n "$N_TRAIN" --split train
$P task make --out "$OUT/task" --n 600 --split eval
# shellcheck disable=SC2086
$P stage tree-search -i "$OUT/task/eval.parquet" -o "$OUT/eval-run" $SEARCH
# shellcheck disable=SC2086
$P stage tree-search -i "$OUT/task/train.parquet" -o "$OUT/train-run" $SEARCH
for n in 250 1000 all; do
  .venv/bin/python - "$OUT" "$n" <<'PY'
import sys
import numpy as np
import pyarrow.parquet as pq
from pipeline.train.data import read_table
out, n = sys.argv[1], sys.argv[2]
t = read_table(f"{out}/train-run/tree-search")
if n != "all":
    t = t.take(np.random.default_rng(0).permutation(t.num_rows)[:int(n)])
pq.write_table(t, f"{out}/train-{n}.parquet")
PY
  $P train experiments/step-verifier/config.yaml --data "$OUT/train-$n.parquet" -o "$OUT/rm-$n" \
    --reward.eval-data "$OUT/eval-run/tree-search"
done
