"""Tasks by name: `get_task("math")`, `get_task("reasoning-gym:chain_sum", min_terms=3)`, and the task of a row.

A row names its task in its `meta` JSON ("task", plus "options" where the task has settings). Rows written
before tasks had names still resolve: a meta with arithmetic `ops` is `arith`, a row with only a `gold_answer` is
`math`, a row with neither is `prompts`. Third-party tasks join with `register_task(name, factory)`.
"""
from __future__ import annotations

import functools
import importlib
import json
from typing import Callable

from pipeline.errors import InputError
from pipeline.tasks.base import Task, TaskItem, meta_dict

# name -> "module:class" inside this package; imported on first use (reasoning-gym is slow to import).
_BUILTIN = {
    "arith": "pipeline.tasks.arith_task:ArithTask",
    "math": "pipeline.tasks.math_task:MathTask",
    "prompts": "pipeline.tasks.prompts_task:PromptsTask",
}
GYM_PREFIX = "reasoning-gym:"
_FACTORIES: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Add a task: `factory(**options)` returns a Task whose `name` is `name`."""
    _FACTORIES[name] = factory


def task_names() -> list[str]:
    return sorted({*_BUILTIN, *_FACTORIES, GYM_PREFIX + "<dataset>"})


def _factory(name: str) -> Callable[..., Task]:
    if name in _FACTORIES:
        return _FACTORIES[name]
    if name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), cls)
    if name.startswith(GYM_PREFIX):
        from pipeline.tasks.gym_task import GymTask

        return functools.partial(GymTask, name[len(GYM_PREFIX):])
    raise InputError(f"unknown task {name!r}; known: {', '.join(task_names())}", column="task")


@functools.lru_cache(maxsize=64)
def _cached(name: str, options_json: str) -> Task:
    return _factory(name)(**json.loads(options_json))


def get_task(name: str, **options) -> Task:
    """The task called `name` with these settings (one instance per name and settings per process)."""
    return _cached(name, json.dumps(options, sort_keys=True, default=str))


def task_of_row(row: dict) -> Task:
    """The task a row belongs to (see the module docstring for rows without a task name)."""
    meta = meta_dict(row.get("meta"))
    name = meta.get("task")
    if name is None:
        name = "arith" if "ops" in meta else ("math" if row.get("gold_answer") is not None else "prompts")
    if name == "arith":
        return get_task("arith")  # a row rebuilds its problem from meta; generator settings do not matter
    return get_task(name, **(meta.get("options") or {}))


def item_for_row(row: dict) -> TaskItem:
    """The row bound to its task; a bad meta record is an InputError naming the column and the prompt_id."""
    try:
        return task_of_row(row).bind(row)
    except InputError as e:
        raise InputError(f"{e.reason} (prompt_id {row.get('prompt_id')!r})", column=e.column or "meta") from None

