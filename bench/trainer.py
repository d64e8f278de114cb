"""Our DPO trainer vs TRL's DPOTrainer, side by side on the same model and the same pairs (CPU, fp32).

    .venv/bin/pip install --no-deps --target .venv-trl trl==1.16.0     # TRL only for this script
    .venv/bin/python bench/trainer.py [--pairs 256] [--micro-batch 8] [--threads 2] [--repeats 3]
    .venv/bin/python bench/trainer.py --policy smollm2-135m --pairs 32 --micro-batch 4

Each side runs in its own subprocess (so peak RSS is its own: ru_maxrss of the child) for one epoch over the
same pairs with the same micro-batch, lr and max_length, sigmoid loss, no gradient checkpointing. tokens/s counts
every non-padding token of both sequences (prompt+chosen and prompt+rejected: the prompt counts twice, as in
TRL's concatenated forward), over the steps after the first two (warmup excluded), per wall second and per
CPU second of the process (the steadier number when other jobs share the cores). Our reference log-probs are
one cached pass, timed separately; TRL runs its reference model every step (its default) or, in the last variant, precomputes it
(`precompute_ref_log_probs`, also before the timed steps).

Model (`--policy`): `tiny` (default) = data/tiny-policy when it exists, else a random Llama of the tiny policy's
shape with the char tokenizer; `smollm2-135m` = the bundled SmolLM2-135M-Instruct (BPE tokenizer, chat
template, V = 49,152: the shape where the fused LM head and the cached reference matter); or a model folder. Pairs: the bundled task's problems, chosen = gold solution, rejected = the gold
solution with its last step's result and answer changed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFPIPE_NO_PROGRESS", "1")
WARMUP_STEPS = 2
# (side, options): our trainer's TrainConfig fields / TRL's DPOConfig fields. TRL's own default has gradient
# checkpointing on; the first TRL run turns it off for a like-for-like compute comparison.
VARIANTS = [
    ("ours", {}),
    ("ours", {"share_prompt": True}),
    ("ours", {"share_prompt": True, "gradient_checkpointing": True}),
    ("ours", {"share_prompt": True, "gradient_checkpointing": True, "heap_trim_every": 0}),  # no heap trimming
    ("trl", {"gradient_checkpointing": False}),
    ("trl", {"gradient_checkpointing": True}),
    ("trl", {"gradient_checkpointing": False, "precompute_ref_log_probs": True}),  # TRL's own cached reference
    ("ours", {"share_prompt": True, "lean_activations": False}),  # stock RMSNorm / MLP autograd
]


def make_inputs(work: Path, n_pairs: int, policy: str = "tiny") -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.tasks.arith import TaskConfig, make_split
    from pipeline.train.tiny import char_tokenizer, tiny_llama

    tiny = ROOT / "data" / "tiny-policy"
    if policy != "tiny":
        from pipeline.models import resolve_model
        model_dir = resolve_model(policy)
    elif (tiny / "config.json").exists():
        model_dir = tiny
    else:
        model_dir = work / "model"
        tok = char_tokenizer()
        m = tiny_llama(len(tok), hidden=256, layers=4, heads=4, max_positions=1024, head_scale=1.0)
        m.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    problems = make_split(TaskConfig.tiny(), "train", n_pairs)
    rejected = []
    for p in problems:
        wrong = p.answer + 1
        lines = p.gold_solution.split("\n")
        lines[-1] = lines[-1].replace(str(p.answer), str(wrong))
        rejected.append("\n".join(lines))
    data = work / "pairs.parquet"
    pq.write_table(pa.table({"prompt": [p.question for p in problems],
                             "chosen": [p.gold_solution for p in problems], "rejected": rejected}), data)
    return model_dir, data


def epoch_tokens(model_dir: Path, data: Path, max_length: int) -> int:
    from transformers import AutoTokenizer

    from pipeline.train.data import TokenizeConfig, encode_pairs, read_table
    enc = encode_pairs(read_table(data), AutoTokenizer.from_pretrained(model_dir),
                       TokenizeConfig(max_length=max_length))
    return enc.num_tokens()


def _clock() -> tuple[float, float]:
    # wall time and this process's CPU time (all threads): on a shared machine the CPU clock is the steadier
    return time.perf_counter(), time.process_time()


def _rates(stamps: list[tuple[float, float]], args) -> dict:
    """tokens/s over the steps after the warmup, wall and CPU; tokens = the epoch's pair tokens (prompt counted
    twice) in proportion to the timed steps, identical for every side and layout."""
    steps = len(stamps)
    tokens = epoch_tokens(args.model, args.data, args.max_length) * (steps - WARMUP_STEPS) / steps
    wall = stamps[-1][0] - stamps[WARMUP_STEPS - 1][0]
    cpu = stamps[-1][1] - stamps[WARMUP_STEPS - 1][1]
    return {"steps": steps, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


def run_ours(args) -> dict:
    import torch

    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import Trainer, lr_at
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=str(args.model), data=str(args.data), output_dir=out, lr=1e-5, device="cpu",
                          micro_batch=args.micro_batch, grad_accum=1, epochs=1, save_final=False,
                          progress=False, ref_cache_dir=str(Path(out) / "refcache"),
                          tokenize={"max_length": args.max_length}, threads=args.threads, max_grad_norm=1.0,
                          **json.loads(args.opts))
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        trainer.setup()  # the one reference pass (then the policy goes to train mode)
        ref_s = time.perf_counter() - t0
        schedule, optimizer = trainer._schedule(), trainer._optimizer()
        stamps, losses = [], []
        for i, groups in enumerate(schedule):  # Trainer.train()'s loop without the file writing
            losses.append(trainer.step(groups, optimizer, lr_at(i, cfg, len(schedule)))["loss"])
            stamps.append(_clock())
    return {"side": "ours", "opts": json.loads(args.opts), **_rates(stamps, args), "ref_pass_s": ref_s,
            "first_loss": losses[0], "last_loss": losses[-1]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.train.data import read_table
    torch.set_num_threads(args.threads)
    table = read_table(args.data)
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p}] for p in table["prompt"].to_pylist()],
        "chosen": [[{"role": "assistant", "content": c}] for c in table["chosen"].to_pylist()],
        "rejected": [[{"role": "assistant", "content": r}] for r in table["rejected"].to_pylist()]})
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(_clock())

    with tempfile.TemporaryDirectory() as out:
        opts = {"gradient_checkpointing": False, **json.loads(args.opts)}
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
                        num_train_epochs=1, learning_rate=1e-5, max_length=args.max_length, bf16=False,
                        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                        dataloader_num_workers=0, seed=42, **opts)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"side": "trl", "opts": opts, **_rates(stamps, args), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def child(args) -> None:
    result = run_ours(args) if args.side == "ours" else run_trl(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(side: str, args, model: Path, data: Path, opts: dict) -> dict:
    env = dict(os.environ)
    if side == "trl":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / ".venv-trl"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--side", side, "--model", str(model), "--data", str(data),
           "--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length),
           "--threads", str(args.threads), "--opts", json.dumps(opts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"side": side, "opts": opts, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--policy", default="tiny", help="tiny (default), smollm2-135m, or a model folder")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only ours (defaults) vs TRL (no checkpointing)")
    ap.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS to run (default: all)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the variant list this many times, round-robin; ratios are per-round medians")
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.side:
        child(args)
        return
    with tempfile.TemporaryDirectory() as work:
        model, data = make_inputs(Path(work), args.pairs, args.policy)
        runs = [VARIANTS[i] for i in args.variants] if args.variants else \
            (VARIANTS[:1] + VARIANTS[4:5] if args.quick else VARIANTS)
        results = []
        for round_ in range(args.repeats):
            for v, (side, opts) in enumerate(runs):
                results.append({**spawn(side, args, model, data, opts), "round": round_, "variant": v})
                print(json.dumps(results[-1]), flush=True)
    summary = compare(results)
    for line in summary:
        print(line["text"])
    if args.out:
        args.out.write_text(json.dumps({"runs": results, "ratios": summary}, indent=1))


def compare(results: list[dict]) -> list[dict]:
    """Ours vs TRL for every (ours variant, TRL variant): the median over rounds of the ratio within a round
    (the two runs of a round are minutes apart, so slow drifts of the machine's load cancel)."""
    import statistics
    ok = [r for r in results if "error" not in r]
    variants = sorted({r["variant"] for r in ok})
    side = {r["variant"]: (r["side"], r["opts"]) for r in ok}
    get = {(r["variant"], r["round"]): r for r in ok}
    out = []
    for a in (v for v in variants if side[v][0] == "ours"):
        for b in (v for v in variants if side[v][0] == "trl"):
            rounds = sorted({i for v, i in get if v == a} & {i for v, i in get if v == b})
            if not rounds:
                continue
            ratio = {k: statistics.median(get[(a, i)][k] / get[(b, i)][k] for i in rounds)
                     for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")}
            text = (f"ours {side[a][1]} vs trl {side[b][1]}: tokens/s x{ratio['tokens_per_s']:.2f} (per CPU-second "
                    f"x{ratio['tokens_per_cpu_s']:.2f}), peak RSS x{ratio['peak_rss_mb']:.2f}, median of {len(rounds)}")
            out.append({"ours": side[a][1], "trl": side[b][1], "rounds": len(rounds), **ratio, "text": text})
    return out


if __name__ == "__main__":
    main()
