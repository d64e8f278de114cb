"""Structural checks of a TREES table's `nodes` lists: every tree is a tree.

Mining walks parent chains (Tree.path, Tree.ancestors) with no bound, so a parent cycle would loop forever
and a dangling parent would raise a KeyError deep inside a stage. `validate(..., "trees")` runs these checks,
which is also what the engine runs on a stage's input before mining.

Per tree: node ids are unique; the root is node "0" with no parent, and it is the only node without one;
every other parent id names a node of the same tree; and following parents from any node reaches the root
(no cycle). The cycle check is vectorised pointer doubling: after k rounds each node points at its 2^k-th
ancestor (the root points at itself), so ceil(log2(n)) + 1 rounds reach the root from any node that has a
path to it; a node still pointing elsewhere sits on or below a cycle.
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from schemas.problems import Problems

ROOT_ID = "0"


def check_trees(table: pa.Table, problems) -> None:
    """Add (row, column, message) problems for malformed trees of a conformed TREES table."""
    nodes = table.column("nodes").combine_chunks()
    flat = nodes.flatten()
    if not len(flat):
        return
    df = pl.DataFrame({"row": pc.list_parent_indices(nodes).to_numpy(),
                       "node_id": flat.field("node_id"), "parent_id": flat.field("parent_id")}
                      ).with_row_index("idx")
    dup = df.filter(pl.struct("row", "node_id").is_duplicated()).head(1)
    if dup.height:
        r = dup.row(0, named=True)
        problems.add(r["row"], "nodes.node_id", f"duplicate node id {r['node_id']!r} in one tree")
        return  # parent links are ambiguous: the checks below would only repeat this problem
    roots = df.filter(pl.col("parent_id").is_null())
    bad_root = roots.filter(pl.col("node_id") != ROOT_ID).head(1)
    if bad_root.height:
        r = bad_root.row(0, named=True)
        problems.add(r["row"], "nodes.parent_id", f"node {r['node_id']!r} has no parent but is not the root "
                                                  f"{ROOT_ID!r}")
    rootless = df.select("row").unique().join(roots.select("row"), on="row", how="anti").sort("row").head(1)
    if rootless.height:
        problems.add(rootless["row"][0], "nodes", f"the tree has no root node {ROOT_ID!r} without a parent")
    linked = df.join(df.select("row", pl.col("node_id").alias("parent_id"), pl.col("idx").alias("parent_idx")),
                     on=["row", "parent_id"], how="left").sort("idx")
    orphan = linked.filter(pl.col("parent_id").is_not_null() & pl.col("parent_idx").is_null()).head(1)
    if orphan.height:
        r = orphan.row(0, named=True)
        problems.add(r["row"], "nodes.parent_id", f"node {r['node_id']!r} names parent {r['parent_id']!r}, "
                                                  "which is not in its tree")
        return
    up = linked.select(pl.col("parent_idx").fill_null(pl.col("idx")))["parent_idx"].to_numpy()  # root: itself
    for _ in range(int(np.ceil(np.log2(len(up) + 1))) + 1):
        up = up[up]
    is_root = linked["parent_id"].is_null().to_numpy()
    stuck = np.flatnonzero(~is_root[up])
    if len(stuck):
        r = linked.row(int(stuck[0]), named=True)  # sorted by idx = 0..n-1: position is idx
        problems.add(r["row"], "nodes.parent_id", f"parent cycle: following parents from node "
                                                  f"{r['node_id']!r} never reaches the root")


def require_trees(table: pa.Table, file: str | None = None) -> None:
    """Raise the InputError `validate` would raise for the first malformed tree (structure only: mining's own
    callers may hold the same tree twice, which the stage input check refuses by its duplicate row_key)."""
    problems = Problems(file)
    check_trees(table, problems)
    problems.raise_if_any()
