"""Hostile input through the real CLI (issue #28): every case ends with exit 2, one `error:` line naming the
place (file, and row/column where there is one), and nothing written. Each case has a timeout, so a hang
(a parent cycle in a tree table, a 1 MB prompt) fails instead of stalling the suite.

Cases are (command, setup) pairs built below; `setup(tmp)` writes the hostile input into tmp and returns the
CLI arguments and the fragments the message must contain.
"""
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tests.helpers.toy_stage  # noqa: F401  (registers toy-pairs)
from tests.helpers.cli import run_cli
from tests.helpers.tables import pairs_table
from flows import app as cli
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.stage_cli import register_stage_commands
from pipeline.store import RunStore
from tests.helpers.toy_stage import ToyConfig, prompts

register_stage_commands(cli.stage_app, [get_stage("toy-pairs")])


def snapshot(root: Path) -> dict:
    """Every file under root with its size and mtime: 'nothing written' is this unchanged."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- table builders
pairs = pairs_table


def lists(**over) -> pa.Table:
    base = {"prompt_id": ["a", "b"], "prompt": ["x", "y"], "responses": [["r1", "r2"], ["s1", "s2", "s3"]],
            "scores": [[1.0, 0.0], [0.5, 0.2, 0.1]], "method": ["tpo"] * 2, "extra": ["{}"] * 2,
            "row_key": ["k1", "k2"], "status": ["ok"] * 2}
    base.update(over)
    return pa.table(base)


def generations(**over) -> pa.Table:
    base = {"prompt_id": ["a", "a"], "prompt": ["x", "x"], "sample_index": [0, 1], "text": ["t0", "t1"],
            "model": ["m"] * 2, "sampling": ["{}"] * 2, "row_key": ["k1", "k2"], "status": ["ok"] * 2}
    base.update(over)
    return pa.table(base)


def node(i, parent, depth=1, **kw) -> dict:
    return {"node_id": i, "parent_id": parent, "depth": depth, "step_text": f"step {i}", "is_terminal": False,
            "visits": 1, "value_sum": 0.5, **kw}


GOOD_NODES = [node("0", None, 0), node("0.1", "0"), node("0.2", "0"), node("0.1.1", "0.1", 2)]


def trees(second_tree_nodes=None, **over) -> pa.Table:
    """Two trees; the second one's nodes are the hostile part (row 1)."""
    base = {"tree_id": ["t0", "t1"], "prompt_id": ["p0", "p1"], "prompt": ["q0", "q1"], "method": ["mcts"] * 2,
            "nodes": [GOOD_NODES, GOOD_NODES if second_tree_nodes is None else second_tree_nodes],
            "generator_model": ["g"] * 2, "extra": ['{"join": "\\n"}'] * 2, "row_key": ["k0", "k1"],
            "status": ["ok"] * 2}
    base.update(over)
    # types inferred (int64 depths, ...): `validate` casts them to TREES, and hostile values need not fit it
    return pa.Table.from_pylist([dict(zip(base, v)) for v in zip(*base.values())])


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


GOOD = {"prompt_id": "a", "prompt": "What is 2+2?"}
nan, inf = float("nan"), float("inf")

# ------------------------------------------------------------------- validate --kind K FILE (table content)
# name -> (kind, content (a table: parquet; bytes: .jsonl), fragments the message must hold besides the file)
TABLES = {
    # pairs: numbers
    "pairs_nan_chosen_score": ("pairs", pairs(chosen_score=[nan, 1.0, None], score_margin=[None, 0.5, None]),
                               ["row 0", "chosen_score", "finite"]),
    "pairs_inf_rejected_score": ("pairs", pairs(rejected_score=[0.0, inf, None]), ["row 1", "rejected_score"]),
    "pairs_neg_inf_margin": ("pairs", pairs(score_margin=[-inf, 0.5, None]), ["row 0", "score_margin"]),
    "pairs_nan_margin_alone": ("pairs", pairs(chosen_score=[None] * 3, rejected_score=[None] * 3,
                                              score_margin=[None, None, nan]), ["row 2", "score_margin"]),
    "pairs_nan_confidence": ("pairs", pairs(label_confidence=[nan, 0.5, 0.5]), ["row 0", "label_confidence"]),
    "pairs_confidence_above_1": ("pairs", pairs(label_confidence=[0.5, 1.5, None]), ["row 1", "label_confidence"]),
    "pairs_confidence_below_0": ("pairs", pairs(label_confidence=[None, None, -0.1]),
                                 ["row 2", "label_confidence"]),
    "pairs_inf_confidence": ("pairs", pairs(label_confidence=[inf, 0.5, 0.5]), ["row 0", "label_confidence"]),
    "pairs_bad_margin": ("pairs", pairs(score_margin=[1.0, 0.7, None]), ["row 1", "score_margin"]),
    "pairs_margin_missing": ("pairs", pairs(score_margin=[None, 0.5, None]), ["row 0", "score_margin"]),
    # pairs: keys
    "pairs_duplicate_row_key": ("pairs", pairs(row_key=["k1", "k1", "k3"]), ["row 1", "row_key"]),
    "pairs_duplicate_pair_id": ("pairs", pairs(pair_id=["a", "b", "a"]), ["row 2", "pair_id"]),
    "pairs_null_row_key": ("pairs", pairs(row_key=["k1", None, "k3"]), ["row 1", "row_key"]),
    "pairs_null_pair_id": ("pairs", pairs(pair_id=[None, "b", "c"]), ["row 0", "pair_id"]),
    # pairs: JSON columns
    "pairs_extra_not_json": ("pairs", pairs(extra=["{}", "{bad", "{}"]), ["row 1", "extra", "JSON"]),
    "pairs_extra_json_list": ("pairs", pairs(extra=["{}", "{}", "[1, 2]"]), ["row 2", "extra", "object"]),
    "pairs_extra_json_string": ("pairs", pairs(extra=['"x"', "{}", "{}"]), ["row 0", "extra"]),
    "pairs_extra_json_number": ("pairs", pairs(extra=["{}", "3", "{}"]), ["row 1", "extra"]),
    "pairs_extra_null": ("pairs", pairs(extra=["{}", None, "{}"]), ["row 1", "extra"]),
    "pairs_extra_empty_string": ("pairs", pairs(extra=["", "{}", "{}"]), ["row 0", "extra"]),
    "pairs_extra_nan_literal": ("pairs", pairs(extra=["{}", "{}", "NaN"]), ["row 2", "extra"]),
    "pairs_prompt_messages_not_json": ("pairs", pairs(prompt_messages=[None, "[{", None]),
                                       ["row 1", "prompt_messages"]),
    "pairs_prompt_messages_object": ("pairs", pairs(prompt_messages=['{"role": "user"}', None, None]),
                                     ["row 0", "prompt_messages", "array"]),
    # pairs: texts
    "pairs_chosen_equals_rejected": ("pairs", pairs(rejected=["r1", "S c2", "r3"]), ["row 1", "rejected"]),
    "pairs_empty_chosen": ("pairs", pairs(chosen=["", "S c2", "c3"]), ["row 0", "chosen", "empty"]),
    "pairs_blank_rejected": ("pairs", pairs(rejected=["r1", "S r2", "  \n"]), ["row 2", "rejected", "empty"]),
    "pairs_null_chosen": ("pairs", pairs(chosen=["c1", None, "c3"]), ["row 1", "chosen"]),
    "pairs_null_prompt": ("pairs", pairs(prompt=["x", None, "y"]), ["row 1", "prompt"]),
    "pairs_prefix_not_prefix": ("pairs", pairs(shared_prefix=[None, None, "Z"]), ["row 2", "shared_prefix"]),
    "pairs_prefix_not_prefix_of_rejected": ("pairs", pairs(rejected=["r1", "T r2", "r3"]),
                                            ["row 1", "shared_prefix"]),
    # pairs: types and columns
    "pairs_missing_chosen": ("pairs", pairs().drop(["chosen"]), ["chosen"]),
    "pairs_missing_extra": ("pairs", pairs().drop(["extra"]), ["extra"]),
    "pairs_missing_created_at": ("pairs", pairs().drop(["created_at"]), ["created_at"]),
    "pairs_score_as_string": ("pairs", pairs(chosen_score=["1", "1", None]), ["chosen_score"]),
    "pairs_created_at_string": ("pairs", pairs(created_at=["2026-01-01"] * 3), ["created_at"]),
    "pairs_iteration_string": ("pairs", pairs(iteration=["one", "two", "three"]), ["iteration"]),
    "pairs_iteration_overflow": ("pairs", pairs(iteration=[2 ** 40, 1, 1]), ["iteration"]),
    "pairs_chosen_as_list": ("pairs", pairs(chosen=[["c1"], ["c2"], ["c3"]]), ["chosen"]),
    "pairs_bad_status": ("pairs", pairs(status=["ok", "done", "ok"]), ["row 1", "status"]),
    "pairs_null_status": ("pairs", pairs(status=["ok", None, "ok"]), ["row 1", "status"]),
    "pairs_null_stage": ("pairs", pairs(stage=["tree", None, "tree"]), ["row 1", "stage"]),
    "lists_jsonl_nan_score": ("lists", jsonl(*lists().to_pylist()).replace(b"[1.0, 0.0]", b"[1.0, NaN]"),
                              ["row 0", "scores"]),
    # lists
    "lists_nan_score": ("lists", lists(scores=[[1.0, nan], [0.5, 0.2, 0.1]]), ["row 0", "scores", "finite"]),
    "lists_inf_score": ("lists", lists(scores=[[1.0, 0.0], [0.5, inf, 0.1]]), ["row 1", "scores"]),
    "lists_null_score_item": ("lists", lists(scores=[[1.0, 0.0], [0.5, None, 0.1]]), ["row 1", "scores", "null"]),
    "lists_null_response_item": ("lists", lists(responses=[["r1", None], ["s1", "s2", "s3"]]),
                                 ["row 0", "responses", "null"]),
    "lists_length_mismatch": ("lists", lists(scores=[[1.0], [0.5, 0.2, 0.1]]), ["row 0", "scores"]),
    "lists_single_response": ("lists", lists(responses=[["r1"], ["s1", "s2", "s3"]], scores=[[1.0], [0.5, 0.2, 0.1]]),
                              ["row 0", "responses"]),
    "lists_extra_not_json": ("lists", lists(extra=["{}", "nope"]), ["row 1", "extra"]),
    "lists_duplicate_row_key": ("lists", lists(row_key=["k", "k"]), ["row 1", "row_key"]),
    "lists_responses_not_list": ("lists", lists(responses=["r1 r2", "s"]), ["responses"]),
    "lists_scores_strings": ("lists", lists(scores=[["1", "0"], ["1", "2", "3"]]), ["scores"]),
    "lists_null_steps_item": ("lists", lists(steps=[[["a"], None], None]), ["row 0", "steps", "null"]),
    "lists_missing_method": ("lists", lists().drop(["method"]), ["method"]),
    # generations
    "generations_duplicate_row_key": ("generations", generations(row_key=["k", "k"]), ["row 1", "row_key"]),
    "generations_missing_model": ("generations", generations().drop(["model"]), ["model"]),
    "generations_sample_index_string": ("generations", generations(sample_index=["0", "1"]), ["sample_index"]),
    "generations_n_tokens_float": ("generations", generations(n_tokens=[1.5, 2.0]), ["n_tokens"]),
    "generations_bad_status": ("generations", generations(status=["ok", "maybe"]), ["row 1", "status"]),
    "generations_null_prompt_id": ("generations", generations(prompt_id=[None, "a"]), ["row 0", "prompt_id"]),
    "generations_sample_index_overflow": ("generations", generations(sample_index=[0, 2 ** 40]),
                                          ["sample_index"]),
    # trees: structure (mine-trees used to loop forever on a cycle)
    "trees_parent_cycle": ("trees", trees([node("0", None, 0), node("0.1", "0.2"), node("0.2", "0.1")]),
                           ["row 1", "parent_id", "cycle"]),
    "trees_self_parent": ("trees", trees([node("0", None, 0), node("0.1", "0.1")]), ["row 1", "cycle"]),
    "trees_long_cycle": ("trees", trees([node("0", None, 0)] + [node(f"n{i}", f"n{(i + 1) % 50}") for i in range(50)]),
                         ["row 1", "cycle"]),
    "trees_orphan_parent": ("trees", trees([node("0", None, 0), node("0.1", "0.9")]),
                            ["row 1", "parent_id", "0.9"]),
    "trees_parent_in_other_tree": ("trees", trees([node("0", None, 0), node("0.3", "0.1.1")]),
                                   ["row 1", "parent_id"]),
    "trees_duplicate_node_id": ("trees", trees([node("0", None, 0), node("0.1", "0"), node("0.1", "0")]),
                                ["row 1", "node_id", "duplicate"]),
    "trees_no_root": ("trees", trees([node("0.1", "0.2"), node("0.2", "0.1")]), ["row 1", "root"]),
    "trees_two_roots": ("trees", trees([node("0", None, 0), node("1", None, 0)]), ["row 1", "root"]),
    "trees_root_not_0": ("trees", trees([node("r", None, 0), node("r.1", "r")]), ["row 1", "root"]),
    # trees: values
    "trees_nan_reward": ("trees", trees([node("0", None, 0), node("0.1", "0", reward=nan)]),
                         ["row 1", "nodes.reward"]),
    "trees_inf_value_sum": ("trees", trees([node("0", None, 0, value_sum=inf)]), ["row 1", "nodes.value_sum"]),
    "trees_nan_prior": ("trees", trees([node("0", None, 0), node("0.1", "0", prior=nan)]), ["row 1", "prior"]),
    "trees_nan_q_value": ("trees", trees([node("0", None, 0, q_value=nan)]), ["row 1", "q_value"]),
    "trees_inf_rollout": ("trees", trees([node("0", None, 0, rollout_success=-inf)]), ["row 1", "rollout_success"]),
    "trees_extra_not_json": ("trees", trees(extra=['{"join": "\\n"}', "{"]), ["row 1", "extra"]),
    "trees_duplicate_row_key": ("trees", trees(row_key=["k", "k"]), ["row 1", "row_key"]),
    "trees_null_step_text": ("trees", trees([node("0", None, 0), node("0.1", "0", step_text=None)]),
                             ["row 1", "step_text"]),
    "trees_nodes_not_list": ("trees", trees(nodes=["0", "0"]), ["nodes"]),
    "trees_depth_string": ("trees", trees(nodes=[[node("0", None, "zero")]] * 2), ["nodes"]),
    "trees_empty_method": ("trees", trees(method=["mcts", None]), ["row 1", "method"]),
}


def _write(path: Path, content) -> None:
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    else:
        path.write_bytes(content)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(TABLES))
def test_validate_refuses_table(tmp_path, monkeypatch, capsys, name):
    kind, content, fragments = TABLES[name]
    path = tmp_path / f"{name}.{'parquet' if isinstance(content, pa.Table) else 'jsonl'}"
    _write(path, content)
    before = snapshot(tmp_path)
    code, msg = run_cli(monkeypatch, capsys, "validate", path, "--kind", kind)
    assert code == 2 and msg.startswith("error: "), msg
    assert path.name in msg and all(f in msg for f in fragments), (fragments, msg)
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(n for n in TABLES if TABLES[n][0] == "trees"))
def test_mine_trees_refuses_before_mining(tmp_path, monkeypatch, capsys, name):
    """The stage refuses the same trees `validate` does, before any shard runs (a cycle used to hang here)."""
    _, content, fragments = TABLES[name]
    path = tmp_path / "trees.parquet"
    _write(path, content)
    code, msg = run_cli(monkeypatch, capsys, "stage", "mine-trees", "-i", path, "-o", tmp_path / "run")
    assert code == 2 and "trees.parquet" in msg and all(f in msg for f in fragments), msg
    assert not (tmp_path / "run").exists()


VALID = {
    "dictionary_prompt_column": ("prompts", pa.table({"prompt_id": ["a", "b", "c"],
                                                      "prompt": pa.array(["x", "y", "x"]).dictionary_encode()})),
    "300_distinct_methods": ("pairs", pa.table({
        **{k: v * 100 for k, v in pairs().to_pydict().items()},
        "pair_id": [f"p{i}" for i in range(300)], "row_key": [f"k{i}" for i in range(300)],
        "method": [f"method-{i}" for i in range(300)]})),
    "emoji_escape_pair": ("prompts", jsonl({"prompt_id": "a", "prompt": "smile \ud83d\ude00"})),
    "well_formed_trees": ("trees", trees()),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_validate_accepts_valid_edge_cases(tmp_path, monkeypatch, capsys, name):
    kind, content = VALID[name]
    path = tmp_path / f"{name}.{'parquet' if isinstance(content, pa.Table) else 'jsonl'}"
    _write(path, content)
    code, msg = run_cli(monkeypatch, capsys, "validate", path, "--kind", kind)
    n = content.num_rows if isinstance(content, pa.Table) else 1
    assert code == 0 and f"ok: {n} rows of {kind}" in msg, msg


# ------------------------------------------------------------------ stage toy-pairs -i FILE (prompt inputs)
DEEP = b"[" * 100_000 + b"]" * 100_000
PROMPT_FILES = {
    "unpaired_high_surrogate": ("s.jsonl", jsonl(GOOD, b'{"prompt_id": "b", "prompt": "x\\ud800y"}'),
                                ["row 2", "prompt", "surrogate"]),
    "unpaired_low_surrogate": ("l.jsonl", jsonl(b'{"prompt_id": "b", "prompt": "\\udc00"}'), ["row 1", "surrogate"]),
    "surrogate_in_key": ("k.jsonl", jsonl(GOOD, b'{"prompt_id": "b", "prompt": "x", "\\ud800": 1}'),
                         ["row 2", "surrogate"]),
    "surrogate_in_meta": ("m.jsonl", jsonl(b'{"prompt_id": "b", "prompt": "x", "meta": {"a": ["\\ud800"]}}'),
                          ["row 1", "meta"]),
    "deep_nesting_100k": ("d.jsonl", jsonl(GOOD, b'{"prompt_id": "b", "prompt": "x", "m": ' + DEEP + b"}"),
                          ["row 2", "nested"]),
    "deep_nesting_40": ("d4.jsonl", jsonl(b'{"prompt_id": "b", "prompt": "x", "m": ' + b"[" * 40 + b"]" * 40 + b"}"),
                        ["row 1", "nested"]),
    "deep_nesting_json_array": ("d.json", b"[" + DEEP + b"]", ["nested"]),
    "top_level_array_line": ("a.jsonl", jsonl(GOOD, b"[1, 2]"), ["row 2"]),
    "top_level_string_line": ("st.jsonl", jsonl(b'"just text"'), ["row 1"]),
    "top_level_null_line": ("nl.jsonl", jsonl(GOOD, b"null"), ["row 2"]),
    "truncated_json_line": ("t.jsonl", jsonl(GOOD, b'{"prompt_id": "b", "prompt": "x'), ["row 2"]),
    "invalid_utf8": ("u.jsonl", jsonl(GOOD, b'{"prompt_id": "b", "prompt": "\xff\xfe"}'), ["row 2"]),
    "nul_bytes_line": ("z.jsonl", jsonl(GOOD, b"\x00\x00\x00"), ["row 2"]),
    "prompt_is_list": ("pl.jsonl", jsonl({"prompt_id": "a", "prompt": ["x"]}), ["row 1", "prompt"]),
    "prompt_is_object": ("po.jsonl", jsonl({"prompt_id": "a", "prompt": {"text": "x"}}), ["row 1", "prompt"]),
    "prompt_is_bool": ("pb.jsonl", jsonl({"prompt_id": "a", "prompt": True}), ["row 1", "prompt"]),
    "id_is_float": ("if.jsonl", jsonl({"prompt_id": 1.5, "prompt": "x"}), ["row 1", "prompt_id"]),
    "id_is_bool": ("ib.jsonl", jsonl({"prompt_id": True, "prompt": "x"}), ["row 1", "prompt_id"]),
    "id_is_object": ("io.jsonl", jsonl({"prompt_id": {"a": 1}, "prompt": "x"}), ["row 1", "prompt_id"]),
    "id_null": ("in.jsonl", jsonl(GOOD, {"prompt_id": None, "prompt": "y"}), ["row 2", "prompt_id"]),
    "id_empty": ("ie.jsonl", jsonl(GOOD, {"prompt_id": " ", "prompt": "y"}), ["row 2", "prompt_id"]),
    "id_int_and_string_same": ("is.jsonl", jsonl({"prompt_id": 7, "prompt": "x"}, {"prompt_id": "7", "prompt": "y"}),
                               ["row 2", "prompt_id"]),
    "duplicate_prompts_no_ids": ("dp.jsonl", jsonl({"prompt": "x"}, {"prompt": "x"}), ["row 2"]),
    "mixed_extra_column_types": ("mx.jsonl", jsonl({**GOOD, "n": 1}, {"prompt_id": "b", "prompt": "y", "n": "one"}),
                                 ["n"]),
    "huge_integer": ("hi.jsonl", jsonl({**GOOD, "n": 10 ** 30}), ["n"]),
    "only_blank_lines": ("bl.jsonl", b"\n\n   \n", []),
    "json_array_of_strings": ("as.json", b'["a", "b"]', ["row 1"]),
    "json_array_empty": ("ae.json", b"[]", []),
    "parquet_prompt_int": ("pi.parquet", pa.table({"prompt_id": ["a"], "prompt": [1]}), ["prompt"]),
    "parquet_prompt_null": ("pn.parquet", pa.table({"prompt_id": ["a", "b"], "prompt": ["x", None]}), ["prompt"]),
    "parquet_no_rows": ("pe.parquet", pa.table({"prompt_id": pa.array([], pa.string()),
                                                "prompt": pa.array([], pa.string())}), []),
    "parquet_garbage": ("pg.parquet", b"PAR1" + os.urandom(64) + b"PAR1", []),
    "parquet_empty_file": ("e.parquet", b"", []),
    "directory_without_state": ("somedir", None, []),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PROMPT_FILES))
def test_stage_refuses_prompt_file(tmp_path, monkeypatch, capsys, name):
    fname, content, fragments = PROMPT_FILES[name]
    path = tmp_path / fname
    if content is None:
        path.mkdir()
        (path / "x.txt").write_text("not a dataset")
    else:
        _write(path, content)
    code, msg = run_cli(monkeypatch, capsys, "stage", "toy-pairs", "-i", path, "-o", tmp_path / "run")
    assert code == 2 and msg.startswith("error: ") and fname in msg, msg
    assert all(f in msg for f in fragments), (fragments, msg)
    assert "Traceback" not in msg
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ a run directory, damaged on disk
@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "run"
    run_stage(get_stage("toy-pairs"), prompts(20), ToyConfig(), None, RunStore(root), shard_size=8, progress=False)
    return root


def _manifest_edit(edit):
    def damage(stage_dir: Path) -> str:
        path = stage_dir / "manifest.json"
        m = json.loads(path.read_text())
        out = edit(m)
        path.write_text(json.dumps(m if out is None else out))
        return "manifest.json"
    return damage


def _raw_manifest(data: bytes):
    def damage(stage_dir: Path) -> str:
        (stage_dir / "manifest.json").write_bytes(data)
        return "manifest.json"
    return damage


def _shard(action):
    def damage(stage_dir: Path) -> str:
        path = stage_dir / "part-00001.parquet"
        action(path)
        return "part-00001.parquet"
    return damage


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _shard_files(value):
    return lambda m: m["shards"]["1"]["files"].__setitem__("main", value)


DAMAGE = {
    "manifest_is_list": _raw_manifest(b"[1, 2, 3]"),
    "manifest_is_string": _raw_manifest(b'"manifest"'),
    "manifest_empty_file": _raw_manifest(b""),
    "manifest_truncated_json": _raw_manifest(b'{"format": 1, "shards": {'),
    "manifest_not_utf8": _raw_manifest(b'{"format": "\xff\xfe"}'),
    "manifest_deep_nesting": _raw_manifest(b'{"shards": ' + DEEP + b"}"),
    "manifest_shards_is_list": _manifest_edit(_set("shards", [])),
    "manifest_outputs_is_list": _manifest_edit(_set("outputs", ["main"])),
    "manifest_missing_fingerprint": _manifest_edit(lambda m: m.pop("fingerprint")),
    "manifest_shard_size_zero": _manifest_edit(_set("shard_size", 0)),
    "manifest_shard_size_string": _manifest_edit(_set("shard_size", "8")),
    "manifest_complete_string": _manifest_edit(_set("complete", "yes")),
    "manifest_escaping_shard_path": _manifest_edit(_shard_files("../../../etc/passwd")),
    "manifest_absolute_shard_path": _manifest_edit(_shard_files("/etc/passwd")),
    "manifest_other_shard_name": _manifest_edit(_shard_files("part-00000.parquet")),
    "manifest_escaping_output_name": _manifest_edit(lambda m: m.__setitem__("outputs", {
        **m["outputs"], "x/../../..": "pairs"})),
    "manifest_shard_index_negative": _manifest_edit(lambda m: m["shards"].__setitem__("-1", m["shards"]["0"])),
    "manifest_shard_index_past_end": _manifest_edit(lambda m: m["shards"].__setitem__("99", m["shards"]["0"])),
    "manifest_shard_is_string": _manifest_edit(lambda m: m["shards"].__setitem__("1", "done")),
    "manifest_rows_string": _manifest_edit(lambda m: m["shards"]["1"]["rows"].__setitem__("main", "8")),
    "manifest_bad_checksum_shape": _manifest_edit(lambda m: m["shards"]["1"].__setitem__("checksums",
                                                                                          {"main": "abc"})),
    "manifest_undeclared_output": _manifest_edit(lambda m: m["shards"]["1"]["files"].__setitem__(
        "other", "other-00001.parquet")),
    "shard_deleted": _shard(lambda p: p.unlink()),
    "shard_truncated": _shard(lambda p: p.write_bytes(p.read_bytes()[:100])),
    "shard_byte_flipped": _shard(_flip_byte),
    "shard_emptied": _shard(lambda p: p.write_bytes(b"")),
    "shard_replaced_by_folder": _shard(lambda p: (p.unlink(), p.mkdir())),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["inspect", "validate", "fingerprint", "export"])
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_run_is_a_clear_error(tmp_path, monkeypatch, capsys, good_run, name, command):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    where = DAMAGE[name](run / "toy-pairs")
    if command == "fingerprint" and name.startswith("shard_"):
        pytest.skip("fingerprint reads only the manifest")
    before = snapshot(run)
    args = {"inspect": ["inspect", run], "validate": ["validate", run / "toy-pairs", "--kind", "pairs"],
            "fingerprint": ["fingerprint", run], "export": ["export", run, "--out", tmp_path / "hub"]}[command]
    code, msg = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and msg.startswith("error: ") and where in msg, msg
    assert "Traceback" not in msg
    assert snapshot(run) == before and not (tmp_path / "hub").exists()


# ------------------------------------------------------------------------------------- places and options
def _readonly_dir(tmp: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /sys is a read-only file system even for root
        return Path("/sys/prefpipe-test-run")
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d / "run"


PLACES = {
    "output_is_a_file": lambda tmp: (["stage", "toy-pairs", "-i", _prompts(tmp), "-o", _file(tmp, "out.txt")],
                                     "out.txt"),
    "output_read_only": lambda tmp: (["stage", "toy-pairs", "-i", _prompts(tmp), "-o", _readonly_dir(tmp)],
                                     "run"),
    "output_under_a_file": lambda tmp: (["stage", "toy-pairs", "-i", _prompts(tmp), "-o",
                                         _file(tmp, "f.txt") / "run"], "f.txt"),
    "inspect_empty_folder": lambda tmp: (["inspect", _dir(tmp, "empty")], "empty"),
    "inspect_folder_of_files": lambda tmp: (["inspect", _prompts(tmp).parent], "not a run directory"),
    "inspect_missing_folder": lambda tmp: (["inspect", tmp / "nope"], "nope"),
    "inspect_a_file": lambda tmp: (["inspect", _file(tmp, "x.txt")], "x.txt is a file"),
    "fingerprint_empty_folder": lambda tmp: (["fingerprint", _dir(tmp, "empty")], "empty"),
    "validate_unknown_kind": lambda tmp: (["validate", _prompts(tmp), "--kind", "pears"], "pears"),
    "stage_input_unknown_output": lambda tmp: (["stage", "mine-trees", "-i", f"{_stage_dir(tmp)}@nothing", "-o",
                                                tmp / "run"], "nothing"),
    "stage_unknown_stage_output_dir": lambda tmp: (["validate", f"{_stage_dir(tmp)}@nothing", "--kind", "trees"],
                                                   "nothing"),
    "stage_id_with_dotdot_in_manifest_dir": lambda tmp: (["inspect", tmp, "--stage", "../etc"], "../etc"),
}


def _prompts(tmp: Path) -> Path:
    p = tmp / "in" / "prompts.jsonl"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(jsonl(GOOD))
    return p


def _file(tmp: Path, name: str) -> Path:
    (tmp / name).write_text("a file")
    return tmp / name


def _dir(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def _stage_dir(tmp: Path) -> Path:
    run = tmp / "made"
    run_stage(get_stage("toy-pairs"), prompts(3), ToyConfig(), None, RunStore(run), progress=False)
    return run / "toy-pairs"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PLACES))
def test_bad_place_is_a_clear_error(tmp_path, monkeypatch, capsys, name):
    args, fragment = PLACES[name](tmp_path)
    before = snapshot(tmp_path)
    code, msg = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and msg.startswith("error: ") and fragment in msg, msg
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- a stage that finds bad input in its rows
@pytest.fixture
def picky_stage():
    """A stage whose run refuses a row (as stages do with a malformed `meta`), registered for this test."""
    from pipeline.stage import StageConfig, _REGISTRY, register_stage
    from schemas.errors import InputError

    @register_stage("picky", config=StageConfig, input_kind="prompts", outputs={"main": "prompts"},
                    needs_backend=False)
    def run(rows, cfg, backend, ctx):
        raise InputError("this stage refuses row 'b'", column="meta")
    register_stage_commands(cli.stage_app, [get_stage("picky")])
    yield
    _REGISTRY.pop("picky")


@pytest.mark.timeout(60)
def test_stage_input_error_in_its_rows_leaves_nothing(tmp_path, monkeypatch, capsys, picky_stage):
    path = tmp_path / "p.jsonl"
    _write(path, jsonl(GOOD))
    code, msg = run_cli(monkeypatch, capsys, "stage", "picky", "-i", path, "-o", tmp_path / "run")
    assert code == 2 and "refuses row 'b'" in msg, msg
    assert not (tmp_path / "run").exists()
    (tmp_path / "run2").mkdir()  # an existing run directory stays; only the new stage folder goes
    code, msg = run_cli(monkeypatch, capsys, "stage", "picky", "-i", path, "-o", tmp_path / "run2")
    assert code == 2 and list((tmp_path / "run2").iterdir()) == []
