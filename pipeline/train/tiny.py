"""Tiny offline models and tokenizers built in code: for tests, benchmarks and smoke runs (no downloads).

`char_tokenizer()` is a character-level `tokenizers` WordLevel tokenizer wrapped as a fast HF tokenizer, with
a chat template. With `template_bos=True` the template writes the BOS token itself *and* the tokenizer's
post-processor adds one on `encode(..., add_special_tokens=True)`: the classic doubled-BOS trap that the data
code must avoid.
"""
from __future__ import annotations

import string

import torch

from pipeline.tiny_model import TinyModelConfig, build_model

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")

CHAT_TEMPLATE_BOS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_TEMPLATE_PLAIN = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(template_bos: bool = True, chat_template: str | None = None):
    """A char-level PreTrainedTokenizerFast (vocab: 7 specials + printable ASCII)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    if template_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = chat_template or (CHAT_TEMPLATE_BOS if template_bos else CHAT_TEMPLATE_PLAIN)
    return fast


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
               tie_word_embeddings: bool = False, max_positions: int = 512, head_scale: float = 20.0):
    """A randomly initialised LlamaForCausalLM in fp32 (a few tens of thousands of parameters), special ids
    those of `char_tokenizer`."""
    config = TinyModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=tie_word_embeddings)
    model = build_model(config, seed=seed, vocab={"vocab_size": vocab_size, "bos_token_id": 2, "eos_token_id": 3,
                                                  "pad_token_id": 0})
    # Random init gives near-uniform logits; a larger head scale makes log-probs differ between texts, so
    # tests that compare paths are not comparing near-constants.
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model
