"""A deterministic stage with no model, for engine/store tests: one pair per prompt, seeded per row."""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import time
from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from pipeline.stage import StageConfig, StageContext, register_stage

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


class ToyConfig(StageConfig):
    version: ClassVar[str] = "1"
    fail_every: int = Field(0, description="Mark every k-th row failed (0: none).")


@register_stage("toy-pairs", config=ToyConfig, input_kind="prompts", outputs={"main": "pairs", "aux": "prompts"},
                needs_backend=False)
def run(rows: pa.Table, cfg: ToyConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Toy pairs: chosen/rejected drawn with a per-row seed."""
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))  # lets a test kill the writer mid-run
    out = []
    for pid, prompt in zip(rows.column("prompt_id").to_pylist(), rows.column("prompt").to_pylist()):
        rng = random.Random(ctx.row_seed(pid))
        a, b = rng.randint(0, 10**6), rng.randint(0, 10**6)
        failed = cfg.fail_every and int(pid.split("-")[-1]) % cfg.fail_every == 0
        out.append({"pair_id": ctx.row_key(pid), "row_key": ctx.row_key(pid), "prompt_id": pid, "prompt": prompt,
                    "shared_prefix": "P:", "chosen": f"P:{a}", "rejected": f"P:{a}-{b}",
                    "stage": "synthetic", "method": "toy", "chosen_score": 1.0, "rejected_score": 0.0,
                    "score_margin": 1.0, "generator_model": "none", "created_at": EPOCH,
                    "extra": json.dumps({"shard": ctx.shard_index}),
                    "status": "failed" if failed else "ok", "error": "toy failure" if failed else None})
    return {"main": pa.Table.from_pylist(out), "aux": rows.select(["prompt_id", "prompt"])}


def prompts(n: int) -> pa.Table:
    return pa.table({"prompt_id": [f"p-{i}" for i in range(n)], "prompt": [f"question {i}?" for i in range(n)]})
