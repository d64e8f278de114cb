"""The issue's figures for the SmolLM2 reasoning-gym run, computed with the product's own functions.

From the finished run (no model call):
  - tree terminal pairs whose chosen passes and rejected fails the dataset's own scorer, and step pairs whose
    order held under fresh rollouts: stages/tree/quality.py `quality_report` (the run report's numbers);
  - the same answer-check agreement for sample-pairs and intervention pairs (pipeline/agreement.py, each pair's
    shared prefix + side checked by the gym task bound to its input row);
  - evals and paired deltas: flows/report.py `build_summary`.
With --tokens K (model calls): the stage does not count what it generates, so the first K input problems are
searched again with the stage's own `grow` / `mine_trees` and a backend wrapper that counts generated tokens;
pairs per 1,000 generated tokens is (pairs mined from those K trees) / (tokens of that search) -- the validity
re-check's rollouts are a measurement, not generation, and are not counted.

    .venv/bin/python experiments/smollm2-gym/measure.py experiments/smollm2-gym/config.yaml --tokens 20
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flows.config import load_run_config  # noqa: E402
from flows.paths import run_dir  # noqa: E402
from flows.report import build_summary  # noqa: E402
from pipeline.agreement import label_agreement  # noqa: E402
from pipeline.store import RunStore  # noqa: E402
from pipeline.tasks.registry import item_for_row  # noqa: E402
from stages.tree.quality import quality_report  # noqa: E402


def answer_agreement(pairs, items: dict) -> dict | None:
    """Chosen right and rejected wrong by the task's check, over ok pairs (prefix + side is the full answer)."""
    verdicts = []
    for r in pairs.to_pylist():
        it = items.get(r["prompt_id"])
        if r["status"] != "ok" or it is None:
            continue
        pre = r.get("shared_prefix") or ""
        verdicts.append((it.correct(pre + r["chosen"]), it.correct(pre + r["rejected"])))
    return label_agreement(verdicts)


def validity_by_sides(pairs) -> dict:
    """Step pairs whose order held under fresh rollouts, split by whether a side was rolled out again: a side
    that ends the response is re-estimated by its answer check alone (stages/tree/validity.py), so pairs of
    two finished responses hold whenever the answer check agrees with the label."""
    groups: dict[str, list[bool]] = {"both_finished": [], "a_side_rolled_out": []}
    for r in pairs.to_pylist():
        extra = json.loads(r["extra"] or "{}")
        if r["status"] != "ok" or "order_holds" not in extra:
            continue
        both = bool(r["chosen_is_terminal"]) and bool(r["rejected_is_terminal"])
        groups["both_finished" if both else "a_side_rolled_out"].append(bool(extra["order_holds"]))
    return {k: {"n": len(v), "held": sum(v), "share": sum(v) / len(v) if v else None} for k, v in groups.items()}


def answer_read(cfg, rd: Path) -> dict:
    """Per evaluated model: share of eval answers whose extracted answer is a plain integer (the format the
    chain_sum scorer can accept), and accuracy among those -- separates "answers in a readable form" from
    "adds correctly"."""
    from pipeline.tasks.registry import get_task

    task = get_task(cfg.eval.task_name, **cfg.eval.options)
    out = {}
    for f in sorted((rd / "eval").glob("*.json")):
        per = json.loads(f.read_text())["per_problem"]
        readable = [p for p in per if re.fullmatch(r"-?\d+", (task.extract_answer(p["output"]) or "").strip())]
        out[f.stem] = {"n": len(per), "readable": len(readable),
                       "accuracy_when_readable": sum(p["correct"] for p in readable) / len(readable)
                       if readable else None}
    return out


class CountingBackend:
    """Wraps a backend and counts the tokens it generates (continue_ is all tree search calls)."""

    def __init__(self, backend):
        self.backend, self.tokens, self.calls = backend, 0, 0
        self.model_id, self.weights_hash = backend.model_id, backend.weights_hash

    def continue_(self, prompts, prefixes, sampling=None, n=None):
        outs = self.backend.continue_(prompts, prefixes, sampling, n=n)
        self.calls += 1
        self.tokens += sum(c.n_tokens for comps in outs for c in comps)
        return outs

    def __getattr__(self, name):
        return getattr(self.backend, name)


def token_yield(cfg, stage_cfg: dict, rows: list[dict], seed: int) -> dict:
    """Search `rows` again with the tree stage's config; pairs mined per 1,000 generated tokens."""
    from pipeline.backends import make_backend
    from stages.tree_search import TreeSearchConfig, grow, make_work
    from stages.tree.mining import mine_trees

    tcfg = TreeSearchConfig(**stage_cfg)
    be = CountingBackend(make_backend(cfg.backend, cfg.model))
    works = [make_work(r, f"tok-{i}", tcfg, seed + i) for i, r in enumerate(rows)]
    t0 = time.perf_counter()
    grow(works, be, tcfg, seed)
    wall = time.perf_counter() - t0
    pairs, _ = mine_trees([(w.tree, {"row_key": f"tok-{i}", "generator_model": cfg.model})
                           for i, w in enumerate(works)], tcfg)
    ok = [p for p in pairs if p.get("status", "ok") == "ok"]
    return {"problems": len(rows), "pairs": len(ok), "tokens": be.tokens, "backend_calls": be.calls,
            "pairs_per_1k_tokens": 1000 * len(ok) / be.tokens if be.tokens else None, "search_seconds": wall,
            "pair_types": {t: sum(p["pair_type"] == t for p in ok) for t in sorted({p["pair_type"] for p in ok})}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--tokens", type=int, default=0, help="re-search the first K problems to count tokens")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: <run dir>/measure.json)")
    args = ap.parse_args()
    cfg, _ = load_run_config(args.config)
    rd = run_dir(cfg)
    store = RunStore(rd)
    import pyarrow.parquet as pq

    inputs = pq.read_table(rd / "inputs" / "prompts.parquet").to_pylist()
    items = {r["prompt_id"]: item_for_row(r) for r in inputs}
    out: dict = {"stages": {}}
    for s in cfg.stages:
        st = store.stage(s.folder)
        if not st.exists() or not st.num_rows():
            continue
        pairs = st.read()
        info = {"pairs_ok": sum(x == "ok" for x in pairs.column("status").to_pylist())}
        if s.stage == "tree-search":
            q = quality_report(pairs, st.read("trees"))
            info.update({k: q[k] for k in ("prompts", "pairs", "terminal_pairs",
                                           "terminal_chosen_right_rejected_wrong", "step_pairs_checked",
                                           "step_order_holds", "prompts_with_pairs", "pairs_per_prompt")})
            terminal = pairs.filter(pairs.column("pair_type").to_numpy(zero_copy_only=False) == "terminal")
            info["terminal_answer_check"] = answer_agreement(terminal, items)  # the gym scorer, from the inputs
            info["step_validity_by_sides"] = validity_by_sides(pairs)
        else:
            info["answer_check"] = answer_agreement(pairs, items)
        out["stages"][s.folder] = info
    summary = build_summary(cfg)
    out["evals"], out["deltas"], out["train"] = summary["evals"], summary["deltas"], summary["train"]
    out["answer_read"] = answer_read(cfg, rd)
    if args.tokens:
        tree = next(s for s in cfg.stages if s.stage == "tree-search")
        out["token_yield"] = token_yield(cfg, tree.config, inputs[:args.tokens], seed=0)
    path = args.out or rd / "measure.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
