"""Stage 1 through the engine with the scripted arithmetic policy (fast, exact): batching, outputs, re-mining,
failures, determinism, quality invariants, the CLI options."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.engine import run_stage
from pipeline.stage import StageContext, get_stage
from pipeline.store import RunStore
from schemas import validate
from stages.tree.mining import mine
from stages.tree.quality import quality_report
from stages.tree_search import TreeSearchConfig, run
from tests.test_tree_search_fake import FakeArithBackend, task_rows

SPEC = get_stage("tree-search")


def _run(n: int, cfg: TreeSearchConfig, p_right: float = 0.7, shard_seed: int = 7):
    problems, table = task_rows(n)
    fb = FakeArithBackend(problems, p_right)
    out = run(table, cfg, fb, StageContext("fp", 0, shard_seed))
    return out, fb


@pytest.mark.parametrize("variant", ["mcts", "best_first", "tpo_list"])
def test_one_backend_call_serves_every_tree(variant):
    """Cross-tree batching: the number of backend calls does not grow with the number of trees."""
    cfg = TreeSearchConfig(variant=variant, iterations=10)
    rounds = {"mcts": cfg.iterations, "best_first": 2 * cfg.max_depth, "tpo_list": 1}[variant]
    out, many = _run(8, cfg)
    # per round: one expansion call and one value call for all trees; + finalisation + validity check
    assert len(many.calls) <= 2 * rounds + 2
    assert max(c["prompts"] for c in many.calls) > 8  # a single call carries nodes of several trees
    for name, kind in (("main", "pairs"), ("trees", "trees"), ("lists", "lists")):
        validate(out[name], kind)


def test_mcts_tree_shape_and_values():
    cfg = TreeSearchConfig(variant="mcts", iterations=20, expansion_width=3, validity_rollouts=0)
    out, fb = _run(3, cfg)
    for row in out["trees"].to_pylist():
        nodes = {n["node_id"]: n for n in row["nodes"]}
        # every node got a value (finalisation); the root counts all 20 iterations plus the finalised nodes
        assert all(n["visits"] >= 1 and n["reward"] is not None for n in nodes.values())
        assert nodes["0"]["visits"] >= 20
        for n in nodes.values():
            kids = [k for k in nodes.values() if k["parent_id"] == n["node_id"]]
            assert len(kids) <= 3 and len({k["step_text"] for k in kids}) == len(kids)  # width, no duplicates
            assert -1.0 <= n["reward"] <= 1.0 and n["depth"] <= cfg.max_depth
            if n["q_value"] is not None:
                assert n["q_value"] == pytest.approx(n["value_sum"] / n["visits"])
    # expansions asked for `width` samples per node
    assert {c["n"] for c in fb.calls if c["kind"] == "continue"} == {3, 8}


def test_backup_sums_match_children():
    """Mean backup: a node's value_sum is its own reward times its own evaluations plus its children's sums."""
    cfg = TreeSearchConfig(variant="mcts", iterations=16, validity_rollouts=0)
    out, _ = _run(2, cfg)
    for row in out["trees"].to_pylist():
        nodes = {n["node_id"]: n for n in row["nodes"]}
        for n in nodes.values():
            kids = [k for k in nodes.values() if k["parent_id"] == n["node_id"]]
            own_visits = n["visits"] - sum(k["visits"] for k in kids)
            assert own_visits >= 1
            assert n["value_sum"] == pytest.approx(own_visits * n["reward"] + sum(k["value_sum"] for k in kids))


@pytest.mark.parametrize("variant", ["mcts", "best_first", "tpo_list"])
def test_pairs_verify_exactly(variant):
    out, _ = _run(10, TreeSearchConfig(variant=variant, iterations=24))
    q = quality_report(out["main"], out["trees"])
    assert q["pairs"] > 0 and q["step_pairs"] > 0
    assert q["step_chosen_right_rejected_wrong"] == 1.0
    if q["terminal_pairs"]:
        assert q["terminal_chosen_right_rejected_wrong"] == 1.0 and q["terminal_chosen_all_steps_right"] == 1.0
    # the fake's wrong step ruins every later step, so fresh rollouts from it never succeed
    assert q["step_order_holds"] is not None and q["step_order_holds"] >= 0.9
    for r in out["main"].to_pylist():
        if r["pair_type"] == "first_wrong_step":
            # rejected = shared prefix + ONE step line, not the rest of a sample
            assert "\n" not in r["rejected"][len(r["shared_prefix"]):]
            assert "\n" not in r["chosen"][len(r["shared_prefix"]):]


def test_stored_trees_remine_to_the_same_pairs():
    cfg = TreeSearchConfig(variant="best_first", validity_rollouts=0)
    out, _ = _run(5, cfg)
    pairs, lists = mine(out["trees"], cfg)
    key = ["pair_id", "pair_type", "chosen", "rejected", "shared_prefix", "chosen_score", "rejected_score"]
    assert pairs.select(key).equals(out["main"].select(key))
    assert lists.select(["responses", "scores"]).equals(out["lists"].select(["responses", "scores"]))
    stricter, _ = mine(out["trees"], cfg.model_copy(update={"step_min_margin": 0.5, "terminal_pairs": False}))
    assert 0 < stricter.num_rows < pairs.num_rows
    assert all(r["score_margin"] >= 0.5 for r in stricter.to_pylist())


def test_tpo_lists_start_with_the_gold_solution():
    problems, table = task_rows(4)
    out, fb = _run(4, TreeSearchConfig(variant="tpo_list", num_branches=3, list_samples=2, validity_rollouts=0))
    assert [c["kind"] for c in fb.calls] == ["continue"]  # one call for all branches of all trees
    assert fb.calls[0]["prompts"] == 4 * (3 + 2)
    gold = {p.question: p.gold_solution for p in problems}
    lists = out["lists"].to_pylist()
    assert len(lists) >= 1
    for lst in lists:
        assert lst["responses"][0] == gold[lst["prompt"]] and lst["scores"][0] == 1.0
        assert lst["scores"] == sorted(lst["scores"], reverse=True) and 2 <= len(lst["responses"]) <= 5


def test_rows_without_gold_fail_alone_and_are_reported():
    problems, table = task_rows(4)
    plain = pa.table({"prompt_id": ["plain-1"], "prompt": [problems[0].question]})
    mixed = pa.concat_tables([table.select(["prompt_id", "prompt", "gold_answer", "meta"]),
                              plain.append_column("gold_answer", pa.nulls(1, pa.string()))
                              .append_column("meta", pa.nulls(1, pa.string()))])
    out = run(mixed, TreeSearchConfig(iterations=6), FakeArithBackend(problems), StageContext("fp", 0, 1))
    failed = [r for r in out["main"].to_pylist() if r["status"] == "failed"]
    assert [r["prompt_id"] for r in failed] == ["plain-1"] and "gold answer" in failed[0]["error"]
    trees = {r["prompt_id"]: r["status"] for r in out["trees"].to_pylist()}
    assert trees == {**{p.id: "ok" for p in problems}, "plain-1": "failed"}
    validate(out["main"], "pairs")


def test_logprob_and_step_verifier_values():
    out, fb = _run(3, TreeSearchConfig(value_fn="logprob", iterations=8, validity_rollouts=0))
    assert any(c["kind"] == "logprobs" for c in fb.calls)
    for row in out["trees"].to_pylist():
        for n in row["nodes"][1:]:
            assert -1.0 < n["reward"] < 1.0  # 2 exp(mean logp) - 1 with logp = -0.1 per char
    out, fb = _run(3, TreeSearchConfig(value_fn="step_verifier", iterations=8, validity_rollouts=0))
    assert all(c["n"] == 3 for c in fb.calls)  # only expansions: the verifier needs no model call
    for row in out["trees"].to_pylist():
        for n in row["nodes"][1:]:
            assert n["reward"] == (1.0 if n["correct"] else -1.0)


def test_same_inputs_same_outputs():
    cfg = TreeSearchConfig(iterations=10)
    a, _ = _run(4, cfg)
    b, _ = _run(4, cfg)
    drop = lambda t: t.drop_columns(["created_at"])  # noqa: E731
    assert drop(a["main"]).equals(drop(b["main"])) and a["trees"].equals(b["trees"])


def test_engine_run_resume_and_validity_in_extra(tmp_path):
    problems, table = task_rows(9)
    fb = FakeArithBackend(problems)
    cfg = TreeSearchConfig(iterations=10)
    res = run_stage(SPEC, table, cfg, fb, RunStore(tmp_path), shard_size=4, progress=False)
    assert res.summary["rows"]["trees"] == 9
    calls = len(fb.calls)
    run_stage(SPEC, table, cfg, fb, RunStore(tmp_path), shard_size=4, progress=False)
    assert len(fb.calls) == calls  # finished shards are not recomputed
    trees = res.store.read("trees")
    validity = [json.loads(e)["shard_validity"] for e in trees.column("extra").to_pylist()]
    assert all(v["step_pairs_checked"] > 0 and 0.0 <= v["order_holds"] <= 1.0 for v in validity)


def test_cli_exposes_config_fields():
    from typer.testing import CliRunner

    from flows.app import app
    result = CliRunner().invoke(app, ["stage", "tree-search", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("--variant", "--expansion-width", "--iterations", "--value-fn", "--v-threshold",
                 "--validity-rollouts", "--tie-policy", "--config"):
        assert flag in result.output


def test_yaml_config_with_option_overrides(tmp_path):
    from pipeline.stage_cli import load_config
    from schemas.errors import InputError

    f = tmp_path / "ts.yaml"
    f.write_text('variant: best_first\nstep_stop: ["\\n", "<|/step|>"]\niterations: 40\nv_threshold: 0.5\n')
    cfg = load_config(SPEC, f, {"iterations": 5, "tie_policy": None})
    assert (cfg.variant, cfg.step_stop, cfg.iterations, cfg.v_threshold, cfg.tie_policy) == \
        ("best_first", ["\n", "<|/step|>"], 5, 0.5, "drop")
    f.write_text("variant: beam\n")
    with pytest.raises(InputError, match="variant"):
        load_config(SPEC, f, {})
