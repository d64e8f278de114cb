"""Pair rows get their defaults in one place: schemas.pairs.make_pairs fills what a row leaves out (ROW_DEFAULTS)
and model_name is the one fallback for a model id. No stage writes a fallback of its own (checked on the source),
and every pair-making stage, run through its real code path with a backend that reports no model id, writes the
same value for it."""
import ast
import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.engine import run_stage
from pipeline.stage import StageContext, get_stage
from pipeline.store import RunStore
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table
from schemas import validate
from schemas.pairs import GROUPS, ROW_DEFAULTS, UNKNOWN_MODEL, make_pairs, model_name
from schemas.tables import PAIRS
from stages import catalog  # noqa: F401  (registers every stage)

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
BARE = {"prompt_id": "p", "prompt": "x", "stage": "tree", "method": "m", "row_key": "k", "status": "filtered",
        "created_at": T0}


def test_a_row_that_leaves_columns_out_gets_the_one_default_of_each():
    (row,) = make_pairs([BARE], ("step", "verification")).to_pylist()
    assert {k: row[k] for k in ROW_DEFAULTS} == {"chosen": "", "rejected": "", "generator_model": "unknown",
                                                 "extra": "{}", "status": "filtered"}
    assert row["pair_id"] == "k" and row["created_at"] == T0   # pair_id: the row's row_key
    nulls = set(PAIRS.names) - set(BARE) - set(ROW_DEFAULTS) - {"pair_id"}
    nulls |= {n for g in ("step", "verification") for n in GROUPS[g].names}
    assert {k for k in nulls if row[k] is not None} == set()
    # None means "left out" too; a value given wins over the default
    given = make_pairs([{**BARE, "generator_model": None, "chosen": "c", "extra": {"b": 1, "a": 2}, "status": None,
                         "pair_id": "id"}]).to_pylist()[0]
    assert (given["generator_model"], given["chosen"], given["extra"], given["status"], given["pair_id"]) == \
        ("unknown", "c", json.dumps({"a": 2, "b": 1}), "ok", "id")


def test_created_at_defaults_to_when_the_table_is_built():
    before = dt.datetime.now(dt.timezone.utc)
    rows = make_pairs([{k: v for k, v in BARE.items() if k != "created_at"}] * 2).to_pylist()
    assert rows[0]["created_at"] == rows[1]["created_at"] and before <= rows[0]["created_at"]


def test_a_column_the_stage_does_not_declare_is_refused():
    with pytest.raises(ValueError, match=r"\['generatr_model'\] that the stage does not declare"):
        make_pairs([{**BARE, "generatr_model": "m"}])
    with pytest.raises(ValueError, match=r"\['meta'\]"):   # a group column without its group
        make_pairs([{**BARE, "meta": "{}"}], ("step",))


def test_model_name_is_the_one_model_fallback():
    class Named:
        model_id = "org/m"

    class Blank:
        model_id = ""

    assert [model_name(Named()), model_name(Blank()), model_name(object())] == ["org/m", UNKNOWN_MODEL, UNKNOWN_MODEL]


# ---------------------------------------------------------------------------------------------- source check
PAIR_COLUMNS = set(PAIRS.names) | {n for g in GROUPS.values() for n in g.names}


def _fallback(value: ast.expr) -> str | None:
    """How `value` falls back to a literal: `x or "unknown"`, `x.get(k, "")`, `getattr(x, name, "unknown")`.
    `x or None` is none: null is every column's value when a row has none."""
    def literal(node):
        return isinstance(node, ast.Constant) and node.value is not None

    if isinstance(value, ast.BoolOp) and isinstance(value.op, ast.Or) and literal(value.values[-1]):
        return "or"
    if isinstance(value, ast.Call) and len(value.args) >= 2 and literal(value.args[-1]):
        fn = value.func
        if (isinstance(fn, ast.Attribute) and fn.attr == "get") or (isinstance(fn, ast.Name) and fn.id == "getattr"):
            return "get/getattr"
    return None


def fallbacks(source: str) -> list[str]:
    """Pair-column values a module gives with a literal fallback, its own model-id lookups, and side texts
    written as "" (ROW_DEFAULTS' value for a row with no text)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "model_id":
            found.append(f"line {node.lineno}: getattr(..., 'model_id') (use schemas.pairs.model_name)")
        entries = []
        if isinstance(node, ast.Dict):
            entries = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Call):
            entries = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        for key, value in entries:
            if key not in PAIR_COLUMNS:
                continue
            how = _fallback(value)
            if how is None and key in ("chosen", "rejected") and isinstance(value, ast.Constant) and value.value == "":
                how = "literal ''"
            if how is not None:
                found.append(f"line {value.lineno}: {key} ({how})")
    return found


def test_the_check_finds_each_kind_of_fallback():
    src = ('a = {"generator_model": m or "unknown", "judge_model": r.get("judge_model", ""), "chosen": ""}\n'
           'row.update(generator_model=getattr(b, "name", "x"))\n'
           'm = getattr(backend, "model_id", None)\n'
           'ok = {"generator_model": model, "judge_model": cfg.judge_model or model, "meta": r.get("meta"), '
           '"rejected": t.text, "other": x or "", "shared_prefix": p or None}\n')
    assert fallbacks(src) == ["line 1: generator_model (or)", "line 1: judge_model (get/getattr)",
                              "line 1: chosen (literal '')", "line 2: generator_model (get/getattr)",
                              "line 3: getattr(..., 'model_id') (use schemas.pairs.model_name)"]


def test_no_stage_module_writes_a_fallback_of_its_own():
    found = {str(p.relative_to(ROOT)): fallbacks(p.read_text()) for p in sorted((ROOT / "stages").rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}


# ------------------------------------------------------------------------------------------------ real paths
class Anonymous:
    """A stage's test backend that reports no model id (a duck-typed backend, a server that names none)."""
    model_id = None

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _model_columns(table: pa.Table) -> dict[str, set]:
    table = validate(table, "pairs")
    cols = [c for c in table.column_names if c in ("generator_model", "judge_model") or c.endswith("_model")]
    return {c: set(pc.unique(table[c]).to_pylist()) for c in cols}


def test_every_pair_stage_writes_the_same_unknown_model(tmp_path):
    from stages import rationales as R
    from stages.deliberation import DeliberationConfig
    from stages.tree_search import TreeSearchConfig, run as tree_run
    from tests.test_deliberation import World, prompts as delib_prompts
    from tests.test_intervention import FakeSolver, _run as intervention_run, task
    from tests.test_rationales import ScriptedBackend, ctx, good_reply
    from tests.test_sample_pairs import Scripted, _texts
    from tests.test_self_label import ANSWERS, ScriptedLM, _run as self_label_run, prompts, policy_lp
    from tests.test_tree_search_fake import FakeArithBackend, task_rows

    problems, rows = task_rows(4)
    tree = tree_run(rows, TreeSearchConfig(variant="mcts", iterations=12, validity_rollouts=0),
                    Anonymous(FakeArithBackend(problems, 0.6)), StageContext("fp", 0, 7))["main"]
    probs = make_split(TaskConfig.tiny(), "train", n=3)
    spec = get_stage("sample-pairs")
    sampled = run_stage(spec, problems_to_table(probs), spec.config(n_samples=4), Anonymous(Scripted(_texts(probs))),
                        RunStore(tmp_path / "s"), progress=False).read()
    iprobs, irows = task(3)
    intervened = intervention_run(irows, Anonymous(FakeSolver(iprobs, bad=[iprobs[2].id])), tmp_path)[1]
    labelled = self_label_run(prompts(), Anonymous(ScriptedLM("pi0", ANSWERS, policy_lp)), tmp_path, n_samples=3)[1]
    w = World()
    deliberated = run_stage(get_stage("deliberation"), delib_prompts(2), DeliberationConfig(),
                            Anonymous(ScriptedBackend(w.reply, w.score)), RunStore(tmp_path / "d"),
                            progress=False).read("main")
    argued = R.run(tree, R.RationaleConfig(), Anonymous(ScriptedBackend(good_reply)), ctx())["main"]
    relabel = get_stage("reward-relabel")
    # relabel carries its source's generator_model (here the tree's), with no fallback of its own
    relabeled = run_stage(relabel, tree, relabel.config(), None, RunStore(tmp_path / "r"), progress=False).read()

    tables = {"tree-search": tree, "sample-pairs": sampled, "intervention": intervened, "self-label": labelled,
              "deliberation": deliberated, "rationales": argued, "reward-relabel": relabeled}
    got = {name: _model_columns(t) for name, t in tables.items()}
    # a row that is not a pair keeps its row_key as pair_id, in every stage that leaves pair_id to the default
    not_pairs = {name: [(r["pair_id"], r["row_key"]) for r in t.to_pylist() if r["status"] != "ok"]
                 for name, t in tables.items() if name != "tree-search"}
    assert not_pairs["self-label"] and all(pid == key for rows in not_pairs.values() for pid, key in rows)
    assert all(t.num_rows for t in (tree, sampled, intervened, labelled, deliberated, argued, relabeled))
    assert got == {
        "tree-search": {"generator_model": {"unknown"}, "judge_model": {None}},
        "sample-pairs": {"generator_model": {"unknown"}, "judge_model": {None}},
        "intervention": {"generator_model": {"unknown"}, "judge_model": {None}, "detector_model": {"verifier"}},
        "self-label": {"generator_model": {"unknown"}, "judge_model": {"unknown"}},
        "deliberation": {"generator_model": {"unknown"}, "judge_model": {"unknown"}},
        "rationales": {"generator_model": {"unknown"}, "judge_model": {None}, "rationale_model": {"unknown"}},
        "reward-relabel": {"generator_model": {"unknown"}, "judge_model": {None}},
    }
