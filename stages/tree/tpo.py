"""TPO ranked-list trees (docs/stages.md), batched over every tree of a shard.

With gold steps (the bundled task): the gold solution is a path in the tree; `num_branches` branch points are
drawn by shuffling range(T) (padded with random indices when T < num_branches), and the policy continues from
each gold prefix gold[:i] to the end. `list_samples` free samples from the root stand in for TPO's original
rejected response. All continuations of all trees go to ONE `continue_` call. Without gold steps the tree is
`list_samples` (at least 2) free samples. Every terminal node is then scored once (same value function as the
other variants) and the lists are mined from the stored tree; with `list_score: judge | reward_model` every
distinct terminal response is also scored for the lists (stages/tree/list_scores.py).
"""
from __future__ import annotations

from stages.tree.config import SearchConfig
from stages.tree.expand import TokenCounter, Work, add_path
from stages.tree.list_scores import score_lists
from stages.tree.values import evaluate


def branch_points(n_steps: int, k: int, rng) -> list[int]:
    """TPO's draw: shuffle range(T), take k, pad with random indices when T < k."""
    idx = list(range(n_steps))
    rng.shuffle(idx)
    idx = idx[:k]
    while len(idx) < k:
        idx.append(rng.randrange(max(n_steps, 1)))
    return idx


def run_tpo(works: list[Work], backend, cfg: SearchConfig, seed: int, counter: TokenCounter | None = None) -> None:
    jobs = []  # (work, node to continue from)
    for w in works:
        root = w.tree.root
        gold = w.task.gold_solution.split("\n") if w.task.has_step_verifier and w.task.gold_solution else None
        if gold:
            tip = add_path(w, root, cfg.step_join.join(gold), cfg, finished=True)
            w.tree.info["gold_node"] = tip.node_id
            chain = w.tree.path(tip)
            for i in branch_points(len(gold) - 1, cfg.num_branches, w.rng):  # never branch after the answer
                jobs.append((w, chain[i - 1] if i > 0 else root))
            jobs.extend((w, root) for _ in range(cfg.list_samples))
        else:
            jobs.extend((w, root) for _ in range(max(2, cfg.list_samples)))
    if jobs:
        outs = backend.continue_([w.tree.prompt for w, _ in jobs], [w.tree.prefix_text(n) for w, n in jobs],
                                 cfg.rollout_sampling(seed), n=1)
        if counter is not None:
            counter.add(outs)
        for (w, node), comps in zip(jobs, outs):
            add_path(w, node, comps[0].text, cfg, finished=comps[0].finish_reason == "eos")
    leaves = [(w, n) for w in works for n in w.tree.nodes.values() if not n.children and n.parent_id is not None]
    for (w, n), v in zip(leaves, evaluate(leaves, backend, cfg, seed + 1, counter)):
        n.reward, n.rollout_success, n.value_sum, n.visits = v.value, v.rollout_success, v.value, 1
    if cfg.list_score != "verifier":  # the list labels come from a judge or a reward model (list_scores.py)
        score_lists(works, backend, cfg)
