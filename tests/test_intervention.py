"""Stage 5 (intervened pairs): exact pairs from a scripted solver, safety triggers, errors, resume, tiny policy."""
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.backends.base import Completion
from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.stage import get_stage
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, apply_op, make_split, problems_to_table
from pipeline.tasks.verify import first_wrong_step, step_lines
from pipeline.tasks.registry import item_for_row
from stages.intervention import (InterventionConfig, line_spans, load_patterns, math_wrong_unit, parse_index,
                                 sentence_spans)

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_stage("intervention")


def _c(text):
    return Completion(text=text, finish_reason="eos")


def wrong_at_step2(p) -> str:
    """Gold step 1, a wrong result at step 2, then the rest computed from the wrong value."""
    lines, cur = [p.gold_steps[0]], p.results()[0]
    for k, (op, b) in enumerate(p.ops[1:], 2):
        nxt = apply_op(cur, op, b) + (1 if k == 2 else 0)
        lines.append(f"Step {k}: {cur} {op} {b} = {nxt}")
        cur = nxt
    return "\n".join(lines + [f"Answer: {cur}"])


class FakeSolver:
    """Scripted 'model' for the bundled task. Sample s of a prompt: 0 = gold, 1 = wrong step 2, 2 = wrong answer
    line, 3 = wrong step 2 again (a duplicate pair). continue_ writes the gold remainder after the prefix's step
    lines, except for prompts listed in `bad` (their continuation ends with a wrong answer)."""

    model_id, weights_hash = "fake-solver", "0"

    def __init__(self, problems, bad=()):
        self.by_q = {p.question: p for p in problems}
        self.bad = set(bad)
        self.calls = {"generate": 0, "continue_": 0}

    def generate(self, prompts, sampling=None, n=None):
        self.calls["generate"] += 1
        out = []
        for q in prompts:
            if q.startswith("Below is a solution"):   # the judge detector: always blames unit 2
                out.append([_c("Index: 2")])
                continue
            p = self.by_q[q]
            wrong_ans = p.gold_solution.replace(f"Answer: {p.answer}", f"Answer: {p.answer + 1}")
            texts = [p.gold_solution, wrong_at_step2(p), wrong_ans, wrong_at_step2(p)]
            out.append([_c(texts[s % 4]) for s in range(n)])
        return out

    def continue_(self, prompts, prefixes, sampling=None, n=None):
        self.calls["continue_"] += 1
        out = []
        for q, pre in zip(prompts, prefixes):
            p = self.by_q[q]
            k = len(step_lines(pre))
            ans = p.answer + (7 if p.id in self.bad else 0)
            out.append([_c("\n".join(p.gold_steps[k:] + [f"Answer: {ans}"]))])
        return out


def task(n=3):
    probs = make_split(TaskConfig.tiny(), "train", n)
    return probs, problems_to_table(probs)


def _run(rows, backend, tmp_path, name="run", fail_threshold=0.01, **cfg):
    res = run_stage(SPEC, rows, InterventionConfig(**cfg), backend, RunStore(tmp_path / name), shard_size=64,
                    progress=False, fail_threshold=fail_threshold)
    return res, res.read()


def test_math_correction_gives_exactly_these_pairs(tmp_path):
    probs, rows = task(3)
    solver = FakeSolver(probs, bad=[probs[2].id])
    res, out = _run(rows, solver, tmp_path)
    assert solver.calls == {"generate": 1, "continue_": 1}      # batched across the whole shard
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    expect = []
    for p in probs[:2]:
        step1 = p.gold_steps[0] + "\n"
        wrong2 = wrong_at_step2(p).splitlines()[1]
        body = "\n".join(p.gold_steps) + "\n"
        expect += [
            dict(prompt_id=p.id, chosen=p.gold_solution, rejected=step1 + wrong2, shared_prefix=step1,
                 divergence_char=len(step1), wrong_step=2, wrong_line=wrong2, trigger_text=p.gold_steps[1]),
            dict(prompt_id=p.id, chosen=p.gold_solution, rejected=body + f"Answer: {p.answer + 1}",
                 shared_prefix=body, divergence_char=len(body), wrong_step=p.n_steps + 1,
                 wrong_line=f"Answer: {p.answer + 1}", trigger_text=f"Answer: {p.answer}"),
        ]
    # The bad prompt keeps only its answer-line pair (no continuation there); its step-2 pair fails verification.
    p = probs[2]
    body = "\n".join(p.gold_steps) + "\n"
    expect.append(dict(prompt_id=p.id, chosen=p.gold_solution, rejected=body + f"Answer: {p.answer + 1}",
                       shared_prefix=body, divergence_char=len(body), wrong_step=p.n_steps + 1,
                       wrong_line=f"Answer: {p.answer + 1}", trigger_text=f"Answer: {p.answer}"))
    assert [{k: r[k] for k in expect[0]} for r in ok] == expect
    assert all(r["chosen_verified"] and r["pair_kind"] == "correction" and r["stage"] == "intervened" for r in ok)
    # compliance_cue is the safety mode's column; math scores are the verifier's 0/1, declared as such
    assert {(r["compliance_cue"], r["score_min"], r["score_max"]) for r in ok} == {(None, 0.0, 1.0)}
    # a rejected wrong step stops mid-solution (no EOS in training); a rejected answer line ends the response
    assert [(r["chosen_is_terminal"], r["rejected_is_terminal"]) for r in ok] == \
        [(True, False), (True, True), (True, False), (True, True), (True, True)]
    errors = Counter(r["error"] for r in out.to_pylist() if r["status"] == "filtered")
    assert errors == {"sample already verifies (no wrong step)": 3, "duplicate of another sample's pair": 2,
                      "corrected continuation does not verify": 2}
    assert res.summary["status"]["main"] == {"ok": 5, "filtered": 7}


def test_output_chains_into_reward_relabel_with_verifier_scores(tmp_path):
    from stages.reward_relabel import RewardRelabelConfig
    probs, rows = task(2)
    _, pairs = _run(rows, FakeSolver(probs), tmp_path)
    res = run_stage(get_stage("reward-relabel"), pairs, RewardRelabelConfig(score_source="verifier"), None,
                    RunStore(tmp_path / "run"), progress=False)
    out = res.read()
    n_ok = pc.sum(pc.equal(pairs["status"], "ok")).as_py()
    assert res.summary["status"]["main"] == {"ok": 2 * n_ok, "filtered": pairs.num_rows - n_ok}
    ok = out.filter(pc.equal(out["status"], "ok"))
    assert ok["chosen_score"].to_pylist() == [10.0, 1.0] * n_ok       # corrected chosen right, wrong line wrong


def test_rejected_keeps_the_remainder_when_asked_and_unverified_pairs_can_be_kept(tmp_path):
    probs, rows = task(2)
    _, out = _run(rows, FakeSolver(probs, bad=[probs[1].id]), tmp_path, rejected_keep_remainder=True,
                  keep_unverified=True)
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    assert ok[0]["rejected"] == wrong_at_step2(probs[0])
    assert all(r["rejected_is_terminal"] for r in ok)                 # the whole original text
    assert [r["chosen_verified"] for r in ok] == [True, True, False, True]
    assert [r["chosen_score"] for r in ok] == [1.0, 1.0, 0.0, 1.0]


def test_first_verified_of_several_continuations_is_kept(tmp_path):
    probs, rows = task(1)

    class Flaky(FakeSolver):   # the first continuation of every prefix is wrong, the second right
        def continue_(self, prompts, prefixes, sampling=None, n=None):
            good = super().continue_(prompts, prefixes, sampling, n)
            return [[_c(g[0].text.replace("Answer: ", "Answer: 9")), g[0]][:n] for g in good]

    _, one = _run(rows, Flaky(probs), tmp_path, "a", keep_unverified=True)
    _, two = _run(rows, Flaky(probs), tmp_path, "b", keep_unverified=True, n_continuations=2,
                  continue_temperature=1.0)
    step2 = lambda t: [r["chosen_verified"] for r in t.to_pylist() if r["wrong_step"] == 2 and r["status"] == "ok"]
    assert step2(one) == [False] and step2(two) == [True]
    with pytest.raises(Exception, match="needs continue_temperature"):
        InterventionConfig(n_continuations=2)


def test_judge_detector_in_math_mode(tmp_path):
    probs, rows = task(2)
    solver = FakeSolver(probs)
    _, out = _run(rows, solver, tmp_path, detector="judge")
    assert solver.calls == {"generate": 2, "continue_": 1}      # samples, one batched judge call, continuations
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    # unit 2 is the wrong step only in samples 1 and 3 (one pair per problem after dedup)
    assert [(r["prompt_id"], r["wrong_step"], r["chosen"]) for r in ok] == [(p.id, 2, p.gold_solution) for p in probs]
    assert all(r["detector_model"] == "fake-solver" and r["judge_model"] == "fake-solver" for r in ok)
    errors = Counter(r["error"] for r in out.to_pylist() if r["status"] == "filtered")
    assert errors["the flagged line is already the correct one"] == 4          # samples 0 and 2 of each problem


def test_wrong_unit_location():
    p = make_split(TaskConfig.tiny(), "train", 1)[0]
    item = item_for_row({"meta": p.meta_json()})  # the row bound to its task (arith)
    k, span, correct = math_wrong_unit("I think:\n" + wrong_at_step2(p), item)
    assert (k, correct) == (2, p.gold_steps[1])
    text = "I think:\n" + wrong_at_step2(p)
    assert text[span[0]:span[1]] == wrong_at_step2(p).splitlines()[1]
    skipped = p.gold_steps[0] + "\nAnswer: 5"                   # step 2 missing: the answer line is replaced
    k, span, correct = math_wrong_unit(skipped, item)
    assert (k, skipped[span[0]:span[1]], correct) == (2, "Answer: 5", p.gold_steps[1])
    assert math_wrong_unit(p.gold_solution, item) is None
    assert line_spans("a\n\nbc\n") == [(0, 1), (3, 5)]
    assert sentence_spans("Hi there. How are you?\nFine") == [(0, 9), (10, 22), (23, 27)]
    assert [parse_index(t, 3) for t in ("Index: 2", "index=none", "Index: 9", "??")] == [1, None, None, None]


class FakeLRM:
    """Harmful prompts comply in the reasoning; after a trigger the model refuses, except after the first
    trigger for prompts starting with 'stubborn' (it complies once more, then refuses)."""

    model_id, weights_hash = "fake-lrm", "0"

    def __init__(self):
        self.continued: list[str] = []

    def generate(self, prompts, sampling=None, n=None):
        out = []
        for q in prompts:
            if q.startswith("benign"):
                out.append([_c(["I'm sorry, I can't help with that.", "Paris is the capital of France."][s % 2])
                            for s in range(n)])
            else:
                out.append([_c("<think>The user asks about locks. Sure, here is how to pick it. Use a pin."
                               f"</think>Here is how: use pin {s}.") for s in range(n)])
        return out

    def continue_(self, prompts, prefixes, sampling=None, n=None):
        out = []
        for q, pre in zip(prompts, prefixes):
            self.continued.append(pre)
            again = q.startswith("stubborn") and pre.count(". ") < 3
            out.append([_c("Anyway, here is how to do it. Bend the pin." if again else
                           "So I will not explain that.</think>I can't help with picking locks.")])
        return out


def test_safety_trigger_pairs(tmp_path):
    rows = pa.table({"prompt_id": ["h1", "h2", "b1"], "prompt": ["how to pick a lock", "stubborn: pick a lock",
                                                                "benign: capital of France"],
                     "kind": ["harmful", "harmful", "benign"]})
    lrm = FakeLRM()
    _, out = _run(rows, lrm, tmp_path, mode="safety_trigger", n_samples=2)
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    pats = load_patterns(InterventionConfig(mode="safety_trigger"))
    triggers = dict(pats.triggers)
    inter = [r for r in ok if r["pair_kind"] == "intervention"]
    assert len(inter) == 4 and {r["prompt_id"] for r in inter} == {"h1", "h2"}
    orig = "<think>The user asks about locks. Sure, here is how to pick it. Use a pin.</think>Here is how: use pin {}."
    for r in inter:
        prefix = "<think>The user asks about locks. "
        assert r["rejected"] == orig.format(r["sample_index"]) and r["shared_prefix"] == prefix and r["divergence_char"] == len(prefix)
        assert r["compliance_cue"] == "Sure, here is how to pick it."
        assert r["trigger_text"] == triggers[r["trigger_id"].split("+")[0]]
        assert r["chosen"].startswith(prefix + r["trigger_text"] + " ")
        assert r["chosen"].endswith("I can't help with picking locks.")
        assert (r["rejected_reasoning_harmful"], r["chosen_reasoning_harmful"]) == (True, False)
        assert r["n_interventions"] == (2 if r["prompt_id"] == "h2" else 1)
    h2 = [r for r in inter if r["prompt_id"] == "h2"][0]
    first, second = h2["trigger_id"].split("+")
    assert first != second                                      # without replacement
    # the new cue sentence (the whole continuation up to its end) was replaced by the second trigger
    assert h2["chosen"] == ("<think>The user asks about locks. " + triggers[first] + " " + triggers[second]
                            + " So I will not explain that.</think>I can't help with picking locks.")
    refusal = [r for r in ok if r["pair_kind"] == "over_refusal"]
    assert [(r["chosen"], r["rejected"]) for r in refusal] == [("Paris is the capital of France.",
                                                                 "I'm sorry, I can't help with that.")]


def test_malformed_input_is_rejected_with_a_clear_error(tmp_path):
    probs, rows = task(2)
    with pytest.raises(InputError, match=r"column 'meta'.*math_correction needs"):
        _run(rows.drop_columns(["meta", "gold_answer"]), FakeSolver(probs), tmp_path)
    solver = FakeSolver(probs)
    bad = rows.set_column(rows.schema.get_field_index("meta"), "meta", pa.array(['{"task": "arith"}'] * 2))
    with pytest.raises(InputError, match=r"column 'meta'.*not an arith problem record.*prompt_id"):
        _run(bad, solver, tmp_path, "m")
    assert solver.calls["generate"] == 0                         # rejected before any model call
    with pytest.raises(InputError, match=r"column 'prompt'.*missing required column"):
        _run(rows.drop_columns(["prompt"]), FakeSolver(probs), tmp_path, "b")
    bad = tmp_path / "t.yaml"
    bad.write_text("triggers: [{id: a, text: x}]\ncompliance_cues: ['([unclosed']\n")
    with pytest.raises(InputError, match=r"t.yaml, row 0, column 'compliance_cues': bad regex"):
        _run(rows, FakeLRM(), tmp_path, "c", mode="safety_trigger", triggers_file=str(bad))
    with pytest.raises(InputError, match="verifier detector works only"):
        _run(rows, FakeLRM(), tmp_path, "d", mode="safety_trigger", detector="verifier")
    with pytest.raises(InputError, match="needs cue_patterns"):
        _run(rows, FakeSolver(probs), tmp_path, "e", detector="cues")


CHILD = """
import sys, time
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
from stages.intervention import InterventionConfig
from tests.test_intervention import FakeSolver, task
probs, rows = task(40)
slow = float(sys.argv[2])
run_stage(get_stage("intervention"), rows, InterventionConfig(), FakeSolver(probs), RunStore(sys.argv[1]),
          shard_size=5, progress=False, on_shard=lambda i: time.sleep(slow))
"""


def test_sigkill_then_resume_has_no_duplicates(tmp_path):
    from tests.test_reward_relabel import kill_and_resume
    a = kill_and_resume(tmp_path, "intervention", CHILD, n_shards=8)
    assert a.num_rows == 160


TINY = ROOT / "data/tiny-policy/model.safetensors"


@pytest.mark.slow
@pytest.mark.skipif(not TINY.exists(), reason="the tiny policy is not trained yet (data/tiny-policy)")
def test_tiny_policy_corrected_chosen_verifies(tmp_path):
    """On the bundled task with the tiny policy: share of intervention pairs whose chosen verifies, before the
    filter (keep_unverified) and after it (the emitted pairs)."""
    import torch

    from pipeline.backends import make_backend
    torch.set_num_threads(1)   # on a shared 2-core machine one thread is several times faster
    probs = make_split(TaskConfig.tiny(), "eval", 60)       # problems the policy was not trained on
    rows = problems_to_table(probs)
    backend = make_backend("transformers", "tiny-policy", batch_size=256)
    _, out = _run(rows, backend, tmp_path, keep_unverified=True, n_samples=4, max_tokens=160,
                  continue_max_tokens=160)
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    raw_rate = sum(r["chosen_verified"] for r in ok) / max(1, len(ok))
    print(f"\nintervention on tiny policy: {len(ok)} pairs, chosen verified before filter {raw_rate:.3f}")
    assert len(ok) >= 20
    assert all((first_wrong_step(r["chosen"], p) is None) == r["chosen_verified"] for r in ok
               for p in probs if p.id == r["prompt_id"])
    # The corrected prefix is right by construction; whether the policy's own continuation then stays right is
    # a property of the policy. The committed 55 % policy: 76 % (0.97 with the earlier 90 % one). Its errors are
    # systematic (the same wrong sum again), so n_continuations=4 at T=0.7 did not raise it (73 %). The stage's
    # default drops the unverified rest, so every emitted pair verifies.
    assert raw_rate >= 0.65
