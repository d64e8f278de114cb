"""The reward-model fixture (a tiny Llama classifier trained to prefer "Answer: A" over "Answer: B", made by
tests/test_reward_model.py) through the stages that take it as a score source: reward-relabel
`score_source: reward_model` and TPO lists scored by it (tree search `list_score: reward_model`), each in one
batched scoring call, with the scores the scorer gives placed on the source's scale."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from pipeline.judges.reward_model import load_scorer
from pipeline.stage import StageContext
from tests.test_reward_model import PROBLEMS, _pairs, trained  # noqa: F401  (the module-scoped fixture)


def sigmoid(s: float) -> float:
    return 1.0 / (1.0 + math.exp(-s))


def _count_score_calls(monkeypatch, folder: str) -> list[int]:
    """Record the number of responses of every call the cached scorer of `folder` gets."""
    scorer = load_scorer(folder)
    calls, real = [], scorer.score
    monkeypatch.setattr(scorer, "score", lambda p, r: calls.append(len(r)) or real(p, r))
    return calls


def test_reward_relabel_scores_pairs_as_the_reward_model_was_trained(trained, monkeypatch):
    from stages.reward_relabel import RewardRelabelConfig, run

    _, out = trained
    folder = str(out / "final")
    rows = [{**r, "pair_id": f"pair-{i}", "status": "ok"} for i, r in enumerate(_pairs(PROBLEMS[:6]))]
    calls = _count_score_calls(monkeypatch, folder)
    cfg = RewardRelabelConfig(score_source="reward_model", score_model=folder)
    res = run(pa.Table.from_pylist(rows), cfg, None, StageContext("fp", 0, 1))["main"].to_pylist()
    assert calls == [12]  # 6 pairs, both sides, one call
    raw = load_scorer(folder).score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] +
                                    [r["rejected"] for r in rows])
    want_c = [round(1 + 9 * sigmoid(s), 1) for s in raw[:6]]
    want_r = [round(1 + 9 * sigmoid(s), 1) for s in raw[6:]]
    kept = [r for r in res if not r["flipped"]]
    assert [r["status"] for r in res] == ["ok"] * 12  # the fixture separates every pair by more than 0.05
    assert [(r["chosen_score"], r["rejected_score"]) for r in kept] == list(zip(want_c, want_r))
    assert all(c > r for c, r in zip(want_c, want_r))  # its training: A over B
    flipped = [r for r in res if r["flipped"]]
    assert [r["goal_score"] for r in flipped] == want_r and all(r["chosen"].endswith("B") for r in flipped)
    assert {r["score_source"] for r in res} == {"reward_model"}
    assert json.loads(kept[0]["extra"])["source_range"] == [0.0, 1.0]
    assert (kept[0]["score_min"], kept[0]["score_max"]) == (1.0, 10.0)


def test_reward_relabel_reward_model_needs_a_folder_and_a_mapping_off_its_scale(tmp_path):
    from stages.reward_relabel import RewardRelabelConfig

    with pytest.raises(ValueError, match="needs score_model, a reward-model folder"):
        RewardRelabelConfig(score_source="reward_model")
    with pytest.raises(ValueError, match="needs score_model, a reward-model folder"):
        RewardRelabelConfig(score_source="reward_model", score_model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="identity"):
        RewardRelabelConfig(score_source="reward_model", score_model=str(tmp_path), score_mapping="identity")
    assert RewardRelabelConfig(score_source="reward_model", score_model=str(tmp_path)).mapping == "range"


def test_tpo_lists_ranked_by_the_reward_model_on_its_declared_scale(trained, monkeypatch):
    """TPO lists on the bundled task (scripted policy, exact step values) scored by the reward model: one scoring
    call for every distinct terminal response of every tree; list scores are σ of those scores on [0, 1], which
    the lists and their (best, worst) pairs declare; each list keeps the verifier's grades next to them."""
    from stages.tree.mining import graded_score
    from stages.tree.nodes import trees_from_table
    from stages.tree.verifier import task_from_info
    from stages.tree_search import TreeSearchConfig, run
    from tests.test_tree_search_fake import FakeArithBackend, task_rows

    _, out = trained
    folder = str(out / "final")
    problems, table = task_rows(4)
    scorer = load_scorer(folder)
    seen, real = [], scorer.score
    monkeypatch.setattr(scorer, "score", lambda p, r: seen.append((list(p), list(r), real(p, r))) or seen[-1][2])
    cfg = TreeSearchConfig(variant="tpo_list", value_fn="step_verifier", list_score="reward_model",
                           value_model=folder, num_branches=3, list_samples=2, validity_rollouts=0)
    res = run(table, cfg, FakeArithBackend(problems, 0.5), StageContext("fp", 0, 7))
    assert len(seen) == 1
    prompts, responses, raw = seen[0]
    assert len(set(zip(prompts, responses))) == len(responses)  # each distinct response once
    want = {(p, r): sigmoid(s) for p, r, s in zip(prompts, responses, raw)}
    lists = res["lists"].to_pylist()
    assert len(lists) == 4
    trees = {t.prompt_id: t for t, _ in trees_from_table(res["trees"])}
    for lst in lists:
        assert lst["scores"] == pytest.approx([want[(lst["prompt"], r)] for r in lst["responses"]], abs=1e-12)
        assert lst["scores"] == sorted(lst["scores"], reverse=True)
        assert (lst["score_min"], lst["score_max"]) == (0.0, 1.0)
        extra = json.loads(lst["extra"])
        assert extra["scored_by"] == {"kind": "reward_model", "model": folder}
        tree = trees[lst["prompt_id"]]
        task = task_from_info(tree.prompt, tree.info)
        assert extra["verifier_scores"] == [graded_score(tree, task, tree.nodes[i], tree.method)
                                            for i in extra["node_ids"]]
    list_pairs = [p for p in res["main"].to_pylist() if p["pair_type"] == "list"]
    assert list_pairs and all((p["score_min"], p["score_max"]) == (0.0, 1.0) for p in list_pairs)
    by_prompt = {lst["prompt_id"]: lst for lst in lists}
    for p in list_pairs:
        lst = by_prompt[p["prompt_id"]]
        assert (p["chosen_score"], p["rejected_score"]) == (lst["scores"][0], lst["scores"][-1])
