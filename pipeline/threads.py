"""How many CPU threads the process (and every worker it spawns) computes with: the one place that sets it.

`prefpipe --threads N`, a run config's `threads:` and TrainConfig.threads all call `set_threads`. It writes the
OpenMP/BLAS variables into the environment, which torch (imported later, or in a spawned worker: Ray, torchrun,
a DataLoader, a vLLM engine) reads at start-up, and sets torch's intra-op pool directly when torch is already
imported. The command line does not import torch itself, so `prefpipe --help` stays fast.
"""
from __future__ import annotations

import os
import sys

# Used when neither --threads nor OMP_NUM_THREADS is given. One: the bundled policy's ops are too small for an
# intra-op pool to pay off, and on a 2-core machine torch's default of 2 threads spent 7x the CPU time on the same
# tree search (bench/stage_threads.py, bench/results/stage_threads.json). More cores are used by more
# processes instead (a run config's `workers`, Ray replicas).
DEFAULT_THREADS = 1

# Every thread-pool variable the numeric libraries torch and numpy may link against read at start-up.
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
            "NUMEXPR_NUM_THREADS")


def resolve_threads(n: int | None) -> int:
    """n if given, else the environment's OMP_NUM_THREADS (a user's or a test harness's choice), else
    DEFAULT_THREADS."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        return n
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) >= 1 else DEFAULT_THREADS


def set_threads(n: int | None = None) -> int:
    """Apply `resolve_threads(n)` to this process and its future children; returns the count applied."""
    n = resolve_threads(n)
    for var in ENV_VARS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n
