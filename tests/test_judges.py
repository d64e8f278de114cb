"""The judge primitive against a scripted judge whose behaviour is known exactly (pipeline/judges/scripted.py),
served by the project's OpenAI-compatible test server on 127.0.0.1 and called through the http backend:
chat-only (votes) and with a local tokenizer (log-probs of the answer tokens)."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.backends.http_backend import HTTPBackend
from pipeline.backends.testserver import serving
from pipeline.errors import InputError
from pipeline.judges.config import JudgeConfig, open_judge, require_logprobs
from pipeline.judges.judge import Judge, position_bias
from pipeline.judges.parse import parse_choice, parse_score, parse_yes_no
from pipeline.judges.relabel import swap_labels
from pipeline.judges.scripted import ScriptedJudgeModel, quota

NOISE, BIAS = 0.2, 0.15     # P("A") = NOISE + (1 - 2 NOISE) * [A is good] + BIAS


def _slots(q: str) -> tuple[str, str]:
    return re.search(r"Response A: (.*?)\n\nResponse B: (.*?)\n\n", q, re.S).groups()


def rule(q: str, bias: float = BIAS):
    if "MALFORMED" in q:
        return "Both responses have their merits."
    if "REFUSE" in q:
        return "I'm sorry, I can't compare these."
    if "Response A:" in q:
        a, b = _slots(q)
        truth = 0.5 if a.startswith("good") == b.startswith("good") else float(a.startswith("good"))
        p = NOISE + (1 - 2 * NOISE) * truth + bias
        return {"A": p, "B": 1 - p}
    if m := re.search(r"score=(\d+)", q):
        return f"Score: {m.group(1)}"
    if m := re.search(r"p=([\d.]+)", q):
        p = float(m.group(1))
        return {"Yes": p, "No": 1 - p}
    return "?"


@pytest.fixture(scope="module")
def server():
    with serving(ScriptedJudgeModel(rule), served_model="judge") as srv:
        yield srv


def chat_judge(srv, **kw) -> Judge:
    return Judge(HTTPBackend("judge", base_url=srv.url, max_retries=0), **kw)


PAIRS = [("q1", "good: 4", "bad: 5"), ("q2", "bad: 7", "good: 6"), ("q3", "good: x", "bad: y")]


def test_order_swap_removes_the_position_bias_exactly_with_votes(server):
    judge = chat_judge(server, votes=20)
    assert judge.mode == "votes"  # chat-only server: no log-probs
    got = judge.pairwise(PAIRS)
    # Shown first, the good side wins 0.95 of votes; shown second, 1 - 0.35 = 0.65. Averaged: 1 - NOISE.
    assert [v.winner for v in got] == ["a", "b", "a"]
    assert [v.p_first for v in got] == [(0.95, 0.35), (0.35, 0.95), (0.95, 0.35)]
    assert [v.p_a for v in got] == pytest.approx([1 - NOISE, NOISE, 1 - NOISE], abs=1e-12)
    assert position_bias(got) == pytest.approx(BIAS, abs=1e-12)
    assert got[0].model == "judge" and got[0].template.startswith("pairwise-")
    assert json.loads(got[0].raw[0]).count("A") == 19  # the 20 raw answers are kept


def test_order_swap_removes_the_bias_exactly_with_logprobs(server):
    with HTTPBackend("judge", base_url=server.url, tokenizer="tiny-policy", max_retries=0) as be:
        got = Judge(be).pairwise(PAIRS)
    assert Judge(be).mode == "logprobs"
    assert [v.p_a for v in got] == pytest.approx([1 - NOISE, NOISE, 1 - NOISE], abs=1e-6)
    assert position_bias(got) == pytest.approx(BIAS, abs=1e-6)


def test_a_verdict_that_flips_with_the_order_is_a_tie():
    # Bias 0.4: P("A") is 1.0 for the good side and 0.6 for the bad side, so "A" wins in both orders.
    judge = Judge(ScriptedJudgeModel(lambda q: rule(q, bias=0.4)), mode="logprobs")
    got = judge.pairwise(PAIRS[:2])
    assert [v.winner for v in got] == ["tie", "tie"]
    assert [v.p_a for v in got] == pytest.approx([0.7, 0.3], abs=1e-6)  # the content signal survives
    assert position_bias(got) == pytest.approx(0.3, abs=1e-6)          # clipped at P = 1: 0.3, not 0.4


def test_votes_give_the_expected_probability(server):
    judge = chat_judge(server, votes=10)
    got = judge.yes_no(["is it? p=0.3", "is it? p=0.75", "is it? p=1"])
    # 10 votes: 3 Yes; 7.5 -> 8 Yes by largest remainder; 10 Yes.
    assert [v.value for v in got] == [0.3, 0.8, 1.0]
    assert quota({"Yes": 0.75, "No": 0.25}, 10).count("Yes") == 8


def test_malformed_and_refused_answers_become_row_errors_with_the_raw_text(server):
    judge = chat_judge(server)
    got = judge.pairwise([("q", "good MALFORMED", "bad"), ("q", "good", "bad REFUSE"), ("q", "good", "bad")])
    assert got[0].winner is None and got[0].p_a is None
    assert got[0].error.startswith("a-first order: unparseable: the judge answered 'Both responses have")
    assert "b-first order: unparseable" in got[0].error
    assert got[0].raw == ("Both responses have their merits.",) * 2
    assert got[1].error.startswith("a-first order: refusal: the judge answered \"I'm sorry, I can't compare")
    assert got[2].ok and got[2].winner == "a"


def test_pointwise_score_on_the_declared_scale(server):
    judge = chat_judge(server)
    got = judge.score([("q", "score=7"), ("q", "score=12"), ("q", "score=3")], rubric="helpfulness",
                      scale=(1, 10))
    assert [v.value for v in got] == [7.0, None, 3.0]
    assert got[1].error == "unparseable: the judge answered 'Score: 12'"  # off the declared scale
    five = judge.score([("q", "score=5"), ("q", "score=7")], rubric="r", scale=(0, 5))
    assert [v.value for v in five] == [5.0, None]


def test_logprob_score_is_the_expected_value_over_the_scale():
    def fixed(q):
        return {"2": 0.25, "4": 0.75}
    got = Judge(ScriptedJudgeModel(fixed)).score([("q", "r")], rubric="r", scale=(1, 5))
    assert got[0].value == pytest.approx(2 * 0.25 + 4 * 0.75, abs=1e-6)
    assert set(json.loads(got[0].raw)) == {"1", "2", "3", "4", "5"}


def test_step_judge_asks_with_the_prefix():
    seen = []

    def step_rule(q):
        seen.append(q)
        return {"Yes": 0.9, "No": 0.1} if "2+3=5" in q.split("Next step:")[1] else {"Yes": 0.2, "No": 0.8}
    judge = Judge(ScriptedJudgeModel(step_rule), mode="logprobs")
    got = judge.step([("2+3+4?", ["2+3=5"], "5+4=9"), ("2+3+4?", [], "2+3=5")])
    assert [v.value for v in got] == pytest.approx([0.2, 0.9], abs=1e-6)
    assert "Steps so far:\n2+3=5\n\nNext step: 5+4=9" in seen[0] and "Steps so far:\n(none)" in seen[-1]


def test_one_backend_call_per_batch():
    model = ScriptedJudgeModel(rule)
    Judge(model, mode="votes", votes=3, temperature=1.0).pairwise(PAIRS)
    assert model.calls == 1  # both orders of every pair in one call


def test_argues_for_swaps_the_text_labels_with_the_responses():
    assert swap_labels("Response A is clearer than response B; option A wins. A is") == \
        "Response B is clearer than response A; option B wins. A is"

    def reader(q):  # argues for the side the explanation names, whatever slot it is in
        named = re.search(r"Explanation: Response ([AB])", q).group(1)
        return {"A": 1.0, "B": 0.0} if named == "A" else {"A": 0.0, "B": 1.0}
    got = Judge(ScriptedJudgeModel(reader), mode="logprobs").argues_for(
        [("q", "x", "y", "Response B is better because it is complete.")])
    assert got[0].winner == "b" and got[0].bias == pytest.approx(0.0, abs=1e-6)


def test_parsers_are_lenient_but_never_guess():
    assert [parse_choice(t) for t in ("Answer: B", "[[A]]", "Response B", "B.", "A and B", "Neither")] == \
        ["B", "A", "B", "B", None, None]
    assert [parse_yes_no(t) for t in ("yes", "No, the step is wrong", "Answer: Yes", "maybe")] == \
        ["Yes", "No", "Yes", None]
    assert [parse_score(t, (1, 10)) for t in ("Score: 7", "8/10", "Score: 11", "good")] == [7.0, 8.0, None, None]


def test_config_refuses_a_judge_that_cannot_work():
    with pytest.raises(ValueError, match="needs log-probs"):
        JudgeConfig(model="gpt-4o-mini", backend="http", mode="logprobs")
    with pytest.raises(ValueError, match="greedy votes"):
        JudgeConfig(votes=5, temperature=0.0)
    assert JudgeConfig(model="tiny-policy", backend="http", mode="logprobs").scores_text
    with pytest.raises(InputError, match="has no model"):
        open_judge(JudgeConfig())


def test_chat_only_backend_is_refused_where_logprobs_are_needed(server):
    with HTTPBackend("judge", base_url=server.url, max_retries=0) as be:
        with pytest.raises(InputError, match="needs log-probs"):
            Judge(be, mode="logprobs")
        with pytest.raises(InputError, match="value_fn logprob needs log-probs"):
            require_logprobs(be, "value_fn logprob")


def test_real_model_logprob_judge_is_the_same_locally_and_over_http():
    """The bundled tiny policy as a judge: the answer log-probs through the http backend (tokenizer here, the
    server's echo) give the local backend's probabilities."""
    import torch

    from pipeline.backends.hf import TransformersBackend
    torch.set_num_threads(1)
    local = TransformersBackend("tiny-policy")
    pairs = [("What is 2 + 3?", "Answer: 5", "Answer: 6"), ("What is 7 - 4?", "Answer: 1", "Answer: 3")]
    here = Judge(local).pairwise(pairs)
    with serving(local, served_model="tiny") as srv:
        with HTTPBackend("tiny", base_url=srv.url, tokenizer="tiny-policy", max_retries=0) as be:
            remote = Judge(be).pairwise(pairs)
    for a, b in zip(here, remote):
        assert a.p_first == pytest.approx(b.p_first, abs=1e-4)
        assert 0.0 < a.p_first[0] < 1.0 and set(json.loads(a.raw[0])) == {"A", "B"}
