"""Evaluation on any task: exact accuracy and Wilson intervals through each task's check, per difficulty, and
`prefpipe eval --task` / `prefpipe task make --task` through the real CLI."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.backends.base import Completion
from pipeline.evaluate import evaluate_task, wilson_interval
from pipeline.tasks.registry import get_task
from tests.helpers.cli import run_prefpipe


class Answerer:
    """Answers `<answer>gold</answer>` where told to be right, else a wrong number; records its prompts."""

    model_id, weights_hash = "answerer", "0"

    def __init__(self, gold_by_prompt: dict, right: set):
        self.gold, self.right, self.prompts = gold_by_prompt, right, []

    def generate(self, prompts, sampling=None, n=1):
        self.prompts += prompts
        out = []
        for p in prompts:
            q = p[-1]["content"] if isinstance(p, list) else p
            out.append([Completion(text=f"<answer>{self.gold[q] if q in self.right else '-999'}</answer>",
                                   finish_reason="eos")])
        return out


def test_gym_eval_counts_exactly_with_the_tasks_system_prompt():
    task = get_task("reasoning-gym:chain_sum")
    rows = task.make(7, "eval", seed=2).to_pylist()
    right = {r["prompt"] for r in rows[::2]}                               # problems 0, 2, 4, 6
    be = Answerer({r["prompt"]: r["gold_answer"] for r in rows}, right)
    res = evaluate_task(be, rows, batch_size=3)
    assert (res["n"], res["correct"]) == (7, 4) and res["accuracy"] == pytest.approx(4 / 7)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(wilson_interval(4, 7))
    assert [p["correct"] for p in res["per_problem"]] == [True, False] * 3 + [True]
    assert [p["score"] for p in res["per_problem"]] == [1.0, 0.0] * 3 + [1.0]
    assert be.prompts[0][0]["role"] == "system" and res["by_difficulty"] == {}


def test_math_eval_per_difficulty(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "solution": f"\\boxed{{{2 * i}}}",
                                     "level": f"Level {1 + i % 2}"}) + "\n" for i in range(6)))
    rows = get_task("math").load(f).to_pylist()
    right = {r["prompt"] for r in rows if r["prompt"] != "What is 1 + 1?"}   # one Level 2 problem wrong
    res = evaluate_task(Answerer({r["prompt"]: r["gold_answer"] for r in rows}, right), rows)
    assert res["correct"] == 5
    lo, hi = wilson_interval(2, 3)
    assert res["by_difficulty"] == {
        "Level 1": {"n": 3, "correct": 3, "accuracy": 1.0, "ci_low": pytest.approx(wilson_interval(3, 3)[0]),
                    "ci_high": 1.0},
        "Level 2": {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3), "ci_low": pytest.approx(lo),
                    "ci_high": pytest.approx(hi)}}


def test_eval_cli_math_file_agrees_with_arith_on_the_same_problems(tmp_path, monkeypatch, capsys):
    """The tiny policy's greedy answers on 8 bundled problems, checked by the arith task and, from a GSM8K-style
    file of the same questions, by math-verify: the same verdict on every problem."""
    rows = get_task("arith").make(8, "eval").to_pylist()
    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps({"question": r["prompt"], "answer": f"work\n#### {r['gold_answer']}"}) + "\n"
                         for r in rows))
    # room for whole solutions: a cut-off one has no "Answer:" line, and math (not arith) then reads its last number
    common = ["--model", "tiny-policy", "--n", "8", "--max-tokens", "160", "--batch-size", "8"]
    code, out_a, err = run_prefpipe(["eval", "--task", "arith", *common, "--json", tmp_path / "a.json"],
                                    monkeypatch, capsys)
    assert code == 0, err
    code, out_m, err = run_prefpipe(["eval", "--task", "math", "--path", f, *common, "--json", tmp_path / "m.json"],
                                    monkeypatch, capsys)
    assert code == 0, err
    a, m = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "m.json"))
    assert [p["output"] for p in a["per_problem"]] == [p["output"] for p in m["per_problem"]]
    assert all("Answer:" in p["output"] for p in a["per_problem"]) and 0 < a["correct"] < 8  # both verdicts occur
    assert [p["correct"] for p in a["per_problem"]] == [p["correct"] for p in m["per_problem"]]
    assert a["correct"] == sum(p["correct"] for p in a["per_problem"]) and (m["task"], a["task"]) == ("math", "arith")
    assert f"({a['correct']}/8)" in out_a and "task math" in out_m
    assert set(a["by_difficulty"]) <= {"3 steps", "4 steps"} and sum(d["n"] for d in a["by_difficulty"].values()) == 8


@pytest.mark.parametrize("argv,msg", [
    (["eval", "--task", "nope"], "unknown task 'nope'"),
    (["eval", "--task", "math"], "generates no problems; load them from a file"),
    (["eval", "--task", "prompts", "--path", "MISSING"], "no such file"),
    (["task", "make", "--task", "reasoning-gym:chain_sum", "--option", "min_terms"], "expected key=value"),
])
def test_bad_task_arguments_exit_2_before_a_model_loads(argv, msg, tmp_path, monkeypatch, capsys):
    argv = [str(tmp_path / "missing.jsonl") if a == "MISSING" else a for a in argv]
    if argv[0] == "task":
        argv += ["--out", str(tmp_path / "o")]
    code, _, err = run_prefpipe(argv + (["--model", "no-such-model"] if argv[0] == "eval" else []),
                                monkeypatch, capsys)
    assert code == 2 and msg in err and err.startswith("error: "), err
    assert not (tmp_path / "o").exists()


def test_task_make_writes_gym_and_math_tables(tmp_path, monkeypatch, capsys):
    code, out, err = run_prefpipe(["task", "make", "--task", "reasoning-gym:spell_backward", "--n", "5",
                                   "--seed", "4", "--option", "min_word_len=4", "--out", tmp_path / "g"],
                                  monkeypatch, capsys)
    assert code == 0, err
    train = pq.read_table(tmp_path / "g" / "train.parquet").to_pylist()
    assert train == get_task("reasoning-gym:spell_backward", min_word_len=4).make(5, "train", 4).to_pylist()
    assert all(len(r["gold_answer"]) >= 4 for r in train)
    assert json.loads((tmp_path / "g" / "task_config.json").read_text())["options"] == {"min_word_len": 4}
    f = tmp_path / "own.jsonl"
    f.write_text('{"q": "Half of 3?", "a": "3/2"}\n')
    code, _, err = run_prefpipe(["task", "make", "--task", "math", "--path", f, "--prompt-column", "q",
                                 "--answer-column", "a", "--out", tmp_path / "m"], monkeypatch, capsys)
    assert code == 0, err
    (row,) = pq.read_table(tmp_path / "m" / "train.parquet").to_pylist()
    assert (row["prompt"], row["gold_answer"]) == ("Half of 3?", "3/2")
    assert get_task("math").check("That is 1.5 apples.", row).correct
