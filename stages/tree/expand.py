"""Growing trees: one backend call expands the chosen nodes of every tree in the batch.

Each (tree, node) asks for `n` next steps: `continue_` from the node's prefix text with the step stop strings.
Exact duplicate steps under one parent are dropped (PRISM). With `greedy_first` the first
candidate of every expansion is the greedy step (its node is marked `greedy`), the rest are sampled (marked
`greedy` false; with `branch_on_error` only where the greedy step is wrong); a sampled copy of the greedy step
is a duplicate like any other. A step ends the response when the model stopped at
EOS or the step matches the terminal pattern ("Answer: ..."). New nodes are annotated at once with what needs
no model: the stated answer and the verifier's `correct` flag.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from stages.tree.config import SearchConfig
from stages.tree.nodes import Node, Tree
from stages.tree.verifier import TreeTask


@dataclass
class Work:
    """One tree in a batch, with its task and its own random stream (for CPU-side choices)."""

    tree: Tree
    task: TreeTask
    rng: object  # random.Random


class TokenCounter:
    """Counts what the search asked of the backend (the benchmark's tokens/s)."""

    def __init__(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.sequences = 0

    def add(self, outs) -> None:
        self.calls += 1
        for comps in outs:
            self.sequences += len(comps)
            self.tokens += sum(c.n_tokens for c in comps)


def annotate(work: Work, node: Node, terminal_re: re.Pattern) -> None:
    tree, task = work.tree, work.task
    node.is_terminal = node.is_terminal or bool(terminal_re.search(node.step_text))
    steps = tree.trajectory(node)
    if node.is_terminal:
        node.answer = task.final_answer(node.step_text)
    node.correct = task.node_correct(steps, tree.join, node.is_terminal)


def _call(backend, items, sampling, n: int, counter: TokenCounter | None):
    outs = backend.continue_([w.tree.prompt for w, _ in items], [w.tree.prefix_text(node) for w, node in items],
                             sampling, n=n)
    if counter is not None:
        counter.add(outs)
    return outs


def _add(work: Work, node: Node, comps, terminal_re: re.Pattern, greedy: bool | None) -> list[Node]:
    """New children of `node` from `comps` (duplicates of its children and empty steps dropped)."""
    seen = {work.tree.nodes[c].step_text for c in node.children}
    info = work.tree.info
    info["sampled_steps"] = info.get("sampled_steps", 0) + len(comps)
    children = []
    for comp in comps:
        text = comp.text.strip()
        if not text or text in seen:
            info["dropped_steps"] = info.get("dropped_steps", 0) + 1  # duplicate (or empty) step
            continue
        seen.add(text)
        child = work.tree.add_child(node, text, is_terminal=comp.finish_reason == "eos", greedy=greedy)
        annotate(work, child, terminal_re)
        children.append(child)
    return children


def expand_batch(items: Sequence[tuple[Work, Node]], backend, cfg: SearchConfig, n: int, seed: int,
                 counter: TokenCounter | None = None) -> list[list[Node]]:
    """Sample `n` next steps for every (tree, node) in ONE `continue_` call; returns the new children.

    With `greedy_first`: one greedy call for every node, then one call for the other n - 1 samples (with
    `branch_on_error`, only for the nodes whose greedy step failed the step check).
    """
    if not items:
        return []
    terminal_re = re.compile(cfg.terminal_regex, re.IGNORECASE)
    sampling = cfg.step_sampling(seed)
    if not cfg.greedy_first:
        new = [_add(w, node, comps, terminal_re, None)
               for (w, node), comps in zip(items, _call(backend, items, sampling, n, counter))]
    else:
        greedy = _call(backend, items, sampling.model_copy(update={"temperature": 0.0}), 1, counter)
        new = [_add(w, node, comps, terminal_re, True) for (w, node), comps in zip(items, greedy)]
        more = [i for i, kids in enumerate(new)
                if not cfg.branch_on_error or not kids or kids[0].correct is False]
        if n > 1 and more:
            outs = _call(backend, [items[i] for i in more], sampling, n - 1, counter)
            for i, comps in zip(more, outs):
                w, node = items[i]
                new[i] += _add(w, node, comps, terminal_re, False)
    for (w, node), kids in zip(items, new):
        if not kids and not node.children:
            node.is_terminal = True  # a dead end: the model has nothing more to say here
    return new


def add_path(work: Work, parent: Node, text: str, cfg: SearchConfig, finished: bool) -> Node:
    """Add a full continuation as a chain of step nodes under `parent`; returns the last node.

    Steps are the non-empty lines (split at the step join); the last one is terminal when the model finished.
    An existing child with the same step text is reused, so identical prefixes share nodes.
    """
    terminal_re = re.compile(cfg.terminal_regex, re.IGNORECASE)
    steps = [s.strip() for s in text.split(cfg.step_join) if s.strip()]
    node = parent
    for i, step in enumerate(steps):
        match = next((c for c in work.tree.children(node) if c.step_text == step), None)
        if match is None:
            match = work.tree.add_child(node, step, is_terminal=finished and i == len(steps) - 1)
            annotate(work, match, terminal_re)
        node = match
    return node
