"""Preference losses against the independent float64 reference in tests/loss_reference.py.

Every check: fp32 |Δloss| ≤ 1e-5 and |Δgrad| ≤ 1e-5 (autograd of the fp32 loss vs central differences of the
fp64 reference) on odd batch sizes with varied token counts; then closed forms at zero margin, reductions
between losses, gradient accumulation and the stateful losses.
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import InputError
from pipeline.train.losses import (
    BATCH_COUPLED_TYPES,
    PAIR_LOSS_TYPES,
    TRL_LOSS_TYPES,
    ListBatch,
    ListLossConfig,
    LossConfig,
    LossState,
    PairBatch,
    list_loss,
    pair_loss,
    rationale_loss,
)
from pipeline.train.losses.margins import length_desensitized
from tests.loss_reference import LN2, fd_grad, freeze, list_loss_ref, pair_loss_ref

TOL = 1e-5
SIZES = (1, 3, 7)
# Reference config keys for each LossConfig field the tests vary.
CFG_KEYS = {"beta": "beta", "label_smoothing": "eps", "f_divergence_type": "f", "discopop_tau": "tau",
            "simpo_gamma": "gamma", "ln_dpo_beta": "ln_beta", "reference_free": "reference_free",
            "loss_weights": "weights", "rpo_alpha": "rpo_alpha", "rpo_form": "rpo_form",
            "nll_average": "nll_average", "ld_alpha": "ld_alpha", "use_weighting": "wpo", "wpo_clamp": "wpo_clamp",
            "rationale_gamma": "rationale_gamma", "rationale_form": "rationale_form", "lcpo_mode": "lcpo",
            "use_label_confidence": "use_confidence", "f_alpha_divergence_coef": "f_alpha",
            "bco_baseline": "bco_baseline"}


def make_pairs(size: int, seed: int, *, max_len: int = 40, spread: float = 1.5) -> dict[str, torch.Tensor]:
    """Random fp32 inputs: token counts 1..max_len, summed logps -0.3..-2.5 nats per token, ref nearby."""
    g = torch.Generator().manual_seed(seed)
    ct = torch.randint(1, max_len + 1, (size,), generator=g).float()
    rt = torch.randint(1, max_len + 1, (size,), generator=g).float()
    per_token = lambda n: -(0.3 + 2.2 * torch.rand(size, generator=g)) * n  # noqa: E731
    pc, pr = per_token(ct), per_token(rt)
    return dict(pc=pc, pr=pr, rc=pc + spread * torch.randn(size, generator=g),
                rr=pr + spread * torch.randn(size, generator=g), ct=ct, rt=rt)


def as_lists(t: dict[str, torch.Tensor]) -> dict:
    # The reference sees exactly the fp32 values (converted to float64), so only the arithmetic differs.
    return {k: (v.double().tolist() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def ref_cfg(cfg: LossConfig, **extra) -> dict:
    out = {"types": tuple(cfg.loss_types), **extra}
    for field, key in CFG_KEYS.items():
        value = getattr(cfg, field)
        out[key] = value.value if hasattr(value, "value") else value
    out["bco_baseline"] = cfg.bco_baseline == "running_mean"
    return out


def to_batch(t: dict[str, torch.Tensor], **extra) -> PairBatch:
    return PairBatch(policy_chosen=t["pc"], policy_rejected=t["pr"], ref_chosen=t.get("rc"),
                     ref_rejected=t.get("rr"), chosen_tokens=t["ct"], rejected_tokens=t["rt"], **extra)


def check_against_reference(t: dict[str, torch.Tensor], cfg: LossConfig, *, grad_keys=("pc", "pr"),
                            batch_extra=None, ref_extra=None, state=None, **kwargs) -> float:
    """Assert loss and input gradients match the reference; returns the loss."""
    leaves = {k: t[k].clone().requires_grad_(True) for k in grad_keys}
    inputs = {**t, **leaves}
    extra = {name: inputs[key] for name, key in (batch_extra or {}).items()}
    loss, _ = pair_loss(to_batch(inputs, **extra), cfg, state, **kwargs)
    grads = torch.autograd.grad(loss, [leaves[k] for k in grad_keys], allow_unused=True)
    grads = [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(grad_keys, grads)]
    x = as_lists(t)
    rcfg = ref_cfg(cfg, **(ref_extra or {}))
    frozen = freeze(x, rcfg)
    norm = {"n_items": kwargs.get("num_items_in_global_batch"), "n_tokens": kwargs.get("num_tokens_in_global_batch")}
    expected = pair_loss_ref(x, rcfg, frozen, **norm)
    assert abs(loss.item() - expected) <= TOL, (cfg.loss_types, loss.item(), expected)
    for key, grad in zip(grad_keys, grads):
        want = torch.tensor(fd_grad(lambda y: pair_loss_ref(y, rcfg, frozen, **norm), x, key), dtype=torch.float64)
        assert torch.allclose(grad.double(), want, atol=TOL, rtol=0), (cfg.loss_types, key, grad, want)
    return loss.item()


# ------------------------------------------------------------------------------------------- every loss type

PAIR_LOCAL_CONFIGS = {
    "exo_pair": {"label_smoothing": 0.01}, "robust": {"label_smoothing": 0.2}, "aot": {"label_smoothing": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.4}, "ln_dpo": {"ln_dpo_beta": 3.0},
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_every_loss_matches_fp64_reference(loss_type, size):
    t = make_pairs(size, seed=PAIR_LOSS_TYPES.index(loss_type) * 10 + size)
    cfg = LossConfig(loss_type=loss_type, **PAIR_LOCAL_CONFIGS.get(loss_type, {}))
    # distill with a fresh state: τ = 0, α active (no max_steps known)
    check_against_reference(t, cfg, state=LossState())


def test_trl_has_fifteen_loss_types_and_all_are_registered():
    assert len(TRL_LOSS_TYPES) == 15 and set(TRL_LOSS_TYPES) <= set(PAIR_LOSS_TYPES)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_label_smoothing(eps):
    t = make_pairs(7, seed=11)
    check_against_reference(t, LossConfig(label_smoothing=eps))


def test_label_smoothing_zero_is_sigmoid_and_robust_zero_is_sigmoid():
    b = to_batch(make_pairs(7, seed=12))
    plain = pair_loss(b, LossConfig())[0]
    assert pair_loss(b, LossConfig(label_smoothing=0.0))[0].item() == plain.item()
    assert abs(pair_loss(b, LossConfig(loss_type="robust"))[0].item() - plain.item()) <= 1e-7


def test_label_confidence_acts_as_per_pair_smoothing():
    t = make_pairs(5, seed=13)
    t["conf"] = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.5])
    check_against_reference(t, LossConfig(use_label_confidence=True), batch_extra={"label_confidence": "conf"})
    b = to_batch(t, label_confidence=torch.full((5,), 0.8))
    assert abs(pair_loss(b, LossConfig(use_label_confidence=True))[0].item()
               - pair_loss(b, LossConfig(label_smoothing=0.2))[0].item()) <= 1e-6


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm", "distill"])
def test_f_divergences(kind, loss_type):
    cfg = LossConfig(loss_type=loss_type, f_divergence_type=kind, label_smoothing=0.01 * (loss_type == "exo_pair"))
    check_against_reference(make_pairs(3, seed=14), cfg, state=LossState())


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores_vanish_at_zero_margin(kind):
    # s(0) = 0 for every transform, so policy == reference still gives ln 2.
    assert abs(pair_loss(zero_margin_batch(), LossConfig(f_divergence_type=kind))[0].item() - LN2) <= 1e-6


def test_f_divergence_refused_for_raw_log_ratio_losses():
    for loss_type in ("nca_pair", "bco_pair", "sppo_hard", "aot", "apo_zero"):
        with pytest.raises(ValueError, match="f_divergence_type"):
            LossConfig(loss_type=loss_type, f_divergence_type="js_divergence")


def test_reference_free_sigmoid_ignores_reference():
    t = make_pairs(3, seed=15)
    check_against_reference(t, LossConfig(reference_free=True))
    no_ref = {k: v for k, v in t.items() if k not in ("rc", "rr")}
    a = pair_loss(to_batch(t), LossConfig(reference_free=True))[0]
    b = pair_loss(to_batch(no_ref), LossConfig(reference_free=True))[0]
    assert a.item() == b.item()


def test_malformed_pair_batches_are_input_errors():
    t = make_pairs(3, seed=60)
    with pytest.raises(InputError, match="ref_rejected"):
        pair_loss(to_batch({**t, "rr": t["rr"][:2]}), LossConfig())
    with pytest.raises(InputError, match="empty"):
        pair_loss(to_batch({k: v[:0] for k, v in t.items()}), LossConfig())
    with pytest.raises(InputError, match="ld_alpha"):
        pair_loss(to_batch(t), LossConfig(ld_alpha=0.5))
    with pytest.raises(InputError, match="WPO"):
        pair_loss(to_batch(t), LossConfig(use_weighting=True))


def test_missing_reference_is_an_input_error():
    no_ref = {k: v for k, v in make_pairs(3, seed=16).items() if k not in ("rc", "rr")}
    with pytest.raises(InputError, match="reference"):
        pair_loss(to_batch(no_ref), LossConfig())
    # The reference-free losses run without it.
    for loss_type in ("simpo", "orpo", "sft"):
        assert math.isfinite(pair_loss(to_batch(no_ref), LossConfig(loss_type=loss_type))[0].item())


def test_orpo_stable_near_zero_average_logp():
    # ℓ = -1e-4 per token: log(1 - e^ℓ) ≈ log(1e-4); a naive log(1 - exp) in fp32 loses most digits.
    t = make_pairs(3, seed=17)
    t["pc"] = -1e-4 * t["ct"]
    check_against_reference(t, LossConfig(loss_type="orpo"))


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "discopop", "hinge", "robust"])
def test_extreme_log_ratios_stay_finite(kind, loss_type):
    # Δ of ±500 nats: e^(-Δ) and the alpha transform overflow fp32 unless capped (TRL's finiteness check).
    t = make_pairs(4, seed=37)
    t["rc"] = t["pc"] + torch.tensor([500.0, -500.0, 300.0, -2000.0])
    t["rr"] = t["pr"] + torch.tensor([-500.0, 500.0, -300.0, 2000.0])
    pc = t["pc"].clone().requires_grad_(True)
    loss, _ = pair_loss(to_batch({**t, "pc": pc}), LossConfig(loss_type=loss_type, f_divergence_type=kind))
    (grad,) = torch.autograd.grad(loss, pc)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()


def test_alpha_divergence_coefficient_one_is_reverse_kl():
    b = to_batch(make_pairs(3, seed=38))
    limit = pair_loss(b, LossConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0))[0]
    assert limit.item() == pair_loss(b, LossConfig())[0].item()


def test_half_precision_inputs_are_computed_in_fp32():
    t = make_pairs(7, seed=39)
    half = {k: v.to(torch.bfloat16) for k, v in t.items()}
    rounded = {k: v.float() for k, v in half.items()}
    loss_half, metrics = pair_loss(to_batch(half), LossConfig(loss_type=["sigmoid", "sft"]))
    loss_fp32, _ = pair_loss(to_batch(rounded), LossConfig(loss_type=["sigmoid", "sft"]))
    assert loss_half.dtype == torch.float32 and loss_half.item() == loss_fp32.item()
    assert metrics["rewards/chosen"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- RPO / NLL terms

# cumulative RPO sums the NLL, so nll_average has nothing to average there (refused: tests/test_loss_settings.py)
@pytest.mark.parametrize("form, nll_average", [("average", "token"), ("average", "sequence"),
                                               ("cumulative", "token")])
def test_rpo_forms(form, nll_average):
    cfg = LossConfig(rpo_alpha=0.7, rpo_form=form, nll_average=nll_average)
    check_against_reference(make_pairs(7, seed=18), cfg)


def test_rpo_average_equals_sigmoid_plus_weighted_sft():
    b = to_batch(make_pairs(7, seed=19))
    rpo = pair_loss(b, LossConfig(rpo_alpha=0.5))[0]
    multi = pair_loss(b, LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))[0]
    assert abs(rpo.item() - multi.item()) <= 1e-6
    sft = pair_loss(b, LossConfig(loss_type="sft"))[0]
    assert abs(sft.item() - (-b.policy_chosen.sum() / b.chosen_tokens.sum()).item()) <= 1e-6


# ------------------------------------------------------------------------------------------- multi-loss

def test_multi_loss_is_the_weighted_sum():
    t = make_pairs(7, seed=20)
    cfg = LossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])  # MPO recipe
    check_against_reference(t, cfg, state=LossState())
    b = to_batch(t)
    parts = [pair_loss(b, LossConfig(loss_type=n), LossState())[0].item() for n in ("sigmoid", "bco_pair", "sft")]
    total, metrics = pair_loss(b, cfg, LossState())
    assert abs(total.item() - (0.8 * parts[0] + 0.2 * parts[1] + parts[2])) <= 1e-6
    assert abs(metrics["loss/sigmoid"].item() - parts[0]) <= 1e-6


def test_multi_loss_without_weights_is_the_plain_sum():
    b = to_batch(make_pairs(3, seed=21))
    combo = pair_loss(b, LossConfig(loss_type=["ipo", "hinge", "apo_zero"]))[0].item()
    parts = sum(pair_loss(b, LossConfig(loss_type=n))[0].item() for n in ("ipo", "hinge", "apo_zero"))
    assert abs(combo - parts) <= 1e-5


def test_needs_reference():
    assert LossConfig().needs_reference and not LossConfig(reference_free=True).needs_reference
    assert not LossConfig(loss_type=["simpo", "sft"]).needs_reference
    assert LossConfig(loss_type=["orpo", "sigmoid"]).needs_reference
    assert ListLossConfig().needs_reference and not ListLossConfig(loss_type="pro").needs_reference


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown loss_type"):
        LossConfig(loss_type="dpo_plus")
    with pytest.raises(ValueError, match="loss_weights"):
        LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="robust"):
        LossConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="lcpo"):
        LossConfig(loss_type="bco_pair", lcpo_mode="em_full")


# ------------------------------------------------------------------------------------------- modifiers

def add_token_logps(t: dict, seed: int) -> dict:
    """Per-token logps whose in-length sums are the summed logps, for LD-DPO."""
    g = torch.Generator().manual_seed(seed)
    width = int(max(t["ct"].max(), t["rt"].max()))
    out = dict(t)
    for key, length in (("pc", "ct"), ("pr", "rt"), ("rc", "ct"), ("rr", "rt")):
        raw = -torch.rand(len(t[key]), width, generator=g) * 2.0
        inside = torch.arange(width)[None, :] < t[length][:, None]
        out[key] = (raw * inside).sum(1)
        # Padding positions hold NaN: LD-DPO must mask them by length, not trust zeros.
        out[key + "_tok"] = torch.where(inside, raw, torch.full_like(raw, float("nan")))
    return out


@pytest.mark.parametrize("on_reference", [True, False])
def test_ld_dpo(on_reference):
    t = add_token_logps(make_pairs(5, seed=22, max_len=12), seed=23)
    cfg = LossConfig(ld_alpha=0.4, ld_on_reference=on_reference)
    batch_extra = {"policy_chosen_token_logps": "pc_tok", "policy_rejected_token_logps": "pr_tok",
                   "ref_chosen_token_logps": "rc_tok", "ref_rejected_token_logps": "rr_tok"}
    ref_t = t if on_reference else {k: v for k, v in t.items() if k not in ("rc_tok", "rr_tok")}
    leaves = ("pc_tok", "pr_tok")
    x_keys = dict(batch_extra)
    # Gradients flow into the per-token logps; the reference sees the same values.
    tok = {k: t[k].clone().requires_grad_(True) for k in leaves}
    batch = to_batch(t, **{name: (tok[key] if key in tok else t[key]) for name, key in x_keys.items()})
    loss, _ = pair_loss(batch, cfg)
    grads = torch.autograd.grad(loss, [tok[k] for k in leaves])
    x = as_lists(ref_t)
    rcfg = ref_cfg(cfg)
    assert abs(loss.item() - pair_loss_ref(x, rcfg)) <= TOL
    for key, grad in zip(leaves, grads):
        want = torch.tensor(fd_grad(lambda y: pair_loss_ref(y, rcfg), x, key), dtype=torch.float64)
        assert torch.allclose(grad.double(), want, atol=TOL, rtol=0)
    # α = 1 is plain DPO.
    assert abs(pair_loss(batch, LossConfig(ld_alpha=1.0))[0].item() - pair_loss(batch, LossConfig())[0].item()) <= 1e-6


@pytest.mark.parametrize("clamp", [False, True])
def test_wpo_weighting(clamp):
    t = make_pairs(7, seed=24, max_len=10)
    g = torch.Generator().manual_seed(25)
    # Σ_t log Σ_v π(v)² sits below the token logps on average; a mix keeps some weights above 1.
    t["sq_c"] = t["pc"] + (torch.rand(7, generator=g) - 0.3) * t["ct"]
    t["sq_r"] = t["pr"] + (torch.rand(7, generator=g) - 0.3) * t["rt"]
    check_against_reference(t, LossConfig(use_weighting=True, wpo_clamp=clamp),
                            batch_extra={"chosen_sq_logmass": "sq_c", "rejected_sq_logmass": "sq_r"})


def test_pair_weights_scale_preference_terms_only():
    t = make_pairs(7, seed=26)
    t["w"] = torch.linspace(0.2, 2.0, 7)
    check_against_reference(t, LossConfig(rpo_alpha=1.0), batch_extra={"weights": "w"})


@pytest.mark.parametrize("form", ["logsigmoid", "nll"])
def test_rdpo_rationale_term(form):
    t = make_pairs(7, seed=27)
    t["rat"] = -torch.linspace(5.0, 60.0, 7)
    cfg = LossConfig(rationale_gamma=0.05, rationale_form=form)
    check_against_reference(t, cfg, grad_keys=("pc", "pr", "rat"), batch_extra={"rationale_logps": "rat"})
    via_entry = rationale_loss(to_batch(t, rationale_logps=t["rat"]), cfg)[0]
    assert via_entry.item() == pair_loss(to_batch(t, rationale_logps=t["rat"]), cfg)[0].item()
    with pytest.raises(InputError, match="rationale"):
        rationale_loss(to_batch(t), cfg)


# ------------------------------------------------------------------------------------------- zero margin

def zero_margin_batch(size: int = 5) -> PairBatch:
    t = make_pairs(size, seed=28)
    return PairBatch(policy_chosen=t["pc"], policy_rejected=t["pr"], ref_chosen=t["pc"].clone(),
                     ref_rejected=t["pr"].clone(), chosen_tokens=t["ct"], rejected_tokens=t["rt"])


def exo_at_zero(eps: float) -> float:
    return math.log(0.5) - 0.5 * math.log(eps * (1 - eps))


BETA = 0.1
ZERO_MARGIN = {
    "sigmoid": LN2, "hinge": 1.0, "ipo": (1 / (2 * BETA)) ** 2, "exo_pair": exo_at_zero(1e-3), "nca_pair": 2 * LN2,
    "robust": LN2, "bco_pair": 2 * LN2, "sppo_hard": 2 * (1 / (2 * BETA)) ** 2, "aot": LN2, "aot_unpaired": LN2,
    "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * LN2 + 0.5, "sigmoid_norm": LN2, "ln_dpo": LN2,
    "distill": LN2,
}


@pytest.mark.parametrize("loss_type", sorted(ZERO_MARGIN))
def test_closed_form_when_policy_equals_reference(loss_type):
    loss, metrics = pair_loss(zero_margin_batch(), LossConfig(loss_type=loss_type, beta=BETA), LossState())
    assert abs(loss.item() - ZERO_MARGIN[loss_type]) <= 1e-6
    assert metrics["rewards/margins"].item() == 0.0 and metrics["rewards/accuracies"].item() == 0.0


def test_step_one_sigmoid_loss_is_ln2():
    assert abs(pair_loss(zero_margin_batch(1), LossConfig())[0].item() - 0.693147) <= 1e-6


def test_metrics_are_trl_named_and_detached():
    t = make_pairs(7, seed=29)
    pc = t["pc"].clone().requires_grad_(True)
    _, metrics = pair_loss(to_batch({**t, "pc": pc}), LossConfig(beta=0.2))
    chosen = 0.2 * (t["pc"] - t["rc"])
    rejected = 0.2 * (t["pr"] - t["rr"])
    assert abs(metrics["rewards/chosen"].item() - chosen.mean().item()) <= 1e-6
    assert abs(metrics["rewards/rejected"].item() - rejected.mean().item()) <= 1e-6
    assert metrics["rewards/accuracies"].item() == pytest.approx((chosen > rejected).float().mean().item())
    assert abs(metrics["rewards/margins"].item() - (chosen - rejected).mean().item()) <= 1e-6
    assert metrics["logps/chosen"].item() == pytest.approx(t["pc"].mean().item())
    assert metrics["nll"].item() == pytest.approx((-t["pc"].sum() / t["ct"].sum()).item())
    assert all(not v.requires_grad for v in metrics.values())


# ------------------------------------------------------------------------------------------- accumulation

DECOMPOSABLE = [n for n in PAIR_LOSS_TYPES if n not in BATCH_COUPLED_TYPES]


@pytest.mark.parametrize("loss_type", DECOMPOSABLE)
def test_accumulating_8x1_equals_1x8(loss_type):
    t = make_pairs(8, seed=30)
    cfg = LossConfig(loss_type=loss_type, rpo_alpha=0.3, **PAIR_LOCAL_CONFIGS.get(loss_type, {}))
    pc = t["pc"].clone().requires_grad_(True)
    full, _ = pair_loss(to_batch({**t, "pc": pc}), cfg)
    (g_full,) = torch.autograd.grad(full, pc)
    pc_acc = t["pc"].clone().requires_grad_(True)
    total = 0.0
    for i in range(8):
        micro = {k: v[i:i + 1] for k, v in t.items()}
        micro["pc"] = pc_acc[i:i + 1]
        loss, _ = pair_loss(to_batch(micro), cfg, num_items_in_global_batch=8,
                            num_tokens_in_global_batch=float(t["ct"].sum()))
        loss.backward()
        total += loss.item()
    assert abs(total - full.item()) <= TOL
    assert torch.allclose(pc_acc.grad, g_full, atol=TOL, rtol=0)


def test_batch_coupling_is_reported():
    assert LossConfig(loss_type=["sigmoid", "sft"], rpo_alpha=1.0).batch_coupled() == []
    assert LossConfig(loss_type=["aot", "bco_pair", "ipo"]).batch_coupled() == ["aot", "bco_pair"]
    assert LossConfig(lcpo_mode="em_full").batch_coupled() == ["lcpo_mode=em_full"]


def test_reductions_agree():
    b = to_batch(make_pairs(7, seed=31))
    cfg = LossConfig(loss_type=["sigmoid", "orpo"])
    mean = pair_loss(b, cfg)[0]
    per_pair = pair_loss(b, cfg, reduction="none")[0]
    assert per_pair.shape == (7,)
    assert abs(per_pair.mean().item() - mean.item()) <= 1e-6
    assert abs(pair_loss(b, cfg, reduction="sum")[0].item() - 7 * mean.item()) <= 1e-5


def test_aot_on_one_pair_is_smoothed_sigmoid():
    # Documented batch coupling: with one pair the sort is the identity and aot is cDPO on that pair.
    b = to_batch(make_pairs(1, seed=32))
    assert pair_loss(b, LossConfig(loss_type="aot", label_smoothing=0.1))[0].item() == pytest.approx(
        pair_loss(b, LossConfig(label_smoothing=0.1))[0].item(), abs=1e-7)


# ------------------------------------------------------------------------------------------- stateful losses

def test_bco_running_mean_over_calls():
    state = LossState()
    cfg = LossConfig(loss_type="bco_pair")
    first, second = make_pairs(3, seed=33), make_pairs(5, seed=34)
    pair_loss(to_batch(first), cfg, state)
    x1 = as_lists(first)
    mean1 = sum(0.1 * (a - b) for a, b in zip(x1["pc"] + x1["pr"], x1["rc"] + x1["rr"])) / 6
    assert state.bco_reward_count == 1 and abs(state.bco_reward_sum - mean1) <= 1e-6
    check_against_reference(second, cfg, state=state, ref_extra={"bco_prev": (mean1, 1)})
    assert state.bco_reward_count == 2
    # Evaluation leaves the state alone.
    pair_loss(to_batch(second), cfg, state, update_state=False)
    assert state.bco_reward_count == 2
    # HEAD's form: no baseline.
    check_against_reference(second, LossConfig(loss_type="bco_pair", bco_baseline="none"), state=LossState())


def test_spa_threshold_window_and_schedule():
    cfg = LossConfig(loss_type="distill")
    state = LossState(max_steps=100)
    margins = []
    for i in range(50):
        t = make_pairs(1, seed=100 + i)
        pair_loss(to_batch(t), cfg, state)
        x = as_lists(t)
        margins.append(0.1 * ((x["pc"][0] - x["rc"][0]) - (x["pr"][0] - x["rr"][0])))
        if i < 49:
            assert state.spa_threshold == 0.0
    ordered = sorted(margins)
    assert abs(state.spa_threshold - 0.5 * (ordered[5] + ordered[6])) <= 1e-6   # 6th and 7th smallest
    t = make_pairs(7, seed=200)
    # step 0 < 20% of 100: α = 0, plain DPO whatever the confidence.
    assert pair_loss(to_batch(t), cfg, state, update_state=False)[0].item() == pytest.approx(
        pair_loss(to_batch(t), LossConfig())[0].item(), abs=1e-7)
    state.step = 20
    check_against_reference(t, cfg, state=state, ref_extra={"spa_tau": state.spa_threshold})
    assert len(state.spa_margins) == 50 and state.spa_margins[-1] == pytest.approx(
        0.1 * float(((t["pc"] - t["rc"]) - (t["pr"] - t["rr"])).mean()), abs=1e-6)


def test_spa_decoupled_margin_drives_confidence():
    t = make_pairs(7, seed=35)
    # Two margins sit exactly on τ: c = 1[z > τ] counts them as not confident.
    t["z"] = torch.tensor([-1.0, 2.0, 0.5, 0.3, 1.0, -2.0, 0.5])
    state = LossState(spa_threshold=0.5)
    _, metrics = pair_loss(to_batch(t, decoupled_margin=t["z"]), LossConfig(loss_type="distill"), state,
                           update_state=False)
    assert metrics["spa/confident"].item() == pytest.approx(2 / 7)
    check_against_reference(t, LossConfig(loss_type="distill", spa_refine_strength=0.3), state=state,
                            batch_extra={"decoupled_margin": "z"}, ref_extra={"spa_tau": 0.5, "spa_alpha": 0.3})


@pytest.mark.parametrize("mode", ["em_full", "weight_only"])
@pytest.mark.parametrize("base", ["sigmoid", "ipo", "simpo"])
def test_lcpo(mode, base):
    t = make_pairs(7, seed=36)
    state = LossState()
    check_against_reference(t, LossConfig(loss_type=base, lcpo_mode=mode), state=state,
                            ref_extra={"lcpo_noise": 0.1})
    # ε ← 0.9·ε + 0.1·(1 - mean w), with w the E-step posteriors at ε = 0.1.
    x = as_lists(t)
    w = freeze(x, ref_cfg(LossConfig(loss_type=base, lcpo_mode=mode), lcpo_noise=0.1))["lcpo"][base]
    assert abs(state.lcpo_noise - (0.9 * 0.1 + 0.1 * (1 - sum(w) / len(w)))) <= 1e-6
    # The next call uses the updated ε.
    check_against_reference(t, LossConfig(loss_type=base, lcpo_mode=mode), state=LossState(lcpo_noise=0.3),
                            ref_extra={"lcpo_noise": 0.3})


def test_lcpo_on_dpo_is_sigmoid_of_margin_posterior():
    # For DPO p(h) = σ(h): the E-step weight is the usual noisy-label posterior.
    b = zero_margin_batch(3)
    loss = pair_loss(b, LossConfig(lcpo_mode="em_full"))[0]
    assert abs(loss.item() - LN2) <= 1e-6


# ------------------------------------------------------------------------------------------- list losses

def make_lists(size: int, k: int, seed: int, *, ragged: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(2, 30, (size, k), generator=g).float()
    pol = -(0.3 + 2.0 * torch.rand(size, k, generator=g)) * tok
    ref = pol + 2.0 * torch.randn(size, k, generator=g)
    score = torch.randint(0, 4, (size, k), generator=g).float() + torch.rand(size, k, generator=g)
    mask = torch.ones(size, k, dtype=torch.bool)
    if ragged and k > 2:
        for b in range(size):
            keep = int(torch.randint(2, k + 1, (1,), generator=g))
            mask[b, keep:] = False
    return dict(pol=pol, ref=ref, tok=tok, score=score, mask=mask)


def list_batch(t: dict, **overrides) -> ListBatch:
    return ListBatch(policy_logps=overrides.get("pol", t["pol"]), ref_logps=t.get("ref"), tokens=t["tok"],
                     scores=t["score"], mask=t["mask"], response_scores=overrides.get("s", t.get("s")))


def list_ref_input(t: dict) -> dict:
    return {k: (v.tolist() if v.dtype == torch.bool else v.double().tolist()) for k, v in t.items()}


LIST_CASES = [
    ("plackett_luce", {}, {}), ("plackett_luce", {"length_normalize": True}, {"length_normalize": True}),
    ("lipo_lambda", {}, {}), ("lipo_lambda", {"lambda_weighting": "uniform"}, {"weighting": "uniform"}),
    ("pro", {}, {}), ("pro", {"pro_reward_temperature": False}, {"temperature": False}),
    ("tpo", {"beta": 2.0}, {"beta": 2.0}),
    ("tpo", {"beta": 2.0, "lambda_weighting": "uniform"}, {"beta": 2.0, "weighting": "uniform"}),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind,cfg_kwargs,ref_kwargs", LIST_CASES)
def test_list_losses_match_reference(kind, cfg_kwargs, ref_kwargs, size):
    t = make_lists(size, 5, seed=size * 7 + len(kind))
    if kind == "tpo":
        t["score"] = t["score"] * 40 - 80   # TPO labels live in [-100, 100]
    pol = t["pol"].clone().requires_grad_(True)
    loss, _ = list_loss(list_batch(t, pol=pol), ListLossConfig(loss_type=kind, **cfg_kwargs))
    (grad,) = torch.autograd.grad(loss, pol)
    x = list_ref_input(t)
    rcfg = {"type": kind, **ref_kwargs}
    assert abs(loss.item() - list_loss_ref(x, rcfg)) <= TOL
    want = torch.tensor(fd_grad(lambda y: list_loss_ref(y, rcfg), x, "pol"), dtype=torch.float64)
    want = torch.where(t["mask"], want, torch.zeros_like(want))
    assert torch.allclose(grad.double(), want, atol=TOL, rtol=0)


def test_tpo_with_precomputed_response_scores():
    t = make_lists(3, 4, seed=40)
    t["score"] = t["score"] * 30 - 50
    t["s"] = torch.randn(3, 4, generator=torch.Generator().manual_seed(41))
    s = t["s"].clone().requires_grad_(True)
    loss, _ = list_loss(list_batch(t, s=s), ListLossConfig(loss_type="tpo", beta=1.5))
    (grad,) = torch.autograd.grad(loss, s)
    x = list_ref_input(t)
    rcfg = {"type": "tpo", "beta": 1.5}
    assert abs(loss.item() - list_loss_ref(x, rcfg)) <= TOL
    want = torch.tensor(fd_grad(lambda y: list_loss_ref(y, rcfg), x, "s"), dtype=torch.float64)
    assert torch.allclose(grad.double(), torch.where(t["mask"], want, 0 * want), atol=TOL, rtol=0)


def pairs_as_lists(t: dict) -> dict:
    """A PairBatch as K=2 lists, chosen first with the higher label."""
    return dict(pol=torch.stack([t["pc"], t["pr"]], 1), ref=torch.stack([t["rc"], t["rr"]], 1),
                tok=torch.stack([t["ct"], t["rt"]], 1), score=torch.tensor([[1.0, 0.0]]).repeat(len(t["pc"]), 1),
                mask=torch.ones(len(t["pc"]), 2, dtype=torch.bool))


def test_k2_lists_reduce_to_pairwise_losses():
    t = make_pairs(7, seed=42)
    lists = pairs_as_lists(t)
    dpo = pair_loss(to_batch(t), LossConfig(beta=0.3))[0].item()
    pl = list_loss(list_batch(lists), ListLossConfig(beta=0.3))[0].item()
    lipo = list_loss(list_batch(lists), ListLossConfig(loss_type="lipo_lambda", beta=0.3,
                                                       lambda_weighting="uniform"))[0].item()
    assert abs(pl - dpo) <= 1e-6 and abs(lipo - dpo) <= 1e-6
    # TPO with uniform weights on a pair is DPO on per-token log-ratios (sigmoid_norm).
    tpo = list_loss(list_batch(lists), ListLossConfig(loss_type="tpo", beta=0.3, lambda_weighting="uniform"))[0]
    assert abs(tpo.item() - pair_loss(to_batch(t), LossConfig(loss_type="sigmoid_norm", beta=0.3))[0].item()) <= 1e-6


def test_pro_without_rewards_is_plackett_luce_on_length_normalised_scores():
    t = make_lists(7, 5, seed=43)
    pro = list_loss(list_batch(t), ListLossConfig(loss_type="pro", pro_reward_temperature=False,
                                                  pro_sft_weight=0.0))[0]
    pl = list_loss(list_batch(t), ListLossConfig(beta=1.0, reference_free=True, length_normalize=True))[0]
    assert abs(pro.item() - pl.item()) <= 1e-6


@pytest.mark.parametrize("kind", ["plackett_luce", "lipo_lambda", "pro", "tpo"])
def test_masked_entries_have_no_effect(kind):
    # Lists of 3 valid entries padded to 5 with garbage (NaN and huge values) == the same lists at K = 3.
    t3 = make_lists(3, 3, seed=44, ragged=False)
    t5 = {k: torch.cat([v, v[:, :2]], 1) for k, v in t3.items()}
    t5["mask"][:, 3:] = False
    t5["pol"][:, 3] = float("nan")
    t5["pol"][:, 4] = 1e6
    t5["score"][:, 3:] = 99.0
    cfg = ListLossConfig(loss_type=kind)
    pol5 = t5["pol"].clone().requires_grad_(True)
    loss5, _ = list_loss(list_batch(t5, pol=pol5), cfg)
    (g5,) = torch.autograd.grad(loss5, pol5)
    pol3 = t3["pol"].clone().requires_grad_(True)
    loss3, _ = list_loss(list_batch(t3, pol=pol3), cfg)
    (g3,) = torch.autograd.grad(loss3, pol3)
    assert abs(loss5.item() - loss3.item()) <= 1e-6
    assert torch.allclose(g5[:, :3], g3, atol=1e-7) and torch.all(g5[:, 3:] == 0)


@pytest.mark.parametrize("kind", ["plackett_luce", "lipo_lambda", "pro", "tpo"])
def test_list_losses_accumulate_exactly(kind):
    t = make_lists(6, 4, seed=47)
    cfg = ListLossConfig(loss_type=kind)
    pol = t["pol"].clone().requires_grad_(True)
    full, _ = list_loss(list_batch(t, pol=pol), cfg)
    (g_full,) = torch.autograd.grad(full, pol)
    pol_acc = t["pol"].clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        micro = {k: v[rows] for k, v in t.items()}
        loss, _ = list_loss(list_batch(micro, pol=pol_acc[rows]), cfg, num_items_in_global_batch=6)
        loss.backward()
        total += loss.item()
    assert abs(total - full.item()) <= TOL and torch.allclose(pol_acc.grad, g_full, atol=TOL, rtol=0)


def test_list_shape_errors():
    t = make_lists(2, 3, seed=45)
    with pytest.raises(InputError, match="mask"):
        list_loss(ListBatch(t["pol"], t["ref"], t["tok"], t["score"], t["mask"][:, :2]), ListLossConfig())
    with pytest.raises(InputError, match="ref_logps"):
        list_loss(ListBatch(t["pol"], None, t["tok"], t["score"], t["mask"]), ListLossConfig())


# ------------------------------------------------------------------------------------------- TRL parity (opt-in)

class _Gather:
    """Single-process stand-in for accelerate's Accelerator in TRL's loss code."""
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_loss(trl_dpo, t: dict, tok: dict, cfg: LossConfig, sq: dict | None):
    """Run TRL's DPOTrainer._compute_loss on a fake model whose per-token log-probs are `tok` (precomputed-ref
    path). Returns (loss, grad w.r.t. the per-token policy logps, logged metrics)."""
    from collections import defaultdict
    from types import SimpleNamespace

    size, width = tok["pc_tok"].shape
    trainer = trl_dpo.DPOTrainer.__new__(trl_dpo.DPOTrainer)
    fields = dict(loss_types=cfg.loss_types, loss_weights=cfg.weights, beta=cfg.beta,
                  label_smoothing=cfg.label_smoothing, f_divergence_type=cfg.f_divergence_type,
                  f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, ld_alpha=cfg.ld_alpha,
                  use_weighting=cfg.use_weighting, precompute_ref_logps=True, aux_loss_enabled=False,
                  args=SimpleNamespace(discopop_tau=cfg.discopop_tau), accelerator=_Gather(),
                  _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                  _tp_size=1)
    trainer.__dict__.update(fields)
    trainer.__dict__["model"] = SimpleNamespace(training=True)
    mask = torch.zeros(2 * size, width + 1, dtype=torch.long)
    lengths = torch.cat([t["ct"], t["rt"]]).long()
    mask[:, 1:] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    logps = torch.cat([tok["pc_tok"], tok["pr_tok"]]).nan_to_num(0.0).clone().requires_grad_(True)
    square = torch.cat([sq["c"], sq["r"]]) if sq is not None else torch.zeros_like(logps)
    out = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                          is_top1=torch.zeros_like(logps, dtype=torch.bool), log_sum_sq_probs=square)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": t["rc"], "ref_rejected_logps": t["rr"]}
    loss = trainer._compute_loss(lambda **kw: out, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss, grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


TRL_PARITY = [LossConfig(loss_type=n, **({"label_smoothing": 0.01} if n == "exo_pair" else
                                         {"label_smoothing": 0.2} if n in ("robust", "aot", "aot_unpaired") else
                                         {"bco_baseline": "none"} if n == "bco_pair" else {}))
              for n in TRL_LOSS_TYPES]
TRL_PARITY += [LossConfig(loss_type=n, f_divergence_type=k) for n in ("sigmoid", "ipo", "sigmoid_norm", "discopop")
               for k in ("forward_kl", "js_divergence", "alpha_divergence")]
TRL_PARITY += [LossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                          bco_baseline="none"),
               LossConfig(ld_alpha=0.3), LossConfig(loss_type=["sigmoid", "ipo"], use_weighting=True)]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", TRL_PARITY, ids=lambda c: "+".join(c.loss_types) + f"-{c.f_divergence_type}"
                         + ("-ld" if c.ld_alpha else "") + ("-wpo" if c.use_weighting else ""))
def test_parity_with_trl_dpo_trainer(cfg):
    """Same values and gradients as TRL's own `_compute_loss` (skipped unless `trl` is importable, e.g.
    `pip install --no-deps --target DIR trl` and PYTHONPATH=DIR)."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    t = add_token_logps(make_pairs(7, seed=50, max_len=12), seed=51)
    g = torch.Generator().manual_seed(52)
    width = t["pc_tok"].shape[1]
    sq = None
    if cfg.use_weighting:
        sq = {"c": t["pc_tok"].nan_to_num(0.0) - 0.5 * torch.rand(7, width, generator=g),
              "r": t["pr_tok"].nan_to_num(0.0) - 0.5 * torch.rand(7, width, generator=g)}
    inside_c = torch.arange(width)[None, :] < t["ct"][:, None]
    inside_r = torch.arange(width)[None, :] < t["rt"][:, None]
    if cfg.ld_alpha is not None:
        # TRL's precomputed-reference path takes the reference sums as given: hand it the LD-weighted ones.
        shared = torch.minimum(t["ct"], t["rt"])
        t = {**t, "rc": length_desensitized(t["rc_tok"], t["ct"], shared, cfg.ld_alpha),
             "rr": length_desensitized(t["rr_tok"], t["rt"], shared, cfg.ld_alpha)}
    trl_value, trl_grad, trl_metrics = _trl_loss(trl_dpo, t, t, cfg, sq)

    tok_c = t["pc_tok"].nan_to_num(0.0).clone().requires_grad_(True)
    tok_r = t["pr_tok"].nan_to_num(0.0).clone().requires_grad_(True)
    pc, pr = tok_c.sum(1), tok_r.sum(1)
    extra = {}
    if cfg.ld_alpha is not None:
        extra = dict(policy_chosen_token_logps=tok_c, policy_rejected_token_logps=tok_r,
                     ref_chosen_token_logps=t["rc_tok"], ref_rejected_token_logps=t["rr_tok"])
    if sq is not None:
        extra.update(chosen_sq_logmass=(sq["c"] * inside_c).sum(1), rejected_sq_logmass=(sq["r"] * inside_r).sum(1))
    ours, metrics = pair_loss(to_batch({**t, "pc": pc, "pr": pr}, **extra), cfg, LossState())
    grad_c, grad_r = (torch.zeros_like(tok_c) if g is None else g
                      for g in torch.autograd.grad(ours, [tok_c, tok_r], allow_unused=True))
    assert abs(ours.item() - trl_value.item()) <= TOL
    assert torch.allclose(torch.cat([grad_c * inside_c, grad_r * inside_r]),
                          trl_grad * torch.cat([inside_c, inside_r]), atol=TOL, rtol=0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-5), name

