"""`prefpipe train --data EXPORT[@CONFIG]`: train on an export folder of `prefpipe export`.

The rows are turned back into the store rows they came from, so tokenization is the same code path, and the
token ids are the same, as training on the run's stage table:
- conversational configs: TRL's messages -> `prompt` (the last user turn) + `prompt_messages` (the
  conversation), `chosen` / `rejected` the assistant texts (conversational.from_conversational);
- standard configs: the templated `prompt` text is dropped, the conversation it renders (`prompt_messages`)
  is kept, so the trainer applies the policy's template itself;
- step configs (`-steps`): as standard, and `chosen` / `rejected` get their `shared_prefix` back (train them
  with `prefix_as_prompt`, which scores the step alone after the prefix, as the export's prompt holds it);
- messages configs (SFT): the last assistant turn becomes `completion`, the turns before it the prompt.

Without `@CONFIG` the export's default config is read; always its `train` split.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.hub_out import LISTING, inside
from pipeline.train.conversational import from_conversational


def export_target(path: str | Path) -> tuple[Path, str | None] | None:
    """(export folder, config or None) when `path` names an export (`FOLDER` or `FOLDER@CONFIG`), else None."""
    p, config = Path(path), None
    if not p.exists() and "@" in p.name:
        p, config = p.parent / p.name.split("@", 1)[0], p.name.split("@", 1)[1]
    return (p, config) if (p / LISTING).is_file() else None


def read_export(folder: Path, config: str | None = None, split: str = "train") -> pa.Table:
    listing_path = folder / LISTING
    try:
        listing = json.loads(listing_path.read_text(encoding="utf-8"))
        configs, files = listing["configs"], listing["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"unreadable export listing ({e})", file=str(listing_path)) from None
    if config is None:
        config = next((n for n, c in configs.items() if c.get("default")), None)
    if config not in configs:
        raise InputError(f"no config {config!r} in this export; it has {sorted(configs)}", file=str(folder))
    prefix = f"data/{config}/{split}-"
    shards = [inside(folder, Path(f), "export listing entry", str(listing_path))
              for f in sorted(files) if f.startswith(prefix)]
    if not shards:
        raise InputError(f"config {config!r} has no {split} split", file=str(folder))
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    return store_rows(table, configs[config]["format"], file=str(folder / "data" / config))


def _prompt_from_messages(table: pa.Table) -> pa.Table:
    """A string-prompt config: the prompt becomes the last user turn of `prompt_messages` again."""
    users = [next(m["content"] for m in reversed(json.loads(x)) if m["role"] == "user")
             for x in table.column("prompt_messages").to_pylist()]
    return table.set_column(table.column_names.index("prompt"), "prompt", pa.array(users, pa.string()))


def store_rows(table: pa.Table, fmt: str, file: str | None = None) -> pa.Table:
    if fmt == "messages":
        convs = table.column("messages").to_pylist()
        for i, m in enumerate(convs):
            if not m or m[-1]["role"] != "assistant":
                raise InputError("a conversation must end with an assistant turn", file=file, row=i,
                                 column="messages")
        prompt = pa.array([m[:-1] for m in convs], table.schema.field("messages").type)
        table = table.drop(["messages"]).append_column("prompt", prompt).append_column(
            "completion", pa.array([m[-1]["content"] for m in convs], pa.string()))
        return from_conversational(table, file)
    if fmt == "conversational":
        return from_conversational(table, file)
    table = _prompt_from_messages(table)
    if fmt == "step":
        prefix = pc.fill_null(table.column("shared_prefix"), "")
        for side in ("chosen", "rejected"):
            joined = pc.binary_join_element_wise(prefix, table.column(side), "")
            table = table.set_column(table.column_names.index(side), side, joined)
    return table
