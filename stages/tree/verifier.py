"""What a tree knows about its prompt's task: the gold answer and, on the bundled task, an exact step verifier.

Input rows of the bundled task (`prefpipe task make`) carry a `meta` column from which the Problem is rebuilt,
so every step line can be checked exactly. Other prompt sets may carry `gold_answer` only: then answers are
checked and steps are not. Without either, only value functions that need no gold (log-prob) can run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.tasks.arith import Problem
from pipeline.tasks.verify import extract_answer, first_wrong_step, problem_from_meta, step_lines

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The stated final answer: an "Answer: N" line, else the last \\boxed{}, else the last number."""
    a = extract_answer(text)
    if a is not None:
        return str(a)
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def same_answer(a: str | None, gold: str) -> bool:
    if a is None:
        return False
    try:
        return float(a.replace(",", "")) == float(gold.replace(",", ""))
    except ValueError:
        return a.strip() == gold.strip()


@dataclass
class TreeTask:
    prompt: str
    gold_answer: str | None = None
    problem: Problem | None = None

    @property
    def has_step_verifier(self) -> bool:
        return self.problem is not None

    def answer_correct(self, text: str) -> bool | None:
        """Whether the text's final answer is the gold one (None when there is no gold answer)."""
        if self.gold_answer is None:
            return None
        return same_answer(final_answer(text), self.gold_answer)

    def steps_correct(self, steps: list[str], join: str, terminal: bool) -> bool | None:
        """Step verifier on a partial (or, when terminal, complete) solution. None without a verifier.

        A partial solution is right when no step so far leaves the gold path; `first_wrong_step` reports a
        missing next step as wrong at index len+1, which is not an error yet for a partial solution.
        """
        if self.problem is None:
            return None
        text = join.join(steps)
        wrong = first_wrong_step(text, self.problem)
        if terminal:
            return wrong is None
        return wrong is None or wrong > len(step_lines(text))

    def node_correct(self, steps: list[str], join: str, terminal: bool) -> bool | None:
        """The `correct` flag of a node: step-verified when possible; else the answer check on terminals."""
        if self.problem is not None:
            return self.steps_correct(steps, join, terminal)
        return self.answer_correct(join.join(steps)) if terminal else None


def task_from_row(row: dict) -> TreeTask:
    """A TreeTask from an input row (prompts table, optionally with the task's `meta` / `gold_answer`)."""
    problem = problem_from_meta(row["meta"]) if row.get("meta") else None
    gold = row.get("gold_answer")
    if gold is None and problem is not None:
        gold = str(problem.answer)
    return TreeTask(prompt=row["prompt"], gold_answer=None if gold is None else str(gold), problem=problem)


def task_from_info(prompt: str, info: dict) -> TreeTask:
    """The same TreeTask rebuilt from a stored tree's `extra` (so mining needs no input table)."""
    problem = problem_from_meta(info["meta"]) if info.get("meta") else None
    return TreeTask(prompt=prompt, gold_answer=info.get("gold_answer"), problem=problem)
