"""What a tree knows about its prompt's task, through the Task interface (pipeline/tasks): the gold answer check
and, where the task has one (the bundled arithmetic task), the exact step check.

A row names its task in its `meta` column (`prefpipe task make` writes it); a row with only a `gold_answer` is a
`math` row (math-verify); a row with neither has no gold, and only value functions that need none (log-prob)
can run on it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.tasks.base import TaskItem
from pipeline.tasks.registry import item_for_row


@dataclass
class TreeTask:
    prompt: str
    item: TaskItem

    @property
    def has_gold(self) -> bool:
        return self.item.has_gold

    @property
    def gold_answer(self) -> str | None:
        return self.item.gold_answer if self.item.has_gold else None

    @property
    def has_step_verifier(self) -> bool:
        return self.item.has_step_check

    @property
    def n_steps(self) -> int | None:
        return self.item.n_steps

    @property
    def gold_solution(self) -> str | None:
        """The full gold solution, where the task knows one (the branch path of TPO lists)."""
        return self.item.task.gold_solution(self.item.row) if self.has_gold else None

    def final_answer(self, text: str) -> str | None:
        return self.item.task.extract_answer(text) if self.item.task.has_gold else None

    def answer_correct(self, text: str) -> bool | None:
        """Whether the text's final answer is right (None when the task has no gold to check against)."""
        return self.item.correct(text) if self.has_gold else None

    def first_wrong_step(self, text: str) -> int | None:
        return self.item.first_wrong_step(text)

    def step_lines(self, text: str) -> list[str]:
        return self.item.step_lines(text)

    def gold_line(self, k: int) -> str | None:
        return self.item.gold_line(k)

    def steps_correct(self, steps: list[str], join: str, terminal: bool) -> bool | None:
        """Step verifier on a partial (or, when terminal, complete) solution. None without a verifier.

        A partial solution is right when no step so far leaves the gold path; `first_wrong_step` reports a
        missing next step as wrong at index len+1, which is not an error yet for a partial solution.
        """
        if not self.has_step_verifier:
            return None
        text = join.join(steps)
        wrong = self.item.first_wrong_step(text)
        if terminal:
            return wrong is None
        return wrong is None or wrong > len(self.item.step_lines(text))

    def node_correct(self, steps: list[str], join: str, terminal: bool) -> bool | None:
        """The `correct` flag of a node: step-verified when possible; else the answer check on terminals (a
        non-terminal node of such a task gets its label from rollouts, see stages/tree/values.py)."""
        if self.has_step_verifier:
            return self.steps_correct(steps, join, terminal)
        return self.answer_correct(join.join(steps)) if terminal else None


def task_from_row(row: dict) -> TreeTask:
    """A TreeTask from an input row (prompts table, optionally with `meta` / `gold_answer`)."""
    return TreeTask(prompt=row["prompt"], item=item_for_row(row))


def task_from_info(prompt: str, info: dict) -> TreeTask:
    """The same TreeTask rebuilt from a stored tree's `extra` (so mining needs no input table)."""
    row = {"prompt": prompt, "gold_answer": info.get("gold_answer"), "meta": info.get("meta")}
    return TreeTask(prompt=prompt, item=item_for_row(row))
