"""Preference losses of the bundled trainer. Pure torch; inputs are per-sequence summed log-probs.

Public API: PairBatch, LossConfig, LossState, pair_loss (every pairwise loss, multi-loss, RPO, cDPO, SimPO, ORPO,
LN-DPO, f-divergences, LD-DPO, WPO, SPA, LCPO); ListBatch, ListLossConfig, list_loss (Plackett–Luce, LiPO-λ,
PRO, TPO); rationale_loss (RDPO).
"""
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

# The loss functions import torch; they load on first use so that reading a config (TrainConfig holds the loss
# configs) does not pay torch's import: `prefpipe` builds its `train` options from TrainConfig at start-up.
def __getattr__(name: str):
    if name == "list_loss":
        from pipeline.train.losses.lists import list_loss
        return list_loss
    if name == "pair_loss":
        from pipeline.train.losses.pair import pair_loss
        return pair_loss
    if name == "rationale_loss":
        from pipeline.train.losses.rationale import rationale_loss
        return rationale_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BATCH_COUPLED_TYPES", "PAIR_LOSS_TYPES", "TRL_LOSS_TYPES", "ListBatch", "ListLossConfig", "LossConfig",
    "LossState", "PairBatch", "list_loss", "pair_loss", "rationale_loss",
]
