"""Stage 6: self-generated preference labels (SPA / Selfie, docs/stages.md; reference: kingdy2002/SPA).

Label one prompt:
    K samples y_1..y_K ~ π (one `generate` call with n=K for the whole shard)
    r(x, y)  = log π(y|x) − log π_ref(y|x)      summed completion log-probs under the same chat template,
                                                 from `backend.logprobs` (policy) and the reference backend
    chosen   = argmax_k r,  rejected = argmin_k r            (selection "min_max")
               or rejected = a seeded random other sample    (selection "max_chosen")
    label_confidence = σ(β·(r_chosen − r_rejected));  low_confidence = label_confidence < threshold

The reference is named by `ref_model` (a model folder or built-in name, loaded once per process with
`ref_backend`). When the policy *is* the reference every reward is 0 and the label carries no information: such
prompts (|Δr| ≤ `tie_tolerance`) come out as `filtered` rows saying so, as do prompts whose K samples are all the
same text. SPA therefore starts from a DPO-trained policy π_0 (trained on a small labelled seed set) and judges
with π_0 against the SFT model.

The iteration loop over this stage and the trainer (SPA's `run_all.sh`) is flows/spa.py's `spa_iterate`.

On a verifiable task (a `meta` column) each pair also records whether chosen and rejected are right, and
`label_report` gives the agreement with the verifier, calibration buckets and the length bias.
"""
from __future__ import annotations

import math
import random
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.agreement import label_agreement
from pipeline.backends.base import SamplingParams
from pipeline.judges.config import require_logprobs
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.pairs import make_pairs, model_name
from stages._common import now_utc, pair_id, task_item

STAGE = "self_label"
STAGE_FIELDS = [
    pa.field("chosen_reward", pa.float64()),
    pa.field("rejected_reward", pa.float64()),
    pa.field("n_samples", pa.int16()),
    pa.field("judge_policy_ckpt", pa.string()),
    pa.field("judge_ref_ckpt", pa.string()),
    pa.field("selection_strategy", pa.string()),
    pa.field("low_confidence", pa.bool_()),
]
# verification: chosen/rejected_correct on verifiable prompts (a `meta` column, carried so later stages can
# verify), else null. No score_range: implicit rewards log π − log π_ref have no fixed scale.
GROUPS = ("verification",)
LOGPROBS_NEED = "its implicit rewards log π(y|x) − log π_ref(y|x) (teacher-forced log-probs of every sample)"


class SelfLabelConfig(StageConfig):
    version: ClassVar[str] = "1"

    n_samples: int = Field(2, ge=2, description="K samples per prompt (SPA uses 2)")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (SPA: 0.7)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass (SPA: 1.0)")
    max_tokens: int = Field(300, ge=1, description="new tokens per sample (SPA: 300)")
    ref_model: str | None = Field(None, description="reference model (the SFT model); None = the policy itself, "
                                                    "which makes every reward tie")
    ref_backend: str = Field("transformers", description="backend kind that loads ref_model")
    beta: float = Field(0.1, gt=0, description="β of the confidence σ(β·Δr)")
    selection: Literal["min_max", "max_chosen"] = Field(
        "min_max", description="min_max: rejected = argmin r; max_chosen: rejected = a random other sample")
    low_confidence_threshold: float = Field(
        0.55, ge=0.5, le=1, description="flag pairs with label_confidence below this (for noise-aware losses)")
    tie_tolerance: float = Field(1e-4, ge=0, description="|Δr| at or below this is a tie: the prompt is filtered")
    iteration: int = Field(0, ge=0, description="loop index written to the iteration column")

    def sampling(self) -> dict:
        return self.sample_params(0).model_dump(mode="json", exclude={"seed"})

    def logprobs_needed(self) -> str | None:
        return LOGPROBS_NEED

    def sample_params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=seed)


# ----------------------------------------------------------------------------------------- reference model
_REFERENCES: dict[tuple[str, str], Any] = {}   # (ref_backend, ref_model) -> the loaded reference


def reference_backend(cfg: SelfLabelConfig, policy):
    if cfg.ref_model is None:
        return policy
    key = (cfg.ref_backend, cfg.ref_model)
    if key not in _REFERENCES:
        from pipeline.backends import make_backend
        if cfg.ref_backend != "http":   # fail on a wrong name before the heavy backend imports
            from pipeline.models import resolve_model
            resolve_model(cfg.ref_model)
        _REFERENCES[key] = make_backend(cfg.ref_backend, cfg.ref_model)
    return _REFERENCES[key]


# -------------------------------------------------------------------------------------------------- labels
def implicit_rewards(prompts: list[str], samples: list[list[str]], policy, ref) -> list[list[float]]:
    """r = log π(y|x) − log π_ref(y|x) for every sample; one logprobs call per model for the whole shard."""
    flat_p = [p for p, ys in zip(prompts, samples) for _ in ys]
    flat_y = [y for ys in samples for y in ys]
    if not flat_y:
        return [[] for _ in prompts]
    pol = [x.total for x in policy.logprobs(flat_p, flat_y)]
    refl = pol if ref is policy else [x.total for x in ref.logprobs(flat_p, flat_y)]
    out, i = [], 0
    for ys in samples:
        out.append([pol[i + k] - refl[i + k] for k in range(len(ys))])
        i += len(ys)
    return out


def select(rewards: list[float], strategy: str, rng: random.Random) -> tuple[int, int]:
    """(chosen index, rejected index): argmax and argmin (first index on equal values), or a random other."""
    best = max(range(len(rewards)), key=lambda k: (rewards[k], -k))
    if strategy == "min_max":
        return best, min(range(len(rewards)), key=lambda k: (rewards[k], k))
    others = [k for k in range(len(rewards)) if k != best]
    return best, rng.choice(others)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _correctness(problem, texts: list[str]) -> list[bool | None]:
    if problem is None:
        return [None] * len(texts)
    return [problem.correct(t) for t in texts]


def label_row(r: dict, problem, texts: list[str], rewards: list[float], cfg: SelfLabelConfig,
              ctx: StageContext, models: tuple[str, str], created) -> dict:
    """One pair row for a prompt (or a filtered row saying why there is none)."""
    c, j = select(rewards, cfg.selection, random.Random(ctx.row_seed(r["prompt_id"], "reject")))
    correct = _correctness(problem, [texts[c], texts[j]])
    margin = rewards[c] - rewards[j]
    conf = sigmoid(cfg.beta * margin)
    row = {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": texts[c], "rejected": texts[j],
           "stage": STAGE, "method": f"spa_{cfg.selection}", "generator_model": models[0],
           "judge_model": models[0], "iteration": cfg.iteration, "created_at": created,
           "row_key": ctx.row_key(r["prompt_id"]), "chosen_score": rewards[c], "rejected_score": rewards[j],
           "score_margin": margin, "label_confidence": conf, "chosen_reward": rewards[c],
           "rejected_reward": rewards[j], "n_samples": len(texts), "judge_policy_ckpt": models[0],
           "judge_ref_ckpt": models[1], "selection_strategy": cfg.selection,
           "low_confidence": conf < cfg.low_confidence_threshold, "chosen_correct": correct[0],
           "rejected_correct": correct[1], "meta": r.get("meta"),
           "extra": {"rewards": rewards, "chosen_index": c, "rejected_index": j}}
    reason = None
    if len(set(texts)) == 1:
        reason = f"all {len(texts)} samples are the same text"
    elif abs(margin) <= cfg.tie_tolerance:
        reason = (f"implicit rewards tie (|Δr| = {abs(margin):.3g}); policy and reference "
                  f"{'are the same model' if models[0] == models[1] else 'agree on these samples'}")
    elif texts[c] == texts[j]:   # the same text sampled twice, its rewards differing by float noise only
        reason = "the highest- and lowest-reward samples are the same text"
    elif not texts[c].strip() or not texts[j].strip():  # a pair table's sides are never empty (schemas)
        reason = f"the {'chosen' if not texts[c].strip() else 'rejected'} sample is empty"
    if reason is not None:
        row.update(status="filtered", error=reason)  # make_pairs: pair_id = row_key
    else:
        row.update(status="ok", pair_id=pair_id(STAGE, r["prompt_id"], texts[c], texts[j]))
    return row


@register_stage("self-label", config=SelfLabelConfig, input_kind="prompts", outputs={"main": "pairs"})
def run(rows: pa.Table, cfg: SelfLabelConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """SPA self-labels: K samples, implicit reward log π − log π_ref, chosen = argmax, rejected = argmin."""
    records = rows.to_pylist()
    problems = [task_item(r) for r in records]
    ref = reference_backend(cfg, backend)
    for b in (backend, ref):  # Python callers hand in backends the config load never saw
        require_logprobs(b, f"self-label ({LOGPROBS_NEED})")
    models = (model_name(backend), model_name(ref))
    prompts = [r["prompt"] for r in records]
    samples = [[c.text for c in comps] for comps in backend.generate(prompts, cfg.sample_params(ctx.seed),
                                                                     n=cfg.n_samples)]
    rewards = implicit_rewards(prompts, samples, backend, ref)
    created = now_utc()
    out = [label_row(r, p, t, w, cfg, ctx, models, created)
           for r, p, t, w in zip(records, problems, samples, rewards)]
    ctx.progress(rows.num_rows)
    return {"main": make_pairs(out, GROUPS, STAGE_FIELDS)}


# ------------------------------------------------------------------------------------------------- quality
def label_report(pairs: pa.Table, n_buckets: int = 5) -> dict:
    """Agreement with the verifier (share of pairs with chosen right and rejected wrong, among pairs where
    exactly one side is right), calibration buckets of label_confidence with ECE, and length bias (ok rows)."""
    rows = [r for r in pairs.to_pylist() if r.get("status", "ok") == "ok"]
    decided = [r for r in rows if r.get("chosen_correct") is not None
               and r["chosen_correct"] != r["rejected_correct"]]
    verdicts = label_agreement((r.get("chosen_correct"), r.get("rejected_correct")) for r in rows) or {}
    agree = verdicts.get("agree", 0)
    buckets, ece = [], 0.0
    for b in range(n_buckets):
        lo, hi = 0.5 + 0.5 * b / n_buckets, 0.5 + 0.5 * (b + 1) / n_buckets
        sel = [r for r in decided if lo <= r["label_confidence"] < hi or (b == n_buckets - 1 and
                                                                           r["label_confidence"] >= hi)]
        if sel:
            acc = sum(bool(r["chosen_correct"]) for r in sel) / len(sel)
            conf = sum(r["label_confidence"] for r in sel) / len(sel)
            ece += len(sel) / len(decided) * abs(acc - conf)
            buckets.append({"range": [round(lo, 3), round(hi, 3)], "n": len(sel), "accuracy": acc,
                            "mean_confidence": conf})
    return {"pairs": len(rows), "decided": len(decided), "agree": agree,
            "agreement": agree / len(decided) if decided else None,
            "both_right": verdicts.get("both_right", 0), "both_wrong": verdicts.get("both_wrong", 0),
            "low_confidence": sum(bool(r.get("low_confidence")) for r in rows),
            "mean_len_diff": (sum(len(r["chosen"]) - len(r["rejected"]) for r in rows) / len(rows)) if rows else None,
            "calibration": buckets, "ece": ece if decided else None}
