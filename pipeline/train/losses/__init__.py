"""Preference losses of the bundled trainer. Pure torch; inputs are per-sequence summed log-probs.

Public API: PairBatch, LossConfig, LossState, pair_loss (every pairwise loss, multi-loss, RPO, cDPO, SimPO, ORPO,
LN-DPO, f-divergences, LD-DPO, WPO, SPA, LCPO); ListBatch, ListLossConfig, list_loss (Plackett–Luce, LiPO-λ,
PRO, TPO) and tpo_step_scores; rationale_loss (RDPO).
"""
from pipeline.train.losses.lists import list_loss, tpo_step_scores
from pipeline.train.losses.pair import pair_loss
from pipeline.train.losses.rationale import rationale_loss
from pipeline.train.losses.types import (
    BATCH_COUPLED_TYPES,
    PAIR_LOSS_TYPES,
    TRL_LOSS_TYPES,
    ListBatch,
    ListLossConfig,
    LossConfig,
    LossState,
    PairBatch,
)

__all__ = [
    "BATCH_COUPLED_TYPES", "PAIR_LOSS_TYPES", "TRL_LOSS_TYPES", "ListBatch", "ListLossConfig", "LossConfig",
    "LossState", "PairBatch", "list_loss", "pair_loss", "rationale_loss", "tpo_step_scores",
]
