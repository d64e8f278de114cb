"""What every stage has: a typed config, a run function, and a registry entry (docs/architecture.md).

Stages register themselves by name (`@register_stage`); the engine looks them up and never imports a stage.

    class MyConfig(StageConfig):
        version: ClassVar[str] = "1"
        width: int = Field(3, description="...")

    @register_stage("my-stage", config=MyConfig, input_kind="prompts", outputs={"main": "pairs"})
    def run(rows: pa.Table, cfg: MyConfig, backend, ctx: StageContext) -> dict[str, pa.Table]: ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.fingerprint import derive_seed, row_key


# `json_schema_extra` of a config field added after the stage's first release (see fingerprint_config)
ADDED_LATER = {"fingerprint": "omitted at its default"}


class StageConfig(BaseModel):
    """Base of every stage config: all fields have defaults and a description; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `.inf` parses as a float
    version: ClassVar[str] = "1"

    seed: int = Field(0, description="Base seed; each shard derives its own from it and the fingerprint.")

    def fingerprint_config(self) -> dict:
        """The config as it goes into the fingerprint. A field added after runs were made with this stage, marked
        `json_schema_extra=ADDED_LATER`, is left out while it holds its default: a new option that leaves the
        output unchanged must not reseed the shards of existing runs (their resume and their numbers)."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            if field.json_schema_extra == ADDED_LATER and getattr(self, name) == field.get_default(
                    call_default_factory=True):
                del data[name]
        return data

    def templates(self) -> dict[str, str]:
        """Prompt template texts that shape the output (they go into the fingerprint)."""
        return {}

    def sampling(self) -> dict:
        """Sampling parameters that shape the output (they go into the fingerprint)."""
        return {}

    def gold_needed(self) -> str | None:
        """What this stage, so configured, needs gold answers for (None: it runs on open prompts too). A run
        config whose inputs are a gold-free task (`prompts`) is refused at load with this text."""
        return None

    def logprobs_needed(self) -> str | None:
        """What this stage, so configured, needs the policy's teacher-forced log-probs for (None: generation is
        enough). A chat-only http model (no local tokenizer) is refused at load with this text."""
        return None

    def judges(self) -> list[str]:
        """The judges (or reward models) this stage, so configured, asks, as the run report names them ([]: none;
        the report's judged-stages table lists only stages that ask one)."""
        return []


@dataclass
class StageContext:
    """What the engine hands a stage for one shard."""

    fingerprint: str
    shard_index: int
    seed: int
    model_id: str | None = None
    progress: Callable[[int], None] = field(default=lambda n: None)

    def row_key(self, input_id: str, sample_index: int = 0) -> str:
        return row_key(self.fingerprint, input_id, sample_index)

    def row_seed(self, input_id: str, salt: Any = 0) -> int:
        """A seed for one input row, independent of how rows were sharded."""
        return derive_seed(self.fingerprint, input_id, salt)


RunFn = Callable[[pa.Table, StageConfig, Any, StageContext], dict[str, pa.Table]]


@dataclass
class StageSpec:
    name: str
    config: type[StageConfig]
    run: RunFn
    input_kind: str
    outputs: dict[str, str]           # output name -> table kind; "main" is the one later stages read
    needs_backend: bool = True
    id_column: str = "prompt_id"      # the input column that identifies a row
    help: str = ""


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(name: str, *, config: type[StageConfig], input_kind: str, outputs: dict[str, str],
                   needs_backend: bool = True, id_column: str = "prompt_id") -> Callable[[RunFn], RunFn]:
    if "main" not in outputs:
        raise ValueError(f"stage {name}: outputs must include 'main'")

    def deco(fn: RunFn) -> RunFn:
        _REGISTRY[name] = StageSpec(name, config, fn, input_kind, outputs, needs_backend, id_column,
                                    (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def get_stage(name: str) -> StageSpec:
    if name not in _REGISTRY:
        from schemas.errors import InputError
        raise InputError(f"unknown stage {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_stages() -> list[str]:
    return sorted(_REGISTRY)
