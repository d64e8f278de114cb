"""Quality checks of Stages 5 and 6 on the bundled task with a trained policy (issue #6), printed as JSON.

  intervention: math-correction pairs on N train problems with keep_unverified on, so the share of pairs whose
                corrected chosen verifies is measured before the filter (the stage's default output keeps only
                verified pairs, i.e. 100 % by construction). Goal: >= 95 %.
  spa:          SPA's first round on the task. π_0 = DPO(init = SFT, ref = SFT) on verifier-labelled seed pairs
                (a right vs a wrong sample of the SFT policy on each seed problem; SPA's seed is a small labelled
                set too), then self-labels on disjoint problems with r = log π_0 − log π_SFT, and the agreement of
                those labels with the verifier among pairs where exactly one side is right. Goal: >= 75 %.
                Round 0 (π = SFT judging itself) is reported too: every label ties.

    .venv/bin/python bench/intervention_spa.py --policy tiny-policy --out runs/bench-stage56 intervention spa
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.backends import make_backend  # noqa: E402
from pipeline.backends.base import SamplingParams  # noqa: E402
from pipeline.engine import run_stage  # noqa: E402
from pipeline.stage import get_stage  # noqa: E402
from pipeline.store import RunStore  # noqa: E402
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table  # noqa: E402
from pipeline.tasks.verify import verify_answer  # noqa: E402
from stages.intervention import InterventionConfig  # noqa: E402
from stages.self_label import SelfLabelConfig, label_report  # noqa: E402


def intervention(args, problems) -> dict:
    rows = problems_to_table(problems[:args.n_intervention])
    backend = make_backend("transformers", args.policy, batch_size=args.batch_size)
    cfg = InterventionConfig(n_samples=args.k, keep_unverified=True, max_tokens=args.max_tokens,
                             continue_max_tokens=args.max_tokens, seed=args.seed,
                             n_continuations=args.n_continuations, continue_temperature=args.continue_temperature)
    t0 = time.time()
    res = run_stage(get_stage("intervention"), rows, cfg, backend,
                    RunStore(args.out / f"intervention-c{args.n_continuations}"),
                    shard_size=64, progress=False, overwrite=True)
    out = res.read()
    ok = out.filter(pc.equal(out["status"], "ok"))
    verified = sum(ok["chosen_verified"].to_pylist())
    errors: dict[str, int] = {}
    for e in out.filter(pc.equal(out["status"], "filtered"))["error"].to_pylist():
        errors[e] = errors.get(e, 0) + 1
    return {"problems": rows.num_rows, "samples": rows.num_rows * args.k, "pairs": ok.num_rows,
            "chosen_verified": verified, "chosen_verified_rate": verified / max(1, ok.num_rows),
            "filtered": errors, "seconds": round(time.time() - t0, 1)}


def seed_pairs(args, problems, path: Path) -> int:
    """Verifier-labelled seed pairs from the SFT policy: (first right sample, first wrong sample)."""
    backend = make_backend("transformers", args.policy, batch_size=args.batch_size)
    samples = backend.generate([p.question for p in problems], SamplingParams(
        temperature=1.0, max_tokens=args.max_tokens, seed=args.seed), n=args.k)
    rows = []
    for p, comps in zip(problems, samples):
        right = [c.text for c in comps if verify_answer(c.text, p)]
        wrong = [c.text for c in comps if not verify_answer(c.text, p)]
        if right and wrong:
            rows.append({"prompt_id": p.id, "prompt": p.question, "chosen": right[0], "rejected": wrong[0]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)


def spa(args, problems) -> dict:
    from pipeline.train.config import parse_config
    from pipeline.train.launch import train

    seed_problems = problems[args.n_intervention:args.n_intervention + args.n_seed]
    label_problems = problems[args.n_intervention + args.n_seed:args.n_intervention + args.n_seed + args.n_label]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.seed_pairs is not None:   # reuse the seed pairs of an earlier run (same policy and problems)
        pq.write_table(pq.read_table(args.seed_pairs), args.out / "seed.parquet")
        n_seed = pq.read_metadata(args.out / "seed.parquet").num_rows
    else:
        n_seed = seed_pairs(args, seed_problems, args.out / "seed.parquet")
    tcfg = parse_config({"model": args.policy, "data": str(args.out / "seed.parquet"),
                         "output_dir": str(args.out / "pi0"), "lr": args.lr, "epochs": args.epochs,
                         "micro_batch": 8, "loss": {"beta": args.beta, "rpo_alpha": args.rpo_alpha}, "progress": False,
                         "threads": args.threads})
    hist = train(tcfg).history
    pi0 = str(args.out / "pi0" / "final")
    rows = problems_to_table(label_problems)
    label = SelfLabelConfig(n_samples=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    out = {"seed_pairs": n_seed, "dpo_last": {k: hist[-1].get(k) for k in ("loss", "rewards/accuracies")}}
    for name, policy, ref in (("round0_sft_vs_sft", args.policy, None), ("round1_pi0_vs_sft", pi0, args.policy)):
        backend = make_backend("transformers", policy, batch_size=args.batch_size)
        cfg = label.model_copy(update={"ref_model": ref, "iteration": 0 if ref is None else 1})
        # round 0 only shows that a policy judging itself ties everywhere: a few prompts suffice
        subset = rows.slice(0, args.n_round0) if ref is None else rows
        res = run_stage(get_stage("self-label"), subset, cfg, backend, RunStore(args.out / name), shard_size=64,
                        progress=False, overwrite=True)
        out[name] = {"status": res.summary["status"]["main"], **label_report(res.read())}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checks", nargs="+", choices=["intervention", "spa"])
    ap.add_argument("--policy", default="tiny-policy", help="the SFT policy (model folder or built-in name)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-stage56"))
    ap.add_argument("--n-intervention", type=int, default=60, help="problems for the intervention check")
    ap.add_argument("--n-seed", type=int, default=200, help="seed problems for π_0's DPO")
    ap.add_argument("--n-label", type=int, default=200, help="problems to self-label")
    ap.add_argument("--seed-pairs", type=Path, default=None, help="reuse this seed.parquet of an earlier run")
    ap.add_argument("--n-round0", type=int, default=20, help="problems for the round-0 (π = SFT) labels")
    ap.add_argument("--batch-size", type=int, default=256, help="sequences per backend forward")
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=1.0, help="self-label sampling temperature")
    ap.add_argument("--n-continuations", type=int, default=1, help="intervention: continuations per prefix")
    ap.add_argument("--continue-temperature", type=float, default=0.0, help="intervention: 0 = greedy")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-5, help="π_0 DPO learning rate")
    ap.add_argument("--epochs", type=float, default=2.0, help="π_0 DPO epochs")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rpo-alpha", type=float, default=None, help="π_0: add α·NLL(chosen) to DPO (RPO)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    n = args.n_intervention + args.n_seed + args.n_label
    problems = make_split(TaskConfig.tiny(), "eval", n)  # disjoint from the SFT policy's training problems
    report = {"policy": args.policy, "args": {k: str(v) for k, v in vars(args).items()}}
    for check in args.checks:
        report[check] = intervention(args, problems) if check == "intervention" else spa(args, problems)
        print(json.dumps({check: report[check]}, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
