"""Counts of a stage's output for tests: rows, status counts, error categories (the first word of `error`, as the
run report reads them, flows/judged.py) and the ok share."""
from collections import Counter

import pyarrow as pa

from stages._judge import error_category


def parse_report(table: pa.Table) -> dict:
    status = Counter(table.column("status").to_pylist()) if "status" in table.column_names else Counter()
    cats = Counter(c for c in map(error_category, table.column("error").to_pylist()) if c) \
        if "error" in table.column_names else Counter()
    n = table.num_rows
    return {"rows": n, "status": dict(status), "errors": dict(cats),
            "ok_rate": status.get("ok", 0) / n if n else 0.0}
