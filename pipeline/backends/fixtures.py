"""A tiny random Llama with a char-level tokenizer and a ChatML template, built offline in a folder.

Tests and benchmarks use it when no trained model is needed: every backend (transformers, vLLM, the http
test server) loads it like a real checkpoint. Char-level tokens keep re-tokenization exact, so "continue from
this prefix" and "score this text" mean the same tokens on every backend.
"""
from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_vocab() -> list[str]:
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    return SPECIALS + chars


def build_char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(char_vocab())}
    # BPE without merges is a char-level model; Fuse joins the chars back without separators.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", bos_token=None)
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(folder: str | Path, seed: int = 0, *, hidden: int = 128, layers: int = 2,
                     heads: int = 2, init_std: float = 0.1) -> Path:
    """Write a random fp32 Llama (head_dim 64, which vLLM's CPU kernels support) plus tokenizer to `folder`.

    A larger init std than the usual 0.02 gives peaked next-token distributions, so greedy choices are not
    decided by float rounding.
    """
    from transformers import GenerationConfig

    from pipeline.tiny_model import TinyModelConfig, build_model

    folder = Path(folder)
    tok = build_char_tokenizer()
    config = TinyModelConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=1024, tie_word_embeddings=False,
                             initializer_range=init_std)
    model = build_model(config, tok, seed)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
