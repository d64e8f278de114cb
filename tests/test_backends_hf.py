"""The transformers backend against plain transformers: greedy = model.generate, log-probs = an unpadded
forward, batching/padding/n-expansion/row compaction change nothing, sampling filters do what they say."""
from __future__ import annotations

import pytest
import torch

from pipeline.backends import SamplingParams
from pipeline.backends.base import cut_at_stop
from pipeline.backends.fixtures import build_tiny_llama
from pipeline.backends.hf import TransformersBackend, filter_logits, pick_tokens

torch.set_num_threads(1)
PROMPTS = ["What is 2+3?", "hi", "A much longer prompt that needs padding in a batch: 12 * 3 = ?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def be(tmp_path_factory):
    backend = TransformersBackend(str(build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny")), batch_size=8)
    yield backend
    backend.close()


def test_greedy_equals_model_generate(be):
    out = be.generate(PROMPTS, GREEDY)
    for ids, got in zip(be.encode_prompts(PROMPTS), out):
        ref = be.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                pad_token_id=be.tokenizer.pad_token_id)
        want = ref[0, len(ids):].tolist()
        assert got[0].token_ids == want
        assert got[0].n_tokens == len(want)


def test_logprobs_equal_unpadded_forward(be):
    completions = ["Step 1: 2 + 3 = 5", "x", ""]
    res = be.logprobs(PROMPTS, completions)
    for p_ids, comp, r in zip(be.encode_prompts(PROMPTS), completions, res):
        c_ids = be.tokenizer(comp, add_special_tokens=False)["input_ids"]
        assert r.token_ids == c_ids
        if not c_ids:
            assert r.per_token == [] and r.total == 0.0
            continue
        with torch.no_grad():
            logp = be.model(torch.tensor([p_ids + c_ids])).logits[0].float().log_softmax(-1)
        want = [logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(c_ids)]
        assert r.per_token == pytest.approx(want, abs=1e-5)
        assert r.total == pytest.approx(sum(want), abs=1e-4)


def test_batching_and_batch_size_do_not_change_greedy(be, tmp_path):
    together = be.generate(PROMPTS, GREEDY)
    alone = [be.generate([p], GREEDY)[0] for p in PROMPTS]
    assert [o[0].token_ids for o in together] == [o[0].token_ids for o in alone]


def test_n_greedy_samples_from_the_expanded_cache_are_the_greedy_output(be):
    one = be.generate(PROMPTS, GREEDY)
    many = be.generate(PROMPTS, GREEDY, n=3)
    for o, m in zip(one, many):
        assert [c.token_ids for c in m] == [o[0].token_ids] * 3


def test_row_compaction_changes_nothing(be):
    text = be.generate(PROMPTS[:1], GREEDY)[0][0].text
    sp = SamplingParams(temperature=1.0, max_tokens=16, seed=5, stop=[text[2:4]])
    be.config.compact_fraction = 0.0  # compact as soon as one row finishes
    eager = be.generate(PROMPTS, sp, n=3)
    be.config.compact_fraction = 1.0  # never compact until all are done
    lazy = be.generate(PROMPTS, sp, n=3)
    be.config.compact_fraction = 0.25
    assert [[c.model_dump() for c in o] for o in eager] == [[c.model_dump() for c in o] for o in lazy]
    assert any(c.finish_reason == "stop" for o in eager for c in o)


def test_seed_does_not_touch_global_rng(be):
    state = torch.random.get_rng_state()
    be.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=4, seed=3))
    assert torch.equal(state, torch.random.get_rng_state())


def test_top_k_1_and_tiny_top_p_are_greedy(be):
    greedy = be.generate(PROMPTS, GREEDY)
    k1 = be.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=16, seed=0))
    p0 = be.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16, seed=0))
    assert [o[0].token_ids for o in k1] == [o[0].token_ids for o in greedy]
    assert [o[0].token_ids for o in p0] == [o[0].token_ids for o in greedy]


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda sp: torch.isfinite(filter_logits(logits, sp))[0].tolist()  # noqa: E731
    assert keep(SamplingParams(top_k=2)) == [True, True, False, False]
    assert keep(SamplingParams(top_p=0.6)) == [True, True, False, False]   # 0.5 < 0.6 <= 0.8
    assert keep(SamplingParams(top_p=0.5)) == [True, False, False, False]  # the mass before token 2 is 0.5
    assert keep(SamplingParams(top_p=0.95)) == [True, True, True, False]
    assert keep(SamplingParams()) == [True] * 4


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=gen)
    counts = torch.bincount(pick_tokens(logits, SamplingParams(), u), minlength=3).float() / 20000
    assert counts.tolist() == pytest.approx(probs.tolist(), abs=0.015)
    hot = torch.bincount(pick_tokens(logits, SamplingParams(temperature=0.5), u), minlength=3).float() / 20000
    sharp = probs ** 2 / (probs ** 2).sum()  # T = 0.5 squares the probabilities
    assert hot.tolist() == pytest.approx(sharp.tolist(), abs=0.015)


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "c"], False) == ("ab", "c")
    assert cut_at_stop("abc\n\ndef", ["\n\n"], True) == ("abc\n\n", "\n\n")
    assert cut_at_stop("abc", ["x"], False) == ("abc", None)


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(stop=[""])
    with pytest.raises(ValueError):
        SamplingParams(temprature=0.5)  # typo: extra fields are rejected
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_input_checks(be):
    assert be.generate([], GREEDY) == []
    with pytest.raises(ValueError, match="2 prompts but 1 assistant prefixes"):
        be.continue_(["a", "b"], ["x"], GREEDY)
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        be.logprobs(["a"], ["x", "y"])
    with pytest.raises(TypeError):
        be.generate([[{"content": "no role"}]], GREEDY)
    assert be.config.trust_remote_code is False
