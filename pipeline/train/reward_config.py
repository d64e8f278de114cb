"""`RewardConfig`: the settings of `prefpipe train --mode reward` (the `reward` section of TrainConfig), apart from
the trainer (pipeline/train/reward.py) so that config.py imports it without importing the training loop."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RewardConfig(BaseModel):
    """Settings of `mode: reward` (a scalar-head verifier on pair tables)."""
    model_config = ConfigDict(extra="forbid")

    objective: Literal["pairwise", "step_ranking"] = Field(
        "pairwise", description="pairwise: Bradley-Terry on (chosen, rejected); step_ranking: Tree-PLV's sum over "
        "the steps from the divergence point to the end")
    step_separator: str = Field("\n", description="step_ranking: the string between steps of a response")
    pair_types: list[str] | None = Field(None, description="train only on these pair_type values (None: all rows)")
    eval_data: str | None = Field(None, description="held-out pair table; None: eval_fraction of the prompts")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts held out when eval_data is None")
    eval_every: int = Field(50, ge=1, description="evaluate on the held-out pairs every N optimizer steps")
    eval_batch: int = Field(64, ge=1, description="sequences per forward when scoring the held-out pairs")

    @field_validator("pair_types", mode="before")
    @classmethod
    def _one_type(cls, v):
        return [v] if isinstance(v, str) else v  # `--reward.pair-types terminal`: one name, not a comma list
