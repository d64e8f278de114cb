"""Turn a PairBatch into the quantities every pairwise formula reads: log-ratios, f-divergence scores, lengths.

Modifiers that change the log-probs themselves (reference-free, LD-DPO) and the WPO pair weights live here too, so
the formulas in `pairwise.py` stay one line each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import InputError
from pipeline.train.losses.types import LossConfig, PairBatch

# exp() argument cap of the alpha/forward-KL transforms: fp32 overflows just past 88 (TRL uses 80, 11 for fp16).
EXP_CAP = 80.0


@dataclass
class Margins:
    """Per-pair tensors of shape [B] (fp32 or fp64) shared by all formulas."""

    beta: float
    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    score_chosen: Tensor     # s(Δc): the f-divergence transform of the chosen log-ratio
    score_rejected: Tensor
    smoothing: Tensor | float  # ε of the label-smoothed forms (per pair when label confidence is used)

    @property
    def delta_chosen(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def delta_rejected(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def score_margin(self) -> Tensor:
        """δ = s(Δc) - s(Δr), unscaled."""
        return self.score_chosen - self.score_rejected

    def swapped(self) -> Margins:
        """The same pairs with chosen and rejected exchanged (the flipped label)."""
        return replace(
            self, policy_chosen=self.policy_rejected, policy_rejected=self.policy_chosen,
            ref_chosen=self.ref_rejected, ref_rejected=self.ref_chosen,
            chosen_tokens=self.rejected_tokens, rejected_tokens=self.chosen_tokens,
            score_chosen=self.score_rejected, score_rejected=self.score_chosen)


def f_divergence_score(delta: Tensor, cfg: LossConfig) -> Tensor:
    """s(Δ) = f'(t) at t = π/πref = e^Δ, the f-divergence generalisation of DPO (Wang et al. 2023), with TRL
    1.16's constants so that s(0) = 0: forward KL 1 - e^-Δ, JS log 2 + log σ(Δ), alpha (e^((α-1)Δ) - 1)/(α-1)."""
    kind = cfg.f_divergence_type
    alpha = cfg.f_alpha_divergence_coef
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return delta  # α → 1 is the reverse-KL limit, as in TRL
    if kind == "forward_kl":
        return -torch.expm1(torch.clamp(-delta, max=EXP_CAP))
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(delta)
    return torch.expm1(torch.clamp((alpha - 1.0) * delta, max=EXP_CAP)) / (alpha - 1.0)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half-precision sums lose the small margins DPO lives on; always compute the loss in at least fp32.
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _check_shapes(batch: PairBatch) -> None:
    size = batch.policy_chosen.shape
    if len(size) != 1:
        raise InputError(f"PairBatch tensors must have shape [B], policy_chosen has {tuple(size)}")
    if size[0] == 0:
        raise InputError("PairBatch is empty: the per-pair mean of zero pairs is undefined")
    for name in ("policy_rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens", "weights",
                 "label_confidence", "chosen_sq_logmass", "rejected_sq_logmass", "decoupled_margin",
                 "rationale_logps"):
        value = getattr(batch, name)
        if value is not None and value.shape != size:
            raise InputError(f"PairBatch.{name} has shape {tuple(value.shape)}, expected {tuple(size)}")


def length_desensitized(token_logps: Tensor, lengths: Tensor, shared: Tensor, alpha: float) -> Tensor:
    """LD-DPO: Σ_{t<l} logp_t + α·Σ_{t>=l} logp_t, l = the shorter completion's length; padding ignored."""
    positions = torch.arange(token_logps.shape[-1], device=token_logps.device)
    inside = positions[None, :] < lengths[:, None]
    weight = torch.where(positions[None, :] < shared[:, None], 1.0, alpha)
    # where, not a multiply by the mask: padding may hold NaN/inf, and 0·NaN would poison the sum.
    weighted = torch.where(inside, token_logps * weight, torch.zeros_like(token_logps))
    return weighted.sum(-1)


def _ld_logps(batch: PairBatch, cfg: LossConfig, ref: tuple[Tensor, Tensor],
              dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    ct, rt = batch.chosen_tokens.to(dtype), batch.rejected_tokens.to(dtype)
    shared = torch.minimum(ct, rt)
    alpha = float(cfg.ld_alpha)

    def weighted(chosen_tok: Tensor | None, rejected_tok: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
        if chosen_tok is None or rejected_tok is None:
            raise InputError(f"ld_alpha needs PairBatch.{what}_chosen_token_logps and {what}_rejected_token_logps")
        return (length_desensitized(chosen_tok.to(dtype), ct, shared, alpha),
                length_desensitized(rejected_tok.to(dtype), rt, shared, alpha))

    policy = weighted(batch.policy_chosen_token_logps, batch.policy_rejected_token_logps, "policy")
    if cfg.ld_on_reference and cfg.needs_reference:
        ref_c, ref_r = weighted(batch.ref_chosen_token_logps, batch.ref_rejected_token_logps, "ref")
        ref = (ref_c.detach(), ref_r.detach())
    return policy, ref


def build_margins(batch: PairBatch, cfg: LossConfig) -> Margins:
    _check_shapes(batch)
    dtype = _compute_dtype(batch.policy_chosen)
    pc, pr = batch.policy_chosen.to(dtype), batch.policy_rejected.to(dtype)
    if batch.ref_chosen is None or batch.ref_rejected is None or cfg.reference_free:
        if cfg.needs_reference:
            raise InputError(f"loss {cfg.loss_types} needs reference log-probs (ref_chosen/ref_rejected) "
                             "or reference_free=true")
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    else:
        rc, rr = batch.ref_chosen.to(dtype).detach(), batch.ref_rejected.to(dtype).detach()
    if cfg.ld_alpha is not None:
        (pc, pr), (rc, rr) = _ld_logps(batch, cfg, (rc, rr), dtype)
    smoothing: Tensor | float = cfg.label_smoothing
    if cfg.use_label_confidence:
        if batch.label_confidence is None:
            raise InputError("use_label_confidence needs PairBatch.label_confidence")
        smoothing = 1.0 - batch.label_confidence.to(dtype)
    return Margins(
        beta=cfg.beta, policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr,
        # An empty completion counts as one token in the per-token averages (TRL clamps the same way).
        chosen_tokens=batch.chosen_tokens.to(dtype).clamp(min=1.0),
        rejected_tokens=batch.rejected_tokens.to(dtype).clamp(min=1.0),
        score_chosen=f_divergence_score(pc - rc, cfg), score_rejected=f_divergence_score(pr - rr, cfg),
        smoothing=smoothing)


def wpo_weights(batch: PairBatch, cfg: LossConfig, dtype: torch.dtype) -> Tensor:
    """WPO: w(y) = exp(mean_t[log πθ(y_t) - log Σ_v πθ(v)²]); the pair weight w(yc)·w(yr), without gradient."""
    if batch.chosen_sq_logmass is None or batch.rejected_sq_logmass is None:
        raise InputError("use_weighting (WPO) needs PairBatch.chosen_sq_logmass and rejected_sq_logmass")
    with torch.no_grad():
        log_wc = (batch.policy_chosen.to(dtype) - batch.chosen_sq_logmass.to(dtype)) / batch.chosen_tokens.to(dtype)
        log_wr = ((batch.policy_rejected.to(dtype) - batch.rejected_sq_logmass.to(dtype))
                  / batch.rejected_tokens.to(dtype))
        weight = torch.exp(log_wc + log_wr)
        return torch.clamp(weight, max=1.0) if cfg.wpo_clamp else weight
