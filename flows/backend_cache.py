"""The loaded backends of this process, one per (kind, model, server): a run's stages and evals share the
loaded model, and each pool process of flows/parallel.py loads it once."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4)
def backend_for(kind: str, model: str, base_url: str | None):
    """One backend per (kind, model) per process: stages of a run share the loaded model."""
    from pipeline.backends import make_backend

    opts = {"base_url": base_url} if kind == "http" and base_url else {}
    return make_backend(kind, model, **opts)
