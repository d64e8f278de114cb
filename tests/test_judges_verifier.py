"""The verifier-backed judge (pipeline/judges/verifier_judge.py) on the bundled task: each of the judge
primitive's questions answered from the task's check, exactly without noise, wrongly on every question with
noise 1, and through the http backend and the judge primitive as a stage would ask it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.backends.testserver import serving
from pipeline.judges.config import JudgeConfig, open_judge
from pipeline.judges.templates import PAIRWISE, POINTWISE, STEP
from pipeline.judges.verifier_judge import UNKNOWN, truth_rule, verifier_judge
from pipeline.tasks.registry import item_for_row
from tests.test_tree_search_fake import task_rows


@pytest.fixture(scope="module")
def task():
    problems, table = task_rows(3)
    return problems, table, {r["prompt"]: item_for_row(r) for r in table.to_pylist()}


def _wrong_at(gold: str, k: int) -> str:
    """The gold solution with step k's result off by one (later steps copied, so they are wrong too)."""
    lines = gold.split("\n")
    head, _, value = lines[k - 1].rpartition(" ")
    lines[k - 1] = f"{head} {int(value) + 1}"
    return "\n".join(lines)


def test_each_question_is_answered_from_the_task_check(task):
    problems, _, items = task
    rule = truth_rule(items)
    p = problems[0]
    gold = p.gold_solution
    steps = gold.split("\n")
    n = len(steps) - 1  # step lines before the answer line
    bad1, bad_last = _wrong_at(gold, 1), _wrong_at(gold, n)
    assert rule(STEP.format(question=p.question, prefix="(none)", step=steps[0])) == "Yes"
    assert rule(STEP.format(question=p.question, prefix="(none)", step=bad1.split("\n")[0])) == "No"
    assert rule(STEP.format(question=p.question, prefix="\n".join(steps[:1]), step=steps[1])) == "Yes"
    score = lambda r: rule(POINTWISE.format(rubric="correct", question=p.question, response=r, low=1, high=10))
    # share of the n + 1 checks passed before the first wrong one, placed on 1..10 and rounded
    assert (score(gold), score(bad1), score(bad_last)) == ("10", "1", str(1 + round(9 * (n - 1) / (n + 1))))
    pair = lambda a, b: rule(PAIRWISE.format(question=p.question, a=a, b=b))
    assert (pair(gold, bad1), pair(bad1, gold), pair(bad1, bad_last)) == ("A", "B", {"A": 0.5, "B": 0.5})
    assert rule(STEP.format(question="Not a problem of the file.", prefix="(none)", step="x")) == UNKNOWN
    assert rule("Is the sky blue?\n\nReply with only Yes or No.") == UNKNOWN


def test_noise_one_answers_every_question_wrongly(task):
    problems, _, items = task
    rule = truth_rule(items, noise=1.0)
    p = problems[1]
    steps = p.gold_solution.split("\n")
    assert rule(STEP.format(question=p.question, prefix="(none)", step=steps[0])) == "No"
    assert rule(POINTWISE.format(rubric="r", question=p.question, response=p.gold_solution, low=0, high=5)) == "0"
    bad = _wrong_at(p.gold_solution, 1)
    assert rule(PAIRWISE.format(question=p.question, a=p.gold_solution, b=bad)) == "B"


def test_served_verifier_judge_through_the_judge_primitive(task):
    """Chat-only over http: the judge primitive asks in both orders, and a right/wrong pair is decided for the
    right side with certainty; steps and scores come back as the task says."""
    problems, table, _ = task
    p = problems[2]
    bad = _wrong_at(p.gold_solution, 1)
    with serving(verifier_judge(table), served_model="verifier-judge") as srv:
        judge = open_judge(JudgeConfig(model="verifier-judge", backend="http", base_url=srv.url))
        (pv,) = judge.pairwise([(p.question, p.gold_solution, bad)])
        assert (pv.p_a, pv.winner) == (1.0, "a")
        steps = p.gold_solution.split("\n")
        assert [v.value for v in judge.step([(p.question, [], steps[0]), (p.question, [], bad.split("\n")[0])])] \
            == [1.0, 0.0]
        assert [v.value for v in judge.score([(p.question, p.gold_solution), (p.question, bad)], "r", (1, 10))] == \
            [10.0, 1.0]
        (unknown,) = judge.yes_no(["Is the sky blue?"])
        assert unknown.value is None and UNKNOWN in unknown.error


@pytest.mark.parametrize("args, error", [
    (["--problems", "nope.jsonl"], "error: file nope.jsonl: no such file or directory"),
    (["--problems", "bad.jsonl"], "error: file bad.jsonl, row 1, column 'prompt': missing prompt column"),
    (["--problems", "bad.jsonl", "--noise", "2"], "verifier_judge.py: error: --noise must be in [0, 1], got 2.0"),
])
def test_server_refuses_bad_input_before_serving(tmp_path, args, error):
    """A missing or malformed problems file or a noise outside [0, 1]: exit 2 with one error line, no server."""
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "pipeline.judges.verifier_judge", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == error and proc.stdout == "", proc.stderr
