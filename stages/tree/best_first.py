"""Tree-PLV best-first search (docs/stages.md), in lock-step over every tree of a shard.

Each tree keeps a frontier of unexpanded nodes keyed by value R (share of N rollouts reaching the gold
answer; a terminal node's R is its answer check). Each round every active tree pops its best node; all pops
are expanded in ONE `continue_` call (k candidates each), and all new children are valued in ONE call (N
rollouts each). A tree stops when its budget (default 2 x max_depth expansions) is spent or its frontier is
empty, or, with `stop_at_terminal` (the paper's rule), when it pops a terminal node. Values sit on [0, 1]:
reward = value_sum = R, visits = 1.
"""
from __future__ import annotations

from stages.tree.config import SearchConfig
from stages.tree.expand import TokenCounter, Work, expand_batch
from stages.tree.nodes import Node
from stages.tree.values import evaluate


def _priority(node: Node) -> tuple:
    # Highest value first; among equals the deeper node (closer to an answer), then the older id: deterministic.
    return (-(node.reward or 0.0), -node.depth, [int(p) for p in node.node_id.split(".")])


def _pop(work: Work, frontier: list[Node]) -> Node | None:
    if not frontier:
        return None
    frontier.sort(key=_priority)
    return frontier.pop(0)


def run_best_first(works: list[Work], backend, cfg: SearchConfig, seed: int,
                   counter: TokenCounter | None = None) -> None:
    budget = cfg.expansion_budget or 2 * cfg.max_depth
    for w in works:
        w.tree.root.reward, w.tree.root.visits = 0.0, 1
    frontiers = {id(w): [w.tree.root] for w in works}
    spent = {id(w): 0 for w in works}
    active = list(works)
    for rnd in range(budget):
        picks = []
        for w in active:
            node = _pop(w, frontiers[id(w)])
            while node is not None and (node.is_terminal or node.depth >= cfg.max_depth):
                if node.is_terminal and cfg.stop_at_terminal:
                    break
                node = _pop(w, frontiers[id(w)])
            if node is not None and not (node.is_terminal and cfg.stop_at_terminal):
                picks.append((w, node))
        if not picks:
            break
        new = expand_batch(picks, backend, cfg, cfg.best_first_k, seed + 2 * rnd, counter)
        flat = [(w, c) for (w, _), kids in zip(picks, new) for c in kids]
        for (w, c), v in zip(flat, evaluate(flat, backend, cfg, seed + 2 * rnd + 1, counter)):
            c.reward, c.rollout_success = v.value, v.rollout_success
            c.value_sum, c.visits = v.value, 1
            frontiers[id(w)].append(c)
        for w, _ in picks:
            spent[id(w)] += 1
        active = [w for w, _ in picks if spent[id(w)] < budget]
