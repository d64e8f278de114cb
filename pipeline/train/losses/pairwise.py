"""Per-pair formulas of the stateless pairwise losses (docs/trainer.md lists each loss and its source).

Each function maps `Margins` (see margins.py) to a [B] tensor of per-pair losses. Notation: Δ = log πθ - log πref
(summed over completion tokens), s = s(Δ) the f-divergence transform (s = Δ by default), δ = s_c - s_r,
ε = label smoothing. Which losses read s and which raw Δ follows TRL 1.16's `_compute_loss` (nca_pair, bco_pair,
sppo_hard, aot*, apo* read Δ; a non-default f-divergence is refused for them). Everything is written with
logsigmoid / expm1 so that no intermediate overflows.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.train.losses.margins import Margins
from pipeline.train.losses.types import LossConfig

PairFormula = Callable[[Margins, LossConfig], Tensor]

# exo_pair divides by ε inside a log; TRL v0.27 silently used this when label_smoothing was 0.
EXO_DEFAULT_EPSILON = 1e-3


def smoothed_logistic(z: Tensor, eps: Tensor | float) -> Tensor:
    """-(1-ε)·log σ(z) - ε·log σ(-z): cDPO; ε = 0 is plain DPO."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(m: Margins, cfg: LossConfig) -> Tensor:
    return smoothed_logistic(m.beta * m.score_margin, m.smoothing)


def hinge(m: Margins, cfg: LossConfig) -> Tensor:
    return torch.relu(1.0 - m.beta * m.score_margin)


def ipo(m: Margins, cfg: LossConfig) -> Tensor:
    # Length-normalised, as TRL does after the IPO authors confirmed it.
    gap = m.score_chosen / m.chosen_tokens - m.score_rejected / m.rejected_tokens
    return (gap - 1.0 / (2.0 * m.beta)) ** 2


def exo_pair(m: Margins, cfg: LossConfig) -> Tensor:
    eps = cfg.label_smoothing if cfg.label_smoothing > 0 else EXO_DEFAULT_EPSILON
    z = m.beta * m.score_margin
    log_p, log_q = F.logsigmoid(z), F.logsigmoid(-z)
    return log_p.exp() * (log_p - math.log1p(-eps)) + log_q.exp() * (log_q - math.log(eps))


def nca_pair(m: Margins, cfg: LossConfig) -> Tensor:
    zc, zr = m.beta * m.delta_chosen, m.beta * m.delta_rejected
    return -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)


def robust(m: Margins, cfg: LossConfig) -> Tensor:
    eps = cfg.label_smoothing
    z = m.beta * m.score_margin
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def sppo_hard(m: Margins, cfg: LossConfig) -> Tensor:
    half_inv_beta = 1.0 / (2.0 * m.beta)
    return (m.delta_chosen - half_inv_beta) ** 2 + (m.delta_rejected + half_inv_beta) ** 2


def aot(m: Margins, cfg: LossConfig) -> Tensor:
    # Batch-coupled: sorts the policy and the reference log-ratio across the batch (optimal transport of margins).
    policy_sorted = torch.sort(m.policy_chosen - m.policy_rejected).values
    ref_sorted = torch.sort(m.ref_chosen - m.ref_rejected).values
    return smoothed_logistic(m.beta * (policy_sorted - ref_sorted), cfg.label_smoothing)


def aot_unpaired(m: Margins, cfg: LossConfig) -> Tensor:
    gap = torch.sort(m.delta_chosen).values - torch.sort(m.delta_rejected).values
    return smoothed_logistic(m.beta * gap, cfg.label_smoothing)


def apo_zero(m: Margins, cfg: LossConfig) -> Tensor:
    return (1.0 - torch.sigmoid(m.beta * m.delta_chosen)) + torch.sigmoid(m.beta * m.delta_rejected)


def apo_down(m: Margins, cfg: LossConfig) -> Tensor:
    return torch.sigmoid(m.beta * m.delta_chosen) + (1.0 - torch.sigmoid(m.beta * m.score_margin))


def discopop(m: Margins, cfg: LossConfig) -> Tensor:
    z = m.beta * m.score_margin
    log_mod = F.logsigmoid(z / cfg.discopop_tau)
    # m·e^(-z) as exp(log m - z): finite where e^(-z) alone would overflow (m is tiny there).
    return (1.0 - log_mod.exp()) * (-F.logsigmoid(z)) + torch.exp(log_mod - z)


def sft(m: Margins, cfg: LossConfig) -> Tensor:
    # The SFT term is an NLL over chosen tokens, added by pair.py (see NLL_COEF); no per-pair preference part.
    return torch.zeros_like(m.policy_chosen)


def sigmoid_norm(m: Margins, cfg: LossConfig) -> Tensor:
    gap = m.score_chosen / m.chosen_tokens - m.score_rejected / m.rejected_tokens
    return -F.logsigmoid(m.beta * gap)


def ln_dpo(m: Margins, cfg: LossConfig) -> Tensor:
    gap = m.score_chosen / m.chosen_tokens - m.score_rejected / m.rejected_tokens
    return -F.logsigmoid(cfg.ln_dpo_beta * gap)


def simpo(m: Margins, cfg: LossConfig) -> Tensor:
    # Reference-free, on average log-probs, with target margin γ (CPOTrainer's simpo form).
    gap = m.policy_chosen / m.chosen_tokens - m.policy_rejected / m.rejected_tokens
    return smoothed_logistic(m.beta * gap - cfg.simpo_gamma, cfg.label_smoothing)


def log_one_minus_exp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, via expm1 so that x near 0 keeps its precision."""
    return torch.log(-torch.expm1(x))


def orpo(m: Margins, cfg: LossConfig) -> Tensor:
    # The odds-ratio part, -λ·log σ(log odds); ORPO's NLL part is added by pair.py (NLL_COEF).
    avg_c, avg_r = m.policy_chosen / m.chosen_tokens, m.policy_rejected / m.rejected_tokens
    log_odds = (avg_c - avg_r) - (log_one_minus_exp(avg_c) - log_one_minus_exp(avg_r))
    return -m.beta * F.logsigmoid(log_odds)


STATELESS_FORMULAS: dict[str, PairFormula] = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "robust": robust, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired, "apo_zero": apo_zero,
    "apo_down": apo_down, "discopop": discopop, "sft": sft, "sigmoid_norm": sigmoid_norm, "ln_dpo": ln_dpo,
    "simpo": simpo, "orpo": orpo,
}
# Coefficient of the chosen-NLL term each loss type carries (sft is pure NLL; ORPO = NLL + λ·odds-ratio term).
NLL_COEF: dict[str, float] = {"sft": 1.0, "orpo": 1.0}


def rationale_term(rationale_logps: Tensor, gamma: float, form: str) -> Tensor:
    """RDPO's rationale likelihood term (docs/stages.md): -log σ(γ·ℓθ(r)) (code) or -γ·ℓθ(r) (paper, "nll")."""
    if form == "logsigmoid":
        return -F.logsigmoid(gamma * rationale_logps)
    return -gamma * rationale_logps
