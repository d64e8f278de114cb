"""The verifier loop's figures on reasoning-gym chain_sum (RESULTS.md), computed with the product's own functions.

From the finished run:
  - per tree stage: pairs, terminal pairs whose chosen passes and rejected fails the gym scorer, step pairs whose
    order held under fresh rollouts (split by whether a side was rolled out again): experiments/smollm2-gym's
    measure.py helpers over stages/tree/quality.py;
  - the verifier on every pair of both searches, scored as the trainer scores (prompt, chosen) vs (prompt,
    rejected) with pipeline/judges/reward_model.py, split by where the pair's label came from:
      `scorer` -- the gym scorer decided it (terminal pairs, and step pairs of two finished responses, whose
                  values are the answer check in both searches);
      `values` -- a side's value came from the search's own values (rollouts, or in the learned search the
                  verifier itself, so there the figure is partly circular);
    and for the rollout search, by the trainer's split (train / held out; pipeline/train/reward.py split_prompts
    with the arm's fraction and seed), so the held-out figures match train_summary.json;
  - evals and paired deltas: flows/report.py `build_summary`.
With --tokens K (model calls): the first K problems of each search re-searched with a counting backend
(smollm2-gym's token_yield): pairs per 1,000 generated tokens; the validity re-check is not counted.

    .venv/bin/python experiments/gym-verifier-loop/measure.py experiments/gym-verifier-loop/config.yaml --tokens 20
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from flows.config import arm_ref, load_run_config  # noqa: E402
from flows.paths import arm_folder, run_dir  # noqa: E402
from flows.report import build_summary  # noqa: E402
from pipeline.store import RunStore  # noqa: E402
from pipeline.tasks.registry import item_for_row  # noqa: E402
from stages.tree.quality import quality_report  # noqa: E402


def _gym_measure():
    """experiments/smollm2-gym/measure.py as a module (its answer check, validity split and token count)."""
    spec = importlib.util.spec_from_file_location("smollm2_gym_measure", ROOT / "experiments/smollm2-gym/measure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def label_source(row: dict) -> str:
    """`scorer` when the gym scorer alone decided the pair's order, else `values` (see the module docstring)."""
    if row["pair_type"] == "terminal" or (row["chosen_is_terminal"] and row["rejected_is_terminal"]):
        return "scorer"
    return "values"


def verifier_accuracy(scorer, rows: list[dict], group_of) -> dict:
    """Pairwise accuracy (a tie counts wrong) and mean margin of the verifier per group of ok pairs."""
    from pipeline.train.reward import pair_metrics

    rows = [r for r in rows if r["status"] == "ok"]
    if not rows:
        return {}
    rc = np.array(scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows]))
    rr = np.array(scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
    groups: dict[str, list[int]] = {"all": list(range(len(rows)))}
    for i, r in enumerate(rows):
        for g in group_of(r):
            groups.setdefault(g, []).append(i)
    return {g: pair_metrics(rc[ix], rr[ix], [rows[i]["pair_type"] for i in ix]) for g, ix in sorted(groups.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--tokens", type=int, default=0, help="re-search the first K problems of each search")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: <run dir>/measure.json)")
    args = ap.parse_args()
    cfg, _ = load_run_config(args.config)
    rd = run_dir(cfg)
    gym = _gym_measure()
    store = RunStore(rd)
    inputs = pq.read_table(rd / "inputs" / "prompts.parquet").to_pylist()
    items = {r["prompt_id"]: item_for_row(r) for r in inputs}
    verifier = next(a for a in cfg.train if a.is_reward)
    from pipeline.judges.reward_model import load_scorer
    from pipeline.train.reward import split_prompts

    scorer = load_scorer(str(arm_folder(cfg, verifier.name)), device="cpu")
    rcfg = verifier.config.get("reward", {})
    out: dict = {"stages": {}}
    for s in (s for s in cfg.stages if s.stage == "tree-search"):
        st = store.stage(s.folder)
        pairs = st.read()
        q = quality_report(pairs, st.read("trees"))
        info = {k: q[k] for k in ("prompts", "pairs", "terminal_pairs", "terminal_chosen_right_rejected_wrong",
                                  "step_pairs_checked", "step_order_holds", "prompts_with_pairs", "pairs_per_prompt")}
        terminal = pairs.filter(pairs.column("pair_type").to_numpy(zero_copy_only=False) == "terminal")
        info["terminal_answer_check"] = gym.answer_agreement(terminal, items)
        info["step_validity_by_sides"] = gym.validity_by_sides(pairs)
        held = set()
        if s.id == verifier.data:
            _, ev = split_prompts(pairs.filter(pairs.column("status").to_numpy(zero_copy_only=False) == "ok"),
                                  rcfg.get("eval_fraction", 0.1), verifier.config.get("seed", 42))
            held = set(ev.column("prompt_id").to_pylist()) if ev is not None else set()
        split = (lambda r: "held_out" if r["prompt_id"] in held else "train") if s.id == verifier.data \
            else (lambda r: "new_problems")
        info["verifier"] = verifier_accuracy(
            scorer, pairs.to_pylist(), lambda r: [label_source(r), f"{split(r)}/{label_source(r)}", split(r)])
        out["stages"][s.folder] = info
    summary = build_summary(cfg)
    out["evals"], out["deltas"], out["train"] = summary["evals"], summary["deltas"], summary["train"]
    if args.tokens:
        out["token_yield"] = {}
        for s in (s for s in cfg.stages if s.stage == "tree-search"):
            conf = dict(s.config)
            if arm_ref(conf.get("value_model")):
                conf["value_model"] = str(arm_folder(cfg, arm_ref(conf["value_model"])))
            rows = inputs[s.skip or 0:][:args.tokens]
            out["token_yield"][s.id] = gym.token_yield(cfg, conf, rows, seed=0)
    path = args.out or rd / "measure.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
