"""Reference log-probs: one no-grad pass, stored as Arrow columns beside the pairs, reused across epochs and runs.

The cache file `ref-<fingerprint>.parquet` holds the kept rows of the training table plus
`ref_chosen_logp`/`ref_rejected_logp` (float64) for pairs or `ref_logps` (list<float64>) for ranked lists, and
`source_row` (the row's index in the table it came from). The fingerprint covers everything the numbers depend
on: the reference weights, the tokenizer (vocab, specials, chat template), the tokenization settings, the table
content, the token ids themselves and the compute dtype. `ref-<fingerprint>.json` beside it says what went in.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.fingerprint import canonical_json
from pipeline.store import atomic_write_bytes, atomic_write_table
from pipeline.train.collate import collate
from pipeline.train.data import Encoded, TokenizeConfig
from pipeline.train.forward import row_logps

CACHE_VERSION = "1"
# Columns of the source table that decide the token ids (the rest, e.g. scores or provenance, do not).
CONTENT_COLUMNS = ("prompt", "prompt_messages", "system", "shared_prefix", "chosen", "rejected", "responses")


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter/buffer names, dtypes, shapes and bytes (for models that are not in a folder)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        if t.numel():  # the tensor's own buffer (sha256 reads it in place; .tobytes() would copy it first)
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "specials": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def table_hash(table: pa.Table) -> str:
    cols = [c for c in CONTENT_COLUMNS if c in table.column_names]
    h = hashlib.sha256()
    for c in cols:
        h.update(c.encode() + b"\0")
        h.update(canonical_json(table[c].to_pylist()).encode())
    return h.hexdigest()


def ids_hash(data: Encoded) -> str:
    h = hashlib.sha256()
    for p, comps in zip(data.prompts, data.completions):
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
        for c in comps:
            h.update(np.asarray(c, dtype=np.int64).tobytes() + b";")
        h.update(b"\n")
    return h.hexdigest()


def cache_key(weights: str, tokenizer, tok_cfg: TokenizeConfig, table: pa.Table, data: Encoded,
              dtype: str) -> tuple[str, dict]:
    inputs = {"version": CACHE_VERSION, "weights": weights, "tokenizer": tokenizer_hash(tokenizer),
              "tokenize": tok_cfg.model_dump(), "table": table_hash(table), "token_ids": ids_hash(data),
              "dtype": dtype}
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest(), inputs


@dataclass
class RefLogps:
    per_group: list[list[float]]   # [group][slot]: summed reference log-probs, aligned with Encoded
    path: Path
    reused: bool
    forwards: int                  # reference model forwards done by this call (0 when reused)

    def column(self, slot: int) -> np.ndarray:
        return np.asarray([g[slot] for g in self.per_group], dtype=np.float64)


@torch.no_grad()
def compute_ref_logps(model, data: Encoded, pad_id: int, batch_groups: int = 16, device="cpu",
                      autocast_dtype: torch.dtype | None = None, chunk_tokens: int = 1024,
                      share_prompt: bool = False, logps_fn=None,
                      kernel: str = "auto") -> tuple[list[list[float]], int]:
    """Summed completion log-probs of every completion, in one no-grad pass. Groups are batched in length
    order so padding stays small. `logps_fn(batch)` replaces the plain `row_logps(model, ...)` call (the trainer
    passes its hook, which under torchrun runs the wrapped model). Returns (per-group lists, forwards)."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(p) + max(map(len, c)) for p, c in zip(data.prompts, data.completions)],
                       kind="stable")
    out: list[list[float]] = [[] for _ in range(len(data))]
    forwards = 0
    for s in range(0, len(order), batch_groups):
        idx = order[s:s + batch_groups]
        batch = collate(data, idx, pad_id, share_prompt, with_extra=False).to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            res = (logps_fn(batch) if logps_fn is not None
                   else row_logps(model, batch, chunk_tokens=chunk_tokens, kernel=kernel))
        forwards += 1
        per = batch.scatter(res.logps.double(), fill=float("nan")).cpu()
        for b, gi in enumerate(idx):
            out[int(gi)] = per[b, :len(data.completions[int(gi)])].tolist()
    model.train(was_training)
    return out, forwards


def _columns(per_group: list[list[float]], kind: str) -> dict[str, pa.Array]:
    if kind == "pairs":
        return {"ref_chosen_logp": pa.array([g[0] for g in per_group], pa.float64()),
                "ref_rejected_logp": pa.array([g[1] for g in per_group], pa.float64())}
    return {"ref_logps": pa.array(per_group, pa.list_(pa.float64()))}


def _read_cached(path: Path, data: Encoded, kind: str) -> list[list[float]] | None:
    try:
        t = pq.read_table(path)
    except (pa.ArrowInvalid, OSError):
        return None  # unreadable (e.g. a foreign file): recompute and overwrite
    if t.num_rows != len(data) or t["source_row"].to_pylist() != data.rows.tolist():
        return None
    if kind == "pairs":
        return [list(x) for x in zip(t["ref_chosen_logp"].to_pylist(), t["ref_rejected_logp"].to_pylist())]
    return t["ref_logps"].to_pylist()


def reference_logps(model_fn, weights: str, tokenizer, tok_cfg: TokenizeConfig, table: pa.Table,
                    data: Encoded, kind: str, cache_dir: str | Path, pad_id: int, *, batch_groups: int = 16,
                    device="cpu", autocast_dtype: torch.dtype | None = None,
                    chunk_tokens: int = 1024, share_prompt: bool = False, kernel: str = "auto") -> RefLogps:
    """The cached reference log-probs for `data`, computing them (and writing the cache) on a miss.

    `model_fn()` returns the reference model; it is only called on a miss, so a warm cache never loads it.
    """
    dtype = str(autocast_dtype or "float32")
    key, inputs = cache_key(weights, tokenizer, tok_cfg, table, data, dtype)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"ref-{key[:24]}.parquet"
    if path.exists():
        cached = _read_cached(path, data, kind)
        if cached is not None:
            return RefLogps(cached, path, reused=True, forwards=0)
    per_group, forwards = compute_ref_logps(model_fn(), data, pad_id, batch_groups, device, autocast_dtype,
                                            chunk_tokens, share_prompt, kernel=kernel)
    kept = table.take(pa.array(data.rows))
    kept = kept.drop_columns([c for c in ("source_row", "ref_chosen_logp", "ref_rejected_logp", "ref_logps")
                              if c in kept.column_names])
    kept = kept.append_column("source_row", pa.array(data.rows, pa.int64()))
    for name, col in _columns(per_group, kind).items():
        kept = kept.append_column(name, col)
    atomic_write_table(path, kept)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps({"fingerprint": key, **inputs}, indent=1).encode())
    return RefLogps(per_group, path, reused=False, forwards=forwards)
