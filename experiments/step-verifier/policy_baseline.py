"""The policy's own ranking of the eval pairs, for comparison with the verifier: the share of pairs whose chosen
side has the higher summed log-prob under the tiny policy (the sides share the prompt and the prefix, so the sum
compares the differing steps). Usage: python experiments/step-verifier/policy_baseline.py EVAL_PAIRS"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

from pipeline.backends import make_backend
from pipeline.train.data import read_table

rows = read_table(sys.argv[1]).to_pylist()
backend = make_backend("transformers", "tiny-policy", device="cpu")
res = backend.logprobs([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
right = defaultdict(list)
for r, c, j in zip(rows, res[:len(rows)], res[len(rows):]):
    right[r["pair_type"]].append(c.total > j.total)
print(json.dumps({k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(right.items())}))
