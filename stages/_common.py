"""Small helpers the stage modules share: pair ids, timestamps, and building a PAIRS table with stage columns.

Kept tiny on purpose (one job: turn a list of row dicts into a table that validates as `pairs`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json

import pyarrow as pa

from schemas.errors import InputError
from schemas.tables import PAIRS


def pair_id(stage: str, prompt_id: str, chosen: str, rejected: str, system: str | None = None) -> str:
    """sha1(stage|prompt_id|chosen|rejected|system), the pair id every stage writes."""
    return hashlib.sha1("|".join([stage, prompt_id, chosen, rejected, system or ""]).encode()).hexdigest()


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def pairs_table(rows: list[dict], stage_fields: list[pa.Field]) -> pa.Table:
    """PAIRS columns (missing nullable ones as nulls) then the stage's typed columns, from row dicts.

    A dict value for `extra` is dumped to JSON here, so stages pass plain dicts.
    """
    schema = pa.schema(list(PAIRS) + list(stage_fields))
    cols = {f.name: [] for f in schema}
    for r in rows:
        for name in cols:
            v = r.get(name)
            if name == "extra" and not isinstance(v, str):
                v = json.dumps(v or {}, sort_keys=True, ensure_ascii=False)
            cols[name].append(v)
    arrays = []
    for f in schema:
        values = cols[f.name]
        if pa.types.is_dictionary(f.type):
            arrays.append(pa.array(values, pa.string()).dictionary_encode().cast(f.type))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def task_item(record: dict):
    """The row bound to its task (pipeline.tasks: `check`, `first_wrong_step`, `gold_line`...) when the row has
    gold to check against, else None; a bad `meta` record is an InputError naming the column and the prompt_id
    (stages call this before any model call)."""
    from pipeline.tasks.registry import item_for_row

    item = item_for_row(record)
    return item if item.has_gold else None
