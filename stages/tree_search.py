"""Stage 1: tree-search preference trees (docs/stages.md): PRISM MCTS, Tree-PLV best-first, TPO ranked lists.

One shard at a time (the engine does sharding, resume and writing):
  1. every input row becomes a tree with its task (gold answer; the exact step verifier on the bundled task);
  2. the variant grows ALL trees of the shard in lock-step: per round one `continue_` call for every expansion
     of every tree and one batched call for every new node's value (stages/tree/{mcts,best_first,tpo}.py);
  3. pairs and ranked lists are mined from the trees (stages/tree/mining.py; the same code re-mines a stored
     TREES table);
  4. step pairs are re-checked with fresh rollouts under another seed (stages/tree/validity.py); each pair's
     `extra` holds its fresh estimates, each tree's `extra` the shard's validity share.
Outputs: main = pairs (PAIRS + pair_type, depth, node ids, ...), trees = TREES, lists = RANKED_LISTS.

Randomness: CPU-side choices (UCB ties, TPO branch points) use a per-row seed, so they do not depend on
sharding; sampling uses one seed per backend call derived from the shard seed, because one call serves many
trees. A resumed run keeps the shard layout, so it reproduces an uninterrupted run.
"""
from __future__ import annotations

import random
from typing import ClassVar

import pyarrow as pa
from pydantic import model_validator

from pipeline.judges.config import JudgeConfig, require_logprobs
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.errors import InputError
from schemas.pairs import model_name
from stages._common import now_utc, pair_id
from stages.tree.best_first import run_best_first
from stages.tree.config import MiningConfig, SearchConfig
from stages.tree.expand import TokenCounter, Work
from stages.tree.mcts import run_mcts
from stages.tree.mining import lists_table, mine, mine_trees, pairs_table
from stages.tree.nodes import Tree, search_stats, trees_to_table
from stages.tree.tpo import run_tpo
from stages.tree.validity import check_pairs
from stages.tree.verifier import TreeTask, task_from_row

METHODS = {"mcts": "prism_mcts", "best_first": "tree_plv", "tpo_list": "tpo_tree"}
SEARCHES = {"mcts": run_mcts, "best_first": run_best_first, "tpo_list": run_tpo}


class TreeSearchConfig(StageConfig, SearchConfig, MiningConfig):
    """Stage 1 settings: search (variant, value function, shape, sampling) and mining (pair policies)."""

    version: ClassVar[str] = "1"

    @model_validator(mode="after")
    def _greedy_needs_greedy_first(self):
        # a model validator: step_rejected (MiningConfig) is validated before greedy_first (SearchConfig)
        if self.step_rejected == "greedy" and not self.greedy_first:
            raise ValueError("step_rejected: greedy needs greedy_first: true (no child is decoded greedily "
                             "otherwise, so no pair would be kept)")
        return self

    def gold_needed(self) -> str | None:
        if self.value_fn in ("logprob", "reward_model", "judge"):  # none needs a gold answer to value a node
            return None
        return f"gold answers for value_fn {self.value_fn!r} (use value_fn: logprob on open prompts)"

    def logprobs_needed(self) -> str | None:
        return "value_fn logprob (the response's mean token probability)" if self.value_fn == "logprob" else None

    def judges(self) -> list[str]:
        """What scores node values and TPO lists, when a model does (the verifier and rollouts are no judge)."""
        named = {"judge": (self.judge or JudgeConfig()).label(), "reward_model": f"reward model {self.value_model}"}
        return [f"{what}: {named[kind]}" for what, kind in (("node values", self.value_fn),
                                                           ("lists", self.list_score)) if kind in named]

    def sampling(self) -> dict:
        return {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "step_max_tokens",
                                              "rollout_max_tokens", "step_stop")}


def _unusable(task: TreeTask, cfg: SearchConfig) -> str | None:
    """Why this row cannot be searched with this config (the row fails, the others go on)."""
    if cfg.value_fn == "rollout" and not task.has_gold:
        return "value_fn 'rollout' needs a gold answer (a `gold_answer` or `meta` column)"
    if cfg.value_fn == "step_verifier" and not task.has_step_verifier:
        return "value_fn 'step_verifier' needs a task with an exact step check (arith)"
    return None


def grow(works: list[Work], backend, cfg: SearchConfig, seed: int, counter: TokenCounter | None = None) -> None:
    """Run the configured variant over all trees at once (batched across trees)."""
    SEARCHES[cfg.variant](works, backend, cfg, seed, counter)


def make_work(row: dict, tree_id: str, cfg: SearchConfig, rng_seed: int) -> Work:
    """A fresh tree for one input row; raises InputError when the row cannot be searched."""
    task = task_from_row(row)
    why = _unusable(task, cfg)
    if why:
        raise InputError(why)
    info = {"gold_answer": task.gold_answer, "meta": row.get("meta"), "variant": cfg.variant,
            "value_fn": cfg.value_fn}
    tree = Tree(tree_id, row["prompt_id"], row["prompt"], METHODS[cfg.variant], cfg.step_join, info=info)
    return Work(tree, task, random.Random(rng_seed))


def _failed_pair(pid: str, prompt: str, error: str, key: str, model: str) -> dict:
    return {"pair_id": pair_id("tree", pid, "", "", "failed"), "prompt_id": pid, "prompt": prompt,
            "stage": "tree", "method": "none", "generator_model": model, "created_at": now_utc(), "row_key": key,
            "status": "failed", "error": error}


@register_stage("tree-search", config=TreeSearchConfig, input_kind="prompts",
                outputs={"main": "pairs", "trees": "trees", "lists": "lists"})
def run(rows: pa.Table, cfg: TreeSearchConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Tree-search preference pairs: MCTS / best-first / TPO lists, batched across trees."""
    model = model_name(backend)
    if cfg.value_fn == "logprob":  # before any row runs: a chat-only server cannot score text
        require_logprobs(backend, "value_fn logprob")
    works, failed = [], []
    for row in rows.to_pylist():
        pid = row["prompt_id"]
        try:
            works.append(make_work(row, ctx.row_key(pid)[:16], cfg, ctx.row_seed(pid)))
        except InputError as e:
            failed.append((row, e.reason if hasattr(e, "reason") else str(e)))
    grow(works, backend, cfg, ctx.seed)
    items = [(w.tree, {"row_key": ctx.row_key(w.tree.prompt_id), "generator_model": model}) for w in works]
    pairs, lists = mine_trees(items, cfg)
    validity = None
    if cfg.validity_rollouts:
        tasks = {w.tree.prompt_id: w.task for w in works}
        validity = check_pairs(pairs, tasks, backend, cfg, cfg.validity_rollouts, ctx.seed ^ 0x5A5A5A5A)
    tree_rows = []
    for w, (_, meta) in zip(works, items):
        w.tree.info.update(stats=search_stats(w.tree), shard_validity=validity)
        tree_rows.append(w.tree.to_row(row_key=meta["row_key"], generator_model=model))
    for row, err in failed:
        key = ctx.row_key(row["prompt_id"])
        tree_rows.append(Tree(key[:16], row["prompt_id"], row["prompt"], METHODS[cfg.variant], cfg.step_join,
                              info={}).to_row(row_key=key, generator_model=model, status="failed", error=err))
        pairs.append(_failed_pair(row["prompt_id"], row["prompt"], err, key, model))
    ctx.progress(rows.num_rows)
    return {"main": pairs_table(pairs), "trees": trees_to_table(tree_rows), "lists": lists_table(lists)}


__all__ = ["TreeSearchConfig", "run", "grow", "make_work", "mine", "METHODS"]
