"""Stage fingerprints and row keys (docs/store.md).

A fingerprint is the sha256 of the canonical JSON of everything that decides a stage's output: stage name and
version, its config, the model id and weights hash, sampling parameters and template text. A row key is
sha256(fingerprint, input row id, sample index), so rows written by any worker merge without duplicates.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint_inputs(stage: str, version: str, config: dict, *, model_id: str | None = None,
                       weights_hash: str | None = None, sampling: dict | None = None,
                       templates: dict[str, str] | None = None) -> dict:
    return {"stage": stage, "version": version, "config": config, "model_id": model_id,
            "weights_hash": weights_hash, "sampling": sampling or {}, "templates": templates or {}}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def row_key(fp: str, input_id: str, sample_index: int = 0) -> str:
    return hashlib.sha256(f"{fp}\x00{input_id}\x00{sample_index}".encode()).hexdigest()


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts; stable across processes (unlike hash())."""
    digest = hashlib.sha256(canonical_json([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
