"""Greedy-first tree search (`greedy_first`, `branch_on_error`, `step_rejected: greedy`) with the scripted
arithmetic policy: which child is the greedy step, where the search branches, and which pairs are kept."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline.backends.base import SamplingParams
from pipeline.stage import StageContext
from schemas import validate
from stages.tree.mining import mine
from stages.tree.nodes import trees_from_table
from stages.tree_search import TreeSearchConfig, run
from tests.test_tree_search_fake import FakeArithBackend, task_rows

BASE = dict(variant="best_first", value_fn="step_verifier", best_first_k=4, expansion_budget=6,
            validity_rollouts=0, greedy_first=True)


def _run(n: int, p_right: float = 0.6, **over):
    problems, table = task_rows(n)
    fb = FakeArithBackend(problems, p_right)
    cfg = TreeSearchConfig(**{**BASE, **over})
    return run(table, cfg, fb, StageContext("fp", 0, 3)), fb, cfg


def _trees(out):
    return [tree for tree, _ in trees_from_table(out["trees"])]


def test_the_first_child_of_every_expansion_is_the_greedy_step():
    out, fb, cfg = _run(12)
    validate(out["trees"], "trees")
    expanded = 0
    for tree in _trees(out):
        for node in tree.nodes.values():
            kids = tree.children(node)
            if not kids:
                continue
            expanded += 1
            assert [k.greedy for k in kids] == [True] + [False] * (len(kids) - 1)
            alone = FakeArithBackend(list(fb.by_prompt.values()), fb.p_right).continue_(
                [tree.prompt], [tree.prefix_text(node)],
                SamplingParams(temperature=0.0, stop=["\n"], max_tokens=cfg.step_max_tokens, seed=99), n=1)
            assert kids[0].step_text == alone[0][0].text.strip()  # what a lone greedy decode gives
    assert expanded > 12
    # each round: one greedy call (n=1) and one sampled call (n=k-1) for every tree at once
    continues = [c for c in fb.calls if c["kind"] == "continue"]
    assert [c["n"] for c in continues[:2]] == [1, 3] and continues[0]["prompts"] == continues[1]["prompts"] == 12


def test_branch_on_error_samples_only_where_the_greedy_step_is_wrong():
    out, fb, _ = _run(12, branch_on_error=True)
    wrong_greedy = branched = 0
    for tree in _trees(out):
        for node in tree.nodes.values():
            kids = tree.children(node)
            if not kids:
                continue
            assert kids[0].greedy is True
            if kids[0].correct is False:
                wrong_greedy += 1
                branched += len(kids) > 1
            else:
                assert len(kids) == 1  # a right greedy step: no siblings sampled
    assert wrong_greedy > 0 and branched > 0
    # the sampled calls carry exactly the nodes whose greedy step was wrong
    sampled = [c for c in fb.calls if c["kind"] == "continue" and c["n"] == 3]
    assert sum(c["prompts"] for c in sampled) == wrong_greedy
    pairs = [p for p in out["main"].to_pylist() if p["pair_type"] == "first_wrong_step"]
    assert pairs and all(json.loads(p["extra"])["rejected_greedy"] for p in pairs)


def test_step_rejected_greedy_keeps_exactly_the_pairs_whose_rejected_is_the_greedy_child():
    out, _, cfg = _run(16)  # greedy_first without branch_on_error: greedy and sampled wrong steps both occur
    anyp, _ = mine(out["trees"], cfg)
    greedy, _ = mine(out["trees"], cfg.model_copy(update={"step_rejected": "greedy"}))

    def step_pairs(table):
        return {(r["pair_id"], r["chosen"], r["rejected"]): json.loads(r["extra"])
                for r in table.to_pylist() if r["pair_type"] == "first_wrong_step"}

    a, g = step_pairs(anyp), step_pairs(greedy)
    expect = {k for k, e in a.items() if e["rejected_greedy"]}
    assert set(g) == expect and 0 < len(g) < len(a)
    assert all(e["chosen_greedy"] is False for e in g.values())  # the greedy child is the wrong one
    # terminal pairs are the same, except those a dropped step pair with the same sides had deduplicated
    term = lambda t: {r["pair_id"] for r in t.to_pylist() if r["pair_type"] == "terminal"}  # noqa: E731
    dropped = {k[0] for k in set(a) - set(g)}
    assert term(anyp) <= term(greedy) and term(greedy) - term(anyp) <= dropped


def test_trees_without_greedy_flags_mine_as_before():
    out, _, cfg = _run(6, greedy_first=False)
    for tree in _trees(out):
        assert all(n.greedy is None for n in tree.nodes.values())
    assert all("rejected_greedy" not in json.loads(p["extra"]) for p in out["main"].to_pylist())


def test_greedy_options_need_greedy_first():
    ok = TreeSearchConfig(greedy_first=True, branch_on_error=True, step_rejected="greedy")
    assert (ok.greedy_first, ok.branch_on_error, ok.step_rejected) == (True, True, "greedy")
    with pytest.raises(ValidationError, match="step_rejected: greedy needs greedy_first"):
        TreeSearchConfig(step_rejected="greedy")
    with pytest.raises(ValidationError, match="branch_on_error needs greedy_first"):
        TreeSearchConfig(branch_on_error=True)
