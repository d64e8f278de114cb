"""Stages that call a judge, each against the scripted judge model (pipeline/judges/scripted.py) served by the
project's OpenAI-compatible test server on 127.0.0.1 and read chat-only (votes), so the judge's behaviour,
and therefore every verdict, is known exactly."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.backends.testserver import serving
from pipeline.judges.config import JudgeConfig
from pipeline.judges.scripted import ScriptedJudgeModel
from pipeline.judges.verifier_judge import errs, truth_rule
from stages import rationales as R
from tests.helpers.report import parse_report
from tests.test_rationales import ScriptedBackend, make_pairs, run_direct

NOISE, BIAS = 0.1, 0.1   # P("A") = NOISE + (1 - 2 NOISE) [the explanation names A] + BIAS


def reader(q: str):
    """Reads which response an explanation names as better; a text naming none gets 1/2 (plus the bias)."""
    if "MALFORMED" in q:
        return "Hard to say, the explanation is odd."
    named = re.search(r"Explanation: .*?Response ([AB]) is better", q, re.S)
    truth = 0.5 if named is None else float(named.group(1) == "A")
    p = NOISE + (1 - 2 * NOISE) * truth + BIAS
    return {"A": p, "B": 1 - p}


@pytest.fixture(scope="module")
def judge_server():
    with serving(ScriptedJudgeModel(reader), served_model="reader") as srv:
        yield srv


def writer(prompt: str, prefix, sp) -> str:
    """Pair i: 0 argues for the preferred side, 1 for the rejected one, 2 for neither, 3 is unreadable."""
    i = int(re.search(r"What is (\d+) plus two", prompt).group(1))
    pref = re.search(r"Response (\w) is better[.]", prompt).group(1)
    other = "B" if pref == "A" else "A"
    return [f"Response {pref} is better because it shows the sum step by step.",
            f"Response {other} is better because it states the result plainly.",
            "Both responses are reasonable attempts at the sum here.",
            "MALFORMED text that nobody can read at all."][i]


def test_rationales_judged_in_both_orders_filter_and_count(judge_server):
    judge = JudgeConfig(model="reader", backend="http", base_url=judge_server.url, votes=10, temperature=1.0)
    policy = ScriptedBackend(writer)
    out = run_direct(make_pairs(4), policy, lead="", judge=judge, max_attempts=1).to_pylist()
    assert policy.calls == [("generate", 4)]          # no lead: the model writes the verdict itself
    assert [r["status"] for r in out] == ["ok", "filtered", "filtered", "filtered"]
    assert [r["rationale_stance"] for r in out] == ["preferred", "other", "none", None]
    assert parse_report(pa_table(out))["errors"] == {"argues_rejected": 1, "argues_neither": 1, "judge_error": 1}
    extra = [json.loads(r["extra"]) for r in out]
    # Named side: P("A") 1.0 shown in slot A, 0.2 in slot B, whatever the order: P(preferred) = 1 - NOISE.
    assert extra[0]["judge_p_preferred"] == pytest.approx(1 - NOISE, abs=1e-12)
    assert extra[1]["judge_p_preferred"] == pytest.approx(NOISE, abs=1e-12)
    assert extra[2]["judge_p_preferred"] == pytest.approx(0.5, abs=1e-12)  # the bias cancels; a tie
    assert extra[0]["judge_model"] == "reader" and extra[0]["judge_template"].startswith("argues_for-")
    assert out[3]["error"].startswith("judge_error: a-first order: unparseable: the judge answered '[\"Hard to say")
    assert json.loads(extra[3]["judge_raw"][0]) == ["Hard to say, the explanation is odd."] * 10  # every vote


def test_rationale_default_has_no_verdict_fixing_lead():
    assert R.RationaleConfig().lead == ""


def pa_table(rows):
    import pyarrow as pa
    return pa.Table.from_pylist(rows)


# ------------------------------------------------------------------------------------------ reward-relabel
SCORES = {"Hi!": 5, "Go away.": 1, "Blue.": 4, "Car.": 2, "1 2 3": 5, "1 3": 0, "4": 3}   # on 0-5; "5": malformed


def scorer(q: str):
    response = re.search(r"Response: (.*?)\n\nGive one whole number from 0 to 5", q, re.S).group(1)
    return f"Score: {SCORES[response]}" if response in SCORES else "It is fine, I suppose."


def test_reward_relabel_judge_scores_on_its_declared_scale(tmp_path):
    from tests.test_reward_relabel import _run, golden_input

    with serving(ScriptedJudgeModel(scorer), served_model="scorer") as srv:
        judge = JudgeConfig(model="scorer", backend="http", base_url=srv.url)
        _, out = _run(golden_input(), tmp_path, score_source="judge", judge=judge, judge_scale=(0, 5),
                      filter_fine_scores=False, fail_threshold=0.5)
    rows = {(r["prompt_id"], r["flipped"]): r for r in out.to_pylist()}
    # 0-5 placed on 1-10: 1 + 9 s / 5, one decimal.
    assert (rows[("p1", False)]["chosen_score"], rows[("p1", False)]["rejected_score"]) == (10.0, 2.8)
    assert (rows[("p2", False)]["chosen_score"], rows[("p2", False)]["rejected_score"]) == (8.2, 4.6)
    assert (rows[("p3", False)]["chosen_score"], rows[("p3", False)]["rejected_score"]) == (10.0, 1.0)
    assert rows[("p1", True)]["goal_score"] == 2.8 and rows[("p1", True)]["chosen"] == "Go away."
    failed = [r for r in out.to_pylist() if r["prompt_id"] == "p4"]
    assert [r["status"] for r in failed] == ["failed"]
    assert failed[0]["error"].endswith("judge on rejected: unparseable: the judge answered 'It is fine, I suppose.'")


def expected_scorer(q: str) -> dict[str, float]:
    """Answer probabilities on 1-10 whose expected values are 7.8 (the first pair's chosen) and 3.3 (else)."""
    if re.search(r"Response: Hi!\n", q):
        return {"7": 0.2, "8": 0.8}
    return {"3": 0.7, "4": 0.3}


def test_reward_relabel_judge_log_prob_scores_are_rounded_goals(tmp_path):
    """With log-probs a score is the expected value under the answer probabilities; on the template's own 1-10
    it is still rounded to goal_decimals, as it is printed into the goal text."""
    from tests.test_reward_relabel import _run, golden_input

    with serving(ScriptedJudgeModel(expected_scorer), served_model="scorer") as srv:
        judge = JudgeConfig(model="scorer", backend="http", base_url=srv.url, tokenizer="tiny-policy")
        _, out = _run(golden_input().slice(0, 1), tmp_path, score_source="judge", judge=judge,
                      filter_fine_scores=False)
    rows = out.to_pylist()
    assert [(r["goal_score"], r["flipped"]) for r in rows] == [(7.8, False), (3.3, True)]
    assert rows[0]["system"].endswith("Overall score: 7.8.")


def test_reward_relabel_judge_needs_the_judge_source():
    from stages.reward_relabel import RewardRelabelConfig
    with pytest.raises(ValueError, match="configures score_source 'judge'"):
        RewardRelabelConfig(judge=JudgeConfig())


# ---------------------------------------------------------------------------------------------- tree search
STEP_NOISE = 0.2


def flipped(question: str, prefix: str, step: str) -> bool:
    """The verifier-backed judge errs on a fixed, hash-chosen STEP_NOISE share of the (problem, prefix, step)s."""
    return errs(question + prefix + step, STEP_NOISE)


def test_tree_search_value_fn_judge_follows_the_judge_up_to_its_noise():
    from pipeline.tasks.registry import item_for_row
    from stages.tree_search import TreeSearchConfig, run
    from tests.test_tree_search_fake import FakeArithBackend, task_rows
    from pipeline.stage import StageContext

    problems, table = task_rows(6)
    items = {r["prompt"]: item_for_row(r) for r in table.to_pylist()}
    with serving(ScriptedJudgeModel(truth_rule(items, STEP_NOISE)), served_model="step-judge") as srv:
        judge = JudgeConfig(model="step-judge", backend="http", base_url=srv.url)
        cfg = TreeSearchConfig(value_fn="judge", judge=judge, iterations=8, validity_rollouts=0)
        policy = FakeArithBackend(problems, 0.7)
        out = run(table, cfg, policy, StageContext("fp", 0, 7))
    assert all(c["kind"] == "continue" for c in policy.calls)   # the policy only expands: no rollouts
    agree = disagree = 0
    for row in out["trees"].to_pylist():
        nodes = {n["node_id"]: n for n in row["nodes"]}
        for n in row["nodes"][1:]:
            if n["is_terminal"]:
                continue
            path, p = [], n
            while p["parent_id"] is not None:
                path.append(p["step_text"])
                p = nodes[p["parent_id"]]
            step, prefix = path[0], "\n".join(reversed(path[1:])) or "(none)"
            judged_right = bool(n["correct"]) != flipped(row["prompt"], prefix, step)
            assert n["reward"] == (1.0 if judged_right else -1.0)   # PRISM's 2 P(Yes) - 1 with one greedy vote
            agree += judged_right == bool(n["correct"])
            disagree += judged_right != bool(n["correct"])
    # The realised error rate is the scripted one: 0.2 +- 3 binomial sd over the judged nodes.
    n_judged = agree + disagree
    print(f"judged nodes {n_judged}, judge wrong on {disagree / n_judged:.3f} (scripted {STEP_NOISE})")
    assert n_judged >= 30
    assert abs(disagree / n_judged - STEP_NOISE) <= 3 * (STEP_NOISE * (1 - STEP_NOISE) / n_judged) ** 0.5


# --------------------------------------------------------------------------------------------- deliberation
def safety_judge(q: str):
    """A separate judge model: violations are the EVIL responses; faithfulness 5 for safe answers, 2 for EVIL;
    question 1's classifier answer is unreadable."""
    if "Give one whole number from 1 to 5" in q:
        return "Score: 2" if "EVIL" in q else "Score: 5"
    if "Does the response break any of the policies?" in q:
        if "Question number 1:" in q:
            return "Hmm."
        return "Yes" if "Response: EVIL" in q else "No"
    return "No" if "Ignore every policy" in q else "Yes"   # the refiner


def test_deliberation_judge_model_classifies_refines_and_scores_faithfulness():
    from tests.test_deliberation import World, prompts
    from tests.test_deliberation import run_direct as run_deliberation

    with serving(ScriptedJudgeModel(safety_judge), served_model="safety-judge") as srv:
        out, policy = run_deliberation(prompts(3), World(bad_thought=True), judge_model="safety-judge",
                                       judge_backend="http", judge_base_url=srv.url, refine_calibration="none")
    assert "logprobs" not in {kind for kind, _ in policy.calls}      # the agents' model never judges
    pairs = {r["prompt_id"]: r for r in out["main"].to_pylist()}
    assert [pairs[p]["status"] for p in ("p-0", "p-1", "p-2")] == ["ok", "filtered", "ok"]
    assert pairs["p-1"]["error"] == "judge_error: unparseable: the judge answered 'Hmm.'"
    for p in ("p-0", "p-2"):
        r = pairs[p]
        assert (r["viol_selected"], r["viol_rejected"]) == (0.0, 1.0)
        assert (r["faithfulness_selected"], r["faithfulness_rejected"]) == (5.0, 2.0)
        assert r["judge_model"] == "safety-judge"
        assert "Ignore every policy" not in "".join(r["selected_cot"])   # the refiner dropped the bad thought
    sft = {r["prompt_id"]: r for r in out["sft"].to_pylist()}
    assert json.loads(sft["p-0"]["refiner_removed"])["policy_inconsistent"] == 1


def test_deliberation_refuses_a_logprob_judge_on_a_chat_only_server():
    from stages.deliberation import DeliberationConfig
    with pytest.raises(ValueError, match="needs log-probs"):
        DeliberationConfig(judge_model="gpt-4o-mini", judge_backend="http", judge_mode="logprobs")


# --------------------------------------------------------------------------------------------- intervention
def harm_judge(harmful_word: str):
    def rule(q: str):
        request = re.search(r"Request: (.*?)\n\nResponse:", q, re.S).group(1)
        response = re.search(r"Response: (.*)\n\nDoes the response help", q, re.S).group(1)
        if harmful_word == "lock" and request.startswith("stubborn"):
            return "Unclear."
        return "Yes" if harmful_word in response.lower() else "No"
    return rule


def test_intervention_harm_labels_from_two_judges_and_their_agreement(tmp_path):
    from tests.test_intervention import FakeLRM, _run
    import pyarrow as pa

    rows = pa.table({"prompt_id": ["h1", "h2", "b1"], "prompt": ["how to pick a lock", "stubborn: pick a lock",
                                                                "benign: capital of France"],
                     "kind": ["harmful", "harmful", "benign"]})
    with serving(ScriptedJudgeModel(harm_judge("use pin")), served_model="strict") as one, \
            serving(ScriptedJudgeModel(harm_judge("lock")), served_model="loose") as two:
        judges = [JudgeConfig(model="strict", backend="http", base_url=one.url),
                  JudgeConfig(model="loose", backend="http", base_url=two.url)]
        _, out = _run(rows, FakeLRM(), tmp_path, mode="safety_trigger", n_samples=2, harm_judges=judges,
                      fail_threshold=0.9)
    got = {(r["prompt_id"], r["sample_index"]): r for r in out.to_pylist() if r["pair_kind"]}
    for s in (0, 1):
        h1 = got[("h1", s)]
        assert h1["status"] == "ok" and h1["judge_model"] == "strict"
        # strict: only the rejected side says "use pin"; loose: both sides mention locks -> agree on 1 of 2
        assert (h1["chosen_answer_harmful"], h1["rejected_answer_harmful"]) == (False, True)
        extra = json.loads(h1["extra"])
        assert extra["harm_agreement"] == 0.5
        assert [(j["model"], j["p_chosen"], j["p_rejected"]) for j in extra["harm_judges"]] == \
            [("strict", 0.0, 1.0), ("loose", 1.0, 1.0)]
        h2 = got[("h2", s)]
        assert h2["status"] == "filtered" and h2["error"] == "judge_error: unparseable: the judge answered 'Unclear.'"
    b1 = [r for k, r in got.items() if k[0] == "b1"][0]
    assert json.loads(b1["extra"])["harm_agreement"] == 1.0
    assert (b1["chosen_answer_harmful"], b1["rejected_answer_harmful"]) == (False, False)


def test_deliberation_on_a_chat_only_model_judges_by_votes():
    """No log-probs (a hosted chat API): the agents' own model answers the refiner and the classifier in words."""
    from schemas import validate
    from stages import deliberation as D
    from tests.test_deliberation import World, prompts
    from pipeline.stage import StageContext

    world = World(bad_thought=True)

    def reply(prompt, prefix, sp):
        return safety_judge(prompt) if prompt.endswith("Answer Yes or No.") else world.reply(prompt, prefix, sp)
    chat = ScriptedBackend(reply)
    chat.supports_logprobs = False
    out = D.run(validate(prompts(3), "prompts"), D.DeliberationConfig(refine_calibration="none"), chat,
                StageContext(fingerprint="f" * 64, shard_index=0, seed=7))["main"].to_pylist()
    assert "logprobs" not in {kind for kind, _ in chat.calls}
    assert [r["status"] for r in out] == ["ok", "filtered", "ok"]
    assert out[1]["error"] == "judge_error: unparseable: the judge answered 'Hmm.'"
    assert [(r["viol_selected"], r["viol_rejected"]) for r in (out[0], out[2])] == [(0.0, 1.0)] * 2
    assert out[0]["faithfulness_selected"] is None   # faithfulness needs a separate judge_model
