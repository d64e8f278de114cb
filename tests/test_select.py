import datetime as dt

import pyarrow as pa

from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
import stages.select  # noqa: F401


def _pairs():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    n = 6
    return pa.table({
        "pair_id": [f"id{i}" for i in range(n)], "prompt_id": ["a", "a", "a", "b", "b", "c"],
        "prompt": ["q"] * n, "chosen": [f"c{i}" for i in range(n)], "rejected": [f"r{i}" for i in range(n)],
        "stage": ["tree"] * n, "method": ["tree_plv"] * 5 + ["prism_mcts"],
        "chosen_score": [1.0, 1.0, 1.0, 1.0, 0.5, 1.0], "rejected_score": [0.0] * n,
        "score_margin": [1.0, 1.0, 1.0, 1.0, 0.5, 1.0], "generator_model": ["g"] * n, "created_at": [now] * n,
        "extra": ["{}"] * n, "row_key": [f"k{i}" for i in range(n)], "status": ["ok"] * n,
        "pair_type": ["first_wrong_step", "terminal", "first_wrong_step", "first_wrong_step", "first_wrong_step",
                      "first_wrong_step"]})


def test_select_marks_filtered_with_reasons(tmp_path):
    cfg = get_stage("select-pairs").config(pair_types=["first_wrong_step"], methods=["tree_plv"], min_margin=0.6,
                                           max_per_prompt=1)
    res = run_stage(get_stage("select-pairs"), _pairs(), cfg, None, RunStore(tmp_path), progress=False)
    t = res.read()
    assert t.column("status").to_pylist() == ["ok", "filtered", "filtered", "ok", "filtered", "filtered"]
    assert t.column("error").to_pylist() == [
        None, "pair_type terminal not selected", "more than 1 pairs for this prompt", None,
        "score_margin below 0.6", "method prism_mcts not selected"]
    assert t.schema.field("prompt").type == pa.string()   # cast back from polars' large_string
    assert res.summary["status"]["main"] == {"ok": 2, "filtered": 4}
