"""Stateful pairwise losses: BCO's running reward baseline, SPA's noise-aware self-refinement ("distill") and
LCPO's EM label-noise weighting. Their state lives in `LossState`, updated once per call unless `update=False`
(evaluation). Because the state moves per call, these are batch-coupled under gradient accumulation: 8 calls
on micro-batches of 1 see 8 state updates where one batch of 8 sees one.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.train.losses.margins import Margins
from pipeline.train.losses.pairwise import PairFormula
from pipeline.train.losses.types import LossConfig, LossState


def bco_pair(m: Margins, cfg: LossConfig, state: LossState, update: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """-log σ(β Δc - δ) - log σ(-(β Δr - δ)); δ = running mean of the per-call mean reward (TRL v0.27
    RunningMoments fed one batch mean per step, the current one included; TRL 1.16 dropped δ)."""
    zc, zr = m.beta * m.delta_chosen, m.beta * m.delta_rejected
    delta = torch.zeros((), dtype=zc.dtype, device=zc.device)
    if cfg.bco_baseline == "running_mean":
        batch_mean = float(torch.cat([zc, zr]).mean().detach())
        total, count = state.bco_reward_sum + batch_mean, state.bco_reward_count + 1
        if update:
            state.bco_reward_sum, state.bco_reward_count = total, count
        delta = delta + total / count
    losses = -F.logsigmoid(zc - delta) - F.logsigmoid(-(zr - delta))
    return losses, {"bco/delta": delta.detach()}


def spa_alpha(cfg: LossConfig, state: LossState) -> float:
    """SPA's refinement strength: 0 during the first `spa_warmup_fraction` of max_steps (always on when the
    trainer did not say how many steps there are)."""
    if state.max_steps is not None and state.step < cfg.spa_warmup_fraction * state.max_steps:
        return 0.0
    return cfg.spa_refine_strength


def spa_threshold(margins: list[float], cfg: LossConfig) -> float:
    """τ from a full window: the mean of the k-th and (k+1)-th smallest stored margins (0-based), k = int(q·n);
    with the defaults (q = 0.1, n = 50) the 6th and 7th smallest, about the 10th percentile."""
    ordered = sorted(margins)
    k = min(int(cfg.spa_threshold_quantile * len(ordered)), len(ordered) - 2)
    return 0.5 * (ordered[k] + ordered[k + 1])


def _spa_window(state: LossState, cfg: LossConfig) -> deque[float]:
    if state.spa_margins.maxlen != cfg.spa_window:
        state.spa_margins = deque(state.spa_margins, maxlen=cfg.spa_window)
    return state.spa_margins


def distill(m: Margins, cfg: LossConfig, state: LossState, update: bool,
            decoupled_margin: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """SPA noise-aware loss: -(1 - α + α·c)·log σ(h) - α·(1 - c)·log σ(-h), c = 1[z > τ].

    Confident pairs (margin above τ) get plain DPO; the low-margin ones (presumed mislabelled) are smoothed
    toward the flipped label. τ starts at 0 and follows the stored per-call mean margins once the window is full.
    """
    h = m.beta * m.score_margin
    z = (decoupled_margin.to(h.dtype) if decoupled_margin is not None else h).detach()
    alpha = spa_alpha(cfg, state)
    confident = (z > state.spa_threshold).to(h.dtype)
    losses = -(1.0 - alpha + alpha * confident) * F.logsigmoid(h) - alpha * (1.0 - confident) * F.logsigmoid(-h)
    metrics = {"spa/threshold": torch.tensor(state.spa_threshold, device=h.device),
               "spa/alpha": torch.tensor(alpha, device=h.device),
               "spa/confident": confident.mean().detach()}
    if update:
        window = _spa_window(state, cfg)
        window.append(float(z.mean()))
        if len(window) == window.maxlen:
            state.spa_threshold = spa_threshold(list(window), cfg)
    return losses, metrics


LCPO_MAX_NOISE = 0.49


def lcpo_weights(base: Tensor, flipped: Tensor, noise: float) -> Tensor:
    """E-step: posterior that the label is right, with p(h) = e^-ℓ(h) / (e^-ℓ(h) + e^-ℓ(-h))
    = σ(ℓ(-h) - ℓ(h))."""
    with torch.no_grad():
        p = torch.sigmoid(flipped - base)
        right = (1.0 - noise) * p
        return right / (right + noise * (1.0 - p))


def lcpo(formulas: list[PairFormula], m: Margins, cfg: LossConfig, state: LossState,
         update: bool) -> tuple[list[Tensor], dict[str, Tensor]]:
    """LCPO around each base loss; ℓ(-h) is the loss of the swapped pair. One ε update per call, from the mean
    weight over all wrapped losses. [reconstructed from the abstract of arXiv 2509.24159; see docs/trainer.md]"""
    noise = state.lcpo_noise if state.lcpo_noise is not None else cfg.lcpo_init_noise
    flipped_margins = m.swapped()
    out, mean_weights = [], []
    for formula in formulas:
        base, flipped = formula(m, cfg), formula(flipped_margins, cfg)
        w = lcpo_weights(base, flipped, noise)
        out.append(w * base + (1.0 - w) * flipped if cfg.lcpo_mode == "em_full" else w * base)
        mean_weights.append(float(w.mean()))
    if update:
        target = 1.0 - sum(mean_weights) / len(mean_weights)
        # Kept below 1/2: past it the E-step would call the majority of labels wrong and flip the objective.
        state.lcpo_noise = min(max((1.0 - cfg.lcpo_momentum) * noise + cfg.lcpo_momentum * target, 0.0), LCPO_MAX_NOISE)
    device = m.policy_chosen.device
    return out, {"lcpo/noise": torch.tensor(noise, device=device),
                 "lcpo/weight": torch.tensor(sum(mean_weights) / len(mean_weights), device=device)}
