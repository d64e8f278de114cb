"""The loaded backends of this process, one per (kind, model, server): a run's stages and evals share the
loaded model, and each pool process of flows/parallel.py loads it once."""
from __future__ import annotations

import functools
import threading

# With `workers` > 1 the flow's steps run in threads of one process, and two stages may load their model at
# once: transformers' lazily imported module is not thread-safe on first import ("cannot import name
# AutoModelForCausalLM"), and the cache alone would load the same model twice. One load at a time.
_LOCK = threading.Lock()


def backend_for(kind: str, model: str, base_url: str | None):
    """One backend per (kind, model) per process: stages of a run share the loaded model."""
    with _LOCK:
        return _load(kind, model, base_url)


@functools.lru_cache(maxsize=4)
def _load(kind: str, model: str, base_url: str | None):
    from pipeline.backends import make_backend

    opts = {"base_url": base_url} if kind == "http" and base_url else {}
    return make_backend(kind, model, **opts)


backend_for.cache_clear = _load.cache_clear  # eval_step drops a trained arm's model once evaluated
