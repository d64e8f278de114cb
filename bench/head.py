"""Peak memory and time of the LM head + log-softmax, fwd+bwd: token-chunked (ours) vs plain full logits.

    .venv/bin/python bench/head.py [--tokens 1024 4096] [--vocab 49152] [--hidden 576] [--chunk 1024]

Each (variant, N) runs in a fresh subprocess; peak memory = the process's max RSS after the run minus its RSS
just before it (inputs and weights already allocated), so it is the head's own working memory. Default shapes
are SmolLM2-135M's head (V = 49152, H = 576), fp32 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(variant: str, n: int, v: int, h: int, chunk: int, threads: int) -> dict:
    import torch

    from pipeline.train.head import chunked_logprobs, plain_logprobs
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_(True)
    tgt = torch.randint(0, v, (n,), generator=g)
    base = _rss_now_mb()
    # ru_maxrss never goes down; this process has not been above `base` yet except while importing torch,
    # which stays under it (inputs were allocated after), so max RSS - base is the head's peak.
    t0 = time.perf_counter()
    if variant == "chunked":
        out = chunked_logprobs(hid, w, tgt, chunk_tokens=chunk)
    else:
        out = plain_logprobs(hid, w, tgt)
    out.mean().backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "tokens": n, "vocab": v, "hidden": h, "chunk": chunk,
            "peak_extra_mb": round(peak - base, 1), "seconds": round(dt, 3),
            "logits_mb_if_materialised": round(n * v * 4 / 2 ** 20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.vocab, args.hidden, args.chunk,
                               args.threads)))
        return
    rows = []
    for n in args.tokens:
        for variant in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--child", variant, str(n), "--vocab", str(args.vocab), "--hidden",
                   str(args.hidden), "--chunk", str(args.chunk), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode:
                rows.append({"variant": variant, "tokens": n, "error": out.stderr[-500:]})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for n in args.tokens:
        p = next((r for r in rows if r["tokens"] == n and r["variant"] == "plain" and "error" not in r), None)
        c = next((r for r in rows if r["tokens"] == n and r["variant"] == "chunked" and "error" not in r), None)
        if p and c:
            ratio = c["peak_extra_mb"] / max(p["peak_extra_mb"], 1e-9)
            print(f"N={n}: peak {c['peak_extra_mb']} MB chunked vs {p['peak_extra_mb']} MB plain "
                  f"(x{ratio:.2f}); time x{c['seconds'] / p['seconds']:.2f}")


if __name__ == "__main__":
    main()
