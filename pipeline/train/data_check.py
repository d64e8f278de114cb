"""`train` refuses what `prefpipe validate` refuses: the same `schemas.validate`, run on a training table.

A training table need not carry the whole PAIRS / RANKED_LISTS schema (TRL-style files have only prompt,
chosen and rejected), so the declared columns it lacks are filled with neutral stand-ins (a row number for
the unique keys, "-" for names, "{}" for `extra`, the epoch for `created_at`) before the check; every column
it has is checked as `validate` checks it: chosen == rejected, empty chosen/rejected, NaN or infinite scores,
label_confidence outside [0, 1], duplicate pair_id/row_key, non-JSON extra, null list items, bad status.
The check runs on the table as read, before failed rows are dropped, so rows are numbered as in the file.
"""
from __future__ import annotations

import datetime as dt

import pyarrow as pa

from schemas import schema_for, validate

# what makes a table a pair or a list table; without these columns (e.g. an SFT table) nothing is checked here
_NEEDS = {"pairs": ("prompt", "chosen", "rejected"), "lists": ("prompt", "responses", "scores")}
_UNIQUE = ("pair_id", "row_key", "prompt_id")


def table_kind(table: pa.Table) -> str | None:
    for kind in ("lists", "pairs"):
        if all(c in table.column_names for c in _NEEDS[kind]):
            return kind
    return None


def _stand_in(name: str, type_: pa.DataType, n: int) -> pa.Array:
    if name in _UNIQUE:
        return pa.array([f"row-{i}" for i in range(n)], pa.string())
    if name == "status":
        return pa.array(["ok"] * n, pa.string())
    if name == "extra":
        return pa.array(["{}"] * n, pa.string())
    if pa.types.is_timestamp(type_):
        return pa.array([dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)] * n, type_)
    return pa.array(["-"] * n, pa.string())


def check_training_table(table: pa.Table, file: str | None = None) -> None:
    """Raise the InputError `prefpipe validate --kind pairs|lists` would raise on this table (naming file, row
    and column); nothing for tables that are neither (SFT)."""
    from pipeline.train.conversational import from_conversational  # TRL's message lists -> text, as training sees them

    kind = table_kind(table)
    if kind is None:
        return
    table = from_conversational(table, file)
    for field in schema_for(kind):
        if field.name not in table.column_names and not field.nullable:
            table = table.append_column(field.name, _stand_in(field.name, field.type, table.num_rows))
    validate(table, kind, file=file)
