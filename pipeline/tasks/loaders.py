"""Load user prompts from JSONL, Parquet or a `datasets.save_to_disk` folder into one Arrow table.

Output: `prompt_id` (string) and `prompt` (string) first, every other input column kept after them.
Every malformed input raises InputError naming the file, the row (the 1-based line for JSONL, the 1-based row
otherwise) and the column. Nothing here unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.jsonl import check_values, parse_record

JSONL_EXT = {".jsonl", ".ndjson"}
PARQUET_EXT = {".parquet", ".pq"}


def load_prompts(path: str | Path, prompt_column: str = "prompt", id_column: str | None = None) -> pa.Table:
    """Read prompts. `id_column=None` uses a `prompt_id` column when the input has one, else the sha1 of the
    prompt text. Ids must be unique (the run store keys rows by them)."""
    p = Path(path)
    f = str(p)
    if not p.exists():
        raise InputError("no such file or directory", file=f)
    if p.is_dir():
        table, rows = _read_datasets_dir(p), None
    elif p.suffix.lower() in JSONL_EXT or p.suffix.lower() == ".json":
        table, rows = _read_jsonl(p, prompt_column, id_column)
    elif p.suffix.lower() in PARQUET_EXT:
        table, rows = _read_parquet(p), None
    else:
        raise InputError(f"unknown extension {p.suffix!r}: expected .jsonl, .ndjson, .json, .parquet, .pq or a "
                         "datasets folder", file=f)
    return _finalize(table, f, prompt_column, id_column, rows)


# ---------------------------------------------------------------- readers


def _read_jsonl(p: Path, prompt_column: str, id_column: str | None) -> tuple[pa.Table, list[int]]:
    f = str(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=f) from e
    if p.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
        return _read_json_array(raw, f, prompt_column, id_column)
    records, line_nos = [], []
    for line_no, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"invalid UTF-8 at byte {e.start} of the line", file=f, row=line_no) from e
        if not text.strip():
            continue  # blank lines (e.g. the trailing newline) carry no record
        obj = parse_record(text, f, line_no)  # also unpaired surrogates and deep nesting (pipeline/jsonl.py)
        _check_record_types(obj, f, line_no, prompt_column, id_column)
        records.append(obj)
        line_nos.append(line_no)
    if not records:
        raise InputError("empty file: no JSON records", file=f)
    return _records_to_table(records, f, line_nos), line_nos


def _read_json_array(raw: bytes, f: str, prompt_column: str, id_column: str | None) -> tuple[pa.Table, list[int]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 at byte {e.start}", file=f) from e
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} at line {e.lineno}", file=f) from e
    except RecursionError:
        raise InputError("JSON nested too deeply", file=f) from None
    if not data:
        raise InputError("empty file: no JSON records", file=f)
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=f, row=i)
        check_values(obj, f, i)
        _check_record_types(obj, f, i, prompt_column, id_column)
    rows = list(range(1, len(data) + 1))
    return _records_to_table(data, f, rows), rows


def _check_record_types(obj: dict, f: str, row: int, prompt_column: str, id_column: str | None) -> None:
    """Type checks that must happen per record: Arrow cannot build a column from mixed types."""
    if prompt_column not in obj:
        raise InputError("missing prompt column", file=f, row=row, column=prompt_column)
    v = obj[prompt_column]
    if v is not None and not isinstance(v, str):
        raise InputError(f"prompt must be a string, got {type(v).__name__}", file=f, row=row, column=prompt_column)
    idc = id_column or ("prompt_id" if "prompt_id" in obj else None)
    if id_column and id_column not in obj:
        raise InputError("missing id column", file=f, row=row, column=id_column)
    if idc and obj.get(idc) is not None and (isinstance(obj[idc], bool) or not isinstance(obj[idc], (str, int))):
        raise InputError(f"id must be a string or an integer, got {type(obj[idc]).__name__}", file=f, row=row,
                         column=idc)
    if idc and isinstance(obj.get(idc), int):
        obj[idc] = str(obj[idc])  # ids are strings downstream; 7 and "7" are the same id


def _records_to_table(records: list[dict], f: str, rows: list[int]) -> pa.Table:
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r))
    cols = {}
    for name in names:
        values = [r.get(name) for r in records]
        try:
            cols[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise InputError(f"values of mixed or unsupported types ({e})", file=f,
                             row=rows[_first_type_change(values)], column=name) from e
    return pa.table(cols)


def _first_type_change(values: list) -> int:
    kinds = [type(v) for v in values if v is not None]
    first = kinds[0] if kinds else type(None)
    for i, v in enumerate(values):
        if v is not None and type(v) is not first:
            return i
    return 0


def _read_parquet(p: Path) -> pa.Table:
    try:
        return pq.read_table(p)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file (truncated or corrupt?): {e}", file=str(p)) from e


def _read_datasets_dir(p: Path) -> pa.Table:
    f = str(p)
    if (p / "dataset_dict.json").exists():
        splits = sorted(d.name for d in p.iterdir() if (d / "state.json").exists())
        raise InputError(f"a DatasetDict folder: pass one split's folder, e.g. {p / (splits[0] if splits else 'train')}"
                         f" (splits: {splits})", file=f)
    if not (p / "state.json").exists():
        raise InputError("a directory that is not a `datasets.save_to_disk` folder (no state.json)", file=f)
    import datasets  # imported here: it is slow to import and only this path needs it

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ArrowInvalid, JSONDecodeError, ...)
        raise InputError(f"cannot load the datasets folder ({type(e).__name__}: {e})", file=f) from e
    if not isinstance(ds, datasets.Dataset):
        raise InputError(f"expected a Dataset folder, got {type(ds).__name__}", file=f)
    if ds._indices is not None:  # a selected/shuffled view: materialise the order it presents
        ds = ds.flatten_indices()
    return pa.Table.from_batches(ds.data.table.to_batches(), schema=ds.data.table.schema)


# ---------------------------------------------------------------- shared checks


def _row(rows: list[int] | None, i: int) -> int:
    return rows[i] if rows is not None else i + 1


def _finalize(t: pa.Table, f: str, prompt_column: str, id_column: str | None, rows: list[int] | None) -> pa.Table:
    if t.num_rows == 0:
        raise InputError("empty file: no rows", file=f)
    if prompt_column not in t.column_names:
        raise InputError(f"missing prompt column (columns: {t.column_names})", file=f, column=prompt_column)
    if prompt_column != "prompt" and "prompt" in t.column_names:
        raise InputError(f"both '{prompt_column}' and 'prompt' exist; rename one", file=f, column="prompt")
    prompts = _string_column(t, prompt_column, f, rows, "prompt")
    _check_nonempty(prompts, f, prompt_column, rows)

    idc = id_column or ("prompt_id" if "prompt_id" in t.column_names else None)
    if id_column is not None and id_column not in t.column_names:
        raise InputError(f"missing id column (columns: {t.column_names})", file=f, column=id_column)
    if idc is not None and idc != "prompt_id" and "prompt_id" in t.column_names:
        raise InputError(f"both '{idc}' and 'prompt_id' exist; rename one", file=f, column="prompt_id")
    if idc is not None:
        ids = _id_column(t, idc, f, rows)
        _check_nonempty(ids, f, idc, rows)
        what = "duplicate id"
    else:
        ids = pa.array([hashlib.sha1(s.encode("utf-8")).hexdigest() for s in prompts.to_pylist()], pa.string())
        idc, what = prompt_column, "duplicate prompt (ids are the sha1 of the prompt text)"
    _check_unique(ids, f, idc, rows, what)

    rest = [c for c in t.column_names if c not in (prompt_column, idc)]
    return pa.table([ids, prompts] + [t.column(c) for c in rest], names=["prompt_id", "prompt"] + rest)


def _string_column(t: pa.Table, name: str, f: str, rows: list[int] | None, what: str) -> pa.ChunkedArray:
    col = t.column(name)
    if pa.types.is_dictionary(col.type) and pa.types.is_string(col.type.value_type):
        col = col.cast(pa.string())  # a dictionary-encoded text column is text (repetitive prompts)
    if pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
        col = col.cast(pa.string())
    if pa.types.is_null(col.type):
        raise InputError(f"{what} is null", file=f, row=_row(rows, 0), column=name)
    if not pa.types.is_string(col.type):
        raise InputError(f"{what} must be a string, the column has type {col.type}", file=f, row=_row(rows, 0),
                         column=name)
    return col


def _id_column(t: pa.Table, name: str, f: str, rows: list[int] | None) -> pa.ChunkedArray:
    col = t.column(name)
    if pa.types.is_integer(col.type):
        col = col.cast(pa.string())
    return _string_column(t.set_column(t.column_names.index(name), name, col), name, f, rows, "id")


def _check_nonempty(col: pa.ChunkedArray, f: str, name: str, rows: list[int] | None) -> None:
    nulls = pc.is_null(col)
    if pc.any(nulls).as_py():
        raise InputError("null value", file=f, row=_row(rows, _first_true(nulls)), column=name)
    blank = pc.equal(pc.utf8_trim_whitespace(col), "")
    if pc.any(blank).as_py():
        raise InputError("empty value", file=f, row=_row(rows, _first_true(blank)), column=name)


def _check_unique(ids: pa.ChunkedArray | pa.Array, f: str, name: str, rows: list[int] | None, what: str) -> None:
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    first: dict[str, int] = {}
    for i, v in enumerate(ids.to_pylist()):
        if v in first:
            raise InputError(f"{what}: same as row {_row(rows, first[v])}", file=f, row=_row(rows, i), column=name)
        first[v] = i


def _first_true(mask: pa.ChunkedArray) -> int:
    return pc.index(mask, True).as_py()


def read_columns(path: str | Path) -> set[str]:
    """The column names of a prompts file without loading it all (JSONL: the first record's keys), so a caller
    can pick a column convention before `load_prompts`."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", file=str(p))
    if p.is_dir():
        return set(_read_datasets_dir(p).column_names)
    if p.suffix.lower() in PARQUET_EXT:
        try:
            return set(pq.read_schema(p).names)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise InputError(f"not a readable Parquet file (truncated or corrupt?): {e}", file=str(p)) from e
    with p.open("rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip() and line.lstrip()[:1] != b"[":
                try:
                    obj = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise InputError(f"invalid JSON: {e}", file=str(p), row=line_no) from e
                return set(obj) if isinstance(obj, dict) else set()
            if line.strip():
                break
    data = json.loads(p.read_bytes() or b"[]")  # a JSON array file: the first object's keys
    return set(data[0]) if data and isinstance(data[0], dict) else set()
