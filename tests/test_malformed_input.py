"""Malformed input through the real CLI: non-zero exit, a message naming file/row/column, no partial output."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.app as cli
from pipeline.stage import get_stage
from pipeline.stage_cli import register_stage_commands
import tests.helpers.toy_stage  # noqa: F401  (registers toy-pairs)
from tests.helpers.cli import run_cli
from tests.helpers.tables import pairs_table

register_stage_commands(cli.stage_app, [get_stage("toy-pairs")])


_pairs = pairs_table


def _write(path, content):
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


GOOD_LINE = json.dumps({"prompt_id": "a", "prompt": "What is 2+2?"})
# name -> (file name, content, kind, expected fragments of the message (file name is always expected))
CASES = {
    "missing_file": ("nope.jsonl", None, "prompts", []),
    "empty_file": ("e.jsonl", "", "prompts", []),
    "invalid_json_line": ("j.jsonl", GOOD_LINE + "\n{not json\n", "prompts", ["2"]),
    "invalid_utf8_line": ("u.jsonl", GOOD_LINE.encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n', "prompts", ["2"]),
    "non_object_line": ("n.jsonl", GOOD_LINE + "\n[1, 2]\n", "prompts", ["2"]),
    "missing_prompt_column": ("m.jsonl", json.dumps({"text": "hi"}) + "\n", "prompts", ["prompt"]),
    "null_prompt": ("np.jsonl", GOOD_LINE + "\n" + json.dumps({"prompt_id": "b", "prompt": None}) + "\n",
                    "prompts", ["2", "prompt"]),
    "empty_prompt": ("ep.jsonl", GOOD_LINE + "\n" + json.dumps({"prompt_id": "b", "prompt": "  "}) + "\n",
                     "prompts", ["2", "prompt"]),
    "prompt_not_string": ("pn.jsonl", GOOD_LINE + "\n" + json.dumps({"prompt_id": "b", "prompt": 7}) + "\n",
                          "prompts", ["2", "prompt"]),
    "duplicate_ids": ("d.jsonl", GOOD_LINE + "\n" + GOOD_LINE + "\n", "prompts", ["2", "prompt_id"]),
    "truncated_parquet": ("t.parquet", "TRUNCATED", "prompts", []),
    "unknown_extension": ("p.xml", "<a/>", "prompts", []),
    "parquet_wrong_type": ("w.parquet", pa.table({"prompt_id": ["a", "b"], "prompt": [1, 2]}), "prompts",
                           ["prompt"]),
    "pairs_missing_column": ("pm.parquet", _pairs().drop(["chosen"]), "pairs", ["chosen"]),
    "pairs_wrong_type": ("pw.parquet", _pairs(chosen_score=["1", "1", None]), "pairs", ["chosen_score"]),
    "pairs_chosen_equals_rejected": ("pe.parquet", _pairs(rejected=["r1", "S c2", "r3"]), "pairs",
                                     ["row 1", "rejected"]),
    "pairs_prefix_not_prefix": ("pp.parquet", _pairs(shared_prefix=[None, None, "Z"]), "pairs",
                                ["row 2", "shared_prefix"]),
    "pairs_bad_margin": ("pg.parquet", _pairs(score_margin=[1.0, 0.7, None]), "pairs", ["row 1", "score_margin"]),
    "pairs_null_required": ("pnr.parquet", _pairs(prompt=["x", None, "y"]), "pairs", ["row 1", "prompt"]),
    "pairs_bad_status": ("ps.parquet", _pairs(status=["ok", "done", "ok"]), "pairs", ["row 1", "status"]),
    "lists_non_list": ("l.parquet", pa.table({"prompt_id": ["a"], "prompt": ["x"], "responses": ["r1 r2"],
                                              "scores": [[1.0, 0.0]], "method": ["tpo"], "extra": ["{}"],
                                              "row_key": ["k"], "status": ["ok"]}), "lists", ["responses"]),
    "lists_length_mismatch": ("lm.parquet", pa.table({"prompt_id": ["a"], "prompt": ["x"],
                                                      "responses": [["r1", "r2"]], "scores": [[1.0]],
                                                      "method": ["tpo"], "extra": ["{}"], "row_key": ["k"],
                                                      "status": ["ok"]}), "lists", ["row 0", "scores"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_command_rejects(tmp_path, monkeypatch, capsys, name):
    fname, content, kind, fragments = CASES[name]
    path = tmp_path / fname
    if content is not None:
        _write(path, content)
    code, msg = run_cli(monkeypatch, capsys, "validate", path, "--kind", kind)
    assert code != 0, msg
    assert fname in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n][2] == "prompts"])
def test_stage_command_rejects_and_writes_nothing(tmp_path, monkeypatch, capsys, name):
    fname, content, kind, fragments = CASES[name]
    path = tmp_path / fname
    if content is not None:
        _write(path, content)
    run_dir = tmp_path / "run"
    code, msg = run_cli(monkeypatch, capsys, "stage", "toy-pairs", "--input", path, "--run-dir", run_dir)
    assert code != 0 and fname in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert not (run_dir / "toy-pairs").exists()  # nothing half-written


def test_bad_config_value_names_the_field(tmp_path, monkeypatch, capsys):
    prompts = _write(tmp_path / "ok.jsonl", GOOD_LINE + "\n")
    cfg = _write(tmp_path / "cfg.yaml", "fail_every: many\n")
    code, msg = run_cli(monkeypatch, capsys, "stage", "toy-pairs", "-i", prompts, "-o", tmp_path / "run",
                        "--config", cfg)
    assert code == 2 and "cfg.yaml" in msg and "fail_every" in msg, msg
    assert not (tmp_path / "run").exists()


def test_stage_command_runs_and_inspect_reports(tmp_path, monkeypatch, capsys):
    prompts = _write(tmp_path / "ok.jsonl", "\n".join(json.dumps({"prompt_id": f"p-{i}", "prompt": f"q{i}"})
                                                     for i in range(10)) + "\n")
    code, msg = run_cli(monkeypatch, capsys, "stage", "toy-pairs", "-i", prompts, "-o", tmp_path / "run",
                        "--shard-size", "4")
    assert code == 0, msg
    code, msg = run_cli(monkeypatch, capsys, "inspect", tmp_path / "run", "--json")
    report = json.loads(msg)
    assert report["toy-pairs"]["outputs"]["main"]["rows"] == 10
    assert report["toy-pairs"]["outputs"]["main"]["status"] == {"ok": 10}
    assert report["toy-pairs"]["shards"] == 3
    code, msg = run_cli(monkeypatch, capsys, "fingerprint", tmp_path / "run", "toy-pairs")
    fp = json.loads(msg)
    assert fp["inputs"]["stage"] == "toy-pairs" and fp["inputs"]["config"] == {"seed": 0, "fail_every": 0}
