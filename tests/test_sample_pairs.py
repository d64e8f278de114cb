"""sample-pairs (the naive final-answer baseline): exact pairs on a scripted policy."""
import pyarrow as pa
import pytest

from pipeline.backends.base import Completion
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table
from schemas.errors import InputError
import stages.sample_pairs  # noqa: F401


class Scripted:
    model_id = weights_hash = "scripted"

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, sampling=None, n=None):
        return [[Completion(text=self.texts[p][k % len(self.texts[p])], finish_reason="eos") for k in range(n)]
                for p in prompts]


def _texts(problems):
    out = {}
    for p in problems:
        gold = p.gold_solution
        wrong_answer = gold.rsplit("Answer:", 1)[0] + f"Answer: {p.answer + 1}"
        # right final answer, wrong step 1 (a right answer through a wrong step)
        lines = gold.split("\n")
        lines[0] = lines[0].rsplit("=", 1)[0] + f"= {int(lines[0].rsplit('=', 1)[1]) + 1}"
        lucky = "\n".join(lines)
        out[p.question] = [gold, wrong_answer, lucky, gold]
    return out


@pytest.mark.parametrize("requires,n_chosen", [("answer", 2), ("steps", 1)])
def test_sample_pairs_exact(tmp_path, requires, n_chosen):
    problems = make_split(TaskConfig.tiny(), "train", n=5)
    spec = get_stage("sample-pairs")
    cfg = spec.config(n_samples=4, chosen_requires=requires, max_pairs_per_prompt=4)
    res = run_stage(spec, problems_to_table(problems), cfg, Scripted(_texts(problems)), RunStore(tmp_path),
                    progress=False)
    t = res.read()
    assert t.num_rows == 5 * n_chosen               # distinct right (or step-verified) x 1 wrong, per problem
    by_q = {p.question: p for p in problems}
    for row in t.to_pylist():
        p = by_q[row["prompt"]]
        assert row["rejected"].endswith(f"Answer: {p.answer + 1}")
        assert row["chosen"].endswith(f"Answer: {p.answer}")
        assert row["pair_type"] == "terminal" and row["method"] == f"final_answer_{requires}"
    assert len(set(t.column("row_key").to_pylist())) == t.num_rows


def test_sample_pairs_needs_task_meta(tmp_path):
    spec = get_stage("sample-pairs")
    rows = pa.table({"prompt_id": ["a"], "prompt": ["hi"]})
    with pytest.raises(InputError, match="meta"):
        run_stage(spec, rows, spec.config(), Scripted({"hi": ["x"]}), RunStore(tmp_path), progress=False)
    assert not (tmp_path / "sample-pairs" / "part-00000.parquet").exists()
