"""The tiny policy's tokenizer and model, built offline: a char-level tokenizer and a small standard Llama.

The tokenizer is a `tokenizers` BPE model with no merges, so every character is one token; characters outside
printable ASCII fall back to their UTF-8 bytes (<0xNN> tokens), so any text round-trips exactly.
BOS is written by the chat template only: the tokenizer adds no special tokens on encode, so
`apply_chat_template(..., tokenize=True)` and `encode(apply_chat_template(..., tokenize=False))` give the same ids
and never a doubled BOS. Everything is a standard `LlamaForCausalLM` + `PreTrainedTokenizerFast` saved with
`save_pretrained`, so transformers (and vLLM) load the folder with no custom code.
"""
from __future__ import annotations

import string

from pydantic import BaseModel, Field

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIALS = [PAD, BOS, EOS, UNK] + ROLE_TOKENS
CHARS = list(string.printable[:-2])  # digits, letters, punctuation, space, \t, \n (not \r, \x0b, \x0c)
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

# An assistant turn ends with EOS right after its content: generation stops at EOS and the text has no tail.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TinyModelConfig(BaseModel):
    """Shape of the tiny Llama. Defaults: the committed tiny policy (see data/tiny-policy/train_config.yaml)."""

    hidden_size: int = Field(256, description="model width")
    num_hidden_layers: int = Field(4, description="transformer blocks")
    num_attention_heads: int = Field(4, description="heads (head_dim = hidden_size / heads)")
    intermediate_size: int = Field(512, description="SwiGLU MLP width")
    max_position_embeddings: int = Field(1024, description="longest sequence (RoPE, so no parameters)")
    rope_theta: float = Field(10000.0, description="RoPE base")
    tie_word_embeddings: bool = Field(True, description="share input and output embeddings (saves vocab*width)")
    initializer_range: float = Field(0.02, gt=0, description="std of the random init (the tiny policy: 0.02)")


def build_tokenizer():
    """The char-level PreTrainedTokenizerFast with the chat template, bos/eos/pad/unk set."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + BYTE_TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, byte_fallback=True))
    # Specials are matched before the model sees the text, so "<|user|>" is one token, not 8 characters.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=ROLE_TOKENS,
                                   clean_up_tokenization_spaces=False, model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # for batched generation; training pads explicitly
    return fast


def save_tokenizer(tokenizer, folder) -> None:
    """save_pretrained, naming the class PreTrainedTokenizerFast: transformers 5 writes its new generic name
    (TokenizersBackend), which transformers 4.x and tools pinned to it cannot resolve; 5.x accepts both."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(folder)
    cfg_file = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build_model(config: TinyModelConfig | None = None, tokenizer=None, seed: int = 0, *,
                vocab: dict | None = None):
    """A freshly initialised fp32 LlamaForCausalLM sized by `config`: the one builder of the project's tiny
    models (the tiny policy, pipeline/train/tiny.py's test models, the backends' fixture folders).

    Vocabulary size and special ids come from the tokenizer, or from `vocab` (vocab_size, bos_token_id,
    eos_token_id, pad_token_id) for a model built without one. The pad id matters: its embedding row starts at 0.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyModelConfig()
    if vocab is None:
        tok = tokenizer or build_tokenizer()
        vocab = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 "pad_token_id": tok.pad_token_id}
    lc = LlamaConfig(
        **vocab, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range, attn_implementation="sdpa", dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(lc)
