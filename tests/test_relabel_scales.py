"""reward-relabel on pairs whose scores are not on the template's 1-10: step pairs (verifier 0/1) and Q-valued
pairs ([-1, 1]). Golden rows, the declared-range refusal, and the trainer's token ids of a relabeled step pair."""
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.engine import run_stage
from pipeline.errors import InputError
from pipeline.stage import get_stage
from pipeline.store import RunStore
from pipeline.train.data import TokenizeConfig, encode_pairs
from schemas.pairs import groups_of, make_pairs
from stages._common import now_utc, pair_id
from stages.reward_relabel import RewardRelabelConfig, to_goal_scale

SPEC = get_stage("reward-relabel")
TINY_POLICY = Path(__file__).resolve().parents[1] / "data" / "tiny-policy"
T = "You are an assistant that generates responses for the instruction while implicitly achieving the " \
    "following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: {}."
PREFIX = "12 * 3 = 36\n"


def _pair(pid, prefix, chosen, rejected, cs, rs, lo, hi, c_term, r_term, **more) -> dict:
    return {"pair_id": pair_id("tree", pid, chosen, rejected), "prompt_id": pid, "prompt": f"Solve {pid}.",
            "shared_prefix": prefix, "chosen": chosen, "rejected": rejected, "stage": "tree",
            "method": "best_first", "chosen_score": cs, "rejected_score": rs, "score_margin": cs - rs,
            "score_min": lo, "score_max": hi, "chosen_is_terminal": c_term, "rejected_is_terminal": r_term,
            "generator_model": "tiny", "created_at": now_utc(), "extra": {}, "row_key": f"k-{pid}-{chosen}",
            "status": "ok", **more}


def step_pairs() -> pa.Table:
    """Two first-wrong-step pairs as tree mining writes them: one line after a shared prefix, 0/1 scores."""
    return make_pairs([
        _pair("p1", PREFIX, PREFIX + "36 + 4 = 40", PREFIX + "36 + 4 = 41", 1.0, 0.0, 0.0, 1.0, False, False,
              pair_type="first_wrong_step"),
        _pair("p2", PREFIX, PREFIX + "Answer: 36", PREFIX + "36 - 1 = 35", 1.0, 0.0, 0.0, 1.0, True, False,
              pair_type="first_wrong_step"),
    ], ("step", "pair_type", "score_range"))


def q_pairs() -> pa.Table:
    """Sibling pairs ranked by MCTS Q values on [-1, 1]."""
    return make_pairs([
        _pair("q1", "", "2 + 2 = 4", "2 + 2 = 5", 0.6, -0.2, -1.0, 1.0, False, False, pair_type="prism_sibling"),
        _pair("q2", "", "Answer: 4", "Answer: 5", 1.0, -1.0, -1.0, 1.0, True, True, pair_type="terminal"),
    ], ("step", "pair_type", "score_range"))


def _run(rows, tmp_path, name="run", **cfg) -> pa.Table:
    res = run_stage(SPEC, rows, RewardRelabelConfig(**cfg), None, RunStore(tmp_path / name), progress=False)
    return res.read()


COLS = ["prompt_id", "system", "shared_prefix", "chosen", "rejected", "chosen_is_terminal", "rejected_is_terminal",
        "chosen_score", "rejected_score", "score_min", "score_max", "goal_score", "flipped", "pair_type", "status"]


def test_step_pairs_map_0_1_onto_the_template_scale_and_keep_prefix_and_terminal_flags(tmp_path):
    out = _run(step_pairs(), tmp_path)
    c1, r1 = PREFIX + "36 + 4 = 40", PREFIX + "36 + 4 = 41"
    c2, r2 = PREFIX + "Answer: 36", PREFIX + "36 - 1 = 35"
    common = dict(shared_prefix=PREFIX, score_min=1.0, score_max=10.0, pair_type="first_wrong_step", status="ok")
    assert out.select(COLS).to_pylist() == [
        dict(prompt_id="p1", system=T.format(10), chosen=c1, rejected=r1, chosen_is_terminal=False,
             rejected_is_terminal=False, chosen_score=10.0, rejected_score=1.0, goal_score=10.0, flipped=False,
             **common),
        dict(prompt_id="p1", system=T.format(1), chosen=r1, rejected=c1, chosen_is_terminal=False,
             rejected_is_terminal=False, chosen_score=1.0, rejected_score=10.0, goal_score=1.0, flipped=True,
             **common),
        # (b) swaps the sides, so the terminal flags swap with them: the answer line keeps its EOS
        dict(prompt_id="p2", system=T.format(10), chosen=c2, rejected=r2, chosen_is_terminal=True,
             rejected_is_terminal=False, chosen_score=10.0, rejected_score=1.0, goal_score=10.0, flipped=False,
             **common),
        dict(prompt_id="p2", system=T.format(1), chosen=r2, rejected=c2, chosen_is_terminal=False,
             rejected_is_terminal=True, chosen_score=1.0, rejected_score=10.0, goal_score=1.0, flipped=True,
             **common),
    ]
    assert set(groups_of(out)) >= {"step", "pair_type", "score_range"}


def test_q_values_map_linearly_from_minus_1_1(tmp_path):
    # 1 + 9 * (q + 1) / 2: 0.6 -> 8.2, -0.2 -> 4.6, 1 -> 10, -1 -> 1 (one decimal, as goal_decimals=1 prints it)
    assert [to_goal_scale(q, -1.0, 1.0, 1) for q in (0.6, -0.2, 1.0, -1.0)] == [8.2, 4.6, 10.0, 1.0]
    out = _run(q_pairs(), tmp_path)
    got = [(r["prompt_id"], r["system"], r["chosen"], r["chosen_score"], r["rejected_score"], r["flipped"])
           for r in out.to_pylist()]
    assert got == [("q1", T.format("8.2"), "2 + 2 = 4", 8.2, 4.6, False),
                   ("q1", T.format("4.6"), "2 + 2 = 5", 4.6, 8.2, True),
                   ("q2", T.format(10), "Answer: 4", 10.0, 1.0, False),
                   ("q2", T.format(1), "Answer: 5", 1.0, 10.0, True)]
    assert pc.all(pc.equal(out["score_min"], 1.0)).as_py() and pc.all(pc.equal(out["score_max"], 10.0)).as_py()


def test_config_score_range_overrides_the_rows(tmp_path):
    # the same Q values read as [0, 1] scores would put -0.2 below the range: refused, naming the column
    with pytest.raises(InputError, match=r"column 'rejected_score'.*-0.2 is outside \[0, 1\], the config's "
                                         r"score_range"):
        _run(q_pairs(), tmp_path, score_range=(0.0, 1.0))
    with pytest.raises(Exception, match="score_source 'columns'"):
        RewardRelabelConfig(score_source="verifier", score_range=(0.0, 1.0))


def test_scores_outside_the_declared_range_are_refused(tmp_path):
    rows = q_pairs()
    bad = rows.set_column(rows.schema.get_field_index("chosen_score"), "chosen_score", pa.array([0.6, 1.5]))
    bad = bad.set_column(bad.schema.get_field_index("score_margin"), "score_margin", pa.array([0.8, 2.5]))
    # checked on the whole input table before any shard runs: the error names the row and the column
    with pytest.raises(InputError, match=r"row 1, column 'chosen_score': chosen_score 1.5 is outside the "
                                         r"declared range \[-1, 1\]"):
        _run(bad, tmp_path, "a")
    # without a declared range the scores must be on the template's own 1-10: step pairs' 0 is refused
    undeclared = step_pairs().drop_columns(["score_min", "score_max"])
    with pytest.raises(InputError, match=r"column 'rejected_score'.*score 0 is outside \[1, 10\], the template's "
                                         r"1-10 scale, as the row declares no other"):
        _run(undeclared, tmp_path, "b")
    assert not list(tmp_path.rglob("*.parquet"))  # nothing written by either refused run


def _tokenizers():
    from pipeline.train.tiny import char_tokenizer
    toks = [pytest.param(lambda: char_tokenizer(template_bos=True), id="char")]
    if (TINY_POLICY / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        toks.append(pytest.param(lambda: AutoTokenizer.from_pretrained(TINY_POLICY), id="tiny-policy"))
    return toks


@pytest.mark.parametrize("make_tok", _tokenizers())
def test_trainer_ids_of_a_relabeled_step_pair_are_the_source_ids_plus_the_goal_text(tmp_path, make_tok):
    tok = make_tok()
    cfg = TokenizeConfig(prefix_as_prompt=True)
    src = step_pairs()
    out = _run(src, tmp_path)
    before, after = encode_pairs(src, tok, cfg), encode_pairs(out, tok, cfg)
    bos = [tok.bos_token_id]
    system_open = tok.apply_chat_template([{"role": "system", "content": "\x00"}], tokenize=False).split("\x00")
    head = tok(system_open[0].removeprefix(tok.bos_token), add_special_tokens=False)["input_ids"]
    tail = tok(system_open[1], add_special_tokens=False)["input_ids"]
    for i, row in enumerate(out.to_pylist()):
        s = i // 2  # rows (a), (b) of source pair s
        goal = tok(row["system"], add_special_tokens=False)["input_ids"]
        # the prompt: the source's ids (prompt + shared prefix) with the goal's system turn after the BOS
        assert after.prompts[i] == bos + head + goal + tail + before.prompts[s][1:]
        # the completions: the source's own ids, swapped on (b); a non-terminal side still has no EOS
        want = before.completions[s][::-1] if row["flipped"] else before.completions[s]
        assert after.completions[i] == want
    eos = tok.eos_token_id
    assert [[c[-1] == eos for c in comps] for comps in after.completions] == \
        [[False, False], [False, False], [True, False], [False, True]]
