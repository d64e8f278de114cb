"""TPO lists scored by a judge (tree search `list_score: judge`): the scripted judge model behind the project's
OpenAI-compatible test server, read chat-only, gives each response a score by a known rule, so every list score,
every left-out response and the scale the TPO loss maps its labels from are known exactly."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.backends.testserver import serving
from pipeline.judges.config import JudgeConfig
from pipeline.judges.scripted import ScriptedJudgeModel
from pipeline.stage import StageContext
from pipeline.train.data import declared_score_range
from pipeline.train.losses.types import ListLossConfig
from stages.tree.nodes import trees_from_table
from stages.tree_search import TreeSearchConfig, run
from tests.test_tree_search_fake import FakeArithBackend, task_rows

SCALE = (0, 5)


def rule_score(response: str) -> int | None:
    """The judge's score of a response: its length modulo 6; None (an answer that does not parse) when the
    length is a multiple of 7."""
    return None if len(response) % 7 == 0 else len(response) % 6


def list_judge(q: str) -> str:
    response = re.search(r"Response: (.*)\n\nGive one whole number from 0 to 5", q, re.S).group(1)
    score = rule_score(response)
    return "I would rather not say." if score is None else str(score)


@pytest.fixture(scope="module")
def judged():
    problems, table = task_rows(6)
    with serving(ScriptedJudgeModel(list_judge), served_model="lister") as srv:
        judge = JudgeConfig(model="lister", backend="http", base_url=srv.url)
        cfg = TreeSearchConfig(variant="tpo_list", value_fn="step_verifier", list_score="judge", judge=judge,
                               list_scale=SCALE, num_branches=3, list_samples=2, validity_rollouts=0,
                               tie_policy="keep")
        return run(table, cfg, FakeArithBackend(problems, 0.5), StageContext("fp", 0, 7))


def test_tpo_lists_ranked_by_the_judge_on_its_declared_scale(judged):
    trees = {t.prompt_id: t for t, _ in trees_from_table(judged["trees"])}
    lists = judged["lists"].to_pylist()
    assert lists
    for lst in lists:
        tree = trees[lst["prompt_id"]]
        scored = [r for r in dict.fromkeys(tree.response(n) for n in tree.nodes.values() if n.is_terminal)
                  if rule_score(r) is not None]
        want = sorted(scored, key=lambda r: -rule_score(r))  # stable: equal scores keep the tree's order
        if len(want) > 5:  # list_size: the best, the worst and evenly spaced ranks between
            want = [want[round(i * (len(want) - 1) / 4)] for i in range(5)]
        assert lst["responses"] == want
        assert lst["scores"] == [float(rule_score(r)) for r in want]
        assert lst["scores"] == sorted(lst["scores"], reverse=True)
        assert (lst["score_min"], lst["score_max"]) == (0.0, 5.0)
        assert json.loads(lst["extra"])["scored_by"]["model"] == "lister"
    # The lists declare the judge's scale, and the TPO loss maps its labels from it.
    assert declared_score_range(judged["lists"]) == (0.0, 5.0)
    assert ListLossConfig(loss_type="tpo").labels_on(declared_score_range(judged["lists"])).tpo_label_range == \
        (0.0, 5.0)
    for p in judged["main"].to_pylist():
        if p["pair_type"] == "list":
            assert (p["score_min"], p["score_max"]) == (0.0, 5.0)


def test_an_unparsed_judge_answer_leaves_the_response_out_with_its_raw_text(judged):
    left_out = 0
    for t, _ in trees_from_table(judged["trees"]):
        info = t.info
        assert info["list_scale"] == [0.0, 5.0] and info["list_scorer"]["kind"] == "judge"
        assert info["list_scorer"]["template"].startswith("pointwise-")
        for n in t.nodes.values():
            if not n.is_terminal:
                continue
            score = rule_score(t.response(n))
            if score is None:
                left_out += 1
                assert n.node_id not in info["list_scores"]
                assert "I would rather not say." in info["list_errors"][n.node_id]
                assert "I would rather not say." in info["list_raw"][n.node_id]
            else:
                assert info["list_scores"][n.node_id] == score and n.node_id not in info["list_errors"]
    assert left_out > 0  # the case is exercised


def test_list_score_is_checked_at_load():
    with pytest.raises(ValueError, match="needs variant tpo_list"):
        TreeSearchConfig(variant="mcts", list_score="judge")
    with pytest.raises(ValueError, match="value_model"):
        TreeSearchConfig(variant="tpo_list", list_score="reward_model")
    with pytest.raises(ValueError, match="low must be below high"):
        TreeSearchConfig(variant="tpo_list", list_score="judge", list_scale=(5, 5))
