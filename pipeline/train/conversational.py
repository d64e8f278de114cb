"""TRL's conversational rows read as prefpipe's text rows: the one conversion every reader of a training table
(pipeline/train/data.py, from_export.py, data_check.py) applies before looking at the columns."""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.errors import InputError


def _is_conversation(col: pa.ChunkedArray) -> bool:
    t = col.type
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type) and \
        {"role", "content"} <= {f.name for f in t.value_type}


def from_conversational(table: pa.Table, file: str | None = None) -> pa.Table:
    """TRL's conversational format -> ours: a `prompt` list of {role, content} messages becomes
    `prompt_messages` (JSON) with `prompt` = its last user turn; `chosen`/`rejected`/`completion` lists of
    assistant messages become their text. Standard (string) columns pass through unchanged."""
    if "prompt" in table.column_names and _is_conversation(table["prompt"]):
        messages = table["prompt"].to_pylist()
        for i, m in enumerate(messages):
            if not m:
                raise InputError("empty conversation", file=file, row=i, column="prompt")
        users = [next((x["content"] for x in reversed(m) if x["role"] == "user"), m[-1]["content"])
                 for m in messages]
        table = table.set_column(table.column_names.index("prompt"), "prompt", pa.array(users, pa.string()))
        table = table.append_column("prompt_messages", pa.array([json.dumps(m) for m in messages], pa.string())) \
            if "prompt_messages" not in table.column_names else table
    for name in ("chosen", "rejected", "completion"):
        if name in table.column_names and _is_conversation(table[name]):
            texts = ["".join(x["content"] for x in (m or []) if x["role"] == "assistant")
                     for m in table[name].to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(texts, pa.string()))
    return table
