"""Step labels from rollouts, for tasks with no exact step check (Math-Shepherd / Tree-PLV style).

A prefix of a response (its first k lines) is worth the share of N rollouts continued from it whose full
text (prefix + rollout) the task checks as right. A step is right when a rollout from the prefix that ends with
it can still reach a right answer (share > 0, Math-Shepherd's hard estimate), so the first wrong step is the
first line whose prefix has share 0 while the prefix before it had share > 0. The budget is N rollouts per
prefix; every prefix of every response goes to ONE `continue_` call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class PrefixValue:
    share: float                # share of rollouts whose prefix + rollout is right
    right: list[str]            # those full texts (prefix + rollout), in sampling order


def prefix_values(backend, jobs: Sequence[tuple[str, str, Callable[[str], bool]]], sampling, n: int
                  ) -> list[PrefixValue]:
    """For each (prompt, assistant prefix, check): N rollouts from the prefix, in one backend call."""
    if not jobs:
        return []
    outs = backend.continue_([p for p, _, _ in jobs], [pre for _, pre, _ in jobs], sampling, n=n)
    values = []
    for (_, pre, check), comps in zip(jobs, outs):
        right = [pre + c.text for c in comps if check(pre + c.text)]
        values.append(PrefixValue(len(right) / max(1, len(comps)), right))
    return values


def first_wrong_line(shares: Sequence[float]) -> int | None:
    """`shares[k]` is the value of the first k lines (k = 0: nothing written yet). The 1-based index of the first
    line after which no rollout reaches a right answer, or None when there is no such line or the prompt itself
    (k = 0) already reaches none (then no line is to blame)."""
    if not shares or shares[0] == 0:
        return None
    for k in range(1, len(shares)):
        if shares[k] == 0:
            return k
    return None
