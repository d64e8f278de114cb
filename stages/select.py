"""select-pairs: keep the pairs a training arm should see; mark the rest `filtered` with the reason.

No model calls. Selection is by pair type (e.g. `first_wrong_step` step pairs vs `terminal` final-answer pairs
of a tree-search stage), by method, by score margin, and at most N pairs per prompt. Filtered rows stay in the
output with status `filtered`, so filter rates are reported (run report, dataset card), never hidden.
"""
from __future__ import annotations

from typing import ClassVar

import polars as pl
import pyarrow as pa
from pydantic import Field

from pipeline.stage import StageConfig, StageContext, register_stage


class SelectConfig(StageConfig):
    version: ClassVar[str] = "1"

    pair_types: list[str] | None = Field(None, description="keep only these `pair_type` values (None: any)")
    methods: list[str] | None = Field(None, description="keep only these `method` values (None: any)")
    min_margin: float | None = Field(None, description="keep pairs with score_margin >= this (None: any)")
    max_per_prompt: int | None = Field(None, ge=1, description="keep at most this many pairs per prompt_id "
                                                               "(the first ones in input order)")


def _reason(df: pl.DataFrame, cfg: SelectConfig) -> pl.Expr:
    """Why a row is filtered (null: kept). The first failing check names the reason."""
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    if cfg.pair_types is not None:
        col = pl.col("pair_type") if "pair_type" in df.columns else pl.lit(None, dtype=pl.String)
        checks.append(((~col.is_in(cfg.pair_types)).fill_null(True),
                       pl.format("pair_type {} not selected", col.fill_null("<none>"))))
    if cfg.methods is not None:
        method = pl.col("method").cast(pl.String)
        checks.append(((~method.is_in(cfg.methods)).fill_null(True), pl.format("method {} not selected", method)))
    if cfg.min_margin is not None:
        checks.append(((pl.col("score_margin") < cfg.min_margin).fill_null(True),
                       pl.lit(f"score_margin below {cfg.min_margin}")))
    reason = pl.lit(None, dtype=pl.String)
    for bad, why in reversed(checks):
        reason = pl.when(bad).then(why).otherwise(reason)
    return reason


@register_stage("select-pairs", config=SelectConfig, input_kind="pairs", outputs={"main": "pairs"},
                needs_backend=False, id_column="pair_id")
def run(rows: pa.Table, cfg: SelectConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Select pairs by type, method, margin and per-prompt cap; the rest are kept as `filtered`."""
    df = pl.from_arrow(rows)
    df = df.with_columns(_reason(df, cfg).alias("_why"))
    if cfg.max_per_prompt is not None:
        rank = pl.int_range(pl.len()).over("prompt_id", pl.col("_why").is_null())
        df = df.with_columns(pl.when(pl.col("_why").is_null() & (rank >= cfg.max_per_prompt))
                             .then(pl.lit(f"more than {cfg.max_per_prompt} pairs for this prompt"))
                             .otherwise(pl.col("_why")).alias("_why"))
    df = df.with_columns(
        pl.when(pl.col("_why").is_null()).then(pl.col("status")).otherwise(pl.lit("filtered")).alias("status"),
        pl.coalesce(pl.col("_why"), pl.col("error")).alias("error"),
    ).drop("_why")
    # polars hands back large_string columns; the engine casts them back to the declared schema
    return {"main": df.to_arrow()}
