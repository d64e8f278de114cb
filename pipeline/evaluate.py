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


def _as_rows(problems: list) -> list[dict]:
    """Task rows from bundled-task Problem objects (`.id`, `.question`, `.meta_json()`); dict rows unchanged."""
    return [p if isinstance(p, dict) else {"prompt_id": p.id, "prompt": p.question, "meta": p.meta_json()}
            for p in problems]


def evaluate_task(backend: Backend, problems: list, batch_size: int = 64, max_tokens: int = 256,
                  verify=None, progress: str | None = None, task=None, system: str | None = None,
                  few_shot: list[dict] | tuple = ()) -> dict[str, Any]:
    """Greedy-decode every problem and check the final answer through its task (pipeline/tasks).

    `problems`: rows of a problems table (dicts), or bundled-task Problem objects. Each row's task is `task`
    when given, else the one its meta names; the prompt is `task.messages(row, system, few_shot)` and the check
    `task.check` (its score is kept). `verify(text, problem) -> bool` replaces the check (legacy callers).
    `progress`: a label; prints problems done, accuracy so far and an ETA every few seconds.
    Returns accuracy, ci_low, ci_high (95 % Wilson), n, correct (count), per_problem [{id, correct, score,
    difficulty, output}] in input order, and by_difficulty {bucket: {n, correct, accuracy, ci_low, ci_high}} where
    the task grades its problems.
    """
    from pipeline.tasks.registry import item_for_row

    rows = _as_rows(problems)
    items = [task.bind(r) if task is not None else item_for_row(r) for r in rows]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0)
    per_problem = []
    bar = None
    if progress:
        from pipeline.progress import ProgressLine
        bar = ProgressLine(progress, len(problems), "problems")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outs = backend.generate([_prompt(it, system, few_shot) for it in chunk], sp, n=1)
        for k, (it, out) in enumerate(zip(chunk, outs), start):
            text = out[0].text
            if verify is not None:
                ok = bool(verify(text, problems[k]))
                score = float(ok)
            else:
                c = it.check(text)
                ok, score = c.correct, c.score
            per_problem.append({"id": it.row["prompt_id"], "correct": ok, "score": score,
                                "difficulty": it.task.difficulty(it.row), "output": text})
        if bar is not None:
            bar.update(len(chunk), accuracy=sum(r["correct"] for r in per_problem) / len(per_problem))
    n = len(per_problem)
    correct = sum(r["correct"] for r in per_problem)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "ci_low": low, "ci_high": high, "n": n,
            "correct": correct, "by_difficulty": by_difficulty(per_problem), "per_problem": per_problem}


def _prompt(item, system: str | None, few_shot):
    """The plain question where there is nothing to add (char-level policies take text), else chat messages."""
    msgs = item.task.messages(item.row, system, few_shot)
    return item.row["prompt"] if len(msgs) == 1 else msgs


def by_difficulty(per_problem: list[dict]) -> dict[str, dict]:
    """Accuracy with a Wilson interval per difficulty bucket (empty when no problem has one)."""
    groups: dict[str, list[bool]] = {}
    for r in per_problem:
        if r.get("difficulty") is not None:
            groups.setdefault(str(r["difficulty"]), []).append(bool(r["correct"]))
    out = {}
    for d in sorted(groups):
        k, m = sum(groups[d]), len(groups[d])
        lo, hi = wilson_interval(k, m)
        out[d] = {"n": m, "correct": k, "accuracy": k / m, "ci_low": lo, "ci_high": hi}
    return out
