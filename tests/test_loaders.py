"""Prompt loaders: JSONL, Parquet and datasets folders; every malformed input names file, row and column."""
from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.tasks.loaders import load_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def write_jsonl(path, lines: list) -> str:
    """Each item is a dict (dumped), a str (written as is) or bytes (raw)."""
    with open(path, "wb") as f:
        for x in lines:
            raw = x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()
            f.write(raw + b"\n")
    return str(path)


def write_parquet(path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


# ---------------------------------------------------------------- good inputs


def test_jsonl_generates_sha1_ids_and_keeps_columns(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a?", "k": 1}, "", {"prompt": "b?", "k": 2, "x": "y"}])
    t = load_prompts(f)
    assert t.column_names == ["prompt_id", "prompt", "k", "x"]
    assert t.column("prompt_id").to_pylist() == [sha1("a?"), sha1("b?")]
    assert t.column("k").to_pylist() == [1, 2] and t.column("x").to_pylist() == [None, "y"]
    assert t.schema.field("prompt_id").type == pa.string() and t.schema.field("prompt").type == pa.string()


def test_jsonl_custom_columns_and_int_ids(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"q": "a", "uid": 7}, {"q": "b", "uid": "x8"}])
    t = load_prompts(f, prompt_column="q", id_column="uid")
    assert t.column_names == ["prompt_id", "prompt"]
    assert t.to_pylist() == [{"prompt_id": "7", "prompt": "a"}, {"prompt_id": "x8", "prompt": "b"}]


def test_existing_prompt_id_column_is_used(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "p1", "prompt": "a"}, {"prompt_id": "p2", "prompt": "a"}])
    assert load_prompts(f).column("prompt_id").to_pylist() == ["p1", "p2"]  # same text, distinct given ids


def test_json_array(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert load_prompts(tmp_path / "p.json").column("prompt").to_pylist() == ["a", "b"]


def test_parquet_large_string_and_extra_columns(tmp_path):
    t = pa.table({"prompt": pa.array(["a", "b"], pa.large_string()), "n": [1, 2]})
    out = load_prompts(write_parquet(tmp_path / "p.parquet", t))
    assert out.column_names == ["prompt_id", "prompt", "n"]
    assert out.schema.field("prompt").type == pa.string()
    assert out.column("prompt_id").to_pylist() == [sha1("a"), sha1("b")]


def test_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "id": [3, 1, 2]})
    ds.select([2, 0]).save_to_disk(str(tmp_path / "ds"))
    t = load_prompts(tmp_path / "ds", id_column="id")
    assert t.to_pylist() == [{"prompt_id": "2", "prompt": "c"}, {"prompt_id": "3", "prompt": "a"}]


def test_task_table_loads(tmp_path):
    from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table

    src = problems_to_table(make_split(TaskConfig.tiny(), "eval", 10))
    t = load_prompts(write_parquet(tmp_path / "eval.parquet", src))
    assert t.column("prompt_id").to_pylist() == src.column("prompt_id").to_pylist()
    assert t.column_names == src.column_names


# ---------------------------------------------------------------- malformed inputs: (file, row, column)

BAD_JSONL = {
    "empty file": ([], None, None, "empty file"),
    "only blank lines": (["", "  "], None, None, "empty file"),
    "invalid JSON": ([{"prompt": "a"}, '{"prompt": "b"'], 2, None, "invalid JSON"),
    "invalid UTF-8": ([{"prompt": "a"}, {"prompt": "b"}, b'{"prompt": "\xff\xfe"}'], 3, None, "invalid UTF-8"),
    "non-object line": ([{"prompt": "a"}, "[1, 2]"], 2, None, "JSON object"),
    "missing prompt": ([{"prompt": "a"}, {"text": "b"}], 2, "prompt", "missing prompt"),
    "null prompt": ([{"prompt": "a"}, {"prompt": None}], 2, "prompt", "null"),
    "empty prompt": ([{"prompt": "a"}, "", {"prompt": ""}], 3, "prompt", "empty"),
    "whitespace prompt": ([{"prompt": " \n "}], 1, "prompt", "empty"),
    "prompt not a string": ([{"prompt": "a"}, {"prompt": 5}], 2, "prompt", "must be a string"),
    "prompt is a list": ([{"prompt": ["a"]}], 1, "prompt", "must be a string"),
    "duplicate prompt": ([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}], 3, "prompt", "same as row 1"),
    "duplicate ids": ([{"prompt": "a", "prompt_id": "x"}, {"prompt": "b", "prompt_id": "x"}], 2, "prompt_id",
                      "duplicate id"),
    "null id": ([{"prompt": "a", "prompt_id": "x"}, {"prompt": "b", "prompt_id": None}], 2, "prompt_id", "null"),
    "id wrong type": ([{"prompt": "a", "prompt_id": 1.5}], 1, "prompt_id", "string or an integer"),
    "mixed types in a column": ([{"prompt": "a", "n": 1}, {"prompt": "b", "n": "two"}], 2, "n", "mixed"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl(tmp_path, case):
    lines, row, column, msg = BAD_JSONL[case]
    f = write_jsonl(tmp_path / "bad.jsonl", lines) if lines else str(tmp_path / "bad.jsonl")
    if not lines:
        open(f, "wb").close()
    with pytest.raises(InputError) as e:
        load_prompts(f)
    assert (e.value.file, e.value.row, e.value.column) == (f, row, column)
    assert msg in str(e.value) and f"file {f}" in str(e.value)


def test_missing_id_column(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "uid": "1"}, {"prompt": "b"}])
    with pytest.raises(InputError) as e:
        load_prompts(f, id_column="uid")
    assert (e.value.row, e.value.column) == (2, "uid")


def test_prompt_column_conflict(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"q": "a", "prompt": "b"}])
    with pytest.raises(InputError, match="both 'q' and 'prompt'") as e:
        load_prompts(f, prompt_column="q")
    assert e.value.column == "prompt"


BAD_PARQUET = {
    "no rows": (pa.table({"prompt": pa.array([], pa.string())}), None, None, "empty"),
    "missing prompt column": (pa.table({"text": ["a"]}), None, "prompt", "missing prompt column"),
    "null prompt": (pa.table({"prompt": ["a", "b", None]}), 3, "prompt", "null"),
    "empty prompt": (pa.table({"prompt": ["a", ""]}), 2, "prompt", "empty"),
    "prompt not a string": (pa.table({"prompt": [1, 2]}), 1, "prompt", "must be a string"),
    "duplicate ids": (pa.table({"prompt": ["a", "b", "c"], "prompt_id": ["1", "2", "1"]}), 3, "prompt_id",
                      "same as row 1"),
    "id wrong type": (pa.table({"prompt": ["a"], "prompt_id": [1.0]}), 1, "prompt_id", "must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_PARQUET))
def test_bad_parquet(tmp_path, case):
    table, row, column, msg = BAD_PARQUET[case]
    f = write_parquet(tmp_path / "bad.parquet", table)
    with pytest.raises(InputError) as e:
        load_prompts(f)
    assert (e.value.file, e.value.row, e.value.column) == (f, row, column)
    assert msg in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zero bytes"])
def test_corrupt_parquet(tmp_path, damage):
    f = write_parquet(tmp_path / "p.parquet", pa.table({"prompt": [f"prompt {i}" for i in range(200)]}))
    data = open(f, "rb").read()
    data = {"truncated": data[: len(data) // 2], "garbage": b"PAR1" + os.urandom(300), "zero bytes": b""}[damage]
    open(f, "wb").write(data)
    with pytest.raises(InputError, match="Parquet") as e:
        load_prompts(f)
    assert e.value.file == f


def test_path_errors(tmp_path):
    cases = {
        str(tmp_path / "nope.jsonl"): "no such file",
        str(tmp_path / "p.csv"): "unknown extension",
        str(tmp_path / "plain_dir"): "not a `datasets.save_to_disk` folder",
    }
    (tmp_path / "p.csv").write_text("prompt\na\n")
    (tmp_path / "plain_dir").mkdir()
    for f, msg in cases.items():
        with pytest.raises(InputError, match=msg) as e:
            load_prompts(f)
        assert e.value.file == f


def test_dataset_dict_folder(tmp_path):
    import datasets

    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]})})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="DatasetDict") as e:
        load_prompts(tmp_path / "dd")
    assert e.value.file == str(tmp_path / "dd")
    assert load_prompts(tmp_path / "dd" / "train").column("prompt").to_pylist() == ["a"]


def test_corrupt_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:40])
    with pytest.raises(InputError, match="cannot load") as e:
        load_prompts(tmp_path / "ds")
    assert e.value.file == str(tmp_path / "ds")
