"""A small valid pairs table for input-validation tests: three rows, one of them a step pair with a shared
prefix; `over` replaces whole columns to make it malformed in one place."""
import datetime as dt

import pyarrow as pa

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def pairs_table(**over) -> pa.Table:
    base = {"pair_id": ["a", "b", "c"], "prompt_id": ["p", "p", "q"], "prompt": ["x", "x", "y"],
            "shared_prefix": [None, "S", None], "chosen": ["c1", "S c2", "c3"], "rejected": ["r1", "S r2", "r3"],
            "stage": ["tree"] * 3, "method": ["m"] * 3, "chosen_score": [1.0, 1.0, None],
            "rejected_score": [0.0, 0.5, None], "score_margin": [1.0, 0.5, None], "generator_model": ["g"] * 3,
            "created_at": [NOW] * 3, "extra": ["{}"] * 3, "row_key": ["k1", "k2", "k3"], "status": ["ok"] * 3}
    base.update(over)
    return pa.table(base)
