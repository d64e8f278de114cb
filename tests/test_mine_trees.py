"""mine-trees: re-mining stored trees, and the gold fallback (a verified prefix whose sampled siblings are all
wrong gets the task's gold next line as the chosen side), on trees the scripted arithmetic policy grew."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.engine import run_stage
from pipeline.stage import StageContext, get_stage
from pipeline.store import RunStore
from pipeline.tasks.verify import first_wrong_step, problem_from_meta
from schemas import validate
from stages.mine_trees import MineTreesConfig
from stages.tree.mining import mine
from stages.tree.nodes import trees_from_table
from stages.tree_search import TreeSearchConfig, run
from tests.test_tree_search_fake import FakeArithBackend, task_rows

SEARCH = dict(variant="best_first", value_fn="step_verifier", best_first_k=3, expansion_budget=6,
              validity_rollouts=0, greedy_first=True, branch_on_error=True, step_rejected="greedy")


def _trees(n: int = 40, p_right: float = 0.35):
    problems, table = task_rows(n)
    cfg = TreeSearchConfig(**SEARCH)
    return run(table, cfg, FakeArithBackend(problems, p_right), StageContext("fp", 0, 5))["trees"], cfg


def _step_pairs(table: pa.Table) -> dict:
    return {r["pair_id"]: r for r in table.to_pylist() if r["pair_type"] == "first_wrong_step"}


def test_gold_fallback_adds_exactly_the_groups_without_a_verified_sibling():
    trees, cfg = _trees()
    plain = _step_pairs(mine(trees, cfg)[0])
    gold = _step_pairs(mine(trees, cfg, gold_fallback=True)[0])
    assert set(plain) < set(gold)  # every plain pair stays; the fallback only adds
    added = [gold[k] for k in set(gold) - set(plain)]
    assert all(json.loads(p["extra"]).get("chosen_source") == "gold" for p in added)
    # expected: one pair per verified prefix whose children include a wrong greedy step and no right one
    expect = set()
    meta = {r["prompt_id"]: r["extra"] for r in trees.to_pylist()}
    for tree, _ in trees_from_table(trees):
        for node in tree.nodes.values():
            kids = tree.children(node)
            if kids and (node.parent_id is None or node.correct) and not any(k.correct for k in kids) \
                    and any(k.greedy and k.correct is False for k in kids):
                expect.add((tree.prompt_id, tree.prefix_text(node)))
    assert len(expect) >= 3 and {(p["prompt_id"], p["shared_prefix"]) for p in added} == expect
    for p in added:
        problem = problem_from_meta(json.loads(meta[p["prompt_id"]])["meta"])
        assert p["chosen"].startswith(p["shared_prefix"]) and p["rejected"].startswith(p["shared_prefix"])
        line = p["chosen"][len(p["shared_prefix"]):]
        k = p["shared_prefix"].count("Step ") + 1
        assert line == (problem.gold_steps[k - 1] if k <= problem.n_steps else f"Answer: {problem.answer}")
        wrong_at = first_wrong_step(p["chosen"], problem)  # the chosen prefix + gold line verifies so far
        assert wrong_at is None or wrong_at > k
        assert first_wrong_step(p["rejected"], problem) == k  # the rejected line is the first wrong step
        assert p["chosen_node_id"].endswith(".gold") and p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0
        extra = json.loads(p["extra"])
        assert extra["rejected_greedy"] is True and extra["chosen_greedy"] is False


def test_mine_trees_stage_reads_a_tree_stage_output_and_matches_mine(tmp_path):
    trees, cfg = _trees(24)
    spec = get_stage("mine-trees")
    mcfg = MineTreesConfig(step_rejected="greedy", gold_fallback=True)
    res = run_stage(spec, validate(trees, "trees"), mcfg, None, RunStore(tmp_path), shard_size=7, progress=False)
    got = res.store.read("main")
    validate(got, "pairs")
    want = mine(trees, cfg, gold_fallback=True)[0]
    assert got.num_rows == want.num_rows > 0
    assert sorted(got.column("pair_id").to_pylist()) == sorted(want.column("pair_id").to_pylist())
    assert res.store.read("lists").num_rows == mine(trees, cfg)[1].num_rows
    # without the fallback the stage re-mines to the search stage's own pairs
    res2 = run_stage(spec, trees, MineTreesConfig(step_rejected="greedy"), None, RunStore(tmp_path / "b"),
                     shard_size=7, progress=False)
    assert sorted(res2.store.read("main").column("pair_id").to_pylist()) == \
        sorted(mine(trees, cfg)[0].column("pair_id").to_pylist())


def test_gold_fallback_needs_a_step_verifier():
    trees, cfg = _trees(12)
    assert any("gold" in r["extra"] for r in mine(trees, cfg, gold_fallback=True)[0].to_pylist())  # with meta
    rows = trees.to_pylist()
    for r in rows:  # drop the task meta: no gold steps to fall back on
        extra = json.loads(r["extra"])
        extra["meta"] = None
        r["extra"] = json.dumps(extra)
    bare = pa.Table.from_pylist(rows, schema=trees.schema)
    pairs = mine(bare, cfg.model_copy(update={"step_pairs": "first_wrong_step"}), gold_fallback=True)[0]
    assert not any("gold" in (r["extra"] or "") for r in pairs.to_pylist())


def test_read_input_takes_a_stage_folder_output(tmp_path):
    from pipeline.engine import read_input
    from schemas.errors import InputError

    problems, table = task_rows(8)  # the tree-search stage writes main, trees and lists
    run_stage(get_stage("tree-search"), table, TreeSearchConfig(**SEARCH), FakeArithBackend(problems, 0.35),
              RunStore(tmp_path), shard_size=4, progress=False)
    got = read_input(tmp_path / "tree-search@trees", "trees")
    assert got.num_rows == 8 and "nodes" in got.column_names
    with pytest.raises(InputError, match="no output 'nope'.*trees"):
        read_input(f"{tmp_path / 'tree-search'}@nope", "trees")


def test_chosen_continuation_runs_the_chosen_side_to_a_verified_answer(tmp_path):
    trees, cfg = _trees(60)
    plain = list(_step_pairs(mine(trees, cfg)[0]).values())
    cont = list(_step_pairs(mine(trees, cfg, chosen_continuation=True)[0]).values())
    meta = {r["prompt_id"]: problem_from_meta(json.loads(r["extra"])["meta"]) for r in trees.to_pylist()}
    key = lambda p: (p["prompt_id"], p["shared_prefix"], p["rejected"], p["chosen_node_id"])  # noqa: E731
    assert sorted(map(key, plain)) == sorted(map(key, cont))  # the same pairs; only the chosen text may grow
    by_key = {key(p): p for p in plain}
    n_continued = 0
    for p in cont:
        base, extra = by_key[key(p)], json.loads(p["extra"])
        assert p["chosen"].startswith(base["chosen"]) and p["rejected"] == base["rejected"]
        if extra["chosen_continued"]:
            n_continued += 1
            problem = meta[p["prompt_id"]]
            assert first_wrong_step(p["chosen"], problem) is None  # every step and the answer verify
            assert p["chosen"] != base["chosen"] and p["chosen_is_terminal"] is True
            assert extra["chosen_end_node_id"].startswith(p["chosen_node_id"] + ".")
        else:
            assert p["chosen"] == base["chosen"] and extra["chosen_end_node_id"] == p["chosen_node_id"]
            assert p["chosen_is_terminal"] == base["chosen_is_terminal"]
    # the fake policy's trees hold both kinds: chosen steps the search carried to the answer and ones it did not
    assert 0 < n_continued < len(cont)
    # the stage passes the option through
    res = run_stage(get_stage("mine-trees"), trees, MineTreesConfig(step_rejected="greedy", chosen_continuation=True),
                    None, RunStore(tmp_path), shard_size=9, progress=False)
    assert sorted(res.store.read("main").column("chosen").to_pylist()) == \
        sorted(p["chosen"] for p in mine(trees, cfg, chosen_continuation=True)[0].to_pylist())
