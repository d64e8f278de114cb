"""Raw scored pairs (prompt_id, prompt, chosen, rejected, chosen_score, rejected_score, any other columns) as a
pairs table for reward-relabel's tests: the raw columns as they are, then the pipeline columns they lack."""
import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc

from schemas.pairs import UNKNOWN_MODEL
from schemas.tables import PAIRS
from stages._common import pair_id


def as_pair_input(table: pa.Table) -> pa.Table:
    """`table` with pair_id (= row_key) from prompt_id, chosen and rejected, stage `synthetic`, method `input`,
    score_margin when both scores are given, and the required provenance columns."""
    n = table.num_rows
    cols = set(table.column_names)
    ids, chosen, rejected = (table[c].to_pylist() for c in ("prompt_id", "chosen", "rejected"))
    fill = {
        "pair_id": [pair_id("input", p, c, r) for p, c, r in zip(ids, chosen, rejected)],
        "stage": ["synthetic"] * n, "method": ["input"] * n, "generator_model": [UNKNOWN_MODEL] * n,
        "created_at": [dt.datetime.now(dt.timezone.utc)] * n, "extra": ["{}"] * n, "status": ["ok"] * n,
    }
    fill["row_key"] = fill["pair_id"]
    if {"chosen_score", "rejected_score"} <= cols:
        fill["score_margin"] = pc.subtract(table["chosen_score"], table["rejected_score"]).to_pylist()
    for name, values in fill.items():
        if name not in cols:
            t = PAIRS.field(name).type
            arr = pa.array(values, pa.string()).dictionary_encode().cast(t) if pa.types.is_dictionary(t) \
                else pa.array(values, t)
            table = table.append_column(pa.field(name, t), arr)
    return table
