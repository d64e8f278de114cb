"""Validity check of step pairs (docs/stages.md): re-estimate both sides with M fresh rollouts under another
seed than the labelling rollouts (so the labels' selection bias does not carry over) and count the pairs whose
order holds, p_chosen > p_rejected (a tie does not hold). A side that already ends the response is not rolled
out: its fresh estimate is its answer check. All pairs of a shard go to ONE `continue_` call.
"""
from __future__ import annotations

from stages.tree.config import SearchConfig
from stages.tree.mining import STEP_TYPES
from stages.tree.values import rollout_success
from stages.tree.verifier import TreeTask


def check_pairs(pairs: list[dict], tasks: dict[str, TreeTask], backend, cfg: SearchConfig, m: int,
                seed: int) -> dict:
    """Annotate each step pair's `extra` with fresh_chosen / fresh_rejected / order_holds; return the summary."""
    sides, jobs = [], []  # (pair index, side) -> either a fixed estimate or a rollout job index
    for i, p in enumerate(pairs):
        task = tasks.get(p["prompt_id"])
        if p["pair_type"] not in STEP_TYPES or task is None or not task.has_gold:
            continue
        for side in ("chosen", "rejected"):
            text = p[side]
            if p[f"{side}_is_terminal"]:
                sides.append((i, side, float(bool(task.answer_correct(text))), None))
            else:
                sides.append((i, side, None, len(jobs)))
                jobs.append((task, text + cfg.step_join))
    shares = rollout_success(jobs, backend, cfg, m, seed) if jobs else []
    fresh: dict[int, dict] = {}
    for i, side, fixed, job in sides:
        fresh.setdefault(i, {})[side] = fixed if job is None else shares[job]
    held = gaps = 0.0
    for i, f in fresh.items():
        holds = f["chosen"] > f["rejected"]
        pairs[i]["extra"].update(fresh_chosen=f["chosen"], fresh_rejected=f["rejected"], order_holds=holds,
                                 validity_rollouts=m)
        held += holds
        gaps += f["chosen"] - f["rejected"]
    n = len(fresh)
    return {"step_pairs_checked": n, "order_holds": held / n if n else None,
            "mean_fresh_gap": gaps / n if n else None, "validity_rollouts": m}
