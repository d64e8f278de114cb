"""Inputs, configs and mutable state of the preference losses.

Everything here is plain data: the formulas live in `pairwise.py`, `noise.py`, `lists.py` and the assembly
(multi-loss, NLL terms, reduction, metrics) in `pair.py`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:  # annotations only: the configs here load without torch (CLI start-up, config checks)
    from torch import Tensor

# TRL DPOTrainer's fifteen loss types, then the ones added from the seed papers (docs/trainer.md lists them).
TRL_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
EXTRA_LOSS_TYPES: tuple[str, ...] = ("ln_dpo", "simpo", "orpo", "distill")
PAIR_LOSS_TYPES: tuple[str, ...] = TRL_LOSS_TYPES + EXTRA_LOSS_TYPES
# Losses that never look at the reference log-probs.
REFERENCE_FREE_TYPES: frozenset[str] = frozenset({"sft", "simpo", "orpo"})
# Losses whose per-pair value depends on other pairs of the batch or on state carried across calls; 8 micro-batches
# of 1 do not equal one batch of 8 for them (see pair.py's module docstring).
BATCH_COUPLED_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired", "bco_pair", "distill"})
# Base losses LCPO may wrap: pure per-pair losses whose "flipped label" value is the loss of the swapped pair.
LCPO_TYPES: frozenset[str] = frozenset({"sigmoid", "hinge", "ipo", "simpo", "sigmoid_norm", "ln_dpo"})
# Losses that read the f-divergence scores s(Δ): TRL 1.16's list plus ln_dpo and distill (both built on δ). The
# others use raw log-ratios, so TRL refuses a non-default f_divergence_type with them and so do we.
F_DIVERGENCE_TYPES: frozenset[str] = frozenset({
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "ln_dpo", "distill"})

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def _types(data: dict) -> set[str]:
    t = data.get("loss_type")
    return {t} if isinstance(t, str) else set(t or ())


def _read_by_types(*types: str) -> tuple[str, Callable[[dict], bool]]:
    return f"loss_type {' / '.join(types)}", lambda data: bool(_types(data) & set(types))


# Settings only some losses read: field -> (what reads it, whether this config does, from the fields declared
# before it). Set to a value other than its default where nothing reads it, a setting would be ignored without a
# word (simpo_gamma under sigmoid DPO); it is refused at load, naming the key (docs/trainer.md). Checked only on
# values the config gives (pydantic validates no defaults), and a given default is no change, so a config written
# back in full (model_dump) still loads.
PAIR_SETTING_READERS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "label_smoothing": _read_by_types("sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo"),
    "use_label_confidence": _read_by_types("sigmoid"),
    "f_alpha_divergence_coef": ("f_divergence_type alpha_divergence",
                                lambda data: data.get("f_divergence_type") == "alpha_divergence"),
    "discopop_tau": _read_by_types("discopop"),
    "simpo_gamma": _read_by_types("simpo"),
    "ln_dpo_beta": _read_by_types("ln_dpo"),
    "rpo_form": ("rpo_alpha", lambda data: data.get("rpo_alpha") is not None),
    # the chosen-NLL term: sft, orpo, or RPO in its average form (cumulative RPO sums the NLL)
    "nll_average": ("loss_type sft / orpo or rpo_alpha with rpo_form average",
                    lambda data: bool(_types(data) & {"sft", "orpo"}) or (
                        data.get("rpo_alpha") is not None and data.get("rpo_form") == "average")),
    "bco_baseline": _read_by_types("bco_pair"),
    "rationale_form": ("rationale_gamma", lambda data: data.get("rationale_gamma") is not None),
    **{name: _read_by_types("distill") for name in (
        "spa_refine_strength", "spa_warmup_fraction", "spa_window", "spa_threshold_quantile")},
    **{name: ("lcpo_mode", lambda data: data.get("lcpo_mode") is not None)
       for name in ("lcpo_init_noise", "lcpo_momentum")},
}
LIST_SETTING_READERS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "length_normalize": _read_by_types("plackett_luce", "lipo_lambda"),
    "lambda_weighting": _read_by_types("lipo_lambda", "tpo"),
    "discount_log_base": ("loss_type lipo_lambda / tpo with lambda_weighting lambda",
                          lambda data: bool(_types(data) & {"lipo_lambda", "tpo"})
                          and data.get("lambda_weighting") == "lambda"),
    "pro_reward_temperature": _read_by_types("pro"),
    "pro_sft_weight": _read_by_types("pro"),
    "tpo_label_range": _read_by_types("tpo"),
}


def refuse_unread(model: type[BaseModel], readers: dict, value: Any, info: ValidationInfo) -> Any:
    """`value` of setting `info.field_name`, or a ValueError when it differs from the default and nothing in this
    config reads it."""
    what, reads = readers[info.field_name]
    default = model.model_fields[info.field_name].default
    if value != default and not reads(info.data):
        given = {k: info.data[k] for k in ("loss_type", "lambda_weighting", "f_divergence_type", "rpo_alpha",
                                           "rpo_form", "rationale_gamma", "lcpo_mode") if k in info.data
                 and k in what}
        raise ValueError(f"{info.field_name}={value!r} would be ignored: only {what} read(s) it, and this config "
                         f"has {', '.join(f'{k} {v!r}' for k, v in given.items()) or 'none of them'}: remove "
                         f"{info.field_name}, or set what reads it")
    return value


@dataclass
class PairBatch:
    """Per-pair sequence statistics of one (micro-)batch; every tensor has shape [B].

    `policy_*`/`ref_*` are **summed** log-probs over the completion tokens (prompt and padding excluded);
    `*_tokens` are the completion token counts as floats. The optional fields feed single variants and may stay
    None otherwise.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    weights: Tensor | None = None
    """Per-pair weight multiplying the preference terms (not the NLL/SFT or rationale terms)."""
    label_confidence: Tensor | None = None
    """P(label correct) in [0, 1] (stage 6's `label_confidence`); used as a per-pair soft label by `sigmoid`
    when `LossConfig.use_label_confidence` is on."""
    policy_chosen_token_logps: Tensor | None = None
    """[B, T] per-token log-probs, completion-aligned (token 0 = first completion token), zero past the length.
    Needed only by LD-DPO (`ld_alpha`)."""
    policy_rejected_token_logps: Tensor | None = None
    ref_chosen_token_logps: Tensor | None = None
    ref_rejected_token_logps: Tensor | None = None
    chosen_sq_logmass: Tensor | None = None
    """Σ_t log Σ_v πθ(v|·)² over the chosen completion tokens (no grad needed). Needed only by WPO."""
    rejected_sq_logmass: Tensor | None = None
    decoupled_margin: Tensor | None = None
    """SPA's decoupled margin z, in the units of h = β·(...), computed with the λ-mixed logits. When None the
    policy margin h itself (detached) is used, which is SPA's default λ = 1."""
    rationale_logps: Tensor | None = None
    """Summed log πθ(r | prompt_rat) of the RDPO rationale (stage 2). Needed when `rationale_gamma` is set."""

    @property
    def size(self) -> int:
        return int(self.policy_chosen.shape[0])


@dataclass
class ListBatch:
    """Ranked lists of K responses per prompt; every tensor has shape [B, K].

    `scores` are the graded labels / rewards (higher = better). `mask` is False for padding entries of ragged
    lists; masked entries take no part in any term (their values are ignored, NaN included).
    """

    policy_logps: Tensor
    ref_logps: Tensor | None
    tokens: Tensor
    scores: Tensor
    mask: Tensor
    response_scores: Tensor | None = None
    """TPO only: precomputed response scores s_n (e.g. TPO's adaptive step reward). When
    None TPO uses the per-token mean log-ratio (policy - ref) / tokens."""


class LossConfig(BaseModel):
    """Pairwise preference loss settings. Defaults reproduce TRL's DPOTrainer (sigmoid DPO, β = 0.1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    loss_type: str | list[str] = Field("sigmoid", description=f"One of {PAIR_LOSS_TYPES}, or a list of them.")
    loss_weights: list[float] | None = Field(
        None, description="Weights of a multi-loss list (loss = Σ_k w_k·loss_k); None means all 1.0.")
    beta: float = Field(0.1, gt=0, description="β of every loss; ORPO's λ; SimPO's β.")
    label_smoothing: float = Field(
        0.0, ge=0, le=1, description="ε: cDPO on sigmoid, robust (ε < 0.5), exo_pair (0 means 1e-3), aot, simpo.")
    use_label_confidence: bool = Field(
        False, description="sigmoid: use 1 - batch.label_confidence as a per-pair ε instead of label_smoothing.")
    reference_free: bool = Field(False, description="Treat the reference log-probs as 0 (the uniform reference).")
    f_divergence_type: FDivergence = Field(
        "reverse_kl", description="Transform s(Δ) of the log-ratios (TRL 1.16 forms); only for the losses in "
        "F_DIVERGENCE_TYPES.")
    f_alpha_divergence_coef: float = Field(0.5, description="α of alpha_divergence.")
    discopop_tau: float = Field(0.05, gt=0, description="τ of discopop's modulation σ(βδ/τ).")
    simpo_gamma: float = Field(0.5, description="SimPO target margin γ: loss on β(ℓc - ℓr) - γ.")
    ln_dpo_beta: float = Field(
        1.0, gt=0, description="β of LN-DPO (length-normalised margins need a much larger β than DPO's).")
    rpo_alpha: float | None = Field(None, ge=0, description="RPO: add α·NLL(chosen) to the loss.")
    rpo_form: Literal["average", "cumulative"] = Field(
        "average", description="average: α·mean NLL (TRL rpo_alpha / OpenRLHF); cumulative: α·β·summed NLL.")
    nll_average: Literal["token", "sequence"] = Field(
        "token", description="How sft/orpo/RPO-average average the chosen NLL: over all chosen tokens of the "
        "batch (TRL) or per sequence then over pairs (OpenRLHF nll_loss_coef).")
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO: tokens past min(|yc|,|yr|) count with weight α.")
    ld_on_reference: bool = Field(True, description="LD-DPO also on the reference log-probs (TRL HEAD).")
    use_weighting: bool = Field(False, description="WPO: multiply the preference terms by w(yc)·w(yr).")
    wpo_clamp: bool = Field(False, description="WPO: clamp w(yc)·w(yr) at 1 (TRL v0.27).")
    bco_baseline: Literal["running_mean", "none"] = Field(
        "running_mean", description="bco_pair: subtract the running mean reward δ (v0.27) or nothing (HEAD).")
    rationale_gamma: float | None = Field(None, ge=0, description="RDPO: weight γ of the rationale term.")
    rationale_form: Literal["logsigmoid", "nll"] = Field(
        "logsigmoid", description="RDPO rationale term: -log σ(γ·ℓ(r)) (code) or -γ·ℓ(r) (paper).")
    spa_refine_strength: float = Field(0.1, ge=0, le=1, description="SPA α (loss_type 'distill').")
    spa_warmup_fraction: float = Field(0.2, ge=0, le=1, description="SPA: α = 0 before this share of max_steps.")
    spa_window: int = Field(50, ge=2, description="SPA: number of stored per-call mean margins.")
    spa_threshold_quantile: float = Field(
        0.1, ge=0, lt=1, description="SPA: τ = mean of sorted margins k and k+1 (0-based), k = int(q·window).")
    lcpo_mode: Literal["em_full", "weight_only"] | None = Field(
        None, description="LCPO noise-robust EM weighting around the base loss(es); None = off.")
    lcpo_init_noise: float = Field(0.1, gt=0, lt=0.5, description="LCPO initial label-noise rate ε.")
    lcpo_momentum: float = Field(0.1, gt=0, le=1, description="LCPO EMA step for ε ← 1 - mean(w).")

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_types)

    @property
    def needs_reference(self) -> bool:
        """Whether the batches must carry reference log-probs (False for reference-free configs)."""
        return not self.reference_free and any(t not in REFERENCE_FREE_TYPES for t in self.loss_types)

    def batch_coupled(self) -> list[str]:
        """What makes this config differ between 8 micro-batches of 1 and one batch of 8 (empty: nothing)."""
        coupled = [t for t in self.loss_types if t in BATCH_COUPLED_TYPES]
        return coupled + ([f"lcpo_mode={self.lcpo_mode}"] if self.lcpo_mode is not None else [])

    @field_validator(*PAIR_SETTING_READERS)
    @classmethod
    def _read(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unread(cls, PAIR_SETTING_READERS, value, info)

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        types = self.loss_types
        if not types:
            raise ValueError("loss_type must name at least one loss")
        unknown = [t for t in types if t not in PAIR_LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss_type {unknown}; known: {', '.join(PAIR_LOSS_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type lists a loss twice: {types}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(types)} loss types")
        smoothed = set(types) & {"exo_pair", "robust", "aot", "aot_unpaired", "simpo"}  # label_smoothing, not
        if self.use_label_confidence and self.label_smoothing and not smoothed:       # the per-pair confidence
            raise ValueError(f"label_smoothing={self.label_smoothing} would be ignored: use_label_confidence "
                             f"replaces it for sigmoid, and loss_type {types} has no other loss that reads it")
        if "robust" in types and self.label_smoothing >= 0.5:
            raise ValueError("robust needs label_smoothing < 0.5 (it divides by 1 - 2ε)")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type} works only with "
                             f"{sorted(F_DIVERGENCE_TYPES)}, got {types}")
        if self.lcpo_mode is not None and not set(types) <= LCPO_TYPES:
            raise ValueError(f"lcpo_mode wraps only {sorted(LCPO_TYPES)}, got {types}")
        return self


class ListLossConfig(BaseModel):
    """Ranked-list loss settings (docs/trainer.md)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    loss_type: Literal["plackett_luce", "lipo_lambda", "pro", "tpo"] = "plackett_luce"
    beta: float = Field(0.1, gt=0, description="r = β·(log πθ - log πref) for PL/LiPO; β(s_i - s_j) for TPO.")
    reference_free: bool = Field(False, description="PL/LiPO/TPO: treat the reference log-probs as 0.")
    length_normalize: bool = Field(False, description="PL/LiPO: divide the log-ratio by the token count.")
    lambda_weighting: Literal["lambda", "uniform"] = Field(
        "lambda", description="LiPO/TPO pair weights: LambdaLoss Δ_ij, or 1 for every ordered pair.")
    discount_log_base: float = Field(2.0, gt=1, description="D(τ) = log_base(1 + τ) in the Δ_ij discount.")
    pro_reward_temperature: bool = Field(
        True, description="PRO: scale scores by reward gaps T_k,i = r_k - r_i; off = Plackett–Luce on s.")
    pro_sft_weight: float = Field(0.05, ge=0, description="PRO: w_sft·(n-1)²·NLL(top response), summed NLL.")
    tpo_label_range: tuple[float, float] | None = Field(
        (-100.0, 100.0), description="TPO: map labels ψ from this range to [0, 1] before G = 2^ψ - 1. Unset, "
                                     "lists that declare their score range (score_min/score_max) use that range.")

    @field_validator(*LIST_SETTING_READERS)
    @classmethod
    def _read(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unread(cls, LIST_SETTING_READERS, value, info)

    def labels_on(self, declared: tuple[float, float] | None) -> "ListLossConfig":
        """This config with TPO's label range set to the lists' declared score scale when tpo_label_range was
        left at its default: (-100, 100) is TPO's own data's scale; on prefpipe's [0, 1] list scores it would
        squash every label to about 0.5."""
        if declared is None or "tpo_label_range" in self.model_fields_set:
            return self
        return self.model_copy(update={"tpo_label_range": (float(declared[0]), float(declared[1]))})

    @property
    def needs_reference(self) -> bool:
        """PRO never reads the reference; TPO with precomputed response_scores does not either (batch-level)."""
        return not self.reference_free and self.loss_type != "pro"


@dataclass
class LossState:
    """State the stateful losses carry across calls. One object per training run; the trainer sets
    `max_steps` and calls `on_optimizer_step()` after each optimizer step."""

    max_steps: int | None = None
    step: int = 0
    bco_reward_sum: float = 0.0
    bco_reward_count: int = 0
    spa_margins: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    spa_threshold: float = 0.0
    lcpo_noise: float | None = None

    def on_optimizer_step(self) -> None:
        self.step += 1
