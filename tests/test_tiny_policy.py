"""The committed tiny policy (data/tiny-policy), its tokenizer, and the SFT code that trained it."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from pipeline.tasks.arith import TaskConfig, make_split  # noqa: E402
from pipeline.tiny_model import TinyModelConfig, build_model, build_tokenizer  # noqa: E402
from pipeline.train.sft import (SFTConfig, collate, encode_example, greedy_accuracy, lr_at, train_sft,  # noqa: E402
                                wilson_interval)

POLICY = Path(__file__).resolve().parent.parent / "data" / "tiny-policy"
# history.json records the accuracy measured at training time; the test re-measures it on 200 problems.
HISTORY = json.loads((POLICY / "history.json").read_text()) if (POLICY / "history.json").exists() else None


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads spin against other processes and the
    same step runs ~35x slower (measured: 4.3 s vs 0.12 s per step of the small model below)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(POLICY)
    model = AutoModelForCausalLM.from_pretrained(POLICY)
    return tok, model


def test_folder_is_standard_and_small():
    names = {p.name for p in POLICY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md",
            "train_config.yaml"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing that would be unpickled
    assert (POLICY / "model.safetensors").stat().st_size <= 12_500_000
    cfg = json.loads((POLICY / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in cfg  # loads without trust_remote_code
    tok_cfg = json.loads((POLICY / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4.x and 5.x resolve


def test_loads_offline_fp32(policy):
    tok, model = policy
    assert model.dtype == torch.float32
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


TEXTS = ["Start with 29. Add 9. Then multiply by 9. What is the result?",
         "Step 1: 29 + 9 = 38\nStep 2: 38 * 9 = 342\nAnswer: 342",
         "  two  spaces,\ttabs\n\nand blank lines  ", "ünïcödé 😀 — “quotes”", "<|user|> looks special"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_roundtrip(policy, text):
    tok, _ = policy
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    if text.isascii() and "<|" not in text:
        assert len(ids) == len(text)  # one token per character


def test_committed_tokenizer_matches_code(policy):
    tok, _ = policy
    fresh = build_tokenizer()
    assert tok.get_vocab() == fresh.get_vocab() and tok.chat_template == fresh.chat_template
    assert tok("Step 1: 2 + 3 = 5").input_ids == fresh("Step 1: 2 + 3 = 5").input_ids


def test_chat_template_single_bos_eos(policy):
    tok, _ = policy
    conv = [{"role": "user", "content": "Start with 5. Add 2. What is the result?"},
            {"role": "assistant", "content": "Step 1: 5 + 2 = 7\nAnswer: 7"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "Answer: 7"}]
    text = tok.apply_chat_template(conv, tokenize=False)
    ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(text).input_ids == tok(text, add_special_tokens=False).input_ids  # encode adds no bos
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id
    assert all(not (a == b == tok.eos_token_id) for a, b in zip(ids, ids[1:]))
    gen = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "<|bos|><|user|>\nStart with 5. Add 2. What is the result?\n<|assistant|>\n"
    assert text.startswith(gen)


def test_encode_example_matches_template_and_masks_prompt():
    tok = build_tokenizer()
    p = make_split(TaskConfig.tiny(), "train", 1)[0]
    ex = encode_example(tok, p)
    conv = [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.gold_solution}]
    assert ex.ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ex.ids[ex.n_prompt:]) == p.gold_solution + "<|eos|>"
    other = encode_example(tok, make_split(TaskConfig.tiny(), "train", 2)[1])
    b = collate([ex, other], tok.pad_token_id)
    for r, e in enumerate([ex, other]):
        n = len(e.ids)
        assert b["labels"][r, :e.n_prompt].eq(-100).all() and b["labels"][r, n:].eq(-100).all()
        assert b["labels"][r, e.n_prompt:n].tolist() == e.ids[e.n_prompt:]
        assert b["attention_mask"][r].sum().item() == n


def test_lr_schedule_and_wilson():
    cfg = SFTConfig(steps=1100, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.01) and lr_at(99, cfg) == pytest.approx(1.0)
    assert lr_at(600, cfg) == pytest.approx(0.55) and lr_at(1100, cfg) == pytest.approx(0.1)
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 10)[0] == 0.0


def test_sft_learns_a_fixed_set():
    """A very small model memorises 4 solutions: loss falls by 4x and greedy decoding reproduces them."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    probs = make_split(TaskConfig.tiny(min_steps=1, max_steps=1, templates=["compact"]), "train", 4)
    model = build_model(TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128), tok)
    hist = train_sft(model, tok, probs, [], SFTConfig(steps=120, batch_size=4, lr=1e-2, warmup_steps=10,
                                                      eval_every=0, log_every=20), log=lambda s: None)
    assert hist[-1]["loss"] < hist[0]["loss"] / 4
    assert greedy_accuracy(model, tok, probs)["correct"] >= 3


@pytest.mark.skipif(HISTORY is None, reason="no committed policy")
def test_policy_accuracy_in_reported_band(policy):
    tok, model = policy
    problems = make_split(TaskConfig.tiny(), "eval", 200)
    res = greedy_accuracy(model, tok, problems)
    assert res["n"] == 200
    # TRAINING.md reports 1000 problems (0.547); the first 200 were 0.585 at training time (history.json).
    assert HISTORY["final_first_200"]["accuracy"] == pytest.approx(res["accuracy"], abs=0.02)
    assert 0.40 <= res["accuracy"] <= 0.65     # the 40-60 % band (data/tiny-policy/TRAINING.md), 200-problem noise
    assert res["steps_all_right"] >= res["accuracy"] - 0.05   # a right answer almost always has right steps
