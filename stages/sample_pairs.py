"""sample-pairs: the naive final-answer baseline. K samples per problem; chosen = a sample with the right final
answer, rejected = one with a wrong answer; no step checks.

This is the kind of data measured to make a tiny policy worse (61 % of such "chosen" samples had a wrong
intermediate step). It exists so runs can show that next to step-verified tree pairs at equal compute.
`chosen_requires: steps` turns it into a stronger baseline whose chosen side must be step-verified too.
"""
from __future__ import annotations

import random
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.backends.base import SamplingParams
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.pairs import make_pairs
from stages._common import now_utc, pair_id, task_item
from schemas.errors import InputError

# chosen has the right final answer and rejected a wrong one, scored 1/0 on a declared [0, 1] scale
GROUPS = ("pair_type", "verification", "score_range")


class SamplePairsConfig(StageConfig):
    version: ClassVar[str] = "1"

    n_samples: int = Field(8, ge=2, description="samples per problem (calibration: 8)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, ge=1, description="new tokens per sample")
    max_pairs_per_prompt: int = Field(4, ge=1, description="most (right, wrong) pairs per problem")
    chosen_requires: Literal["answer", "steps"] = Field(
        "answer", description="answer: right final answer (the naive baseline); steps: every step verified")

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "n": self.n_samples}

    def gold_needed(self) -> str | None:
        return "gold answers to tell right samples from wrong ones"


@register_stage("sample-pairs", config=SamplePairsConfig, input_kind="prompts", outputs={"main": "pairs"})
def run(rows: pa.Table, cfg: SamplePairsConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Final-answer pairs from K samples per problem (the naive baseline)."""
    records = rows.to_pylist()
    problems = [task_item(r) for r in records]
    for r, p in zip(records, problems):
        if p is None:
            raise InputError(f"sample-pairs needs a task with gold answers (prompt_id {r['prompt_id']!r})",
                             column="meta")
        if cfg.chosen_requires == "steps" and not p.has_step_check:
            raise InputError(f"sample-pairs chosen_requires: steps needs a task with an exact step check, not "
                             f"{p.task.name!r} (prompt_id {r['prompt_id']!r})", column="meta")
    sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=ctx.seed)
    samples = backend.generate([r["prompt"] for r in records], sp, n=cfg.n_samples)
    out, created = [], now_utc()
    for r, p, comps in zip(records, problems, samples):
        texts = list(dict.fromkeys(c.text for c in comps))  # distinct samples, first-seen order
        right = [t for t in texts if (p.steps_ok(t) if cfg.chosen_requires == "steps" else p.correct(t))]
        wrong = [t for t in texts if not p.correct(t)]
        rng = random.Random(ctx.row_seed(r["prompt_id"]))
        combos = [(c, w) for c in right for w in wrong]
        rng.shuffle(combos)
        for k, (c, w) in enumerate(combos[:cfg.max_pairs_per_prompt]):
            pid = pair_id("sample", r["prompt_id"], c, w)
            out.append({"pair_id": pid, "prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": c,
                        "rejected": w, "stage": "sampled", "method": f"final_answer_{cfg.chosen_requires}",
                        "chosen_score": 1.0, "rejected_score": 0.0, "score_margin": 1.0, "score_min": 0.0,
                        "score_max": 1.0, "chosen_correct": True, "rejected_correct": False,
                        "generator_model": ctx.model_id, "created_at": created,
                        "extra": {"n_right": len(right), "n_wrong": len(wrong), "n_distinct": len(texts)},
                        "row_key": ctx.row_key(r["prompt_id"], k), "status": "ok", "pair_type": "terminal",
                        "meta": r.get("meta")})
    return {"main": make_pairs(out, GROUPS)}
