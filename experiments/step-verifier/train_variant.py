"""One reward-model training run of the step-verifier experiment (RESULTS.md), with the numbers `prefpipe train
--mode reward` does not print: the pairwise accuracy on the TRAINING pairs after training (the overfitting
check, on at most 1,000 of them) next to the held-out one. It builds the same TrainConfig as config.yaml
(held-out metrics only at the end unless eval_every is given) and runs the same RewardTrainer.

    python experiments/step-verifier/train_variant.py NAME [n=250] [steps=120] [lr=3e-4] [obj=pairwise]
        [sched=linear] [mb=16] [eval_every=STEPS] [fmt=plain|restate] [save=0|1]
        [train=runs/step-verifier/train-run/tree-search] [eval=runs/step-verifier/eval-run/tree-search]

n: a seeded sample (seed 0) of n training pairs. fmt=restate (a diagnostic: the scorer and tree search do not
know it) appends the last line of each side again, cut after its "=" (or "Answer:"), so the scored last token
is where the policy computes the result. Head-only training is measured by probe_features.py. One JSON line
per run is printed and appended to runs/step-verifier/variants.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.train.config import TrainConfig
from pipeline.train.data import read_table
from pipeline.train.reward import RewardTrainer

OUT = "runs/step-verifier"
name = sys.argv[1]
a = dict(kv.split("=", 1) for kv in sys.argv[2:])
n, steps, lr = int(a.get("n", 250)), int(a.get("steps", 120)), float(a.get("lr", 3e-4))
train_src = a.get("train", f"{OUT}/train-run/tree-search")
eval_src = a.get("eval", f"{OUT}/eval-run/tree-search")


def restate(resp: str) -> str:
    last = resp.split("\n")[-1]
    cut = last.rindex("=") + 1 if "=" in last else last.index(":") + 1 if ":" in last else len(last)
    return resp + "\n" + last[:cut]


def prep(path: str, k: int, tag: str) -> str:
    t = read_table(path)
    if k and k < t.num_rows:
        t = t.take(np.random.default_rng(0).permutation(t.num_rows)[:k])
    rows = t.select(["prompt_id", "prompt", "chosen", "rejected", "pair_type"]).to_pylist()
    if a.get("fmt", "plain") == "restate":
        for r in rows:
            r["chosen"], r["rejected"] = restate(r["chosen"]), restate(r["rejected"])
    out = f"{OUT}/variants/{name}-{tag}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


Path(f"{OUT}/variants").mkdir(parents=True, exist_ok=True)
source_pairs = read_table(train_src).num_rows
cfg = TrainConfig(model="tiny-policy", data=prep(train_src, n, "train"), mode="reward",
                  output_dir=f"{OUT}/variants/{name}", lr=lr, lr_schedule=a.get("sched", "linear"),
                  max_steps=steps, micro_batch=int(a.get("mb", 16)), progress=False, threads=1,
                  save_final=a.get("save", "0") == "1",
                  reward={"eval_data": prep(eval_src, 0, "eval"), "eval_every": int(a.get("eval_every", steps)),
                          "objective": a.get("obj", "pairwise")})
t0 = time.time()
trainer = RewardTrainer(cfg)
trainer.train()
# the overfitting check on (at most) the first 1,000 training pairs: they are a random sample already
k = min(len(trainer.data), 1000)
d = trainer.data
tra = trainer.evaluate(type(d)(d.prompt_ids[:k], d.pair_types[:k], d.full[:k], d.comparisons[:k]))
summary = json.loads(Path(f"{OUT}/variants/{name}/train_summary.json").read_text())
eva = summary["final_eval"]
res = {"name": name, "args": a, "source_pairs": source_pairs, "train_pairs": len(trainer.data),
       "train_acc_pairs": k, "train_acc": tra["accuracy"], "train_by": tra.get("by_pair_type"),
       "eval_acc": eva["accuracy"],
       "eval_by": eva.get("by_pair_type"), "evals": [(e["step"], round(e["accuracy"], 4)) for e in summary["evals"]],
       "last_loss": summary["last"]["loss"], "wall_s": round(time.time() - t0, 1)}
print(json.dumps(res))
with open(f"{OUT}/variants.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
