"""`reasoning-gym:<name>`: seeded, sized splits; each dataset's own scorer accepts the gold and rejects a
perturbed answer; the score is kept."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import InputError
from pipeline.tasks.registry import get_task, item_for_row


def _flip_roles(a: str, meta: dict) -> str:
    """Everyone's role swapped, in the puzzle's own words for knight and knave (hero/villain, saint/sinner...)."""
    terms = meta["entry"]["metadata"]["knight_knave_terms"]
    return a.replace(terms["knight"], "@").replace(terms["knave"], terms["knight"]).replace("@", terms["knave"])


# one dataset per kind: arithmetic, logic, strings, counting, algebra; with a perturbation of the gold
PERTURB = {
    "chain_sum": lambda a, m: str(int(a) + 1),
    "knights_knaves": _flip_roles,
    "spell_backward": lambda a, m: a[::-1] if a != a[::-1] else a + "x",
    "letter_counting": lambda a, m: str(int(a) + 1),
    "simple_equations": lambda a, m: str(int(a) - 1),
}


@pytest.mark.parametrize("name", sorted(PERTURB))
def test_gold_accepted_perturbed_rejected(name):
    rows = get_task(f"reasoning-gym:{name}").make(4, "train", seed=3).to_pylist()
    assert len(rows) == 4 and len({r["prompt_id"] for r in rows}) == 4
    for row in rows:
        item = item_for_row(row)  # rebuilt from the row's meta alone
        gold = row["gold_answer"]
        ok = item.check(f"Thinking it through.\n<answer>{gold}</answer>")
        assert (ok.correct, ok.score) == (True, 1.0)
        bad = item.check(f"<answer>{PERTURB[name](gold, json.loads(row['meta']))}</answer>")
        assert not bad.correct and bad.score < 1.0


def test_seeded_and_split_draws():
    t = get_task("reasoning-gym:chain_sum")
    a, b = t.make(5, "train", seed=1), t.make(5, "train", seed=1)
    assert a.column("prompt").to_pylist() == b.column("prompt").to_pylist()
    assert a.column("prompt").to_pylist() != t.make(5, "eval", seed=1).column("prompt").to_pylist()


def test_generator_options_reach_the_generator_and_the_row():
    t = get_task("reasoning-gym:chain_sum", min_terms=5, max_terms=5, min_digits=1, max_digits=1)
    row = t.make(3, "train", seed=0).to_pylist()[0]
    assert row["prompt"].count("+") + row["prompt"].count("-") == 4  # five one-digit terms
    assert item_for_row(row).task is t                                 # options stored in meta rebuild it


def test_answer_without_tags_and_unknown_dataset():
    row = get_task("reasoning-gym:chain_sum").make(1, "train", seed=0).to_pylist()[0]
    assert item_for_row(row).correct(f"Let me add.\nThe answer is {row['gold_answer']}.")
    assert item_for_row(row).correct(f'The answer is: "{row["gold_answer"]}".')
    with pytest.raises(InputError, match="unknown reasoning-gym dataset 'no_such'"):
        get_task("reasoning-gym:no_such")


def _sum_row(**opts):
    """A two-term one-digit chain_sum problem (the SmolLM2 experiment's setting) and its gold as an int."""
    t = get_task("reasoning-gym:chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1, **opts)
    row = t.make(1, "eval", seed=1).to_pylist()[0]
    return t, row, int(row["gold_answer"])


def test_small_model_answer_sentences_are_read():
    # SmolLM2-135M's own phrasings (experiments/smollm2-gym probe); the sentence names the problem before "is"
    _, row, g = _sum_row()
    item = item_for_row(row)
    for said in (f"The final answer to this arithmetic problem is {g}.",
                 f"The answer to the given arithmetic problem is {g}.",
                 f"So 9 + 8 = 17.\nTherefore, the answer for it is {g}"):
        assert item.check(said).correct, said
    assert not item.check(f"The final answer to this arithmetic problem is {g + 1}.").correct
    # an "is" far into a long line is not an answer sentence: the check falls back to the whole last line
    assert not item.check("The answer to " + "x" * 90 + f" is {g}").correct
    assert item.check("The answer to " + "x" * 70 + f" is {g}").correct


def test_system_prompt_option_sets_the_eval_turns_and_travels_with_the_row():
    from reasoning_gym.utils import SYSTEM_PROMPTS

    t_default, row_d, _ = _sum_row()
    assert t_default.messages(row_d)[0] == {"role": "system", "content": SYSTEM_PROMPTS["default"]}
    assert "system_prompt" not in json.loads(row_d["meta"]).get("options", {})  # default rows stay as before
    t_none, row, _ = _sum_row(system_prompt=None)
    assert t_none.messages(row) == [{"role": "user", "content": row["prompt"]}]  # the bare question, as stages ask
    assert row["prompt"] == row_d["prompt"]                                       # same draw either way
    rebuilt = item_for_row(row).task
    assert rebuilt is t_none and rebuilt.system_prompt is None
    t_own, row_o, _ = _sum_row(system_prompt="Reply with the number only.")
    assert t_own.messages(row_o)[0] == {"role": "system", "content": "Reply with the number only."}
    with pytest.raises(InputError, match="system_prompt must be text"):
        get_task("reasoning-gym:chain_sum", system_prompt=3)
