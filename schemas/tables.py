"""Arrow schemas for every table that crosses a stage boundary.

Columns marked non-nullable must be present and non-null. Stages may add their own typed, nullable
columns after the declared ones (docs/tables.md); `validate` keeps extra columns as they are.
"""
from __future__ import annotations

import pyarrow as pa

STATUS_VALUES = ("ok", "failed", "filtered")
STAGE_VALUES = ("tree", "rationale", "reward_aug", "aidsafe", "intervened", "self_label", "sampled", "synthetic")


def _f(name: str, type_: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# Provenance and status columns carried by every generated row (docs/tables.md).
_STATUS = [
    _f("row_key", pa.string(), False),      # sha256(stage fingerprint, input row id, sample index)
    _f("status", pa.string(), False),       # ok | failed | filtered
    _f("error", pa.string()),               # why a row failed or was filtered
]

PROMPTS = pa.schema([
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False),
])

GENERATIONS = pa.schema([
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False),
    _f("sample_index", pa.int32(), False),
    _f("text", pa.string()),
    _f("n_tokens", pa.int32()),
    _f("finish_reason", pa.string()),
    _f("model", pa.string(), False),
    _f("sampling", pa.string(), False),     # canonical JSON of the sampling parameters
    _f("seed", pa.int64()),
    *_STATUS,
])

TREE_NODE = pa.struct([
    _f("node_id", pa.string(), False),      # "0", "0.1", "0.1.2": PRISM's tag scheme
    _f("parent_id", pa.string()),
    _f("depth", pa.int16(), False),
    _f("step_text", pa.string(), False),
    _f("is_terminal", pa.bool_(), False),
    _f("visits", pa.int32(), False),
    _f("value_sum", pa.float64(), False),
    _f("q_value", pa.float64()),
    _f("reward", pa.float64()),
    _f("prior", pa.float64()),
    _f("answer", pa.string()),
    _f("correct", pa.bool_()),
    _f("rollout_success", pa.float64()),
    _f("greedy", pa.bool_()),               # decoded greedily (greedy_first); null: sampled or older trees
])

TREES = pa.schema([
    _f("tree_id", pa.string(), False),
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False),
    _f("method", pa.string(), False),
    _f("nodes", pa.list_(_f("item", TREE_NODE, False)), False),
    _f("generator_model", pa.string(), False),
    _f("extra", pa.string()),
    *_STATUS,
])

PAIRS = pa.schema([
    _f("pair_id", pa.string(), False),      # sha1(stage|prompt_id|chosen|rejected|system)
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False),
    _f("prompt_messages", pa.string()),     # JSON list[{role, content}] when multi-turn
    _f("system", pa.string()),
    _f("shared_prefix", pa.string()),       # assistant text common to chosen and rejected
    _f("chosen", pa.string(), False),       # full assistant text (includes shared_prefix)
    _f("rejected", pa.string(), False),
    _f("stage", pa.dictionary(pa.int8(), pa.string()), False),
    _f("method", pa.dictionary(pa.int8(), pa.string()), False),
    _f("chosen_score", pa.float64()),
    _f("rejected_score", pa.float64()),
    _f("score_margin", pa.float64()),
    _f("label_confidence", pa.float64()),
    _f("generator_model", pa.string(), False),
    _f("judge_model", pa.string()),
    _f("iteration", pa.int32()),
    _f("created_at", pa.timestamp("us", tz="UTC"), False),
    _f("extra", pa.string(), False),        # JSON object of stage-specific details
    *_STATUS,
])

# The scale a row's scores are on: the lowest and highest value its method can give (e.g. [0, 1] for a
# verifier's share of right steps, [-1, 1] for MCTS Q values). Null: not declared (consumers then assume their
# own default). A pair table carries the same two columns as its `score_range` group (schemas/pairs.py).
SCORE_MIN, SCORE_MAX = "score_min", "score_max"
SCORE_RANGE = [
    _f(SCORE_MIN, pa.float64()),
    _f(SCORE_MAX, pa.float64()),
]

RANKED_LISTS = pa.schema([
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False),
    _f("responses", pa.list_(pa.string()), False),
    _f("scores", pa.list_(pa.float64()), False),
    *SCORE_RANGE,
    _f("steps", pa.list_(pa.list_(pa.string()))),
    _f("method", pa.string(), False),
    _f("extra", pa.string(), False),
    *_STATUS,
])

# SFT rows the trainer reads (no stage boundary of their own): `prompt` (+ `system`/`prompt_messages`, and
# `shared_prefix` with prefix_as_prompt, as for pairs) and one target text: the first of these columns present,
# unless the run names another (`sft_column`, e.g. `text` of a generations table).
SFT_TARGETS = ("completion", "chosen")

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "generations": GENERATIONS,
    "trees": TREES,
    "pairs": PAIRS,
    "lists": RANKED_LISTS,
}

# The column whose values must be unique within a table of each kind.
UNIQUE_KEY: dict[str, str] = {
    "prompts": "prompt_id",
    "generations": "row_key",
    "trees": "row_key",
    "pairs": "pair_id",
    "lists": "row_key",
}


def schema_for(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown table kind {kind!r}; expected one of {sorted(SCHEMAS)}") from None
