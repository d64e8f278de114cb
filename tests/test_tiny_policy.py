"""The committed tiny policy (data/tiny-policy), its tokenizer, and the SFT recipe that trained it (the Trainer's
mode sft with a floored cosine schedule and length bucketing, driven by scripts/train_tiny_policy.py)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import pyarrow.parquet as pq  # noqa: E402

from pipeline.evaluate import wilson_interval  # noqa: E402
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table  # noqa: E402
from pipeline.tiny_model import TinyModelConfig, build_model, build_tokenizer  # noqa: E402
from pipeline.train.collate import collate  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.data import TokenizeConfig, encode_sft  # noqa: E402
from pipeline.train.sft import greedy_accuracy  # noqa: E402
from pipeline.train.trainer import Trainer, lr_at  # noqa: E402

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


def test_sft_rows_match_template_and_score_only_the_solution():
    """A bundled-task prompts table encodes to the chat template's ids; only solution + EOS is scored."""
    tok = build_tokenizer()
    probs = make_split(TaskConfig.tiny(), "train", 2)
    data = encode_sft(problems_to_table(probs), tok, TokenizeConfig(), target="gold")
    for i, p in enumerate(probs):
        conv = [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.gold_solution}]
        assert data.prompts[i] + data.completions[i][0] == tok.apply_chat_template(conv, tokenize=True,
                                                                                   return_dict=True)["input_ids"]
        assert tok.decode(data.completions[i][0]) == p.gold_solution + "<|eos|>"
    b = collate(data, [0, 1], tok.pad_token_id)
    assert b.tgt.tolist() == data.completions[0][0] + data.completions[1][0]


def _recipe(tmp_path, probs, **kw) -> TrainConfig:
    """The tiny policy's settings (data/tiny-policy/train_config.yaml) on a small problem set."""
    table = tmp_path / "train.parquet"
    pq.write_table(problems_to_table(probs), table)
    base = dict(model="x", data=str(table), output_dir=str(tmp_path / "run"), mode="sft", sft_column="gold",
                lr_schedule="cosine", weight_decay=0.1, adam_betas=(0.9, 0.95), max_grad_norm=1.0,
                length_bucketing=True, device="cpu", dtype="fp32", drift_probe=0, progress=False, save_final=False)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_with_floor_and_wilson():
    cfg = TrainConfig(model="x", data="-", lr=1.0, lr_schedule="cosine", warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 1100) == pytest.approx(0.01) and lr_at(99, cfg, 1100) == pytest.approx(1.0)
    assert lr_at(600, cfg, 1100) == pytest.approx(0.55) and lr_at(1100, cfg, 1100) == pytest.approx(0.1)
    lin = cfg.model_copy(update={"lr_schedule": "linear"})
    assert lr_at(600, lin, 1100) == pytest.approx(0.55) and lr_at(1100, lin, 1100) == pytest.approx(0.1)
    # the default floor 0 gives bitwise the lr of runs made before the floor existed (the formulas they used)
    for schedule, was in (("cosine", lambda lr, f: lr * 0.5 * (1 + math.cos(math.pi * f))),
                          ("linear", lambda lr, f: lr * (1 - f))):
        plain = TrainConfig(model="x", data="-", lr=3e-4, lr_schedule=schedule, warmup_steps=100)
        assert all(lr_at(s, plain, 1100) == was(3e-4, (s - 100) / 1000) for s in range(100, 1101))
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 10)[0] == 0.0


def test_length_bucketing_covers_every_row_once_per_epoch(tmp_path):
    tok = build_tokenizer()
    probs = make_split(TaskConfig.tiny(), "train", 20)
    cfg = _recipe(tmp_path, probs, micro_batch=2, grad_accum=2, max_steps=10, seed=5)  # 5 batches an epoch
    t = Trainer(cfg, model=build_model(TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64), tok), tokenizer=tok)
    sched = t._schedule()
    assert [len(b) for b in sched] == [4] * 10
    for epoch in (sched[:5], sched[5:]):
        assert sorted(i for b in epoch for i in b) == list(range(20))
    assert sched[:5] != sched[5:]  # reshuffled
    # one window (< 50 batches): the epoch is cut from the rows sorted by length, so batches do not overlap
    length = [len(p) + len(c[0]) for p, c in zip(t.data.prompts, t.data.completions)]
    spans = sorted((min(length[i] for i in b), max(length[i] for i in b)) for b in sched[:5])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# Per-step losses of the loop that trained the committed policy (pipeline/train/sft.py's train_sft before the
# Trainer took it over, git 81b4250), on the setup of test_recipe_matches_the_old_sft_loop: steps 1-5, and the learning rates it stepped with.
OLD_LOOP_LOSSES = [5.913303852081299, 5.285029888153076, 4.521061420440674, 3.8301374912261963, 3.478832721710205]
OLD_LOOP_LRS = [0.005, 0.01, 0.01, 0.00775, 0.00325]
# Both compute the same token-mean NLL in float32, with different kernels and summation orders (the old loop:
# the model's cross-entropy over [tokens, vocab] logits; the Trainer: a chunked head summed per row). Summing n
# positive float32 terms in any order is within (n - 1) u of the exact sum, relative (u = 2^-24); each term's
# log-softmax over V logits adds at most V u more. The largest step here scores N = 791 tokens, V = 361, so
# the losses may differ by (N + V) u = 6.9e-5 relative. The weights that later steps see differ only through
# AdamW updates, which divide the gradient by its own running magnitude, so a gradient that is off by rounding
# gives an update that is off by rounding. (Measured against the old loop: equal to 2.5e-7 relative over 80
# steps of the committed policy's shape, weights to 1.2e-7.)
LOSS_RTOL = (791 + 361) * 2.0 ** -24


def test_recipe_matches_the_old_sft_loop(tmp_path):
    """Same init, data order (bucketing), floored cosine schedule and AdamW as the old loop: same losses."""
    tok = build_tokenizer()
    probs = make_split(TaskConfig.tiny(), "train", 48)
    model = build_model(TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128), tok, seed=0)
    cfg = _recipe(tmp_path, probs, micro_batch=8, max_steps=5, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, seed=3)
    seen: list[tuple[int, float]] = []
    res = Trainer(cfg, model=model, tokenizer=tok).train(on_step=lambda step, m: seen.append((step, m["loss"])))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5] and [h["loss"] for h in res.history] == [x for _, x in seen]
    assert [h["learning_rate"] for h in res.history] == pytest.approx(OLD_LOOP_LRS, rel=1e-15)  # float64
    for got, want in zip([x for _, x in seen], OLD_LOOP_LOSSES):
        assert got == pytest.approx(want, rel=LOSS_RTOL, abs=0)


def test_sft_learns_a_fixed_set(tmp_path):
    """A very small model memorises 4 solutions: loss falls by 4x and greedy decoding reproduces them."""
    tok = build_tokenizer()
    probs = make_split(TaskConfig.tiny(min_steps=1, max_steps=1, templates=["compact"]), "train", 4)
    model = build_model(TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128), tok)
    cfg = _recipe(tmp_path, probs, micro_batch=4, max_steps=120, lr=1e-2, warmup_steps=10, min_lr_ratio=0.05, seed=0)
    hist = Trainer(cfg, model=model, tokenizer=tok).train().history
    first, last = sum(h["loss"] for h in hist[:20]) / 20, sum(h["loss"] for h in hist[-20:]) / 20
    assert last < first / 4
    assert greedy_accuracy(model, tok, probs)["correct"] >= 3


def _script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_tiny_policy", POLICY.parent.parent / "scripts" /
                                                  "train_tiny_policy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # pydantic resolves the config's annotations through the module
    spec.loader.exec_module(mod)
    return mod


def test_committed_config_is_the_trainer_recipe():
    from pipeline.errors import InputError
    script = _script()
    cfg, train = script.load_config(POLICY / "train_config.yaml", [])
    assert (cfg.n_train, cfg.eval_every, cfg.eval_n, cfg.task) == (3000, 200, 300, {"min_steps": 2, "max_steps": 4})
    assert (train.mode, train.sft_column, train.max_steps, train.micro_batch, train.grad_accum) == \
        ("sft", "gold", 1800, 32, 1)
    assert (train.lr, train.lr_schedule, train.warmup_steps, train.min_lr_ratio, train.length_bucketing) == \
        (1e-3, "cosine", 50, 0.05, True)
    assert (train.weight_decay, train.adam_betas, train.max_grad_norm, train.seed, train.threads) == \
        (0.1, (0.9, 0.95), 1.0, 0, 1)
    for bad, key in ((["train.lr_schedule=cosin"], "train.lr_schedule"), (["train.mode=preference"], "train.mode"),
                     (["eval_evry=5"], "eval_evry")):
        with pytest.raises(InputError) as e:
            script.load_config(POLICY / "train_config.yaml", bad)
        assert e.value.column == key and "train_config.yaml" in str(e.value)
    with pytest.raises(ValueError, match="length_bucketing applies to mode sft"):
        TrainConfig(model="x", data="-", length_bucketing=True)


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
