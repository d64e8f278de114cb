"""The declared score scale of pair and list rows (score_min, score_max): checked where a table declares it.

Consumers map scores through this scale (reward-relabel onto its template's 1-10, TPO's list labels onto
[0, 1]), so a score outside it would be mapped outside the target scale: such input is refused at the boundary.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.tables import SCORE_MAX, SCORE_MIN

SCORED_COLUMNS = {"pairs": ("chosen_score", "rejected_score"), "lists": ("scores",)}


def check_score_range(table: pa.Table, kind: str, problems) -> None:
    """On ok rows that declare a scale: both ends given, score_min < score_max, and every score inside."""
    scored = SCORED_COLUMNS.get(kind, ())
    if not scored or not {SCORE_MIN, SCORE_MAX} <= set(table.column_names):
        return
    import polars as pl

    extra = ["status"] if "status" in table.column_names else []
    df = pl.from_arrow(table.select([SCORE_MIN, SCORE_MAX, *scored, *extra])).with_row_index("_row")
    if extra:
        df = df.filter(pl.col("status") == "ok")
    lo, hi = pl.col(SCORE_MIN), pl.col(SCORE_MAX)
    slack = 1e-9 * (hi - lo).abs()  # float rounding of a score computed on the scale's ends
    checks = [(SCORE_MAX, lo.is_null() != hi.is_null(), lambda r: "score_min and score_max are declared together"),
              (SCORE_MAX, lo >= hi, lambda r: f"score_max {r[SCORE_MAX]:g} is not above score_min {r[SCORE_MIN]:g}")]
    for col in scored:
        low, high = (pl.col(col).list.min(), pl.col(col).list.max()) if kind == "lists" else (pl.col(col),) * 2
        checks.append((col, (low < lo - slack) | (high > hi + slack),
                       lambda r, col=col: f"{col} {r[col]} is outside the declared range "
                                          f"[{r[SCORE_MIN]:g}, {r[SCORE_MAX]:g}]"))
    for column, bad, message in checks:
        hit = df.filter(bad.fill_null(False)).head(1)
        if hit.height:
            row = hit.row(0, named=True)
            problems.add(row["_row"], column, message(row))
