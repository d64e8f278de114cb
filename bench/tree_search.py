"""Stage-1 throughput, side by side on the same trees and sampling:

  A. cross-tree batched search: every round, one backend call for all trees' expansions and one for all values;
  B. per-tree sequential search: the same search run one tree at a time;
  C. the backend's raw batched calls on the same shapes: every call of A replayed directly (same prompts,
     prefixes, sampling, n), with no tree bookkeeping.
Reports generated tokens per second; goals: A/B >= 5, A/C >= 0.8. Ratios, never timed asserts.

    .venv/bin/python bench/tree_search.py --model tiny-policy --trees 16 --variant mcts
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table  # noqa: E402
from stages.tree.expand import TokenCounter  # noqa: E402
from stages.tree_search import TreeSearchConfig, grow, make_work  # noqa: E402


class Recorder:
    """Wraps a backend: records each continue_ call (for the replay) and counts generated tokens."""

    def __init__(self, backend):
        self.backend = backend
        self.model_id, self.weights_hash = backend.model_id, backend.weights_hash
        self.calls: list[tuple] = []

    def continue_(self, prompts, prefixes, sampling=None, n=None):
        self.calls.append((list(prompts), list(prefixes), sampling, n))
        return self.backend.continue_(prompts, prefixes, sampling, n=n)

    def logprobs(self, prompts, completions):
        return self.backend.logprobs(prompts, completions)


def fresh_works(rows: list[dict], cfg: TreeSearchConfig) -> list:
    return [make_work(r, f"bench-{i}", cfg, i) for i, r in enumerate(rows)]


def timed_search(backend, rows, cfg, per_tree: bool, seed: int) -> tuple[float, TokenCounter]:
    counter = TokenCounter()
    works = fresh_works(rows, cfg)
    t0 = time.perf_counter()
    if per_tree:
        for w in works:
            grow([w], backend, cfg, seed, counter)
    else:
        grow(works, backend, cfg, seed, counter)
    return time.perf_counter() - t0, counter


def replay(backend, calls) -> tuple[float, int]:
    t0, tokens = time.perf_counter(), 0
    for prompts, prefixes, sampling, n in calls:
        outs = backend.continue_(prompts, prefixes, sampling, n=n)
        tokens += sum(c.n_tokens for comps in outs for c in comps)
    return time.perf_counter() - t0, tokens


def load_backend(model: str, batch_size: int):
    from pipeline.backends.hf import TransformersBackend
    if model == "random":
        import tempfile

        from pipeline.backends.fixtures import build_tiny_llama
        model = str(build_tiny_llama(Path(tempfile.mkdtemp()) / "m"))
    return TransformersBackend(model, device="auto", batch_size=batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-policy", help="model name/folder, or 'random' (tiny random Llama)")
    ap.add_argument("--trees", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of A and C; the fastest counts")
    ap.add_argument("--variant", default="mcts", choices=["mcts", "best_first", "tpo_list"])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256, help="backend sequences per forward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores is much slower)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    cfg = TreeSearchConfig(variant=args.variant, iterations=args.iterations, rollouts=args.rollouts,
                           expansion_budget=args.iterations, step_max_tokens=32, rollout_max_tokens=96,
                           validity_rollouts=0)
    rows = problems_to_table(make_split(TaskConfig.tiny(), "train", args.trees)).to_pylist()
    backend = load_backend(args.model, args.batch_size)
    rec = Recorder(backend)
    backend.continue_([rows[0]["prompt"]], [""], cfg.step_sampling(0), n=2)  # warm-up (allocator, kernels)

    # The machine is shared: A and C alternate `--repeat` times and the fastest of each counts, so a load spike
    # during one of them does not decide the ratio. B (the slow one) runs once.
    t_a = t_c = float("inf")
    for _ in range(args.repeat):
        rec.calls.clear()
        t, c_a = timed_search(rec, rows, cfg, per_tree=False, seed=args.seed)
        t_a = min(t_a, t)
        t, tok_c = replay(backend, rec.calls)
        t_c = min(t_c, t)
    t_b, c_b = timed_search(backend, rows, cfg, per_tree=True, seed=args.seed)

    tps = {"A": c_a.tokens / t_a, "B": c_b.tokens / t_b, "C": tok_c / t_c}
    print(f"model {args.model}, {args.trees} trees, variant {args.variant}, iterations {args.iterations}, "
          f"rollouts {args.rollouts}, torch threads {args.threads}, device {backend.device}, best of {args.repeat}\n")
    print("| run | backend calls | sequences | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|---|")
    print(f"| A: cross-tree batched search | {c_a.calls} | {c_a.sequences} | {c_a.tokens} | {t_a:.1f} | "
          f"{tps['A']:.0f} |")
    print(f"| B: per-tree sequential search | {c_b.calls} | {c_b.sequences} | {c_b.tokens} | {t_b:.1f} | "
          f"{tps['B']:.0f} |")
    print(f"| C: raw batched calls, same shapes as A | {len(rec.calls)} | {c_a.sequences} | {tok_c} | {t_c:.1f} | "
          f"{tps['C']:.0f} |")
    print(f"\nA/B = {tps['A'] / tps['B']:.2f}x (goal >= 5x); A/C = {tps['A'] / tps['C']:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
