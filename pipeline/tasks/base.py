"""The Task interface: the one way stages, flows, the report and eval learn about a problem's gold.

A task makes or loads problems as an Arrow table with (at least) these columns:

    prompt_id   string   unique id
    prompt      string   the question as the user wrote it
    gold_answer string   the final answer a response must reach (null for tasks without gold)
    difficulty  string   optional grading bucket (null when the task has none)
    meta        string   JSON; its "task" key names the task (and "options" its settings), so any later stage
                         can rebuild the task from the row alone (`pipeline.tasks.registry.item_for_row`)

and answers, for a row and a response: `check` (right final answer, with the task's own score), optionally an
exact step check (`first_wrong_step`, where the task can check every line) and the gold's k-th line.
A `TaskItem` binds one row to its task so callers hold one object per problem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.errors import InputError

PROBLEM_COLUMNS = ("prompt_id", "prompt", "gold_answer", "difficulty", "meta")


@dataclass(frozen=True)
class Check:
    correct: bool
    score: float  # the task's own score in [0, 1] (1.0 / 0.0 where a task only knows right or wrong)


class Task:
    """Base class of every task. Subclasses set `name` and override what they support."""

    name: ClassVar[str] = ""
    has_gold: ClassVar[bool] = True
    has_step_check: ClassVar[bool] = False
    generates: ClassVar[bool] = False  # True: `make` draws problems; False: `load` reads them from a file
    system_prompt: str | None = None

    @property
    def options(self) -> dict:
        """The settings `get_task(self.name, **options)` rebuilds this task from (stored in each row's meta)."""
        return {}

    def meta(self, **extra) -> str:
        """The `meta` JSON of one of this task's rows."""
        opts = {"options": self.options} if self.options else {}
        return json.dumps({"task": self.name, **opts, **extra}, separators=(",", ":"), sort_keys=True,
                          default=str)

    # ---- problems ---------------------------------------------------------------------------------------------

    def make(self, n: int, split: str = "train", seed: int = 0) -> pa.Table:
        raise InputError(f"task {self.name!r} generates no problems; load them from a file (--path)",
                         column="--task")

    def load(self, path, limit: int | None = None, prompt_column: str | None = None,
             answer_column: str | None = None) -> pa.Table:
        raise InputError(f"task {self.name!r} reads no files; it generates its problems (use --n / size)",
                         column="--task")

    # ---- prompts ----------------------------------------------------------------------------------------------

    def messages(self, row: dict, system: str | None = None, few_shot: list[dict] | tuple = ()) -> list[dict]:
        """Chat messages for a row: an optional system prompt (the argument, else the task's), then each
        few-shot example (a row with a `gold` or `gold_answer` to show) as a user/assistant turn, then the row."""
        msgs = []
        sys_text = system if system is not None else self.system_prompt
        if sys_text:
            msgs.append({"role": "system", "content": sys_text})
        for ex in few_shot:
            msgs.append({"role": "user", "content": ex["prompt"]})
            msgs.append({"role": "assistant", "content": self.shown_solution(ex)})
        msgs.append({"role": "user", "content": row["prompt"]})
        return msgs

    def shown_solution(self, row: dict) -> str:
        """What a few-shot example shows as its answer: the full gold solution when there is one."""
        return row.get("gold") or f"The answer is {row.get('gold_answer')}."

    # ---- checks -----------------------------------------------------------------------------------------------

    def extract_answer(self, response: str) -> str | None:
        """The final answer a response states (None when it states none)."""
        raise NotImplementedError

    def check(self, response: str, row: dict) -> Check:
        raise InputError(f"task {self.name!r} has no gold answers to check against", column="gold_answer")

    def first_wrong_step(self, response: str, row: dict) -> int | None:
        """1-based index of the first wrong step (n_steps + 1 = the answer line), None when all is right.
        Only tasks with `has_step_check`."""
        raise NotImplementedError(f"task {self.name!r} has no exact step check")

    def step_lines(self, text: str) -> list[str]:
        """The lines of a response that count as steps (default: every non-blank line)."""
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    def gold_line(self, row: dict, k: int) -> str | None:
        """The right k-th line of a solution (1-based), where the task knows it; None otherwise."""
        return None

    def n_steps(self, row: dict) -> int | None:
        return None

    def gold_solution(self, row: dict) -> str | None:
        """The full gold solution text, where the row has one (its `gold` column by default)."""
        return row.get("gold")

    def difficulty(self, row: dict) -> str | None:
        """The row's grading bucket for per-difficulty eval (its `difficulty` column by default)."""
        d = row.get("difficulty")
        return None if d is None else str(d)

    def gold_answer(self, row: dict) -> str | None:
        """The row's `gold_answer` column, else the one its meta carries (pairs keep meta, not gold_answer)."""
        g = row.get("gold_answer")
        if g is None:
            g = meta_dict(row.get("meta")).get("gold_answer")
        return None if g is None else str(g)

    def row_has_gold(self, row: dict) -> bool:
        """Whether `check` can judge this row (a gold answer, or whatever else the task scores with)."""
        return self.has_gold and self.gold_answer(row) is not None

    def validate_row(self, row: dict) -> None:
        """Raise InputError when the row lacks what the checks need (so stages fail before any model call)."""

    def bind(self, row: dict) -> "TaskItem":
        self.validate_row(row)
        return TaskItem(self, row)


@dataclass
class TaskItem:
    """One problem row bound to its task: what stages hold per prompt."""

    task: Task
    row: dict
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def has_gold(self) -> bool:
        return self.task.row_has_gold(self.row)

    @property
    def has_step_check(self) -> bool:
        return self.task.has_step_check

    @property
    def gold_answer(self) -> str | None:
        return self.task.gold_answer(self.row)

    @property
    def n_steps(self) -> int | None:
        return self.task.n_steps(self.row)

    def check(self, response: str) -> Check:
        key = ("check", response)
        if key not in self._cache:  # stages ask the same text twice (chosen pools, rollouts, reports)
            self._cache[key] = self.task.check(response, self.row)
        return self._cache[key]

    def correct(self, response: str) -> bool:
        return self.check(response).correct

    def first_wrong_step(self, response: str) -> int | None:
        return self.task.first_wrong_step(response, self.row)

    def steps_ok(self, response: str) -> bool:
        """Every step and the answer right: the exact step check where there is one, else the answer check."""
        return self.first_wrong_step(response) is None if self.has_step_check else self.correct(response)

    def step_lines(self, text: str) -> list[str]:
        return self.task.step_lines(text)

    def gold_line(self, k: int) -> str | None:
        return self.task.gold_line(self.row, k)


def meta_dict(meta: Any) -> dict:
    """A row's meta column as a dict ({} when absent); a malformed one is an InputError naming the column."""
    if meta is None or meta == "":
        return {}
    if isinstance(meta, dict):
        return meta
    try:
        d = json.loads(meta)
    except (TypeError, ValueError) as e:
        raise InputError(f"meta is not JSON ({e})", column="meta") from None
    if not isinstance(d, dict):
        raise InputError(f"meta is not a JSON object (got {type(d).__name__})", column="meta")
    return d


def problems_table(rows: list[dict], extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    """A problems table with the standard columns (then any `extra` typed columns) from row dicts."""
    schema = [pa.field(c, pa.string()) for c in PROBLEM_COLUMNS]
    schema += [pa.field(k, t) for k, t in (extra or {}).items()]
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in schema},
                    schema=pa.schema(schema))
