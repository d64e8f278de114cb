"""mine-trees: pairs and ranked lists re-mined from a tree-search stage's stored trees, with no model calls.

Reads the `trees` output of a tree-search stage (`input: <stage id>@trees` in a run config, or a TREES parquet
file with `prefpipe stage mine-trees --input`), so the pair policies can change without searching again:
thresholds, `step_rejected`, `tie_policy`, and two options only re-mining offers, `gold_fallback` and
`chosen_continuation` (the search stage's own mining has neither, so its fingerprint and stored outputs stay as
they were).

gold_fallback: at a verified prefix where the tree has a wrong next step but no verified sibling (every sampled
candidate was wrong), the task's gold next line is the chosen side (stages/tree/mining.py `gold_child`). The
rejected side is still the tree's own wrong step; such pairs carry `extra.chosen_source = "gold"`.

chosen_continuation: a first-wrong-step pair's chosen side runs on to the verified answer the tree reached below
its step (`extra.chosen_continued`; one line where the tree has no verified terminal below it).
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from pipeline.stage import StageConfig, StageContext, register_stage
from stages.tree.config import MiningConfig
from stages.tree.mining import lists_table, mine_trees, pairs_table
from stages.tree.nodes import trees_from_table


class MineTreesConfig(StageConfig, MiningConfig):
    """Stage 1's mining settings (stages/tree/config.py MiningConfig) plus the gold fallback."""

    version: ClassVar[str] = "1"

    gold_fallback: bool = Field(False, description=(
        "first_wrong_step: where no sibling of a wrong step verifies, the task's gold next line is the chosen "
        "side (kept only when it verifies; needs the bundled task's step verifier)"))
    chosen_continuation: bool = Field(False, description=(
        "first_wrong_step: the chosen side runs on from its step to the verified answer the tree reached below it "
        "(verified children, greedy first); a step with no verified terminal below keeps its one line"))


@register_stage("mine-trees", config=MineTreesConfig, input_kind="trees",
                outputs={"main": "pairs", "lists": "lists"}, needs_backend=False, id_column="tree_id")
def run(rows: pa.Table, cfg: MineTreesConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Re-mine stored trees (a tree-search stage's `trees` output) into pairs and lists; no model calls."""
    items = [(tree, {"row_key": ctx.row_key(tree.tree_id), "generator_model": meta["generator_model"]})
             for tree, meta in trees_from_table(rows)]
    pairs, lists = mine_trees(items, cfg, gold_fallback=cfg.gold_fallback,
                              chosen_continuation=cfg.chosen_continuation)
    ctx.progress(rows.num_rows)
    return {"main": pairs_table(pairs), "lists": lists_table(lists)}


__all__ = ["MineTreesConfig", "run"]
