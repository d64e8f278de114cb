"""The pair table's contract beyond its core columns: named optional column groups, and `make_pairs`, the one
constructor every stage builds pair tables with.

A group is a set of columns that only mean something together (the step group's terminal flags describe the
two sides of a pair that share `shared_prefix`). A stage declares the groups it fills; `make_pairs` lays out
PAIRS, then every column of those groups, then the stage's own columns, so two stages that fill a group write
it with the same names, types and meaning. Transforms (select, relabel, mine) carry every group of their input
through (`groups_of`). The trainer reads group columns by the names declared here.

`make_pairs` is also the one place a value a stage leaves out is filled in (`ROW_DEFAULTS`, one default per
column), so two stages never write "unknown" and "" for the same missing model; `model_name` is the one fallback
for a model id a backend (or judge) does not report.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import pyarrow as pa

from schemas.tables import PAIRS, SCORE_MAX, SCORE_MIN, SCORE_RANGE

# Column names other layers read (pipeline/train/data.py, stages/reward_relabel.py); SCORE_MIN and SCORE_MAX
# come from schemas.tables, which lists share.
SHARED_PREFIX = "shared_prefix"
CHOSEN_IS_TERMINAL = "chosen_is_terminal"
REJECTED_IS_TERMINAL = "rejected_is_terminal"
RATIONALE = "rationale"
RATIONALE_PROMPT = "rationale_prompt"
META = "meta"
PAIR_TYPE = "pair_type"


@dataclass(frozen=True)
class Column:
    field: pa.Field
    meaning: str


@dataclass(frozen=True)
class Group:
    name: str
    meaning: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.field.name for c in self.columns)


def _col(name: str, type_: pa.DataType, meaning: str) -> Column:
    return Column(pa.field(name, type_), meaning)


GROUPS: dict[str, Group] = {g.name: g for g in (
    Group("step", "the two sides continue one shared partial response: train with prefix-as-prompt, and no EOS "
                  "after a side that stops mid-response", (
        Column(PAIRS.field(SHARED_PREFIX), "assistant text both sides start with (a core column, required here)"),
        _col(CHOSEN_IS_TERMINAL, pa.bool_(), "false: chosen stops mid-response (no EOS is trained after it)"),
        _col(REJECTED_IS_TERMINAL, pa.bool_(), "false: rejected stops mid-response (no EOS is trained after it)"),
    )),
    Group("rationale", "an RDPO rationale: why chosen wins, trained as an extra likelihood term", (
        _col(RATIONALE, pa.string(), "the machine-written explanation of why chosen is preferred"),
        _col(RATIONALE_PROMPT, pa.string(), "the user turn the rationale is conditioned on when trained"),
    )),
    Group("verification", "the bundled task's record and what its verifier said about each side", (
        _col(META, pa.string(), "the task record (JSON) a verifier needs: problem, gold steps, answer"),
        _col("chosen_correct", pa.bool_(), "chosen's final answer is right (null: not checked)"),
        _col("rejected_correct", pa.bool_(), "rejected's final answer is right (null: not checked)"),
    )),
    Group("score_range", "the scale chosen_score and rejected_score are on", (
        Column(SCORE_RANGE[0], "the lowest score the method can give (e.g. 0 for a verifier, -1 for a Q value)"),
        Column(SCORE_RANGE[1], "the highest score the method can give"),
    )),
    Group("pair_type", "which kind of pair a stage made, for select-pairs", (
        _col(PAIR_TYPE, pa.string(), "first_wrong_step | prism_sibling | value_gap | terminal | list (tree "
                                     "pairs), terminal (sample-pairs)"),
    )),
)}
_GROUP_OF = {n: g.name for g in GROUPS.values() for n in g.names}


def group_fields(groups: tuple[str, ...] | list[str]) -> list[pa.Field]:
    """The fields of `groups` that are not core PAIRS columns, in declaration order."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown pair column group(s) {unknown}; declared: {sorted(GROUPS)}")
    return [c.field for name in GROUPS for c in GROUPS[name].columns
            if name in groups and c.field.name not in PAIRS.names]


def groups_of(table_or_names) -> tuple[str, ...]:
    """The groups whose every column is present (a table, a schema or a list of column names)."""
    names = set(getattr(table_or_names, "column_names", None) or getattr(table_or_names, "names", None)
                or table_or_names)
    return tuple(g.name for g in GROUPS.values() if set(g.names) <= names)


def carried(row: dict, groups: tuple[str, ...]) -> dict:
    """The values of `groups`' columns in one row dict (what a transform copies onto the rows it makes)."""
    return {n: row.get(n) for g in groups for n in GROUPS[g].names}


# Columns that describe one side of a pair: a transform that swaps chosen and rejected swaps these too.
SIDE_COLUMNS = ((CHOSEN_IS_TERMINAL, REJECTED_IS_TERMINAL), ("chosen_correct", "rejected_correct"))


def flip_sides(values: dict) -> dict:
    """`values` (a row's group columns) for the same pair with chosen and rejected swapped."""
    out = dict(values)
    for c, r in SIDE_COLUMNS:
        if c in values or r in values:
            out[c], out[r] = values.get(r), values.get(c)
    return out


def pairs_schema(groups: tuple[str, ...] = (), stage_fields: list[pa.Field] = ()) -> pa.Schema:
    """PAIRS, then the columns of `groups`, then the stage's own columns (which may not redefine either)."""
    fields = list(PAIRS) + group_fields(groups)
    taken = {f.name for f in fields}
    clash = [f.name for f in stage_fields if f.name in taken or f.name in _GROUP_OF]
    if clash:
        raise ValueError(f"stage columns {clash} are declared by schemas (core or group "
                         f"{sorted({_GROUP_OF[c] for c in clash if c in _GROUP_OF})}): declare the group instead")
    return pa.schema(fields + list(stage_fields))


UNKNOWN_MODEL = "unknown"


def model_name(source) -> str:
    """The model id `source` (a backend, a judge) reports, or UNKNOWN_MODEL when it reports none: what every model
    column (generator_model, judge_model, a stage's own *_model columns, a trees table's generator_model) holds."""
    return getattr(source, "model_id", None) or UNKNOWN_MODEL


# What a pair column holds when a row leaves it out (absent or None); every other column is then null. pair_id is
# the row's row_key there (a filtered or failed row is not a pair but still needs a unique id) and created_at the
# time the table is built. docs/tables.md lists them.
ROW_DEFAULTS: dict[str, object] = {
    "chosen": "",                     # a filtered or failed row with no text for that side
    "rejected": "",
    "generator_model": UNKNOWN_MODEL,  # the backend reported no model id
    "extra": {},
    "status": "ok",
}


def _fill(row: dict, names: set[str], created) -> dict:
    unknown = sorted(set(row) - names)
    if unknown:  # a misspelt or undeclared column would otherwise vanish without a word
        raise ValueError(f"pair row has column(s) {unknown} that the stage does not declare (core columns, its "
                         f"groups or its stage fields)")
    out = {**ROW_DEFAULTS, "created_at": created}
    out.update((k, v) for k, v in row.items() if v is not None or k not in out)
    if out.get("pair_id") is None:
        out["pair_id"] = out.get("row_key")
    return out


def make_pairs(rows: list[dict], groups: tuple[str, ...] = (), stage_fields: list[pa.Field] = ()) -> pa.Table:
    """A pair table from row dicts, the one constructor of pair rows: columns a row leaves out get ROW_DEFAULTS
    (then null); a dict `extra` is dumped to JSON; a key that is no column of the table is refused.

    Every stage builds its pair output here, so a group's columns exist (null where a row has no value) in every
    table whose stage declares the group, and a missing value means the same in every stage.
    """
    schema = pairs_schema(tuple(groups), stage_fields)
    created = dt.datetime.now(dt.timezone.utc)
    rows = [_fill(r, set(schema.names), created) for r in rows]
    arrays = []
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if f.name == "extra":
            values = [v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False)
                      for v in values]
        if pa.types.is_dictionary(f.type):
            arrays.append(pa.array(values, pa.string()).dictionary_encode().cast(f.type))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
