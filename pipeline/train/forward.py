"""Summed completion log-probs of every row of a batch: one model forward, the head only on scored positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.train.collate import Batch
from pipeline.train.head import DEFAULT_CHUNK_TOKENS, chunked_logprobs, plain_logprobs


@dataclass
class RowLogps:
    logps: torch.Tensor    # [S] fp32, sum over each sequence's scored completion tokens
    tokens: torch.Tensor   # [S] number of scored tokens


def backbone_and_head(model):
    """The transformer body (returns hidden states) and the output projection of a *ForCausalLM model."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise TypeError(f"{type(model).__name__}: expected a causal LM with a base model and an lm_head")
    cfg = model.config
    # A head that post-processes logits (soft-capping, scaling) is not a plain linear layer.
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"{attr} is not supported by the chunked head")
    return body, head


def row_logps(model, batch: Batch, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, fused: bool = True,
              kernel: str = "auto") -> RowLogps:
    """Per-sequence sums of log p(completion token | everything before it) for a collated batch.

    Only the hidden states named by the batch's scoring plan reach the head (prompt and padding never do).
    """
    body, head = backbone_and_head(model)
    # Separate layout: rows are right-padded and attention is causal, so no real token attends to padding and
    # no mask is needed; that lets SDPA take its causal kernel instead of building [rows, heads, T, T] scores.
    mask = None
    if batch.segments is not None:
        eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        mask = batch.attention_mask_4d(_float_dtype(model) if eager else None)
    hidden = body(input_ids=batch.input_ids, attention_mask=mask,
                  position_ids=batch.position_ids).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.src)
    if fused:
        tok = chunked_logprobs(h, head.weight, batch.tgt, bias=head.bias, chunk_tokens=chunk_tokens,
                               kernel=kernel)
    else:
        tok = plain_logprobs(h, head.weight, batch.tgt, bias=head.bias)
    n = batch.num_sequences
    sums = torch.zeros(n, dtype=torch.float32, device=h.device).index_add(0, batch.seq, tok)
    counts = torch.zeros(n, dtype=torch.long, device=h.device).index_add(0, batch.seq, torch.ones_like(batch.seq))
    return RowLogps(sums, counts)


def _float_dtype(model) -> torch.dtype:
    dev = next(model.parameters()).device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else next(model.parameters()).dtype
