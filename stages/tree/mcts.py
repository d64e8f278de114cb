"""PRISM MCTS (docs/stages.md), run in lock-step over every tree of a shard.

One iteration of one tree, as PRISM does it:
  select  - from the root, while the node has children, take the child with the highest UCB score
            Q + c sqrt(ln N_parent / N_child) (100 c when unvisited, so every sibling is tried once first),
            ties broken uniformly at random;
  expand  - only a leaf that was visited before, is not terminal and is above max_depth: sample `width` next
            steps (duplicates dropped), then select again from it, which lands on a random new child;
  evaluate- a new node gets its value (no rollout in PRISM itself; here the value function decides), a visited
            node reuses its stored reward; the root's reward is 0;
  backup  - value_sum += reward, visits += 1 on the node and all its ancestors (plain mean).
Lock-step: every tree selects on the CPU, then ALL expansions go to one `continue_` call (n = width), then ALL
new nodes are valued in one call (rollouts with n = N). Finalisation evaluates every never-visited node once,
again in one batched call, so every node has a value.
"""
from __future__ import annotations

import math

from stages.tree.config import SearchConfig
from stages.tree.expand import TokenCounter, Work, expand_batch
from stages.tree.nodes import Node
from stages.tree.values import evaluate


def ucb(parent: Node, child: Node, c: float) -> float:
    if child.visits == 0:
        return 100 * c
    return child.value_sum / child.visits + c * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)


def select(work: Work, start: Node, c: float) -> Node:
    tree, node = work.tree, start
    while node.children:
        kids = tree.children(node)
        scores = [ucb(node, k, c) for k in kids]
        best = max(scores)
        node = work.rng.choice([k for k, s in zip(kids, scores) if s == best])
    return node


def _expandable(node: Node, cfg: SearchConfig) -> bool:
    return node.visits != 0 and not node.is_terminal and node.depth < cfg.max_depth


def _value_and_backup(pending: list[tuple[Work, Node]], backend, cfg: SearchConfig, seed: int,
                      counter: TokenCounter | None) -> None:
    fresh = [(w, n) for w, n in pending if n.reward is None and n.parent_id is not None]
    for (w, n), v in zip(fresh, evaluate(fresh, backend, cfg, seed, counter)):
        n.reward = 2.0 * v.value - 1.0   # PRISM's value scale is [-1, 1]
        n.rollout_success = v.rollout_success
    for w, n in pending:
        if n.reward is None:  # the root
            n.reward = 0.0
        w.tree.backup(n, n.reward)


def run_mcts(works: list[Work], backend, cfg: SearchConfig, seed: int,
             counter: TokenCounter | None = None) -> None:
    """Grow every tree in `works` for cfg.iterations iterations, batched across trees."""
    for it in range(cfg.iterations):
        leaves = [(w, select(w, w.tree.root, cfg.ucb_c)) for w in works]
        grow = [(w, leaf) for w, leaf in leaves if _expandable(leaf, cfg)]
        expand_batch(grow, backend, cfg, cfg.expansion_width, seed + 2 * it, counter)
        grown = {id(w) for w, _ in grow}
        pending = [(w, select(w, leaf, cfg.ucb_c) if id(w) in grown else leaf) for w, leaf in leaves]
        _value_and_backup(pending, backend, cfg, seed + 2 * it + 1, counter)
    if cfg.visit_all_nodes:
        rest = [(w, n) for w in works for n in w.tree.nodes.values() if n.visits == 0]
        _value_and_backup(rest, backend, cfg, seed - 1, counter)
