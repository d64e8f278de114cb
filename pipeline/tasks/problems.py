"""One entry point from a task name (+ a file or a size) to a problems table, shared by `prefpipe task make`,
`prefpipe eval` and the run config's inputs / eval sections."""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.tasks.base import Task
from pipeline.tasks.registry import get_task


def parse_options(pairs: list[str] | None, column: str = "--option") -> dict:
    """`key=value` strings to a dict; a value is read as JSON when it parses (3, true, [1, 2]), else as text."""
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise InputError(f"expected key=value, got {p!r}", column=column)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def load_problems(task: str, *, path=None, n: int | None = None, split: str = "train", seed: int | None = None,
                  limit: int | None = None, prompt_column: str | None = None, answer_column: str | None = None,
                  options: dict | None = None) -> tuple[Task, pa.Table]:
    """The task and its problems: read from `path` when given (math, prompts, arith files), else generated
    (`n` problems of `split` under `seed`: arith, reasoning-gym). `limit` keeps the first rows."""
    t = get_task(task, **(options or {}))
    if path is not None:
        table = t.load(path, limit=limit, prompt_column=prompt_column, answer_column=answer_column)
    else:
        if prompt_column or answer_column:
            raise InputError("--prompt-column / --answer-column need a file (--path)", column="--prompt-column")
        size = n if n is not None else limit
        if size is None:
            raise InputError(f"task {task!r} generates its problems: give a size (n / size / limit)", column="n")
        table = t.make(size, split) if seed is None else t.make(size, split, seed)
        if limit is not None:
            table = table.slice(0, limit)
    if table.num_rows == 0:
        raise InputError(f"task {task!r} gave no problems", column="task")
    return t, table
