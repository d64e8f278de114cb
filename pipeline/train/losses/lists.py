"""Ranked-list losses over [B, K] lists: Plackett–Luce, LiPO-λ, PRO and TPO (docs/trainer.md).

Each list is one prompt's K responses with graded labels `scores` (higher = better) and a validity `mask`; the
loss is the mean over lists of a per-list sum. Ties in `scores` are broken by position (earlier = better) for the
losses that need a total order (PL, PRO); LiPO/TPO skip tied pairs. The model-score ranks τ of the lambda weights
are computed without gradient, as in LambdaLoss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import InputError
from pipeline.train.losses.types import ListBatch, ListLossConfig

NEG_INF = float("-inf")
MASKED_LOGIT = -1e30


def _check(batch: ListBatch) -> None:
    shape = batch.policy_logps.shape
    if len(shape) != 2:
        raise InputError(f"ListBatch tensors must have shape [B, K], policy_logps has {tuple(shape)}")
    for name in ("ref_logps", "tokens", "scores", "mask", "response_scores"):
        value = getattr(batch, name)
        if value is not None and value.shape != shape:
            raise InputError(f"ListBatch.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if batch.mask.dtype != torch.bool:
        raise InputError("ListBatch.mask must be a bool tensor")


def _log_ratio(batch: ListBatch, cfg: ListLossConfig, *, length_normalize: bool) -> Tensor:
    """log πθ - log πref per response (reference 0 when reference-free), optionally per token; 0 where masked."""
    dtype = batch.policy_logps.dtype if batch.policy_logps.dtype == torch.float64 else torch.float32
    ratio = batch.policy_logps.to(dtype)
    if not cfg.reference_free:
        if batch.ref_logps is None:
            raise InputError(f"list loss {cfg.loss_type} needs ListBatch.ref_logps or reference_free=true")
        ratio = ratio - batch.ref_logps.to(dtype).detach()
    if length_normalize:
        ratio = ratio / batch.tokens.to(dtype)
    # Masked slots may hold garbage (NaN); zero them so they cannot leak into sums through 0·NaN.
    return torch.where(batch.mask, ratio, torch.zeros_like(ratio))


def _sort_by_label(batch: ListBatch, *values: Tensor) -> tuple[Tensor, ...]:
    """Reorder each [B, K] tensor best label first, masked entries last (stable: ties keep their order)."""
    key = torch.where(batch.mask, batch.scores.to(torch.float64), torch.full_like(batch.scores, NEG_INF,
                                                                                  dtype=torch.float64))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    return tuple(v.gather(1, order) for v in values)


def plackett_luce_terms(r: Tensor, mask: Tensor) -> Tensor:
    """-Σ_k log(e^{r_k} / Σ_{j>=k} e^{r_j}) per row of label-sorted scores r (valid entries first)."""
    # A finite stand-in for -inf: logcumsumexp's backward turns all -inf suffixes into NaN gradients.
    masked = torch.where(mask, r, torch.full_like(r, MASKED_LOGIT))
    # Suffix logsumexp: Σ over j >= k, via logcumsumexp on the reversed rows.
    suffix = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)
    terms = torch.where(mask, suffix - r, torch.zeros_like(r))
    return terms.sum(1)


def plackett_luce(batch: ListBatch, cfg: ListLossConfig) -> Tensor:
    r = cfg.beta * _log_ratio(batch, cfg, length_normalize=cfg.length_normalize)
    r_sorted, mask_sorted = _sort_by_label(batch, r, batch.mask)
    return plackett_luce_terms(r_sorted, mask_sorted)


def _model_ranks(r: Tensor, mask: Tensor) -> Tensor:
    """1-based rank of each valid entry by model score, best first (masked entries rank after all)."""
    with torch.no_grad():
        key = torch.where(mask, r, torch.full_like(r, NEG_INF))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, r.shape[1] + 1, device=r.device).expand_as(order))
        return ranks.to(r.dtype)


def lambda_pair_loss(r: Tensor, labels: Tensor, mask: Tensor, cfg: ListLossConfig) -> Tensor:
    """-Σ_{ψi>ψj} λ_ij·log σ(r_i - r_j) per row; λ_ij = |G_i - G_j|·|1/D(τ_i) - 1/D(τ_j)| with G = 2^ψ - 1,
    D(τ) = log_base(1 + τ), τ the model-score rank (LambdaLoss / LiPO-λ), or λ_ij = 1 when uniform."""
    better = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    if cfg.lambda_weighting == "lambda":
        with torch.no_grad():
            gain = torch.pow(2.0, labels) - 1.0
            discount = math.log(cfg.discount_log_base) / torch.log1p(_model_ranks(r, mask))
            weight = (gain[:, :, None] - gain[:, None, :]).abs() * (discount[:, :, None] - discount[:, None, :]).abs()
    else:
        weight = torch.ones_like(r)[:, :, None].expand(-1, -1, r.shape[1])
    pair_terms = -F.logsigmoid(r[:, :, None] - r[:, None, :]) * weight
    return torch.where(better, pair_terms, torch.zeros_like(pair_terms)).sum((1, 2))


def _labels(batch: ListBatch, dtype: torch.dtype) -> Tensor:
    labels = batch.scores.to(dtype)
    return torch.where(batch.mask, labels, torch.zeros_like(labels))


def lipo_lambda(batch: ListBatch, cfg: ListLossConfig) -> Tensor:
    r = cfg.beta * _log_ratio(batch, cfg, length_normalize=cfg.length_normalize)
    return lambda_pair_loss(r, _labels(batch, r.dtype), batch.mask, cfg)


def tpo(batch: ListBatch, cfg: ListLossConfig) -> Tensor:
    """TPO, paper form: LiPO-λ on β·(s_i - s_j) with labels mapped to [0, 1]; s = response_scores when given
    (adaptive step reward), else the per-token mean log-ratio."""
    if batch.response_scores is not None:
        dtype = torch.float64 if batch.response_scores.dtype == torch.float64 else torch.float32
        s = batch.response_scores.to(dtype).masked_fill(~batch.mask, 0.0)
    else:
        s = _log_ratio(batch, cfg, length_normalize=True)
    labels = _labels(batch, s.dtype)
    if cfg.tpo_label_range is not None:
        low, high = cfg.tpo_label_range
        labels = (labels - low) / (high - low)
    return lambda_pair_loss(cfg.beta * s, labels, batch.mask, cfg)


def _pro_temperatures(rewards: Tensor, later: Tensor) -> Tensor:
    """[B, k, i] multipliers: T_ki = r_k - r_i for valid i > k, T_kk = max_{i>k} T_ki, 0 elsewhere."""
    gaps = torch.where(later, rewards[:, :, None] - rewards[:, None, :], torch.zeros_like(later, dtype=rewards.dtype))
    own = torch.where(later, gaps, torch.full_like(gaps, NEG_INF)).max(dim=2).values
    own = torch.where(later.any(dim=2), own, torch.zeros_like(own))  # rows without successors take no part
    return gaps + torch.diag_embed(own)


def pro(batch: ListBatch, cfg: ListLossConfig) -> Tensor:
    """PRO (DAMO-ConvAI code): Σ_k -log[e^{s_k T_kk} / Σ_{i>=k} e^{s_i T_ki}] + w_sft·(n-1)²·NLL(y_1), with
    s = length-normalised policy log-prob (no reference), T_ki = r_k - r_i, T_kk = max_{i>k} T_ki."""
    dtype = batch.policy_logps.dtype if batch.policy_logps.dtype == torch.float64 else torch.float32
    s = (batch.policy_logps.to(dtype) / batch.tokens.to(dtype)).masked_fill(~batch.mask, 0.0)
    rewards = _labels(batch, dtype)
    s, rewards, mask, summed = _sort_by_label(batch, s, rewards, batch.mask, batch.policy_logps.to(dtype))
    k_size = s.shape[1]
    later = torch.triu(torch.ones(k_size, k_size, dtype=torch.bool, device=s.device), diagonal=1)
    later = later[None] & mask[:, None, :] & mask[:, :, None]        # [B, k, i]: i > k, both valid
    if cfg.pro_reward_temperature:
        temps = _pro_temperatures(rewards, later)
    else:
        temps = torch.ones(s.shape[0], k_size, k_size, dtype=dtype, device=s.device)
    in_term = later | torch.eye(k_size, dtype=torch.bool, device=s.device)[None]
    logits = torch.where(in_term, s[:, None, :] * temps, torch.full_like(temps, NEG_INF))
    own = torch.diagonal(logits, dim1=1, dim2=2)
    ranking = torch.where(later.any(dim=2), torch.logsumexp(logits, dim=2) - own, torch.zeros_like(own)).sum(1)
    n = mask.sum(1).to(dtype)
    return ranking + cfg.pro_sft_weight * (n - 1.0) ** 2 * (-summed[:, 0])


LIST_LOSSES = {"plackett_luce": plackett_luce, "lipo_lambda": lipo_lambda, "pro": pro, "tpo": tpo}


def list_loss(batch: ListBatch, cfg: ListLossConfig, *,
              num_items_in_global_batch: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of the per-list losses over `num_items_in_global_batch` lists (default: this batch's B, i.e. the mean),
    plus metrics: mean reward of the best/worst valid response, their margin, and the share of lists whose
    best-labelled response has the highest model log-ratio. Lists never span micro-batches, so every list loss is
    exact under gradient accumulation when the global list count is passed."""
    _check(batch)
    if batch.policy_logps.shape[0] == 0:
        raise InputError("ListBatch is empty: the mean over zero lists is undefined")
    per_list = LIST_LOSSES[cfg.loss_type](batch, cfg)
    n_items = num_items_in_global_batch if num_items_in_global_batch is not None else per_list.shape[0]
    with torch.no_grad():
        policy = batch.policy_logps.float()
        use_ref = batch.ref_logps is not None and not cfg.reference_free
        ratio = cfg.beta * (policy - batch.ref_logps.float() if use_ref else policy)
        ratio_sorted, mask_sorted = _sort_by_label(batch, ratio, batch.mask)
        last_valid = (mask_sorted.sum(1) - 1).clamp(min=0)
        best, worst = ratio_sorted[:, 0], ratio_sorted.gather(1, last_valid[:, None])[:, 0]
        top_model = torch.where(batch.mask, ratio, torch.full_like(ratio, NEG_INF)).max(1).values
        metrics = {"rewards/best": best.mean(), "rewards/worst": worst.mean(),
                   "rewards/accuracies": (best >= top_model).to(ratio.dtype).mean(),
                   "rewards/margins": (best - worst).mean()}
    return per_list.sum() / n_items, metrics
