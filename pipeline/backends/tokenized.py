"""Shared front half of the local backends (transformers, vLLM): chat templating and tokenization.

Both local backends turn prompts into token ids here, with the same Hugging Face tokenizer, and then run
their own engine on ids. That is why greedy outputs and log-probs agree across backends: they see the very
same tokens. Subclasses implement `generate_ids` and `score_ids`.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

from pipeline.backends.base import (Completion, LogprobResult, Prompt, SamplingParams, as_messages,
                                    resolve_n)
from pipeline.errors import BackendError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_prompt(tokenizer, prompt: Prompt, assistant_prefix: str | None = None) -> str:
    """The text the model sees: the chat template with the generation prompt, then the partial assistant
    turn verbatim. Without a chat template the user contents are joined with newlines (base models)."""
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    return text + (assistant_prefix or "")


def encode_text(tokenizer, text: str) -> list[int]:
    # The rendered template already carries any BOS it wants; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(tokenizer, generation_config=None) -> set[int]:
    """Every id that ends a sample: the tokenizer's EOS plus the model's generation_config eos ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    g = getattr(generation_config, "eos_token_id", None)
    if isinstance(g, int):
        ids.add(g)
    elif g:
        ids.update(int(x) for x in g)
    return ids


class PromptTooLong(BackendError):
    """A sequence longer than the model's context: never retried (the same input fails the same way)."""


def check_context(context_length: int | None, lengths: list[int], what: str) -> None:
    """Refuse sequences that do not fit the model's context (a model run past it degrades into garbage, and a
    1 MB prompt would take minutes to fail); the error names the sequence's index in the call."""
    if context_length is None:
        return
    for i, n in enumerate(lengths):
        if n > context_length:
            raise PromptTooLong(f"sequence {i} of the call: {what} is {n} tokens, more than the model's context "
                                f"of {context_length} tokens")


class TokenizedBackend(ABC):
    """Implements the Backend primitives on top of two id-level methods."""

    model_id: str
    weights_hash: str
    tokenizer: object

    @abstractmethod
    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams,
                     n: int) -> list[list[Completion]]:
        """Sample n completions after each id sequence."""

    @abstractmethod
    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[LogprobResult]:
        """Teacher-forced log-probs of each completion id sequence after its prompt ids."""

    def encode_prompts(self, prompts: list[Prompt], prefixes: list[str] | None = None) -> list[list[int]]:
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} assistant prefixes")
        return [encode_text(self.tokenizer, render_prompt(self.tokenizer, p, prefixes[i] if prefixes else None))
                for i, p in enumerate(prompts)]

    context_length: int | None = None  # the model's context in tokens (None: unknown, nothing checked)

    def context_errors(self, prompts: list[Prompt]) -> list[str | None]:
        """Per prompt: why it cannot be generated from (it leaves no room for one new token in the model's
        context), or None. Lets a stage fail such rows one by one instead of the whole call."""
        if self.context_length is None:
            return [None] * len(prompts)
        return [None if len(ids) < self.context_length else
                f"prompt of {len(ids)} tokens leaves no room in the model's context of {self.context_length} tokens"
                for ids in self.encode_prompts(prompts)]

    def generate(self, prompts: list[Prompt], sampling: SamplingParams | None = None,
                 n: int | None = None) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        if not prompts:
            return []
        return self.generate_ids(self.encode_prompts(prompts), sampling, resolve_n(sampling, n))

    def continue_(self, prompts: list[Prompt], assistant_prefixes: list[str],
                  sampling: SamplingParams | None = None, n: int | None = None) -> list[list[Completion]]:
        sampling = sampling or SamplingParams()
        if not prompts:
            return []
        return self.generate_ids(self.encode_prompts(prompts, assistant_prefixes), sampling,
                                 resolve_n(sampling, n))

    def logprobs(self, prompts: list[Prompt], completions: list[str]) -> list[LogprobResult]:
        if len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        comp_ids = [encode_text(self.tokenizer, c) for c in completions]
        return self.score_ids(self.encode_prompts(prompts), comp_ids)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
