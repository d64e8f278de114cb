"""Best-first search valued by rollouts vs by a learned reward model, on the same eval problems (issue #30's
second check). For each value function: the step pairs it mines, the share whose order holds under fresh
rollouts (the stage's validity check, `validity_rollouts` per side, another seed), and the tokens the SEARCH
generated (step expansions + value rollouts; the validity check's rollouts are the measurement, counted apart).

Usage: python experiments/step-verifier/search_compare.py PROBLEMS [START:]END OUT.jsonl rollout|reward_model [DIR]
START:END (START a multiple of 10, default 0) searches problems START..END-1; a chunk's seed is its index in the
whole file (first problem // 10), so a run that starts later gives the same chunks as one that started at 0.
STEP_MIN_MARGIN (env, default the stage's 0.375): first_wrong_step keeps a (right, wrong) sibling pair only when
its VALUES differ by this much; with learned values that is the verifier's own confidence, 0 keeps every pair
the exact step check labels.
Problems are searched in chunks of 10; each chunk appends one JSON line to OUT, so a cut run keeps its chunks.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pyarrow.parquet as pq

import stages.tree_search as ts
from pipeline.backends import make_backend
from pipeline.stage import StageContext
from stages.tree.mining import STEP_TYPES

problems, span, out, value_fn = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
first, end = (int(x) for x in span.split(":")) if ":" in span else (0, int(span))
if first % 10:
    print(f"error: START {first} is not a multiple of 10 (chunk seeds follow the chunk's index)", file=sys.stderr)
    sys.exit(2)
model_dir = sys.argv[5] if len(sys.argv) > 5 else None
backend = make_backend("transformers", "tiny-policy", device="cpu")
tokens = {"search": 0, "validity": 0}
phase = ["search"]


def counted(fn):
    def call(*a, **k):
        res = fn(*a, **k)
        tokens[phase[0]] += sum(c.n_tokens for cs in res for c in cs)
        return res
    return call


backend.generate, backend.continue_ = counted(backend.generate), counted(backend.continue_)
real_check = ts.check_pairs


def check(*a, **k):  # the validity check's tokens are the measurement, not the search's cost
    phase[0] = "validity"
    try:
        return real_check(*a, **k)
    finally:
        phase[0] = "search"


ts.check_pairs = check
cfg = ts.TreeSearchConfig(variant="best_first", value_fn=value_fn, value_model=model_dir, rollouts=8,
                          best_first_k=4, expansion_budget=6, validity_rollouts=8, temperature=1.0, top_p=1.0,
                          top_k=0, step_min_margin=float(os.environ.get("STEP_MIN_MARGIN", 0.375)))
table = pq.read_table(problems).slice(0, end)
for start in range(first, table.num_rows, 10):
    before, t0 = dict(tokens), time.time()
    res = ts.run(table.slice(start, 10), cfg, backend, StageContext("search-compare", start // 10, 0))
    step = [p for p in res["main"].to_pylist() if p["status"] == "ok" and p["pair_type"] in STEP_TYPES]
    holds = [json.loads(p["extra"])["order_holds"] for p in step if "order_holds" in json.loads(p["extra"])]
    row = {"value_fn": value_fn, "step_min_margin": cfg.step_min_margin, "first_problem": start,
           "problems": min(10, table.num_rows - start),
           "step_pairs": len(step), "checked": len(holds), "order_holds": sum(holds),
           "search_tokens": tokens["search"] - before["search"],
           "validity_tokens": tokens["validity"] - before["validity"], "wall_s": round(time.time() - t0, 1)}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
