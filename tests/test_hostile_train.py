"""`prefpipe train` refuses what `prefpipe validate` refuses, before the model loads, and says on the terminal
how many rows max_length dropped or cut."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.train.trainer as trainer_mod
from tests.helpers.cli import run_cli
from tests.test_hostile_input import lists, pairs

nan = float("nan")
# full-schema tables: `validate` and `train` see the same file and must give the same refusal
SAME_FILE = {
    "pairs_chosen_equals_rejected": (pairs(rejected=["r1", "S c2", "r3"]), "pairs", ["row 1", "rejected"]),
    "pairs_empty_rejected": (pairs(rejected=["r1", "S r2", " "]), "pairs", ["row 2", "rejected"]),
    "pairs_nan_score": (pairs(chosen_score=[nan, 1.0, None], score_margin=[None, 0.5, None]), "pairs",
                        ["row 0", "chosen_score"]),
    "pairs_confidence_above_one": (pairs(label_confidence=[0.5, 1.5, None]), "pairs", ["row 1", "label_confidence"]),
    "pairs_duplicate_row_key": (pairs(row_key=["k", "k", "k3"]), "pairs", ["row 1", "row_key"]),
    "pairs_extra_not_json": (pairs(extra=["{}", "{", "{}"]), "pairs", ["row 1", "extra"]),
    "lists_nan_score": (lists(scores=[[1.0, nan], [0.5, 0.2, 0.1]]), "lists", ["row 0", "scores"]),
    "lists_null_response": (lists(responses=[["r1", None], ["s1", "s2", "s3"]]), "lists", ["row 0", "responses"]),
}

TRAIN_ARGS = ["--model", "tiny-policy", "-o", "OUT", "--device", "cpu"]


def _no_model(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model loaded before the data was checked")
    monkeypatch.setattr(trainer_mod, "load_model_and_tokenizer", no_model)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(SAME_FILE))
def test_train_gives_validates_refusal(tmp_path, monkeypatch, capsys, name):
    table, kind, fragments = SAME_FILE[name]
    data = tmp_path / "data.parquet"
    pq.write_table(table, data)
    _no_model(monkeypatch)
    code, v_msg = run_cli(monkeypatch, capsys, "validate", data, "--kind", kind)
    assert code == 2 and all(f in v_msg for f in fragments), v_msg
    code, t_msg = run_cli(monkeypatch, capsys, "train", "--data", data,
                          *[str(tmp_path / "out") if a == "OUT" else a for a in TRAIN_ARGS])
    assert code == 2 and t_msg == v_msg, (t_msg, v_msg)
    assert not (tmp_path / "out").exists()


# TRL-style tables (prompt, chosen, rejected only): the same checks on the columns they have
TRL = {
    "chosen_equals_rejected": ({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "y"]},
                               ["row 1", "rejected", "identical"]),
    "empty_chosen": ({"prompt": ["a", "b"], "chosen": ["x", " "], "rejected": ["z", "w"]}, ["row 1", "chosen"]),
    "nan_label_confidence": ({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"],
                              "label_confidence": [0.5, float("nan")]}, ["row 1", "label_confidence"]),
    "confidence_above_one": ({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"],
                              "label_confidence": [2.0, 0.5]}, ["row 0", "label_confidence"]),
    "duplicate_pair_id": ({"pair_id": ["p", "p"], "prompt": ["a", "b"], "chosen": ["x", "y"],
                           "rejected": ["z", "w"]}, ["row 1", "pair_id"]),
    "extra_not_json": ({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"],
                        "extra": ["{}", "{oops"]}, ["row 1", "extra"]),
    "list_nan_score": ({"prompt": ["a"], "responses": [["x", "y"]], "scores": [[1.0, float("nan")]]},
                       ["row 0", "scores"]),
    "list_null_response": ({"prompt": ["a"], "responses": [["x", None]], "scores": [[1.0, 0.0]]},
                           ["row 0", "responses"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(TRL))
def test_train_checks_trl_tables(tmp_path, monkeypatch, capsys, name):
    rows, fragments = TRL[name]
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table(rows), data)
    _no_model(monkeypatch)
    code, msg = run_cli(monkeypatch, capsys, "train", "--data", data,
                        *[str(tmp_path / "out") if a == "OUT" else a for a in TRAIN_ARGS])
    assert code == 2 and "data.parquet" in msg and all(f in msg for f in fragments), msg
    assert not (tmp_path / "out").exists()


def test_train_prints_rows_dropped_by_max_length(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.parquet"
    # one prompt of ~900 tokens cannot leave a completion token within max_length 64; the other two fit
    pq.write_table(pa.table({"prompt": ["x " * 900, "2+2=", "3+3="], "chosen": ["4", "4", "6"],
                             "rejected": ["5", "5", "7"]}), data)
    code, msg = run_cli(monkeypatch, capsys, "train", "--model", "tiny-policy", "--data", data, "-o",
                        tmp_path / "out", "--max-steps", "1", "--max-length", "64", "--device", "cpu",
                        "--no-progress")
    assert code == 0, msg
    assert "data: 3 rows; 1 rows dropped (prompt leaves no room) at max_length=64" in msg, msg
