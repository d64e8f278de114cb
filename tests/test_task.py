"""The bundled arithmetic task: generation, splits, and both verifiers."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.tasks.arith import TEMPLATES, TaskConfig, apply_op, canonical_key, make_split, problems_to_table
from pipeline.tasks.verify import (extract_answer, first_wrong_step, problem_from_meta, problems_from_table,
                                   step_lines, verify_answer)

ALL_OPS = TaskConfig(ops=["+", "-", "*", "/"], min_steps=2, max_steps=6, seed=7)


@pytest.fixture(scope="module")
def problems():
    return make_split(ALL_OPS, "train", 1200)


def test_generation_covers_templates_steps_ops(problems):
    assert {p.template for p in problems} == set(TEMPLATES)
    assert {p.n_steps for p in problems} == {2, 3, 4, 5, 6}
    assert {op for p in problems for op, _ in p.ops} == {"+", "-", "*", "/"}


def test_problem_values_respect_config(problems):
    cfg = ALL_OPS
    for p in problems:
        assert cfg.start_min <= p.start <= cfg.start_max
        cur = p.start
        for op, b in p.ops:
            lo, hi = (cfg.mul_min, cfg.mul_max) if op in "*/" else (cfg.operand_min, cfg.operand_max)
            assert lo <= b <= hi
            if op == "/":
                assert cur % b == 0
            cur = apply_op(cur, op, b)
            assert 0 <= cur <= cfg.max_value
        assert cur == p.answer
        assert str(p.start) in p.question and all(str(b) in p.question for _, b in p.ops)


def test_gold_format_exact():
    p = make_split(TaskConfig(ops=["+"], min_steps=2, max_steps=2), "eval", 1)[0]
    (_, a), (_, b) = p.ops
    s1 = p.start + a
    assert p.gold_solution == f"Step 1: {p.start} + {a} = {s1}\nStep 2: {s1} + {b} = {s1 + b}\nAnswer: {s1 + b}"
    assert p.gold_steps == p.gold_solution.splitlines()[:2]


def test_verifiers_accept_all_gold_and_reject_all_corrupted_answers(problems):
    rng = random.Random(0)
    for p in problems:
        assert verify_answer(p.gold_solution, p) and verify_answer(p.gold_solution, p.answer)
        assert first_wrong_step(p.gold_solution, p) is None
        bad = p.answer + rng.choice([-10, -1, 1, 2, 100])
        corrupted = "\n".join(p.gold_steps + [f"Answer: {bad}"])
        assert not verify_answer(corrupted, p)
        assert first_wrong_step(corrupted, p) == p.n_steps + 1


def _corrupt(line: str, kind: str, rng: random.Random) -> str:
    head, expr = line.split(": ", 1)
    a, op, b, _, c = expr.split(" ")
    if kind == "result":
        c = str(int(c) + rng.choice([-3, -1, 1, 7]))
    elif kind == "operand":
        b = str(int(b) + rng.choice([1, 2]))
    elif kind == "left":
        a = str(int(a) + 1)
    else:  # operator: keep the stated arithmetic right so only the op choice is wrong
        op = next(o for o in "+-*" if o != op)
        c = str(apply_op(int(a), op, int(b)))
    return f"{head}: {a} {op} {b} = {c}"


@pytest.mark.parametrize("kind", ["result", "operand", "operator", "left"])
def test_first_wrong_step_names_the_corrupted_step(problems, kind):
    rng = random.Random(kind)
    for p in problems:
        k = rng.randint(1, p.n_steps)
        steps = list(p.gold_steps)
        steps[k - 1] = _corrupt(steps[k - 1], kind, rng)
        text = "\n".join(steps + [f"Answer: {p.answer}"])
        assert first_wrong_step(text, p) == k, (kind, text)


def test_step_verifier_structure_cases():
    p = make_split(TaskConfig(min_steps=3, max_steps=3), "eval", 1)[0]
    g = p.gold_steps
    ans = f"Answer: {p.answer}"
    assert first_wrong_step("\n".join(g[:2] + [ans]), p) == 3  # missing step
    assert first_wrong_step("\n".join(g + [g[2].replace("Step 3", "Step 4"), ans]), p) == 4  # extra step
    assert first_wrong_step("\n".join([g[0], "Step 2: I add things", g[2], ans]), p) == 2  # unparseable step
    assert first_wrong_step("\n".join([g[0], g[1].replace("Step 2", "Step 5"), g[2], ans]), p) == 2  # label
    assert first_wrong_step("\n".join(g), p) == 4  # no answer line
    assert first_wrong_step("Let me think.\n" + "\n".join(g) + "\n" + ans + "\nDone.", p) is None  # prose ignored
    assert first_wrong_step("", p) == 1
    # a right final answer reached through a wrong step is still wrong at that step (the case step checks exist for)
    lucky = [g[0], _corrupt(g[1], "result", random.Random(1)), g[2], ans]
    assert verify_answer("\n".join(lucky), p) and first_wrong_step("\n".join(lucky), p) == 2


def test_inexact_division_is_a_wrong_step():
    p = problem_from_meta({"start": 12, "ops": [["/", 4]], "question": "q"})
    assert first_wrong_step("Step 1: 12 / 4 = 3\nAnswer: 3", p) is None
    p2 = problem_from_meta({"start": 13, "ops": [["/", 4]], "question": "q"})
    assert first_wrong_step("Step 1: 13 / 4 = 3\nAnswer: 3", p2) == 1


def test_extract_answer_and_step_lines():
    assert extract_answer("Step 1: 1 + 1 = 2\nAnswer: 2") == 2
    assert extract_answer("answer: -5.") == -5
    assert extract_answer("The answer is 5") is None
    assert extract_answer("Answer: 5 apples") is None
    assert extract_answer("Answer: 7\nAnswer: 9") == 7
    assert step_lines("x\n Step 1: a\nStep 2: 1 + 1 = 2\nnope") == ["Step 1: a", "Step 2: 1 + 1 = 2"]
    assert verify_answer("Answer: 12", 12) and not verify_answer("Answer: 12", 13)


def test_deterministic_per_seed_and_prefix_stable():
    cfg = TaskConfig.tiny(seed=3)
    a, b = make_split(cfg, "train", 300), make_split(cfg, "train", 300)
    assert [(p.id, p.question, p.gold_solution) for p in a] == [(p.id, p.question, p.gold_solution) for p in b]
    assert [p.id for p in make_split(cfg, "train", 100)] == [p.id for p in a[:100]]
    other = make_split(TaskConfig.tiny(seed=4), "train", 300)
    assert len({p.id for p in a} & {p.id for p in other}) < 30  # a different seed is a different sample


def test_deterministic_across_processes():
    code = ("from pipeline.tasks.arith import TaskConfig, make_split;"
            "print(','.join(p.id for p in make_split(TaskConfig.tiny(), 'eval', 20)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": s, "PATH": ""}).stdout for s in ("1", "2")}
    assert len(outs) == 1
    assert outs.pop().strip().split(",") == [p.id for p in make_split(TaskConfig.tiny(), "eval", 20)]


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)])
def test_train_eval_disjoint_and_unique(seeds):
    cfg_t, cfg_e = TaskConfig.tiny(seed=seeds[0]), TaskConfig.tiny(seed=seeds[1])
    train, ev = make_split(cfg_t, "train", 5000), make_split(cfg_e, "eval", 1000)
    tk = {canonical_key(p.start, p.ops) for p in train}
    ek = {canonical_key(p.start, p.ops) for p in ev}
    assert len(tk) == 5000 and len(ek) == 1000
    assert not tk & ek
    assert not {p.id for p in train} & {p.id for p in ev}


def test_exhausted_space_raises():
    with pytest.raises(ValueError, match="distinct"):
        make_split(TaskConfig(min_steps=1, max_steps=1, start_min=10, start_max=11, operand_min=2, operand_max=3,
                              ops=["+"]), "train", 50)


def test_config_digits_and_validation():
    cfg = TaskConfig(start_digits=3, operand_digits=1)
    assert (cfg.start_min, cfg.start_max, cfg.operand_min, cfg.operand_max) == (100, 999, 1, 9)
    assert TaskConfig(**cfg.model_dump()) == cfg
    with pytest.raises(ValueError):
        TaskConfig(ops=["^"])
    with pytest.raises(ValueError):
        TaskConfig(min_steps=5, max_steps=3)


def test_table_roundtrip(problems):
    t = problems_to_table(problems[:50])
    assert t.column_names[:2] == ["prompt_id", "prompt"]
    assert str(t.schema.field("answer").type) == "int64"
    row = t.slice(7, 1).to_pylist()[0]
    p = problems[7]
    assert (row["prompt_id"], row["prompt"], row["gold"], row["answer"]) == (p.id, p.question, p.gold_solution,
                                                                            p.answer)
    rebuilt = problem_from_meta(row["meta"])
    assert (rebuilt.id, rebuilt.start, rebuilt.ops, rebuilt.gold_solution) == (p.id, p.start, p.ops,
                                                                             p.gold_solution)
    assert [q.id for q in problems_from_table(t)] == [q.id for q in problems[:50]]
    with pytest.raises(InputError, match="column 'meta'"):
        problem_from_meta(json.dumps({"ops": []}))


def test_cli_make_writes_parquet(tmp_path):
    from typer.testing import CliRunner

    from flows.app import app

    r = CliRunner().invoke(app, ["task", "make", "--out", str(tmp_path), "--n", "40", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert sorted(x.name for x in tmp_path.iterdir()) == ["eval.parquet", "task_config.json", "train.parquet"]
    ev = pq.read_table(tmp_path / "eval.parquet")
    assert ev.num_rows == 40
    assert ev.column("prompt_id").to_pylist() == [p.id for p in make_split(TaskConfig.tiny(seed=5), "eval", 40)]
    assert json.loads((tmp_path / "task_config.json").read_text())["seed"] == 5
    r = CliRunner().invoke(app, ["task", "show", "--n", "2"])
    assert r.exit_code == 0 and r.output.count("Answer: ") == 2


def test_cli_bad_option_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.app", "task", "make", "--out", str(tmp_path / "o"),
                        "--ops", "+,^"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid task settings" in r.stderr
    assert not (tmp_path / "o").exists()
