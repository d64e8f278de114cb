"""`arith`: the bundled arithmetic word problems (pipeline/tasks/arith.py) behind the Task interface, with the
exact step check of pipeline/tasks/verify.py."""
from __future__ import annotations

import functools

import pyarrow as pa
from pydantic import ValidationError

from pipeline.errors import InputError
from pipeline.tasks.arith import Problem, TaskConfig, make_split, problems_to_table
from pipeline.tasks.base import Check, Task
from pipeline.tasks import verify


@functools.lru_cache(maxsize=8192)
def _problem(meta: str) -> Problem:
    return verify.problem_from_meta(meta)


class ArithTask(Task):
    name = "arith"
    has_step_check = True
    generates = True

    def __init__(self, preset: str = "tiny", **overrides):
        if preset not in ("tiny", "default"):
            raise InputError(f"unknown arith preset {preset!r}: expected tiny or default", column="preset")
        try:
            self.config = TaskConfig.tiny(**overrides) if preset == "tiny" else TaskConfig(**overrides)
        except ValidationError as e:
            raise InputError(f"invalid arith settings: {e.errors()[0]['msg']}") from None

    def problem(self, row: dict) -> Problem:
        """The row's Problem, rebuilt from its `meta` (the arith generator's record)."""
        meta = row.get("meta")
        if not meta:
            raise InputError("an arith row needs its 'meta' record (made by `prefpipe task make`)", column="meta")
        return _problem(meta) if isinstance(meta, str) else verify.problem_from_meta(meta)

    def validate_row(self, row: dict) -> None:
        self.problem(row)

    def make(self, n: int, split: str = "train", seed: int | None = None) -> pa.Table:
        cfg = self.config if seed is None else self.config.model_copy(update={"seed": seed})
        return problems_to_table(make_split(cfg, split, n))

    def load(self, path, limit=None, prompt_column=None, answer_column=None) -> pa.Table:
        from pipeline.tasks.loaders import load_prompts

        table = load_prompts(path)
        verify.problems_from_table(table)  # every meta record must rebuild (errors name the row)
        return table.slice(0, limit) if limit else table

    def shown_solution(self, row: dict) -> str:
        return self.problem(row).gold_solution

    def gold_solution(self, row: dict) -> str | None:
        return self.problem(row).gold_solution

    def extract_answer(self, response: str) -> str | None:
        a = verify.extract_answer(response)
        return None if a is None else str(a)

    def gold_answer(self, row: dict) -> str | None:
        g = row.get("gold_answer")
        return str(self.problem(row).answer) if g is None else str(g)

    def check(self, response: str, row: dict) -> Check:
        # the "Answer: N" line against the row's gold_answer column where it has one, else its problem's answer
        ok = self.extract_answer(response) == self.gold_answer(row).strip()
        return Check(ok, float(ok))

    def first_wrong_step(self, response: str, row: dict) -> int | None:
        return verify.first_wrong_step(response, self.problem(row))

    def step_lines(self, text: str) -> list[str]:
        return verify.step_lines(text)

    def gold_line(self, row: dict, k: int) -> str | None:
        return self.problem(row).gold_line(k)

    def n_steps(self, row: dict) -> int | None:
        return self.problem(row).n_steps

    def difficulty(self, row: dict) -> str | None:
        return f"{self.problem(row).n_steps} steps"
