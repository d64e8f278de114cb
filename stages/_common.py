"""Small helpers the stage modules share: pair ids, timestamps and a row's task item.

Pair tables are built by schemas.pairs.make_pairs (the pair contract's one constructor).
"""
from __future__ import annotations

import datetime as dt
import hashlib


def pair_id(stage: str, prompt_id: str, chosen: str, rejected: str, system: str | None = None) -> str:
    """sha1(stage|prompt_id|chosen|rejected|system), the pair id every stage writes."""
    return hashlib.sha1("|".join([stage, prompt_id, chosen, rejected, system or ""]).encode()).hexdigest()


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def task_item(record: dict):
    """The row bound to its task (pipeline.tasks: `check`, `first_wrong_step`, `gold_line`...) when the row has
    gold to check against, else None; a bad `meta` record is an InputError naming the column and the prompt_id
    (stages call this before any model call)."""
    from pipeline.tasks.registry import item_for_row

    item = item_for_row(record)
    return item if item.has_gold else None
