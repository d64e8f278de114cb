"""Trainer data: tokenization once per piece, no doubled BOS/EOS, prefix-as-prompt, truncation, collation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.errors import InputError  # noqa: E402
from pipeline.train.collate import collate  # noqa: E402
from pipeline.train.data import TokenizeConfig, encode_lists, encode_pairs, read_table  # noqa: E402
from pipeline.train.tiny import char_tokenizer  # noqa: E402

TINY_POLICY = Path(__file__).resolve().parents[1] / "data" / "tiny-policy"


def _tokenizers():
    toks = [pytest.param(lambda: char_tokenizer(template_bos=True), id="char-template-bos"),
            pytest.param(lambda: char_tokenizer(template_bos=False), id="char-no-bos")]
    marks = [] if (TINY_POLICY / "tokenizer_config.json").exists() else \
        [pytest.mark.skip(reason="data/tiny-policy not built yet")]

    def tiny():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(TINY_POLICY)
    toks.append(pytest.param(tiny, id="tiny-policy", marks=marks))
    return toks


def _pairs(**cols):
    base = {"prompt": ["2+3?", "2+3?", "7*6?"], "chosen": ["5", "Answer: 5", "42"],
            "rejected": ["6", "Answer: 6</s>", "41"]}
    base.update(cols)
    return pa.table(base)


@pytest.mark.parametrize("make_tok", _tokenizers())
def test_no_doubled_bos_or_eos(make_tok):
    tok = make_tok()
    enc = encode_pairs(_pairs(), tok, TokenizeConfig())
    bos, eos = tok.bos_token_id, tok.eos_token_id
    adds_bos = bos is not None and tok("a")["input_ids"][0] == bos
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                       tokenize=False) if tok.chat_template else ""
    template_writes_bos = tok.bos_token is not None and rendered.startswith(tok.bos_token)
    for p, comps in zip(enc.prompts, enc.completions):
        n_bos = sum(1 for i in p[:2] if i == bos) if bos is not None else 0
        assert n_bos == (1 if adds_bos or template_writes_bos else 0)
        for c in comps:
            assert c[-1] == eos and (len(c) < 2 or c[-2] != eos)
            assert bos is None or bos not in c
    # "Answer: 6</s>" already ends with EOS: exactly one EOS, the text's own
    assert enc.completions[1][1].count(eos) == 1


def test_exact_ids_template_bos():
    tok = char_tokenizer(template_bos=True)
    enc = encode_pairs(_pairs(), tok, TokenizeConfig())
    v = tok.get_vocab()
    assert enc.prompts[0] == [v["<s>"], v["<|user|>"], v["2"], v["+"], v["3"], v["?"], v["\n"], v["<|assistant|>"]]
    assert enc.completions[0] == [[v["5"], v["</s>"]], [v["6"], v["</s>"]]]
    assert enc.rows.tolist() == [0, 1, 2]


def test_plain_tokenizer_without_template():
    tok = char_tokenizer(template_bos=True)
    tok.chat_template = None
    enc = encode_pairs(_pairs(), tok, TokenizeConfig())
    v = tok.get_vocab()
    assert enc.prompts[2] == [v["<s>"], v["7"], v["*"], v["6"], v["?"]]


def test_each_piece_tokenized_once():
    tok = char_tokenizer()
    seen: list[str] = []
    orig = type(tok).__call__

    class Counting(type(tok)):
        def __call__(self, text, *a, **kw):
            seen.extend([text] if isinstance(text, str) else text)
            return orig(self, text, *a, **kw)
    tok.__class__ = Counting
    table = pa.table({"prompt": ["q"] * 5, "chosen": ["a", "b", "a", "b", "a"], "rejected": ["c"] * 5})
    encode_pairs(table, tok, TokenizeConfig())
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True,
                                       tokenize=False)
    assert seen.count(rendered) == 1
    # "a" appears once as the BOS probe and once as a completion; "b" and "c" once each
    assert seen.count("b") == 1 and seen.count("c") == 1 and seen.count("a") == 2


def test_prefix_as_prompt_scores_only_the_suffix():
    tok = char_tokenizer()
    v = tok.get_vocab()
    table = pa.table({"prompt": ["p"], "shared_prefix": ["Step 1: 5\n"],
                      "chosen": ["Step 1: 5\nStep 2: 9"], "rejected": ["Step 1: 5\nStep 2: 8"]})
    full = encode_pairs(table, tok, TokenizeConfig())
    enc = encode_pairs(table, tok, TokenizeConfig(prefix_as_prompt=True))
    prefix_ids = [v[c] for c in "Step 1: 5\n"]
    assert enc.prompts[0] == full.prompts[0] + prefix_ids
    assert enc.completions[0][0] == [v[c] for c in "Step 2: 9"] + [v["</s>"]]
    assert enc.completions[0][1] == [v[c] for c in "Step 2: 8"] + [v["</s>"]]
    assert len(full.completions[0][0]) == len(prefix_ids) + len(enc.completions[0][0])


def test_prefix_not_a_prefix_names_row_and_column():
    table = pa.table({"prompt": ["p", "p"], "shared_prefix": ["ab", "ab"], "chosen": ["abc", "abd"],
                      "rejected": ["abx", "xby"]})
    with pytest.raises(InputError, match=r"row 1, column 'rejected'"):
        encode_pairs(table, char_tokenizer(), TokenizeConfig(prefix_as_prompt=True), file="t.parquet")


def test_truncation_policy_and_counts():
    tok = char_tokenizer()
    # prompt "abcdefghij" -> 1 BOS + 1 <|user|> + 10 chars + "\n" + <|assistant|> = 14 tokens
    table = pa.table({"prompt": ["abcdefghij", "x", "abcdefghij" * 3],
                      "chosen": ["0123456789", "0", "0"], "rejected": ["01", "1", "1"]})
    enc = encode_pairs(table, tok, TokenizeConfig(max_length=20, max_prompt_length=14))
    s = enc.stats
    assert (s.rows_in, s.rows_dropped, s.prompts_truncated, s.completions_truncated) == (3, 0, 1, 1)
    assert len(enc.completions[0][0]) == 6 and enc.completions[0][0][-1] != tok.eos_token_id
    assert enc.completions[0][1][-1] == tok.eos_token_id  # the short side keeps its EOS
    assert len(enc.prompts[2]) == 14 and enc.prompts[2][0] == tok.bos_token_id
    assert enc.prompts[2][-1] == tok.get_vocab()["<|assistant|>"]
    enc = encode_pairs(table, tok, TokenizeConfig(max_length=14))
    assert enc.rows.tolist() == [1] and enc.stats.rows_dropped == 2


def test_collate_chosen_then_rejected():
    tok = char_tokenizer()
    enc = encode_pairs(_pairs(), tok, TokenizeConfig())
    b = collate(enc, [0, 2], pad_id=0)
    P = len(enc.prompts[0])
    assert b.input_ids.shape == (4, P + 3)
    expected_rows = [enc.prompts[0] + enc.completions[0][0], enc.prompts[2] + enc.completions[2][0],
                     enc.prompts[0] + enc.completions[0][1], enc.prompts[2] + enc.completions[2][1]]
    for r, ids in enumerate(expected_rows):
        assert b.input_ids[r, :len(ids)].tolist() == ids
        assert b.input_ids[r, len(ids):].tolist() == [0] * (P + 3 - len(ids))
        assert b.attention_mask[r].sum().item() == len(ids)
        mine = b.seq == r  # the scoring plan: hidden state t-1 predicts completion token t
        T = b.input_ids.shape[1]
        assert b.src[mine].tolist() == [r * T + t - 1 for t in range(P, len(ids))]
        assert b.tgt[mine].tolist() == ids[P:]
    assert b.segments is None and b.attention_mask_4d() is None
    assert b.group.tolist() == [0, 1, 0, 1] and b.slot.tolist() == [0, 0, 1, 1]
    assert b.scatter(torch.tensor([1., 2., 3., 4.])).tolist() == [[1., 3.], [2., 4.]]


def test_collate_shared_prompt_layout():
    tok = char_tokenizer()
    enc = encode_pairs(_pairs(), tok, TokenizeConfig())
    b = collate(enc, [0, 2], pad_id=0, share_prompt=True)
    P, (c0, r0) = len(enc.prompts[0]), enc.completions[0]
    row0 = enc.prompts[0] + c0 + r0
    T = b.input_ids.shape[1]
    assert b.input_ids.shape[0] == 2 and b.input_ids[0, :len(row0)].tolist() == row0
    assert b.position_ids[0, :len(row0)].tolist() == list(range(P + len(c0))) + list(range(P, P + len(r0)))
    assert b.segments[0, :len(row0)].tolist() == [0] * P + [1] * len(c0) + [2] * len(r0)
    # sequence numbering is the separate layout's: [chosen of both groups ; rejected of both groups]
    assert b.group.tolist() == [0, 1, 0, 1] and b.slot.tolist() == [0, 0, 1, 1]
    rej = b.seq == 2  # rejected of group 0: its first token is predicted by the last prompt token
    assert b.src[rej].tolist() == [P - 1] + list(range(P + len(c0), P + len(c0) + len(r0) - 1))
    assert b.tgt[rej].tolist() == r0
    m = b.attention_mask_4d()[0, 0]
    first_rej = P + len(c0)
    assert m[first_rej, :P].all() and not m[first_rej, P:first_rej].any() and m[first_rej, first_rej]
    assert m[P, :P + 1].all() and not m[P, P + 1:].any()
    add = b.attention_mask_4d(torch.float32)[0, 0]
    assert add[first_rej, P].item() == torch.finfo(torch.float32).min and add[first_rej, 0].item() == 0.0
    assert b.num_tokens() == sum(len(enc.prompts[i]) + sum(map(len, enc.completions[i])) for i in (0, 2))
    assert T == max(len(enc.prompts[i]) + sum(map(len, enc.completions[i])) for i in (0, 2))


def test_lists_variable_size():
    tok = char_tokenizer()
    table = pa.table({"prompt": ["a", "b"], "responses": [["1", "22", "333"], ["x", "y"]],
                      "scores": [[3.0, 2.0, 1.0], [1.0, 0.0]]})
    enc = encode_lists(table, tok, TokenizeConfig())
    assert [len(c) for c in enc.completions] == [3, 2] and enc.scores == [[3.0, 2.0, 1.0], [1.0, 0.0]]
    b = collate(enc, [0, 1], pad_id=0)
    assert b.input_ids.shape[0] == 5
    assert b.slot_mask.tolist() == [[True, True, True], [True, True, False]]
    assert b.scatter(torch.arange(5.0), fill=-1).tolist() == [[0., 2., 4.], [1., 3., -1.]]


@pytest.mark.parametrize("table,match", [
    (pa.table({"prompt": ["a"], "chosen": ["b"]}), r"column 'rejected': missing column"),
    (pa.table({"prompt": ["a", None], "chosen": ["b", "c"], "rejected": ["d", "e"]}), r"row 1, column 'prompt'"),
    (pa.table({"prompt": ["a"], "chosen": [1], "rejected": ["d"]}), r"column 'chosen': expected string"),
    (pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
               "rejected": pa.array([], pa.string())}), "empty pair table"),
])
def test_pair_input_errors(table, match):
    with pytest.raises(InputError, match=match):
        encode_pairs(table, char_tokenizer(), TokenizeConfig(), file="pairs.parquet")


def test_list_input_errors():
    bad = pa.table({"prompt": ["a", "b"], "responses": [["1", "2"], ["1", "2"]], "scores": [[1.0, 0.0], [1.0]]})
    with pytest.raises(InputError, match=r"row 1, column 'scores'"):
        encode_lists(bad, char_tokenizer(), TokenizeConfig())
    short = pa.table({"prompt": ["a"], "responses": [["1"]], "scores": [[1.0]]})
    with pytest.raises(InputError, match=r"row 0, column 'responses'"):
        encode_lists(short, char_tokenizer(), TokenizeConfig())


def test_read_table_folder_keeps_ok_rows(tmp_path):
    t = pa.table({"prompt": ["a", "b", "c"], "chosen": ["x"] * 3, "rejected": ["y"] * 3,
                  "status": ["ok", "failed", "ok"]})
    pq.write_table(t.slice(0, 2), tmp_path / "part-00000.parquet")
    pq.write_table(t.slice(2), tmp_path / "part-00001.parquet")
    pq.write_table(t.slice(2), tmp_path / "part-00002.parquet")  # an orphan shard no manifest lists
    shards = {str(i): {"files": {"main": f"part-{i:05d}.parquet"}, "rows": {"main": 1}, "input_digest": "-"}
              for i in range(2)}  # a manifest of the run store's shape (pipeline/store.py check_manifest)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": 1, "fingerprint": "-", "outputs": {"main": "raw"}, "shard_size": 2, "n_input_rows": 4,
        "shards": shards, "complete": True}))
    got = read_table(tmp_path)
    assert got["prompt"].to_pylist() == ["a", "c"]
    with pytest.raises(InputError, match="no such file"):
        read_table(tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read"):
        read_table(tmp_path / "bad.parquet")


def test_trl_conversational_format_gives_the_same_ids():
    tok = char_tokenizer()
    std = _pairs()
    conv = pa.table({
        "prompt": [[{"role": "user", "content": p}] for p in std["prompt"].to_pylist()],
        "chosen": [[{"role": "assistant", "content": c}] for c in std["chosen"].to_pylist()],
        "rejected": [[{"role": "assistant", "content": r}] for r in std["rejected"].to_pylist()]})
    a, b = encode_pairs(std, tok, TokenizeConfig()), encode_pairs(conv, tok, TokenizeConfig())
    assert a.prompts == b.prompts and a.completions == b.completions
    with_system = pa.table({"prompt": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]],
                            "chosen": ["a"], "rejected": ["b"]})
    v = tok.get_vocab()
    p = encode_pairs(with_system, tok, TokenizeConfig()).prompts[0]
    assert p[:2] == [v["<s>"], v["<|system|>"]] and p[-4:] == [v["<|user|>"], v["q"], v["\n"], v["<|assistant|>"]]


def test_non_terminal_completions_get_no_eos():
    """Tree step pairs continue after the scored line: EOS there would teach the model to stop after one step."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "data", "tiny-policy"))
    t = pa.table({"prompt": ["q", "q"], "chosen": ["P\nStep 2: a", "full\nAnswer: 3"],
                  "rejected": ["P\nStep 2: b", "full\nAnswer: 4"], "shared_prefix": ["P\n", ""],
                  "chosen_is_terminal": [False, True], "rejected_is_terminal": [False, True]})
    enc = encode_pairs(t, tok, TokenizeConfig(prefix_as_prompt=True))
    eos = tok.eos_token_id
    assert [c[-1] == eos for group in enc.completions for c in group] == [False, False, True, True]
    assert tok.decode(enc.completions[0][0]) == "Step 2: a"
    forced = encode_pairs(t, tok, TokenizeConfig(prefix_as_prompt=True, partial_eos=True))
    assert all(c[-1] == eos for group in forced.completions for c in group)
    sep = encode_pairs(t, tok, TokenizeConfig(prefix_as_prompt=True, step_separator="\n"))
    assert [tok.decode(c) for c in sep.completions[0]] == ["Step 2: a\n", "Step 2: b\n"]
    assert sep.completions[1] == enc.completions[1]  # terminal rows keep their EOS and get no separator


def test_step_separator_gives_prefix_lines_a_divergent_token():
    """A wrong line that is a prefix of the right one ("= 1" vs "= 13"): without the line break the policy wrote
    after it, the rejected side has no token that differs; with it, the cut keeps exactly that line break."""
    tok = char_tokenizer(template_bos=False)
    t = pa.table({"prompt": ["q"], "chosen": ["= 13"], "rejected": ["= 1"],
                  "chosen_is_terminal": [False], "rejected_is_terminal": [False]})
    bare = encode_pairs(t, tok, TokenizeConfig(rejected_to_divergence=True))
    c, r = bare.completions[0]
    assert c[:len(r)] == r  # no divergent token at all
    sep = encode_pairs(t, tok, TokenizeConfig(rejected_to_divergence=True, step_separator="\n"))
    c, r = sep.completions[0]
    v = tok.get_vocab()
    assert r == c[:3] + [v["\n"]] and c[3] == v["3"] and c[-1] == v["\n"]


def test_rejected_to_divergence_cuts_after_the_first_differing_token():
    """Token-level step pairs: the rejected keeps the common tokens and its first wrong one, nothing after."""
    from pipeline.train.data import cut_at_divergence
    assert cut_at_divergence([1, 2, 3, 4], [1, 2, 9, 8, 7]) == [1, 2, 9]
    assert cut_at_divergence([1, 2, 3], [5, 6]) == [5]
    assert cut_at_divergence([1, 2, 3], [1, 2]) == [1, 2]          # a prefix of the chosen: whole
    assert cut_at_divergence([1, 2], [1, 2]) == [1, 2]             # equal: whole
    assert cut_at_divergence([1, 2], [1, 2, 3, 4]) == [1, 2, 3]    # longer: up to its first extra token
    tok = char_tokenizer(template_bos=False)
    t = pa.table({"prompt": ["q", "q", "q"], "chosen": ["= 154", "= 14", "= 7"],
                  "rejected": ["= 144", "= 13", "= 7"]})
    whole = encode_pairs(t, tok, TokenizeConfig())
    cut = encode_pairs(t, tok, TokenizeConfig(rejected_to_divergence=True))
    eos = tok.eos_token_id
    full = [g[1] for g in whole.completions]  # "= 144</s>", "= 13</s>", "= 7</s>" as char tokens
    assert [g[1] for g in cut.completions] == [full[0][:4], full[1][:4], full[2]]
    assert cut.completions[1][1][-1] != eos and cut.completions[2][1][-1] == eos
    assert [g[0] for g in cut.completions] == [g[0] for g in whole.completions]  # chosen untouched
    assert cut.stats.rejected_cut == 2 and whole.stats.rejected_cut == 0
