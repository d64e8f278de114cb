"""The Task interface: rows resolve to their task (old rows included), arith through the interface gives the
bundled verifier's verdicts, no stage/flow/report module imports a concrete task, gold-free tasks are refused
where gold is needed, and rollout step labels find the first wrong line of a task with no step check."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.backends.base import Completion
from pipeline.errors import InputError
from pipeline.tasks.registry import get_task, item_for_row, task_of_row
from pipeline.tasks.rollouts import first_wrong_line
from tests.test_architecture import import_graph, module_files

ROOT = Path(__file__).resolve().parents[1]
# The generic part of pipeline/tasks: everything else under it is a concrete task (or a piece of one).
GENERIC = {"pipeline.tasks", "pipeline.tasks.base", "pipeline.tasks.registry", "pipeline.tasks.problems",
           "pipeline.tasks.rollouts", "pipeline.tasks.loaders", "pipeline.tasks.cli", "pipeline.tasks.eval_cli"}


def concrete_task_imports(root: Path) -> dict[str, set[str]]:
    """module -> concrete task modules it imports, for every module under stages/ and flows/."""
    graph = import_graph(root, ("pipeline", "stages", "flows"))
    return {m: bad for m, deps in graph.items() if m.split(".")[0] in ("stages", "flows")
            and (bad := {d for d in deps if d.startswith("pipeline.tasks.") and d not in GENERIC})}


def test_no_stage_flow_or_report_imports_a_concrete_task():
    assert "flows.report" in module_files(ROOT, ("flows",))
    assert concrete_task_imports(ROOT) == {}


def test_the_import_walk_catches_a_concrete_import(tmp_path):
    for pkg, body in (("pipeline/tasks", ""), ("stages", ""), ("flows", "")):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text(body)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline/tasks/arith.py").write_text("X = 1\n")
    (tmp_path / "pipeline/tasks/registry.py").write_text("Y = 1\n")
    (tmp_path / "stages/ok.py").write_text("from pipeline.tasks.registry import Y\n")
    (tmp_path / "stages/bad.py").write_text("def f():\n    from pipeline.tasks.arith import X\n    return X\n")
    (tmp_path / "flows/sneaky.py").write_text("import importlib\nM = importlib.import_module('pipeline.tasks.arith')\n")
    assert concrete_task_imports(tmp_path) == {"stages.bad": {"pipeline.tasks.arith"},
                                               "flows.sneaky": {"pipeline.tasks.arith"}}


def test_rows_resolve_to_their_task_old_rows_included():
    arith_row = get_task("arith").make(1, "eval").to_pylist()[0]
    old_meta = json.loads(arith_row["meta"])
    del old_meta["task"]                                      # written before tasks had names
    assert task_of_row({"meta": json.dumps(old_meta)}).name == "arith"
    assert task_of_row(arith_row).name == "arith"
    assert task_of_row({"prompt": "2+2?", "gold_answer": "4"}).name == "math"
    assert task_of_row({"prompt": "Write a poem."}).name == "prompts"
    with pytest.raises(InputError, match="unknown task 'nope'"):
        task_of_row({"meta": '{"task": "nope"}'})
    with pytest.raises(InputError, match="meta is not JSON.*prompt_id 'p1'"):
        item_for_row({"prompt_id": "p1", "meta": "{oops"})


def test_arith_through_the_interface_matches_the_bundled_verifier():
    from pipeline.tasks.arith import make_split, TaskConfig
    from pipeline.tasks.verify import first_wrong_step, verify_answer

    probs = make_split(TaskConfig.tiny(), "eval", 20)
    rows = get_task("arith").make(20, "eval").to_pylist()
    for p, row in zip(probs, rows):
        item = item_for_row(row)
        bad = p.gold_solution.replace(p.gold_steps[1], p.gold_steps[1] + "1")
        for text in (p.gold_solution, bad, "Answer: 0"):
            assert item.correct(text) == verify_answer(text, p)
            assert item.first_wrong_step(text) == first_wrong_step(text, p)
        assert (item.gold_answer, item.n_steps, item.gold_line(1)) == (str(p.answer), p.n_steps, p.gold_steps[0])
        assert item.task.difficulty(row) == f"{p.n_steps} steps"


def test_messages_with_system_and_few_shot():
    t = get_task("math", system_prompt="Be brief.")
    shot = {"prompt": "1+1?", "gold_answer": "2"}
    assert t.messages({"prompt": "2+2?"}, few_shot=[shot]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "The answer is 2."}, {"role": "user", "content": "2+2?"}]
    assert get_task("math").messages({"prompt": "2+2?"}, system="S")[0] == {"role": "system", "content": "S"}
    gym = get_task("reasoning-gym:chain_sum")
    assert gym.messages({"prompt": "1+1="})[0]["content"].startswith("Given a problem")  # the package's prompt


def test_first_wrong_line_from_rollout_shares():
    assert first_wrong_line([0.5, 0.25, 0.0, 0.0]) == 2
    assert first_wrong_line([0.5, 0.5, 0.5]) is None       # every prefix can still reach the answer
    assert first_wrong_line([0.0, 0.0]) is None            # the prompt itself is out of reach: no line to blame


# ---------------------------------------------------------------- run configs: gold-free tasks refused


def _config(tmp_path, task: str, stage: dict) -> Path:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Write a haiku."}\n{"prompt": "Name a color."}\n')
    cfg = {"name": "t", "output_dir": str(tmp_path / "run"), "inputs": {"task": task, "path": "p.jsonl"},
           "stages": [stage], "report": False}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("stage,needs", [
    ({"stage": "sample-pairs"}, "gold answers to tell right samples from wrong ones"),
    ({"stage": "tree-search"}, "gold answers for value_fn 'rollout'"),
    ({"stage": "intervention", "config": {"mode": "math_correction"}}, "gold answers to find the first wrong"),
])
def test_prompts_task_refused_by_a_gold_needing_stage_at_load(tmp_path, stage, needs):
    from flows.config import load_run_config

    with pytest.raises(InputError) as e:
        load_run_config(_config(tmp_path, "prompts", stage))
    msg = str(e.value)
    assert f"stage {stage['stage']!r} needs {needs}" in msg and "task 'prompts' has no gold answers" in msg
    assert "run.yaml" in msg and "column 'stages.0.stage'" in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section,message,column", [
    ({"eval": {"task": "prompts", "path": "p.jsonl"}}, "eval needs gold answers to score against; task 'prompts' "
                                                       "has no gold answers", "eval.task"),
    ({"inputs": {"task": "math"}}, "task 'math' reads its problems from a file: give `path`", "inputs.path"),
    ({"inputs": {"task": "reasoning-gym:chain_sum"}}, "generates its problems: give `size`", "inputs.size"),
    ({"inputs": {"file": "p.jsonl", "size": 3}}, "`size` goes with a task name", "inputs"),
])
def test_named_task_sections_checked_at_load(tmp_path, section, message, column):
    from flows.config import load_run_config

    path = _config(tmp_path, "prompts", {"stage": "tree-search", "config": {"value_fn": "logprob"}})
    cfg = {**json.loads(path.read_text()), **section}
    path.write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_run_config(path)
    assert message in str(e.value) and f"column '{column}'" in str(e.value), str(e.value)


def test_prompts_task_accepted_where_no_gold_is_needed(tmp_path):
    from flows.config import load_run_config
    from flows.steps import prepare_inputs

    cfg, base = load_run_config(_config(tmp_path, "prompts", {"stage": "tree-search",
                                                              "config": {"value_fn": "logprob"}}))
    rows = pq.read_table(prepare_inputs(cfg, base)).to_pylist()
    assert [r["prompt"] for r in rows] == ["Write a haiku.", "Name a color."]
    assert [json.loads(r["meta"])["task"] for r in rows] == ["prompts", "prompts"]


def test_gym_inputs_from_a_run_config(tmp_path):
    from flows.config import load_run_config
    from flows.steps import prepare_inputs

    cfg = {"name": "g", "output_dir": str(tmp_path / "run"), "report": False,
           "inputs": {"task": "reasoning-gym:chain_sum", "size": 6, "seed": 1, "limit": 4,
                      "options": {"min_terms": 2, "max_terms": 2}},
           "stages": [{"stage": "sample-pairs"}]}
    (tmp_path / "g.yaml").write_text(json.dumps(cfg))
    rc, base = load_run_config(tmp_path / "g.yaml")
    rows = pq.read_table(prepare_inputs(rc, base)).to_pylist()
    expect = get_task("reasoning-gym:chain_sum", min_terms=2, max_terms=2).make(6, "train", 1).to_pylist()[:4]
    assert rows == expect
    bad = {**cfg, "inputs": {**cfg["inputs"], "options": {"no_such_option": 1}}}
    (tmp_path / "b.yaml").write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"column 'inputs.options'.*invalid options"):
        load_run_config(tmp_path / "b.yaml")


# ---------------------------------------------------------------- intervention with rollout step labels


def _c(text):
    return Completion(text=text, finish_reason="eos")


class ArithmeticGuesser:
    """Scripted policy on a math row "What is 2 + 3?" (gold 5). Samples: a wrong first line then a wrong
    answer, and a right solution. Rollouts from the empty prefix reach 5; from any prefix holding "= 6" they
    repeat 6."""

    model_id, weights_hash = "guesser", "0"
    WRONG = "2 + 3 = 6\nSo the answer is 6."
    RIGHT = "2 + 3 = 5\nThe answer is 5."

    def __init__(self):
        self.continued = []

    def generate(self, prompts, sampling=None, n=None):
        return [[_c(self.WRONG), _c(self.RIGHT)][:n] for _ in prompts]

    def continue_(self, prompts, prefixes, sampling=None, n=None):
        self.continued.append(list(prefixes))
        return [[_c("The answer is 6." if "= 6" in pre else self.RIGHT) for _ in range(n)] for pre in prefixes]


def test_intervention_uses_rollout_labels_without_a_step_check(tmp_path):
    from pipeline.engine import run_stage
    from pipeline.stage import get_stage
    from pipeline.store import RunStore
    from stages.intervention import InterventionConfig

    rows = pa.table({"prompt_id": ["q1"], "prompt": ["What is 2 + 3?"], "gold_answer": ["5"]})
    be = ArithmeticGuesser()
    res = run_stage(get_stage("intervention"), rows, InterventionConfig(n_samples=2, rollouts=3), be,
                    RunStore(tmp_path / "r"), shard_size=8, progress=False)
    out = res.read()
    assert be.continued == [["", "2 + 3 = 6\n", "2 + 3 = 6\nSo the answer is 6.\n"]]  # one call, every prefix
    ok = out.filter(pc.equal(out["status"], "ok")).to_pylist()
    assert len(ok) == 1
    r = ok[0]
    assert (r["chosen"], r["rejected"], r["wrong_step"], r["trigger_text"]) == (
        ArithmeticGuesser.RIGHT, "2 + 3 = 6", 1, "2 + 3 = 5")
    assert r["chosen_verified"] and r["rejected_is_terminal"] is False
    filtered = out.filter(pc.equal(out["status"], "filtered")).to_pylist()
    assert [f["error"] for f in filtered] == ["sample already verifies (right answer)"]
