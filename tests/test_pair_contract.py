"""The pair table contract (schemas/pairs.py): every stage's pair output validates and carries the column groups
it declares, with the declared types and score scales; transforms keep every group; TPO reads the lists' scale."""
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.stage import StageContext, get_stage
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table
from pipeline.train.data import declared_score_range
from pipeline.train.losses import ListLossConfig
from schemas import validate
from stages import catalog  # noqa: F401  (registers every stage)
from schemas.pairs import GROUPS, flip_sides, groups_of, make_pairs
from stages.tree.mining import SCALES, STEP_TYPES
from stages.tree_search import TreeSearchConfig, run as tree_run


def carries(table: pa.Table, groups: tuple[str, ...]) -> pa.Table:
    """`table` validated as pairs; every column of `groups` present with its declared type."""
    table = validate(table, "pairs")
    assert set(groups) <= set(groups_of(table))
    for g in groups:
        for col in GROUPS[g].columns:
            assert table.schema.field(col.field.name).type == col.field.type, col.field.name
    return table


def ok_rows(table: pa.Table) -> list[dict]:
    return table.filter(pc.equal(table["status"], "ok")).to_pylist()


@pytest.fixture(scope="module")
def tree_out():
    from tests.test_tree_search_fake import FakeArithBackend, task_rows
    problems, rows = task_rows(6)
    cfg = TreeSearchConfig(variant="mcts", iterations=12, validity_rollouts=0, terminal_pairs=True)
    return tree_run(rows, cfg, FakeArithBackend(problems, 0.6), StageContext("fp", 0, 7))


def test_tree_pairs_carry_step_pair_type_and_their_scale(tree_out):
    out = carries(tree_out["main"], ("step", "pair_type", "score_range"))
    scales = {(r["pair_type"], r["score_min"], r["score_max"]) for r in ok_rows(out)}
    assert scales == {("first_wrong_step", 0.0, 1.0)}
    # every pair type mining can write has a declared scale: success shares [0, 1], Q values and rewards [-1, 1]
    assert SCALES == {"first_wrong_step": (0.0, 1.0), "value_gap": (0.0, 1.0), "list": (0.0, 1.0),
                      "prism_sibling": (-1.0, 1.0), "terminal": (-1.0, 1.0)}
    assert set(SCALES) == set(STEP_TYPES) | {"terminal", "list"}
    # a first-wrong-step pair is one line after the shared prefix: never terminal on both sides
    steps = [r for r in ok_rows(out) if r["pair_type"] == "first_wrong_step"]
    assert all(r["chosen"].startswith(r["shared_prefix"]) for r in steps)
    assert all(r["chosen_is_terminal"] is not None and r["rejected_is_terminal"] is not None for r in steps)
    lists = validate(tree_out["lists"], "lists")
    assert set(zip(lists["score_min"].to_pylist(), lists["score_max"].to_pylist())) == {(0.0, 1.0)}


def test_select_keeps_every_group(tree_out, tmp_path):
    src = carries(tree_out["main"], ("step", "pair_type", "score_range"))
    spec = get_stage("select-pairs")
    res = run_stage(spec, src, spec.config(pair_types=["first_wrong_step"]), None, RunStore(tmp_path),
                    progress=False)
    out = carries(res.read(), ("step", "pair_type", "score_range"))
    names = [n for g in ("step", "pair_type", "score_range") for n in GROUPS[g].names] + ["pair_id"]
    assert out.select(names).to_pylist() == src.select(names).to_pylist()


def test_intervention_math_pairs_carry_step_verification_and_0_1(tmp_path):
    from tests.test_intervention import FakeSolver, _run, task
    probs, rows = task(3)
    _, out = _run(rows, FakeSolver(probs, bad=[probs[2].id]), tmp_path)
    out = carries(out, ("step", "verification", "score_range"))
    ok = ok_rows(out)
    assert len(ok) == 5
    assert {(r["score_min"], r["score_max"]) for r in ok} == {(0.0, 1.0)}
    assert {r["meta"] for r in ok} == {p.meta_json() for p in probs}


def test_sample_pairs_carry_pair_type_verification_and_0_1(tmp_path):
    from tests.test_sample_pairs import Scripted, _texts
    problems = make_split(TaskConfig.tiny(), "train", n=3)
    spec = get_stage("sample-pairs")
    res = run_stage(spec, problems_to_table(problems), spec.config(n_samples=4), Scripted(_texts(problems)),
                    RunStore(tmp_path), progress=False)
    out = carries(res.read(), ("pair_type", "verification", "score_range"))
    assert {(r["pair_type"], r["chosen_correct"], r["rejected_correct"], r["score_min"], r["score_max"])
            for r in ok_rows(out)} == {("terminal", True, False, 0.0, 1.0)}


def test_self_label_pairs_carry_verification(tmp_path):
    from tests.test_self_label import ANSWERS, ScriptedLM, _run, policy_lp, prompts, ref_lp
    from tests.helpers.references import use_reference
    use_reference("sft-contract", ScriptedLM("sft", ANSWERS, ref_lp))
    _, out = _run(prompts(), ScriptedLM("pi0", ANSWERS, policy_lp), tmp_path, n_samples=3,
                  ref_model="sft-contract")
    out = carries(out, ("verification",))
    assert "score_min" not in out.column_names  # implicit rewards declare no scale


def test_rationales_add_their_group_and_keep_the_inputs(tree_out):
    from stages import rationales as R
    from tests.test_rationales import ScriptedBackend, ctx, good_reply
    src = carries(tree_out["main"], ("step", "pair_type", "score_range"))
    out = carries(R.run(src, R.RationaleConfig(), ScriptedBackend(good_reply), ctx())["main"],
                  ("rationale", "step", "pair_type", "score_range"))
    names = [n for g in ("step", "pair_type", "score_range") for n in GROUPS[g].names]
    assert out.select(names).to_pylist() == src.select(names).to_pylist()
    ok = ok_rows(out)
    assert len(ok) == len(ok_rows(src)) > 0 and all(r["rationale"] and r["rationale_prompt"] for r in ok)


def test_deliberation_pairs_declare_0_1(tmp_path):
    from stages.deliberation import DeliberationConfig
    from tests.test_deliberation import World, prompts
    from tests.test_rationales import ScriptedBackend
    w = World()
    res = run_stage(get_stage("deliberation"), prompts(4), DeliberationConfig(), ScriptedBackend(w.reply, w.score),
                    RunStore(tmp_path), progress=False)
    ok = ok_rows(carries(res.read(), ("score_range",)))
    assert ok and {(r["score_min"], r["score_max"]) for r in ok} == {(0.0, 1.0)}


def test_stage_columns_may_not_redefine_a_group_and_flips_swap_sides():
    with pytest.raises(ValueError, match=r"\['chosen_is_terminal'\].*group \['step'\]"):
        make_pairs([], (), [pa.field("chosen_is_terminal", pa.bool_())])
    with pytest.raises(ValueError, match="unknown pair column group"):
        make_pairs([], ("steps",))
    assert flip_sides({"chosen_is_terminal": True, "rejected_is_terminal": False, "meta": "m"}) == \
        {"chosen_is_terminal": False, "rejected_is_terminal": True, "meta": "m"}


def test_tpo_label_range_follows_the_lists_declared_range():
    lists = pa.table({"prompt": ["a", "b"], "responses": [["x", "y"], ["u", "v"]], "scores": [[1.0, 0.5], [0.0, 1.0]],
                      "score_min": [0.0, 0.0], "score_max": [1.0, 1.0]})
    assert declared_score_range(lists) == (0.0, 1.0)
    assert ListLossConfig(loss_type="tpo").labels_on((0.0, 1.0)).tpo_label_range == (0.0, 1.0)
    assert ListLossConfig(loss_type="tpo").labels_on(None).tpo_label_range == (-100.0, 100.0)  # TPO's own data
    explicit = ListLossConfig(loss_type="tpo", tpo_label_range=(-5.0, 5.0))
    assert explicit.labels_on((0.0, 1.0)).tpo_label_range == (-5.0, 5.0)
    assert declared_score_range(lists.drop_columns(["score_min", "score_max"])) is None
    mixed = lists.set_column(4, "score_max", pa.array([1.0, 10.0]))
    with pytest.raises(InputError, match=r"row 1, column 'score_min': score range \[0.0, 10.0\] differs"):
        declared_score_range(mixed, "l.parquet")


def test_trainer_tpo_labels_use_the_lists_declared_range(tmp_path):
    import pyarrow.parquet as pq
    import torch
    from pipeline.train.config import TrainConfig
    from pipeline.train.losses import ListBatch, list_loss
    from pipeline.train.tiny import char_tokenizer, tiny_llama
    from pipeline.train.trainer import Trainer
    scores = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.5]]
    path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"prompt": ["1+1?", "2+2?"], "responses": [["2", "3", "11"], ["4", "5", "22"]],
                             "scores": scores, "score_min": [0.0, 0.0], "score_max": [1.0, 1.0]}), path)
    cfg = TrainConfig(model="in-memory", data=str(path), output_dir=str(tmp_path / "out"), lr=1e-3, device="cpu",
                      save_final=False, progress=False, ref_cache_dir=str(tmp_path / "cache"), micro_batch=2,
                      max_steps=1, shuffle=False, list_loss={"loss_type": "tpo"})
    tok = char_tokenizer()
    res = Trainer(cfg, model=tiny_llama(len(tok), seed=1), tokenizer=tok).train()
    # step 1: policy = reference, every log-ratio 0; only the labels' mapping onto [0, 1] sets the gains
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    batch = ListBatch(zeros, zeros, torch.ones(2, 3), torch.tensor(scores, dtype=torch.float64),
                      torch.ones(2, 3, dtype=torch.bool))
    on_declared = list_loss(batch, ListLossConfig(loss_type="tpo", tpo_label_range=(0.0, 1.0)))[0].item()
    on_default = list_loss(batch, ListLossConfig(loss_type="tpo"))[0].item()
    assert abs(on_declared - on_default) > 1e-2
    assert res.history[0]["loss"] == pytest.approx(on_declared, abs=1e-5)
