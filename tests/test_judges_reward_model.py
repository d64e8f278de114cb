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
