"""Golden test: a fixed hand-built tree (tests/golden/tree_search_tree.json) gives exactly the pairs and list
worked out by hand (tests/golden/tree_search_expected.json).

How the expected values follow from the tree (problem: 10 + 2 = 12, 12 * 3 = 36):
- first_wrong_step: under the root (empty prefix) 0.1 is right, 0.2 and 0.3 ("Answer: 12") are wrong, so two
  pairs; scores are rollout shares (0.75 vs 0.0; 0.3 has no rollouts, reward -1 -> 0.0). Under 0.1, 0.1.1 is
  right, 0.1.2 and 0.1.3 wrong; 0.1.3's lucky rollouts tie with 0.1.1 (1.0 = 1.0), so the default tie policy
  drops that pair. 0.1.2 and 0.2 are wrong prefixes: nothing below them is a first wrong step.
- terminal: right = {0.1.1.1} (reward 1 >= 0.8, verified); wrong = {0.1.2.1, 0.3} (reward -1 <= 0.4);
  the single right one is tiled min(2 // 1 + 1, 4) = 3 times and zipped with the two wrong ones.
- list: the three terminals by graded score: all right 1.0; first wrong step 2 of 3 lines -> 1/3; wrong at
  line 1 -> 0.
- prism_sibling: only under 0.1 does a child reach Q >= 0.8 with a gap > 0.4: (0.1.1, 0.1.2); (0.1.3, 0.1.2)
  also passes the Q test but 0.1.3 is a wrong step, so require_verified drops it.
- value_gap: gaps >= 0.375 on the [0, 1] scores: (0.1, 0.2), (0.1, 0.3), (0.1.1, 0.1.2).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from schemas import validate
from stages.tree.config import MiningConfig
from stages.tree.mining import mine
from stages.tree.nodes import Tree, trees_from_table, trees_to_table

GOLDEN = Path(__file__).parent / "golden"


def golden_trees() -> pa.Table:
    g = json.loads((GOLDEN / "tree_search_tree.json").read_text())
    row = {"tree_id": g["tree_id"], "prompt_id": g["prompt_id"], "prompt": g["prompt"], "method": g["method"],
           "nodes": [{"prior": 1.0, "q_value": n["value_sum"] / n["visits"], **n} for n in g["nodes"]],
           "generator_model": "hand-built", "extra": json.dumps(g["extra"]), "row_key": "golden-row",
           "status": "ok", "error": None}
    return validate(trees_to_table([row]), "trees")


def expected() -> dict:
    return json.loads((GOLDEN / "tree_search_expected.json").read_text())


def as_tuples(pairs: pa.Table) -> list[tuple]:
    return sorted((r["pair_type"], r["shared_prefix"], r["chosen"], r["rejected"], r["chosen_score"],
                   r["rejected_score"]) for r in pairs.to_pylist())


def _sorted(rows) -> list[tuple]:
    return sorted(tuple(r) for r in rows)


def test_default_mining_gives_exactly_the_hand_worked_pairs_and_list():
    pairs, lists = mine(golden_trees(), MiningConfig())
    validate(pairs, "pairs")
    validate(lists, "lists")
    assert as_tuples(pairs) == _sorted(expected()["default"]["pairs"])
    for r in pairs.to_pylist():
        assert r["score_margin"] == pytest.approx(r["chosen_score"] - r["rejected_score"])
        assert r["chosen"].startswith(r["shared_prefix"]) and r["rejected"].startswith(r["shared_prefix"])
    assert lists.num_rows == 1
    lst = lists.to_pylist()[0]
    exp = expected()["default"]["list"]
    assert lst["responses"] == exp["responses"] and lst["steps"] == exp["steps"]
    assert lst["scores"] == pytest.approx(exp["scores"])


def test_tie_policy_keep_adds_the_tied_pair():
    pairs, _ = mine(golden_trees(), MiningConfig(tie_policy="keep"))
    assert as_tuples(pairs) == _sorted(expected()["default"]["pairs"] + [expected()["tie_keep_extra_pair"]])


def test_margin_policy_drops_small_gaps():
    pairs, _ = mine(golden_trees(), MiningConfig(step_min_margin=0.8, terminal_pairs=False))
    # only the 1.0-vs-0.0 pair under 0.1 has a gap >= 0.8; the root pairs have 0.75
    assert [r[2:4] for r in as_tuples(pairs)] == [("Step 1: 10 + 2 = 12\nStep 2: 12 * 3 = 36",
                                                   "Step 1: 10 + 2 = 12\nStep 2: 12 * 3 = 37")]


@pytest.mark.parametrize("mode", ["prism_sibling", "value_gap"])
def test_valued_sibling_modes(mode):
    pairs, _ = mine(golden_trees(), MiningConfig(step_pairs=mode, terminal_pairs=False))
    assert as_tuples(pairs) == _sorted(expected()[mode])


def test_require_verified_off_lets_a_lucky_wrong_step_be_chosen():
    pairs, _ = mine(golden_trees(), MiningConfig(step_pairs="value_gap", terminal_pairs=False,
                                                 require_verified=False))
    got = {(r[2], r[3]) for r in as_tuples(pairs)}
    assert ("Step 1: 10 + 2 = 12\nStep 2: 12 * 3 = 35", "Step 1: 10 + 2 = 12\nStep 2: 12 * 3 = 37") in got
    assert len(got) == 4


def test_tree_round_trips_through_the_table():
    table = golden_trees()
    (tree, row), = trees_from_table(table)
    assert isinstance(tree, Tree) and len(tree.nodes) == 10 and row["row_key"] == "golden-row"
    assert tree.children(tree.root)[0].step_text == "Step 1: 10 + 2 = 12"
    assert tree.response(tree.nodes["0.1.2.1"]) == "Step 1: 10 + 2 = 12\nStep 2: 12 * 3 = 37\nAnswer: 37"
    again = trees_to_table([tree.to_row(row_key="golden-row", generator_model="hand-built")])
    assert again.column("nodes").to_pylist() == table.column("nodes").to_pylist()


def test_a_tree_stored_twice_gives_each_pair_once():
    a, _ = mine(golden_trees(), MiningConfig())
    b, _ = mine(pa.concat_tables([golden_trees()] * 2), MiningConfig())
    assert a.num_rows == 5
    assert a.column("pair_id").to_pylist() == b.column("pair_id").to_pylist()
    assert len(set(a.column("pair_id").to_pylist())) == a.num_rows


def test_a_right_answer_after_a_wrong_step_is_never_a_terminal_side():
    """"Answer: 36" under the wrong step 0.2.1 has the gold answer but a wrong step: not right (steps), and not
    wrong either (its answer is right), so it joins no terminal pair; it still ranks low in the list."""
    g = json.loads((GOLDEN / "tree_search_tree.json").read_text())
    g["nodes"].append({"node_id": "0.2.1.1", "parent_id": "0.2.1", "depth": 3, "step_text": "Answer: 36",
                       "is_terminal": True, "visits": 1, "value_sum": -1.0, "reward": -1.0, "correct": False,
                       "rollout_success": None, "answer": "36"})
    row = {"tree_id": g["tree_id"], "prompt_id": g["prompt_id"], "prompt": g["prompt"], "method": g["method"],
           "nodes": [{"prior": 1.0, "q_value": n["value_sum"] / n["visits"], **n} for n in g["nodes"]],
           "generator_model": "hand-built", "extra": json.dumps(g["extra"]), "row_key": "golden-row",
           "status": "ok", "error": None}
    pairs, lists = mine(trees_to_table([row]), MiningConfig())
    assert as_tuples(pairs) == _sorted(expected()["default"]["pairs"])
    lst = lists.to_pylist()[0]
    # equal scores keep the tree's node order (0.3 was made before 0.2.1.1)
    assert lst["responses"][-2:] == ["Answer: 12", "Step 1: 10 + 2 = 13\nStep 2: 13 * 3 = 39\nAnswer: 36"]
    assert lst["scores"][-2:] == [0.0, 0.0]
