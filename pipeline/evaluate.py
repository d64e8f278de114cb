"""Greedy accuracy of a model on task problems, with a 95 % Wilson interval (used by `prefpipe eval`, the
trainer's eval hook and the flows)."""
from __future__ import annotations

import math
from typing import Any

from pipeline.backends.base import Backend, SamplingParams


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95 %). Unlike the normal interval it stays
    inside [0, 1] and is sensible at 0 % and 100 %."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_task(backend: Backend, problems: list, batch_size: int = 64, max_tokens: int = 256,
                  verify=None) -> dict[str, Any]:
    """Greedy-decode every problem's question and verify the final answer.

    `problems` are task problems with `.id`, `.question` and `.answer` (pipeline.tasks.arith.Problem);
    `verify(text, problem) -> bool` defaults to the bundled task's answer verifier.
    Returns accuracy, ci_low, ci_high (95 % Wilson), n, correct (count) and per_problem
    [{id, correct, output}] in input order.
    """
    if verify is None:
        from pipeline.tasks.verify import verify_answer as verify
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    per_problem = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        outs = backend.generate([p.question for p in chunk], sp, n=1)
        for p, out in zip(chunk, outs):
            text = out[0].text
            per_problem.append({"id": p.id, "correct": bool(verify(text, p)), "output": text})
    n = len(per_problem)
    correct = sum(r["correct"] for r in per_problem)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "ci_low": low, "ci_high": high, "n": n,
            "correct": correct, "per_problem": per_problem}
