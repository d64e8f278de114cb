"""The `generate` stage: prompts -> n samples each (a `generations` table), through the run store.

Each shard is one batched `generate` call seeded from the shard's derived seed, so a resumed run reproduces
an uninterrupted one. A backend failure marks the shard's rows `failed` with the error (the engine then
applies the failure threshold) instead of losing them.
"""
from __future__ import annotations

import json
from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from pipeline.backends.base import SamplingParams
from pipeline.config_io import NonEmptyStr
from pipeline.errors import BackendError
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.tables import GENERATIONS


class GenerateConfig(StageConfig):
    version: ClassVar[str] = "1"

    n: int = Field(1, ge=1, description="Samples per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass.")
    top_k: int = Field(0, ge=-1, description="0 or -1: off.")
    max_tokens: int = Field(256, ge=1, description="Most new tokens per sample.")
    stop: list[NonEmptyStr] = Field(default_factory=list, description="Stop strings (YAML config only).")

    def sampling_params(self, seed: int | None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, stop=self.stop, seed=seed, n=self.n)

    def sampling(self) -> dict:
        return self.sampling_params(None).model_dump(mode="json", exclude={"seed"})


@register_stage("generate", config=GenerateConfig, input_kind="prompts", outputs={"main": "generations"})
def run(rows: pa.Table, cfg: GenerateConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Sample n completions per prompt (a generations table)."""
    ids = rows.column("prompt_id").to_pylist()
    prompts = rows.column("prompt").to_pylist()
    sp = cfg.sampling_params(ctx.seed)
    sampling_json = json.dumps(cfg.sampling(), sort_keys=True, separators=(",", ":"))
    error = None
    # a prompt past the model's context is a row error of its own (the backend would refuse the whole call)
    too_long = getattr(backend, "context_errors", lambda ps: [None] * len(ps))(prompts)
    live = [i for i, e in enumerate(too_long) if e is None]
    outs = [[None] * cfg.n for _ in prompts]
    try:
        for i, samples in zip(live, backend.generate([prompts[i] for i in live], sp, n=cfg.n) if live else []):
            outs[i] = samples
    except BackendError as e:
        outs, error = [[None] * cfg.n for _ in prompts], f"{type(e).__name__}: {e}"
    records = []
    for pid, prompt, samples, long_error in zip(ids, prompts, outs, too_long):
        for i, c in enumerate(samples):
            records.append({"prompt_id": pid, "prompt": prompt, "sample_index": i,
                            "text": c.text if c else None, "n_tokens": c.n_tokens if c else None,
                            "finish_reason": c.finish_reason if c else None, "model": backend.model_id,
                            "sampling": sampling_json, "seed": ctx.seed, "row_key": ctx.row_key(pid, i),
                            "status": "ok" if c else "failed", "error": long_error or error})
    return {"main": pa.Table.from_pylist(records, schema=GENERATIONS)}
