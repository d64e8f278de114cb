"""Stage-1 quality numbers (docs/stages.md), re-verified from the pair TEXTS (not from the node flags):

- terminal pairs: share whose chosen states the gold answer and whose rejected does not; share whose chosen is
  right at every step (step verifier);
- step pairs: share whose chosen step verifies and whose rejected step does not (the prefix included);
- validity: share of checked step pairs whose order held under fresh rollouts (from each pair's `extra`);
- yield and length bias.
"""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.agreement import label_agreement
from stages.tree.mining import STEP_TYPES
from stages.tree.verifier import TreeTask, task_from_info


def _share(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _agree_share(verdicts: list[tuple[bool, bool]]) -> float | None:
    """Share of pairs whose chosen side is right and rejected side wrong."""
    return (label_agreement(verdicts) or {}).get("agree_share")


def _step_ok(text: str, task: TreeTask) -> bool:
    """Every line so far is right (a partial solution may still miss its later steps)."""
    wrong = task.first_wrong_step(text)
    n_lines = sum(1 for ln in text.splitlines() if ln.strip())
    is_final = text.strip().splitlines()[-1].lower().startswith("answer") if text.strip() else False
    return wrong is None or (not is_final and wrong > n_lines)


def quality_report(pairs: pa.Table, trees: pa.Table) -> dict:
    info = {r["prompt_id"]: json.loads(r["extra"] or "{}") for r in trees.select(["prompt_id", "extra"]).to_pylist()}
    tasks = {pid: task_from_info("", i) for pid, i in info.items()}
    term_ans, term_steps, step_ok, holds, len_diff = [], [], [], [], []
    rows = [r for r in pairs.to_pylist() if r["status"] == "ok"]
    for r in rows:
        task = tasks.get(r["prompt_id"])
        len_diff.append(len(r["chosen"]) - len(r["rejected"]))
        if r["pair_type"] == "terminal" and task is not None and task.has_gold:
            term_ans.append((bool(task.answer_correct(r["chosen"])), bool(task.answer_correct(r["rejected"]))))
            if task.has_step_verifier:
                term_steps.append(task.first_wrong_step(r["chosen"]) is None)
        elif r["pair_type"] in STEP_TYPES and task is not None and task.has_step_verifier:
            step_ok.append((_step_ok(r["chosen"], task), _step_ok(r["rejected"], task)))
        extra = json.loads(r["extra"])
        if "order_holds" in extra:
            holds.append(bool(extra["order_holds"]))
    n_prompts = len(info)
    with_pairs = len({r["prompt_id"] for r in rows})
    return {
        "prompts": n_prompts, "pairs": len(rows),
        "terminal_pairs": len(term_ans), "terminal_chosen_right_rejected_wrong": _agree_share(term_ans),
        "terminal_chosen_all_steps_right": _share(term_steps),
        "step_pairs": len(step_ok), "step_chosen_right_rejected_wrong": _agree_share(step_ok),
        "step_pairs_checked": len(holds), "step_order_holds": _share(holds),
        "prompts_with_pairs": with_pairs / n_prompts if n_prompts else None,
        "pairs_per_prompt": len(rows) / n_prompts if n_prompts else None,
        "mean_len_chosen_minus_rejected": sum(len_diff) / len(len_diff) if len_diff else None,
        "share_chosen_longer": _share([d > 0 for d in len_diff]),
    }
