"""The run report's tree-search row: stages/tree/quality.py's numbers on the stage's own pairs and trees."""
import json

from flows.config import load_run_config
from flows.report import _stage_stats
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
from stages.tree.quality import quality_report
from stages.tree_search import TreeSearchConfig
from tests.test_tree_search_fake import FakeArithBackend, task_rows


def test_report_carries_the_tree_pairs_quality(tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps({"name": "q", "output_dir": str(tmp_path / "run"), "model": "tiny-policy",
                                    "inputs": {"task": {"preset": "tiny", "split": "train", "n": 6}},
                                    "stages": [{"id": "tree", "stage": "tree-search",
                                                "config": {"variant": "mcts", "iterations": 24}}]}))
    cfg, _ = load_run_config(cfg_path)
    problems, table = task_rows(6)
    res = run_stage(get_stage("tree-search"), table, TreeSearchConfig(variant="mcts", iterations=24),
                    FakeArithBackend(problems, 0.7), RunStore(tmp_path / "run"), folder="tree", progress=False)
    got = _stage_stats(cfg)["tree"]["quality"]
    assert got == quality_report(res.read(), res.read("trees"))
    # the fake policy's step pairs all verify: chosen step right, rejected step wrong
    assert got["step_pairs"] > 0 and got["step_chosen_right_rejected_wrong"] == 1.0
