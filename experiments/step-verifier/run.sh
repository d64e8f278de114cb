#!/usr/bin/env bash
# The step-verifier measurement (RESULTS.md): step pairs from tree search on training problems of the bundled task,
# a reward model trained on 250 / 1,000 / 4,000 of them, scored on step pairs from eval problems that the exact
# step verifier labelled; then best-first search valued by rollouts (N = 8) vs by the 4,000-pair reward model on
# the same eval problems. Run from the repository root; outputs go to runs/step-verifier/.
#   N_TRAIN (4000) training problems; N_SEARCH eval problems for the search comparison (500; RESULTS.md's were
#   run as 200, then START:END 190:500 into search-*-ext.jsonl, which gives the same chunks: seeds follow the index).
set -euo pipefail
OUT=${OUT:-runs/step-verifier}
N_TRAIN=${N_TRAIN:-4000}
N_SEARCH=${N_SEARCH:-500}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
P=.venv/bin/prefpipe
PY=.venv/bin/python
D=experiments/step-verifier
SEARCH="--shard-size 100 --variant best_first --value-fn step_verifier --best-first-k 4 --expansion-budget 6
        --validity-rollouts 0 --temperature 1.0 --top-p 1.0 --top-k 0"
$P task make --out "$OUT/task" --n "$N_TRAIN" --split train
$P task make --out "$OUT/task" --n 600 --split eval
# shellcheck disable=SC2086
$P stage tree-search -i "$OUT/task/eval.parquet" -o "$OUT/eval-run" $SEARCH
# shellcheck disable=SC2086
$P stage tree-search -i "$OUT/task/train.parquet" -o "$OUT/train-run" $SEARCH
# Is the signal in the frozen policy (head-only probes, the policy's own log-probs)?
$PY $D/probe_features.py 1000
# The curve (config.yaml's recipe; train_variant.py = prefpipe train --mode reward + the training-set accuracy)
for n in 250 1000 4000; do
  save=0; [ "$n" = 4000 ] && save=1
  $PY $D/train_variant.py "pw-$n" n=$n steps=120 lr=3e-4 save=$save
done
# Variants: Tree-PLV's step_ranking; a lower lr with more steps on all the data
$PY $D/train_variant.py sr-1k n=1000 steps=120 lr=3e-4 obj=step_ranking
$PY $D/train_variant.py lowlr-4000 n=4000 steps=480 lr=1e-4 eval_every=120
# Search: rollout values vs learned values, same problems, validity re-checked with 8 fresh rollouts per side
$PY $D/search_compare.py "$OUT/task/eval.parquet" "$N_SEARCH" "$OUT/search-rollout.jsonl" rollout
$PY $D/search_compare.py "$OUT/task/eval.parquet" "$N_SEARCH" "$OUT/search-learned.jsonl" reward_model \
  "$OUT/variants/pw-4000/final"
STEP_MIN_MARGIN=0 $PY $D/search_compare.py "$OUT/task/eval.parquet" "$N_SEARCH" "$OUT/search-learned-m0.jsonl" \
  reward_model "$OUT/variants/pw-4000/final"
$PY $D/policy_baseline.py "$OUT/eval-run/tree-search"
# Synthetic one-digit-slip pairs from training problems (no search), scored on the same 650 eval pairs (RESULTS.md 5)
$PY $D/synthetic_pairs.py "$OUT/synthetic/pairs-12k.parquet" n_problems=12000 slip=policy
$PY $D/synthetic_pairs.py "$OUT/synthetic/pairs-uniform-12k.parquet" n_problems=12000 slip=uniform
syn() { $P train $D/synthetic.yaml --reward.eval-data "$OUT/eval-run/tree-search" "$@"; }
syn --data "$OUT/synthetic/pairs-12k.parquet" --max-steps 300 --output-dir "$OUT/synthetic/probe-300"
syn --data "$OUT/synthetic/pairs-uniform-12k.parquet" --max-steps 300 --lr 1e-3 --reward.eval-every 150 \
  --output-dir "$OUT/synthetic/probe-uniform-lr1e-3"
syn --data "$OUT/synthetic/pairs-12k.parquet" --max-steps 1600 --reward.eval-every 125 --save-final \
  --output-dir "$OUT/synthetic/syn-1600"
