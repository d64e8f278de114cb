"""Summed completion log-probs of every row of a batch: one model forward, the head only on scored positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.train.data import Batch
from pipeline.train.head import DEFAULT_CHUNK_TOKENS, chunked_logprobs, plain_logprobs


@dataclass
class RowLogps:
    logps: torch.Tensor    # [R] fp32, sum over the row's completion tokens
    tokens: torch.Tensor   # [R] number of completion tokens


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


def row_logps(model, batch: Batch, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, fused: bool = True) -> RowLogps:
    """Per-row sums of log p(completion token | prefix) for a right-padded batch.

    Only the hidden states that predict completion tokens reach the head: position t-1 predicts token t, so
    the selected positions are completion_mask[:, 1:] applied to hidden[:, :-1].
    """
    body, head = backbone_and_head(model)
    # Rows are right-padded and attention is causal, so no real token ever attends to padding: the padding
    # mask changes nothing we score. Leaving it out lets SDPA take its causal (flash) kernel instead of
    # materialising a [rows, heads, T, T] masked score matrix.
    hidden = body(input_ids=batch.input_ids, attention_mask=None).last_hidden_state
    target_mask = batch.completion_mask[:, 1:]
    h = hidden[:, :-1][target_mask]
    targets = batch.input_ids[:, 1:][target_mask]
    rows = torch.arange(batch.input_ids.shape[0], device=h.device)[:, None].expand_as(target_mask)[target_mask]
    if fused:
        tok = chunked_logprobs(h, head.weight, targets, bias=head.bias, chunk_tokens=chunk_tokens)
    else:
        tok = plain_logprobs(h, head.weight, targets, bias=head.bias)
    n_rows = batch.input_ids.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=h.device).index_add(0, rows, tok)
    counts = target_mask.sum(1)
    return RowLogps(sums, counts)
