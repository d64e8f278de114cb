"""RDPO (stage 2): DPO plus a likelihood term for a machine-written rationale r of why the chosen answer wins.

L = -log σ(h) - log σ(γ·ℓθ(r | prompt_rat))   (rationale_form="logsigmoid", the released code)
L = -log σ(h) - γ·ℓθ(r | prompt_rat)          (rationale_form="nll", the paper)

ℓθ(r|·) is the summed policy log-prob of the rationale; there is no reference term for r. The rationale term can
be added to any pair loss through `LossConfig.rationale_gamma` (e.g. the ORPO variant); this entry point is the
plain RDPO objective on top of whatever `cfg.loss_type` says (sigmoid by default).
"""
from __future__ import annotations

from torch import Tensor

from pipeline.errors import InputError
from pipeline.train.losses.pair import pair_loss
from pipeline.train.losses.types import LossConfig, LossState, PairBatch

DEFAULT_RATIONALE_GAMMA = 0.1  # the RDPO config default (its README example uses 0.001)


def rationale_loss(batch: PairBatch, cfg: LossConfig, state: LossState | None = None,
                   **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """pair_loss with the rationale term switched on (γ = cfg.rationale_gamma, or 0.1 when unset)."""
    if batch.rationale_logps is None:
        raise InputError("rationale_loss needs PairBatch.rationale_logps (summed log πθ(r | prompt_rat))")
    if cfg.rationale_gamma is None:
        cfg = cfg.model_copy(update={"rationale_gamma": DEFAULT_RATIONALE_GAMMA})
    return pair_loss(batch, cfg, state, **kwargs)
