"""Validation at stage boundaries: conform a table to its declared schema and check invariants.

Errors name the file (when known), the row (0-based, as pyarrow and polars count) and the column of the
first problems found, so a user can open the file and look.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.errors import InputError
from schemas.pairs import GROUPS, group_fields
from schemas.problems import Problems
from schemas.score_range import check_score_range
from schemas.tables import STATUS_VALUES, UNIQUE_KEY, schema_for

def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx < 0 else idx


def _compatible(src: pa.DataType, dst: pa.DataType) -> bool:
    """Casts we do silently: representation changes that cannot change a value's meaning."""
    if src == dst or pa.types.is_null(src):
        return True
    stringy = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    if any(f(src) for f in stringy) and (any(f(dst) for f in stringy) or pa.types.is_dictionary(dst)):
        return True
    if pa.types.is_dictionary(src):
        return _compatible(src.value_type, dst.value_type if pa.types.is_dictionary(dst) else dst)
    if pa.types.is_integer(src) and pa.types.is_integer(dst):
        return True  # range-checked by the safe cast
    if (pa.types.is_floating(src) or pa.types.is_integer(src)) and pa.types.is_floating(dst):
        return True
    if pa.types.is_timestamp(src) and pa.types.is_timestamp(dst):
        return True
    is_list = (pa.types.is_list, pa.types.is_large_list)
    if any(f(src) for f in is_list) and any(f(dst) for f in is_list):
        return _compatible(src.value_type, dst.value_type)
    if pa.types.is_struct(src) and pa.types.is_struct(dst):
        names = {f.name: f.type for f in src}
        return all(f.name not in names or _compatible(names[f.name], f.type) for f in dst)
    return False


def _cast_struct_fill(col: pa.ChunkedArray, dst: pa.DataType) -> pa.ChunkedArray:
    """Struct (or list<struct>) columns may omit nullable fields: add them as nulls before casting."""
    if pa.types.is_list(dst) or pa.types.is_large_list(dst):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        inner = _cast_struct_fill(pa.chunked_array([arr.flatten()]), dst.value_type).combine_chunks()
        offsets = arr.offsets
        out = pa.ListArray.from_arrays(offsets, inner, type=pa.list_(pa.field("item", dst.value_type,
                                                                                dst.value_field.nullable)),
                                       mask=arr.is_null() if arr.null_count else None)
        return pa.chunked_array([out])
    if pa.types.is_struct(dst) and pa.types.is_struct(col.type):
        arr = col.combine_chunks()
        children = []
        for f in dst:
            idx = arr.type.get_field_index(f.name)
            child = arr.field(idx) if idx >= 0 else pa.nulls(len(arr), f.type)
            children.append(_cast_struct_fill(pa.chunked_array([child]), f.type).combine_chunks())
        return pa.chunked_array([pa.StructArray.from_arrays(children, fields=list(dst),
                                                            mask=arr.is_null() if arr.null_count else None)])
    return col.cast(dst, safe=True)


def _dictionary_fitting(col: pa.ChunkedArray, declared: pa.DictionaryType) -> pa.DictionaryType:
    """The declared dictionary type, or the same with a wider index when the column has more distinct values
    than the declared index can count (e.g. > 127 `method` values under int8): valid data, never refused.
    The store reads shards of different index widths back with permissive promotion."""
    if pa.types.is_dictionary(col.type):
        if col.type.value_type == declared.value_type and col.type.index_type.bit_width > declared.index_type.bit_width:
            return pa.dictionary(col.type.index_type, declared.value_type)
        # distinct dictionary entries over all chunks: an upper bound of the values in use
        col = pa.chunked_array([c.dictionary for c in col.chunks], col.type.value_type)
    n = pc.count_distinct(col).as_py() if len(col) else 0
    for index in (declared.index_type, pa.int16(), pa.int32()):
        if n <= 2 ** (index.bit_width - 1):
            return pa.dictionary(index, declared.value_type) if index != declared.index_type else declared
    return pa.dictionary(pa.int64(), declared.value_type)


def conform(table: pa.Table, kind: str, *, file: str | None = None) -> pa.Table:
    """Return `table` with the declared columns of `kind` first, in declared types; extra columns kept.

    Missing nullable columns are added as nulls; a missing required column or an incompatible type is an
    InputError naming the column (and the first non-null row for a type problem).
    """
    schema = schema_for(kind)
    problems = Problems(file)
    if table.num_rows == 0 and table.num_columns == 0:
        raise InputError(f"empty table: no rows and no columns (expected a {kind} table)", file=file)
    cols, fields, missing = [], [], []
    for field in schema:
        if field.name not in table.column_names:
            if field.nullable:
                cols.append(pa.nulls(table.num_rows, field.type))
                fields.append(field)
                continue
            missing.append(field.name)
            continue
        col = table.column(field.name)
        if pa.types.is_dictionary(field.type):
            field = field.with_type(_dictionary_fitting(col, field.type))
        col = _cast_declared(col, field, problems)
        if col is None:
            continue
        cols.append(col)
        fields.append(field)
    if missing:
        raise InputError(f"missing required column{'s' if len(missing) > 1 else ''} {missing} (a {kind} table "
                         f"has {table.column_names})", file=file, column=missing[0])
    problems.raise_if_any()
    declared = {f.name for f in schema}
    optional = {f.name: f for f in group_fields(tuple(GROUPS))} if kind == "pairs" else {}
    for name in table.column_names:
        if name not in declared:  # a pair column group's column keeps its declared type (schemas/pairs.py)
            field = optional.get(name, table.schema.field(name))
            cols.append(_cast_declared(table.column(name), field, problems))
            fields.append(field)
    problems.raise_if_any()
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=table.schema.metadata))


def _cast_declared(col: pa.ChunkedArray, field: pa.Field, problems: Problems) -> pa.ChunkedArray | None:
    """`col` in `field`'s type, or None after recording why it cannot be."""
    if col.type == field.type:
        return col
    bad_row = _first_true(pc.is_valid(col)) if len(col) else None
    if not _compatible(col.type, field.type):
        problems.add(bad_row, field.name, f"wrong type {col.type}, expected {field.type}")
        return None
    try:
        return _cast_struct_fill(col, field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        problems.add(bad_row, field.name, f"cannot convert {col.type} to {field.type}: {e}")
        return None


def _check_nulls(table: pa.Table, kind: str, problems: Problems) -> None:
    for field in schema_for(kind):
        col = table.column(field.name)
        if not field.nullable and col.null_count:
            problems.add(_first_true(pc.is_null(col)), field.name, "null in a required column")
        item_type = field.type.value_type if pa.types.is_list(field.type) else None
        if item_type is not None and pa.types.is_struct(item_type):
            _check_struct_list_nulls(col, field.name, item_type, problems)


def _check_struct_list_nulls(col, name: str, struct_type: pa.StructType, problems: Problems) -> None:
    arr = col.combine_chunks()
    flat = arr.flatten()
    if not len(flat):
        return
    parents = pc.list_parent_indices(arr)
    for f in struct_type:
        if f.nullable:
            continue
        nulls = pc.is_null(flat.field(f.name))
        i = _first_true(nulls)
        if i is not None:
            problems.add(parents[i].as_py(), f"{name}.{f.name}", "null in a required field of a list item")


def _check_strings_nonempty(table: pa.Table, column: str, problems: Problems) -> None:
    col = table.column(column)
    i = _first_true(pc.equal(pc.utf8_trim_whitespace(col), ""))
    if i is not None:
        problems.add(i, column, "empty text")


def _check_unique(table: pa.Table, kind: str, problems: Problems) -> None:
    keys = [UNIQUE_KEY[kind]] + (["row_key"] if UNIQUE_KEY[kind] != "row_key" and "row_key" in
                                 table.column_names else [])
    for key in keys:
        _check_unique_column(table, key, problems)


def _check_unique_column(table: pa.Table, key: str, problems: Problems) -> None:
    if key not in table.column_names or table.num_rows < 2:
        return
    col = table.column(key)
    counts = pc.value_counts(col)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        value = dup[0]
        rows = pc.indices_nonzero(pc.equal(col, value)).to_pylist()[:3]
        problems.add(rows[1], key, f"duplicate {key} {value.as_py()!r} (rows {rows})")


def _check_status(table: pa.Table, problems: Problems) -> None:
    if "status" not in table.column_names:
        return
    bad = pc.invert(pc.is_in(table.column("status"), pa.array(STATUS_VALUES)))
    i = _first_true(bad)
    if i is not None:
        problems.add(i, "status", f"status {table.column('status')[i].as_py()!r} not in {STATUS_VALUES}")


def check_pair_invariants(table: pa.Table, problems: Problems) -> None:
    """On rows with status ok: chosen != rejected; shared_prefix is a prefix of both;
    score_margin = chosen_score - rejected_score whenever both scores are present."""
    import polars as pl

    cols = ["pair_id", "chosen", "rejected", "shared_prefix", "chosen_score", "rejected_score", "score_margin"]
    df = pl.from_arrow(table.select(cols + (["status"] if "status" in table.column_names else [])))
    df = df.with_row_index("_row")
    if "status" in df.columns:
        df = df.filter(pl.col("status") == "ok")
    expected = pl.col("chosen_score") - pl.col("rejected_score")
    checks = [
        ("rejected", pl.col("chosen") == pl.col("rejected"), lambda r: "chosen and rejected are identical"),
        ("chosen", pl.col("chosen").str.strip_chars() == "", lambda r: f"empty chosen text ({r['pair_id']!r})"),
        ("rejected", pl.col("rejected").str.strip_chars() == "",
         lambda r: f"empty rejected text ({r['pair_id']!r})"),
        ("shared_prefix", pl.col("shared_prefix").is_not_null()
         & ~pl.col("chosen").str.starts_with(pl.col("shared_prefix")),
         lambda r: "shared_prefix is not a prefix of chosen"),
        ("shared_prefix", pl.col("shared_prefix").is_not_null()
         & ~pl.col("rejected").str.starts_with(pl.col("shared_prefix")),
         lambda r: "shared_prefix is not a prefix of rejected"),
        ("score_margin", (pl.col("score_margin") - expected).abs() > 1e-9 + 1e-9 * expected.abs(),
         lambda r: f"score_margin {r['score_margin']} != chosen_score - rejected_score "
                   f"({r['chosen_score'] - r['rejected_score']})"),
        ("score_margin", expected.is_not_null() & pl.col("score_margin").is_null(),
         lambda r: "score_margin missing although both scores are present"),
    ]
    for column, bad, message in checks:
        hit = df.filter(bad.fill_null(False)).head(1)
        if hit.height:
            row = hit.row(0, named=True)
            problems.add(row["_row"], column, message(row))


def _check_lists(table: pa.Table, problems: Problems) -> None:
    n_resp = pc.list_value_length(table.column("responses"))
    n_scores = pc.list_value_length(table.column("scores"))
    i = _first_true(pc.not_equal(n_resp, n_scores))
    if i is not None:
        problems.add(i, "scores", f"{n_scores[i].as_py()} scores for {n_resp[i].as_py()} responses")
    i = _first_true(pc.less(n_resp, 2))
    if i is not None:
        problems.add(i, "responses", "a ranked list needs at least 2 responses")


def _float_leaves(col, name: str, type_: pa.DataType):
    """(column path, float values, row of each value) for every float inside a declared column: plain,
    list items and struct fields of list items (tree nodes), so one check covers every kind."""
    if pa.types.is_floating(type_):
        yield name, col, None
    elif pa.types.is_list(type_) or pa.types.is_large_list(type_):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        parents = pc.list_parent_indices(arr)
        for path, values, rows in _float_leaves(arr.flatten(), name, type_.value_type):
            yield path, values, parents if rows is None else pc.take(parents, rows)
    elif pa.types.is_struct(type_):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        for f in type_:
            yield from _float_leaves(arr.field(f.name), f"{name}.{f.name}", f.type)


def _check_finite(table: pa.Table, kind: str, problems: Problems) -> None:
    """NaN and infinite numbers are refused everywhere: a NaN score ranks nothing and poisons every mean."""
    for field in schema_for(kind):
        for path, values, rows in _float_leaves(table.column(field.name), field.name, table.column(field.name).type):
            i = _first_true(pc.invert(pc.is_finite(values)))
            if i is not None:
                row = i if rows is None else rows[i].as_py()
                problems.add(row, path, f"{values[i].as_py()} is not a finite number")
    if "label_confidence" in table.column_names:
        conf = table.column("label_confidence")
        i = _first_true(pc.or_(pc.less(conf, 0.0), pc.greater(conf, 1.0)))
        if i is not None:
            problems.add(i, "label_confidence", f"label_confidence {conf[i].as_py()} is outside [0, 1]")


def _check_list_items(table: pa.Table, kind: str, problems: Problems) -> None:
    """A null inside a list (a response, a score, a node) is never meaningful."""
    for field in schema_for(kind):
        if not (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)):
            continue
        arr = table.column(field.name).combine_chunks()
        flat = arr.flatten()
        i = _first_true(pc.is_null(flat)) if len(flat) else None
        if i is not None:
            problems.add(pc.list_parent_indices(arr)[i].as_py(), field.name, "null item in a list")


# JSON text columns: the JSON type each holds
_JSON_COLUMNS = {"extra": (dict, "object"), "prompt_messages": (list, "array")}


def _check_json(table: pa.Table, problems: Problems) -> None:
    import json

    for name, (want, what) in _JSON_COLUMNS.items():
        if name not in table.column_names:
            continue
        for i, text in enumerate(table.column(name).to_pylist()):
            if text is None:
                continue
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as e:
                problems.add(i, name, f"not valid JSON ({type(e).__name__}: {str(e)[:80]})")
                break
            if not isinstance(value, want):
                problems.add(i, name, f"JSON {type(value).__name__}, expected a JSON {what}")
                break


def validate(table: pa.Table, kind: str, *, file: str | None = None) -> pa.Table:
    """Conform `table` to the schema of `kind` and check its invariants; return the conformed table.

    Raises InputError naming the file, row and column of the first problem (and up to four more).
    """
    table = conform(table, kind, file=file)
    problems = Problems(file)
    _check_nulls(table, kind, problems)
    if kind == "prompts":
        _check_strings_nonempty(table, "prompt", problems)
    _check_unique(table, kind, problems)
    _check_status(table, problems)
    _check_finite(table, kind, problems)
    _check_list_items(table, kind, problems)
    _check_json(table, problems)
    if kind == "trees":
        from schemas.trees import check_trees
        check_trees(table, problems)
    if kind == "pairs":
        check_pair_invariants(table, problems)
    check_score_range(table, kind, problems)
    if kind == "lists":
        _check_lists(table, problems)
    problems.raise_if_any()
    return table
