"""`pair_loss`: one scalar from a PairBatch, for any loss type or weighted list of them.

Loss = Σ_k w_k·[mean over pairs of (pair weight · loss_k)] + (NLL terms) + (RPO cumulative / rationale terms).

Gradient accumulation. Every pairwise term is a sum over pairs divided by `num_items_in_global_batch` (default:
this batch's B), and the token-mean NLL (sft, orpo, RPO average form with nll_average="token") is a sum over
chosen tokens divided by `num_tokens_in_global_batch` (default: this batch's chosen tokens). Passing the global
counts makes the sum of the micro-batch losses equal the full-batch loss exactly, values and gradients, for every
loss that is decomposable per pair. The batch-coupled ones are not:
- aot, aot_unpaired sort the margins across the batch: with micro-batches of 1 the sort is the identity;
- bco_pair updates its running mean reward once per call (8 updates for 8 micro-batches instead of 1);
- distill (SPA) appends one mean margin per call to its 50-entry window, as SPA itself did with micro-batch 1;
- lcpo_mode updates its noise rate ε once per call.
For those the trainer should either keep whole batches in one call or accept the per-call semantics
(`LossConfig.batch_coupled()` names what applies).

Known differences from TRL 1.16 (tests/test_losses.py checks parity everywhere else): pair weights and WPO
multiply the preference terms only, where TRL also scales its sft term by the batch-mean WPO weight; exo_pair with
label_smoothing = 0 uses ε = 1e-3 (TRL v0.27) where TRL 1.16 refuses it; rewards/* metrics are always β·Δ on summed
log-probs, also for simpo/orpo (TRL's CPO/ORPO trainers log β·average log-prob).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from pipeline.errors import InputError
from pipeline.train.losses.margins import Margins, build_margins, wpo_weights
from pipeline.train.losses.noise import bco_pair, distill, lcpo
from pipeline.train.losses.pairwise import NLL_COEF, STATELESS_FORMULAS, rationale_term
from pipeline.train.losses.types import LossConfig, LossState, PairBatch

Reduction = Literal["mean", "sum", "none"]


def _per_type_losses(m: Margins, batch: PairBatch, cfg: LossConfig, state: LossState,
                     update: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    types = cfg.loss_types
    if cfg.lcpo_mode is not None:
        wrapped, metrics = lcpo([STATELESS_FORMULAS[t] for t in types], m, cfg, state, update)
        return dict(zip(types, wrapped)), metrics
    losses: dict[str, Tensor] = {}
    metrics: dict[str, Tensor] = {}
    for name in types:
        if name == "bco_pair":
            losses[name], extra = bco_pair(m, cfg, state, update)
            metrics.update(extra)
        elif name == "distill":
            losses[name], extra = distill(m, cfg, state, update, batch.decoupled_margin)
            metrics.update(extra)
        else:
            losses[name] = STATELESS_FORMULAS[name](m, cfg)
    return losses, metrics


def _pair_weights(batch: PairBatch, cfg: LossConfig, like: Tensor) -> Tensor | None:
    weight = None
    if batch.weights is not None:
        weight = batch.weights.to(like.dtype)
    if cfg.use_weighting:
        wpo = wpo_weights(batch, cfg, like.dtype)
        weight = wpo if weight is None else weight * wpo
    return weight


def _nll_coefficient(cfg: LossConfig) -> float:
    coef = sum(w * NLL_COEF.get(t, 0.0) for t, w in zip(cfg.loss_types, cfg.weights))
    if cfg.rpo_alpha is not None and cfg.rpo_form == "average":
        coef += cfg.rpo_alpha
    return coef


def _metrics(m: Margins, batch: PairBatch, cfg: LossConfig, losses: dict[str, Tensor],
             nll: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        chosen, rejected = cfg.beta * m.delta_chosen, cfg.beta * m.delta_rejected
        out = {
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
            "rewards/margins": (chosen - rejected).mean(),
            # After LD-DPO re-weighting when it is on, as TRL logs them.
            "logps/chosen": m.policy_chosen.detach().mean(), "logps/rejected": m.policy_rejected.detach().mean(),
            "nll": nll.sum() / m.chosen_tokens.sum(),
        }
        if len(losses) > 1:
            out.update({f"loss/{name}": value.mean() for name, value in losses.items() if name != "sft"})
        return out


def pair_loss(batch: PairBatch, cfg: LossConfig, state: LossState | None = None, *,
              num_items_in_global_batch: int | None = None, num_tokens_in_global_batch: float | None = None,
              reduction: Reduction = "mean", update_state: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference loss of one (micro-)batch and its TRL-named metrics (all detached).

    reduction="mean" (default) returns the scalar described in the module docstring; "none" returns per-pair
    losses u with u.sum() / num_items == the mean (the token-mean NLL is shared out in proportion to each pair's
    NLL); "sum" returns u.sum(). `state=None` uses a fresh LossState (BCO: δ from this batch; SPA: τ = 0).
    `update_state=False` leaves the state untouched (evaluation).
    """
    state = state if state is not None else LossState()
    m = build_margins(batch, cfg)
    losses, metrics = _per_type_losses(m, batch, cfg, state, update_state)
    per_pair = sum(w * losses[name] for name, w in zip(cfg.loss_types, cfg.weights))
    weight = _pair_weights(batch, cfg, m.policy_chosen)
    if weight is not None:
        per_pair = per_pair * weight
    nll = -batch.policy_chosen.to(m.policy_chosen.dtype)  # summed NLL of each chosen completion
    if cfg.rpo_alpha is not None and cfg.rpo_form == "cumulative":
        per_pair = per_pair + cfg.rpo_alpha * cfg.beta * nll
    if cfg.rationale_gamma is not None:
        if batch.rationale_logps is None:
            raise InputError("rationale_gamma is set but PairBatch.rationale_logps is missing")
        per_pair = per_pair + rationale_term(batch.rationale_logps.to(nll.dtype), cfg.rationale_gamma,
                                             cfg.rationale_form)
    n_items = float(num_items_in_global_batch if num_items_in_global_batch is not None else batch.size)
    coef = _nll_coefficient(cfg)
    if coef:
        if cfg.nll_average == "sequence":
            per_pair = per_pair + coef * nll / m.chosen_tokens
        else:
            n_tokens = num_tokens_in_global_batch if num_tokens_in_global_batch is not None \
                else m.chosen_tokens.sum()
            per_pair = per_pair + coef * nll * (n_items / n_tokens)
    metrics.update(_metrics(m, batch, cfg, losses, nll))
    if reduction == "none":
        return per_pair, metrics
    total = per_pair.sum()
    return (total if reduction == "sum" else total / n_items), metrics
