"""The run report's judged-stage section (flows/judged.py): the judges each stage asked, the keep rate over input
items, the reasons for the rest, and agreement with gold, on hand-made tables and on a real reward-relabel
stage judged by the scripted judge server."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from flows.judged import full_solution_pairs, judged_info, judges_of, keep_stats, list_order_agreement

HTTP = {"model": "smollm2-135m", "backend": "http", "base_url": "http://127.0.0.1:8000/v1"}


def test_judges_are_named_from_the_step_config(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")  # a reward-model folder, as the configs check at load
    rm = str(tmp_path / "rm")
    assert judges_of("rationales", {"judge": HTTP}) == ["smollm2-135m (http, auto)"]
    assert judges_of("rationales", {}) == []  # the regex reader is no judge
    assert judges_of("deliberation", {}) == ["the agents' own model"]
    assert judges_of("deliberation", {"judge_model": "m", "judge_mode": "votes"}) == ["m (transformers, votes)"]
    assert judges_of("intervention", {"mode": "safety_trigger", "harm_judges": [HTTP, {**HTTP, "mode": "votes"}]}) \
        == ["smollm2-135m (http, auto)", "smollm2-135m (http, votes)"]
    assert judges_of("intervention", {"mode": "math_correction"}) == []
    assert judges_of("reward-relabel", {"score_source": "columns"}) == []
    assert judges_of("reward-relabel", {"score_source": "reward_model", "score_model": rm}) == [f"reward model {rm}"]
    assert judges_of("reward-relabel", {"score_source": "judge", "score_model": "m"}) == ["m"]
    assert judges_of("tree-search", {"value_fn": "logprob"}) == []
    assert judges_of("tree-search", {"value_fn": "judge", "variant": "tpo_list", "list_score": "reward_model",
                                     "value_model": rm}) == ["node values: the stage's own model",
                                                             f"lists: reward model {rm}"]
    assert judges_of("sample-pairs", {}) == []  # a stage with no judge option: the base config's []


def test_keep_rate_counts_relabel_input_pairs_not_rows():
    t = pa.table({"source_pair_id": ["a", "a", "b", "c", "d", "d"],
                  "status": ["ok", "ok", "filtered", "failed", "ok", "ok"],
                  "error": [None, None, "score tie (5): its two rows would contradict each other",
                            "judge_error: unparseable", None, None]})
    assert keep_stats(t) == {"items": 4, "kept": 2, "keep_rate": 0.5,
                             "reasons": {"score tie (5)": 1, "judge_error": 1}}
    rows = pa.table({"status": ["ok", "filtered", "filtered", "ok"],
                     "error": [None, "argues_neither: flips", "argues_neither: flips", None]})
    assert keep_stats(rows) == {"items": 4, "kept": 2, "keep_rate": 0.5, "reasons": {"argues_neither": 2}}


def test_gold_is_read_on_ok_unflipped_whole_response_pairs():
    t = pa.table({"pair_id": list("abcde"), "status": ["ok", "ok", "ok", "filtered", "ok"],
                  "flipped": [False, True, False, False, False],
                  "chosen_is_terminal": [True, True, False, True, True],
                  "rejected_is_terminal": [True, True, True, True, True]})
    assert full_solution_pairs(t)["pair_id"].to_pylist() == ["a", "e"]
    assert full_solution_pairs(t)["shared_prefix"].null_count == 2
    seen = []
    info = judged_info("reward-relabel", {"score_source": "judge", "judge": HTTP},
                       lambda out="main": t.append_column("error", pa.nulls(5, pa.string())),
                       {"main": "pairs"}, lambda pairs: seen.append(pairs["pair_id"].to_pylist()) or {"n": 2})
    assert seen == [["a", "e"]] and info["gold"] == {"n": 2} and info["keep_rate"] == 0.8


def test_list_order_agreement_counts_the_pairs_the_verifier_orders():
    lists = pa.table({"scores": [[9.0, 7.0, 7.0, 2.0], [0.9, 0.2]],
                      "extra": [json.dumps({"verifier_scores": [1.0, 0.5, 1.0, 0.0]}), json.dumps({})]})
    # verifier-ordered pairs: (0,1) agree, (0,3) agree, (1,2) model tie: no, (1,3) agree, (2,3) agree
    assert list_order_agreement(lists) == {"pairs": 5, "agree": 4, "agree_share": 0.8}
    assert list_order_agreement(lists.slice(1)) is None


def test_report_lists_a_judged_relabel_stage(tmp_path):
    """A reward-relabel stage judged by the scripted judge (tests/test_judges_stages.py: 3 pairs scored, one
    answer that does not parse) through the engine into a run folder; the report counts it."""
    from flows.config import RunConfig
    from flows.report import write_report
    from pipeline.backends.testserver import serving
    from pipeline.engine import run_stage
    from pipeline.judges.config import JudgeConfig
    from pipeline.judges.scripted import ScriptedJudgeModel
    from pipeline.stage import get_stage
    from pipeline.store import RunStore
    from stages.reward_relabel import RewardRelabelConfig
    from tests.test_judges_stages import scorer
    from tests.test_reward_relabel import golden_input

    with serving(ScriptedJudgeModel(scorer), served_model="scorer") as srv:
        judge = {"model": "scorer", "backend": "http", "base_url": srv.url}
        stage_cfg = {"score_source": "judge", "judge": judge, "judge_scale": [0, 5], "filter_fine_scores": False}
        run_stage(get_stage("reward-relabel"), golden_input(),
                  RewardRelabelConfig(**{**stage_cfg, "judge": JudgeConfig(**judge)}), None,
                  RunStore(tmp_path / "run"), progress=False, fail_threshold=0.5)
    cfg = RunConfig(name="judged", output_dir=str(tmp_path / "run"), inputs={"file": "unused.jsonl"},
                    stages=[{"stage": "reward-relabel", "config": stage_cfg}])
    out = write_report(cfg, tmp_path / "judged.yaml")
    judged = json.loads((out / "summary.json").read_text())["stages"]["reward-relabel"]["judged"]
    assert judged["judges"] == ["scorer (http, auto)"]
    # p1-p3 scored (none tied on the 0-5 scale), p4's rejected answer unparseable: 3 of 4 pairs kept
    assert (judged["items"], judged["kept"], judged["keep_rate"]) == (4, 3, pytest.approx(0.75))
    assert judged["reasons"] == {"judge on rejected": 1} and judged["gold"] is None
    md = (out / "report.md").read_text()
    assert "| reward-relabel | scorer (http, auto) | 3/4 | 75 % | judge on rejected 1 | no gold |" in md
