"""Pluggable node-value functions (docs/stages.md). Each scores a batch of nodes from many trees at once.

Every function returns, per node, a value in [0, 1] (higher = better) and, for rollouts, the raw success share.
The search maps it to its own scale (PRISM MCTS uses [-1, 1]: reward = 2 v - 1).

- `rollout` (Tree-PLV / OmegaPRM): N completions of prefix + step to the end in ONE `continue_` call for all
  nodes of all trees; value = share whose final answer is the gold one. Terminal nodes need no call: their
  value is the answer check (Tree-PLV: 1[answer = gold]).
- `step_verifier`: the task's exact step check (1 if every step so far is right), no model call.
- `logprob`: exp(mean token log-prob) of the response under the policy, one teacher-forced `logprobs` call.
- `reward_model`: sigmoid of a reward model's score (`value_model`, pipeline/judges/reward_model.py) of prompt +
  prefix + step, every new node in ONE batched scoring call, no rollouts and no policy call; a terminal node of a
  task with a gold answer takes its answer check instead, as with rollouts (free and exact).
- `judge`: P(step correct | problem, the steps before it) from an LLM judge (pipeline/judges, PRISM's step judge),
  one batched call for all nodes; terminals with a gold answer get the answer check. An answer the judge gives
  that does not parse values the node at 0.5 (no information) and keeps the judge's error on the NodeValue.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import InputError
from stages.tree.config import SearchConfig
from stages.tree.expand import TokenCounter, Work
from stages.tree.nodes import Node
from stages.tree.verifier import TreeTask


@dataclass
class NodeValue:
    value: float
    rollout_success: float | None = None
    error: str | None = None     # value_fn judge: the judge's unparseable answer (value 0.5)


def rollout_success(items: Sequence[tuple[TreeTask, str]], backend, cfg: SearchConfig, n: int, seed: int,
                    counter: TokenCounter | None = None) -> list[float]:
    """Share of `n` rollouts from each (task, prefix text) that end with the gold answer; one backend call."""
    if not items:
        return []
    outs = backend.continue_([t.prompt for t, _ in items], [p for _, p in items], cfg.rollout_sampling(seed), n=n)
    if counter is not None:
        counter.add(outs)
    return [sum(bool(t.answer_correct(p + c.text)) for c in comps) / len(comps)
            for (t, p), comps in zip(items, outs)]


def _terminal_value(work: Work, node: Node) -> float:
    ok = work.task.answer_correct(work.tree.response(node))
    if work.task.has_step_verifier:  # a right answer after a wrong step is not a right solution
        ok = bool(ok) and bool(node.correct)
    return 1.0 if ok else 0.0


def evaluate(items: Sequence[tuple[Work, Node]], backend, cfg: SearchConfig, seed: int,
             counter: TokenCounter | None = None) -> list[NodeValue]:
    """Values of the given nodes (from any number of trees) with at most one backend call."""
    if cfg.value_fn == "step_verifier":
        for w, _ in items:
            if not w.task.has_step_verifier:
                raise InputError("value_fn 'step_verifier' needs a task with an exact step check (arith)",
                                 column="meta")
        return [NodeValue(1.0 if node.correct else 0.0) for _, node in items]
    if cfg.value_fn == "rollout":
        for w, _ in items:
            if not w.task.has_gold:
                raise InputError("value_fn 'rollout' needs a gold answer (a `gold_answer` or `meta` column)",
                                 column="gold_answer")
        out: list[NodeValue | None] = [None] * len(items)
        pending = []
        for i, (w, node) in enumerate(items):
            if node.is_terminal:
                out[i] = NodeValue(_terminal_value(w, node))
            else:
                pending.append(i)
        shares = rollout_success([(items[i][0].task, items[i][0].tree.prefix_text(items[i][1])) for i in pending],
                                 backend, cfg, cfg.rollouts, seed, counter)
        for i, s in zip(pending, shares):
            out[i] = NodeValue(s, rollout_success=s)
        return out  # type: ignore[return-value]
    if cfg.value_fn == "reward_model":
        return _reward_model_values(items, cfg)
    if cfg.value_fn == "judge":
        return _judge_values(items, backend, cfg)
    if cfg.value_fn == "logprob":
        if not items:
            return []
        res = backend.logprobs([w.tree.prompt for w, _ in items], [w.tree.response(n) for w, n in items])
        return [NodeValue(math.exp(r.total / max(1, len(r.per_token)))) for r in res]
    raise InputError(f"unknown value_fn {cfg.value_fn!r}", column="value_fn")


def _model_values(items: Sequence[tuple[Work, Node]], value_of) -> list[NodeValue]:
    """Terminal nodes of a task with a gold answer take the answer check (free and exact); every other node goes
    to `value_of(those items)` in one call."""
    checked = [w.task.has_gold and node.is_terminal for w, node in items]
    asked = [i for i, c in enumerate(checked) if not c]
    values = value_of([items[i] for i in asked]) if asked else []
    out = [NodeValue(_terminal_value(w, node)) if c else None for (w, node), c in zip(items, checked)]
    for i, v in zip(asked, values):
        out[i] = v
    return out  # type: ignore[return-value]


def _reward_model_values(items: Sequence[tuple[Work, Node]], cfg: SearchConfig) -> list[NodeValue]:
    from pipeline.judges.reward_model import load_scorer  # torch + transformers: only when this value is used

    def value_of(asked: list[tuple[Work, Node]]) -> list[NodeValue]:
        scores = load_scorer(cfg.value_model).score_steps(
            [w.tree.prompt for w, _ in asked], [w.tree.prefix_text(w.tree.parent(n)) for w, n in asked],
            [n.step_text for _, n in asked])
        return [NodeValue(0.5 * (1.0 + math.tanh(s / 2))) for s in scores]  # the sigmoid, without exp's overflow
    return _model_values(items, value_of)


def _judge_values(items: Sequence[tuple[Work, Node]], backend, cfg: SearchConfig) -> list[NodeValue]:
    from pipeline.judges.config import JudgeConfig, open_judge

    def value_of(asked: list[tuple[Work, Node]]) -> list[NodeValue]:
        verdicts = open_judge(cfg.judge or JudgeConfig(), backend).step(
            [(w.tree.prompt, w.tree.trajectory(w.tree.parent(n)), n.step_text) for w, n in asked])
        return [NodeValue(0.5, error=v.error) if v.error else NodeValue(v.value) for v in verdicts]
    return _model_values(items, value_of)
