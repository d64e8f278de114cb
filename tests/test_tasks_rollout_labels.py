"""Rollout step labels in tree search: on rows of a task with no exact step check (math rows, checked by
math-verify), `step_pairs: first_wrong_step` labels each step by whether a rollout from it reached the gold
answer. With the scripted arithmetic policy a wrong line spoils every later line, so its rollouts never reach
the gold: the labels must agree with the exact arithmetic verifier on every pair they make."""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.stage import StageContext
from pipeline.tasks.verify import first_wrong_step
from stages.tree_search import TreeSearchConfig, run
from tests.test_tree_search_fake import FakeArithBackend, task_rows


def test_first_wrong_step_pairs_from_rollout_labels_agree_with_the_exact_verifier():
    problems, _ = task_rows(6)
    rows = pa.table({"prompt_id": [p.id for p in problems], "prompt": [p.question for p in problems],
                     "gold_answer": [str(p.answer) for p in problems]})  # math rows: no meta, no step check
    cfg = TreeSearchConfig(variant="best_first", value_fn="rollout", rollouts=4, best_first_k=3,
                           expansion_budget=6, step_pairs="first_wrong_step", terminal_pairs=False,
                           validity_rollouts=0, step_min_margin=0.0)
    out = run(rows, cfg, FakeArithBackend(problems, p_right=0.7), StageContext("fp", 0, 3))
    pairs = [r for r in out["main"].to_pylist() if r["status"] == "ok"]
    assert len(pairs) >= 5 and all(r["pair_type"] == "first_wrong_step" for r in pairs)
    by_id = {p.id: p for p in problems}
    for r in pairs:
        p, prefix = by_id[r["prompt_id"]], r["shared_prefix"] or ""
        k = len([ln for ln in prefix.splitlines() if ln.strip()]) + 1  # the step both sides end with
        assert json.loads(r["extra"])["step_label"] == "rollout"
        assert r["chosen_score"] > 0 and r["rejected_score"] == 0.0   # the labels: some vs no rollout right
        assert (first_wrong_step(r["chosen"], p) or k + 1) > k     # chosen: every line so far is right
        assert first_wrong_step(r["rejected"], p) == k                # rejected: its step k is the first wrong one


def test_rows_with_a_step_check_keep_the_exact_labels():
    problems, table = task_rows(3)
    cfg = TreeSearchConfig(variant="best_first", value_fn="rollout", rollouts=2, best_first_k=3,
                           expansion_budget=4, step_pairs="first_wrong_step", terminal_pairs=False,
                           validity_rollouts=0, step_min_margin=0.0)
    out = run(table, cfg, FakeArithBackend(problems, p_right=0.7), StageContext("fp", 0, 3))
    extras = [json.loads(r["extra"]) for r in out["main"].to_pylist() if r["status"] == "ok"]
    assert extras and all("step_label" not in e for e in extras)
