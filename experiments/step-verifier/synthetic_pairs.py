"""Synthetic step pairs for the step verifier (RESULTS.md, "Synthetic one-digit slips"): no tree search, only the
bundled task's generator and its gold solutions.

    python experiments/step-verifier/synthetic_pairs.py OUT.parquet [n_problems=20000] [seed=0] [slip=policy]
        [first=0]

Problems: the TRAINING split of the bundled task at the tiny policy's difficulty (`ArithTask().make(n, "train")`,
what `prefpipe task make --split train` writes; the split is decided by a hash of the problem's content, so no
eval problem can appear), problems `first` .. `first + n_problems - 1` of it. Per problem, the rows the reward
model sees for real tree pairs (the same prompt text, no trailing newline, pair_type as the tree-search stage
names it):
- one `first_wrong_step` pair per step k: the gold steps 1..k-1 (the verified prefix), then gold step k against
  gold step k with one digit of its result changed;
- one `terminal` pair: the full gold solution with its Answer line against a solution whose step k (drawn
  uniformly) has the slip and whose later steps and answer are computed correctly from the wrong value, as the
  policy's own wrong solutions do (a slip carried through).

The slip (`slip=`): `policy` draws the digit position and the change from what the tiny policy's slips look like
on the training problems' tree pairs (runs/step-verifier/train-run: 77 % tens digit, 14 % hundreds, 8 % units;
78 % of changes are +-1, 10 % +-2, the rest spread: carry and borrow errors), `uniform` any digit by any amount.
A leading digit never becomes 0, and a slip that would give a negative running value is redrawn. Seeded: the
same arguments give the same rows.
"""
from __future__ import annotations

import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.tasks.arith import format_step
from pipeline.tasks.arith_task import ArithTask

# (position from the units digit, weight) and (change, weight): the slips of the policy on the training tree pairs
POSITIONS = ((0, 8), (1, 77), (2, 14))
CHANGES = ((1, 39), (-1, 39), (2, 5), (-2, 5), *((d, 1) for d in (3, 4, 5, 6, 7, 8, 9, -3, -4, -5, -6, -7, -8, -9)))


def slip(value: int, rng: random.Random, kind: str) -> int:
    """`value` with one digit changed: a different non-negative number of the same length."""
    s = str(value)
    while True:
        if kind == "uniform":
            i, d = rng.randrange(len(s)), rng.randint(0, 9)
        else:
            pos = rng.choices([p for p, _ in POSITIONS], [w for _, w in POSITIONS])[0]
            pos = min(pos, len(s) - 1)  # a short number slips in the digits it has
            i = len(s) - 1 - pos
            d = int(s[i]) + rng.choices([c for c, _ in CHANGES], [w for _, w in CHANGES])[0]
        if not 0 <= d <= 9 or (i == 0 and d == 0 and len(s) > 1) or str(d) == s[i]:
            continue
        return int(s[:i] + str(d) + s[i + 1:])


def with_result(line: str, value: int) -> str:
    """A step line with its result replaced by `value`."""
    return line.rsplit("= ", 1)[0] + f"= {value}"


def carried(p, wrong_at: int, wrong: int) -> list[str]:
    """The solution's lines (the task's own step format) with step `wrong_at`'s result replaced by `wrong` and the
    later steps and the answer computed from it: a slip carried through."""
    out, cur = [], p.start
    for k, (op, b) in enumerate(p.ops, 1):
        line = format_step(k, cur, op, b)
        if k == wrong_at:
            line = with_result(line, wrong)
        out.append(line)
        cur = int(line.rsplit(" ", 1)[1])
    return out + [f"Answer: {cur}"]


def problem_pairs(p, rng: random.Random, kind: str) -> list[dict] | None:
    gold, results = [p.gold_line(k) for k in range(1, p.n_steps + 2)], p.results()
    rows = []
    for k in range(1, p.n_steps + 1):
        bad = with_result(gold[k - 1], slip(results[k - 1], rng, kind))
        rows.append({"chosen": "\n".join(gold[:k]), "rejected": "\n".join(gold[:k - 1] + [bad]),
                     "pair_type": "first_wrong_step"})
    for _ in range(20):  # a terminal slip whose carried values stay non-negative (the task never goes below 0)
        k = rng.randint(1, p.n_steps)
        bad = carried(p, k, slip(results[k - 1], rng, kind))
        if all(int(x.rsplit(" ", 1)[1]) >= 0 for x in bad):
            rows.append({"chosen": "\n".join(gold), "rejected": "\n".join(bad), "pair_type": "terminal"})
            break
    return [{"prompt_id": p.id, "prompt": p.question, **r} for r in rows]


def make(n_problems: int, seed: int = 0, kind: str = "policy", first: int = 0) -> pa.Table:
    from pipeline.tasks.verify import problems_from_table
    problems = problems_from_table(ArithTask().make(first + n_problems, split="train"))[first:]
    rng = random.Random(f"synthetic-slips|{seed}|{kind}")
    rows = [r for p in problems for r in problem_pairs(p, rng, kind)]
    return pa.Table.from_pylist(rows)


if __name__ == "__main__":
    a = dict(kv.split("=", 1) for kv in sys.argv[2:])
    t = make(int(a.get("n_problems", 20000)), int(a.get("seed", 0)), a.get("slip", "policy"), int(a.get("first", 0)))
    pq.write_table(t, sys.argv[1])
    kinds = t["pair_type"].to_pylist()
    print(f"{sys.argv[1]}: {t.num_rows} pairs ({kinds.count('first_wrong_step')} step, {kinds.count('terminal')} "
          f"terminal) from {len(set(t['prompt_id'].to_pylist()))} training problems")
