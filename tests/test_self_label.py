"""Stage 6 (SPA self-labels): exact labels from scripted log-probs, ties, selection, report, errors, resume, loop."""
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.backends.base import Completion, LogprobResult
from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.stage import get_stage
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table
from stages.self_label import SelfLabelConfig, label_report, select, sigmoid
from tests.helpers.references import use_reference

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_stage("self-label")


class ScriptedLM:
    """generate: the texts in `answers[prompt]` (cycled to n); logprobs: a fixed function of the text."""

    def __init__(self, model_id, answers, logp):
        self.model_id, self.weights_hash = model_id, model_id
        self.answers, self.logp = answers, logp
        self.calls = {"generate": 0, "logprobs": 0}

    def generate(self, prompts, sampling=None, n=None):
        self.calls["generate"] += 1
        return [[Completion(text=self.answers[p][k % len(self.answers[p])], finish_reason="eos")
                 for k in range(n)] for p in prompts]

    def logprobs(self, prompts, completions):
        self.calls["logprobs"] += 1
        return [LogprobResult(total=self.logp(c), per_token=[], token_ids=[]) for c in completions]


ANSWERS = {"q1": ["aa", "bbbb", "c"], "q2": ["same", "same", "same"], "q3": ["xy", "xyz", "x"]}


def policy_lp(y):
    return -1.0 * len(y) + (2.0 if "b" in y else 0.0)


def ref_lp(y):
    return -1.5 * len(y)


def prompts(ids=("q1", "q2", "q3")):
    return pa.table({"prompt_id": list(ids), "prompt": list(ids)})


def _run(rows, backend, tmp_path, name="run", **cfg):
    res = run_stage(SPEC, rows, SelfLabelConfig(**cfg), backend, RunStore(tmp_path / name), shard_size=64,
                    progress=False)
    return res, res.read()


def test_labels_are_argmax_argmin_of_the_implicit_reward(tmp_path):
    pol, ref = ScriptedLM("pi0", ANSWERS, policy_lp), ScriptedLM("sft", ANSWERS, ref_lp)
    use_reference("sft-test", ref)
    res, out = _run(prompts(), pol, tmp_path, n_samples=3, ref_model="sft-test", iteration=1)
    assert pol.calls == {"generate": 1, "logprobs": 1} and ref.calls["logprobs"] == 1   # batched over the shard
    rows = {r["prompt_id"]: r for r in out.to_pylist()}
    # r = policy - ref = 0.5·len(y) (+2 with a "b"): q1 -> aa 1, bbbb 4, c 0.5; q3 -> xy 1, xyz 1.5, x 0.5
    q1 = rows["q1"]
    assert (q1["chosen"], q1["rejected"], q1["status"]) == ("bbbb", "c", "ok")
    assert q1["chosen_reward"] == pytest.approx(4.0) and q1["rejected_reward"] == pytest.approx(0.5)
    assert q1["score_margin"] == pytest.approx(3.5)
    assert q1["label_confidence"] == pytest.approx(1 / (1 + math.exp(-0.35)))
    assert q1["low_confidence"] is False and q1["iteration"] == 1 and q1["n_samples"] == 3
    assert (q1["judge_policy_ckpt"], q1["judge_ref_ckpt"], q1["selection_strategy"]) == ("pi0", "sft", "min_max")
    q3 = rows["q3"]
    assert (q3["chosen"], q3["rejected"]) == ("xyz", "x")
    assert q3["label_confidence"] == pytest.approx(sigmoid(0.1)) and q3["low_confidence"] is True  # 0.525 < 0.55
    assert rows["q2"]["status"] == "filtered" and rows["q2"]["error"] == "all 3 samples are the same text"
    assert res.summary["status"]["main"] == {"ok": 2, "filtered": 1}
    assert json.loads(q1["extra"])["rewards"] == pytest.approx([1.0, 4.0, 0.5])


def test_an_empty_sample_on_either_side_is_filtered_not_a_broken_pair(tmp_path):
    # r = policy - ref = 0.5·len(y): the empty sample has the lowest reward and would be the rejected side
    answers = {"q1": ["", "abc", "ab"]}
    use_reference("sft-empty", ScriptedLM("sft", answers, ref_lp))
    res, out = _run(prompts(["q1"]), ScriptedLM("pi0", answers, policy_lp), tmp_path, n_samples=3,
                    ref_model="sft-empty")
    row = out.to_pylist()[0]
    assert (row["status"], row["error"]) == ("filtered", "the rejected sample is empty")
    assert res.summary["status"]["main"] == {"filtered": 1}


def test_policy_equal_to_reference_ties_and_is_filtered(tmp_path):
    pol = ScriptedLM("pi", ANSWERS, policy_lp)
    _, out = _run(prompts(), pol, tmp_path, n_samples=3)              # ref_model None: the policy itself
    assert set(out["status"].to_pylist()) == {"filtered"}
    err = out["error"].to_pylist()
    assert err[0].startswith("implicit rewards tie") and "same model" in err[0]
    assert pol.calls["logprobs"] == 1                                  # the reference pass is not repeated


def test_max_chosen_picks_a_seeded_other_sample(tmp_path):
    use_reference("sft-test2", ScriptedLM("sft", ANSWERS, ref_lp))
    _, a = _run(prompts(["q1"]), ScriptedLM("pi0", ANSWERS, policy_lp), tmp_path, "a", n_samples=3,
                ref_model="sft-test2", selection="max_chosen")
    _, b = _run(prompts(["q1"]), ScriptedLM("pi0", ANSWERS, policy_lp), tmp_path, "b", n_samples=3,
                ref_model="sft-test2", selection="max_chosen")
    r = a.to_pylist()[0]
    assert r["chosen"] == "bbbb" and r["rejected"] in ("aa", "c") and r["rejected"] == b["rejected"][0].as_py()
    import random
    assert select([1.0, 4.0, 0.5], "min_max", random.Random(0)) == (1, 2)
    assert select([2.0, 2.0], "min_max", random.Random(0)) == (0, 0)
    picks = {select([1.0, 4.0, 0.5], "max_chosen", random.Random(s))[1] for s in range(30)}
    assert picks == {0, 2}


def test_verifiable_prompts_record_correctness_and_the_report(tmp_path):
    probs = make_split(TaskConfig.tiny(), "train", 2)
    rows = problems_to_table(probs)
    wrong = {p.question: p.gold_solution.replace(f"Answer: {p.answer}", f"Answer: {p.answer + 3}") for p in probs}
    answers = {p.question: [p.gold_solution, wrong[p.question]] for p in probs}
    # the policy likes the right answer on the first problem and the wrong one on the second
    likes = {probs[0].gold_solution, wrong[probs[1].question]}
    pol = ScriptedLM("pi0", answers, lambda y: -10.0 + (3.0 if y in likes else 0.0))
    use_reference("sft-test3", ScriptedLM("sft", answers, lambda y: -10.0))
    _, out = _run(rows, pol, tmp_path, ref_model="sft-test3")
    got = [(r["chosen_correct"], r["rejected_correct"]) for r in out.to_pylist()]
    assert got == [(True, False), (False, True)]
    rep = label_report(out)
    assert (rep["pairs"], rep["decided"], rep["agree"], rep["agreement"]) == (2, 2, 1, 0.5)
    assert rep["calibration"] == [{"range": [0.5, 0.6], "n": 2, "accuracy": 0.5,
                                   "mean_confidence": pytest.approx(sigmoid(0.3))}]
    assert rep["ece"] == pytest.approx(abs(0.5 - sigmoid(0.3)))
    assert rep["mean_len_diff"] == 0.0


def test_malformed_input_is_rejected_with_a_clear_error(tmp_path):
    pol = ScriptedLM("pi0", ANSWERS, policy_lp)
    use_reference("sft-test4", ScriptedLM("sft", ANSWERS, ref_lp))
    with pytest.raises(InputError, match=r"column 'prompt'.*missing required column"):
        _run(prompts().drop_columns(["prompt"]), pol, tmp_path)
    bad = prompts(["q1"]).append_column("meta", pa.array(["{not json"]))
    with pytest.raises(InputError, match=r"column 'meta'.*prompt_id 'q1'"):
        _run(bad, pol, tmp_path, "b", ref_model="sft-test4", n_samples=3)
    assert pol.calls["generate"] == 0                            # rejected before any model call
    with pytest.raises(Exception, match="greater than or equal to 2"):
        SelfLabelConfig(n_samples=1)
    with pytest.raises(InputError, match="neither a built-in name"):
        _run(prompts(), pol, tmp_path, "c", ref_model="/no/such/model")


CHILD = """
import sys, time
import pyarrow as pa
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
from stages.self_label import SelfLabelConfig
from tests.helpers.references import use_reference
from tests.test_self_label import ScriptedLM, policy_lp, ref_lp
ids = [f"p{i}" for i in range(40)]
answers = {p: [p + "a" * (i % 5), p + "b", p + "cc"] for i, p in enumerate(ids)}
use_reference("ref", ScriptedLM("ref", answers, ref_lp))
slow = float(sys.argv[2])
run_stage(get_stage("self-label"), pa.table({"prompt_id": ids, "prompt": ids}),
          SelfLabelConfig(n_samples=3, ref_model="ref"), ScriptedLM("pol", answers, policy_lp),
          RunStore(sys.argv[1]), shard_size=5, progress=False, on_shard=lambda i: time.sleep(slow))
"""


def test_sigkill_then_resume_has_no_duplicates(tmp_path):
    from tests.test_reward_relabel import kill_and_resume
    a = kill_and_resume(tmp_path, "self-label", CHILD, n_shards=8)
    assert a.num_rows == 40 and pc.sum(pc.equal(a["status"], "ok")).as_py() == 40
